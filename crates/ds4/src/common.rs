//! What several subcommands share: model resolution (with the built-in fallback), backend
//! choice, tokenizer loading, sampling options.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ds4_gguf::Gguf;
use ds4_model::session::DEFAULT_PREFILL_CHUNK;
use ds4_model::{Backend, Engine, EngineOptions, Model, Session, SessionOptions};
use ds4_tokenizer::Tokenizer;

/// Default model file looked up in the working directory (ds4's default).
pub const DEFAULT_MODEL: &str = "ds4flash.gguf";

/// Which backend to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Cpu,
    Cuda,
}

/// How to load the model and which backend to run it on: shared by every subcommand that runs
/// the model (run, chat, serve, bench). `serve` flattens only this part, because the server's
/// own flags carry the context size and the prefill chunk.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// GGUF model file (default: ./ds4flash.gguf, else the tiny built-in model).
    #[arg(short = 'm', long = "model", env = "DS4_MODEL")]
    pub model: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    pub backend: BackendChoice,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long, env = "DS4_THREADS")]
    pub threads: Option<usize>,
    /// Touch every page of the mapped model file before generating (a note on stderr).
    #[arg(long)]
    pub warm_weights: bool,
    /// Turn off the QAT simulation (FP8 KV rows, Hadamard+FP4 indexer): only to compare with
    /// implementations that omit it.
    #[arg(long)]
    pub no_qat: bool,
    /// Exact kernels only on GPU backends (no reduced-precision tensor-core routes).
    #[arg(long)]
    pub quality: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// Model and backend options plus the session size: run and chat.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Context size (tokens) of the session.
    #[arg(short = 'c', long, default_value_t = ds4_model::session::DEFAULT_CTX)]
    pub ctx: usize,
    /// Tokens per prefill chunk, on CUDA also the tokens of one pass (sizes its scratch).
    /// Default: 8192 on CUDA (smaller if the device memory left after the weights is short),
    /// 2048 on the CPU (ds4's).
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
}

/// Where the model came from.
pub struct LoadedModel {
    pub path: PathBuf,
    pub builtin: bool,
    pub gguf: Arc<Gguf>,
    pub engine: Engine,
}

/// Resolve the model path: `-m`, else `./ds4flash.gguf`, else the built-in tiny model (said on
/// stderr).
pub fn resolve_model(arg: Option<&Path>) -> Result<(PathBuf, bool)> {
    if let Some(p) = arg {
        return Ok((p.to_path_buf(), false));
    }
    let default = Path::new(DEFAULT_MODEL);
    if default.is_file() {
        return Ok((default.to_path_buf(), false));
    }
    let p = ds4_convert::builtin::tiny_path(None)
        .context("cannot write the built-in tiny model to the temp directory")?;
    eprintln!(
        "ds4: no model file given and no ./{DEFAULT_MODEL}: using the tiny built-in model \
         (random weights, real tokenizer; its output is gibberish)"
    );
    Ok((p, true))
}

/// Open and validate the model. With `--backend cuda` the device is probed first, so a build
/// or a machine without CUDA fails at once with one line.
pub fn load_model(a: &LoadArgs) -> Result<LoadedModel> {
    if a.backend == BackendChoice::Cuda {
        ds4_cuda::probe(a.device).context("--backend cuda")?;
    }
    let (path, builtin) = resolve_model(a.model.as_deref())?;
    let gguf =
        Arc::new(Gguf::open(&path).with_context(|| format!("cannot open {}", path.display()))?);
    if a.warm_weights {
        warm_weights(&gguf);
    }
    let opts = EngineOptions {
        qat: !a.no_qat,
        threads: a.threads,
        ..EngineOptions::default()
    };
    let engine = Engine::from_gguf(gguf.clone(), opts)
        .with_context(|| format!("cannot load {}", path.display()))?;
    Ok(LoadedModel {
        path,
        builtin,
        gguf,
        engine,
    })
}

/// `--warm-weights`: fault in every page of the model file; one note on stderr.
pub fn warm_weights(gguf: &Gguf) {
    let t0 = std::time::Instant::now();
    let bytes = gguf.warm_pages();
    let s = t0.elapsed().as_secs_f64();
    eprintln!(
        "ds4: warm weights: touched {bytes} bytes ({:.2} GB) in {s:.2} s ({:.2} GB/s)",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / s.max(1e-9)
    );
}

/// A UTF-8 text file (prompts, perplexity texts), with the path in the error.
pub fn read_text(path: &Path) -> Result<String> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(b).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The tokenizer stored in the model file.
pub fn load_tokenizer(gguf: &Gguf, path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_gguf(gguf)
        .with_context(|| format!("{} has no usable tokenizer", path.display()))
}

/// The prefill chunk: `--prefill-chunk` if given, else [`ds4_cuda::DEFAULT_PASS_TOKENS`] on
/// CUDA and ds4's [`DEFAULT_PREFILL_CHUNK`] on the CPU.
pub fn prefill_chunk(a: &LoadArgs, arg: Option<usize>) -> usize {
    arg.unwrap_or(match a.backend {
        BackendChoice::Cuda => ds4_cuda::DEFAULT_PASS_TOKENS,
        BackendChoice::Cpu => DEFAULT_PREFILL_CHUNK,
    })
}

/// CUDA backend options from the flags; the backend's pass size (`max_chunk`, the tokens one
/// prefill pass evaluates and its scratch is sized for) follows the prefill chunk, so a chunk
/// of P tokens is one pass, as the session schedules it. Without `--prefill-chunk` the backend
/// may shrink the pass to fit its memory (`CudaOptions::fit_chunk`).
pub fn cuda_options(a: &LoadArgs, arg: Option<usize>) -> ds4_cuda::CudaOptions {
    ds4_cuda::CudaOptions {
        device: a.device,
        qat: !a.no_qat,
        quality: a.quality,
        max_chunk: prefill_chunk(a, arg).max(1),
        fit_chunk: arg.is_none(),
        ..Default::default()
    }
}

/// A backend of the chosen kind with room for `ctx` tokens (typed error: the server's backend
/// factory needs it).
pub fn new_backend(
    kind: BackendChoice,
    engine: &Engine,
    cuda: &ds4_cuda::CudaOptions,
    ctx: usize,
) -> ds4_model::Result<Box<dyn Backend>> {
    match kind {
        BackendChoice::Cpu => Ok(Box::new(engine.cpu_backend(ctx)?)),
        BackendChoice::Cuda => ds4_cuda::new_backend(engine.model().clone(), ctx, cuda.clone()),
    }
}

/// A backend of the chosen kind with room for `ctx` tokens, evaluating prefill chunks of up to
/// the prefill chunk's tokens in one pass.
pub fn make_backend(
    a: &LoadArgs,
    engine: &Engine,
    ctx: usize,
    prefill_chunk: Option<usize>,
) -> Result<Box<dyn Backend>> {
    Ok(new_backend(
        a.backend,
        engine,
        &cuda_options(a, prefill_chunk),
        ctx,
    )?)
}

/// A session on the chosen backend.
pub fn make_session(a: &ModelArgs, lm: &LoadedModel) -> Result<Session> {
    if a.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if a.prefill_chunk == Some(0) {
        bail!("--prefill-chunk must be at least 1");
    }
    let backend = make_backend(&a.load, &lm.engine, a.ctx, a.prefill_chunk)?;
    Ok(Session::with_backend(
        backend,
        SessionOptions {
            ctx: a.ctx,
            prefill_chunk: prefill_chunk(&a.load, a.prefill_chunk),
        },
    )?)
}

/// Model fingerprint for the disk KV cache: SHA-256 over the GGUF header (version, every
/// metadata key and value, the tensor directory: names, types, shapes, offsets; exactly the
/// bytes before the tensor data), the tensor data size, and 64 KiB samples from the start and
/// the end of the tensor data (so two synthetic files that differ only in their seed differ).
/// The path plays no part: the same model under another name or directory has the same
/// fingerprint.
pub fn fingerprint(g: &Gguf) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const SAMPLE: usize = 64 << 10;
    let bytes = g.bytes();
    let data_start = (g.data_offset() as usize).min(bytes.len());
    let (header, data) = bytes.split_at(data_start);
    let mut h = Sha256::new();
    h.update(b"ds4-rs model fingerprint v1\0");
    h.update((header.len() as u64).to_le_bytes());
    h.update(header);
    h.update((data.len() as u64).to_le_bytes());
    h.update(&data[..data.len().min(SAMPLE)]);
    h.update(&data[data.len().saturating_sub(SAMPLE)..]);
    h.finalize().into()
}

/// Routed-expert quantization in bits per weight (ds4 stores 2 or 4 in its KV checkpoints;
/// exact recipes give 8, 16 or 32).
pub fn routed_quant_bits(model: &Model) -> u8 {
    use ds4_gguf::GgmlType as T;
    let Some(l) = model.weights.layers.first() else {
        return 0;
    };
    match l.gate_exps.t.ty {
        T::IQ2_XXS | T::Q2_K => 2,
        T::Q4_K => 4,
        T::Q8_0 => 8,
        T::F16 | T::BF16 => 16,
        T::F32 => 32,
        _ => 0,
    }
}

/// Sampling flags.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temp: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    /// Keep tokens with p ≥ min_p · p(top).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// RNG seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<ds4_model::SamplerParams> {
        if !(0.0..=100.0).contains(&self.temp) {
            bail!("invalid value for --temp: {}", self.temp);
        }
        if !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) {
            bail!("--top-p and --min-p must be in [0, 1]");
        }
        Ok(ds4_model::SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
        })
    }

    pub fn rng(&self) -> ds4_model::Rng {
        let seed = self.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            t ^ ((std::process::id() as u64) << 32)
        });
        ds4_model::Rng::new(seed)
    }
}

/// Thinking mode flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ThinkArgs {
    /// Thinking on (the default).
    #[arg(long, conflicts_with_all = ["nothink", "think_max"])]
    pub think: bool,
    /// Thinking off: the assistant turn starts with `</think>`.
    #[arg(long, conflicts_with = "think_max")]
    pub nothink: bool,
    /// Think Max (only when --ctx ≥ 393216; otherwise normal thinking).
    #[arg(long)]
    pub think_max: bool,
}

impl ThinkArgs {
    pub fn mode(&self, ctx: usize) -> ds4_tokenizer::ThinkMode {
        use ds4_tokenizer::ThinkMode;
        if self.nothink {
            ThinkMode::None
        } else if self.think_max {
            let m = ThinkMode::Max.for_context(ctx);
            if m != ThinkMode::Max {
                eprintln!(
                    "ds4: warning: --think-max needs --ctx >= {}; ctx={ctx} uses normal thinking instead",
                    ThinkMode::MAX_MIN_CONTEXT
                );
            }
            m
        } else {
            ThinkMode::High
        }
    }
}

/// Incremental UTF-8 printer for token bytes (never splits a character).
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Append bytes; return the longest complete UTF-8 prefix (invalid bytes become U+FFFD).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or(""));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..good + n);
                        }
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (lossy).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_not_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = ds4_convert::builtin::tiny_path(Some(dir.path())).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let g = Gguf::open(&p).unwrap();
        let fp = fingerprint(&g);
        // Same bytes elsewhere (and in memory): same fingerprint.
        let q = dir.path().join("elsewhere.gguf");
        std::fs::write(&q, &bytes).unwrap();
        assert_eq!(fingerprint(&Gguf::open(&q).unwrap()), fp);
        assert_eq!(fingerprint(&Gguf::from_bytes(bytes.clone()).unwrap()), fp);
        // A metadata byte (inside general.name) changes it.
        let name = b"built-in tiny model";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
        assert!((at as u64) < g.data_offset());
        let mut m = bytes.clone();
        m[at] = b'B';
        assert_ne!(fingerprint(&Gguf::from_bytes(m).unwrap()), fp);
        // A byte of the last tensor's data changes it too.
        let mut d = bytes.clone();
        let last = d.len() - 1;
        d[last] ^= 1;
        assert_ne!(fingerprint(&Gguf::from_bytes(d).unwrap()), fp);
        // The built-in model is ds4's q2 recipe.
        let m = Model::load(Arc::new(g)).unwrap();
        assert_eq!(routed_quant_bits(&m), 2);
    }
}
