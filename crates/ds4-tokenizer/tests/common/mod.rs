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

/// `<fixtures>/tokenizer/tokenizer.json`, else the repository's copy
/// (`tests/fixtures/tokenizer/tokenizer.json`, the same file), so the corpus tests also run
/// where the shared fixtures folder is absent.
pub fn tokenizer_json_path() -> Option<PathBuf> {
    let p = fixtures_dir().join("tokenizer/tokenizer.json");
    if p.exists() {
        return Some(p);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer/tokenizer.json");
    if repo.exists() {
        return Some(repo);
    }
    eprintln!(
        "SKIP: {} and {} not found (set DS4_FIXTURES to the shared fixtures folder)",
        p.display(),
        repo.display()
    );
    None
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

/// Unsigned LEB128 reader over a byte slice.
pub struct Varints<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Varints<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Varints { buf, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.buf[self.pos];
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    pub fn next_ids(&mut self) -> Vec<u32> {
        let n = self.next_u64() as usize;
        (0..n).map(|_| self.next_u64() as u32).collect()
    }
}

/// `(category, text)` documents of a `.jsonl` corpus file in `tests/data`.
pub fn read_corpus(name: &str) -> Vec<(String, String)> {
    let p = data_dir().join(format!("{name}.jsonl"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    s.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("corpus line");
            (
                v["cat"].as_str().expect("cat").to_string(),
                v["text"].as_str().expect("text").to_string(),
            )
        })
        .collect()
}

/// Per-document ids of `tests/data/<file>`.
pub fn read_ids(file: &str) -> Vec<Vec<u32>> {
    let p = data_dir().join(file);
    let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut r = Varints::new(&b);
    let mut out = Vec::new();
    while !r.at_end() {
        out.push(r.next_ids());
    }
    out
}

/// `(document index, ids)` of an indexed ids file in `tests/data`.
pub fn read_indexed_ids(file: &str) -> Vec<(usize, Vec<u32>)> {
    let p = data_dir().join(file);
    let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut r = Varints::new(&b);
    let mut out = Vec::new();
    while !r.at_end() {
        let i = r.next_u64() as usize;
        out.push((i, r.next_ids()));
    }
    out
}

/// Compare `got` with `want` for a list of documents; print every mismatch (first differing
/// token with context) and return how many documents differ.
pub fn report_mismatches(
    t: &Tokenizer,
    label: &str,
    docs: &[(String, String)],
    cases: &[(usize, Vec<u32>)],
    f: impl Fn(&str) -> Vec<u32>,
) -> usize {
    let mut bad = 0;
    for (i, want) in cases {
        let (cat, text) = &docs[*i];
        let got = f(text);
        if got != *want {
            bad += 1;
            if bad <= 10 {
                let k = got
                    .iter()
                    .zip(want.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(want.len()));
                let lo = k.saturating_sub(3);
                let show = |ids: &[u32]| {
                    ids.iter()
                        .map(|&id| format!("{id}:{:?}", t.token_str(id).unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                eprintln!(
                    "{label} doc {i} ({cat}, {} bytes): first difference at token {k}\n  got:  {}\n  want: {}",
                    text.len(),
                    show(&got[lo..(k + 4).min(got.len())]),
                    show(&want[lo..(k + 4).min(want.len())]),
                );
            }
        }
    }
    bad
}
