//! Lightning-indexer score kernels on Flash shapes (64 heads × 128, ratio 4, top-k 512): the
//! register-blocked scalar f64 kernel (`ds4_indexer_scores4`, the one before the FP64 tensor-core
//! kernels) against `ds4_indexer_mma32` / `ds4_indexer_mma128` and the backend's choice (`Auto`),
//! on the same random inputs, in one process.
//!
//! ```text
//! cargo build --release -p ds4-cuda --features cuda --example indexer_bench
//! indexer_bench [--reps N] [--int8 [--csv PATH]]
//! ```
//!
//! `--int8`: `Mma2x64` against the int8 tensor-core path (`Int8`, every kernel variant) on
//! QAT-form inputs, and `Auto` (which is the int8 path here: the op-test harness reserves its
//! scratch; on random non-QAT inputs it falls back to the FP64 kernel).
//!
//! Cases: a 2048-token chunk at positions 2048 / 6144 / 30720 and one decode token at 8k and 32k
//! context (score stride and row-block bound as the backend sets them for that context). Times
//! are CUDA-event medians of one scores launch (no top-k) after a warm-up; `diff` counts scores
//! that are not bit-identical to the scalar kernel's (the scalar kernel reproduces the CPU
//! reference's summation order; the tensor-core sums differ in order only, so any difference is
//! a ~1e-8 rounding tie), `GMAC/s` counts q·k products of the visible rows.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("indexer_bench needs --features cuda");
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
#[path = "bench_common/mod.rs"]
#[allow(dead_code)]
mod bench_common;

#[cfg(feature = "cuda")]
mod bench {
    use anyhow::{Context, Result};
    use ds4_cuda::optest::{GpuOps, IdxKernel};

    use crate::bench_common::Rng;

    fn vec(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * s)
            .collect()
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let reps = args
            .iter()
            .position(|a| a == "--reps")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>())
            .transpose()
            .context("--reps")?
            .unwrap_or(10);
        // `--case I`: only the I-th case (0-based; e.g. one launch set for a profiler).
        let only = args
            .iter()
            .position(|a| a == "--case")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>())
            .transpose()
            .context("--case")?;
        let info = ds4_cuda::probe(0).context("no CUDA device")?;
        println!("device: {info:?}");
        let g = GpuOps::new(0)?;
        if args.iter().any(|a| a == "--int8") {
            let csv = args
                .iter()
                .position(|a| a == "--csv")
                .and_then(|i| args.get(i + 1))
                .cloned();
            return int8(&g, reps, csv);
        }
        let (nih, ihd, ratio, topk) = (64usize, 128usize, 4usize, 512usize);
        let mut rng = Rng(42);
        let mut table = Vec::new();
        // (label, pos0, tokens, context)
        let cases = [
            ("chunk 2048 @2048", 2048usize, 2048usize, 4096usize),
            ("chunk 2048 @6144", 6144, 2048, 8192),
            ("chunk 2048 @30720", 30720, 2048, 32768),
            ("decode @8k", 8191, 1, 8192),
            ("decode @32k", 32767, 1, 32768),
        ];
        for (ci, (label, pos0, n, ctx)) in cases.into_iter().enumerate() {
            if only.is_some_and(|o| o != ci) {
                continue;
            }
            let nrows = (pos0 + n) / ratio;
            let stride = (ctx / ratio + 1).next_multiple_of(4);
            let blocks = stride.div_ceil(8).clamp(1, 264);
            let q = vec(&mut rng, n * nih * ihd, 1.0);
            let keys = vec(&mut rng, nrows * ihd, 1.0);
            let w = vec(&mut rng, n * nih, 0.02);
            let macs: f64 = (0..n)
                .map(|t| (pos0 + t + 1) / ratio)
                .filter(|&nv| nv > topk)
                .map(|nv| (nv * nih * ihd) as f64)
                .sum();
            let reps = if n == 1 { reps * 10 } else { reps };
            let mut base: Option<(Vec<f32>, f64)> = None;
            for kernel in [
                IdxKernel::Scalar4,
                IdxKernel::Auto,
                IdxKernel::Mma32,
                IdxKernel::Mma128,
                IdxKernel::Mma2x64,
            ] {
                let (s, ms) = g.indexer_scores_timed(
                    kernel, &q, &w, &keys, nih, ihd, ratio, topk, pos0, n, 0, stride, blocks, reps,
                )?;
                let mut diff = 0usize;
                if let Some((b, _)) = &base {
                    for t in 0..n {
                        let nv = (pos0 + t + 1) / ratio;
                        if nv <= topk {
                            continue;
                        }
                        let row = t * stride..t * stride + nv;
                        diff += s[row.clone()]
                            .iter()
                            .zip(&b[row])
                            .filter(|(x, y)| x.to_bits() != y.to_bits())
                            .count();
                    }
                }
                let speed = base.as_ref().map_or(1.0, |(_, b)| b / ms);
                let line = format!(
                    "| {label:<18} | {:<8} | {:>10.1} | {:>6.2}x | {:>8.0} | {diff} |",
                    format!("{kernel:?}"),
                    ms * 1e3,
                    speed,
                    macs / (ms * 1e-3) / 1e9
                );
                println!("{line}");
                table.push(line);
                if base.is_none() {
                    base = Some((s, ms));
                }
            }
        }
        println!();
        println!("| case               | kernel   |    time us | vs old  |   GMAC/s | diff |");
        println!("|--------------------|----------|-----------:|--------:|---------:|-----:|");
        for l in &table {
            println!("{l}");
        }
        Ok(())
    }

    /// `--int8`: `Mma2x64` (FP64 tensor cores) against `Int8` (int8 tensor cores + prep +
    /// gated fallback) and `Auto` on QAT inputs (keys f16-rounded, as the cache holds them),
    /// chunks of 2048 / 8192 tokens at positions 0 / 6144 / 30720, plus the QAT-off fallback.
    fn int8(g: &GpuOps, reps: usize, csv: Option<String>) -> Result<()> {
        use ds4_model::ops;
        let (nih, ihd, ratio, topk) = (64usize, 128usize, 4usize, 512usize);
        let mut rng = Rng(7);
        let nmax = 8192usize;
        let rows_max = (30720 + nmax) / ratio;
        let q_plain = vec(&mut rng, nmax * nih * ihd, 1.0);
        let k_plain = vec(&mut rng, rows_max * ihd, 1.0);
        let w = vec(&mut rng, nmax * nih, 0.02);
        let mut q_qat = q_plain.clone();
        q_qat.chunks_exact_mut(ihd).for_each(ops::indexer_qat);
        let mut k_qat = k_plain.clone();
        k_qat.chunks_exact_mut(ihd).for_each(|k| {
            ops::indexer_qat(k);
            k.iter_mut().for_each(|v| *v = ds4_quant::fp::f16_round(*v));
        });
        let mut table = Vec::new();
        let mut rows_csv =
            vec!["case,qat,kernel,time_us,vs_mma2x64,gmac_s,diff,fell_back".to_string()];
        for (n, pos0, qat) in [
            (2048usize, 0usize, true),
            (2048, 6144, true),
            (2048, 30720, true),
            (8192, 0, true),
            (8192, 6144, true),
            (8192, 30720, true),
            (2048, 6144, false),
        ] {
            let label = format!("chunk {n} @{pos0}");
            let nrows = (pos0 + n) / ratio;
            let ctx = (pos0 + n).next_multiple_of(4096);
            let stride = (ctx / ratio + 1).next_multiple_of(4);
            let blocks = stride.div_ceil(8).clamp(1, 264);
            let (q, k) = if qat {
                (&q_qat, &k_qat)
            } else {
                (&q_plain, &k_plain)
            };
            let (q, k, w) = (&q[..n * nih * ihd], &k[..nrows * ihd], &w[..n * nih]);
            let macs: f64 = (0..n)
                .map(|t| (pos0 + t + 1) / ratio)
                .filter(|&nv| nv > topk)
                .map(|nv| (nv * nih * ihd) as f64)
                .sum();
            let mut base: Option<(Vec<f32>, f64)> = None;
            for (kernel, var) in [
                (IdxKernel::Mma2x64, 0usize),
                (IdxKernel::Int8, 0),
                (IdxKernel::Int8, 1),
                (IdxKernel::Int8, 2),
                (IdxKernel::Int8, 3),
                (IdxKernel::Auto, 2),
            ] {
                g.set_idx8_variant(var);
                let (s, ms) = g.indexer_scores_timed(
                    kernel, q, w, k, nih, ihd, ratio, topk, pos0, n, 0, stride, blocks, reps,
                )?;
                let kname = match (kernel, var) {
                    (IdxKernel::Int8, 1) => "Int8b3".to_string(),
                    (IdxKernel::Int8, 2) => "Int8bl".to_string(),
                    (IdxKernel::Int8, 3) => "Int8b3bl".to_string(),
                    _ => format!("{kernel:?}"),
                };
                let fell = kernel != IdxKernel::Mma2x64 && g.idx8_fell_back()?;
                let mut diff = 0usize;
                if let Some((b, _)) = &base {
                    for t in 0..n {
                        let nv = (pos0 + t + 1) / ratio;
                        if nv <= topk {
                            continue;
                        }
                        let row = t * stride..t * stride + nv;
                        diff += s[row.clone()]
                            .iter()
                            .zip(&b[row])
                            .filter(|(x, y)| x.to_bits() != y.to_bits())
                            .count();
                    }
                }
                let speed = base.as_ref().map_or(1.0, |(_, b)| b / ms);
                let gmac = if ms > 0.0 {
                    macs / (ms * 1e-3) / 1e9
                } else {
                    0.0
                };
                let line = format!(
                    "| {label:<17} | {:<5} | {:<8} | {:>9.1} | {:>6.2}x | {:>8.0} | {diff} | {fell} |",
                    qat,
                    kname,
                    ms * 1e3,
                    speed,
                    gmac
                );
                println!("{line}");
                table.push(line);
                rows_csv.push(format!(
                    "{label},{qat},{kname},{:.1},{speed:.3},{gmac:.0},{diff},{fell}",
                    ms * 1e3
                ));
                if base.is_none() {
                    base = Some((s, ms));
                }
            }
        }
        // Query prep (RoPE + Hadamard/FP4): block per head vs warp per head.
        let inv_freq: Vec<f64> = (0..32)
            .map(|k| 160000f64.powf(-(k as f64) / 32.0))
            .collect();
        let ws = 1.0 / ((ihd * nih) as f64).sqrt();
        for n in [2048usize, 8192] {
            let (q, w) = (&q_plain[..n * nih * ihd], &w[..n * nih]);
            let run = |warp| {
                g.indexer_q_timed(
                    Some(warp),
                    q,
                    w,
                    nih,
                    ihd,
                    64,
                    &inv_freq,
                    6144,
                    true,
                    ws,
                    n,
                    reps,
                )
            };
            let (oq, ow, t_old) = run(false)?;
            let (nq, nw, t_new) = run(true)?;
            let diff = oq
                .iter()
                .zip(&nq)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count()
                + ow.iter()
                    .zip(&nw)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
            for (kernel, ms) in [("q_block", t_old), ("q_warp", t_new)] {
                let line = format!(
                    "| indexer_q {n:<7} | true  | {kernel:<8} | {:>9.1} | {:>6.2}x |        - | {diff} | - |",
                    ms * 1e3,
                    t_old / ms
                );
                println!("{line}");
                table.push(line);
                rows_csv.push(format!(
                    "indexer_q {n},true,{kernel},{:.1},{:.3},,{diff},",
                    ms * 1e3,
                    t_old / ms
                ));
            }
        }
        println!();
        println!(
            "| case              | qat   | kernel   |   time us | vs f64  |   GMAC/s | diff | fell back |"
        );
        println!(
            "|-------------------|-------|----------|----------:|--------:|---------:|-----:|-----------|"
        );
        for l in &table {
            println!("{l}");
        }
        if let Some(path) = csv {
            std::fs::write(&path, rows_csv.join("\n") + "\n").context("--csv")?;
        }
        Ok(())
    }
}
