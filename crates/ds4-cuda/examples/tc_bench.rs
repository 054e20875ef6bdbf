//! Tensor-core prefill routes vs their exact (`--quality`) counterparts on Flash shapes.
//!
//! ```text
//! cargo build --release -p ds4-cuda --features cuda --example tc_bench
//! tc_bench [--csv PATH] [--tokens 512,2048,8192] [--reps N] [--only attn|matmul|dense]
//!          [--skip-exact] [--case SUBSTR]
//! ```
//!
//! `--only dense`: the int8 dense / attn_out rows and the LM head only; `--skip-exact`: the
//! exact path is run once (untimed, for `rel` at the smallest token count), its times are NaN.
//!
//! For every route's Flash shapes (n_embd 4096, q_lora 1024, 64 heads × 512, 8 output groups of
//! 1024, 256 experts of 2048 with 6 used, vocab 129280) and every token count: the route and the
//! exact path (gemv kernels, 8 tokens per weight pass) on the same random weights and inputs,
//! timed with CUDA events (median of `--reps` after a warm-up), with TFLOP/s = 2·MACs / time
//! (MoE: MACs of the selected experts only). At the smallest token count the two outputs are also
//! compared (max |Δ| / (1 + |exact|), printed as `rel`). The LM head runs at 64 rows, as the
//! backend's output head does. Chunk attention (`attn`: hi+lo f16 operands, the default;
//! `attn_f16`: plain f16) runs first, against the exact `ds4_attention` kernel (see
//! `B::attention` for the geometries).

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("tc_bench needs --features cuda");
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
#[path = "bench_common/mod.rs"]
mod bench_common;

#[cfg(feature = "cuda")]
mod bench {
    use std::io::Write as _;
    use std::sync::Arc;

    use anyhow::{Context, Result, bail};
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, sys};
    use ds4_cuda::TcRoutes;
    use ds4_cuda::attn_tc::AttnPrecision;
    use ds4_cuda::gemv::{DevWeight, Gemv};
    use ds4_cuda::optest::{AttnInputs, GpuOps};
    use ds4_cuda::tc::{Tc, TcConfig};
    use ds4_gguf::GgmlType;
    use ds4_model::RopeParams;

    use crate::bench_common::{Rng, random_tensor};

    struct B {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        g: Gemv,
        /// Default routes (dense / attn_out in their int8 form).
        tc: Tc,
        /// dense / attn_out in their opt-in f16 form (`DS4_CUDA_TC_DENSE_F16`).
        tcf: Tc,
        rng: Rng,
        reps: usize,
        /// `--case SUBSTR`: only the matmul / gate-up / MoE cases whose name contains it.
        case: Option<String>,
        skip_exact: bool,
        card: String,
        rows: Vec<String>,
    }

    impl B {
        fn ptr<T>(&self, b: &CudaSlice<T>) -> u64 {
            b.device_ptr(&self.stream).0
        }

        fn upload(
            &mut self,
            ty: GgmlType,
            cols: usize,
            rows: usize,
            n_mat: usize,
        ) -> Result<DevWeight> {
            let bytes = random_tensor(&mut self.rng, ty, cols, rows, n_mat);
            Ok(self.g.upload(&self.stream, ty, cols, rows, n_mat, &bytes)?)
        }

        fn f32_buf(&mut self, n: usize, scale: f32) -> Result<CudaSlice<f32>> {
            let v: Vec<f32> = (0..n)
                .map(|_| ((self.rng.next() % 20001) as f32 - 10000.0) * 1e-4 * scale)
                .collect();
            Ok(self.stream.clone_htod(&v)?)
        }

        /// Median milliseconds of `f` over `reps` runs after one warm-up.
        /// The exact path's time (median of up to 5), or with `--skip-exact` NaN after one
        /// untimed run when `first` (its output is still compared at the first token count).
        fn exact_ms(&self, first: bool, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
            if !self.skip_exact {
                return self.time(self.reps.min(5), f);
            }
            if first {
                f()?;
            }
            Ok(f64::NAN)
        }

        fn time(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
            f()?;
            self.stream.synchronize()?;
            let ev = |s: &B| s.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
            let mut t = Vec::new();
            for _ in 0..reps {
                let (a, b) = (ev(self)?, ev(self)?);
                a.record(&self.stream)?;
                f()?;
                b.record(&self.stream)?;
                b.synchronize()?;
                t.push(a.elapsed_ms(&b)? as f64);
            }
            t.sort_by(|a, b| a.total_cmp(b));
            Ok(t[t.len() / 2])
        }

        fn compare(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<f64> {
            let x = self.stream.clone_dtoh(a)?;
            let y = self.stream.clone_dtoh(b)?;
            let mut worst = 0.0f64;
            for (p, q) in x.iter().zip(&y) {
                if !p.is_finite() || !q.is_finite() {
                    return Ok(f64::INFINITY);
                }
                worst = worst.max(((p - q).abs() / (1.0 + q.abs())) as f64);
            }
            Ok(worst)
        }

        #[allow(clippy::too_many_arguments)]
        fn report(
            &mut self,
            route: &str,
            case: &str,
            n: usize,
            macs: f64,
            tc_ms: f64,
            q_ms: f64,
            rel: Option<f64>,
        ) {
            let tf = |ms: f64| 2.0 * macs / (ms * 1e-3) / 1e12;
            let rel_s = rel.map_or("-".to_string(), |r| format!("{r:.1e}"));
            println!(
                "{route:<9} {case:<22} {n:>6} {:>10.3} {:>8.1} {:>10.3} {:>8.1} {:>7.1}x {rel_s:>8}",
                tc_ms,
                tf(tc_ms),
                q_ms,
                tf(q_ms),
                q_ms / tc_ms
            );
            self.rows.push(format!(
                "{},{route},{case},{n},{macs:.0},{tc_ms:.4},{:.2},{q_ms:.4},{:.2},{:.2},{}",
                self.card,
                tf(tc_ms),
                tf(q_ms),
                q_ms / tc_ms,
                rel.map_or(String::new(), |r| format!("{r:.2e}"))
            ));
        }

        fn wanted(&self, case: &str) -> bool {
            self.case.as_deref().is_none_or(|c| case.contains(c))
        }

        fn tcr(&self, f16: bool) -> &Tc {
            if f16 { &self.tcf } else { &self.tc }
        }

        /// A plain or grouped matmul (Q8_0 or F16); `int8`: the int8 form of dense / attn_out.
        #[allow(clippy::too_many_arguments)]
        fn matmul(
            &mut self,
            route: &str,
            case: &str,
            ty: GgmlType,
            cols: usize,
            rows: usize,
            n_mat: usize,
            ns: &[usize],
            f16: bool,
        ) -> Result<()> {
            if !self.wanted(case) {
                return Ok(());
            }
            let w = self.upload(ty, cols, rows, n_mat)?;
            let cx = cols * n_mat;
            for (i, &n) in ns.iter().enumerate() {
                let x = self.f32_buf(n * cx, 1.0)?;
                let mut act = self
                    .stream
                    .alloc_zeros::<u8>(Gemv::act_bytes(ty, cx, n).max(16))?;
                let mut yq = self.stream.alloc_zeros::<f32>(n * rows * n_mat)?;
                let yt = self.stream.alloc_zeros::<f32>(n * rows * n_mat)?;
                let (xp, ap, yp) = (self.ptr(&x), self.ptr(&act), self.ptr(&yt));
                let reps = self.reps;
                let tc_ms = self.time(reps, || {
                    self.g.quantize_act(&self.stream, ty, &x, n, cx, &mut act)?;
                    // SAFETY: act quantized for w, x [n][cx], y [n][rows·n_mat].
                    unsafe { self.tcr(f16).matmul(&self.stream, &w, xp, ap, n, yp)? };
                    Ok(())
                })?;
                let _ = ap;
                let q_ms = self.exact_ms(i == 0, || {
                    self.g
                        .matvec_x(&self.stream, &w, &x, &mut act, n, &mut yq)?;
                    Ok(())
                })?;
                let rel = if i == 0 {
                    Some(self.compare(&yt, &yq)?)
                } else {
                    None
                };
                let macs = (n * rows * cx) as f64;
                self.report(route, case, n, macs, tc_ms, q_ms, rel);
            }
            Ok(())
        }

        fn shared_gate_up(&mut self, ns: &[usize], f16: bool) -> Result<()> {
            if !self.wanted("shexp gate+up") {
                return Ok(());
            }
            let ty = GgmlType::Q8_0;
            let (cols, rows) = (4096, 2048);
            let gate = self.upload(ty, cols, rows, 1)?;
            let up = self.upload(ty, cols, rows, 1)?;
            for (i, &n) in ns.iter().enumerate() {
                let x = self.f32_buf(n * cols, 1.0)?;
                let mut act = self
                    .stream
                    .alloc_zeros::<u8>(Gemv::act_bytes(ty, cols, n))?;
                self.g
                    .quantize_act(&self.stream, ty, &x, n, cols, &mut act)?;
                let mut mq = self.stream.alloc_zeros::<f32>(n * rows)?;
                let mt = self.stream.alloc_zeros::<f32>(n * rows)?;
                let (ap, mp) = (self.ptr(&act), self.ptr(&mt));
                let reps = self.reps;
                let tc_ms = self.time(reps, || {
                    // SAFETY: act quantized, mid [n][rows].
                    unsafe {
                        self.tcr(f16)
                            .gate_up(&self.stream, &gate, &up, ap, n, 10.0, mp)?
                    };
                    Ok(())
                })?;
                let q_ms = self.exact_ms(i == 0, || {
                    self.g
                        .gate_up_swiglu(&self.stream, &gate, &up, &x, &act, n, 10.0, &mut mq)?;
                    Ok(())
                })?;
                let rel = if i == 0 {
                    Some(self.compare(&mt, &mq)?)
                } else {
                    None
                };
                self.report(
                    if f16 { "dense_f16" } else { "dense" },
                    "shexp gate+up",
                    n,
                    (2 * n * rows * cols) as f64,
                    tc_ms,
                    q_ms,
                    rel,
                );
            }
            Ok(())
        }

        fn moe(&mut self, ns: &[usize]) -> Result<()> {
            if !self.wanted("gate+up iq2_xxs") && !self.wanted("down q2_k + sum6") {
                return Ok(());
            }
            let (e, ff, ne, k) = (4096usize, 2048usize, 256usize, 6usize);
            let gate = self.upload(GgmlType::IQ2_XXS, e, ff, ne)?;
            let up = self.upload(GgmlType::IQ2_XXS, e, ff, ne)?;
            let down = self.upload(GgmlType::Q2_K, ff, e, ne)?;
            for (i, &n) in ns.iter().enumerate() {
                let mut ids = Vec::with_capacity(n * k);
                for _ in 0..n {
                    let mut sel: Vec<i32> = Vec::new();
                    while sel.len() < k {
                        let x = (self.rng.next() % ne as u64) as i32;
                        if !sel.contains(&x) {
                            sel.push(x);
                        }
                    }
                    ids.extend(sel);
                }
                let wv: Vec<f32> = (0..n * k).map(|i| 0.1 + 0.01 * (i % 7) as f32).collect();
                let dids = self.stream.clone_htod(&ids)?;
                let dw = self.stream.clone_htod(&wv)?;
                let x = self.f32_buf(n * e, 1.0)?;
                let mut act =
                    self.stream
                        .alloc_zeros::<u8>(Gemv::act_bytes(GgmlType::IQ2_XXS, e, n))?;
                self.g
                    .quantize_act(&self.stream, GgmlType::IQ2_XXS, &x, n, e, &mut act)?;
                let mut mq = self.stream.alloc_zeros::<f32>(n * k * ff)?;
                let mt = self.stream.alloc_zeros::<f32>(n * k * ff)?;
                let (ap, ip, wp, mp) = (
                    self.ptr(&act),
                    self.ptr(&dids),
                    self.ptr(&dw),
                    self.ptr(&mt),
                );
                let reps = self.reps;
                let tc_ms = self.time(reps, || {
                    // SAFETY: act quantized for the experts, ids/wts [n][k], mid [n·k][ff].
                    unsafe {
                        self.tc
                            .moe_gate_up(&self.stream, &gate, &up, ap, ip, wp, n, k, 10.0, mp)?
                    };
                    Ok(())
                })?;
                let q_ms = self.time(reps.min(3), || {
                    self.g.moe_gate_up(
                        &self.stream,
                        &gate,
                        &up,
                        &x,
                        &act,
                        &dids,
                        &dw,
                        n,
                        k,
                        10.0,
                        &mut mq,
                    )?;
                    Ok(())
                })?;
                let rel = if i == 0 {
                    Some(self.compare(&mt, &mq)?)
                } else {
                    None
                };
                self.report(
                    "moe",
                    "gate+up iq2_xxs",
                    n,
                    (2 * n * k * ff * e) as f64,
                    tc_ms,
                    q_ms,
                    rel,
                );

                // Down (on the exact mid), the activation quantization counted on both sides.
                let mut mid_act =
                    self.stream
                        .alloc_zeros::<u8>(Gemv::act_bytes(GgmlType::Q2_K, ff, n * k))?;
                let mut oq = self.stream.alloc_zeros::<f32>(n * e)?;
                let ot = self.stream.alloc_zeros::<f32>(n * e)?;
                let (map, op) = (self.ptr(&mid_act), self.ptr(&ot));
                let tc_ms = self.time(reps, || {
                    self.g.quantize_act(
                        &self.stream,
                        GgmlType::Q2_K,
                        &mq,
                        n * k,
                        ff,
                        &mut mid_act,
                    )?;
                    // SAFETY: mid_act quantized for down, ids [n][k], out [n][e].
                    unsafe { self.tc.moe_down(&self.stream, &down, map, ip, n, k, op)? };
                    Ok(())
                })?;
                let q_ms = self.time(reps.min(3), || {
                    self.g.moe_down(
                        &self.stream,
                        &down,
                        &mq,
                        &mut mid_act,
                        &dids,
                        n,
                        k,
                        &mut oq,
                    )?;
                    Ok(())
                })?;
                let rel = if i == 0 {
                    Some(self.compare(&ot, &oq)?)
                } else {
                    None
                };
                self.report(
                    "moe",
                    "down q2_k + sum6",
                    n,
                    (n * k * ff * e) as f64,
                    tc_ms,
                    q_ms,
                    rel,
                );
            }
            Ok(())
        }
    }

    impl B {
        /// Chunk attention, Flash shapes (64 heads × 512, 64 RoPE dims, window 128; rows with
        /// their nope dims through the FP8 KV round trip, as the model's): the
        /// tensor-core route (`split` and `f16` operands, the f16 row preparation included) vs
        /// the exact kernel, for a chunk of `n` tokens at `pos0` (0: the first chunk of a
        /// prompt; the ring holds window + n rows as the backend's does). MACs: per token and
        /// head, rows × 512 for S and again for O.
        fn attention(&mut self, ops: &GpuOps, ns: &[usize]) -> Result<()> {
            let (nh, hd, window, topk) = (64usize, 512usize, 128usize, 512usize);
            let rope = RopeParams::plain(64, 10000.0);
            // (case, ratio, indexer, pos0)
            let cases: [(&str, usize, bool, usize); 4] = [
                ("swa w128 pos0", 0, false, 0),
                ("csa w128+top512 pos0", 4, true, 0),
                ("csa w128+top512 pos8k", 4, true, 8192),
                ("hca w128+all pos8k", 128, false, 8192),
            ];
            let block: Vec<f32> = (0..16 * nh * hd)
                .map(|_| ((self.rng.next() % 20001) as f32 - 10000.0) * 1e-4 * 1.7)
                .collect();
            for (case, ratio, has_idx, pos0) in cases {
                for (i, &n) in ns.iter().enumerate() {
                    let raw_cap = window + n;
                    let q: Vec<f32> = block.iter().copied().cycle().take(n * nh * hd).collect();
                    let mut ring: Vec<f32> =
                        block.iter().copied().cycle().take(raw_cap * hd).collect();
                    let ncomp = (pos0 + n).checked_div(ratio).map_or(1, |r| r + 1);
                    let mut comp: Vec<f32> = block
                        .iter()
                        .rev()
                        .copied()
                        .cycle()
                        .take(ncomp * hd)
                        .collect();
                    // The rows as the model stores them: the nope dims through the FP8 KV
                    // round trip (so exact in f16, which the route exploits).
                    for row in ring.chunks_mut(hd).chain(comp.chunks_mut(hd)) {
                        ds4_model::ops::fp8_kv_qat(row, hd - 64);
                    }
                    let sinks: Vec<f32> = (0..nh).map(|h| (h % 7) as f32 * 0.3 - 1.0).collect();
                    let mut isel = vec![0i32; n * topk];
                    let mut macs = 0f64;
                    for t in 0..n {
                        let p = pos0 + t;
                        let nv = (p + 1).checked_div(ratio).unwrap_or(0);
                        let sel = has_idx && nv > topk;
                        if sel {
                            // Distinct, spread over the visible rows.
                            let off = (self.rng.next() % nv as u64) as usize;
                            for j in 0..topk {
                                isel[t * topk + j] = ((off + j * nv / topk) % nv) as i32;
                            }
                        }
                        let rows = (p + 1).min(window) + if sel { topk } else { nv };
                        macs += (2 * nh * hd * rows) as f64;
                    }
                    let a = AttnInputs {
                        q: &q,
                        ring: &ring,
                        raw_cap,
                        window,
                        comp: &comp,
                        ratio,
                        has_indexer: has_idx,
                        isel: &isel,
                        topk,
                        sinks: &sinks,
                        scale: 1.0 / (hd as f32).sqrt(),
                        nh,
                        hd,
                        n_rot: 64,
                        inv_freq: &rope.inv_freq,
                        pos0,
                        n,
                    };
                    // --skip-exact: the exact kernel runs untimed, at the first token count only.
                    let (want, q_ms) = if self.skip_exact && i > 0 {
                        (Vec::new(), f64::NAN)
                    } else if self.skip_exact {
                        (ops.attention_timed(&a, None, 0)?.0, f64::NAN)
                    } else {
                        ops.attention_timed(&a, None, self.reps.min(3))?
                    };
                    for (route, prec) in [
                        ("attn", AttnPrecision::Split),
                        ("attn_f16", AttnPrecision::F16),
                    ] {
                        let (got, tc_ms) = ops.attention_timed(&a, Some(prec), self.reps)?;
                        let rel = (i == 0).then(|| {
                            got.iter().zip(&want).fold(0f64, |w, (p, q)| {
                                if p.is_finite() && q.is_finite() {
                                    w.max(((p - q).abs() / (1.0 + q.abs())) as f64)
                                } else {
                                    f64::INFINITY
                                }
                            })
                        });
                        self.report(route, case, n, macs, tc_ms, q_ms, rel);
                    }
                }
            }
            Ok(())
        }
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let mut csv: Option<String> = None;
        let mut ns: Vec<usize> = vec![512, 2048, 8192];
        let mut reps = 7usize;
        let mut only: Option<String> = None;
        let mut case: Option<String> = None;
        let mut skip_exact = false;
        let mut i = 1;
        while i < args.len() {
            match args[i].as_str() {
                "--csv" => {
                    csv = Some(args.get(i + 1).context("--csv PATH")?.clone());
                    i += 2;
                }
                "--tokens" => {
                    ns = args
                        .get(i + 1)
                        .context("--tokens LIST")?
                        .split(',')
                        .map(|s| s.parse())
                        .collect::<Result<_, _>>()?;
                    i += 2;
                }
                "--reps" => {
                    reps = args.get(i + 1).context("--reps N")?.parse()?;
                    i += 2;
                }
                "--only" => {
                    only = Some(args.get(i + 1).context("--only attn|matmul|dense")?.clone());
                    i += 2;
                }
                "--case" => {
                    case = Some(args.get(i + 1).context("--case SUBSTR")?.clone());
                    i += 2;
                }
                "--skip-exact" => {
                    skip_exact = true;
                    i += 1;
                }
                a => bail!("unknown argument {a}"),
            }
        }
        let info = ds4_cuda::probe(0)?;
        let ctx = CudaContext::new(0)?;
        let stream = ctx.default_stream();
        let g = Gemv::new(&ctx)?;
        let maxn = *ns.iter().max().unwrap_or(&512);
        let cfg = TcConfig {
            max_tokens: maxn,
            max_f16_cols: 16384,
            n_expert: 256,
            n_expert_used: 6,
            down_rows: 4096,
            max_dense_elems: 32768 * 1024,
            max_dense_cols: 8 * 4096,
            max_pair_rows: 2048,
        };
        let tc = Tc::new(&ctx, &stream, cfg, TcRoutes::all())?;
        let f16_routes = TcRoutes {
            dense_f16: true,
            ..TcRoutes::all()
        };
        let tcf = Tc::new(&ctx, &stream, cfg, f16_routes)?;
        let card = info.name.replace(',', " ");
        println!("tc_bench on {card} (routes vs exact path; ms = median of {reps})");
        println!(
            "{:<9} {:<22} {:>6} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
            "route", "case", "n", "tc_ms", "TFLOP/s", "exact_ms", "TFLOP/s", "speedup", "rel"
        );
        let mut b = B {
            ctx,
            stream,
            g,
            tc,
            tcf,
            rng: Rng(42),
            reps,
            case,
            skip_exact,
            card,
            rows: Vec::new(),
        };
        let q8 = GgmlType::Q8_0;
        let f16 = GgmlType::F16;
        let dense_only = only.as_deref() == Some("dense");
        if only.as_deref() != Some("matmul") && !dense_only {
            let ops = GpuOps::new(0)?;
            b.attention(&ops, &ns)?;
        }
        if only.as_deref() == Some("attn") {
            return b.write_csv(csv.as_deref());
        }
        // dense / attn_out: the int8 form (default) and the opt-in f16 form ("_f16").
        for f16 in [false, true] {
            if f16 && dense_only {
                continue;
            }
            let sfx = if f16 { "_f16" } else { "" };
            let (dense, attn_out) = (format!("dense{sfx}"), format!("attn_out{sfx}"));
            b.matmul(&dense, "q_a 4096->1024", q8, 4096, 1024, 1, &ns, f16)?;
            b.matmul(&dense, "q_b 1024->32768", q8, 1024, 32768, 1, &ns, f16)?;
            b.matmul(&dense, "kv 4096->512", q8, 4096, 512, 1, &ns, f16)?;
            b.matmul(&dense, "out_b 8192->4096", q8, 8192, 4096, 1, &ns, f16)?;
            b.matmul(&dense, "shexp down 2048->4096", q8, 2048, 4096, 1, &ns, f16)?;
            b.shared_gate_up(&ns, f16)?;
            b.matmul(
                &attn_out,
                "out_a 8x(4096->1024)",
                q8,
                4096,
                1024,
                8,
                &ns,
                f16,
            )?;
        }
        b.matmul(
            "dense",
            "lm head 4096->129280",
            q8,
            4096,
            129280,
            1,
            &[64],
            true,
        )?;
        if dense_only {
            return b.write_csv(csv.as_deref());
        }
        b.matmul(
            "f16",
            "compressor 4096->1024",
            f16,
            4096,
            1024,
            1,
            &ns,
            false,
        )?;
        b.matmul(
            "f16",
            "indexer q_b 1024->8192",
            f16,
            1024,
            8192,
            1,
            &ns,
            false,
        )?;
        b.matmul("f16", "hc fn 16384->24", f16, 16384, 24, 1, &ns, false)?;
        b.matmul("f16", "router 4096->256", f16, 4096, 256, 1, &ns, false)?;
        b.moe(&ns)?;
        b.write_csv(csv.as_deref())
    }

    impl B {
        fn write_csv(&self, path: Option<&str>) -> Result<()> {
            if let Some(path) = path {
                let mut f = std::fs::File::create(path).with_context(|| path.to_string())?;
                writeln!(
                    f,
                    "card,route,case,n,macs,tc_ms,tc_tflops,exact_ms,exact_tflops,speedup,rel_diff"
                )?;
                for r in &self.rows {
                    writeln!(f, "{r}")?;
                }
            }
            Ok(())
        }
    }
}
