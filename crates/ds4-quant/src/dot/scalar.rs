//! Scalar dot products: the oracle. Exact integer inner sums as in ds4's scalar C code; then the
//! ds4-rs numerics contract (shared with the CUDA kernels, see `crates/ds4-cuda/kernels/gemv.cu`):
//! every per-block float term is formed in f64 with a fixed operation order, the terms are summed in
//! f64 and the result is rounded to f32 once. The f64 sum makes the order of additions irrelevant
//! except in ~1e-8-probability ties, so SIMD kernels, GPU kernels and this oracle give the same f32
//! bits, and discontinuous steps downstream (int8 activation quantization, FP8 QAT rounding, top-k)
//! see the same inputs on every backend.

use crate::blocks::get_scale_min_k4;
use crate::blocks::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K};
use crate::fp::{bf16_to_f32, f16_to_f32};
use crate::tables::{KSIGNS_IQ2XS, grid_bytes};

/// `Σ_b f16(w.d)·x.d·Σ_i w.qs[i]·x.qs[i]` (ds4 `dot_q8_0_row`): term per block
/// [`q8_0_term`], summed in f64, rounded once.
pub fn vec_dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0Act]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_q8_0: block counts differ");
    let mut acc = 0.0f64;
    for (wb, xb) in w.iter().zip(x) {
        acc += q8_0_term(wb.d, xb.d, q8_0_isum(wb, xb));
    }
    acc as f32
}

/// One Q8_0 block's term: `(f16(w.d) · x.d) · isum`, two f64 multiplies in this order (the first
/// is exact).
#[inline]
pub fn q8_0_term(wd: u16, xd: f32, isum: i32) -> f64 {
    (f16_to_f32(wd) as f64 * xd as f64) * isum as f64
}

/// The exact integer dot of one Q8_0 weight block with one activation block.
#[inline]
pub fn q8_0_isum(w: &BlockQ8_0, x: &BlockQ8_0Act) -> i32 {
    w.qs.iter()
        .zip(x.qs.iter())
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

/// Integer parts of one Q2_K × Q8_K block: `(isum, summs)` with
/// `isum = Σ_g (sc_g & 15)·Σ_16 q2·q8` and `summs = Σ_g (sc_g >> 4)·bsums_g`.
#[inline]
pub fn q2_k_isums(w: &BlockQ2K, y: &BlockQ8K) -> (i32, i32) {
    let summs: i32 = (0..16)
        .map(|j| y.bsums[j] as i32 * (w.scales[j] >> 4) as i32)
        .sum();
    let mut isum = 0i32;
    for n in 0..2 {
        let q2 = &w.qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for h in 0..2 {
                let g = 8 * n + 2 * j + h;
                let q8 = &y.qs[16 * g..16 * g + 16];
                let s: i32 = (0..16)
                    .map(|l| ((q2[16 * h + l] >> shift) & 3) as i32 * q8[l] as i32)
                    .sum();
                isum += (w.scales[g] & 0xF) as i32 * s;
            }
        }
    }
    (isum, summs)
}

/// ds4 `ds4_vec_dot_q2_K_q8_K` (scalar branch):
/// `Σ_blocks (y.d·f16(d))·isum − (y.d·f16(dmin))·summs`.
pub fn vec_dot_q2_k_q8_k(w: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), y.len(), "vec_dot_q2_k_q8_k: block counts differ");
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        let (isum, summs) = q2_k_isums(wb, yb);
        sumf += combine_k(wb.d, wb.dmin, yb.d, isum, summs);
    }
    sumf as f32
}

/// The per-block term shared by Q2_K and Q4_K (and their SIMD and CUDA versions), in f64:
/// `dall = y.d·f16(d)`, `dm = y.d·f16(dmin)` (both exact), then `dall·isum − dm·summs` as two
/// rounded products and one rounded subtraction (no fused multiply-add).
#[inline]
pub fn combine_k(d: u16, dmin: u16, yd: f32, isum: i32, summs: i32) -> f64 {
    let dall = yd as f64 * f16_to_f32(d) as f64;
    let dm = yd as f64 * f16_to_f32(dmin) as f64;
    dall * isum as f64 - dm * summs as f64
}

/// Integer parts of one Q4_K × Q8_K block: `isum = Σ_j sc_j·Σ_32 q4·q8`,
/// `summs = Σ_j m_j·(bsums[2j] + bsums[2j+1])`.
#[inline]
pub fn q4_k_isums(w: &BlockQ4K, y: &BlockQ8K) -> (i32, i32) {
    let mut isum = 0i32;
    let mut summs = 0i32;
    for p in 0..4 {
        let q = &w.qs[32 * p..32 * p + 32];
        let (sc1, m1) = get_scale_min_k4(2 * p, &w.scales);
        let (sc2, m2) = get_scale_min_k4(2 * p + 1, &w.scales);
        let q8a = &y.qs[64 * p..64 * p + 32];
        let q8b = &y.qs[64 * p + 32..64 * p + 64];
        let mut sa = 0i32;
        let mut sb = 0i32;
        for l in 0..32 {
            sa += (q[l] & 0xF) as i32 * q8a[l] as i32;
            sb += (q[l] >> 4) as i32 * q8b[l] as i32;
        }
        isum += sc1 as i32 * sa + sc2 as i32 * sb;
        summs += m1 as i32 * (y.bsums[4 * p] as i32 + y.bsums[4 * p + 1] as i32)
            + m2 as i32 * (y.bsums[4 * p + 2] as i32 + y.bsums[4 * p + 3] as i32);
    }
    (isum, summs)
}

/// Q4_K × Q8_K, same structure as Q2_K: `Σ_blocks (y.d·f16(d))·isum − (y.d·f16(dmin))·summs`.
/// (ds4's CPU path has no Q4_K; this is the CUDA `dev_dot_q4_K_q8_K_block` formula.)
pub fn vec_dot_q4_k_q8_k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), y.len(), "vec_dot_q4_k_q8_k: block counts differ");
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        let (isum, summs) = q4_k_isums(wb, yb);
        sumf += combine_k(wb.d, wb.dmin, yb.d, isum, summs);
    }
    sumf as f32
}

/// Integer part of one IQ2_XXS × Q8_K block: `Σ_ib32 (2·s+1)·Σ_32 (±grid)·q8`.
#[inline]
pub fn iq2_xxs_isum(w: &BlockIq2Xxs, y: &BlockQ8K) -> i32 {
    let mut bsum = 0i32;
    for ib32 in 0..8 {
        let a0 = w.qs[4 * ib32] as u32 | (w.qs[4 * ib32 + 1] as u32) << 16;
        let a1 = w.qs[4 * ib32 + 2] as u32 | (w.qs[4 * ib32 + 3] as u32) << 16;
        let ls = (2 * (a1 >> 28) + 1) as i32;
        let mut sumi = 0i32;
        for l in 0..4 {
            let g = grid_bytes((a0 >> (8 * l)) as u8);
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
            let q8 = &y.qs[32 * ib32 + 8 * l..32 * ib32 + 8 * l + 8];
            for j in 0..8 {
                let v = g[j] as i32 * q8[j] as i32;
                sumi += if signs & (1 << j) != 0 { -v } else { v };
            }
        }
        bsum += sumi * ls;
    }
    bsum
}

/// ds4 `ds4_vec_dot_iq2_xxs_q8_K` (scalar branch): `0.125·Σ_blocks (f16(d)·y.d)·bsum`.
pub fn vec_dot_iq2_xxs_q8_k(w: &[BlockIq2Xxs], y: &[BlockQ8K]) -> f32 {
    assert_eq!(
        w.len(),
        y.len(),
        "vec_dot_iq2_xxs_q8_k: block counts differ"
    );
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        sumf += iq2_xxs_term(wb.d, yb.d, iq2_xxs_isum(wb, yb));
    }
    (0.125 * sumf) as f32
}

/// One IQ2_XXS block's term (before the final `0.125·`): `(f16(w.d) · y.d) · bsum` in f64.
#[inline]
pub fn iq2_xxs_term(wd: u16, yd: f32, bsum: i32) -> f64 {
    (f16_to_f32(wd) as f64 * yd as f64) * bsum as f64
}

/// `Σ f32(w[i])·x[i]` accumulated in f64 (the products are exact), rounded once.
pub fn vec_dot_f16_f32(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_f16_f32: lengths differ");
    let mut acc = 0.0f64;
    for (&h, &v) in w.iter().zip(x) {
        acc += f16_to_f32(h) as f64 * v as f64;
    }
    acc as f32
}

/// `Σ f32(w[i])·x[i]` for bfloat16 weights, accumulated in f64, rounded once.
pub fn vec_dot_bf16_f32(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_bf16_f32: lengths differ");
    let mut acc = 0.0f64;
    for (&h, &v) in w.iter().zip(x) {
        acc += bf16_to_f32(h) as f64 * v as f64;
    }
    acc as f32
}

/// `Σ w[i]·x[i]` accumulated in f64 (ds4 `matvec_f32`), rounded once to f32.
pub fn vec_dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_f32: lengths differ");
    let mut acc = 0.0f64;
    for (&a, &b) in w.iter().zip(x) {
        acc += a as f64 * b as f64;
    }
    acc as f32
}
