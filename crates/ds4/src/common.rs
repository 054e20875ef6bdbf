//! What several subcommands share: model resolution (with the built-in fallback), backend
//! choice, directional steering, tokenizer loading, sampling options.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ds4_gguf::Gguf;
use ds4_model::session::DEFAULT_PREFILL_CHUNK;
use ds4_model::{
    Backend, Engine, EngineOptions, Model, Session, SessionOptions, Shape, Steering, SteeringSlot,
};
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
    #[command(flatten)]
    pub steering: SteeringArgs,
}

/// One `--dir-steering-file` slot with its scales resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct SteeringSpec {
    pub file: PathBuf,
    pub ffn: f32,
    pub attn: f32,
}

/// Directional steering flags (ds4's `--dir-steering-file/-ffn/-attn`, `ds4_model::steer`).
/// `--dir-steering-file` is repeatable: each occurrence opens a slot and the scale flags that
/// follow it bind to it (scale flags given before the first file bind to the first slot; the
/// last value given for a slot wins). A slot without any scale flag gets ffn 1, attn 0; with
/// one, the other is 0. At most [`ds4_model::steer::MAX_SLOTS`] slots, applied in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SteeringArgs {
    /// The slots, in command-line order.
    pub slots: Vec<SteeringSpec>,
    /// A scale flag was given but no file (no effect, as in ds4).
    pub orphan_scales: bool,
}

const ST_FILE: &str = "dir_steering_file";
const ST_FFN: &str = "dir_steering_ffn";
const ST_ATTN: &str = "dir_steering_attn";

/// A steering scale: a finite number in [-100, 100] (ds4's range).
fn parse_steering_scale(v: &str) -> Result<f32, String> {
    let lim = ds4_model::steer::MAX_SCALE;
    match v.trim().parse::<f32>() {
        Ok(x) if x.is_finite() && x.abs() <= lim => Ok(x),
        _ => Err(format!("must be a number from -{lim} to {lim}")),
    }
}

impl clap::FromArgMatches for SteeringArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        enum Ev {
            File(PathBuf),
            Ffn(f32),
            Attn(f32),
        }
        let mut evs: Vec<(usize, Ev)> = Vec::new();
        if let (Some(v), Some(ix)) = (m.get_many::<PathBuf>(ST_FILE), m.indices_of(ST_FILE)) {
            evs.extend(ix.zip(v.cloned().map(Ev::File)));
        }
        if let (Some(v), Some(ix)) = (m.get_many::<f32>(ST_FFN), m.indices_of(ST_FFN)) {
            evs.extend(ix.zip(v.copied().map(Ev::Ffn)));
        }
        if let (Some(v), Some(ix)) = (m.get_many::<f32>(ST_ATTN), m.indices_of(ST_ATTN)) {
            evs.extend(ix.zip(v.copied().map(Ev::Attn)));
        }
        evs.sort_by_key(|e| e.0);
        // (file, ffn, attn) as given; `pre`: scales before the first file.
        let mut slots: Vec<(PathBuf, Option<f32>, Option<f32>)> = Vec::new();
        let mut pre: (Option<f32>, Option<f32>) = (None, None);
        for (_, ev) in evs {
            match (ev, slots.last_mut()) {
                (Ev::File(p), _) => {
                    let (f, a) = if slots.is_empty() {
                        (pre.0.take(), pre.1.take())
                    } else {
                        (None, None)
                    };
                    slots.push((p, f, a));
                }
                (Ev::Ffn(v), Some(s)) => s.1 = Some(v),
                (Ev::Attn(v), Some(s)) => s.2 = Some(v),
                (Ev::Ffn(v), None) => pre.0 = Some(v),
                (Ev::Attn(v), None) => pre.1 = Some(v),
            }
        }
        let max = ds4_model::steer::MAX_SLOTS;
        if slots.len() > max {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::TooManyValues,
                format!(
                    "at most {max} --dir-steering-file slots, {} given\n",
                    slots.len()
                ),
            ));
        }
        Ok(SteeringArgs {
            orphan_scales: slots.is_empty() && (pre.0.is_some() || pre.1.is_some()),
            slots: slots
                .into_iter()
                .map(|(file, ffn, attn)| SteeringSpec {
                    file,
                    ffn: ffn.unwrap_or(if attn.is_none() { 1.0 } else { 0.0 }),
                    attn: attn.unwrap_or(0.0),
                })
                .collect(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for SteeringArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        cmd.arg(
            Arg::new(ST_FILE)
                .long("dir-steering-file")
                .value_name("FILE")
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Directional steering: flat little-endian f32 file of n_layer × n_embd \
                     directions (one per layer). Repeatable (at most 8, applied in order at \
                     every layer): each opens a slot, and the --dir-steering-ffn / \
                     --dir-steering-attn after it set that slot's scales (before any file: the \
                     first slot's)",
                ),
        )
        .arg(
            Arg::new(ST_FFN)
                .long("dir-steering-ffn")
                .value_name("F")
                .action(ArgAction::Append)
                .allow_negative_numbers(true)
                .value_parser(parse_steering_scale)
                .help(
                    "Steering scale of the FFN outputs, -100..100: y -= F·d·(d·y) (positive \
                     removes the direction, negative amplifies it). Default 1 for a slot with \
                     no scale flag, else 0",
                ),
        )
        .arg(
            Arg::new(ST_ATTN)
                .long("dir-steering-attn")
                .value_name("F")
                .action(ArgAction::Append)
                .allow_negative_numbers(true)
                .value_parser(parse_steering_scale)
                .help("Steering scale of the attention outputs, -100..100 (default 0)"),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Read the steering files of `a` for `shape` (one line on stderr saying what is applied).
/// `None`: no file, or every scale 0 (the normal path).
pub fn load_steering(a: &SteeringArgs, shape: &Shape) -> Result<Option<Arc<Steering>>> {
    if a.orphan_scales {
        eprintln!(
            "ds4: warning: --dir-steering-ffn / --dir-steering-attn without --dir-steering-file: no steering"
        );
    }
    if a.slots.is_empty() {
        return Ok(None);
    }
    let mut slots = Vec::with_capacity(a.slots.len());
    for s in &a.slots {
        slots.push(SteeringSlot {
            source: s.file.display().to_string(),
            dirs: Steering::read_directions(&s.file, shape)?,
            ffn: s.ffn,
            attn: s.attn,
        });
    }
    let st = Steering::new(shape, slots)?;
    match &st {
        Some(st) => eprintln!("ds4: directional steering: {}", st.describe()),
        None => eprintln!("ds4: directional steering off (every scale is 0)"),
    }
    Ok(st.map(Arc::new))
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
    let model = Arc::new(
        Model::load(gguf.clone()).with_context(|| format!("cannot load {}", path.display()))?,
    );
    // The steering files are checked before the (long) page warm-up.
    let steering = load_steering(&a.steering, &model.shape)?;
    if a.warm_weights {
        warm_weights(&gguf);
    }
    let opts = EngineOptions {
        qat: !a.no_qat,
        threads: a.threads,
        steering,
        ..EngineOptions::default()
    };
    let engine = Engine::from_model(model, opts)
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

/// The first largest finite logit `(id, value)`, if any.
pub fn argmax_finite(logits: &[f32]) -> Option<(usize, f32)> {
    ds4_model::sampler::first_max_where(logits, f32::is_finite, None)
}

/// An f32 as JSON: its shortest round-trip decimal, `null` when not finite (ds4's dumps).
pub fn json_f32(v: f32) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// ds4's logit-dump JSON layout (`--dump-logits`, ds4-bench's frontier files): one header field
/// a line (`fields` are pre-rendered JSON values), then `"logits"` 8 a line, non-finite values
/// `null`.
pub fn logits_json(fields: &[(&str, String)], logits: &[f32]) -> String {
    let mut s = String::with_capacity(64 * fields.len() + logits.len() * 14);
    s.push_str("{\n");
    for (k, v) in fields {
        s.push_str(&format!("  \"{k}\":{v},\n"));
    }
    s.push_str("  \"logits\":[");
    for (i, &v) in logits.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if i % 8 == 0 {
            s.push_str("\n    ");
        }
        s.push_str(&json_f32(v));
    }
    s.push_str("\n  ]\n}\n");
    s
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

/// CUDA backend options from the flags and the engine (its steering); the backend's pass size
/// (`max_chunk`, the tokens one prefill pass evaluates and its scratch is sized for) follows the
/// prefill chunk, so a chunk of P tokens is one pass, as the session schedules it. Without
/// `--prefill-chunk` the backend may shrink the pass to fit its memory (`CudaOptions::fit_chunk`).
pub fn cuda_options(a: &LoadArgs, engine: &Engine, arg: Option<usize>) -> ds4_cuda::CudaOptions {
    ds4_cuda::CudaOptions {
        device: a.device,
        qat: !a.no_qat,
        quality: a.quality,
        max_chunk: prefill_chunk(a, arg).max(1),
        fit_chunk: arg.is_none(),
        steering: engine.steering().cloned(),
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
        &cuda_options(a, engine, prefill_chunk),
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

/// The disk KV cache's model key: [`fingerprint`], with the steering configuration folded in
/// when steering is on (a KV state computed under other steering, or none, is not reused);
/// without steering exactly [`fingerprint`], so existing checkpoints stay valid.
pub fn cache_fingerprint(g: &Gguf, steering: Option<&Arc<Steering>>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let fp = fingerprint(g);
    let Some(st) = steering else {
        return fp;
    };
    let mut h = Sha256::new();
    h.update(b"ds4-rs model fingerprint with steering v1\0");
    h.update(fp);
    h.update(st.canonical_bytes());
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
        // Steering keys the cache apart; none leaves the fingerprint as it was.
        let g = Gguf::open(&p).unwrap();
        assert_eq!(cache_fingerprint(&g, None), fp);
        let s = &m.shape;
        let st = |ffn: f32| {
            let slot = SteeringSlot {
                source: "d".into(),
                dirs: vec![0.25; s.n_layer * s.n_embd],
                ffn,
                attn: 0.0,
            };
            Arc::new(Steering::new(s, vec![slot]).unwrap().unwrap())
        };
        let (a, b) = (
            cache_fingerprint(&g, Some(&st(1.0))),
            cache_fingerprint(&g, Some(&st(2.0))),
        );
        assert!(a != fp && b != fp && a != b);
        assert_eq!(a, cache_fingerprint(&g, Some(&st(1.0))));
    }

    fn steering_of(args: &[&str]) -> Result<SteeringArgs, clap::Error> {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = SteeringArgs::augment_args(clap::Command::new("t").no_binary_name(true));
        SteeringArgs::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }

    fn spec(file: &str, ffn: f32, attn: f32) -> SteeringSpec {
        SteeringSpec {
            file: file.into(),
            ffn,
            attn,
        }
    }

    #[test]
    fn steering_flags_bind_to_the_latest_file() {
        let st = |a: &[&str]| steering_of(a).unwrap();
        assert_eq!(st(&[]), SteeringArgs::default());
        // A file alone: ffn 1.
        assert_eq!(
            st(&["--dir-steering-file", "A"]).slots,
            [spec("A", 1.0, 0.0)]
        );
        // Scales follow their slot; a slot with one scale flag gets 0 for the other.
        let a = st(&[
            "--dir-steering-file",
            "A",
            "--dir-steering-ffn",
            "2",
            "--dir-steering-file",
            "B",
            "--dir-steering-attn",
            "-1",
        ]);
        assert_eq!(a.slots, [spec("A", 2.0, 0.0), spec("B", 0.0, -1.0)]);
        // Scales before the first file bind to it; a third file without flags gets ffn 1; the
        // last value for a slot wins; `=` form.
        let a = st(&[
            "--dir-steering-attn",
            "0.5",
            "--dir-steering-ffn=-3",
            "--dir-steering-file",
            "A",
            "--dir-steering-file",
            "B",
            "--dir-steering-ffn",
            "4",
            "--dir-steering-ffn",
            "5",
            "--dir-steering-file",
            "C",
        ]);
        assert_eq!(
            a.slots,
            [
                spec("A", -3.0, 0.5),
                spec("B", 5.0, 0.0),
                spec("C", 1.0, 0.0)
            ]
        );
        assert!(!a.orphan_scales);
        let a = st(&["--dir-steering-ffn", "1"]);
        assert!(a.slots.is_empty() && a.orphan_scales);
        // Ranges and the slot limit.
        for bad in ["100.5", "-101", "nan", "inf", "x"] {
            let e =
                steering_of(&["--dir-steering-file", "A", "--dir-steering-ffn", bad]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
        assert!(steering_of(&["--dir-steering-attn", "-100", "--dir-steering-ffn", "100"]).is_ok());
        let many: Vec<&str> = (0..9).flat_map(|_| ["--dir-steering-file", "A"]).collect();
        let e = steering_of(&many).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::TooManyValues);
        assert_eq!(st(&many[..16]).slots.len(), 8);
    }
}
