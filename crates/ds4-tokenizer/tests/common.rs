#![allow(dead_code)]
//! Shared helpers for the integration tests.

use std::path::PathBuf;
use std::sync::OnceLock;

use ds4_tokenizer::Tokenizer;

/// `<repo>/../shared/fixtures` (override with `DS4_FIXTURES`).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("DS4_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

pub fn tokenizer_json_path() -> Option<PathBuf> {
    let p = fixtures_dir().join("tokenizer/tokenizer.json");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} not found (set DS4_FIXTURES to the shared fixtures folder)",
            p.display()
        );
        None
    }
}

/// The real DeepSeek V4 tokenizer, loaded once per test binary; `None` (test skipped) when the
/// fixture is absent.
pub fn tok() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let p = tokenizer_json_path()?;
        let t0 = std::time::Instant::now();
        let t = Tokenizer::from_tokenizer_json(&p).expect("load tokenizer.json");
        eprintln!("tokenizer.json loaded in {:?}", t0.elapsed());
        Some(t)
    })
    .as_ref()
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}
