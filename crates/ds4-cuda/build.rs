//! Compile `kernels/*.cu` to sm_90a cubins with nvcc when the `cuda` feature is on, and embed
//! them (`include_bytes!`). The sources are embedded too, for NVRTC at run time when no nvcc was
//! found at build time. A kernel that does not compile fails the build.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin/nvcc`, `/usr/local/cuda/bin/nvcc`, then `PATH`.
//!
//! A kernel file whose first line is `// ds4-nvcc: FLAGS` is compiled with those extra flags
//! (e.g. `-fmad=false` for kernels that must round exactly as the CPU reference).

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(h) = env::var_os("CUDA_HOME") {
        candidates.push(Path::new(&h).join("bin/nvcc"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            candidates.push(dir.join("nvcc"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Extra nvcc flags named on the first line of a kernel file (`// ds4-nvcc: -fmad=false`).
fn file_flags(src: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(src).unwrap_or_default();
    let first = text.lines().next().unwrap_or("");
    match first.trim().strip_prefix("// ds4-nvcc:") {
        Some(rest) => rest.split_whitespace().map(str::to_string).collect(),
        None => Vec::new(),
    }
}

/// The source of `path` with every `#include "x"` of a file in `kdir` replaced by that file's
/// (expanded) text, each header once.
fn expand_includes(path: &Path, kdir: &Path, seen: &mut Vec<PathBuf>) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let local = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
            .map(|name| kdir.join(name))
            .filter(|h| h.is_file());
        match local {
            Some(h) if seen.contains(&h) => {}
            Some(h) => {
                seen.push(h.clone());
                out.push_str(&expand_includes(&h, kdir, seen));
            }
            None if line.trim() == "#pragma once" => {}
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=DS4_CUDA_ARCH");
    println!("cargo:rerun-if-env-changed=DS4_REQUIRE_NVCC");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kdir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for entry in std::fs::read_dir(&kdir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let mut table = String::new();
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let nvcc = if cuda { find_nvcc() } else { None };
    if cuda && nvcc.is_none() && env::var_os("DS4_REQUIRE_NVCC").is_some() {
        panic!("ds4-cuda: DS4_REQUIRE_NVCC is set but no nvcc was found (set NVCC or CUDA_HOME)");
    }
    if cuda && nvcc.is_none() {
        println!(
            "cargo:warning=ds4-cuda: no nvcc found (set NVCC); kernels will be compiled by NVRTC at run time"
        );
    }
    let arch = env::var("DS4_CUDA_ARCH").unwrap_or_else(|_| "sm_90a".to_string());
    table.push_str("/// (module name, cubin bytes) for every kernel file, built by nvcc.\n");
    table.push_str("pub const CUBINS: &[(&str, &[u8])] = &[\n");
    if let Some(nvcc) = &nvcc {
        for src in &sources {
            let stem = src.file_stem().unwrap().to_string_lossy().to_string();
            let cubin = out.join(format!("{stem}.cubin"));
            let output = Command::new(nvcc)
                .args([
                    "-cubin",
                    &format!("-arch={arch}"),
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                ])
                .args(file_flags(src))
                .arg("-I")
                .arg(&kdir)
                .arg("-o")
                .arg(&cubin)
                .arg(src)
                .output();
            match output {
                Ok(o) if o.status.success() => {
                    let _ = writeln!(
                        table,
                        "    ({stem:?}, include_bytes!({:?})),",
                        cubin.display().to_string()
                    );
                }
                Ok(o) => {
                    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
                    eprintln!("ds4-cuda: nvcc failed on {}", src.display());
                    std::process::exit(1);
                }
                Err(e) => {
                    eprintln!("ds4-cuda: cannot run {}: {e}", nvcc.display());
                    std::process::exit(1);
                }
            }
        }
    }
    table.push_str("];\n\n/// (module name, CUDA source) for NVRTC.\npub const SOURCES: &[(&str, &str)] = &[\n");
    if cuda {
        for src in &sources {
            let stem = src.file_stem().unwrap().to_string_lossy().to_string();
            // NVRTC gets no include path: splice the local headers into the source.
            let mut seen = Vec::new();
            let expanded = expand_includes(src, &kdir, &mut seen);
            let flat = out.join(format!("{stem}.nvrtc.cu"));
            std::fs::write(&flat, expanded).expect("write the NVRTC source");
            let _ = writeln!(
                table,
                "    ({stem:?}, include_str!({:?})),",
                flat.display().to_string()
            );
        }
    }
    table.push_str("];\n");
    let _ = writeln!(
        table,
        "\n/// Target architecture of the cubins.\npub const ARCH: &str = {arch:?};"
    );
    std::fs::write(out.join("kernels.rs"), table).expect("write kernels.rs");
}
