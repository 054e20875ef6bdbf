//! Weight-streaming kernel benchmark on DeepSeek V4 Flash decode shapes.
//!
//! ```text
//! cargo build --release -p ds4-cuda --features cuda --example gemv_bench
//! gemv_bench [--csv PATH] [--commit HASH] [--sweep] [--moe-sweep] [--only NAME,NAME]
//! ```
//!
//! Measures first the device-to-device copy bandwidth (bytes read + written) and a pure
//! streaming-read kernel, then every kernel on Flash shapes: each case is captured as a CUDA
//! graph of many launches that rotate over enough weight copies (or, for experts, enough random
//! expert selections) that L2 cannot hold them; the graph is replayed after a warm-up and the
//! median per-launch time is reported. GB/s counts the weight bytes each launch must read
//! (for MoE: only the k selected experts), and "%copy" compares with the copy bandwidth.
//! `--sweep` also times dense Q8_0/F16 cases with each tile shape and forced split (1, 2, 4, 8)
//! and the MoE down with each split of its (slot, step) sequence. The variant column names the
//! plan: `auto(RRxU/sS)` or the forced `tT/sS` (tile index T of `Gemv::dense_tile_shapes`).

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gemv_bench needs --features cuda");
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

    use anyhow::{Context, Result};
    use cudarc::driver::sys;
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use ds4_cuda::gemv::{DevWeight, Gemv};
    use ds4_gguf::GgmlType;

    use crate::bench_common::{Rng, random_tensor};

    struct Row {
        kernel: String,
        shape: String,
        ty: String,
        n: usize,
        variant: String,
        bytes: usize,
        us: f64,
    }

    struct Ctx {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        g: Gemv,
        rng: Rng,
        l2: usize,
        /// `--only a,b`: run only the cases whose kernel name contains one of these.
        only: Vec<String>,
    }

    impl Ctx {
        fn wants(&self, kernel: &str) -> bool {
            self.only.is_empty() || self.only.iter().any(|o| kernel.contains(o.as_str()))
        }
    }

    /// Median per-launch microseconds of `launch(i)` for i = 0..reps, captured in one graph.
    fn time_graph(
        c: &Ctx,
        reps: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        // Warm-up outside the graph (module load, first-touch).
        for i in 0..reps.min(4) {
            launch(i)?;
        }
        c.stream.synchronize()?;
        c.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let mut err = None;
        for i in 0..reps {
            if let Err(e) = launch(i) {
                err = Some(e);
                break;
            }
        }
        let graph = c
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))?
            .context("empty graph")?;
        if let Some(e) = err {
            return Err(e);
        }
        let start = c
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = c
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        graph.launch()?;
        graph.launch()?;
        c.stream.synchronize()?;
        let mut times = Vec::new();
        for _ in 0..9 {
            start.record(&c.stream)?;
            graph.launch()?;
            end.record(&c.stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64 * 1000.0 / reps as f64);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(times[times.len() / 2])
    }

    fn copies_for(c: &Ctx, bytes: usize) -> usize {
        (4 * c.l2).div_ceil(bytes.max(1)).clamp(2, 64)
    }

    fn upload_copies(
        c: &mut Ctx,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
        copies: usize,
    ) -> Result<Vec<DevWeight>> {
        let bytes = random_tensor(&mut c.rng, ty, cols, rows, n_mat);
        let mut v = Vec::new();
        for _ in 0..copies {
            v.push(c.g.upload(&c.stream, ty, cols, rows, n_mat, &bytes)?);
        }
        c.stream.synchronize()?;
        Ok(v)
    }

    fn f32_buf(c: &mut Ctx, n: usize) -> Result<CudaSlice<f32>> {
        let v: Vec<f32> = (0..n)
            .map(|_| ((c.rng.next() % 20001) as f32 - 10000.0) * 1e-4)
            .collect();
        Ok(c.stream.clone_htod(&v)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn dense(
        c: &mut Ctx,
        rows_out: &mut Vec<Row>,
        name: &str,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
        n: usize,
        variants: &[(u32, u32)],
    ) -> Result<()> {
        if !c.wants(name) {
            return Ok(());
        }
        let wbytes = ds4_cuda::gemv::gguf_bytes(ty, cols, rows, n_mat).unwrap();
        let copies = copies_for(c, wbytes);
        let ws = upload_copies(c, ty, cols, rows, n_mat, copies)?;
        let cx = cols * n_mat;
        let x = f32_buf(c, n * cx)?;
        let mut act = c
            .stream
            .alloc_zeros::<u8>(Gemv::act_bytes(ty, cx, n).max(16))?;
        c.g.quantize_act(&c.stream, ty, &x, n, cx, &mut act)?;
        let mut y = c.stream.alloc_zeros::<f32>(n * rows * n_mat)?;
        let reps = (copies * 4).clamp(16, 256);
        for &(tile, split) in variants {
            c.g.tuning.force_split = split;
            c.g.tuning.force_tile = tile;
            let (rr, u, s) = c.g.plan_matvec(&ws[0], n);
            let us = {
                let (g, stream) = (&c.g, &c.stream);
                let (x, act) = (&x, &act);
                let y = &mut y;
                let ws = &ws;
                time_graph(c, reps, |i| {
                    g.matvec(stream, &ws[i % ws.len()], x, act, n, y)?;
                    Ok(())
                })?
            };
            rows_out.push(Row {
                kernel: name.to_string(),
                shape: format!("{cols}x{rows}x{n_mat}"),
                ty: format!("{ty:?}"),
                n,
                variant: if split == 0 && tile == 0 {
                    format!("auto({rr}x{u}/s{s})")
                } else {
                    format!("t{tile}/s{s}")
                },
                bytes: n.div_ceil(8) * wbytes,
                us,
            });
        }
        c.g.tuning.force_split = 0;
        c.g.tuning.force_tile = 0;
        Ok(())
    }

    /// Auto plus every (tile, split) combination when sweeping.
    fn variants(ty: GgmlType, n: usize, sweep: bool) -> Vec<(u32, u32)> {
        let mut v = vec![(0, 0)];
        if sweep {
            for t in 1..=Gemv::dense_tile_shapes(ty, n).len() as u32 {
                for s in [1, 2, 4, 8] {
                    v.push((t, s));
                }
            }
        }
        v
    }

    /// The shared expert's fused gate/up/SwiGLU (`Gemv::gate_up_swiglu`).
    fn shared_gate_up(
        c: &mut Ctx,
        rows_out: &mut Vec<Row>,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n: usize,
        variants: &[(u32, u32)],
    ) -> Result<()> {
        if !c.wants("shexp_gate_up_swiglu") {
            return Ok(());
        }
        let wbytes = ds4_cuda::gemv::gguf_bytes(ty, cols, rows, 1).unwrap();
        let copies = copies_for(c, 2 * wbytes);
        let gs = upload_copies(c, ty, cols, rows, 1, copies)?;
        let us = upload_copies(c, ty, cols, rows, 1, copies)?;
        let x = f32_buf(c, n * cols)?;
        let mut act = c
            .stream
            .alloc_zeros::<u8>(Gemv::act_bytes(ty, cols, n).max(16))?;
        c.g.quantize_act(&c.stream, ty, &x, n, cols, &mut act)?;
        let mut mid = c.stream.alloc_zeros::<f32>(n * rows)?;
        let reps = (copies * 4).clamp(16, 256);
        for &(tile, split) in variants {
            c.g.tuning.force_tile = tile;
            c.g.tuning.force_split = split;
            let t = {
                let (g, stream) = (&c.g, &c.stream);
                let (x, act, gs, us) = (&x, &act, &gs, &us);
                let mid = &mut mid;
                time_graph(c, reps, |i| {
                    let j = i % gs.len();
                    g.gate_up_swiglu(stream, &gs[j], &us[j], x, act, n, 10.0, mid)?;
                    Ok(())
                })?
            };
            rows_out.push(Row {
                kernel: "shexp_gate_up_swiglu".into(),
                shape: format!("{cols}x{rows}x1"),
                ty: format!("{ty:?}"),
                n,
                variant: if tile == 0 && split == 0 {
                    "auto".into()
                } else {
                    format!("t{tile}/s{split}")
                },
                bytes: 2 * n.div_ceil(8) * wbytes,
                us: t,
            });
        }
        c.g.tuning.force_tile = 0;
        c.g.tuning.force_split = 0;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn moe(
        c: &mut Ctx,
        rows_out: &mut Vec<Row>,
        tg: GgmlType,
        td: GgmlType,
        n: usize,
        gu_variants: &[u32],
        down_variants: &[(u32, u32)],
    ) -> Result<()> {
        if !c.wants("moe") {
            return Ok(());
        }
        let (e_dim, ff, n_exp, k) = (4096usize, 2048usize, 256usize, 6usize);
        let gate = upload_copies(c, tg, e_dim, ff, n_exp, 1)?.pop().unwrap();
        let up = upload_copies(c, tg, e_dim, ff, n_exp, 1)?.pop().unwrap();
        let down = upload_copies(c, td, ff, e_dim, n_exp, 1)?.pop().unwrap();
        let sets = 64usize;
        let mut ids = Vec::new();
        for _ in 0..sets * n {
            let mut sel: Vec<i32> = Vec::new();
            while sel.len() < k {
                let e = (c.rng.next() % n_exp as u64) as i32;
                if !sel.contains(&e) {
                    sel.push(e);
                }
            }
            ids.extend(sel);
        }
        let ids = c.stream.clone_htod(&ids)?;
        let wts = f32_buf(c, sets * n * k)?;
        let x = f32_buf(c, n * e_dim)?;
        let mut act = c.stream.alloc_zeros::<u8>(Gemv::act_bytes(tg, e_dim, n))?;
        c.g.quantize_act(&c.stream, tg, &x, n, e_dim, &mut act)?;
        let mut mid = c.stream.alloc_zeros::<f32>(n * k * ff)?;
        let mid_src = f32_buf(c, n * k * ff)?;
        let mut mid_act = c
            .stream
            .alloc_zeros::<u8>(Gemv::act_bytes(td, ff, n * k).max(16))?;
        let mut out = c.stream.alloc_zeros::<f32>(n * e_dim)?;
        let reps = 128;
        // Distinct experts touched per launch (tokens may share experts: count each once).
        let gu_bytes = 2 * n * k * gate.matrix_bytes();
        let d_bytes = n * k * down.matrix_bytes();
        let mut us_gu = Vec::new();
        for &gv in gu_variants {
            c.g.tuning.gate_up_variant = gv;
            let t = {
                let (g, stream, ids, wts, x, act) = (&c.g, &c.stream, &ids, &wts, &x, &act);
                let (gate, up) = (&gate, &up);
                let mid = &mut mid;
                time_graph(c, reps, |i| {
                    let s = i % sets;
                    let idv = ids.slice(s * n * k..(s + 1) * n * k);
                    let wv = wts.slice(s * n * k..(s + 1) * n * k);
                    g.moe_gate_up(stream, gate, up, x, act, &idv, &wv, n, k, 10.0, mid)?;
                    Ok(())
                })?
            };
            us_gu.push((gv, t));
        }
        c.g.tuning.gate_up_variant = 0;
        let mut us_d = Vec::new();
        for &(dv, ds) in down_variants {
            c.g.tuning.down_variant = dv;
            c.g.tuning.down_split = ds;
            let t = {
                let (g, stream, ids, mid_src) = (&c.g, &c.stream, &ids, &mid_src);
                let down = &down;
                let (mid_act, out) = (&mut mid_act, &mut out);
                time_graph(c, reps, |i| {
                    let s = i % sets;
                    let idv = ids.slice(s * n * k..(s + 1) * n * k);
                    g.moe_down(stream, down, mid_src, mid_act, &idv, n, k, out)?;
                    Ok(())
                })?
            };
            us_d.push((dv, ds, t));
        }
        c.g.tuning.down_split = 0;
        c.g.tuning.down_variant = 0;
        for (gv, us) in us_gu {
            rows_out.push(Row {
                kernel: "moe_gate_up".into(),
                shape: format!("{e_dim}x{ff}x{n_exp} k{k}"),
                ty: format!("{tg:?}"),
                n,
                variant: if gv == 0 {
                    "auto".into()
                } else {
                    format!("v{gv}")
                },
                bytes: gu_bytes,
                us,
            });
        }
        for (dv, ds, us) in us_d {
            rows_out.push(Row {
                kernel: "moe_down(+quant)".into(),
                shape: format!("{ff}x{e_dim}x{n_exp} k{k}"),
                ty: format!("{td:?}"),
                n,
                variant: if ds == 0 && dv == 0 {
                    "auto".into()
                } else {
                    format!("v{dv}/s{ds}")
                },
                bytes: d_bytes,
                us,
            });
        }
        Ok(())
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let arg = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1).cloned())
        };
        let csv = arg("--csv").unwrap_or_else(|| "gemv.csv".into());
        let commit = arg("--commit").unwrap_or_else(|| "unknown".into());
        let sweep = args.iter().any(|a| a == "--sweep");
        let only: Vec<String> = arg("--only")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();

        let ctx = CudaContext::new(0)?;
        // SAFETY: one stream, everything ordered on it; no cross-stream use.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let g = Gemv::new(&ctx)?;
        let card = ctx.name()?;
        let l2 =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize;
        println!(
            "card: {card}, {} SMs, L2 {} MiB, commit {commit}",
            g.sm_count(),
            l2 >> 20
        );
        let mut c = Ctx {
            ctx: ctx.clone(),
            stream,
            g,
            rng: Rng(42),
            l2,
            only,
        };

        // 1. Copy bandwidth (read + write) and streaming-read bandwidth, 2 GiB buffers (64 MiB
        // with --only: a quick run, e.g. under a profiler).
        let nb = if c.only.is_empty() {
            2usize << 30
        } else {
            64usize << 20
        };
        let src = c.stream.alloc_zeros::<u8>(nb)?;
        let mut dst = c.stream.alloc_zeros::<u8>(nb)?;
        // Fill with non-zero data (memset pattern) so nothing is timed on zeros.
        c.stream.memset_zeros(&mut dst)?;
        let src = {
            let mut s = src;
            let pat: Vec<u8> = (0..(64usize << 20)).map(|i| (i * 131 + 7) as u8).collect();
            let p = c.stream.clone_htod(&pat)?;
            for o in (0..nb).step_by(pat.len()) {
                let mut v = s.slice_mut(o..o + pat.len());
                c.stream.memcpy_dtod(&p, &mut v)?;
            }
            s
        };
        let copy_us = {
            let stream = &c.stream;
            let (src, dst) = (&src, &mut dst);
            time_graph(&c, 8, |_| {
                stream.memcpy_dtod(src, dst)?;
                Ok(())
            })?
        };
        let copy_gbs = 2.0 * nb as f64 / copy_us / 1e3;
        let mut sink = c.stream.alloc_zeros::<i32>(1)?;
        let read_us = {
            let (g, stream) = (&c.g, &c.stream);
            let (src, sink) = (&src, &mut sink);
            time_graph(&c, 8, |_| {
                g.bench_read(stream, src, sink)?;
                Ok(())
            })?
        };
        let read_gbs = nb as f64 / read_us / 1e3;
        println!(
            "D2D copy: {copy_gbs:.0} GB/s (read+write); streaming read kernel: {read_gbs:.0} GB/s"
        );
        drop(src);
        drop(dst);

        let mut rows = Vec::new();
        let q8 = GgmlType::Q8_0;
        let f16 = GgmlType::F16;
        let sw = variants(q8, 1, sweep);
        let sw = &sw[..];
        let swf = variants(f16, 1, sweep);
        let swf = &swf[..];
        let auto: &[(u32, u32)] = &[(0, 0)];
        let swi = variants(GgmlType::IQ2_XXS, 1, sweep);
        // Q8_0 attention / shared expert / LM head (decode, n = 1).
        dense(&mut c, &mut rows, "attn_q_a", q8, 4096, 1024, 1, 1, sw)?;
        dense(&mut c, &mut rows, "attn_q_b", q8, 1024, 32768, 1, 1, sw)?;
        dense(&mut c, &mut rows, "attn_kv", q8, 4096, 512, 1, 1, sw)?;
        dense(
            &mut c,
            &mut rows,
            "attn_out_a(grouped)",
            q8,
            4096,
            1024,
            8,
            1,
            sw,
        )?;
        dense(&mut c, &mut rows, "attn_out_b", q8, 8192, 4096, 1, 1, sw)?;
        dense(&mut c, &mut rows, "shexp_gate/up", q8, 4096, 2048, 1, 1, sw)?;
        dense(&mut c, &mut rows, "shexp_down", q8, 2048, 4096, 1, 1, sw)?;
        dense(&mut c, &mut rows, "lm_head", q8, 4096, 129280, 1, 1, sw)?;
        // F16 router / compressor / indexer / HC.
        dense(&mut c, &mut rows, "router", f16, 4096, 256, 1, 1, swf)?;
        dense(
            &mut c,
            &mut rows,
            "compressor(r4)",
            f16,
            4096,
            1024,
            1,
            1,
            swf,
        )?;
        dense(
            &mut c,
            &mut rows,
            "compressor(r128)",
            f16,
            4096,
            512,
            1,
            1,
            swf,
        )?;
        dense(&mut c, &mut rows, "indexer_q_b", f16, 1024, 8192, 1, 1, swf)?;
        dense(&mut c, &mut rows, "hc_fn", f16, 16384, 24, 1, 1, swf)?;
        // Short prefill chunks / speculative: several tokens per weight read.
        for n in [2usize, 4, 8] {
            let v = variants(q8, n, sweep);
            dense(&mut c, &mut rows, "attn_out_b", q8, 8192, 4096, 1, n, &v)?;
        }
        // Dense K-quants (same kernels as the experts, contiguous rows).
        dense(
            &mut c,
            &mut rows,
            "dense",
            GgmlType::IQ2_XXS,
            4096,
            8192,
            1,
            1,
            &swi,
        )?;
        dense(
            &mut c,
            &mut rows,
            "dense",
            GgmlType::Q2_K,
            2048,
            16384,
            1,
            1,
            auto,
        )?;
        dense(
            &mut c,
            &mut rows,
            "dense",
            GgmlType::Q4_K,
            4096,
            8192,
            1,
            1,
            auto,
        )?;
        dense(
            &mut c,
            &mut rows,
            "dense",
            GgmlType::F32,
            4096,
            4096,
            1,
            1,
            auto,
        )?;
        // Shared expert gate/up + SwiGLU (one fused kernel), decode and 2-token.
        shared_gate_up(&mut c, &mut rows, q8, 4096, 2048, 1, sw)?;
        for n in [2usize, 8] {
            shared_gate_up(&mut c, &mut rows, q8, 4096, 2048, n, auto)?;
        }
        // Routed experts: 6 of 256, decode and 2-token.
        let moe_sweep = sweep || args.iter().any(|a| a == "--moe-sweep");
        let (gsw, dsw): (Vec<u32>, Vec<(u32, u32)>) = if moe_sweep {
            (
                vec![0, 1, 2, 3],
                [0u32, 1, 2]
                    .into_iter()
                    .flat_map(|v| [0u32, 1, 2, 3, 6].map(|s| (v, s)))
                    .collect(),
            )
        } else {
            (vec![0], vec![(0, 0)])
        };
        let iq2 = GgmlType::IQ2_XXS;
        moe(&mut c, &mut rows, iq2, GgmlType::Q2_K, 1, &gsw, &dsw)?;
        // `--moe-sweep` alone: only the decode (1-token) Flash MoE rows, every variant.
        if !moe_sweep || sweep {
            let (g0, d0) = (&[0u32][..], &[(0u32, 0u32)][..]);
            moe(&mut c, &mut rows, GgmlType::Q4_K, GgmlType::Q4_K, 1, g0, d0)?;
            moe(&mut c, &mut rows, iq2, GgmlType::Q2_K, 2, g0, d0)?;
            moe(&mut c, &mut rows, iq2, GgmlType::Q2_K, 8, g0, d0)?;
        }

        let mut f = std::fs::File::create(&csv).with_context(|| format!("create {csv}"))?;
        writeln!(
            f,
            "# card={card} sms={} commit={commit} copy_gbps={copy_gbs:.0} read_gbps={read_gbs:.0}",
            c.g.sm_count()
        )?;
        writeln!(
            f,
            "card,commit,kernel,shape,type,n,variant,bytes,us,gbps,pct_copy,pct_read"
        )?;
        println!(
            "{:<22} {:<22} {:<8} {:>2} {:<7} {:>10} {:>9} {:>8} {:>6} {:>6}",
            "kernel", "shape", "type", "n", "variant", "bytes", "us", "GB/s", "%copy", "%read"
        );
        for r in &rows {
            let gbs = r.bytes as f64 / r.us / 1e3;
            let pc = 100.0 * gbs / copy_gbs;
            let pr = 100.0 * gbs / read_gbs;
            writeln!(
                f,
                "{card},{commit},{},{},{},{},{},{},{:.2},{:.0},{:.1},{:.1}",
                r.kernel, r.shape, r.ty, r.n, r.variant, r.bytes, r.us, gbs, pc, pr
            )?;
            println!(
                "{:<22} {:<22} {:<8} {:>2} {:<7} {:>10} {:>9.2} {:>8.0} {:>6.1} {:>6.1}",
                r.kernel, r.shape, r.ty, r.n, r.variant, r.bytes, r.us, gbs, pc, pr
            );
        }
        println!("wrote {csv}");
        Ok(())
    }
}
