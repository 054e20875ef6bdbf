//! Dequantization to f32, bit-exact with gguf-py 0.19.0 `gguf.quants.dequantize` (and GGML's
//! `dequantize_row_*`): every product is a single f32 operation in the same order.

use crate::blocks::{
    Block, BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0, blocks_from_bytes,
    get_scale_min_k4,
};
use crate::fp::{bf16_to_f32, f16_to_f32};
use crate::tables::{KSIGNS_IQ2XS, grid_bytes};
use crate::{GgmlType, QuantError};

/// Types [`dequantize`] accepts.
pub const DEQUANT_TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
    GgmlType::Q8_K,
];

/// Dequantize `data` (whole blocks of type `ty`) into `out`, whose length must be the element
/// count of `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    if !DEQUANT_TYPES.contains(&ty) {
        return Err(QuantError::Unsupported {
            op: "dequantize",
            ty,
        });
    }
    let bb = ty.block_bytes();
    if !data.len().is_multiple_of(bb) {
        return Err(QuantError::BadByteLength {
            what: ty.name(),
            len: data.len(),
            unit: bb,
        });
    }
    let n = data.len() / bb * ty.block_size();
    if out.len() != n {
        return Err(QuantError::LengthMismatch {
            what: "dequantize output",
            expected: n,
            got: out.len(),
        });
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::Q8_0 => deq_blocks::<BlockQ8_0>(data, out, dequantize_block_q8_0)?,
        GgmlType::Q2_K => deq_blocks::<BlockQ2K>(data, out, dequantize_block_q2_k)?,
        GgmlType::Q4_K => deq_blocks::<BlockQ4K>(data, out, dequantize_block_q4_k)?,
        GgmlType::IQ2_XXS => deq_blocks::<BlockIq2Xxs>(data, out, dequantize_block_iq2_xxs)?,
        GgmlType::Q8_K => deq_blocks::<BlockQ8K>(data, out, dequantize_block_q8_k)?,
        _ => unreachable!("checked against DEQUANT_TYPES"),
    }
    Ok(())
}

/// [`dequantize`] into a new vector.
pub fn dequantize_to_vec(ty: GgmlType, data: &[u8]) -> Result<Vec<f32>, QuantError> {
    let bb = ty.block_bytes();
    let n = (data.len() / bb)
        .checked_mul(ty.block_size())
        .ok_or(QuantError::Overflow { what: "dequantize" })?;
    let mut out = vec![0.0f32; n];
    dequantize(ty, data, &mut out)?;
    Ok(out)
}

fn deq_blocks<B: Block>(
    data: &[u8],
    out: &mut [f32],
    f: fn(&B, &mut [f32]),
) -> Result<(), QuantError> {
    let blocks = blocks_from_bytes::<B>(data)?;
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(B::ELEMS)) {
        f(b, o);
    }
    Ok(())
}

/// Dequantize a slice of blocks into `out` (`out.len() == blocks.len() * B::ELEMS`).
///
/// # Panics
/// If the lengths disagree.
pub fn dequantize_blocks<B: DequantBlock>(blocks: &[B], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * B::ELEMS,
        "dequantize_blocks length"
    );
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(B::ELEMS)) {
        b.dequantize_into(o);
    }
}

/// A block that can be dequantized.
pub trait DequantBlock: Block {
    /// Write the `Self::ELEMS` values of this block to `out[..Self::ELEMS]`.
    fn dequantize_into(&self, out: &mut [f32]);
}

impl DequantBlock for BlockQ8_0 {
    fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_block_q8_0(self, out)
    }
}
impl DequantBlock for BlockQ2K {
    fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_block_q2_k(self, out)
    }
}
impl DequantBlock for BlockQ4K {
    fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_block_q4_k(self, out)
    }
}
impl DequantBlock for BlockIq2Xxs {
    fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_block_iq2_xxs(self, out)
    }
}
impl DequantBlock for BlockQ8K {
    fn dequantize_into(&self, out: &mut [f32]) {
        dequantize_block_q8_k(self, out)
    }
}

/// `y[i] = f16(d) · qs[i]`.
pub fn dequantize_block_q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = f16_to_f32(b.d);
    for (o, &q) in out[..QK8_0].iter_mut().zip(b.qs.iter()) {
        *o = q as f32 * d;
    }
}

/// GGML `dequantize_row_q2_K` for one block.
pub fn dequantize_block_q2_k(b: &BlockQ2K, out: &mut [f32]) {
    let out = &mut out[..QK_K];
    let d = f16_to_f32(b.d);
    let dmin = f16_to_f32(b.dmin);
    for n in 0..2 {
        let q = &b.qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for h in 0..2 {
                let sc = b.scales[8 * n + 2 * j + h];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = 128 * n + 32 * j + 16 * h;
                for l in 0..16 {
                    let v = ((q[16 * h + l] >> shift) & 3) as f32;
                    out[base + l] = dl * v - ml;
                }
            }
        }
    }
}

/// GGML `dequantize_row_q4_K` for one block.
pub fn dequantize_block_q4_k(b: &BlockQ4K, out: &mut [f32]) {
    let out = &mut out[..QK_K];
    let d = f16_to_f32(b.d);
    let dmin = f16_to_f32(b.dmin);
    for p in 0..4 {
        let q = &b.qs[32 * p..32 * p + 32];
        let (sc1, m1) = get_scale_min_k4(2 * p, &b.scales);
        let (sc2, m2) = get_scale_min_k4(2 * p + 1, &b.scales);
        let d1 = d * sc1 as f32;
        let mm1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let mm2 = dmin * m2 as f32;
        for l in 0..32 {
            out[64 * p + l] = d1 * (q[l] & 0xF) as f32 - mm1;
            out[64 * p + 32 + l] = d2 * (q[l] >> 4) as f32 - mm2;
        }
    }
}

/// GGML `dequantize_row_iq2_xxs` for one block.
pub fn dequantize_block_iq2_xxs(b: &BlockIq2Xxs, out: &mut [f32]) {
    let out = &mut out[..QK_K];
    let d = f16_to_f32(b.d);
    for ib32 in 0..8 {
        let a0 = b.qs[4 * ib32] as u32 | (b.qs[4 * ib32 + 1] as u32) << 16;
        let a1 = b.qs[4 * ib32 + 2] as u32 | (b.qs[4 * ib32 + 3] as u32) << 16;
        let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
        for l in 0..4 {
            let grid = grid_bytes((a0 >> (8 * l)) as u8);
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
            for j in 0..8 {
                let v = db * grid[j] as f32;
                out[32 * ib32 + 8 * l + j] = if signs & (1 << j) != 0 { -v } else { v };
            }
        }
    }
}

/// `y[i] = d · qs[i]`.
pub fn dequantize_block_q8_k(b: &BlockQ8K, out: &mut [f32]) {
    for (o, &q) in out[..QK_K].iter_mut().zip(b.qs.iter()) {
        *o = b.d * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes_and_types() {
        let mut out = vec![0.0; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out[..31]).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out).is_ok());
        assert!(matches!(
            dequantize(GgmlType::Q5_K, &[0u8; 176], &mut [0.0; 256]),
            Err(QuantError::Unsupported { .. })
        ));
        assert!(dequantize(GgmlType::F16, &[0u8; 3], &mut out[..1]).is_err());
    }
}
