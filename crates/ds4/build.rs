//! Captures the git commit (`git rev-parse --short HEAD`) for `ds4 bench`'s `commit` column as
//! `DS4_BUILD_COMMIT`; `DS4_COMMIT` in the build environment overrides it (builds from a copy of
//! the tree without `.git`). Without either, the binary asks git at run time or says "unknown".

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=DS4_COMMIT");
    let commit = std::env::var("DS4_COMMIT")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    if let Some(c) = commit {
        println!("cargo:rustc-env=DS4_BUILD_COMMIT={c}");
    }
    // Rebuild when HEAD moves (only for files that exist: a missing one would rerun always).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(r);
    }
    for w in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &w])
            && Path::new(&p).is_file()
        {
            let abs = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone().into());
            println!("cargo:rerun-if-changed={}", abs.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
