//! What several subcommands share: model resolution (with the built-in fallback), backend
//! choice, tokenizer loading, sampling options.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ds4_gguf::Gguf;
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

/// Model and backend options shared by run, chat, serve and bench.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file (default: ./ds4flash.gguf, else the tiny built-in model).
    #[arg(short = 'm', long = "model", env = "DS4_MODEL")]
    pub model: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    pub backend: BackendChoice,
    /// Context size (tokens) of the session.
    #[arg(short = 'c', long, default_value_t = ds4_model::session::DEFAULT_CTX)]
    pub ctx: usize,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = ds4_model::session::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long, env = "DS4_THREADS")]
    pub threads: Option<usize>,
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

/// Open and validate the model.
pub fn load_model(a: &ModelArgs) -> Result<LoadedModel> {
    let (path, builtin) = resolve_model(a.model.as_deref())?;
    let gguf =
        Arc::new(Gguf::open(&path).with_context(|| format!("cannot open {}", path.display()))?);
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

/// The tokenizer stored in the model file.
pub fn load_tokenizer(gguf: &Gguf, path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_gguf(gguf)
        .with_context(|| format!("{} has no usable tokenizer", path.display()))
}

/// A backend of the chosen kind with room for `ctx` tokens.
pub fn make_backend(
    a: &ModelArgs,
    engine: &Engine,
    model: &Arc<Model>,
    ctx: usize,
) -> Result<Box<dyn Backend>> {
    match a.backend {
        BackendChoice::Cpu => Ok(Box::new(engine.cpu_backend(ctx)?)),
        BackendChoice::Cuda => cuda_backend(a, model, ctx),
    }
}

#[cfg(feature = "cuda")]
fn cuda_backend(a: &ModelArgs, model: &Arc<Model>, ctx: usize) -> Result<Box<dyn Backend>> {
    let opts = ds4_cuda::CudaOptions {
        device: a.device,
        qat: !a.no_qat,
        quality: a.quality,
        ..Default::default()
    };
    let b = ds4_cuda::CudaBackend::new(model.clone(), ctx, opts)?;
    Ok(Box::new(b))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_a: &ModelArgs, _model: &Arc<Model>, _ctx: usize) -> Result<Box<dyn Backend>> {
    bail!(ds4_cuda::CudaError::NotCompiled)
}

/// A session on the chosen backend.
pub fn make_session(a: &ModelArgs, lm: &LoadedModel) -> Result<Session> {
    if a.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    if a.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    let backend = make_backend(a, &lm.engine, lm.engine.model(), a.ctx)?;
    Ok(Session::with_backend(
        backend,
        SessionOptions {
            ctx: a.ctx,
            prefill_chunk: a.prefill_chunk,
        },
    )?)
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
