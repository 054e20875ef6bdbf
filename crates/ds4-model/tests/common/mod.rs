//! Shared helpers of the integration tests: fixture locations, one conversion per (set, recipe)
//! per test binary, manifests and statistics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ds4_convert::{ConvertOptions, Recipe, convert_checkpoint};
use ds4_gguf::Gguf;
use ds4_model::npy::{self, Npy};
use ds4_model::{Engine, EngineOptions, Model};
use serde_json::Value;

/// `tests/fixtures` at the repository root.
pub fn repo_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `../shared/fixtures` relative to the repository root.
pub fn shared_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

/// The folder of a model set (`tiny` from the repo, `flashdims` from the shared fixtures), or
/// `None` (with a printed message) when absent.
pub fn set_dir(set: &str) -> Option<PathBuf> {
    let d = match set {
        "tiny" => repo_fixtures().join("tiny"),
        other => shared_fixtures().join(other),
    };
    if d.join("official/config.json").exists() {
        Some(d)
    } else {
        eprintln!("SKIP: fixture set {set} not found at {}", d.display());
        None
    }
}

type Cell = Arc<OnceLock<Option<Arc<Model>>>>;
type Cache = Mutex<HashMap<(String, String), Cell>>;

fn cache() -> &'static Cache {
    static C: OnceLock<Cache> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

fn keep() -> &'static Mutex<Vec<tempfile::TempDir>> {
    static K: OnceLock<Mutex<Vec<tempfile::TempDir>>> = OnceLock::new();
    K.get_or_init(|| Mutex::new(Vec::new()))
}

/// The model of `set` converted with `recipe` (once per test binary), or `None` when the
/// fixture set is absent.
pub fn model(set: &str, recipe: Recipe) -> Option<Arc<Model>> {
    let dir = set_dir(set)?;
    let cell = {
        let mut c = cache().lock().unwrap();
        c.entry((set.to_string(), recipe.name().to_string()))
            .or_default()
            .clone()
    };
    cell.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join(format!("{set}-{}.gguf", recipe.name()));
        let t0 = std::time::Instant::now();
        convert_checkpoint(
            &dir.join("official"),
            &out,
            &ConvertOptions::new(recipe),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("convert {set} {}: {e}", recipe.name()));
        let g = Arc::new(Gguf::open(&out).expect("open converted"));
        let m = Arc::new(Model::load(g).expect("load converted"));
        eprintln!(
            "converted {set} with recipe {} in {:.2}s",
            recipe.name(),
            t0.elapsed().as_secs_f64()
        );
        keep().lock().unwrap().push(tmp);
        Some(m)
    })
    .clone()
}

/// The path of the converted file of `set`/`recipe` (after [`model`]).
pub fn gguf_bytes(m: &Model) -> &[u8] {
    m.gguf.bytes()
}

/// An engine over a loaded model.
pub fn engine(m: &Arc<Model>, qat: bool) -> Engine {
    Engine::from_model(
        m.clone(),
        EngineOptions {
            qat,
            threads: Some(2),
            ..Default::default()
        },
    )
    .expect("engine")
}

/// A reference mode folder (`ref_plain` / `ref_qat`).
pub struct RefSet {
    pub dir: PathBuf,
    pub manifest: Value,
}

impl RefSet {
    pub fn open(set: &str, mode: &str) -> Option<RefSet> {
        let dir = set_dir(set)?.join(mode);
        let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
        let manifest: Value = serde_json::from_str(&text).expect("manifest json");
        Some(RefSet { dir, manifest })
    }

    pub fn sequences(&self) -> Vec<&Value> {
        self.manifest["sequences"]
            .as_array()
            .expect("sequences")
            .iter()
            .collect()
    }

    pub fn npy(&self, seq: &str, file: &str) -> Npy {
        let p = self.dir.join(seq).join(file);
        npy::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    pub fn npy_opt(&self, seq: &str, file: &str) -> Option<Npy> {
        let p = self.dir.join(seq).join(file);
        p.exists().then(|| npy::read(&p).unwrap())
    }
}

pub fn ints(a: &Npy) -> Vec<i64> {
    a.to_i64().expect("integer npy")
}

pub fn floats(a: &Npy) -> Vec<f32> {
    a.to_f32().expect("float npy")
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("uint") as usize)
        .collect()
}

/// Percentile (nearest-rank on the sorted values, `q` in [0, 1]).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((q * (s.len() - 1) as f64).round() as usize).min(s.len() - 1);
    s[i]
}

/// median / p90 / p99 / max of per-position values.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn stats(v: &[f64]) -> Stats {
    Stats {
        n: v.len(),
        median: percentile(v, 0.5),
        p90: percentile(v, 0.9),
        p99: percentile(v, 0.99),
        max: v.iter().cloned().fold(0.0, f64::max),
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} median={:.3e} p90={:.3e} p99={:.3e} max={:.3e}",
            self.n, self.median, self.p90, self.p99, self.max
        )
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
