//! GPU weight-streaming kernels (`ds4_cuda::gemv`) against the CPU reference's dot products.
//!
//! Skipped (with a printed line) when no CUDA device is usable.
//!
//! The contract (see `src/gemv.rs`, shared with `ds4_quant`): exact integer block sums, per-block
//! f64 terms with fixed products (`((f64)wd·(f64)xd)·isum`, `dall·isum − dm·summs`, IQ2_XXS
//! `0.125·Σ`), exact f64 products for float weights, every sum in f64, one rounding to f32. The
//! expected values are `ds4_quant`'s activation quantizers and scalar (oracle) dot products
//! (`row_dot`), i.e. what the CPU backend computes.
//!
//! Tolerances, and why:
//! * Quantized activations (Q8_0 act, Q8_K): **bit-identical** to `ds4_quant`.
//! * Every matvec / MoE output: within **1 ulp** of f32 of the CPU reference, and **≥ 99.9 %
//!   bit-identical** per type. All products are identical on both sides; only the order of the
//!   f64 sums differs (≤ ~1e-16 relative), which changes the f32 rounding only when the exact
//!   sum lies that close to a rounding boundary (probability ~1e-8 per output). Any indexing,
//!   scale, sign or precision error (an f32 accumulation, a fused multiply-add in a term) shows
//!   up as many-ulp differences or far more than 0.1 % inexact outputs.
//! * MoE `mid` (SwiGLU in f64 of the f32 g, u): same bounds (the f64 `exp` of CUDA and of Rust's
//!   libm may differ in the last f64 bit, again a ~1e-8 effect after rounding to f32).
//!   `moe_down` is checked on the GPU's `mid` for both sides (its quantization is checked
//!   bit-identical), `out = (f32) Σ_j (f64)(f32) Σ_b term`: each expert's row rounded to f32
//!   as the CPU's per-expert matvec does, the slots summed in f64.
//!
//! Every check uses fresh random inputs, poisons the outputs with NaN first and fails on any
//! non-finite output.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use ds4_cuda::gemv::{Gemv, SUPPORTED};
use ds4_gguf::GgmlType;
use ds4_quant::act::{quantize_q8_0_act_vec, quantize_q8_k_vec};
use ds4_quant::dot::SCALAR;
use ds4_quant::{
    BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K, blocks_from_bytes,
};

mod common;
use common::{Rng, make_weight, upload_random};

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

fn nan_buf(d: &Dev, n: usize) -> CudaSlice<f32> {
    d.stream.clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn byte_buf(d: &Dev, n: usize) -> CudaSlice<u8> {
    d.stream.clone_htod(&vec![0xA5u8; n.max(1)]).unwrap()
}

/// Monotonic integer image of a finite f32 (adjacent floats differ by 1; ±0 map to 0).
fn ord(v: f32) -> i64 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        -((b & 0x7fff_ffff) as i64)
    } else {
        b as i64
    }
}

/// Counts of compared outputs: total, bit-identical.
#[derive(Default)]
struct Tally {
    n: usize,
    exact: usize,
}

impl Tally {
    /// Every output finite and within 1 ulp of the CPU model; counts the bit-identical ones.
    fn add(&mut self, what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (&a, &e)) in got.iter().zip(want).enumerate() {
            assert!(a.is_finite(), "{what}: output {i} is {a} (expected {e})");
            assert!(e.is_finite(), "{what}: CPU output {i} is {e}");
            let d = (ord(a) - ord(e)).abs();
            assert!(
                d <= 1,
                "{what}: output {i}: gpu {a:e} cpu {e:e} differ by {d} ulp (> 1)"
            );
            self.n += 1;
            self.exact += (d == 0) as usize;
        }
    }

    /// At least 99.9 % of the outputs bit-identical.
    fn finish(&self, what: &str) {
        eprintln!(
            "{what}: {} of {} outputs bit-identical, the rest within 1 ulp",
            self.exact, self.n
        );
        assert!(self.n > 0, "{what}: nothing compared");
        assert!(
            self.exact as f64 >= 0.999 * self.n as f64,
            "{what}: only {} of {} outputs bit-identical (< 99.9 %)",
            self.exact,
            self.n
        );
    }
}

/// One token's activation as the CPU prepares it for a weight type.
enum Act {
    Q8_0(Vec<BlockQ8_0Act>),
    Q8K(Vec<BlockQ8K>),
    Float(Vec<f32>),
}

fn prep(ty: GgmlType, x: &[f32]) -> Act {
    match ty {
        GgmlType::Q8_0 => Act::Q8_0(quantize_q8_0_act_vec(x)),
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => Act::Q8K(quantize_q8_k_vec(x)),
        _ => Act::Float(x.to_vec()),
    }
}

/// The CPU reference's result for one GGUF weight row times `a`: `ds4_quant`'s scalar (oracle)
/// dot product of that type, which implements the numerics contract (f64 terms and sums, one
/// rounding to f32, the type's scale included).
fn row_dot(ty: GgmlType, row: &[u8], a: &Act) -> f32 {
    let k = &SCALAR;
    let halves = || -> Vec<u16> {
        row.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    match (ty, a) {
        (GgmlType::Q8_0, Act::Q8_0(x)) => {
            (k.q8_0)(&blocks_from_bytes::<BlockQ8_0>(row).unwrap(), x)
        }
        (GgmlType::Q2_K, Act::Q8K(y)) => (k.q2_k)(&blocks_from_bytes::<BlockQ2K>(row).unwrap(), y),
        (GgmlType::Q4_K, Act::Q8K(y)) => (k.q4_k)(&blocks_from_bytes::<BlockQ4K>(row).unwrap(), y),
        (GgmlType::IQ2_XXS, Act::Q8K(y)) => {
            (k.iq2_xxs)(&blocks_from_bytes::<BlockIq2Xxs>(row).unwrap(), y)
        }
        (GgmlType::F32, Act::Float(x)) => {
            let w: Vec<f32> = row
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.f32)(&w, x)
        }
        (GgmlType::F16, Act::Float(x)) => (k.f16)(&halves(), x),
        (GgmlType::BF16, Act::Float(x)) => (k.bf16)(&halves(), x),
        _ => panic!("row_dot: {ty:?} with the wrong activation kind"),
    }
}

/// GGUF bytes of one row of `cols` values.
fn row_bytes(ty: GgmlType, cols: usize) -> usize {
    ds4_cuda::gemv::gguf_bytes(ty, cols, 1, 1).unwrap()
}

/// `n_mat` random expert matrices of `rows` × `cols`: their GGUF bytes and the device upload.
fn make_experts(
    d: &Dev,
    rng: &mut Rng,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    n_mat: usize,
) -> (Vec<u8>, ds4_cuda::gemv::DevWeight) {
    upload_random(&d.g, &d.stream, rng, ty, cols, rows, n_mat)
}

/// CPU model of `Gemv::matvec` (grouped when n_mat > 1).
fn cpu_matvec(
    ty: GgmlType,
    bytes: &[u8],
    cols: usize,
    rows: usize,
    n_mat: usize,
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let rb = row_bytes(ty, cols);
    let mut y = vec![0.0f32; n * rows * n_mat];
    for t in 0..n {
        for m in 0..n_mat {
            let xs = &x[(t * n_mat + m) * cols..(t * n_mat + m + 1) * cols];
            let a = prep(ty, xs);
            for r in 0..rows {
                let rr = m * rows + r;
                y[t * rows * n_mat + rr] = row_dot(ty, &bytes[rr * rb..(rr + 1) * rb], &a);
            }
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
        GgmlType::Q8_0 => vec![
            (4096, 300, 1),
            (1056, 129, 1),
            (512, 64, 8),
            (96, 17, 1),
            (8192, 40, 1),
            (544, 63, 3),
        ],
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => vec![
            (4096, 100, 1),
            (768, 65, 1),
            (512, 32, 4),
            (2304, 40, 1),
            (256, 30, 3),
        ],
        GgmlType::F16 | GgmlType::BF16 => vec![
            (4096, 200, 1),
            (264, 33, 1),
            (512, 16, 4),
            (16384, 24, 1),
            (520, 7, 3),
        ],
        _ => vec![(4096, 100, 1), (132, 17, 1), (256, 8, 3), (2052, 9, 2)],
    }
}

#[test]
fn matvec_matches_cpu_for_every_type() {
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(2);
    for ty in SUPPORTED {
        let mut tally = Tally::default();
        for (cols, rows, n_mat) in shapes(ty) {
            let bytes = make_weight(&mut rng, ty, cols, rows * n_mat);
            let w =
                d.g.upload(&d.stream, ty, cols, rows, n_mat, &bytes)
                    .unwrap();
            for &n in &[1usize, 2, 3, 5, 8, 11] {
                let cx = cols * n_mat;
                let x = rng.vec(n * cx, 1.0);
                let dx = d.stream.clone_htod(&x).unwrap();
                let want = cpu_matvec(ty, &bytes, cols, rows, n_mat, &x, n);
                // Every tile shape of the first pass's bucket, with automatic and forced splits.
                let tiles = Gemv::dense_tile_shapes(ty, n).len() as u32;
                for (tile, split) in (0..=tiles).flat_map(|t| [0u32, 1, 2, 8].map(|s| (t, s))) {
                    d.g.tuning.force_split = split;
                    d.g.tuning.force_tile = tile;
                    let mut act = byte_buf(&d, Gemv::act_bytes(ty, cx, n));
                    let mut y = nan_buf(&d, n * rows * n_mat);
                    d.g.matvec_x(&d.stream, &w, &dx, &mut act, n, &mut y)
                        .unwrap();
                    let got = d.stream.clone_dtoh(&y).unwrap();
                    let what =
                        format!("{ty:?} {cols}x{rows}x{n_mat} n={n} tile={tile} split={split}");
                    tally.add(&what, &got, &want);
                    if split == 0 && tile == 0 && n == 3 {
                        let host = d.stream.clone_dtoh(&act).unwrap();
                        check_act(ty, &host, &x, n, cx);
                    }
                }
            }
        }
        d.g.tuning.force_split = 0;
        d.g.tuning.force_tile = 0;
        tally.finish(&format!("matvec {ty:?}"));
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

/// The CPU's routed gate/up + SwiGLU rows `mid[t][j][r]` for `n` tokens `x` (`cols` each),
/// `k` expert ids per token into `gate_b` / `up_b` (`rows` rows per expert); a slot whose id
/// names no expert keeps 0.
#[allow(clippy::too_many_arguments)]
fn cpu_gate_up_mid(
    ty: GgmlType,
    gate_b: &[u8],
    up_b: &[u8],
    cols: usize,
    rows: usize,
    x: &[f32],
    ids: &[i32],
    wts: &[f32],
    k: usize,
    clamp: f32,
) -> Vec<f32> {
    let rb = row_bytes(ty, cols);
    let n_mat = gate_b.len() / (rb * rows);
    let n = x.len() / cols;
    let mut mid = vec![0.0f32; n * k * rows];
    for t in 0..n {
        let a = prep(ty, &x[t * cols..(t + 1) * cols]);
        for j in 0..k {
            let e = ids[t * k + j];
            if e < 0 || e as usize >= n_mat {
                continue;
            }
            for r in 0..rows {
                let rr = e as usize * rows + r;
                let g = row_dot(ty, &gate_b[rr * rb..(rr + 1) * rb], &a);
                let u = row_dot(ty, &up_b[rr * rb..(rr + 1) * rb], &a);
                mid[(t * k + j) * rows + r] = swiglu(g, u, clamp, wts[t * k + j]);
            }
        }
    }
    mid
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
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(3);
    // (gate/up type, down type): every type on both sides.
    let combos = [
        (GgmlType::IQ2_XXS, GgmlType::Q2_K),
        (GgmlType::Q4_K, GgmlType::Q4_K),
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::F16, GgmlType::F32),
        (GgmlType::Q2_K, GgmlType::IQ2_XXS),
        (GgmlType::BF16, GgmlType::F16),
        (GgmlType::F32, GgmlType::BF16),
    ];
    let (e_dim, ff, n_mat, k) = (1024usize, 512usize, 12usize, 6usize);
    let (mut tg_all, mut td_all) = (Tally::default(), Tally::default());
    for (tg, td) in combos {
        let (gate_b, gate) = make_experts(&d, &mut rng, tg, e_dim, ff, n_mat);
        let (up_b, up) = make_experts(&d, &mut rng, tg, e_dim, ff, n_mat);
        let (down_b, down) = make_experts(&d, &mut rng, td, ff, e_dim, n_mat);
        let rbd = row_bytes(td, ff);
        let (mut tgu, mut tdn) = (Tally::default(), Tally::default());
        for &(n, kk, clamp) in &[
            (1usize, k, 10.0f32),
            (3, k, 10.0),
            (2, k, 0.0),
            (1, k, 0.05),
            (2, 8, 10.0),
            (3, 1, 10.0),
        ] {
            // x scaled up so that the clamp is active for some rows.
            let x = rng.vec(n * e_dim, 3.0);
            let ids = pick_ids(&mut rng, n, kk, n_mat);
            let wts: Vec<f32> = (0..n * kk)
                .map(|_| rng.unif() as f32 * 0.5 + 0.05)
                .collect();
            let dx = d.stream.clone_htod(&x).unwrap();
            let dids = d.stream.clone_htod(&ids).unwrap();
            let dw = d.stream.clone_htod(&wts).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(tg, e_dim, n));
            d.g.quantize_act(&d.stream, tg, &dx, n, e_dim, &mut act)
                .unwrap();
            // Every kernel variant (the default last: its mid feeds the down check).
            let mut mids = Vec::new();
            let mut mid = nan_buf(&d, n * kk * ff);
            for gv in [1u32, 0] {
                d.g.tuning.gate_up_variant = gv;
                mid = nan_buf(&d, n * kk * ff);
                d.g.moe_gate_up(
                    &d.stream, &gate, &up, &dx, &act, &dids, &dw, n, kk, clamp, &mut mid,
                )
                .unwrap();
                mids.push((gv, d.stream.clone_dtoh(&mid).unwrap()));
            }
            let got_mid = mids.last().unwrap().1.clone();
            let want_mid =
                cpu_gate_up_mid(tg, &gate_b, &up_b, e_dim, ff, &x, &ids, &wts, kk, clamp);
            for (gv, m) in &mids {
                let what = format!("moe_gate_up {tg:?} n={n} k={kk} clamp={clamp} variant={gv}");
                tgu.add(&what, m, &want_mid);
            }

            // Down on the GPU's mid, for both sides.
            let mut want = vec![0.0f32; n * e_dim];
            for t in 0..n {
                let acts: Vec<Act> = (0..kk)
                    .map(|j| prep(td, &got_mid[(t * kk + j) * ff..(t * kk + j + 1) * ff]))
                    .collect();
                for r in 0..e_dim {
                    let mut acc = 0.0f64;
                    for (j, a) in acts.iter().enumerate() {
                        let rr = ids[t * kk + j] as usize * e_dim + r;
                        // Each expert's row result is an f32 (the CPU's per-expert matvec).
                        acc += row_dot(td, &down_b[rr * rbd..(rr + 1) * rbd], a) as f64;
                    }
                    want[t * e_dim + r] = acc as f32;
                }
            }
            // Automatic and forced splits of the (slot, step) sequence.
            for (dv, ds) in [0u32, 1]
                .into_iter()
                .flat_map(|v| [0u32, 1, 3, 8].map(|s| (v, s)))
            {
                d.g.tuning.down_variant = dv;
                d.g.tuning.down_split = ds;
                let mut mid_act = byte_buf(&d, Gemv::act_bytes(td, ff, n * kk));
                let mut out = nan_buf(&d, n * e_dim);
                d.g.moe_down(&d.stream, &down, &mid, &mut mid_act, &dids, n, kk, &mut out)
                    .unwrap();
                let got = d.stream.clone_dtoh(&out).unwrap();
                if ds == 0 {
                    let host_act = d.stream.clone_dtoh(&mid_act).unwrap();
                    check_act(td, &host_act, &got_mid, n * kk, ff);
                }
                let what = format!("moe_down {td:?} n={n} k={kk} variant={dv} split={ds}");
                tdn.add(&what, &got, &want);
            }
            d.g.tuning.down_split = 0;
            d.g.tuning.down_variant = 0;
        }
        tgu.finish(&format!("moe_gate_up {tg:?}"));
        tdn.finish(&format!("moe_down {td:?}"));
        tg_all.n += tgu.n;
        tg_all.exact += tgu.exact;
        td_all.n += tdn.n;
        td_all.exact += tdn.exact;
    }
    tg_all.finish("moe_gate_up, all types");
    td_all.finish("moe_down, all types");
}

#[test]
fn shared_gate_up_swiglu_matches_cpu() {
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(4);
    // 381 rows: the last tile of (gate, up) pairs is partial.
    let (cols, rows) = (1024usize, 381usize);
    let mut tally = Tally::default();
    for ty in SUPPORTED {
        let gb = make_weight(&mut rng, ty, cols, rows);
        let ub = make_weight(&mut rng, ty, cols, rows);
        let gate = d.g.upload(&d.stream, ty, cols, rows, 1, &gb).unwrap();
        let up = d.g.upload(&d.stream, ty, cols, rows, 1, &ub).unwrap();
        for n in [1usize, 3, 9] {
            let x = rng.vec(n * cols, 3.0);
            let dx = d.stream.clone_htod(&x).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
            d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
                .unwrap();
            let g = cpu_matvec(ty, &gb, cols, rows, 1, &x, n);
            let u = cpu_matvec(ty, &ub, cols, rows, 1, &x, n);
            let want: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| swiglu(g, u, 10.0, 1.0))
                .collect();
            for (tile, split) in (0..=2u32).flat_map(|t| [0u32, 1, 8].map(|s| (t, s))) {
                d.g.tuning.force_tile = tile;
                d.g.tuning.force_split = split;
                let mut mid = nan_buf(&d, n * rows);
                d.g.gate_up_swiglu(&d.stream, &gate, &up, &dx, &act, n, 10.0, &mut mid)
                    .unwrap();
                let got = d.stream.clone_dtoh(&mid).unwrap();
                let what = format!("gate_up_swiglu {ty:?} n={n} tile={tile} split={split}");
                tally.add(&what, &got, &want);
            }
        }
    }
    d.g.tuning.force_tile = 0;
    d.g.tuning.force_split = 0;
    tally.finish("gate_up_swiglu");
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
    // moe_down: token 0 has a bad id (all its outputs NaN), token 1 is fine.
    let down = d.g.upload(&d.stream, ty, cols, rows, n_mat, &b).unwrap();
    let ids2 = d.stream.clone_htod(&[0i32, 7, 1, 2]).unwrap();
    let midx = d.stream.clone_htod(&rng.vec(4 * cols, 1.0)).unwrap();
    let mut mid_act = byte_buf(&d, Gemv::act_bytes(ty, cols, 4));
    let mut out = d.stream.clone_htod(&vec![0.0f32; 2 * rows]).unwrap();
    d.g.moe_down(&d.stream, &down, &midx, &mut mid_act, &ids2, 2, 2, &mut out)
        .unwrap();
    let o = d.stream.clone_dtoh(&out).unwrap();
    assert!(o[..rows].iter().all(|v| v.is_nan()));
    assert!(o[rows..].iter().all(|v| v.is_finite()));
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

/// The IQ2_XXS routed gate/up kernels (both variants) on shapes the Flash ones do not reach: an
/// odd number of block scales per matrix, a partial second warp step (17 blocks a row), rows
/// not a multiple of the tile, more units than warps, and a bad expert id (NaN rows).
#[test]
fn iq2_gate_up_odd_shapes_every_variant() {
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(11);
    let ty = GgmlType::IQ2_XXS;
    for &(cols, rows, n_mat, n, k) in &[
        (768usize, 5usize, 3usize, 3usize, 2usize),
        (4352, 7, 5, 2, 3),
        (256, 1, 2, 2, 1),
        (2048, 3, 9, 4, 3),
    ] {
        let (gate_b, gate) = make_experts(&d, &mut rng, ty, cols, rows, n_mat);
        let (up_b, up) = make_experts(&d, &mut rng, ty, cols, rows, n_mat);
        let x = rng.vec(n * cols, 3.0);
        let mut ids = pick_ids(&mut rng, n, k, n_mat);
        // The last slot of the last token names no expert.
        *ids.last_mut().unwrap() = n_mat as i32;
        let wts: Vec<f32> = (0..n * k).map(|_| rng.unif() as f32 * 0.5 + 0.05).collect();
        let dx = d.stream.clone_htod(&x).unwrap();
        let dids = d.stream.clone_htod(&ids).unwrap();
        let dw = d.stream.clone_htod(&wts).unwrap();
        let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
        d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
            .unwrap();
        let want = cpu_gate_up_mid(ty, &gate_b, &up_b, cols, rows, &x, &ids, &wts, k, 10.0);
        let bad = (n * k - 1) * rows;
        for gv in [0u32, 1] {
            d.g.tuning.gate_up_variant = gv;
            let mut mid = nan_buf(&d, n * k * rows);
            d.g.moe_gate_up(
                &d.stream, &gate, &up, &dx, &act, &dids, &dw, n, k, 10.0, &mut mid,
            )
            .unwrap();
            let got = d.stream.clone_dtoh(&mid).unwrap();
            let what = format!("iq2 gate/up {cols}x{rows}x{n_mat} n={n} k={k} variant={gv}");
            assert!(
                got[bad..].iter().all(|v| v.is_nan()),
                "{what}: the bad id's rows"
            );
            let mut tally = Tally::default();
            tally.add(&what, &got[..bad], &want[..bad]);
            tally.finish(&what);
        }
        d.g.tuning.gate_up_variant = 0;
    }
}

/// Q8_0 activations at chunk sizes (a 2048-token prefill chunk of the 4096- and 16384-wide
/// inputs) and at block counts that are not a multiple of the kernel's four blocks per warp
/// step: bit-identical to `ds4_quant`.
#[test]
fn q8_0_activation_chunk_shapes_are_bit_identical() {
    let Some(d) = dev() else { return };
    let mut rng = Rng(7);
    let ty = GgmlType::Q8_0;
    for &(n, cols) in &[
        (2048usize, 4096usize),
        (2048, 16384),
        (7, 96),
        (1, 32),
        (3, 160),
    ] {
        let mut x = rng.vec(n * cols, 1.0);
        x[0] = 0.5;
        x[1] = -0.5;
        for v in &mut x[32..64.min(n * cols)] {
            *v = 0.0;
        }
        let dx = d.stream.clone_htod(&x).unwrap();
        let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
        d.g.quantize_act(&d.stream, ty, &dx, n, cols, &mut act)
            .unwrap();
        let host = d.stream.clone_dtoh(&act).unwrap();
        check_act(ty, &host, &x, n, cols);
    }
}

/// Stacked projections (`Gemv::upload_stacked`, what the CUDA backend's decode step uses for
/// the projections of one activation): a row-range view gives bit for bit the matvec of its
/// matrix uploaded alone (same shape: same plan, same order of every f64 sum), and the matvec
/// of the whole stack gives bit for bit the separate matvecs, in consecutive rows, under every
/// forced (tile, split). Under the automatic plan the stack may split differently (a longer
/// matrix): its outputs are then checked like the CPU comparison (≤ 1 ulp, ≥ 99.9 %
/// bit-identical). No weight is held twice: the views share the stack's allocation.
#[test]
fn stacked_views_match_separate_matvecs() {
    let Some(mut d) = dev() else { return };
    let mut rng = Rng(7);
    // (type, cols, rows of the parts): each keeps every view's regions 256-byte aligned.
    let cases: [(GgmlType, usize, &[usize]); 8] = [
        (GgmlType::Q8_0, 4096, &[40, 24, 64, 7]),
        (GgmlType::Q8_0, 1024, &[12, 8, 20]),
        (GgmlType::F16, 4096, &[64, 32, 8, 3]),
        (GgmlType::BF16, 512, &[16, 9]),
        (GgmlType::F32, 4096, &[10, 6]),
        (GgmlType::Q2_K, 4096, &[8, 4, 12]),
        (GgmlType::Q4_K, 4096, &[5, 3, 9]),
        (GgmlType::IQ2_XXS, 4096, &[8, 16, 24]),
    ];
    for (ty, cols, rows) in cases {
        assert!(Gemv::stack_ok(ty, cols, rows), "{ty:?} {cols} {rows:?}");
        let parts: Vec<Vec<u8>> = rows
            .iter()
            .map(|&r| make_weight(&mut rng, ty, cols, r))
            .collect();
        let refs: Vec<(usize, &[u8])> = rows
            .iter()
            .zip(&parts)
            .map(|(&r, b)| (r, b.as_slice()))
            .collect();
        let (all, views) = d.g.upload_stacked(&d.stream, ty, cols, &refs).unwrap();
        let total: usize = rows.iter().sum();
        assert_eq!(all.rows(), total);
        assert!(!all.is_view());
        assert_eq!(views.len(), rows.len());
        let view_bytes: usize = views.iter().map(|v| v.device_bytes()).sum();
        assert!(views.iter().all(|v| v.is_view()));
        assert!(
            view_bytes <= all.device_bytes(),
            "views hold their own memory"
        );
        let alone: Vec<_> = rows
            .iter()
            .zip(&parts)
            .map(|(&r, b)| d.g.upload(&d.stream, ty, cols, r, 1, b).unwrap())
            .collect();
        let mut tally = Tally::default();
        for &n in &[1usize, 3] {
            let x = rng.vec(n * cols, 1.0);
            let dx = d.stream.clone_htod(&x).unwrap();
            let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, n));
            let tiles = Gemv::dense_tile_shapes(ty, n).len() as u32;
            for (tile, split) in (0..=tiles).flat_map(|t| [0u32, 1, 2, 8].map(|s| (t, s))) {
                d.g.tuning.force_split = split;
                d.g.tuning.force_tile = tile;
                let what = format!("{ty:?} {cols}x{rows:?} n={n} tile={tile} split={split}");
                let mut run = |w: &ds4_cuda::gemv::DevWeight| {
                    let mut y = nan_buf(&d, n * w.rows());
                    d.g.matvec_x(&d.stream, w, &dx, &mut act, n, &mut y)
                        .unwrap();
                    d.stream.clone_dtoh(&y).unwrap()
                };
                let sep: Vec<Vec<f32>> = alone.iter().map(&mut run).collect();
                let joint = run(&all);
                let mut row0 = 0;
                for (i, (v, want)) in views.iter().zip(&sep).enumerate() {
                    assert!(want.iter().all(|v| v.is_finite()), "{what}: part {i}");
                    let got = run(v);
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: view {i} differs from the matrix uploaded alone"
                    );
                    let r = rows[i];
                    let jv: Vec<f32> = (0..n)
                        .flat_map(|t| joint[t * total + row0..t * total + row0 + r].to_vec())
                        .collect();
                    if split != 0 {
                        assert!(
                            jv.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}: rows of part {i} in the stack's matvec differ"
                        );
                    } else {
                        tally.add(&format!("{what} stack part {i}"), &jv, want);
                    }
                    row0 += r;
                }
            }
        }
        d.g.tuning.force_split = 0;
        d.g.tuning.force_tile = 0;
        tally.finish(&format!("stacked {ty:?} {cols}"));
        // A view is a weight like any other: views of views keep the offsets.
        let v = all.view(rows[0], total - rows[0]).unwrap();
        let vv = v.view(0, rows[1]).unwrap();
        let x = rng.vec(cols, 1.0);
        let dx = d.stream.clone_htod(&x).unwrap();
        let mut act = byte_buf(&d, Gemv::act_bytes(ty, cols, 1));
        let mut y1 = nan_buf(&d, rows[1]);
        let mut y2 = nan_buf(&d, rows[1]);
        d.g.matvec_x(&d.stream, &vv, &dx, &mut act, 1, &mut y1)
            .unwrap();
        d.g.matvec_x(&d.stream, &views[1], &dx, &mut act, 1, &mut y2)
            .unwrap();
        let (a, b) = (
            d.stream.clone_dtoh(&y1).unwrap(),
            d.stream.clone_dtoh(&y2).unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    // Alignment: Q2_K rows of 4096 take 1024 / 256 / 64 bytes per region, so a part starting
    // at row 3 would leave the scales off 256 bytes: not stackable, and the upload says so.
    assert!(!Gemv::stack_ok(GgmlType::Q2_K, 4096, &[3, 5]));
    let b0 = make_weight(&mut rng, GgmlType::Q2_K, 4096, 3);
    let b1 = make_weight(&mut rng, GgmlType::Q2_K, 4096, 5);
    assert!(
        d.g.upload_stacked(&d.stream, GgmlType::Q2_K, 4096, &[(3, &b0), (5, &b1)])
            .is_err()
    );
    // A view out of range is an error, not a panic.
    let w =
        d.g.upload(&d.stream, GgmlType::Q2_K, 4096, 3, 1, &b0)
            .unwrap();
    assert!(w.view(2, 2).is_err());
}
