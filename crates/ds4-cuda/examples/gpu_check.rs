//! CUDA vs CPU on the tiny fixture models (run by `scripts/gpu-check.sh` on the GPU host).
//!
//! ```text
//! gpu_check convert FIXTURES OUT      # tiny f32, flashdims f32/q8_0/q2/q4 GGUFs into OUT
//! gpu_check run OUT PROMPTS           # every model × QAT on/off: checks, then a table
//! gpu_check flash LAYERS DIR          # synthetic Flash-shaped q2 model: CPU vs CUDA + speed
//! ```
//!
//! Per model and QAT mode (CPU reference = `ds4_model::CpuBackend`, same binary):
//! * prefill: every prompt, CUDA in chunks of 61 tokens with all logits, vs the CPU in one
//!   chunk; then 16 greedy decode steps (tokens = the CPU's argmax) on both (CUDA decode steps
//!   replay a CUDA graph);
//! * decode-only: the longest prompt fed token by token to CUDA (every step a graph replay);
//! * snapshot: CPU prefill of part of the prompt → session snapshot → restored on CUDA →
//!   rest of the prompt + 16 decode steps, and the same from CUDA to CPU.
//!
//! CUDA runs its exact path (`quality`: the tensor-core prefill routes are off; they are gated by
//! `scripts/drift-gate.sh`). Both backends follow one numerics contract (f64 reductions ahead of
//! every f32 rounding), so the logits are expected to be bit-identical; the printed rms shows it.
//!
//! Directional steering: the same checks on three of the models with two steering slots of
//! random unit directions (FFN and attention edits, positive and negative scales) given to both
//! backends (rows `MODEL+steer`); the steered CPU logits must differ from the unsteered ones.
//!
//! Pass: same top-1 at every compared position and step; logits rms (over the vocabulary) ≤
//! 1e-3 at every position on f32 weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ds4_convert::{ConvertOptions, Recipe, convert_checkpoint};
use ds4_cuda::{CudaBackend, CudaOptions};
use ds4_gguf::Gguf;
use ds4_model::{
    Engine, EngineOptions, Model, Session, SessionOptions, Steering, SteeringSlot, argmax,
};

const DECODE_STEPS: usize = 16;
const CUDA_CHUNK: usize = 61;

/// Models also checked with directional steering on both backends.
const STEER_MODELS: [&str; 3] = ["tiny-f32", "flashdims-f32", "flashdims-q2"];

/// Two steering slots for `m`: random unit directions per layer; slot 0 edits the FFN output
/// (scale 1.5) and the attention output (0.5), slot 1 amplifies (-1 / -0.75).
fn test_steering(m: &Model) -> Result<Arc<Steering>> {
    let s = &m.shape;
    let mut slots = Vec::new();
    for (i, (ffn, attn)) in [(1.5f32, 0.5f32), (-1.0, -0.75)].into_iter().enumerate() {
        let dirs = ds4_model::steer::random_unit_directions(s, 0x5eed_0001 + i as u64);
        slots.push(SteeringSlot {
            source: format!("test slot {i}"),
            dirs,
            ffn,
            attn,
        });
    }
    Ok(Arc::new(
        Steering::new(s, slots)?.context("test steering is inactive")?,
    ))
}

const MODELS: [(&str, &str, Recipe); 6] = [
    ("tiny-f32", "tiny", Recipe::F32),
    ("flashdims-f32", "flashdims", Recipe::F32),
    ("flashdims-f16", "flashdims", Recipe::F16),
    ("flashdims-q8_0", "flashdims", Recipe::Q8_0),
    ("flashdims-q2", "flashdims", Recipe::Q2),
    ("flashdims-q4", "flashdims", Recipe::Q4),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("convert") if args.len() == 4 => convert(Path::new(&args[2]), Path::new(&args[3])),
        Some("run") if args.len() == 4 => run(Path::new(&args[2]), Path::new(&args[3])),
        Some("flash") if args.len() == 4 => flash(args[2].parse()?, Path::new(&args[3])),
        Some("rows") if args.len() == 4 => rows(Path::new(&args[2]), Path::new(&args[3])),
        Some("weights") if args.len() >= 3 => {
            let mut ok = true;
            for p in &args[2..] {
                ok &= weights(Path::new(p))?;
            }
            if !ok {
                bail!("weights: FAIL");
            }
            println!("weights: PASS");
            Ok(())
        }
        _ => bail!(
            "usage: gpu_check convert FIXTURES OUT | run OUT PROMPTS | flash LAYERS DIR | weights GGUF..."
        ),
    }
}

fn convert(fixtures: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    for (name, set, recipe) in MODELS {
        let t0 = Instant::now();
        let dst = out.join(format!("{name}.gguf"));
        convert_checkpoint(
            &fixtures.join(set).join("official"),
            &dst,
            &ConvertOptions::new(recipe),
            &mut |_| {},
        )
        .with_context(|| format!("convert {name}"))?;
        println!("converted {name} in {:.1}s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Prompts: `set<TAB>name<TAB>comma-separated ids` per line.
fn prompts(path: &Path) -> Result<Vec<(String, String, Vec<u32>)>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split('\t');
        let (Some(set), Some(name), Some(ids)) = (it.next(), it.next(), it.next()) else {
            bail!("bad prompt line {line:?}");
        };
        let ids = ids
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()?;
        out.push((set.to_string(), name.to_string(), ids));
    }
    Ok(out)
}

/// Running comparison of logits rows.
#[derive(Default, Clone, Debug)]
struct Cmp {
    rows: usize,
    top1_bad: usize,
    max_rms: f64,
    max_abs: f64,
    first_bad: Option<String>,
}

impl Cmp {
    fn add(&mut self, what: &str, cpu: &[f32], gpu: &[f32], v: usize) {
        assert_eq!(cpu.len(), gpu.len(), "{what}: logits lengths differ");
        for (r, (c, g)) in cpu.chunks(v).zip(gpu.chunks(v)).enumerate() {
            self.rows += 1;
            let mut ss = 0f64;
            for (&a, &b) in c.iter().zip(g) {
                let d = a as f64 - b as f64;
                ss += d * d;
                self.max_abs = self.max_abs.max(d.abs());
            }
            let rms = (ss / v as f64).sqrt();
            if !rms.is_finite() {
                self.max_rms = f64::INFINITY;
            }
            self.max_rms = self.max_rms.max(rms);
            let (tc, tg) = (argmax(c), argmax(g));
            if tc != tg {
                self.top1_bad += 1;
                if self.first_bad.is_none() {
                    let mut sorted: Vec<f32> = c.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    self.first_bad = Some(format!(
                        "{what} row {r}: cpu top1 {tc} gpu top1 {tg} (cpu margin {:.2e}, rms {rms:.2e})",
                        sorted[0] - sorted[1]
                    ));
                }
            }
        }
    }
    fn merge(&mut self, o: &Cmp) {
        self.rows += o.rows;
        self.top1_bad += o.top1_bad;
        self.max_rms = self.max_rms.max(o.max_rms);
        self.max_abs = self.max_abs.max(o.max_abs);
        if self.first_bad.is_none() {
            self.first_bad.clone_from(&o.first_bad);
        }
    }
    fn ok(&self, rms_limit: Option<f64>) -> bool {
        self.top1_bad == 0
            && rms_limit.is_none_or(|l| self.max_rms <= l)
            && self.max_rms.is_finite()
    }
    fn cell(&self) -> String {
        format!(
            "{}/{} rms {:.1e}",
            self.rows - self.top1_bad,
            self.rows,
            self.max_rms
        )
    }
}

fn cpu_session(m: &Arc<Model>, qat: bool, ctx: usize) -> Result<Session> {
    cpu_session_st(m, qat, ctx, None)
}

fn cpu_session_st(
    m: &Arc<Model>,
    qat: bool,
    ctx: usize,
    steering: Option<Arc<Steering>>,
) -> Result<Session> {
    let eng = Engine::from_model(
        m.clone(),
        EngineOptions {
            qat,
            threads: None,
            steering,
            ..Default::default()
        },
    )?;
    Ok(eng.new_session(SessionOptions {
        ctx,
        prefill_chunk: 2048,
    })?)
}

fn cuda_session(m: &Arc<Model>, qat: bool, ctx: usize, chunk: usize) -> Result<Session> {
    cuda_session_st(m, qat, ctx, chunk, None)
}

fn cuda_session_st(
    m: &Arc<Model>,
    qat: bool,
    ctx: usize,
    chunk: usize,
    steering: Option<Arc<Steering>>,
) -> Result<Session> {
    let b = CudaBackend::new(
        m.clone(),
        ctx,
        CudaOptions {
            qat,
            max_chunk: 256,
            // The exact path (decode-style kernels for prefill too): this is the check that CUDA
            // computes the model as the CPU does. The tensor-core prefill routes are reduced-
            // precision by design and are held to `scripts/drift-gate.sh`'s envelopes instead.
            quality: true,
            steering,
            ..Default::default()
        },
    )?;
    Ok(Session::with_backend(
        Box::new(b),
        SessionOptions {
            ctx,
            prefill_chunk: chunk,
        },
    )?)
}

/// Greedy decode steps on both sessions, tokens chosen by the CPU.
fn decode_both(
    cpu: &mut Session,
    gpu: &mut Session,
    steps: usize,
    cmp: &mut Cmp,
    v: usize,
) -> Result<()> {
    for step in 0..steps {
        let tok = argmax(cpu.logits());
        let c = cpu.decode(tok)?.to_vec();
        gpu.advance(tok)?;
        // The greedy pick (on the device in a graph step) before the logits are read (copied
        // then), checked against the host's scan of those logits.
        let best = gpu.greedy(None);
        let second = gpu.greedy(Some(best));
        let g = gpu.logits().to_vec();
        let want = (
            argmax(&g),
            ds4_model::sampler::argmax_excluding(&g, Some(best)),
        );
        if (best, second) != want {
            bail!("decode step {step}: greedy pick {best}/{second}, the logits say {want:?}");
        }
        cmp.add(&format!("decode step {step}"), &c, &g, v);
    }
    Ok(())
}

struct Row {
    model: String,
    qat: bool,
    prefill: Cmp,
    decode_only: Cmp,
    snap_to_cuda: Cmp,
    snap_to_cpu: Cmp,
    diag: String,
    secs: f64,
}

fn trace_diag(
    m: &Arc<Model>,
    qat: bool,
    ids: &[u32],
    st: &Option<Arc<Steering>>,
) -> Result<String> {
    let ctx = ids.len() + 8;
    let mut c = cpu_session_st(m, qat, ctx, st.clone())?;
    let mut g = cuda_session_st(m, qat, ctx, CUDA_CHUNK, st.clone())?;
    c.set_trace(true);
    g.set_trace(true);
    c.prefill(ids)?;
    g.prefill(ids)?;
    let (tc, tg) = (c.trace().unwrap().clone(), g.trace().unwrap().clone());
    let mut parts = Vec::new();
    for il in 0..m.shape.n_layer {
        let k = m.shape.n_expert_used;
        let ex = tc.experts[il]
            .chunks(k)
            .zip(tg.experts[il].chunks(k))
            .filter(|(a, b)| a != b)
            .count();
        let topk = m.shape.index_topk;
        let ix = tc.indexer[il]
            .chunks(topk)
            .zip(tg.indexer[il].chunks(topk))
            .filter(|(a, b)| a != b)
            .count();
        let hid = tc.last_hidden[il]
            .iter()
            .zip(&tg.last_hidden[il])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let lens_ok = tc.experts[il].len() == tg.experts[il].len()
            && tc.indexer[il].len() == tg.indexer[il].len();
        parts.push(format!(
            "L{il}:ex{ex}{}{} h{hid:.1e}",
            if tc.indexer[il].is_empty() {
                String::new()
            } else {
                format!(",ix{ix}")
            },
            if lens_ok { "" } else { ",LEN!" }
        ));
    }
    Ok(parts.join(" "))
}

fn check_model(
    m: &Arc<Model>,
    name: &str,
    qat: bool,
    ps: &[&Vec<u32>],
    st: &Option<Arc<Steering>>,
) -> Result<Row> {
    let cpu_session = |m: &Arc<Model>, qat, ctx| cpu_session_st(m, qat, ctx, st.clone());
    let cuda_session =
        |m: &Arc<Model>, qat, ctx, chunk| cuda_session_st(m, qat, ctx, chunk, st.clone());
    let t0 = Instant::now();
    let v = m.shape.n_vocab;
    let mut prefill = Cmp::default();
    let mut decode_only = Cmp::default();
    let mut snap_to_cuda = Cmp::default();
    let mut snap_to_cpu = Cmp::default();
    let longest = ps.iter().max_by_key(|p| p.len()).context("no prompts")?;
    for ids in ps {
        let n = ids.len();
        let ctx = n + DECODE_STEPS + 8;
        let mut c = cpu_session(m, qat, ctx)?;
        let mut g = cuda_session(m, qat, ctx, CUDA_CHUNK)?;
        let lc = c.prefill_all_logits(ids)?;
        let lg = g.prefill_all_logits(ids)?;
        if st.is_some() {
            // The steering must move the logits, or the comparison checks nothing new.
            let plain = cpu_session_st(m, qat, ctx, None)?.prefill_all_logits(ids)?;
            if plain == lc {
                bail!("steering left the CPU logits unchanged");
            }
        }
        let mut cmp = Cmp::default();
        cmp.add("prefill", &lc, &lg, v);
        decode_both(&mut c, &mut g, DECODE_STEPS, &mut cmp, v)?;
        prefill.merge(&cmp);

        if std::ptr::eq(*ids, *longest) {
            // Decode-only: the prompt token by token on CUDA (graph replays).
            let mut g1 = cuda_session(m, qat, ctx, 1)?;
            let mut rows = Vec::with_capacity(n * v);
            for &t in ids.iter() {
                rows.extend_from_slice(g1.decode(t)?);
            }
            decode_only.add("decode-only", &lc, &rows, v);

            // Snapshots across backends, split at an odd point.
            let h = (n / 2 + 3).min(n - 1);
            let mut cref = cpu_session(m, qat, ctx)?;
            cref.prefill_all_logits(ids)?;
            let mut ref_dec = Vec::new();
            for _ in 0..DECODE_STEPS {
                let tok = argmax(cref.logits());
                ref_dec.push((tok, cref.decode(tok)?.to_vec()));
            }
            // CPU → CUDA.
            let mut c2 = cpu_session(m, qat, ctx)?;
            c2.prefill(&ids[..h])?;
            let snap = c2.snapshot()?;
            let mut g2 = cuda_session(m, qat, ctx, CUDA_CHUNK)?;
            g2.restore(&snap)?;
            let rest = g2.prefill_all_logits(&ids[h..])?;
            snap_to_cuda.add("snapshot cpu->cuda prefill", &lc[h * v..], &rest, v);
            for (tok, want) in &ref_dec {
                let got = g2.decode(*tok)?.to_vec();
                snap_to_cuda.add("snapshot cpu->cuda decode", want, &got, v);
            }
            // CUDA → CPU.
            let mut g3 = cuda_session(m, qat, ctx, CUDA_CHUNK)?;
            g3.prefill(&ids[..h])?;
            let snap = g3.snapshot()?;
            let mut c3 = cpu_session(m, qat, ctx)?;
            c3.restore(&snap)?;
            let rest = c3.prefill_all_logits(&ids[h..])?;
            snap_to_cpu.add("snapshot cuda->cpu prefill", &lc[h * v..], &rest, v);
            for (tok, want) in &ref_dec {
                let got = c3.decode(*tok)?.to_vec();
                snap_to_cpu.add("snapshot cuda->cpu decode", want, &got, v);
            }
        }
    }
    let diag = trace_diag(m, qat, longest, st)?;
    Ok(Row {
        model: name.to_string(),
        qat,
        prefill,
        decode_only,
        snap_to_cuda,
        snap_to_cpu,
        diag,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn run(dir: &Path, prompts_path: &Path) -> Result<()> {
    let info = ds4_cuda::probe(0)?;
    println!(
        "device: {} (sm_{}{}), {:.1} GiB",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.total_memory as f64 / (1u64 << 30) as f64
    );
    let ps = prompts(prompts_path)?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (name, set, recipe) in MODELS {
        let path: PathBuf = dir.join(format!("{name}.gguf"));
        let m = match Gguf::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|g| Ok(Model::load(Arc::new(g))?))
        {
            Ok(m) => Arc::new(m),
            Err(e) => {
                errors.push(format!("{name}: cannot load {}: {e}", path.display()));
                continue;
            }
        };
        let mine: Vec<&Vec<u32>> = ps.iter().filter(|p| p.0 == set).map(|p| &p.2).collect();
        let mut runs: Vec<(String, bool, Option<Arc<Steering>>)> = vec![
            (name.to_string(), true, None),
            (name.to_string(), false, None),
        ];
        if STEER_MODELS.contains(&name) {
            runs.push((format!("{name}+steer"), true, Some(test_steering(&m)?)));
        }
        for (name, qat, st) in runs {
            let name = name.as_str();
            match check_model(&m, name, qat, &mine, &st) {
                Ok(r) => {
                    println!(
                        "{name} qat={qat}: prefill {} | decode-only {} | snap cpu->cuda {} | snap cuda->cpu {} | {:.1}s",
                        r.prefill.cell(),
                        r.decode_only.cell(),
                        r.snap_to_cuda.cell(),
                        r.snap_to_cpu.cell(),
                        r.secs
                    );
                    println!("  trace: {}", r.diag);
                    for c in [&r.prefill, &r.decode_only, &r.snap_to_cuda, &r.snap_to_cpu] {
                        if let Some(b) = &c.first_bad {
                            println!("  first mismatch: {b}");
                        }
                    }
                    let _ = recipe;
                    rows.push(r);
                }
                Err(e) => errors.push(format!("{name} qat={qat}: {e:#}")),
            }
        }
    }
    println!();
    println!(
        "{:<16} {:<4} {:<26} {:<26} {:<26} {:<26} result",
        "model",
        "qat",
        "prefill+decode (top1 ok)",
        "decode-only (graph)",
        "snapshot cpu->cuda",
        "snapshot cuda->cpu",
    );
    let mut all_ok = errors.is_empty();
    for r in &rows {
        let lim = (r.model.contains("-f32") || r.model.contains("-f16")).then_some(1e-3);
        let ok = r.prefill.ok(lim)
            && r.decode_only.ok(lim)
            && r.snap_to_cuda.ok(lim)
            && r.snap_to_cpu.ok(lim);
        all_ok &= ok;
        println!(
            "{:<16} {:<4} {:<26} {:<26} {:<26} {:<26} {}",
            r.model,
            if r.qat { "on" } else { "off" },
            r.prefill.cell(),
            r.decode_only.cell(),
            r.snap_to_cuda.cell(),
            r.snap_to_cpu.cell(),
            if ok { "PASS" } else { "FAIL" }
        );
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    println!("gpu-check: {}", if all_ok { "PASS" } else { "FAIL" });
    if !all_ok {
        std::process::exit(1);
    }
    Ok(())
}

/// A synthetic Flash-shaped q2 model with `layers` layers: CPU vs CUDA on a short prompt,
/// then CUDA decode speed.
fn flash(layers: usize, dir: &Path) -> Result<()> {
    let path = dir.join(format!("flash-{layers}l-q2.gguf"));
    let t0 = Instant::now();
    if !path.exists() {
        let opts = ds4_convert::SynthOptions {
            shape: ds4_model::Shape::flash_layers(layers),
            recipe: Recipe::Q2,
            seed: 7,
            ..Default::default()
        };
        ds4_convert::synth_gguf(&path, &opts, &mut |_| {})?;
    }
    println!(
        "flash synth {layers} layers: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let m = Arc::new(Model::load(Arc::new(Gguf::open(&path)?))?);
    let v = m.shape.n_vocab;
    let t1 = Instant::now();
    let ctx = 4608;
    let b = CudaBackend::new(
        m.clone(),
        ctx,
        CudaOptions {
            max_chunk: 512,
            ..Default::default()
        },
    )?;
    let wbytes = b.decode_read_bytes();
    println!(
        "flash cuda backend up in {:.1}s, {:.2} GB of weights, {:.3} GB read per decode step",
        t1.elapsed().as_secs_f64(),
        b.weight_bytes() as f64 / 1e9,
        wbytes as f64 / 1e9
    );
    let mut g = Session::with_backend(
        Box::new(b),
        SessionOptions {
            ctx,
            prefill_chunk: 512,
        },
    )?;
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % v as u64) as u32
    };
    let prompt: Vec<u32> = (0..96).map(|_| next()).collect();
    let mut c = cpu_session(&m, true, ctx)?;
    let tc = Instant::now();
    let lc = c.prefill_all_logits(&prompt)?;
    let cpu_s = tc.elapsed().as_secs_f64();
    let lg = g.prefill_all_logits(&prompt)?;
    let mut cmp = Cmp::default();
    cmp.add("flash prefill", &lc, &lg, v);
    decode_both(&mut c, &mut g, 4, &mut cmp, v)?;
    println!(
        "flash {layers}L q2 cpu vs cuda: top1 {} rms {:.2e} max|d| {:.2e} (cpu prefill {:.1}s){}",
        cmp.cell(),
        cmp.max_rms,
        cmp.max_abs,
        cpu_s,
        cmp.first_bad
            .map(|b| format!(" first mismatch: {b}"))
            .unwrap_or_default()
    );
    // Speed: decode after the prompt, then after growing the context past the indexer's top-k.
    for target in [256usize, 2304, 4500] {
        while g.len() + 512 < target {
            let fill: Vec<u32> = (0..512).map(|_| next()).collect();
            g.prefill(&fill)?;
        }
        let tp = Instant::now();
        let fill: Vec<u32> = (0..(target - g.len()).min(512)).map(|_| next()).collect();
        let nf = fill.len();
        g.prefill(&fill)?;
        let pf = tp.elapsed().as_secs_f64();
        let steps = 32;
        let td = Instant::now();
        for _ in 0..steps {
            let tok = g.greedy(None);
            g.advance(tok)?;
        }
        let dt = td.elapsed().as_secs_f64() / steps as f64;
        let finite = g.logits().iter().all(|x| x.is_finite());
        println!(
            "flash {layers}L q2 ctx {:>5}: prefill {nf} tok {:.0} tok/s, decode {:.2} ms/tok = {:.1} tok/s ({:.0} GB/s of weight reads), logits finite: {finite}",
            g.len(),
            nf as f64 / pf,
            dt * 1e3,
            1.0 / dt,
            wbytes as f64 / dt / 1e9
        );
    }
    Ok(())
}

/// Every dense matrix of a model uploaded through `Gemv` and multiplied on the GPU, against
/// `ds4_quant::QMatrix` on the CPU, with random inputs (n = 1 and 5 tokens). Normalized error
/// `|gpu - cpu| / (1 + |cpu|)` ≤ 1e-4 (float types) / 1e-5 (quantized: same integer dots,
/// f32 block-sum order differs).
#[cfg(not(feature = "cuda"))]
fn weights(_path: &Path) -> Result<bool> {
    bail!("gpu_check weights needs --features cuda")
}

#[cfg(feature = "cuda")]
fn weights(path: &Path) -> Result<bool> {
    use cudarc::driver::CudaContext;
    use ds4_cuda::gemv::Gemv;
    use ds4_gguf::GgmlType;
    use ds4_model::weights::MatRef;
    let m = Model::load(Arc::new(Gguf::open(path)?))?;
    let s = &m.shape;
    let ctx = CudaContext::new(0)?;
    let st = ctx.default_stream();
    let g = Gemv::new(&ctx)?;
    let w = &m.weights;
    let mut mats: Vec<(String, &MatRef, usize)> = vec![
        ("output".into(), &w.output, 1),
        ("out_hc_fn".into(), &w.out_hc_fn, 1),
    ];
    for (il, l) in w.layers.iter().enumerate() {
        let mut add =
            |n: &str, r: &'static str, mr, nm| mats.push((format!("L{il}.{n}{r}"), mr, nm));
        add("hc_attn", "", &l.hc_attn.fn_, 1);
        add("q_a", "", &l.q_a, 1);
        add("q_b", "", &l.q_b, 1);
        add("kv", "", &l.kv, 1);
        add("out_a", "(grouped)", &l.out_a, s.o_groups);
        add("out_b", "", &l.out_b, 1);
        add("hc_ffn", "", &l.hc_ffn.fn_, 1);
        add("router", "", &l.router, 1);
        add("gate_sh", "", &l.gate_shexp, 1);
        add("up_sh", "", &l.up_shexp, 1);
        add("down_sh", "", &l.down_shexp, 1);
        if let Some(c) = &l.compressor {
            add("comp.kv", "", &c.kv, 1);
            add("comp.gate", "", &c.gate, 1);
        }
        if let Some(ix) = &l.indexer {
            add("idx.q_b", "", &ix.q_b, 1);
            add("idx.proj", "", &ix.proj, 1);
            add("idx.comp.kv", "", &ix.comp.kv, 1);
            add("idx.comp.gate", "", &ix.comp.gate, 1);
        }
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut normal = move || {
        let mut u = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    };
    let mut ok = true;
    let mut worst_all = 0f32;
    for (name, mr, nm) in &mats {
        let ty = mr.t.ty;
        let rows = mr.rows / nm;
        let cols = mr.cols;
        let bytes = mr.bytes(&m.gguf);
        let dw = g.upload(&st, ty, cols, rows, *nm, bytes)?;
        let q = ds4_quant::QMatrix::new(ty, cols, mr.rows, bytes)?;
        let tol = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1e-4,
            _ => 1e-5,
        };
        for n in [1usize, 5] {
            let cx = cols * nm;
            let x: Vec<f32> = (0..n * cx).map(|_| normal()).collect();
            let dx = st.clone_htod(&x)?;
            let mut act = st.alloc_zeros::<u8>(Gemv::act_bytes(ty, cx, n).max(16))?;
            let mut dy = st.clone_htod(&vec![f32::NAN; n * mr.rows])?;
            g.quantize_act(&st, ty, &dx, n, cx, &mut act)?;
            g.matvec(&st, &dw, &dx, &act, n, &mut dy)?;
            let y = st.clone_dtoh(&dy)?;
            let mut want = vec![0f32; n * mr.rows];
            for t in 0..n {
                for k in 0..*nm {
                    let sub = q.sub_rows(k * rows, rows)?;
                    let o = t * mr.rows + k * rows;
                    sub.matvec(
                        &x[t * cx + k * cols..t * cx + (k + 1) * cols],
                        &mut want[o..o + rows],
                    )?;
                }
            }
            let mut worst = 0f32;
            let mut at = 0;
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                let e = if a.is_finite() {
                    (a - b).abs() / (1.0 + b.abs())
                } else {
                    f32::INFINITY
                };
                if e > worst {
                    worst = e;
                    at = i;
                }
            }
            worst_all = worst_all.max(worst);
            if worst > tol {
                ok = false;
                println!(
                    "{}: {name} {ty:?} {cols}x{rows}x{nm} n={n}: error {worst:.2e} at {at} (gpu {} cpu {})",
                    path.display(),
                    y[at],
                    want[at]
                );
            }
        }
    }
    println!(
        "{}: {} matrices, worst normalized error {worst_all:.2e}: {}",
        path.display(),
        mats.len(),
        if ok { "ok" } else { "MISMATCH" }
    );
    Ok(ok)
}

/// Position × layer error map: the first prompt of the model's set fed token by token to
/// both backends with tracing; per position the logits rms and the per-layer max |Δhidden|.
fn rows(path: &Path, prompts_path: &Path) -> Result<()> {
    let m = Arc::new(Model::load(Arc::new(Gguf::open(path)?))?);
    let set = if path.to_string_lossy().contains("tiny") {
        "tiny"
    } else {
        "flashdims"
    };
    let ps = prompts(prompts_path)?;
    let ids = &ps.iter().find(|p| p.0 == set).context("no prompt")?.2;
    let v = m.shape.n_vocab;
    for qat in [false, true] {
        let ctx = ids.len() + 8;
        let mut c = cpu_session(&m, qat, ctx)?;
        let mut g = cuda_session(&m, qat, ctx, 1)?;
        c.set_trace(true);
        g.set_trace(true);
        println!("{} qat={qat}", path.display());
        for (p, &t) in ids.iter().enumerate().take(12) {
            let lc = c.prefill_all_logits(&[t])?;
            let lg = g.prefill_all_logits(&[t])?;
            let rms = (lc
                .iter()
                .zip(&lg)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / v as f64)
                .sqrt();
            let (tc, tg) = (c.trace().context("trace")?, g.trace().context("trace")?);
            let mut line = format!("  pos {p:3} rms {rms:.1e} |");
            for il in 0..m.shape.n_layer {
                let (hc, hg) = (&tc.last_hidden[il], &tg.last_hidden[il]);
                let d = hc
                    .iter()
                    .zip(hg)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let mag = hc.iter().map(|a| a.abs()).fold(0f32, f32::max);
                let nd = hc
                    .iter()
                    .zip(hg)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                let ex = tc.experts[il] != tg.experts[il];
                line += &format!(
                    " L{il} {nd}≠ {d:.1e}/{mag:.0e}{}",
                    if ex { "!" } else { "" }
                );
            }
            println!("{line}");
            for il in 0..m.shape.n_layer.min(2) {
                let mut pl = format!("           L{il} probes:");
                for ((name, pc), (_, pg)) in tc.probes[il].iter().zip(&tg.probes[il]) {
                    let nd = pc
                        .iter()
                        .zip(pg)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    pl += &format!(" {name} {nd}/{}", pc.len());
                }
                println!("{pl}");
            }
        }
    }
    Ok(())
}
