//! GPU weight-streaming kernels (`ds4_cuda::gemv`) against the CPU reference (`ds4_quant`).
//!
//! Skipped (with a printed line) when no CUDA device is usable.
//!
//! Tolerances, and why:
//! * Quantized activations (Q8_0 act, Q8_K): **bit-identical** to `ds4_quant` (same IEEE
//!   divisions/products, round-half-even).
//! * Quantized weights (Q8_0, Q2_K, Q4_K, IQ2_XXS): `|gpu − cpu| ≤ 1e-5·(1 + |cpu|)`. Every
//!   per-block integer sum and per-block f32 term is computed exactly as on the CPU; only the
//!   order of the f32 sum over the `cols/32` (≤ 128 here) or `cols/256` block terms differs.
//!   Data are scaled so outputs and partial sums are O(1) (weights ~ N(0, 1/cols), x ~ N(0,1)):
//!   each reordered sum then differs by a few ulps of O(1) values (~1e-7 · √terms ≈ 1e-6), so
//!   1e-5 has ≥ 10× headroom, while any indexing/scale/sign error is ≥ 1e-2.
//! * F16 / BF16 (f32 accumulation in another order) and F32 (GPU f32 vs CPU f64 accumulation,
//!   4096 terms of O(1/64)): `≤ 1e-4·(1 + |cpu|)`.
//! * MoE `mid` (SwiGLU in f64 of g, u that carry the errors above): `1e-5·(1 + |cpu|)`.
//!   `moe_down` is checked on the same `mid` for GPU and CPU, so its activation quantization
//!   is bit-identical and only the block-sum order differs (same bound as matvec).
//!
//! Every check uses fresh random inputs, poisons the outputs with NaN first and fails on any
//! non-finite output.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use ds4_cuda::gemv::{Gemv, SUPPORTED};
use ds4_gguf::GgmlType;
use ds4_quant::act::{quantize_q8_0_act_vec, quantize_q8_k_vec};
use ds4_quant::{QMatrix, quantize};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.unif().max(1e-300);
        let u2 = self.unif();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

struct Dev {
    stream: Arc<CudaStream>,
    g: Gemv,
}

fn dev() -> Option<Dev> {
    match ds4_cuda::probe(0) {
        Ok(info) => eprintln!(
            "gemv tests on {} ({:?})",
            info.name, info.compute_capability
        ),
        Err(e) => {
            eprintln!("skipping GPU gemv tests: {e}");
            return None;
        }
    }
    let ctx = CudaContext::new(0).expect("context");
    let g = Gemv::new(&ctx).expect("load gemv kernels");
    Some(Dev {
        stream: ctx.default_stream(),
        g,
    })
}

fn tol_for(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1e-4,
        _ => 1e-5,
    }
}

fn nan_buf(d: &Dev, n: usize) -> CudaSlice<f32> {
    d.stream.clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn byte_buf(d: &Dev, n: usize) -> CudaSlice<u8> {
    d.stream.clone_htod(&vec![0xA5u8; n.max(1)]).unwrap()
}

/// Compare, returning the worst normalized error; panics on a violation or a non-finite value.
fn check(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0.0f32;
    for (i, (&a, &e)) in got.iter().zip(want).enumerate() {
        assert!(a.is_finite(), "{what}: output {i} is {a} (expected {e})");
        let err = (a - e).abs() / (1.0 + e.abs());
        assert!(
            err <= tol,
            "{what}: output {i}: gpu {a} cpu {e} (normalized error {err:e} > {tol:e})"
        );
        worst = worst.max(err);
    }
    worst
}

fn make_weight(rng: &mut Rng, ty: GgmlType, cols: usize, rows_total: usize) -> Vec<u8> {
    let w = rng.vec(cols * rows_total, 1.0 / (cols as f32).sqrt());
    quantize(ty, &w, cols, None).expect("quantize")
}

/// CPU reference of `Gemv::matvec` (grouped when n_mat > 1).
fn cpu_matvec(
    ty: GgmlType,
    bytes: &[u8],
    cols: usize,
    rows: usize,
    n_mat: usize,
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let q = QMatrix::new(ty, cols, rows * n_mat, bytes).unwrap();
    let mut y = vec![0.0f32; n * rows * n_mat];
    for t in 0..n {
        for m in 0..n_mat {
            let sub = q.sub_rows(m * rows, rows).unwrap();
            let xs = &x[(t * n_mat + m) * cols..(t * n_mat + m + 1) * cols];
            let o = (t * n_mat + m) * rows;
            sub.matvec(xs, &mut y[o..o + rows]).unwrap();
        }
    }
    y
}

/// Parse the device activation layout (see gemv.rs) back into ds4_quant blocks and compare.
fn check_act(ty: GgmlType, act: &[u8], x: &[f32], n: usize, cols: usize) {
    let e = n * cols;
    let a256 = |v: usize| v.div_ceil(256) * 256;
    match ty {
        GgmlType::Q8_0 => {
            let want = quantize_q8_0_act_vec(x);
            let od = a256(e);
            for (b, w) in want.iter().enumerate() {
                let d = f32::from_le_bytes(act[od + 4 * b..od + 4 * b + 4].try_into().unwrap());
                assert_eq!(d.to_bits(), w.d.to_bits(), "Q8_0 act block {b}: d");
                let qs: Vec<i8> = act[32 * b..32 * b + 32].iter().map(|&v| v as i8).collect();
                assert_eq!(&qs[..], &w.qs[..], "Q8_0 act block {b}: qs");
            }
        }
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
            let want = quantize_q8_k_vec(x);
            let od = a256(e);
            let ob = a256(od + 4 * (e / 256));
            for (b, w) in want.iter().enumerate() {
                let d = f32::from_le_bytes(act[od + 4 * b..od + 4 * b + 4].try_into().unwrap());
                assert_eq!(d.to_bits(), w.d.to_bits(), "Q8_K block {b}: d");
                let qs: Vec<i8> = act[256 * b..256 * b + 256]
                    .iter()
                    .map(|&v| v as i8)
                    .collect();
                assert_eq!(&qs[..], &w.qs[..], "Q8_K block {b}: qs");
                for g in 0..16 {
                    let o = ob + 2 * (16 * b + g);
                    let s = i16::from_le_bytes([act[o], act[o + 1]]);
                    assert_eq!(s, w.bsums[g], "Q8_K block {b}: bsums[{g}]");
                }
            }
        }
        _ => {}
    }
}

#[test]
fn activation_quantization_is_bit_identical() {
    let Some(d) = dev() else { return };
    let mut rng = Rng(1);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K] {
        for &(n, cols) in &[(1usize, 4096usize), (3, 2048), (5, 256)] {
            let mut x = rng.vec(n * cols, 1.0);
            // Edge cases: ties, an all-zero block, equal |max| with both signs, huge/small values.
            x[0] = 0.5;
            x[1] = -0.5;
            for v in &mut x[256..512.min(n * cols)] {
                *v = 0.0;
            }
            if n * cols > 1024 {
                x[600] = 7.0;
                x[601] = -7.0;
                x[700] = 1e-30;
                x[900] = 3e4;
            }
            let dx = d.stream.clone_htod(&x).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
            d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
                .unwrap();
            let host = d.stream.clone_dtoh(&act).unwrap();
            check_act(ty, &host, &x, n, cols);
        }
    }
}

/// Shapes per type: (cols, rows, n_mat).
fn shapes(ty: GgmlType) -> Vec<(usize, usize, usize)> {
    match ty {
        GgmlType::Q8_0 => vec![(4096, 300, 1), (1056, 129, 1), (512, 64, 8), (96, 17, 1)],
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
            vec![(4096, 100, 1), (768, 65, 1), (512, 32, 4), (2304, 40, 1)]
        }
        GgmlType::F16 | GgmlType::BF16 => vec![(4096, 200, 1), (264, 33, 1), (512, 16, 4)],
        _ => vec![(4096, 100, 1), (132, 17, 1), (256, 8, 3)],
    }
}

#[test]
fn matvec_matches_cpu_for_every_type() {
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(2);
    for ty in SUPPORTED {
        let mut worst = 0.0f32;
        for (cols, rows, n_mat) in shapes(ty) {
            let bytes = make_weight(&mut rng, ty, cols, rows * n_mat);
            let w =
                d.g.upload(&d.stream, ty, cols, rows, n_mat, &bytes)
                    .unwrap();
            for &n in &[1usize, 2, 3, 5, 8, 11] {
                for split in [0u32, 1, 8] {
                    d.g.tuning.force_split = split;
                    let cx = cols * n_mat;
                    let x = rng.vec(n * cx, 1.0);
                    let dx = d.stream.clone_htod(&x).unwrap();
                    let mut act = byte_buf(&d, Gemv::act_bytes(ty, cx, n));
                    let mut y = nan_buf(&d, n * rows * n_mat);
                    d.g.matvec_x(&d.stream, &w, &dx, &mut act, n, &mut y)
                        .unwrap();
                    let got = d.stream.clone_dtoh(&y).unwrap();
                    let want = cpu_matvec(ty, &bytes, cols, rows, n_mat, &x, n);
                    let what = format!("{ty:?} {cols}x{rows}x{n_mat} n={n} split={split}");
                    worst = worst.max(check(&what, &got, &want, tol_for(ty)));
                    if split == 0 && n == 3 {
                        let host = d.stream.clone_dtoh(&act).unwrap();
                        check_act(ty, &host, &x, n, cx);
                    }
                }
            }
        }
        d.g.tuning.force_split = 0;
        eprintln!("matvec {ty:?}: worst normalized error {worst:e}");
    }
}

/// CPU SwiGLU exactly as `ds4_model::ops::swiglu`.
fn swiglu(g: f32, u: f32, clamp: f32, w: f32) -> f32 {
    let (g, u) = if clamp > 1e-6 {
        (g.min(clamp), u.clamp(-clamp, clamp))
    } else {
        (g, u)
    };
    let gd = g as f64;
    let silu = gd / (1.0 + (-gd).exp());
    (silu * u as f64 * w as f64) as f32
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
fn moe_matches_cpu() {
    let Some(d) = dev() else { return };
    let mut rng = Rng(3);
    // (gate/up type, down type)
    let combos = [
        (GgmlType::IQ2_XXS, GgmlType::Q2_K),
        (GgmlType::Q4_K, GgmlType::Q4_K),
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::F16, GgmlType::F32),
    ];
    let (e_dim, ff, n_mat, k) = (1024usize, 512usize, 12usize, 6usize);
    for (tg, td) in combos {
        let gate_b = make_weight(&mut rng, tg, e_dim, ff * n_mat);
        let up_b = make_weight(&mut rng, tg, e_dim, ff * n_mat);
        let down_b = make_weight(&mut rng, td, ff, e_dim * n_mat);
        let gate =
            d.g.upload(&d.stream, tg, e_dim, ff, n_mat, &gate_b)
                .unwrap();
        let up = d.g.upload(&d.stream, tg, e_dim, ff, n_mat, &up_b).unwrap();
        let down =
            d.g.upload(&d.stream, td, ff, e_dim, n_mat, &down_b)
                .unwrap();
        let qg = QMatrix::new(tg, e_dim, ff * n_mat, &gate_b).unwrap();
        let qu = QMatrix::new(tg, e_dim, ff * n_mat, &up_b).unwrap();
        let qd = QMatrix::new(td, ff, e_dim * n_mat, &down_b).unwrap();
        let (mut wg, mut wd) = (0.0f32, 0.0f32);
        for &(n, clamp) in &[(1usize, 10.0f32), (3, 10.0), (2, 0.0), (1, 0.05)] {
            // x scaled up so that the clamp is active for some rows.
            let x = rng.vec(n * e_dim, 3.0);
            let ids = pick_ids(&mut rng, n, k, n_mat);
            let wts: Vec<f32> = (0..n * k).map(|_| rng.unif() as f32 * 0.5 + 0.05).collect();
            let dx = d.stream.clone_htod(&x).unwrap();
            let dids = d.stream.clone_htod(&ids).unwrap();
            let dw = d.stream.clone_htod(&wts).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(tg, e_dim, n));
            d.g.quantize_act(&d.stream, tg, &dx, n, e_dim, &mut act)
                .unwrap();
            let mut mid = nan_buf(&d, n * k * ff);
            d.g.moe_gate_up(
                &d.stream, &gate, &up, &dx, &act, &dids, &dw, n, k, clamp, &mut mid,
            )
            .unwrap();
            let got_mid = d.stream.clone_dtoh(&mid).unwrap();
            // CPU mid
            let mut want_mid = vec![0.0f32; n * k * ff];
            for t in 0..n {
                let xs = &x[t * e_dim..(t + 1) * e_dim];
                for j in 0..k {
                    let e = ids[t * k + j] as usize;
                    let mut g = vec![0.0f32; ff];
                    let mut u = vec![0.0f32; ff];
                    qg.sub_rows(e * ff, ff).unwrap().matvec(xs, &mut g).unwrap();
                    qu.sub_rows(e * ff, ff).unwrap().matvec(xs, &mut u).unwrap();
                    for r in 0..ff {
                        want_mid[(t * k + j) * ff + r] = swiglu(g[r], u[r], clamp, wts[t * k + j]);
                    }
                }
            }
            let what = format!("moe_gate_up {tg:?} n={n} clamp={clamp}");
            wg = wg.max(check(&what, &got_mid, &want_mid, tol_for(tg).max(1e-5)));

            // Down on the GPU's mid, for both sides.
            let mut mid_act = byte_buf(&d, Gemv::act_bytes(td, ff, n * k));
            let mut out = nan_buf(&d, n * e_dim);
            d.g.moe_down(&d.stream, &down, &mid, &mut mid_act, &dids, n, k, &mut out)
                .unwrap();
            let got = d.stream.clone_dtoh(&out).unwrap();
            let host_act = d.stream.clone_dtoh(&mid_act).unwrap();
            check_act(td, &host_act, &got_mid, n * k, ff);
            let mut want = vec![0.0f32; n * e_dim];
            for t in 0..n {
                let mut acc = vec![0.0f64; e_dim];
                for j in 0..k {
                    let e = ids[t * k + j] as usize;
                    let mut o = vec![0.0f32; e_dim];
                    let m = &got_mid[(t * k + j) * ff..(t * k + j + 1) * ff];
                    qd.sub_rows(e * e_dim, e_dim)
                        .unwrap()
                        .matvec(m, &mut o)
                        .unwrap();
                    for (a, v) in acc.iter_mut().zip(&o) {
                        *a += *v as f64;
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    want[t * e_dim + r] = *a as f32;
                }
            }
            let what = format!("moe_down {td:?} n={n}");
            wd = wd.max(check(&what, &got, &want, tol_for(td)));
        }
        eprintln!("moe {tg:?}/{td:?}: worst gate_up {wg:e}, down {wd:e}");
    }
}

#[test]
fn shared_gate_up_swiglu_matches_cpu() {
    let Some(d) = dev() else { return };
    let mut rng = Rng(4);
    let (cols, rows) = (1024usize, 384usize);
    let ty = GgmlType::Q8_0;
    let gb = make_weight(&mut rng, ty, cols, rows);
    let ub = make_weight(&mut rng, ty, cols, rows);
    let gate = d.g.upload(&d.stream, ty, cols, rows, 1, &gb).unwrap();
    let up = d.g.upload(&d.stream, ty, cols, rows, 1, &ub).unwrap();
    for n in [1usize, 4] {
        let x = rng.vec(n * cols, 3.0);
        let dx = d.stream.clone_htod(&x).unwrap();
        let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
        d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
            .unwrap();
        let mut mid = nan_buf(&d, n * rows);
        d.g.gate_up_swiglu(&d.stream, &gate, &up, &dx, &act, n, 10.0, &mut mid)
            .unwrap();
        let got = d.stream.clone_dtoh(&mid).unwrap();
        let g = cpu_matvec(ty, &gb, cols, rows, 1, &x, n);
        let u = cpu_matvec(ty, &ub, cols, rows, 1, &x, n);
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| swiglu(g, u, 10.0, 1.0))
            .collect();
        check(&format!("gate_up_swiglu n={n}"), &got, &want, 1e-5);
    }
}

#[test]
fn bad_expert_ids_give_nan_not_garbage() {
    let Some(d) = dev() else { return };
    let mut rng = Rng(5);
    let ty = GgmlType::Q4_K;
    let (cols, rows, n_mat) = (256usize, 64usize, 4usize);
    let b = make_weight(&mut rng, ty, cols, rows * n_mat);
    let w = d.g.upload(&d.stream, ty, cols, rows, n_mat, &b).unwrap();
    let x = rng.vec(cols, 1.0);
    let dx = d.stream.clone_htod(&x).unwrap();
    let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, 1));
    d.g.quantize_act(&d.stream, ty, &dx, 1, cols, &mut act)
        .unwrap();
    let ids = d.stream.clone_htod(&[0i32, 7]).unwrap();
    let wts = d.stream.clone_htod(&[0.5f32, 0.5]).unwrap();
    let mut mid = d.stream.clone_htod(&vec![0.0f32; 2 * rows]).unwrap();
    d.g.moe_gate_up(
        &d.stream, &w, &w, &dx, &act, &ids, &wts, 1, 2, 10.0, &mut mid,
    )
    .unwrap();
    let m = d.stream.clone_dtoh(&mid).unwrap();
    assert!(m[..rows].iter().all(|v| v.is_finite()));
    assert!(m[rows..].iter().all(|v| v.is_nan()));
    // Host-side argument checks.
    let mut short = d.stream.clone_htod(&vec![0.0f32; rows - 1]).unwrap();
    assert!(d.g.matvec(&d.stream, &w, &dx, &act, 1, &mut short).is_err());
    assert!(
        d.g.upload(&d.stream, ty, cols, rows, n_mat, &b[1..])
            .is_err()
    );
    assert!(
        d.g.upload(&d.stream, GgmlType::Q5_K, cols, rows, 1, &b)
            .is_err()
    );
}
