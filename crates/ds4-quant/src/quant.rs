//! Quantization from f32 (for `ds4 convert`): ports of the GGML reference quantizers as carried
//! by ds4's `gguf-tools/quants.c`, with every float operation in the same order (no fused
//! multiply-add), so the output bytes match the C reference compiled without FP contraction.
//!
//! * Q8_0: `quantize_row_q8_0_ref` (f16 scale, `roundf` = round half away from zero).
//! * Q2_K / Q4_K: without importance `quantize_row_q{2,4}_K_ref` (`make_qkx2_quants`); with an
//!   importance vector the weighted `quantize_row_q{2,4}_K_impl` (`make_qkx3_quants` +
//!   `make_qp_quants`).
//! * IQ2_XXS: `quantize_row_iq2_xxs_impl` (importance-weighted, grid-neighbour search). Without
//!   an importance vector, ds4's fallback `importance[c] = Σ_rows w[row][c]²` over the rows given.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::act::quantize_q8_k;
use crate::blocks::{BlockQ8K, QK_K, QK8_0};
use crate::fp::{f16_to_f32, f32_to_bf16, f32_to_f16, nearest_int};
use crate::tables::IQ2XXS_GRID;
use crate::{GgmlType, QuantError};

/// Types [`quantize`] can produce.
pub const QUANT_TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
    GgmlType::Q8_K,
];

const GROUP_MAX_EPS: f32 = 1e-15;

/// Quantize `src` (rows of `ne0` values) to `ty`, returning the GGUF tensor bytes.
///
/// `importance` (length `ne0`, one weight per column, finite and ≥ 0) is used by Q2_K, Q4_K and
/// IQ2_XXS; Q2_K/Q4_K without it use the unweighted reference quantizer, IQ2_XXS without it uses
/// [`importance_from_rows`]`(src, ne0)`. Block types reject non-finite input values.
/// Rows are quantized in parallel; the bytes do not depend on the thread count.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    ne0: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantError> {
    if !QUANT_TYPES.contains(&ty) {
        return Err(QuantError::Unsupported { op: "quantize", ty });
    }
    let bs = ty.block_size();
    if ne0 == 0 || !ne0.is_multiple_of(bs) {
        return Err(QuantError::BadRowLength { ty, ne0, block: bs });
    }
    if !src.len().is_multiple_of(ne0) {
        return Err(QuantError::LengthMismatch {
            what: "quantize input (a multiple of ne0)",
            expected: src.len().div_ceil(ne0) * ne0,
            got: src.len(),
        });
    }
    if let Some(imp) = importance {
        if imp.len() != ne0 {
            return Err(QuantError::LengthMismatch {
                what: "importance vector",
                expected: ne0,
                got: imp.len(),
            });
        }
        if let Some((i, &v)) = imp
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(QuantError::NonFinite {
                what: "importance (must be finite and >= 0)",
                index: i,
                value: v,
            });
        }
    }
    let row_bytes = ne0 / bs * ty.block_bytes();
    let nrows = src.len() / ne0;
    let total = nrows
        .checked_mul(row_bytes)
        .ok_or(QuantError::Overflow { what: "quantize" })?;
    let mut out = vec![0u8; total];
    match ty {
        GgmlType::F32 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(out);
        }
        GgmlType::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
            return Ok(out);
        }
        GgmlType::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
            return Ok(out);
        }
        _ => {}
    }
    if let Some((i, &v)) = src.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: "quantize input",
            index: i,
            value: v,
        });
    }
    let fallback;
    let importance = match (ty, importance) {
        (GgmlType::IQ2_XXS, None) => {
            fallback = importance_from_rows(src, ne0)?;
            Some(&fallback[..])
        }
        (_, imp) => imp,
    };
    if ty == GgmlType::IQ2_XXS {
        iq2_data(); // build the tables once, outside the parallel loop
    }
    let work = |(orow, xrow): (&mut [u8], &[f32])| {
        quantize_row(ty, xrow, orow, importance);
    };
    if src.len() >= 1 << 15 {
        out.par_chunks_mut(row_bytes)
            .zip(src.par_chunks(ne0))
            .for_each(work);
    } else {
        out.chunks_mut(row_bytes)
            .zip(src.chunks(ne0))
            .for_each(work);
    }
    Ok(out)
}

/// ds4's fallback importance for IQ2_XXS without an imatrix: `importance[c] = Σ_rows w[row][c]²`
/// (accumulated in f64, rounded once to f32).
pub fn importance_from_rows(src: &[f32], ne0: usize) -> Result<Vec<f32>, QuantError> {
    if ne0 == 0 || !src.len().is_multiple_of(ne0) {
        return Err(QuantError::LengthMismatch {
            what: "importance_from_rows input (a multiple of ne0)",
            expected: if ne0 == 0 {
                0
            } else {
                src.len().div_ceil(ne0) * ne0
            },
            got: src.len(),
        });
    }
    let mut acc = vec![0.0f64; ne0];
    for row in src.chunks_exact(ne0) {
        for (a, &w) in acc.iter_mut().zip(row) {
            *a += w as f64 * w as f64;
        }
    }
    Ok(acc.into_iter().map(|v| v as f32).collect())
}

fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8], importance: Option<&[f32]>) {
    match ty {
        GgmlType::Q8_0 => {
            for (xb, ob) in x.chunks_exact(QK8_0).zip(out.chunks_exact_mut(34)) {
                quantize_block_q8_0(xb, ob);
            }
        }
        GgmlType::Q2_K => {
            for (b, (xb, ob)) in x
                .chunks_exact(QK_K)
                .zip(out.chunks_exact_mut(84))
                .enumerate()
            {
                match importance {
                    Some(w) => quantize_block_q2_k_weighted(xb, ob, &w[b * QK_K..(b + 1) * QK_K]),
                    None => quantize_block_q2_k_ref(xb, ob),
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, (xb, ob)) in x
                .chunks_exact(QK_K)
                .zip(out.chunks_exact_mut(144))
                .enumerate()
            {
                match importance {
                    Some(w) => quantize_block_q4_k_weighted(xb, ob, &w[b * QK_K..(b + 1) * QK_K]),
                    None => quantize_block_q4_k_ref(xb, ob),
                }
            }
        }
        GgmlType::IQ2_XXS => {
            let w = importance.unwrap_or(&[]);
            for (b, (xb, ob)) in x
                .chunks_exact(QK_K)
                .zip(out.chunks_exact_mut(66))
                .enumerate()
            {
                quantize_block_iq2_xxs(xb, ob, &w[b * QK_K..(b + 1) * QK_K]);
            }
        }
        GgmlType::Q8_K => {
            let mut blocks: Vec<BlockQ8K> = vec![bytemuck::Zeroable::zeroed(); x.len() / QK_K];
            // Lengths match by construction.
            let _ = quantize_q8_k(x, &mut blocks);
            out.copy_from_slice(bytemuck::cast_slice(&blocks));
        }
        _ => unreachable!("checked against QUANT_TYPES"),
    }
}

// ---------------------------------------------------------------------------------------------
// Q8_0

fn quantize_block_q8_0(x: &[f32], y: &mut [u8]) {
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
        }
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[0..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        // C `(int8_t)roundf(x*id)`: |x·id| ≤ 127 (+1 ulp) so the cast cannot overflow.
        *q = (v * id).round() as i8 as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// Shared K-quant helpers (GGML make_qkx2_quants / make_qkx3_quants / make_qp_quants)

/// The search shared by GGML `make_qkx2_quants` and `make_qkx3_quants` (they differ only in the
/// degenerate-range test: `max == min` vs `max <= min`). Returns `(scale, the_min)`; `l` receives
/// the levels.
#[allow(clippy::too_many_arguments)]
fn make_qkx_quants(
    x3: bool,
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if (x3 && max <= min) || (!x3 && max == min) {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min));
        l[i] = li.clamp(0, nmax) as u8;
        let mut diff = scale * l[i] as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let mut diff = this_scale * laux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// GGML `make_qkx2_quants`. Returns `(scale, the_min)`; `l` receives the levels.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    make_qkx_quants(
        false, nmax, x, weights, l, laux, rmin, rdelta, nstep, use_mad,
    )
}

/// GGML `make_qkx3_quants` with explicit weights. Returns `(scale, the_min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    make_qkx_quants(
        true, nmax, x, weights, l, laux, rmin, rdelta, nstep, use_mad,
    )
}

/// GGML `make_qp_quants`: non-negative levels `0..=nmax` for non-negative `x`. Returns the scale.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        // C stores the int into uint8_t (modulo 256).
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += quant_weights[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let li = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * li as f32;
            mse += quant_weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).min(nmax);
        l[i] = li as u8;
        let w = quant_weights[i];
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for _itry in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = quant_weights[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------
// Q2_K

fn pack_q2_k(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

fn quantize_block_q2_k_ref(x: &[f32], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0.0f32; 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut sc_out = [0u8; 16];

    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let hd = if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..QK_K / 16 {
            sc_out[j] = nearest_int(iscale * scales[j]) as u8;
        }
        f32_to_f16(max_scale / Q4SCALE)
    } else {
        f32_to_f16(0.0)
    };
    let hmin = if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..QK_K / 16 {
            sc_out[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        f32_to_f16(max_min / Q4SCALE)
    } else {
        f32_to_f16(0.0)
    };
    for j in 0..QK_K / 16 {
        let d = f16_to_f32(hd) * (sc_out[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = f16_to_f32(hmin) * (sc_out[j] >> 4) as f32;
        for ii in 0..16 {
            let li = nearest_int((x[16 * j + ii] + dm) / d);
            l[16 * j + ii] = li.clamp(0, 3) as u8;
        }
    }
    y[0..16].copy_from_slice(&sc_out);
    pack_q2_k(&l, &mut y[16..80]);
    y[80..82].copy_from_slice(&hd.to_le_bytes());
    y[82..84].copy_from_slice(&hmin.to_le_bytes());
}

fn quantize_block_q2_k_weighted(x: &[f32], y: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut sw = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];
    let mut sc_out = [0u8; 16];

    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for i in 0..16 {
            weight[i] = qw[16 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        for &w in &weight {
            sw[j] += w;
        }
        let (s, m) = make_qkx3_quants(
            3,
            xs,
            &weight,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    let hd = f32_to_f16(dm);
    let hmin = f32_to_f16(mm);
    let dm = f16_to_f32(hd);
    let mm = f16_to_f32(hmin);
    for j in 0..QK_K / 16 {
        sc_out[j] = ls[j] | (lm[j] << 4);
    }
    for j in 0..QK_K / 16 {
        let d = dm * (sc_out[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let m = mm * (sc_out[j] >> 4) as f32;
        for ii in 0..16 {
            let li = nearest_int((x[16 * j + ii] + m) / d);
            l[16 * j + ii] = li.clamp(0, 3) as u8;
        }
    }
    y[0..16].copy_from_slice(&sc_out);
    pack_q2_k(&l, &mut y[16..80]);
    y[80..82].copy_from_slice(&hd.to_le_bytes());
    y[82..84].copy_from_slice(&hmin.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Q4_K

fn pack_q4_k_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

fn finish_q4_k(x: &[f32], y: &mut [u8], hd: u16, hmin: u16, sc: [u8; 12], l: &mut [u8; QK_K]) {
    for j in 0..QK_K / 32 {
        let (s, m) = crate::blocks::get_scale_min_k4(j, &sc);
        let dd = f16_to_f32(hd) * s as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = f16_to_f32(hmin) * m as f32;
        for ii in 0..32 {
            let li = nearest_int((x[32 * j + ii] + dm) / dd);
            l[32 * j + ii] = li.clamp(0, 15) as u8;
        }
    }
    y[0..2].copy_from_slice(&hd.to_le_bytes());
    y[2..4].copy_from_slice(&hmin.to_le_bytes());
    y[4..16].copy_from_slice(&sc);
    let q = &mut y[16..144];
    for (p, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * p + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

fn quantize_block_q4_k_ref(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let mut mins = [0.0f32; 8];
    let mut scales = [0.0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            15,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            -1.0,
            0.1,
            20,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let sc = pack_q4_k_scales(&ls, &lm);
    let hd = f32_to_f16(max_scale / 63.0);
    let hmin = f32_to_f16(max_min / 63.0);
    finish_q4_k(x, y, hd, hmin, sc, &mut l);
}

fn quantize_block_q4_k_weighted(x: &[f32], y: &mut [u8], qw: &[f32]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let mut weights = [0.0f32; 32];
    let mut sw = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut scales = [0.0f32; 8];

    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / QK_K as f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        for i in 0..32 {
            weights[i] = qw[32 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        let mut sumw = 0.0f32;
        for &w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        let (s, m) = make_qkx3_quants(
            15,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    let sc = pack_q4_k_scales(&ls, &lm);
    let hd = f32_to_f16(d_block);
    let hmin = f32_to_f16(m_block);
    finish_q4_k(x, y, hd, hmin, sc, &mut l);
}

// ---------------------------------------------------------------------------------------------
// IQ2_XXS

struct Iq2Data {
    /// Grid points as levels 2l+1 ∈ {1,3,5}.
    grid: [[i8; 8]; 256],
    /// Index by the 16-bit packed 2-bit levels: ≥ 0 grid index, < 0 → `-(offset+1)` into
    /// `neighbours` (count followed by candidate indices).
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

const IQ2_MAP_SIZE: usize = 43692;

fn iq2_data() -> &'static Iq2Data {
    static DATA: OnceLock<Iq2Data> = OnceLock::new();
    DATA.get_or_init(build_iq2_data)
}

fn build_iq2_data() -> Iq2Data {
    let mut grid = [[0i8; 8]; 256];
    let mut map = vec![-1i32; IQ2_MAP_SIZE];
    for (k, g) in grid.iter_mut().enumerate() {
        let bytes = IQ2XXS_GRID[k].to_le_bytes();
        let mut u = 0usize;
        for i in 0..8 {
            let lvl = match bytes[i] {
                0x08 => 0,
                0x19 => 1,
                _ => 2, // 0x2b
            };
            g[i] = 2 * lvl as i8 + 1;
            u |= lvl << (2 * i);
        }
        map[u] = k as i32;
    }
    // For every representable off-grid point (levels 0..=2 in each of the 8 positions; the
    // quantizer never produces level 3), the grid points in the two nearest distance shells.
    // (GGML fills the same lists for level-3 points too, which are never looked up.)
    let mut neighbours: Vec<u16> = Vec::new();
    let mut dist: Vec<(i32, usize)> = Vec::with_capacity(256);
    for (i, slot) in map.iter_mut().enumerate() {
        if *slot >= 0 {
            continue;
        }
        if (0..8).any(|k| (i >> (2 * k)) & 3 == 3) {
            continue;
        }
        let pos: [i32; 8] = std::array::from_fn(|k| 2 * ((i >> (2 * k)) & 3) as i32 + 1);
        dist.clear();
        for (j, g) in grid.iter().enumerate() {
            let d2: i32 = (0..8).map(|k| (g[k] as i32 - pos[k]).pow(2)).sum();
            dist.push((d2, j));
        }
        dist.sort_unstable();
        let start = neighbours.len();
        *slot = -(start as i32 + 1);
        neighbours.push(0);
        let mut d2 = dist[0].0;
        let mut have = 1;
        let mut n = 0u16;
        for &(dd, j) in &dist {
            if dd > d2 {
                if have == 2 {
                    break;
                }
                d2 = dd;
                have += 1;
            }
            neighbours.push(j as u16);
            n += 1;
        }
        neighbours[start] = n;
    }
    Iq2Data {
        grid,
        map,
        neighbours,
    }
}

/// Pick the best grid point among the candidates at `nbs` (count, then indices); writes its
/// levels into `l` and returns its index.
fn iq2_find_best_neighbour(
    data: &Iq2Data,
    nbs: usize,
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    l: &mut [u8],
) -> usize {
    let n = data.neighbours[nbs] as usize;
    let mut best_d2 = f32::MAX;
    let mut grid_index = data.neighbours[nbs + 1] as usize;
    for j in 1..=n {
        let gi = data.neighbours[nbs + j] as usize;
        let pg = &data.grid[gi];
        let mut d2 = 0.0f32;
        for i in 0..8 {
            let q = pg[i] as f32;
            let diff = scale * q - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            grid_index = gi;
        }
    }
    let pg = &data.grid[grid_index];
    for i in 0..8 {
        l[i] = ((pg[i] - 1) / 2) as u8;
    }
    grid_index
}

fn quantize_block_iq2_xxs(x: &[f32], y: &mut [u8], qw: &[f32]) {
    const BLOCK: usize = 32;
    const K_MAX_Q: i32 = 3;
    let data = iq2_data();
    let mut q2 = [0u32; 2 * (QK_K / BLOCK)];
    let mut scales = [0.0f32; QK_K / BLOCK];
    let mut weight = [0.0f32; BLOCK];
    let mut xval = [0.0f32; BLOCK];
    let mut l = [0u8; BLOCK];
    let mut laux = [0u8; BLOCK];
    let mut waux = [0.0f32; BLOCK];
    let mut block_signs = [0u8; 4];

    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;
    let mut max_scale = 0.0f32;

    let levels_index = |v: &[u8]| -> usize {
        let mut u = 0usize;
        for (i, &li) in v.iter().enumerate() {
            u |= (li as usize) << (2 * i);
        }
        u
    };

    for ib in 0..QK_K / BLOCK {
        let xb = &x[BLOCK * ib..BLOCK * ib + BLOCK];
        let qwb = &qw[BLOCK * ib..BLOCK * ib + BLOCK];
        for i in 0..BLOCK {
            weight[i] = qwb[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            waux[i] = weight[i].sqrt();
        }
        for k in 0..4 {
            let mut nflip = 0;
            let mut s = 0u8;
            for i in 0..8 {
                let v = xb[8 * k + i];
                if v >= 0.0 {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    nflip += 1;
                    s |= 1 << i;
                }
            }
            if nflip % 2 != 0 {
                let mut imin = 0;
                let mut min = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for i in 1..8 {
                    let ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if ax < min {
                        min = ax;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= 1 << imin;
            }
            block_signs[k] = s & 127;
        }

        let mut max = xval[0];
        for &v in &xval[1..] {
            max = if max > v { max } else { v };
        }
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }

        let mut scale = make_qp_quants(K_MAX_Q + 1, &xval, &mut l, &weight);
        let eff_max = scale * K_MAX_Q as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            continue;
        }

        let mut best = 0.0f32;
        for is in -6i32..=6 {
            let id = ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.1) / eff_max;
            let this_scale = 1.0 / id;
            for k in 0..4 {
                for i in 0..8 {
                    let li = nearest_int(0.5 * (id * xval[8 * k + i] - 1.0));
                    laux[8 * k + i] = li.clamp(0, K_MAX_Q - 1) as u8;
                }
                let u = levels_index(&laux[8 * k..8 * k + 8]);
                let gi = data.map[u];
                if gi < 0 {
                    let nbs = (-gi - 1) as usize;
                    iq2_find_best_neighbour(
                        data,
                        nbs,
                        &xval[8 * k..8 * k + 8],
                        &waux[8 * k..8 * k + 8],
                        this_scale,
                        &mut laux[8 * k..8 * k + 8],
                    );
                }
            }
            let mut sumqx = 0.0f32;
            let mut sumq2 = 0.0f32;
            for i in 0..BLOCK {
                let w = weight[i];
                let q = 2.0 * laux[i] as f32 + 1.0;
                sumqx += w * xval[i] * q;
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                l.copy_from_slice(&laux);
            }
        }

        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                let mut lv = [0u8; 8];
                for i in 0..8 {
                    let li = nearest_int(0.5 * (id * xval[8 * k + i] - 1.0));
                    lv[i] = li.clamp(0, K_MAX_Q - 1) as u8;
                }
                let u = levels_index(&lv);
                let mut gi = data.map[u];
                if gi < 0 {
                    let nbs = (-gi - 1) as usize;
                    gi = iq2_find_best_neighbour(
                        data,
                        nbs,
                        &xval[8 * k..8 * k + 8],
                        &waux[8 * k..8 * k + 8],
                        scale,
                        &mut l[8 * k..8 * k + 8],
                    ) as i32;
                }
                let pg = &data.grid[gi as usize];
                for i in 0..8 {
                    l[8 * k + i] = ((pg[i] - 1) / 2) as u8;
                }
            }
            let mut sumqx = 0.0f32;
            let mut sumq2 = 0.0f32;
            for i in 0..BLOCK {
                let w = weight[i];
                let q = 2.0 * l[i] as f32 + 1.0;
                sumqx += w * xval[i] * q;
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }

        if scale < 0.0 {
            scale = -scale;
            for s in block_signs.iter_mut() {
                *s = !*s & 127;
            }
        }

        for k in 0..4 {
            let u = levels_index(&l[8 * k..8 * k + 8]);
            // Every level vector in `l` is a grid point by construction (looked up in the map or
            // copied from a grid entry; GGML asserts this). Only overflowing inputs (inf/NaN
            // weights) could break that: fall back to grid point 0 rather than panic.
            let gi = data.map.get(u).copied().unwrap_or(-1).max(0) as u32;
            q2[2 * ib] |= gi << (8 * k);
            q2[2 * ib + 1] |= (block_signs[k] as u32) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = if max_scale > scale { max_scale } else { scale };
    }

    if max_scale == 0.0 {
        y[0..2].copy_from_slice(&f32_to_f16(0.0).to_le_bytes());
        y[2..66].fill(0);
        return;
    }
    let d = max_scale / 31.0;
    y[0..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    let id = 1.0 / d;
    for ib in 0..QK_K / BLOCK {
        let li = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        q2[2 * ib + 1] |= (li as u32) << 28;
    }
    for (i, w) in q2.iter().enumerate() {
        y[2 + 4 * i..6 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq2_tables() {
        let d = iq2_data();
        assert_eq!(d.map.iter().filter(|&&m| m >= 0).count(), 256);
        // Every representable off-grid point has a non-empty candidate list of valid indices.
        let mut offgrid = 0;
        for u in 0..IQ2_MAP_SIZE {
            if (0..8).any(|k| (u >> (2 * k)) & 3 == 3) {
                continue;
            }
            let m = d.map[u];
            if m < 0 {
                offgrid += 1;
                let s = (-m - 1) as usize;
                let n = d.neighbours[s] as usize;
                assert!(n > 0);
                assert!(d.neighbours[s + 1..=s + n].iter().all(|&g| g < 256));
            }
        }
        assert_eq!(offgrid, 6561 - 256);
    }

    #[test]
    fn argument_checks() {
        assert!(quantize(GgmlType::Q8_0, &[0.0; 64], 33, None).is_err());
        assert!(quantize(GgmlType::Q8_0, &[0.0; 65], 32, None).is_err());
        assert!(quantize(GgmlType::Q8_0, &[0.0; 64], 0, None).is_err());
        assert!(quantize(GgmlType::Q5_K, &[0.0; 256], 256, None).is_err());
        assert!(quantize(GgmlType::Q4_K, &[0.0; 256], 256, Some(&[1.0; 255])).is_err());
        assert!(quantize(GgmlType::Q4_K, &[0.0; 256], 256, Some(&[-1.0; 256])).is_err());
        let mut x = vec![0.5f32; 256];
        x[7] = f32::NAN;
        assert!(matches!(
            quantize(GgmlType::IQ2_XXS, &x, 256, None),
            Err(QuantError::NonFinite { index: 7, .. })
        ));
        // F16 keeps non-finite values.
        assert!(quantize(GgmlType::F16, &x, 256, None).is_ok());
        assert_eq!(quantize(GgmlType::Q8_0, &[], 32, None).unwrap().len(), 0);
    }

    #[test]
    fn all_zero_blocks() {
        let z = vec![0.0f32; 512];
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q4_K,
            GgmlType::IQ2_XXS,
        ] {
            let q = quantize(ty, &z, 256, None).unwrap();
            let d = crate::dequantize_to_vec(ty, &q).unwrap();
            assert!(d.iter().all(|&v| v == 0.0), "{ty}");
        }
    }
}
