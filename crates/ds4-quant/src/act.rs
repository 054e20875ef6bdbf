//! Activation quantization with ds4's CPU numerics (model-spec §3.0, §5.6).

use crate::QuantError;
use crate::blocks::{BlockQ8_0Act, BlockQ8K, QK_K, QK8_0};
use crate::fp::lrint_sat;

/// Number of [`BlockQ8_0Act`] blocks for `n` activations (a partial last block is zero-padded).
pub fn q8_0_act_blocks(n: usize) -> usize {
    n.div_ceil(QK8_0)
}

/// ds4 `quantize_q8_0_activation`: per 32-block `d = amax/127` (f32, not rounded to f16),
/// `id = d ≠ 0 ? 1/d : 0`, `q = clamp(lrintf(x·id), -128, 127)` (round-half-even).
/// `x.len()` need not be a multiple of 32: the tail of the last block is zero.
/// `out.len()` must be [`q8_0_act_blocks`]`(x.len())`.
pub fn quantize_q8_0_act(x: &[f32], out: &mut [BlockQ8_0Act]) -> Result<(), QuantError> {
    let nb = q8_0_act_blocks(x.len());
    if out.len() != nb {
        return Err(QuantError::LengthMismatch {
            what: "quantize_q8_0_act output blocks",
            expected: nb,
            got: out.len(),
        });
    }
    for (xb, o) in x.chunks(QK8_0).zip(out.iter_mut()) {
        let mut amax = 0.0f32;
        for &v in xb {
            let a = v.abs();
            if a > amax {
                amax = a;
            }
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o.d = d;
        o.qs = [0; QK8_0];
        for (q, &v) in o.qs.iter_mut().zip(xb) {
            *q = lrint_sat(v * id).clamp(-128, 127) as i8;
        }
    }
    Ok(())
}

/// [`quantize_q8_0_act`] into a new vector.
pub fn quantize_q8_0_act_vec(x: &[f32]) -> Vec<BlockQ8_0Act> {
    let mut out = vec![bytemuck::Zeroable::zeroed(); q8_0_act_blocks(x.len())];
    // Cannot fail: the output length is right by construction.
    let _ = quantize_q8_0_act(x, &mut out);
    out
}

/// ds4 `ds4_quantize_row_q8_K` (model-spec §5.6): per 256-block, `max` = the element of largest
/// `|x|` (first one on ties, sign kept), `iscale = -127/max`,
/// `q = clamp(lrintf(iscale·x), -128, 127)`, `bsums[g] = Σ q[16g..16g+16]`, `d = 1/iscale`;
/// an all-zero block gives `d = 0`, `q = 0`. `x.len()` must equal `256 · out.len()`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) -> Result<(), QuantError> {
    if x.len() != out.len() * QK_K {
        return Err(QuantError::LengthMismatch {
            what: "quantize_q8_k input (256 per output block)",
            expected: out.len() * QK_K,
            got: x.len(),
        });
    }
    for (xb, o) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        quantize_block_q8_k(xb, o);
    }
    Ok(())
}

/// [`quantize_q8_k`] into a new vector; a partial last block is zero-padded.
pub fn quantize_q8_k_vec(x: &[f32]) -> Vec<BlockQ8K> {
    let nb = x.len().div_ceil(QK_K);
    let mut out: Vec<BlockQ8K> = vec![bytemuck::Zeroable::zeroed(); nb];
    for (xb, o) in x.chunks(QK_K).zip(out.iter_mut()) {
        if xb.len() == QK_K {
            quantize_block_q8_k(xb, o);
        } else {
            let mut tmp = [0.0f32; QK_K];
            tmp[..xb.len()].copy_from_slice(xb);
            quantize_block_q8_k(&tmp, o);
        }
    }
    out
}

fn quantize_block_q8_k(x: &[f32], y: &mut BlockQ8K) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax == 0.0 {
        y.d = 0.0;
        y.qs = [0; QK_K];
        y.bsums = [0; QK_K / 16];
        return;
    }
    let iscale = -127.0f32 / max;
    for (q, &v) in y.qs.iter_mut().zip(x) {
        *q = lrint_sat(iscale * v).clamp(-128, 127) as i8;
    }
    for (g, s) in y.bsums.iter_mut().enumerate() {
        *s = y.qs[16 * g..16 * g + 16]
            .iter()
            .map(|&q| q as i32)
            .sum::<i32>() as i16;
    }
    y.d = 1.0 / iscale;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_act_numerics() {
        let mut x = [0.0f32; 40];
        x[0] = 127.0;
        x[1] = 0.5; // tie → 0 (half-even)
        x[2] = 1.5; // tie → 2
        x[3] = -2.5; // tie → -2
        x[4] = -127.0;
        x[33] = -3.0;
        x[34] = 1.0;
        let mut out = vec![bytemuck::Zeroable::zeroed(); 2];
        quantize_q8_0_act(&x, &mut out).unwrap();
        assert_eq!(out[0].d, 1.0);
        assert_eq!(&out[0].qs[..5], &[127, 0, 2, -2, -127]);
        assert_eq!(out[1].d, 3.0 / 127.0);
        assert_eq!(out[1].qs[1], -127);
        assert_eq!(
            out[1].qs[2],
            (1.0f32 * (1.0 / (3.0f32 / 127.0))).round_ties_even() as i8
        );
        assert!(out[1].qs[8..].iter().all(|&q| q == 0));
        // all-zero block
        let z = quantize_q8_0_act_vec(&[0.0; 32]);
        assert_eq!(z[0].d, 0.0);
        assert!(z[0].qs.iter().all(|&q| q == 0));
        assert!(quantize_q8_0_act(&x, &mut out[..1]).is_err());
    }

    #[test]
    fn q8_k_numerics() {
        let mut x = [0.0f32; 256];
        x[5] = -4.0;
        x[6] = 4.0; // same |x| later: first one wins → max = -4
        x[7] = 1.0;
        x[20] = 2.0;
        let mut out = [bytemuck::Zeroable::zeroed(); 1];
        quantize_q8_k(&x, &mut out).unwrap();
        let b: &BlockQ8K = &out[0];
        // iscale = -127 / -4 = 31.75
        assert_eq!(b.d, 1.0 / 31.75);
        assert_eq!(b.qs[5], -127);
        assert_eq!(b.qs[6], 127);
        assert_eq!(b.qs[7], 32); // 31.75 → 32
        assert_eq!(b.qs[20], 64); // 63.5 → 64 (half-even)
        assert_eq!(b.bsums[0], 32);
        assert_eq!(b.bsums[1], 64);
        // sign flip: the largest element positive gives negative d
        let mut y = [0.0f32; 256];
        y[0] = 2.0;
        y[1] = -1.0;
        quantize_q8_k(&y, &mut out).unwrap();
        assert_eq!(out[0].qs[0], -127);
        assert!(out[0].d < 0.0);
        assert_eq!(out[0].qs[1], 64); // 63.5 → 64
        quantize_q8_k(&[0.0; 256], &mut out).unwrap();
        assert_eq!(out[0].d, 0.0);
        assert!(quantize_q8_k(&[0.0; 255], &mut out).is_err());
    }
}
