//! Tensor-core prefill routes (`ds4_cuda::tc`) against the exact path (`ds4_cuda::gemv`, itself
//! tested against `ds4_quant` in tests/gemv.rs) and, for F16, against the CPU (`ds4_quant`).
//!
//! Skipped (with a printed line) when no CUDA device is usable.
//!
//! Tolerances, and why:
//! * Quantized weights (Q8_0 dense / grouped / shared gate-up, routed IQ2_XXS / Q2_K / Q4_K /
//!   Q8_0 gate-up and down): `|tc − exact| ≤ 1e-5·(1 + |exact|)`. Both paths form every
//!   per-block integer sum exactly and the same per-block f32 term (Q8_0: the route fuses the
//!   term's last product into an FMA, ≤ ½ ulp of the term); only the order of the f32 sum over
//!   the ≤ 128 block terms differs. Data are scaled so outputs are O(1) (weights ~ N(0, 1/cols),
//!   x ~ N(0, 1)): a reordered sum differs by ~1e-7·√terms ≈ 1e-6, so 1e-5 has ≥ 10× headroom,
//!   while any indexing, scale or sign error is ≥ 1e-2. (`mid` carries these errors through the
//!   f64 SwiGLU: same bound.)
//! * The f16 form of dense / attn_out / shared gate-up (`TcRoutes::dense_f16`) vs the exact
//!   path's products in f64: the dequantized weights times ds4's dequantized int8 activations
//!   (`quantize_act`, read back from the device): `|y − Σ w·x_q| ≤ (2^-10 + 2^-22 + K·2^-23)·
//!   Σ|w·x_q| + 1e-30` for K columns. Each weight and activation is rounded once to f16
//!   (≤ 2^-11 relative each, plus 2^-24 for the activation's f32 product: ≤ 2^-10 + 2^-22 per
//!   product; the power-of-two scalings are exact and keep every operand normal), and the f32
//!   sum of K terms adds ≤ K·2^-23 of Σ|w·x_q| in the worst case even if the tensor cores'
//!   accumulation truncates (K = 4096: 1.47e-3 in all; 8192: 1.96e-3). Indexing, grouping,
//!   scale or quantization errors are O(Σ|w·x_q|) (the unquantized x is ~2^-8 of a block's
//!   range away). Inputs of very different magnitudes (1e-6 … 1e5, beyond f16's range without
//!   the scaling) are included. The gate/up pair is checked through its SwiGLU against the same
//!   products.
//! * F16 weights vs the CPU (f32 products, f32 accumulation): `≤ 1e-4·(1 + |cpu|)` as gemv's
//!   F16 test: x is carried as f16 hi + lo (22 bits, ≤ 2.4e-7 relative per element), products
//!   are exact, f32 accumulation in another order (4096–16384 terms). Matrices of ≤ 32 rows
//!   take the skinny kernel (x as tf32 hi + lo, 22 bits, in f32's exponent range): same bound.
//!
//! Every check uses fresh random inputs, poisons the outputs with NaN first and fails on any
//! non-finite output (except where NaN is the expected answer).

use ds4_cuda::TcRoutes;

#[test]
fn route_switches_from_the_environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let all = TcRoutes::all();
    assert!(all.any() && all.attn);
    assert_eq!(all.with_vars(env(&[])), all);
    assert_eq!(
        all.with_vars(env(&[("DS4_CUDA_TC_DISABLE", "1")])),
        TcRoutes::none()
    );
    assert_eq!(all.with_vars(env(&[("DS4_CUDA_TC_DISABLE", "0")])), all);
    let r = all.with_vars(env(&[
        ("DS4_CUDA_TC_DENSE_DISABLE", "1"),
        ("DS4_CUDA_TC_MOE_UP_DISABLE", "yes"),
    ]));
    assert!(!r.dense && !r.moe_up);
    assert!(r.attn_out && r.f16 && r.moe_gate && r.moe_down && r.attn);
    for (var, f) in [
        ("DS4_CUDA_TC_ATTN_OUT_DISABLE", 1usize),
        ("DS4_CUDA_TC_F16_DISABLE", 2),
        ("DS4_CUDA_TC_MOE_GATE_DISABLE", 3),
        ("DS4_CUDA_TC_MOE_DOWN_DISABLE", 5),
        ("DS4_CUDA_TC_ATTN_DISABLE", 6),
    ] {
        let r = all.with_vars(|k| (k == var).then(|| "1".to_string()));
        let flags = [
            r.dense, r.attn_out, r.f16, r.moe_gate, r.moe_up, r.moe_down, r.attn,
        ];
        for (i, on) in flags.iter().enumerate() {
            assert_eq!(*on, i != f, "{var}: flag {i}");
        }
    }
    assert!(!TcRoutes::none().any());
    let attn_only = TcRoutes {
        attn: true,
        ..TcRoutes::none()
    };
    assert!(attn_only.any());
    assert!(all.describe().contains("dense=on ") && all.describe().contains("attn=on"));
    assert!(!all.dense_f16);
    let f = all.with_vars(env(&[("DS4_CUDA_TC_DENSE_F16", "1")]));
    assert!(f.dense_f16 && f.dense && f.attn_out);
    assert!(f.describe().contains("dense=on(f16) attn_out=on(f16)"));
    assert!(
        !f.with_vars(env(&[("DS4_CUDA_TC_DENSE_F16", "0")]))
            .dense_f16
    );
    assert!(TcRoutes::none().describe().contains("attn=off"));
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
    use ds4_cuda::TcRoutes;
    use ds4_cuda::gemv::{DevWeight, Gemv};
    use ds4_cuda::tc::{MOE_MAX_TOKENS, Tc, TcConfig};
    use ds4_gguf::GgmlType;
    use ds4_quant::{QMatrix, dequantize_to_vec};

    use crate::common::{Rng, upload_random};

    struct Dev {
        stream: Arc<CudaStream>,
        g: Gemv,
        /// Every route, dense / attn_out in their int8 form (exact per-block integer dots).
        tc: Tc,
        /// Every route, dense / attn_out in their f16 (cuBLAS) form.
        tcf: Tc,
    }

    const MAX_TOKENS: usize = 2200;

    fn dev() -> Option<Dev> {
        match ds4_cuda::probe(0) {
            Ok(info) => eprintln!("tc tests on {} ({:?})", info.name, info.compute_capability),
            Err(e) => {
                eprintln!("skipping GPU tc tests: {e}");
                return None;
            }
        }
        let ctx = CudaContext::new(0).expect("context");
        let stream = ctx.default_stream();
        let g = Gemv::new(&ctx).expect("load gemv kernels");
        let cfg = TcConfig {
            max_tokens: MAX_TOKENS,
            max_f16_cols: 16384,
            n_expert: 64,
            n_expert_used: 6,
            down_rows: 1024,
            max_dense_elems: 2 * 4096 * 2048,
            max_dense_cols: 8192,
            max_pair_rows: 2048,
        };
        let f16 = TcRoutes {
            dense_f16: true,
            ..TcRoutes::all()
        };
        let tc = Tc::new(&ctx, &stream, cfg, TcRoutes::all()).expect("load tc kernels");
        let tcf = Tc::new(&ctx, &stream, cfg, f16).expect("load tc kernels (f16)");
        Some(Dev { stream, g, tc, tcf })
    }

    fn ptr<T>(d: &Dev, b: &CudaSlice<T>) -> u64 {
        b.device_ptr(&d.stream).0
    }

    fn nan_buf(d: &Dev, n: usize) -> CudaSlice<f32> {
        d.stream.clone_htod(&vec![f32::NAN; n]).unwrap()
    }

    fn byte_buf(d: &Dev, n: usize) -> CudaSlice<u8> {
        d.stream.clone_htod(&vec![0xA5u8; n.max(16)]).unwrap()
    }

    /// Outputs whose bits differ (over the common length).
    fn bit_diffs(a: &[f32], b: &[f32]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
    }

    /// Worst normalized error; panics on a violation or a non-finite value.
    fn check(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let mut worst = 0.0f32;
        for (i, (&a, &e)) in got.iter().zip(want).enumerate() {
            assert!(a.is_finite(), "{what}: output {i} is {a} (expected {e})");
            assert!(e.is_finite(), "{what}: reference {i} is {e}");
            let err = (a - e).abs() / (1.0 + e.abs());
            assert!(
                err <= tol,
                "{what}: output {i}: tc {a} exact {e} (normalized error {err:e} > {tol:e})"
            );
            worst = worst.max(err);
        }
        eprintln!("{what}: worst normalized error {worst:e}");
        worst
    }

    fn upload(
        d: &Dev,
        rng: &mut Rng,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
    ) -> (Vec<u8>, DevWeight) {
        upload_random(&d.g, &d.stream, rng, ty, cols, rows, n_mat)
    }

    fn pick_ids(rng: &mut Rng, n: usize, k: usize, n_mat: usize) -> Vec<i32> {
        let mut ids = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut sel: Vec<i32> = Vec::new();
            while sel.len() < k {
                let e = (rng.next() % n_mat as u64) as i32;
                if !sel.contains(&e) {
                    sel.push(e);
                }
            }
            ids.extend(sel);
        }
        ids
    }

    #[test]
    fn dense_q8_0_matches_exact_path() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(11);
        let ty = GgmlType::Q8_0;
        // (cols, rows, n_mat, n): partial row tiles, partial token tiles, a partial last K
        // stage (cols 128, 1088), grouped, both token-tile widths (≤ 32 and > 32 tokens).
        let cases = [
            (4096usize, 1024usize, 1usize, 64usize),
            (1024, 520, 1, 37),
            (128, 256, 1, 16),
            (1088, 200, 1, 100),
            (512, 256, 8, 40),
            (256, 4100, 1, 130),
            (4096, 129, 1, 30),
        ];
        for (cols, rows, n_mat, n) in cases {
            let (_, w) = upload(&d, &mut rng, ty, cols, rows, n_mat);
            assert!(
                d.tc.takes_matmul(&w, n),
                "route must take {cols}x{rows}x{n_mat}"
            );
            let cx = cols * n_mat;
            let x = rng.vec(n * cx, 1.0);
            let dx = d.stream.clone_htod(&x).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(ty, cx, n));
            d.g.quantize_act(&d.stream, ty, &dx, n, cx, &mut act)
                .unwrap();
            let mut want = nan_buf(&d, n * rows * n_mat);
            d.g.matvec(&d.stream, &w, &dx, &act, n, &mut want).unwrap();
            let y = nan_buf(&d, n * rows * n_mat);
            // SAFETY: act quantized for w, x [n][cx], y [n][rows·n_mat].
            unsafe {
                d.tc.matmul(&d.stream, &w, ptr(&d, &dx), ptr(&d, &act), n, ptr(&d, &y))
                    .unwrap()
            };
            let got = d.stream.clone_dtoh(&y).unwrap();
            let want = d.stream.clone_dtoh(&want).unwrap();
            check(
                &format!("dense Q8_0 {cols}x{rows}x{n_mat} n={n}"),
                &got,
                &want,
                1e-5,
            );
        }
    }

    #[test]
    fn f16_matches_cpu() {
        let Some(mut d) = dev() else { return };
        let mut rng = Rng(12);
        let ty = GgmlType::F16;
        let cases = [
            (4096usize, 256usize, 1usize, 48usize),
            (16384, 24, 1, 20),
            // ≤ 32 rows: the skinny tf32 kernel (tc_skinny.cu): partial token tiles, 1..4 n8
            // tiles, partial n8 tiles, a K tail outside the unrolled loop.
            (16384, 24, 1, 300),
            (2048, 8, 1, 17),
            (4096, 32, 1, 64),
            (1040, 13, 1, 33),
            (256, 1, 1, 16),
            (1024, 520, 1, 70),
            (512, 64, 4, 33),
            // The wgmma kernel's short last K stage (1, 2, 3 of its 4 k16 steps), split-K.
            (1040, 100, 1, 45),
            (1056, 130, 1, 64),
            (1072, 200, 1, 130),
            (1024, 8192, 1, 200),
        ];
        for (cols, rows, n_mat, n) in cases {
            let (bytes, w) = upload(&d, &mut rng, ty, cols, rows, n_mat);
            assert!(d.tc.takes_matmul(&w, n));
            let cx = cols * n_mat;
            let mut x = rng.vec(n * cx, 1.0);
            // Rows of very different magnitudes (the per-row exponent), one all-zero row.
            for t in 0..n {
                let s = [1e-3f32, 1.0, 250.0, 3e-6][t % 4];
                for v in &mut x[t * cx..(t + 1) * cx] {
                    *v *= s;
                }
            }
            for v in &mut x[cx..2 * cx] {
                *v = 0.0;
            }
            let dx = d.stream.clone_htod(&x).unwrap();
            // The wgmma kernel (default) and d0's mma.sync kernel (rows > 32; fewer take the
            // skinny kernel either way).
            let mut runs = Vec::new();
            for wg in [true, false] {
                d.tc.set_f16_wg(wg);
                let y = nan_buf(&d, n * rows * n_mat);
                // SAFETY: x [n][cx], y [n][rows·n_mat].
                unsafe {
                    d.tc.matmul(&d.stream, &w, ptr(&d, &dx), 0, n, ptr(&d, &y))
                        .unwrap()
                };
                runs.push(d.stream.clone_dtoh(&y).unwrap());
            }
            d.tc.set_f16_wg(true);
            let got = runs[0].clone();
            let q = QMatrix::new(ty, cols, rows * n_mat, &bytes).unwrap();
            let mut want = vec![0.0f32; n * rows * n_mat];
            for t in 0..n {
                for m in 0..n_mat {
                    let xs = &x[(t * n_mat + m) * cols..(t * n_mat + m + 1) * cols];
                    let o = (t * n_mat + m) * rows;
                    q.sub_rows(m * rows, rows)
                        .unwrap()
                        .matvec(xs, &mut want[o..o + rows])
                        .unwrap();
                }
            }
            // Normalize per row scale: compare y / s_t (a relative check on every row).
            let mut gn = got.clone();
            let mut wn = want.clone();
            for t in 0..n {
                let s = [1e-3f32, 1.0, 250.0, 3e-6][t % 4];
                for i in t * rows * n_mat..(t + 1) * rows * n_mat {
                    gn[i] /= s;
                    wn[i] /= s;
                }
            }
            check(&format!("F16 {cols}x{rows}x{n_mat} n={n}"), &gn, &wn, 1e-4);
            if rows > 32 {
                let mut dn = runs[1].clone();
                for t in 0..n {
                    let s = [1e-3f32, 1.0, 250.0, 3e-6][t % 4];
                    for v in &mut dn[t * rows * n_mat..(t + 1) * rows * n_mat] {
                        *v /= s;
                    }
                }
                check(
                    &format!("F16 {cols}x{rows}x{n_mat} n={n} (mma.sync)"),
                    &dn,
                    &wn,
                    1e-4,
                );
                // The same products added in the same order (per 16 columns hi then lo, the
                // same split-K), so the same bits.
                assert_eq!(
                    bit_diffs(&runs[0], &runs[1]),
                    0,
                    "F16 {cols}x{rows}x{n_mat} n={n}: wgmma and mma.sync kernels differ"
                );
            }
            if d.tc.takes_matmul_scaled(&w, n, &d.stream) {
                // The scaled skinny form (hc_post's flat formed in the kernel): the rows
                // x·s (f64 product, rounded to f32) give the same bits as the plain kernel
                // on those rows.
                let raw = rng.vec(n * cx, 3.0);
                let xs: Vec<f64> = (0..n).map(|t| 0.37 / (1.0 + t as f64).sqrt()).collect();
                let xf: Vec<f32> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (v as f64 * xs[i / cx]) as f32)
                    .collect();
                let (draw, dxs, dxf) = (
                    d.stream.clone_htod(&raw).unwrap(),
                    d.stream.clone_htod(&xs).unwrap(),
                    d.stream.clone_htod(&xf).unwrap(),
                );
                let (y0, y1) = (nan_buf(&d, n * rows), nan_buf(&d, n * rows));
                // SAFETY: raw / xf [n][cx], xs [n], y0 / y1 [n][rows].
                unsafe {
                    d.tc.matmul(&d.stream, &w, ptr(&d, &dxf), 0, n, ptr(&d, &y0))
                        .unwrap();
                    d.tc.matmul_scaled(
                        &d.stream,
                        &w,
                        ptr(&d, &draw),
                        ptr(&d, &dxs),
                        n,
                        ptr(&d, &y1),
                    )
                    .unwrap();
                }
                let (a, b) = (
                    d.stream.clone_dtoh(&y0).unwrap(),
                    d.stream.clone_dtoh(&y1).unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "F16 {cols}x{rows} n={n}: scaled skinny differs"
                );
                println!("F16 {cols}x{rows} n={n}: scaled skinny bit-identical");
            }
        }
    }

    /// An F16 product that reuses the f16 prep of the previous one (same x: the compressor /
    /// indexer products of `a`) gives the bits of a plain product; a skinny product in between
    /// leaves the scratch alone.
    #[test]
    fn f16_prep_reuse() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(14);
        let ty = GgmlType::F16;
        let (cols, n) = (4096usize, 70usize);
        let (_, w1) = upload(&d, &mut rng, ty, cols, 512, 1);
        let (_, w2) = upload(&d, &mut rng, ty, cols, 136, 1);
        let (_, ws) = upload(&d, &mut rng, ty, cols, 24, 1);
        let x = rng.vec(n * cols, 1.0);
        let dx = d.stream.clone_htod(&x).unwrap();
        let plain = |w: &DevWeight, rows: usize| {
            let y = nan_buf(&d, n * rows);
            // SAFETY: x [n][cols], y [n][rows].
            unsafe {
                d.tc.matmul(&d.stream, w, ptr(&d, &dx), 0, n, ptr(&d, &y))
                    .unwrap()
            };
            d.stream.clone_dtoh(&y).unwrap()
        };
        let want1 = plain(&w1, 512);
        let want2 = plain(&w2, 136);
        let (y1, y2, ys) = (
            nan_buf(&d, n * 512),
            nan_buf(&d, n * 136),
            nan_buf(&d, n * 24),
        );
        // SAFETY: as above; the reuse follows a product of the same x (skinny aside).
        let (h1, hs, h2) = unsafe {
            let h1 =
                d.tc.matmul_f16_reuse(&d.stream, &w1, ptr(&d, &dx), n, ptr(&d, &y1), false)
                    .unwrap();
            let hs =
                d.tc.matmul_f16_reuse(&d.stream, &ws, ptr(&d, &dx), n, ptr(&d, &ys), true)
                    .unwrap();
            let h2 =
                d.tc.matmul_f16_reuse(&d.stream, &w2, ptr(&d, &dx), n, ptr(&d, &y2), true)
                    .unwrap();
            (h1, hs, h2)
        };
        assert!(h1 && hs && h2, "scratch state {h1} {hs} {h2}");
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same(&d.stream.clone_dtoh(&y1).unwrap(), &want1),
            "first product"
        );
        assert!(
            same(&d.stream.clone_dtoh(&y2).unwrap(), &want2),
            "reused prep"
        );
        println!("f16 prep reuse: bit-identical");
    }

    #[test]
    fn shared_gate_up_matches_exact_path() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(13);
        let ty = GgmlType::Q8_0;
        for (cols, rows, n, clamp) in [
            (1024usize, 520usize, 40usize, 10.0f32),
            (4096, 2048, 70, 10.0),
            (512, 128, 17, 0.5),
        ] {
            let (_, gate) = upload(&d, &mut rng, ty, cols, rows, 1);
            let (_, up) = upload(&d, &mut rng, ty, cols, rows, 1);
            assert!(d.tc.takes_gate_up(&gate, &up, n));
            let x = rng.vec(n * cols, 3.0);
            let dx = d.stream.clone_htod(&x).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
            d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
                .unwrap();
            let mut want = nan_buf(&d, n * rows);
            d.g.gate_up_swiglu(&d.stream, &gate, &up, &dx, &act, n, clamp, &mut want)
                .unwrap();
            let mid = nan_buf(&d, n * rows);
            // SAFETY: act quantized for gate/up, mid [n][rows].
            unsafe {
                d.tc.gate_up(
                    &d.stream,
                    &gate,
                    &up,
                    ptr(&d, &act),
                    n,
                    clamp,
                    ptr(&d, &mid),
                )
                .unwrap()
            };
            let got = d.stream.clone_dtoh(&mid).unwrap();
            let want = d.stream.clone_dtoh(&want).unwrap();
            check(
                &format!("shared gate/up {cols}x{rows} n={n} clamp={clamp}"),
                &got,
                &want,
                1e-5,
            );
        }
    }

    /// ds4's Q8_0 activations of `x` (`[n][cx]`) on the device, and their dequantized values
    /// (`q·d` per 32-block, read back): (x on the device, act, dequantized x).
    fn quantized_act(
        d: &Dev,
        x: &[f32],
        n: usize,
        cx: usize,
    ) -> (CudaSlice<f32>, CudaSlice<u8>, Vec<f32>) {
        let ty = GgmlType::Q8_0;
        let dx = d.stream.clone_htod(x).unwrap();
        let mut act = byte_buf(d, Gemv::act_bytes(ty, cx, n));
        d.g.quantize_act(&d.stream, ty, &dx, n, cx, &mut act)
            .unwrap();
        let bytes = d.stream.clone_dtoh(&act).unwrap();
        // Layout (gemv.rs): qs [n·cx] i8, then d [n·cx/32] f32 at the next 256-byte boundary.
        let off = (n * cx).div_ceil(256) * 256;
        let xq = (0..n * cx)
            .map(|i| {
                let s = &bytes[off + 4 * (i / 32)..off + 4 * (i / 32) + 4];
                bytes[i] as i8 as f32 * f32::from_le_bytes([s[0], s[1], s[2], s[3]])
            })
            .collect();
        (dx, act, xq)
    }

    /// `(Σ w·x, Σ |w·x|)` in f64 for row `r` of the dequantized weights against `x`.
    fn true_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
        w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&p, &q)| {
            let v = p as f64 * q as f64;
            (s + v, a + v.abs())
        })
    }

    /// The f16 form's relative bound for K columns (module docs).
    fn f16_form_tol(k: usize) -> f64 {
        2f64.powi(-10) + 2f64.powi(-22) + k as f64 * 2f64.powi(-23)
    }

    /// |y − Σ w·x| ≤ f16_form_tol(k)·Σ|w·x| + 1e-30.
    fn check_f16_form(what: &str, got: f32, want: (f64, f64), k: usize, worst: &mut f64) {
        assert!(got.is_finite(), "{what}: output {got} (true {})", want.0);
        let err = (got as f64 - want.0).abs();
        let lim = f16_form_tol(k) * want.1 + 1e-30;
        assert!(
            err <= lim,
            "{what}: f16 form {got} true {} (error {err:e} > {lim:e})",
            want.0
        );
        *worst = worst.max(err / (want.1 + 1e-30));
    }

    #[test]
    fn dense_q8_0_f16_form_matches_true_product() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(21);
        let ty = GgmlType::Q8_0;
        // (cols, rows, n_mat, n, x scale): grouped, odd row counts, the longest K, inputs far
        // below and above f16's normal range.
        let cases = [
            (4096usize, 1024usize, 1usize, 64usize, 1.0f32),
            (1024, 520, 1, 37, 1e-6),
            (8192, 300, 1, 40, 1e5),
            (512, 256, 8, 40, 1.0),
            (1088, 200, 1, 100, 3.0),
            (2048, 4096, 1, 16, 0.01),
        ];
        for (cols, rows, n_mat, n, xs) in cases {
            let (bytes, w) = upload(&d, &mut rng, ty, cols, rows, n_mat);
            assert!(d.tcf.takes_matmul(&w, n));
            assert!(
                d.tcf.matmul_is_f16_form(&w, n) && !d.tc.matmul_is_f16_form(&w, n),
                "{cols}x{rows}x{n_mat}: f16 form expected"
            );
            let cx = cols * n_mat;
            let x0 = rng.vec(n * cx, xs);
            let (dx, act, x) = quantized_act(&d, &x0, n, cx);
            let y = nan_buf(&d, n * rows * n_mat);
            // SAFETY: act quantized for w, x [n][cx], y [n][rows·n_mat].
            unsafe {
                d.tcf
                    .matmul(&d.stream, &w, ptr(&d, &dx), ptr(&d, &act), n, ptr(&d, &y))
                    .unwrap()
            };
            let got = d.stream.clone_dtoh(&y).unwrap();
            let wf = dequantize_to_vec(ty, &bytes).unwrap();
            let mut worst = 0.0f64;
            for t in 0..n {
                for m in 0..n_mat {
                    let xr = &x[t * cx + m * cols..t * cx + (m + 1) * cols];
                    for r in 0..rows {
                        let row = (m * rows + r) * cols;
                        let want = true_dot(&wf[row..row + cols], xr);
                        let g = got[t * rows * n_mat + m * rows + r];
                        check_f16_form(
                            &format!("f16 dense {cols}x{rows}x{n_mat} n={n} t={t} m={m} r={r}"),
                            g,
                            want,
                            cols,
                            &mut worst,
                        );
                    }
                }
            }
            eprintln!(
                "f16 dense {cols}x{rows}x{n_mat} n={n} x~{xs:e}: worst |err|/Σ|wx| {worst:.2e}"
            );
        }
    }

    #[test]
    fn shared_gate_up_f16_form_matches_true_product() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(22);
        let ty = GgmlType::Q8_0;
        for (cols, rows, n, clamp) in [
            (4096usize, 2048usize, 70usize, 10.0f32),
            (512, 128, 17, 0.5),
        ] {
            let (gb, gate) = upload(&d, &mut rng, ty, cols, rows, 1);
            let (ub, up) = upload(&d, &mut rng, ty, cols, rows, 1);
            assert!(d.tcf.takes_gate_up(&gate, &up, n) && d.tcf.gate_up_is_f16_form(&gate, n));
            let x0 = rng.vec(n * cols, 3.0);
            let (_dx, act, x) = quantized_act(&d, &x0, n, cols);
            let mid = nan_buf(&d, n * rows);
            // SAFETY: act quantized for the pair, mid [n][rows].
            unsafe {
                d.tcf
                    .gate_up(
                        &d.stream,
                        &gate,
                        &up,
                        ptr(&d, &act),
                        n,
                        clamp,
                        ptr(&d, &mid),
                    )
                    .unwrap()
            };
            let got = d.stream.clone_dtoh(&mid).unwrap();
            let (gf, uf) = (
                dequantize_to_vec(ty, &gb).unwrap(),
                dequantize_to_vec(ty, &ub).unwrap(),
            );
            // SwiGLU of the true products, with each product's bound carried through: the
            // output must lie within the SwiGLU of the bound intervals (monotone pieces:
            // check the four corners and the clamps).
            let swiglu = |g: f64, u: f64| {
                let (mut g, mut u) = (g, u);
                if clamp > 1e-6 {
                    g = g.min(clamp as f64);
                    u = u.clamp(-(clamp as f64), clamp as f64);
                }
                g / (1.0 + (-g).exp()) * u
            };
            for t in 0..n {
                let xr = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let (gs, ga) = true_dot(&gf[r * cols..(r + 1) * cols], xr);
                    let (us, ua) = true_dot(&uf[r * cols..(r + 1) * cols], xr);
                    let tol = f16_form_tol(cols);
                    let (eg, eu) = (tol * ga + 1e-30, tol * ua + 1e-30);
                    let mut lo = f64::INFINITY;
                    let mut hi = f64::NEG_INFINITY;
                    // silu is monotone above its minimum at g ≈ −1.28; sample the interval
                    // densely enough for the narrow bound intervals used here.
                    for i in 0..=8 {
                        let g = gs - eg + 2.0 * eg * i as f64 / 8.0;
                        for u in [us - eu, us + eu] {
                            let v = swiglu(g, u);
                            lo = lo.min(v);
                            hi = hi.max(v);
                        }
                    }
                    let v = got[t * rows + r] as f64;
                    let slack = 1e-6 * (1.0 + v.abs());
                    assert!(
                        v.is_finite() && v >= lo - slack && v <= hi + slack,
                        "f16 gate/up {cols}x{rows} n={n} t={t} r={r}: {v} outside [{lo}, {hi}]"
                    );
                }
            }
        }
    }

    /// Routed gate/up and down for one type combination against gemv's moe kernels.
    #[allow(clippy::too_many_arguments)]
    fn moe_case(
        d: &Dev,
        rng: &mut Rng,
        tg: GgmlType,
        td: GgmlType,
        e_dim: usize,
        ff: usize,
        n_mat: usize,
        n: usize,
        k: usize,
        clamp: f32,
    ) {
        let (_, gate) = upload(d, rng, tg, e_dim, ff, n_mat);
        let (_, up) = upload(d, rng, tg, e_dim, ff, n_mat);
        let (_, down) = upload(d, rng, td, ff, e_dim, n_mat);
        assert!(d.tc.takes_moe_gate_up(&gate, &up, n, k));
        assert!(d.tc.takes_moe_down(&down, n, k));
        let x = rng.vec(n * e_dim, 3.0);
        let ids = pick_ids(rng, n, k, n_mat);
        let wts: Vec<f32> = (0..n * k).map(|_| rng.unif() as f32 * 0.5 + 0.05).collect();
        let dx = d.stream.clone_htod(&x).unwrap();
        let dids = d.stream.clone_htod(&ids).unwrap();
        let dw = d.stream.clone_htod(&wts).unwrap();
        let mut act = byte_buf(d, Gemv::act_bytes(tg, e_dim, n));
        d.g.quantize_act(&d.stream, tg, &dx, n, e_dim, &mut act)
            .unwrap();
        let mut want_mid = nan_buf(d, n * k * ff);
        d.g.moe_gate_up(
            &d.stream,
            &gate,
            &up,
            &dx,
            &act,
            &dids,
            &dw,
            n,
            k,
            clamp,
            &mut want_mid,
        )
        .unwrap();
        let mid = nan_buf(d, n * k * ff);
        // SAFETY: act quantized for the experts, ids/wts [n][k], mid [n·k][ff].
        unsafe {
            d.tc.moe_gate_up(
                &d.stream,
                &gate,
                &up,
                ptr(d, &act),
                ptr(d, &dids),
                ptr(d, &dw),
                n,
                k,
                clamp,
                ptr(d, &mid),
            )
            .unwrap()
        };
        let got_mid = d.stream.clone_dtoh(&mid).unwrap();
        let want_mid_h = d.stream.clone_dtoh(&want_mid).unwrap();
        let tag = format!("{tg:?}/{td:?} {e_dim}x{ff}x{n_mat} n={n} k={k}");
        check(&format!("moe gate/up {tag}"), &got_mid, &want_mid_h, 1e-5);

        // Down on the exact path's mid, for both.
        let mut mid_act = byte_buf(d, Gemv::act_bytes(td, ff, n * k));
        let mut want = nan_buf(d, n * e_dim);
        d.g.moe_down(
            &d.stream,
            &down,
            &want_mid,
            &mut mid_act,
            &dids,
            n,
            k,
            &mut want,
        )
        .unwrap();
        let mut mid_act2 = byte_buf(d, Gemv::act_bytes(td, ff, n * k));
        d.g.quantize_act(&d.stream, td, &want_mid, n * k, ff, &mut mid_act2)
            .unwrap();
        let out = nan_buf(d, n * e_dim);
        // SAFETY: mid_act2 quantized for down, ids [n][k], out [n][e_dim].
        unsafe {
            d.tc.moe_down(
                &d.stream,
                &down,
                ptr(d, &mid_act2),
                ptr(d, &dids),
                n,
                k,
                ptr(d, &out),
            )
            .unwrap()
        };
        let got = d.stream.clone_dtoh(&out).unwrap();
        let want = d.stream.clone_dtoh(&want).unwrap();
        check(&format!("moe down {tag}"), &got, &want, 1e-5);
    }

    #[test]
    fn moe_matches_exact_path() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(14);
        let combos = [
            (GgmlType::IQ2_XXS, GgmlType::Q2_K),
            (GgmlType::Q4_K, GgmlType::Q4_K),
            (GgmlType::Q8_0, GgmlType::Q8_0),
        ];
        for (tg, td) in combos {
            // Few experts, many pairs each (64-pair tiles, several tiles per expert).
            moe_case(&d, &mut rng, tg, td, 1024, 512, 8, 100, 6, 10.0);
            // Many experts, few pairs each (32-pair tiles, empty experts), clamp active.
            moe_case(&d, &mut rng, tg, td, 512, 256, 64, 40, 6, 0.5);
        }
        // Flash-like widths, k = 6 of 16.
        moe_case(
            &d,
            &mut rng,
            GgmlType::IQ2_XXS,
            GgmlType::Q2_K,
            1024,
            1024,
            16,
            64,
            6,
            10.0,
        );
    }

    #[test]
    fn moe_sub_batches() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(15);
        let n = MOE_MAX_TOKENS + 77;
        assert!(n <= MAX_TOKENS);
        moe_case(
            &d,
            &mut rng,
            GgmlType::IQ2_XXS,
            GgmlType::Q2_K,
            256,
            256,
            32,
            n,
            2,
            10.0,
        );
    }

    /// The opt-in 128-pair tiles (IQ2_XXS gate+up, Q2_K down) give the 64-pair tiles' results
    /// bit for bit (and so does the automatic width) on shapes with many pairs per expert and
    /// partial last tiles; the gate/up result also against the exact path (tolerance as above).
    #[test]
    fn moe_bn128_matches_bn64_bit_for_bit() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(16);
        let (e_dim, ff, n_mat, k) = (512usize, 256usize, 16usize, 6usize);
        let cfg = TcConfig {
            max_tokens: 1000,
            max_f16_cols: 256,
            n_expert: n_mat,
            n_expert_used: k,
            down_rows: e_dim,
            max_dense_elems: 0,
            max_dense_cols: 0,
            max_pair_rows: 0,
        };
        let mut tc = Tc::new(d.stream.context(), &d.stream, cfg, TcRoutes::all()).expect("tc");
        let (_, gate) = upload(&d, &mut rng, GgmlType::IQ2_XXS, e_dim, ff, n_mat);
        let (_, up) = upload(&d, &mut rng, GgmlType::IQ2_XXS, e_dim, ff, n_mat);
        let (_, down) = upload(&d, &mut rng, GgmlType::Q2_K, ff, e_dim, n_mat);
        // 375 and ~112 pairs per expert on average.
        for n in [1000usize, 300] {
            let x = rng.vec(n * e_dim, 3.0);
            let ids = pick_ids(&mut rng, n, k, n_mat);
            let wts: Vec<f32> = (0..n * k).map(|_| rng.unif() as f32 * 0.5 + 0.05).collect();
            let dx = d.stream.clone_htod(&x).unwrap();
            let dids = d.stream.clone_htod(&ids).unwrap();
            let dw = d.stream.clone_htod(&wts).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(GgmlType::IQ2_XXS, e_dim, n));
            d.g.quantize_act(&d.stream, GgmlType::IQ2_XXS, &dx, n, e_dim, &mut act)
                .unwrap();
            let mut want_mid = nan_buf(&d, n * k * ff);
            d.g.moe_gate_up(
                &d.stream,
                &gate,
                &up,
                &dx,
                &act,
                &dids,
                &dw,
                n,
                k,
                10.0,
                &mut want_mid,
            )
            .unwrap();
            let want_mid_h = d.stream.clone_dtoh(&want_mid).unwrap();
            let mut mid_act = byte_buf(&d, Gemv::act_bytes(GgmlType::Q2_K, ff, n * k));
            d.g.quantize_act(
                &d.stream,
                GgmlType::Q2_K,
                &want_mid,
                n * k,
                ff,
                &mut mid_act,
            )
            .unwrap();
            let mut res = Vec::new();
            for bn in [Some(64), Some(128), None] {
                tc.set_moe_bn(bn).unwrap();
                let mid = nan_buf(&d, n * k * ff);
                let out = nan_buf(&d, n * e_dim);
                // SAFETY: act quantized for the experts, ids/wts [n][k], mid [n·k][ff];
                // mid_act quantized for down, out [n][e_dim].
                unsafe {
                    tc.moe_gate_up(
                        &d.stream,
                        &gate,
                        &up,
                        ptr(&d, &act),
                        ptr(&d, &dids),
                        ptr(&d, &dw),
                        n,
                        k,
                        10.0,
                        ptr(&d, &mid),
                    )
                    .unwrap();
                    tc.moe_down(
                        &d.stream,
                        &down,
                        ptr(&d, &mid_act),
                        ptr(&d, &dids),
                        n,
                        k,
                        ptr(&d, &out),
                    )
                    .unwrap();
                }
                let mid = d.stream.clone_dtoh(&mid).unwrap();
                let out = d.stream.clone_dtoh(&out).unwrap();
                res.push((mid, out));
            }
            check(
                &format!("moe gate/up bn 128 n={n}"),
                &res[1].0,
                &want_mid_h,
                1e-5,
            );
            let same = |a: &[f32], b: &[f32]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            };
            for (i, what) in [(1, "bn 128"), (2, "auto")] {
                assert!(same(&res[i].0, &res[0].0), "gate/up {what} vs bn 64, n={n}");
                assert!(same(&res[i].1, &res[0].1), "down {what} vs bn 64, n={n}");
                assert!(res[i].1.iter().all(|v| v.is_finite()), "down {what} n={n}");
            }
        }
    }

    #[test]
    fn moe_bad_ids_give_nan() {
        let Some(d) = dev() else { return };
        let mut rng = Rng(16);
        let td = GgmlType::Q2_K;
        let (e_dim, ff, n_mat, n, k) = (256usize, 256usize, 4usize, 20usize, 2usize);
        let (_, down) = upload(&d, &mut rng, td, ff, e_dim, n_mat);
        let mut ids = pick_ids(&mut rng, n, k, n_mat);
        ids[3 * k + 1] = 9; // token 3: id out of range
        ids[7 * k] = -1; // token 7
        let dids = d.stream.clone_htod(&ids).unwrap();
        let mid = d.stream.clone_htod(&rng.vec(n * k * ff, 1.0)).unwrap();
        let mut mid_act = byte_buf(&d, Gemv::act_bytes(td, ff, n * k));
        d.g.quantize_act(&d.stream, td, &mid, n * k, ff, &mut mid_act)
            .unwrap();
        let out = d.stream.clone_htod(&vec![0.0f32; n * e_dim]).unwrap();
        // SAFETY: as moe_case.
        unsafe {
            d.tc.moe_down(
                &d.stream,
                &down,
                ptr(&d, &mid_act),
                ptr(&d, &dids),
                n,
                k,
                ptr(&d, &out),
            )
            .unwrap()
        };
        let o = d.stream.clone_dtoh(&out).unwrap();
        for t in 0..n {
            let row = &o[t * e_dim..(t + 1) * e_dim];
            if t == 3 || t == 7 {
                assert!(row.iter().all(|v| v.is_nan()), "token {t} must be NaN");
            } else {
                assert!(
                    row.iter().all(|v| v.is_finite()),
                    "token {t} must be finite"
                );
            }
        }
    }

    /// One attention geometry (Flash-like unless noted).
    struct AttnCase {
        name: &'static str,
        nh: usize,
        hd: usize,
        n_rot: usize,
        window: usize,
        raw_cap: usize,
        ratio: usize,
        has_idx: bool,
        topk: usize,
        pos0: usize,
        n: usize,
        /// q multiplier: 1 gives a score spread of ~1 (unit-rms q and rows), 3 a peaky softmax.
        qscale: f32,
    }

    /// The tensor-core attention route (both precisions) against the exact kernel
    /// (`ds4_attention`, f64; itself tested against `ops::attention_head` in fwd_ops.rs).
    ///
    /// Tolerances (normalized |route − exact| / (1 + |exact|)), and why:
    /// * `Split` (default; hi + lo f16 operands = 22 bits, three mmas per product): the operand
    ///   error is ≤ 2^-22 per element, but the tensor cores accumulate in f32 (possibly
    ///   truncating: ≤ 2^-23 relative per accumulation step, ~24 steps per score and ≤ 120
    ///   per output over 640 rows), so the outputs carry up to ~1.5e-5 relative error; numpy
    ///   emulation of the operand splitting alone gives 8e-7 at score spread 3. Bound 1e-4
    ///   (≥ 6× headroom); a wrong, missing or unmasked row moves an output by ~|v|/R ≥ 1e-3.
    /// * `F16` (opt-in; 11-bit operands, u = 2^-11): scores err by ~u·spread, outputs by
    ///   ~1.5e-4 at score spread 1 and ~1.6e-3 at spread 3 (numpy emulation of this
    ///   arithmetic, 12 tokens × 64 heads × 512); bound 5e-3 at spread ≤ 3. Indexing is shared
    ///   with `Split` (one template), so the tight bound above guards it.
    #[test]
    fn attention_route_matches_exact_kernel() {
        use ds4_cuda::attn_tc::AttnPrecision;
        use ds4_cuda::optest::{AttnInputs, GpuOps};
        use ds4_model::RopeParams;

        if dev().is_none() {
            return;
        }
        let g = GpuOps::new(0).expect("GpuOps");
        let mut rng = Rng(21);
        let flash = |name, ratio, has_idx, topk, pos0, n, raw_cap, qscale| AttnCase {
            name,
            nh: 64,
            hd: 512,
            n_rot: 64,
            window: 128,
            raw_cap,
            ratio,
            has_idx,
            topk,
            pos0,
            n,
            qscale,
        };
        let cases = [
            // Window only, first chunk: tokens see 1..64 rows (partial tiles).
            flash("window, first chunk", 0, false, 512, 0, 64, 192, 1.0),
            // Window only, the chunk crosses the ring wrap (slot 0 after slot 191).
            flash("window, ring wrap", 0, false, 512, 350, 64, 192, 1.0),
            // HCA: every compressed row (7..8 of them), 48 heads (a partial head block).
            AttnCase {
                nh: 48,
                ..flash(
                    "hca, compressed all, 48 heads",
                    128,
                    false,
                    512,
                    1000,
                    48,
                    176,
                    1.0,
                )
            },
            // CSA with a small top-k: the chunk crosses nv = topk (all rows, then selection).
            flash("csa, top-32 switch-on", 4, true, 32, 100, 40, 168, 1.0),
            // Flash CSA: top-512 of > 512 rows + 128 window = 640 rows, ring wrap, peaky.
            flash(
                "csa, top-512, wrap, peaky",
                4,
                true,
                512,
                2150,
                40,
                128 + 2048,
                3.0,
            ),
            // tiny's dims: 4 heads of 128, 16 RoPE dims, top-16 crossing.
            AttnCase {
                name: "tiny dims, csa top-16",
                nh: 4,
                hd: 128,
                n_rot: 16,
                window: 128,
                raw_cap: 128 + 64,
                ratio: 4,
                has_idx: true,
                topk: 16,
                pos0: 60,
                n: 24,
                qscale: 1.0,
            },
            // More (token, head block) items than SMs: every persistent CTA runs several items
            // (short and long ones, ring wrap, picks staged per item).
            flash(
                "csa, top-512, 300 tokens",
                4,
                true,
                512,
                2150,
                300,
                128 + 2048,
                1.0,
            ),
            flash("window, 300 tokens from 0", 0, false, 512, 0, 300, 428, 1.0),
            flash("hca, 300 tokens", 128, false, 512, 1000, 300, 428, 1.0),
            // flashdims: 4 heads of 512, a chunk longer than the window.
            AttnCase {
                nh: 4,
                ..flash(
                    "flashdims, hca, n > window",
                    128,
                    false,
                    16,
                    500,
                    130,
                    128 + 256,
                    1.0,
                )
            },
        ];
        for c in &cases {
            let (nh, hd, n) = (c.nh, c.hd, c.n);
            let ring = rng.vec(c.raw_cap * hd, 1.0);
            let ncomp = (c.pos0 + n).checked_div(c.ratio).map_or(1, |v| v + 3);
            let comp = rng.vec(ncomp * hd, 1.0);
            let q = rng.vec(n * nh * hd, c.qscale);
            let sinks = rng.vec(nh, 1.0);
            // Indexer picks: distinct, in random order (the kernels must not assume sorted).
            let mut isel = vec![0i32; n * c.topk];
            let mut n_sel = 0;
            for t in 0..n {
                let nv = (c.pos0 + t + 1).checked_div(c.ratio).unwrap_or(0);
                if c.has_idx && nv > c.topk {
                    n_sel += 1;
                    let mut all: Vec<i32> = (0..nv as i32).collect();
                    for i in 0..c.topk {
                        let j = i + (rng.next() % (nv - i) as u64) as usize;
                        all.swap(i, j);
                    }
                    isel[t * c.topk..(t + 1) * c.topk].copy_from_slice(&all[..c.topk]);
                }
            }
            if c.has_idx {
                assert!(n_sel > 0, "{}: no token uses the selection", c.name);
            }
            let rope = RopeParams::plain(c.n_rot, 10000.0);
            let a = AttnInputs {
                q: &q,
                ring: &ring,
                raw_cap: c.raw_cap,
                window: c.window,
                comp: &comp,
                ratio: c.ratio,
                has_indexer: c.has_idx,
                isel: &isel,
                topk: c.topk,
                sinks: &sinks,
                scale: 1.0 / (hd as f32).sqrt(),
                nh,
                hd,
                n_rot: c.n_rot,
                inv_freq: &rope.inv_freq,
                pos0: c.pos0,
                n,
            };
            let (want, _) = g.attention_timed(&a, None, 0).expect("exact attention");
            for (prec, tol) in [(AttnPrecision::Split, 1e-4f32), (AttnPrecision::F16, 5e-3)] {
                let (got, _) = g
                    .attention_timed(&a, Some(prec), 0)
                    .expect("route attention");
                check(
                    &format!("attention {} ({})", c.name, prec.name()),
                    &got,
                    &want,
                    tol,
                );
                if hd / 8 % 32 == 0 {
                    // The fused Q8_0 output (out_a's activations): the same f32 heads, and
                    // the bytes quantize_act writes for them, with or without the f32 output.
                    let (heads, act, act_only) =
                        g.attention_route_q8(&a, prec).expect("route attention q8");
                    let tag = format!("attention {} ({}) q8", c.name, prec.name());
                    assert!(
                        heads.len() == got.len() && bit_diffs(&heads, &got) == 0,
                        "{tag}: f32 heads differ from the plain route"
                    );
                    check_act_q8_0_rows(&tag, &act, &heads);
                    assert!(
                        act == act_only,
                        "{tag}: Q8_0 output differs without f32 heads"
                    );
                }
                // The Q heads' RMSNorm + RoPE fused into the route's Q load: the same bits
                // as ds4_head_norm_rope_fast followed by the route.
                let (fused, unfused) = g
                    .attention_route_qnorm(&a, prec, 1e-6)
                    .expect("route attention qnorm");
                let tag = format!("attention {} ({}) qnorm", c.name, prec.name());
                let diff = bit_diffs(&fused, &unfused);
                assert_eq!(
                    diff, 0,
                    "{tag}: {diff} outputs differ from the unfused launches"
                );
                println!("{tag}: {} outputs bit-identical", fused.len());
            }
            // Rows as the model writes them: the nope dims exact in f16 (the FP8 KV round trip
            // makes them so), except every 37th row (tiles holding one keep their hi·lo
            // products). The route skips the hi·lo products of the tiles whose rows are exact
            // in a warp's eighth of the dims; the output must be the same bits as without
            // skipping, and still match the exact kernel.
            // Then every row exact there: with head dim 512 the launch gathers compact rows
            // (hi | lo of the RoPE eighth only), same bits again.
            let n_nope = hd - c.n_rot;
            for mixed in [true, false] {
                let inexact = |r: usize| mixed && r % 37 == 5;
                let exact16 = |v: &[f32]| -> Vec<f32> {
                    let mut v = v.to_vec();
                    for (r, row) in v.chunks_mut(hd).enumerate() {
                        if !inexact(r) {
                            for x in &mut row[..n_nope] {
                                *x = ds4_quant::fp::f16_round(*x);
                            }
                        }
                    }
                    v
                };
                let (ring16, comp16) = (exact16(&ring), exact16(&comp));
                let a16 = AttnInputs {
                    ring: &ring16,
                    comp: &comp16,
                    ..a
                };
                let (want16, _) = g.attention_timed(&a16, None, 0).expect("exact attention");
                let (skip, noskip, flags, compact) = g
                    .attention_route_lo_skip(&a16, AttnPrecision::Split)
                    .expect("route attention lo skip");
                let tag = format!(
                    "attention {} (split), f16-exact nope dims{}",
                    c.name,
                    if mixed { ", every 37th row not" } else { "" }
                );
                // The flags that drive the skip: an eighth of the dims (hd / 8 wide) inside the
                // nope dims is flagged exactly where the row was rounded (random f32 values are
                // never all f16-exact), an eighth holding RoPE dims never.
                let visible = (c.pos0 + n)
                    .checked_div(c.ratio)
                    .map_or(0, |v| v.min(ncomp));
                let rows = (0..c.raw_cap).chain(c.raw_cap..c.raw_cap + visible);
                for (i, slot) in rows.enumerate() {
                    let r = if slot < c.raw_cap {
                        slot
                    } else {
                        slot - c.raw_cap
                    };
                    let want: u32 = (0..8)
                        .filter(|s| !inexact(r) && (s + 1) * hd / 8 <= n_nope)
                        .map(|s| 1u32 << s)
                        .sum();
                    assert_eq!(
                        flags[slot], want,
                        "{tag}: flags of scratch row {slot} ({i})"
                    );
                }
                assert_eq!(
                    compact,
                    hd == 512 && !mixed,
                    "{tag}: compact rows gathered or not"
                );
                check(&tag, &skip, &want16, 1e-4);
                let diff = bit_diffs(&skip, &noskip);
                assert_eq!(
                    diff, 0,
                    "{tag}: {diff} outputs differ with the zero hi·lo products skipped"
                );
                println!(
                    "{tag}: skipping zero hi·lo products{}: {} outputs bit-identical",
                    if compact { " (compact rows)" } else { "" },
                    skip.len()
                );
            }
        }
    }

    /// Compare a device Q8_0 activation layout of rows `x` (int8 values, then the f32 scales
    /// at the next 256-byte boundary) with ds4_quant's quantization: bit-identical.
    fn check_act_q8_0_rows(name: &str, act: &[u8], x: &[f32]) {
        let od = x.len().div_ceil(256) * 256;
        let want = ds4_quant::act::quantize_q8_0_act_vec(x);
        for (b, w) in want.iter().enumerate() {
            let d = f32::from_le_bytes(act[od + 4 * b..od + 4 * b + 4].try_into().unwrap());
            assert_eq!(d.to_bits(), w.d.to_bits(), "{name}: Q8_0 block {b}: d");
            let qs: Vec<i8> = act[32 * b..32 * b + 32].iter().map(|&v| v as i8).collect();
            assert_eq!(&qs[..], &w.qs[..], "{name}: Q8_0 block {b}: qs");
        }
        println!("{name}: {} Q8_0 blocks bit-identical", want.len());
    }
}
