//! `#[repr(C)]` block structs (GGML byte layouts) and safe views of raw tensor bytes.
//!
//! All layouts are little-endian, as in GGUF files. The crate refuses to build on big-endian
//! targets (see `lib.rs`), so a plain byte cast gives the right field values.

use std::borrow::Cow;

use bytemuck::{Pod, Zeroable};

use crate::{GgmlType, QuantError};

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;

/// Q8_0 weight block: `value[i] = f16(d) · qs[i]` (34 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale, IEEE half bits.
    pub d: u16,
    pub qs: [i8; QK8_0],
}

/// Q2_K super-block (84 bytes): 16 groups of 16, 4-bit scale and 4-bit min per group.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ2K {
    /// Low nibble: scale, high nibble: min, per 16-group.
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants, 4 per byte.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale for the scales (f16 bits).
    pub d: u16,
    /// Super-block scale for the mins (f16 bits).
    pub dmin: u16,
}

/// Q4_K super-block (144 bytes): 8 groups of 32 with 6-bit scales and mins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4K {
    /// f16 bits.
    pub d: u16,
    /// f16 bits.
    pub dmin: u16,
    /// Packed 6-bit scales and mins (see [`get_scale_min_k4`]).
    pub scales: [u8; 12],
    /// 4-bit quants: byte `32p + l` holds element `64p + l` (low nibble) and `64p + 32 + l`.
    pub qs: [u8; QK_K / 2],
}

/// IQ2_XXS super-block (66 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockIq2Xxs {
    /// f16 bits.
    pub d: u16,
    /// Per 32-group: 4 grid indices (u32 #0) and 4 × 7-bit signs + 4-bit scale (u32 #1).
    pub qs: [u16; QK_K / 8],
}

/// Q8_K activation block (292 bytes): `value[i] = d · qs[i]`, `bsums[g] = Σ qs[16g..16g+16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// ds4's Q8_0 *activation* block: like Q8_0 but the scale is a full `f32` (not rounded to f16).
/// Not a GGUF storage type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0Act {
    pub d: f32,
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockIq2Xxs>() == 66);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::size_of::<BlockQ8_0Act>() == 36);

/// A block type with a fixed byte size and element count.
pub trait Block: Pod {
    /// The GGUF type this block stores, if it is a storage type.
    const TYPE: Option<GgmlType>;
    /// Elements per block.
    const ELEMS: usize;
    /// Bytes per block (`size_of::<Self>()`).
    const BYTES: usize = std::mem::size_of::<Self>();
}

impl Block for BlockQ8_0 {
    const TYPE: Option<GgmlType> = Some(GgmlType::Q8_0);
    const ELEMS: usize = QK8_0;
}
impl Block for BlockQ2K {
    const TYPE: Option<GgmlType> = Some(GgmlType::Q2_K);
    const ELEMS: usize = QK_K;
}
impl Block for BlockQ4K {
    const TYPE: Option<GgmlType> = Some(GgmlType::Q4_K);
    const ELEMS: usize = QK_K;
}
impl Block for BlockIq2Xxs {
    const TYPE: Option<GgmlType> = Some(GgmlType::IQ2_XXS);
    const ELEMS: usize = QK_K;
}
impl Block for BlockQ8K {
    const TYPE: Option<GgmlType> = Some(GgmlType::Q8_K);
    const ELEMS: usize = QK_K;
}
impl Block for BlockQ8_0Act {
    const TYPE: Option<GgmlType> = None;
    const ELEMS: usize = QK8_0;
}

/// View `data` as a slice of blocks: borrowed when `data` is suitably aligned, otherwise copied
/// into an owned, aligned vector. Errors when the length is not a multiple of the block size.
pub fn blocks_from_bytes<B: Block>(data: &[u8]) -> Result<Cow<'_, [B]>, QuantError> {
    if !data.len().is_multiple_of(B::BYTES) {
        return Err(QuantError::BadByteLength {
            what: std::any::type_name::<B>(),
            len: data.len(),
            unit: B::BYTES,
        });
    }
    match bytemuck::try_cast_slice::<u8, B>(data) {
        Ok(s) => Ok(Cow::Borrowed(s)),
        // Only misalignment can fail here (the length was checked): copy.
        Err(_) => Ok(Cow::Owned(copy_to_aligned(data))),
    }
}

/// Copy bytes into a newly allocated (hence aligned) vector of `T`; trailing bytes that do not
/// fill a whole `T` are ignored.
pub(crate) fn copy_to_aligned<T: Pod>(data: &[u8]) -> Vec<T> {
    let n = data.len() / std::mem::size_of::<T>().max(1);
    let mut v: Vec<T> = vec![T::zeroed(); n];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
    let len = dst.len();
    dst.copy_from_slice(&data[..len]);
    v
}

/// The raw bytes of a block slice (for writing GGUF tensor data).
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    bytemuck::cast_slice(blocks)
}

/// Q4_K scale and min of group `j` (0..8) from the packed 12-byte array.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_bytes_are_copied_not_ub() {
        let mut buf = vec![0u8; 292 * 3 + 1];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let a = blocks_from_bytes::<BlockQ8K>(&buf[1..]).unwrap();
        assert_eq!(a.len(), 3);
        // Same values via an explicit little-endian read.
        assert_eq!(
            a[1].d.to_bits(),
            u32::from_le_bytes(buf[293..297].try_into().unwrap())
        );
        assert_eq!(
            a[2].bsums[15],
            i16::from_le_bytes([buf[1 + 584 + 290], buf[1 + 584 + 291]])
        );
        assert!(blocks_from_bytes::<BlockQ8K>(&buf[..100]).is_err());
        let e = blocks_from_bytes::<BlockQ8_0>(&buf[..35]);
        assert!(matches!(e, Err(QuantError::BadByteLength { .. })));
        assert_eq!(blocks_from_bytes::<BlockQ8_0>(&[]).unwrap().len(), 0);
    }

    #[test]
    fn scale_min_unpacking() {
        let q = [
            0xC1, 0x42, 0x83, 0x04, 0xC5, 0x46, 0x87, 0x08, 0x9A, 0xBC, 0xDE, 0xF0,
        ];
        assert_eq!(get_scale_min_k4(0, &q), (0x01, 0x05));
        assert_eq!(get_scale_min_k4(3, &q), (0x04, 0x08));
        // j=4: sc = (q[8]&15) | (q[0]>>6)<<4 = 0xA | 0x30; m = (q[8]>>4) | (q[4]>>6)<<4 = 0x9 | 0x30
        assert_eq!(get_scale_min_k4(4, &q), (0x3A, 0x39));
        assert_eq!(get_scale_min_k4(7, &q), (0x00, 0x0F));
    }
}
