//! AVX2 (+FMA, F16C) kernels. Only reachable through [`super::Kernels`] after run-time feature
//! detection. The quantized kernels compute the same exact integer sums as the scalar oracle
//! (no saturating `maddubs` on operands that could saturate) and the same f64 per-block terms;
//! all kernels accumulate in f64 (several lanes), so they differ from the sequential oracle only
//! in the order of f64 additions: the rounded f32 results are the same except in rare ties.

#![allow(unsafe_op_in_unsafe_fn)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::scalar::{combine_k, iq2_xxs_term, q8_0_term};
use crate::blocks::{
    BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K, get_scale_min_k4,
};
use crate::fp::f16_to_f32;
use crate::tables::IQ2XXS_GRID;

/// ±1 bytes for each 7-bit IQ2 sign index (parity bit included), as little-endian u64.
static SIGNS_PM1: [u64; 128] = make_signs_pm1();

const fn make_signs_pm1() -> [u64; 128] {
    let ks = &crate::tables::KSIGNS_IQ2XS;
    let mut t = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        let s = ks[i];
        let mut v = 0u64;
        let mut j = 0;
        while j < 8 {
            let b: u64 = if s & (1 << j) != 0 { 0xff } else { 0x01 };
            v |= b << (8 * j);
            j += 1;
        }
        t[i] = v;
        i += 1;
    }
    t
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256(v, 1);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[inline(always)]
unsafe fn hsum_pd(v: __m256d) -> f64 {
    let lo = _mm256_castpd256_pd128(v);
    let hi = _mm256_extractf128_pd(v, 1);
    let s = _mm_add_pd(lo, hi);
    let s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    _mm_cvtsd_f64(s)
}

/// Exact Σ a[i]·b[i] for 32 signed bytes each, as 8 i32 lanes (sign-extend + `madd_epi16`).
#[inline(always)]
unsafe fn dot_i8x32(a: __m256i, b: __m256i) -> __m256i {
    let a0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a));
    let a1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1));
    let b0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b));
    let b1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));
    _mm256_add_epi32(_mm256_madd_epi16(a0, b0), _mm256_madd_epi16(a1, b1))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0Act]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_q8_0: block counts differ");
    let nb = w.len();
    let mut acc = _mm256_setzero_pd();
    let mut b = 0;
    // Four blocks at a time: integer sums reduced together, then the per-block terms formed
    // lane-wise in f64 with the oracle's operations ((f16(w.d)·x.d)·isum, IEEE multiplies) and
    // added to an f64 accumulator (the contract: summation order is free in f64).
    while b + 4 <= nb {
        let mut v = [_mm256_setzero_si256(); 4];
        for (k, vk) in v.iter_mut().enumerate() {
            let a = _mm256_loadu_si256(w[b + k].qs.as_ptr() as *const __m256i);
            let c = _mm256_loadu_si256(x[b + k].qs.as_ptr() as *const __m256i);
            *vk = dot_i8x32(a, c);
        }
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let isum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let wd = _mm_cvtph_ps(_mm_setr_epi16(
            w[b].d as i16,
            w[b + 1].d as i16,
            w[b + 2].d as i16,
            w[b + 3].d as i16,
            0,
            0,
            0,
            0,
        ));
        let xd = _mm_setr_ps(x[b].d, x[b + 1].d, x[b + 2].d, x[b + 3].d);
        let t = _mm256_mul_pd(
            _mm256_mul_pd(_mm256_cvtps_pd(wd), _mm256_cvtps_pd(xd)),
            _mm256_cvtepi32_pd(isum),
        );
        acc = _mm256_add_pd(acc, t);
        b += 4;
    }
    let mut sum = hsum_pd(acc);
    while b < nb {
        let a = _mm256_loadu_si256(w[b].qs.as_ptr() as *const __m256i);
        let c = _mm256_loadu_si256(x[b].qs.as_ptr() as *const __m256i);
        sum += q8_0_term(w[b].d, x[b].d, hsum_i32(dot_i8x32(a, c)));
        b += 1;
    }
    sum as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q2_k_q8_k(w: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), y.len(), "vec_dot_q2_k_q8_k: block counts differ");
    let m3 = _mm256_set1_epi8(3);
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        let mut summs = 0i32;
        for j in 0..16 {
            summs += yb.bsums[j] as i32 * (wb.scales[j] >> 4) as i32;
        }
        let mut acc = _mm256_setzero_si256();
        for n in 0..2 {
            let q2 = _mm256_loadu_si256(wb.qs.as_ptr().add(32 * n) as *const __m256i);
            for j in 0..4 {
                let q = match j {
                    0 => _mm256_and_si256(q2, m3),
                    1 => _mm256_and_si256(_mm256_srli_epi16(q2, 2), m3),
                    2 => _mm256_and_si256(_mm256_srli_epi16(q2, 4), m3),
                    _ => _mm256_and_si256(_mm256_srli_epi16(q2, 6), m3),
                };
                let g = 8 * n + 2 * j;
                let q8 = _mm256_loadu_si256(yb.qs.as_ptr().add(16 * g) as *const __m256i);
                // q ∈ [0,3] unsigned × q8 signed: pair sums |·| ≤ 768, no saturation.
                let p = _mm256_maddubs_epi16(q, q8);
                let sa = (wb.scales[g] & 0xF) as i16;
                let sb = (wb.scales[g + 1] & 0xF) as i16;
                let sc = _mm256_setr_epi16(
                    sa, sa, sa, sa, sa, sa, sa, sa, sb, sb, sb, sb, sb, sb, sb, sb,
                );
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc));
            }
        }
        let isum = hsum_i32(acc);
        sumf += combine_k(wb.d, wb.dmin, yb.d, isum, summs);
    }
    sumf as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_k_q8_k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), y.len(), "vec_dot_q4_k_q8_k: block counts differ");
    let m4 = _mm256_set1_epi8(0x0F);
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        let mut acc = _mm256_setzero_si256();
        let mut summs = 0i32;
        for p in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * p, &wb.scales);
            let (sc2, m2) = get_scale_min_k4(2 * p + 1, &wb.scales);
            summs += m1 as i32 * (yb.bsums[4 * p] as i32 + yb.bsums[4 * p + 1] as i32)
                + m2 as i32 * (yb.bsums[4 * p + 2] as i32 + yb.bsums[4 * p + 3] as i32);
            let q4 = _mm256_loadu_si256(wb.qs.as_ptr().add(32 * p) as *const __m256i);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let q8a = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * p) as *const __m256i);
            let q8b = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * p + 32) as *const __m256i);
            // q4 ∈ [0,15] × q8: pair sums |·| ≤ 3840, no saturation.
            let pa =
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, q8a), _mm256_set1_epi16(sc1 as i16));
            let pb =
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, q8b), _mm256_set1_epi16(sc2 as i16));
            acc = _mm256_add_epi32(acc, _mm256_add_epi32(pa, pb));
        }
        let isum = hsum_i32(acc);
        sumf += combine_k(wb.d, wb.dmin, yb.d, isum, summs);
    }
    sumf as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_iq2_xxs_q8_k(w: &[BlockIq2Xxs], y: &[BlockQ8K]) -> f32 {
    assert_eq!(
        w.len(),
        y.len(),
        "vec_dot_iq2_xxs_q8_k: block counts differ"
    );
    let k80 = _mm256_set1_epi8(0x80u8 as i8);
    let mut sumf = 0.0f64;
    for (wb, yb) in w.iter().zip(y) {
        let mut acc = _mm256_setzero_si256();
        for ib32 in 0..8 {
            let a0 = wb.qs[4 * ib32] as u32 | (wb.qs[4 * ib32 + 1] as u32) << 16;
            let a1 = wb.qs[4 * ib32 + 2] as u32 | (wb.qs[4 * ib32 + 3] as u32) << 16;
            let grid = _mm256_setr_epi64x(
                IQ2XXS_GRID[(a0 & 0xff) as usize] as i64,
                IQ2XXS_GRID[((a0 >> 8) & 0xff) as usize] as i64,
                IQ2XXS_GRID[((a0 >> 16) & 0xff) as usize] as i64,
                IQ2XXS_GRID[(a0 >> 24) as usize] as i64,
            );
            let signs = _mm256_setr_epi64x(
                SIGNS_PM1[(a1 & 127) as usize] as i64,
                SIGNS_PM1[((a1 >> 7) & 127) as usize] as i64,
                SIGNS_PM1[((a1 >> 14) & 127) as usize] as i64,
                SIGNS_PM1[((a1 >> 21) & 127) as usize] as i64,
            );
            // Signed weights g (|g| ≤ 43, exact). maddubs needs an unsigned operand, so use
            // q8 + 128 (= q8 ^ 0x80) and subtract 128·g: pair sums ≤ 255·43·2 < 2^15 (no
            // saturation) and the difference Σ q8·g per pair (≤ 11008) is exact in i16.
            let g = _mm256_sign_epi8(grid, signs);
            let q8 = _mm256_loadu_si256(yb.qs.as_ptr().add(32 * ib32) as *const __m256i);
            let q8u = _mm256_xor_si256(q8, k80);
            let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q8u, g), _mm256_maddubs_epi16(k80, g));
            let ls = (2 * (a1 >> 28) + 1) as i16;
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(ls)));
        }
        sumf += iq2_xxs_term(wb.d, yb.d, hsum_i32(acc));
    }
    (0.125 * sumf) as f32
}

/// Four f32 lanes widened to f64 and multiply-added into `acc` (the product of two f32 values is
/// exact in f64, so the fused multiply-add rounds exactly like the oracle's `acc += w·x`).
#[inline(always)]
unsafe fn fma4_pd(w: __m128, x: __m128, acc: __m256d) -> __m256d {
    _mm256_fmadd_pd(_mm256_cvtps_pd(w), _mm256_cvtps_pd(x), acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_f16_f32(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_f16_f32: lengths differ");
    let n = w.len();
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i + 16 <= n {
        for k in 0..2 {
            let h = _mm_loadu_si128(w.as_ptr().add(i + 8 * k) as *const __m128i);
            let wv = _mm256_cvtph_ps(h);
            let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * k));
            acc[2 * k] = fma4_pd(
                _mm256_castps256_ps128(wv),
                _mm256_castps256_ps128(xv),
                acc[2 * k],
            );
            acc[2 * k + 1] = fma4_pd(
                _mm256_extractf128_ps(wv, 1),
                _mm256_extractf128_ps(xv, 1),
                acc[2 * k + 1],
            );
        }
        i += 16;
    }
    let s = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    let mut sum = hsum_pd(s);
    while i < n {
        sum += f16_to_f32(w[i]) as f64 * x[i] as f64;
        i += 1;
    }
    sum as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_bf16_f32(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_bf16_f32: lengths differ");
    let n = w.len();
    let mut acc0 = _mm256_setzero_pd();
    let mut acc1 = _mm256_setzero_pd();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
        let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        let xv = _mm256_loadu_ps(x.as_ptr().add(i));
        acc0 = fma4_pd(_mm256_castps256_ps128(wv), _mm256_castps256_ps128(xv), acc0);
        acc1 = fma4_pd(
            _mm256_extractf128_ps(wv, 1),
            _mm256_extractf128_ps(xv, 1),
            acc1,
        );
        i += 8;
    }
    let mut sum = hsum_pd(_mm256_add_pd(acc0, acc1));
    while i < n {
        sum += crate::fp::bf16_to_f32(w[i]) as f64 * x[i] as f64;
        i += 1;
    }
    sum as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "vec_dot_f32: lengths differ");
    let n = w.len();
    let mut acc0 = _mm256_setzero_pd();
    let mut acc1 = _mm256_setzero_pd();
    let mut i = 0;
    while i + 8 <= n {
        let a = _mm256_loadu_ps(w.as_ptr().add(i));
        let b = _mm256_loadu_ps(x.as_ptr().add(i));
        let a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
        let a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
        let b0 = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
        let b1 = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
        // f32×f32 products are exact in f64; only the additions round.
        acc0 = _mm256_fmadd_pd(a0, b0, acc0);
        acc1 = _mm256_fmadd_pd(a1, b1, acc1);
        i += 8;
    }
    let mut sum = hsum_pd(_mm256_add_pd(acc0, acc1));
    while i < n {
        sum += w[i] as f64 * x[i] as f64;
        i += 1;
    }
    sum as f32
}
