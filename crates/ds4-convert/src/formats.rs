//! Decoding of the official checkpoint's storage formats to f32.
//!
//! * FP8 E4M3 ("e4m3fn": no infinities, `0x7f`/`0xff` are NaN and decode to 0 like ds4's
//!   `e4m3fn_to_f32`) with one E8M0 scale per 128×128 block (`dequant_fp8_weight`); edge blocks
//!   of dims that are not multiples of 128 use the block's scale too.
//! * FP4 E2M1 packed two per byte, low nibble first, one E8M0 scale per 32 inputs of a row
//!   (`dequant_fp4_weight`).
//! * E8M0: code 0 → 2^-127 (the f32 bit pattern `0x00400000`), otherwise `2^(e-127)`; code 255
//!   (NaN in the OCP spec) would decode to +inf; the converter refuses it (see [`e8m0_is_valid`]).
//! * BF16, F16, F32 plain; I64/I32 integers.

/// The 16 FP4 E2M1 values, indexed by nibble (bit 3 = sign).
pub const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// FP8 block size of the official checkpoint (rows and columns).
pub const FP8_BLOCK: usize = 128;
/// FP4 block size (inputs per scale).
pub const FP4_BLOCK: usize = 32;

/// Decode an E8M0 scale byte.
pub fn e8m0_to_f32(code: u8) -> f32 {
    let bits: u32 = if code == 0 {
        0x0040_0000
    } else {
        (code as u32) << 23
    };
    f32::from_bits(bits)
}

/// Whether an E8M0 code is a finite scale (255 is NaN).
pub fn e8m0_is_valid(code: u8) -> bool {
    code != 0xff
}

/// Decode an FP8 E4M3FN byte (NaN codes decode to 0, as in ds4's converter).
pub fn e4m3fn_to_f32(code: u8) -> f32 {
    let abs = code & 0x7f;
    let neg = code & 0x80 != 0;
    let v = if abs == 0x7f {
        // NaN: ds4 maps it to +0 regardless of sign.
        return 0.0;
    } else if abs == 0 {
        0.0
    } else {
        let exp = (abs >> 3) as i32;
        let man = (abs & 7) as f32;
        if exp == 0 {
            man * 2f32.powi(-9)
        } else {
            (1.0 + man / 8.0) * 2f32.powi(exp - 7)
        }
    };
    if neg { -v } else { v }
}

/// Decode a BF16 bit pattern.
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Decode an IEEE half bit pattern.
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Plain float storage of a checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainFloat {
    F32,
    F16,
    BF16,
}

impl PlainFloat {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PlainFloat::F32 => 4,
            PlainFloat::F16 | PlainFloat::BF16 => 2,
        }
    }
}

/// Decode `out.len()` plain floats from `bytes` (little-endian; `bytes.len()` must equal
/// `out.len() * size`).
pub fn decode_plain(kind: PlainFloat, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * kind.size());
    match kind {
        PlainFloat::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        PlainFloat::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        PlainFloat::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
}

/// Dequantize rows `row0..row0 + n_rows` of an FP8 E4M3 matrix with `cols` columns.
///
/// `w` holds the whole matrix (`rows * cols` bytes, row-major); `scales` holds the decoded
/// block scales, row-major `[ceil(rows/128), ceil(cols/128)]`. `out` receives `n_rows * cols`
/// values. The caller has checked the sizes.
pub fn dequant_fp8_rows(
    w: &[u8],
    cols: usize,
    scales: &[f32],
    row0: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    let scale_cols = cols.div_ceil(FP8_BLOCK);
    for r in 0..n_rows {
        let row = row0 + r;
        let src = &w[row * cols..(row + 1) * cols];
        let dst = &mut out[r * cols..(r + 1) * cols];
        let srow = &scales[(row / FP8_BLOCK) * scale_cols..(row / FP8_BLOCK + 1) * scale_cols];
        for (b, (dchunk, schunk)) in dst
            .chunks_mut(FP8_BLOCK)
            .zip(src.chunks(FP8_BLOCK))
            .enumerate()
        {
            let s = srow[b];
            for (d, &q) in dchunk.iter_mut().zip(schunk) {
                *d = e4m3fn_to_f32(q) * s;
            }
        }
    }
}

/// Dequantize rows `row0..row0 + n_rows` of a packed FP4 matrix with `cols` (unpacked) columns,
/// `cols % 32 == 0`. `w` holds the whole matrix (`rows * cols / 2` bytes); `scales` holds the
/// decoded scales `[rows, cols/32]`. `out` receives `n_rows * cols` values.
pub fn dequant_fp4_rows(
    w: &[u8],
    cols: usize,
    scales: &[f32],
    row0: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    let half = cols / 2;
    let n_blocks = cols / FP4_BLOCK;
    for r in 0..n_rows {
        let row = row0 + r;
        let src = &w[row * half..(row + 1) * half];
        let dst = &mut out[r * cols..(r + 1) * cols];
        let srow = &scales[row * n_blocks..(row + 1) * n_blocks];
        for (b, (dchunk, schunk)) in dst
            .chunks_exact_mut(FP4_BLOCK)
            .zip(src.chunks_exact(FP4_BLOCK / 2))
            .enumerate()
        {
            let s = srow[b];
            for (j, &q) in schunk.iter().enumerate() {
                dchunk[2 * j] = FP4_E2M1[(q & 0x0f) as usize] * s;
                dchunk[2 * j + 1] = FP4_E2M1[(q >> 4) as usize] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_codes() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 1.0 / 128.0);
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        // Code 0 is 2^-127, a subnormal f32.
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(0).to_bits(), 0x0040_0000);
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
    }

    #[test]
    fn e4m3_codes() {
        // Layout s eeee mmm, exponent bias 7.
        assert_eq!(e4m3fn_to_f32(0x00), 0.0);
        assert_eq!(e4m3fn_to_f32(0x80), -0.0);
        assert!(e4m3fn_to_f32(0x80).is_sign_negative());
        assert_eq!(e4m3fn_to_f32(0x38), 1.0); // e=7, m=0
        assert_eq!(e4m3fn_to_f32(0x39), 1.125); // e=7, m=1
        assert_eq!(e4m3fn_to_f32(0xb8), -1.0);
        assert_eq!(e4m3fn_to_f32(0x40), 2.0); // e=8
        assert_eq!(e4m3fn_to_f32(0x7e), 448.0); // e=15, m=6: max finite
        assert_eq!(e4m3fn_to_f32(0xfe), -448.0);
        assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3fn_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3fn_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        // NaN codes decode to zero.
        assert_eq!(e4m3fn_to_f32(0x7f), 0.0);
        assert_eq!(e4m3fn_to_f32(0xff), 0.0);
    }

    #[test]
    fn e4m3_all_codes_are_finite_and_monotonic() {
        let mut prev = -1.0f32;
        for c in 0u8..0x7f {
            let v = e4m3fn_to_f32(c);
            assert!(v.is_finite());
            assert!(v > prev || c == 0, "code {c:#x}");
            prev = v;
            assert_eq!(e4m3fn_to_f32(c | 0x80), -v);
        }
    }

    #[test]
    fn bf16_and_f16() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc500), -5.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        let mut out = [0.0f32; 2];
        decode_plain(PlainFloat::BF16, &[0x80, 0x3f, 0x40, 0xc0], &mut out);
        assert_eq!(out, [1.0, -3.0]);
        decode_plain(
            PlainFloat::F32,
            &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40],
            &mut out,
        );
        assert_eq!(out, [1.0, 2.0]);
    }

    #[test]
    fn fp8_blocks_including_edges() {
        // 130 x 129 matrix: 2 x 2 blocks, the last row/column blocks are partial.
        let (rows, cols) = (130usize, 129usize);
        let mut w = vec![0x38u8; rows * cols]; // 1.0 everywhere
        w[0] = 0x40; // 2.0 at (0,0)
        w[129 * cols + 128] = 0xb9; // -1.125 at (129,128), the corner edge block
        let scales = [
            e8m0_to_f32(127),
            e8m0_to_f32(128),
            e8m0_to_f32(126),
            e8m0_to_f32(0),
        ];
        let mut out = vec![0.0f32; rows * cols];
        dequant_fp8_rows(&w, cols, &scales, 0, rows, &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[1], 1.0);
        assert_eq!(out[127], 1.0);
        assert_eq!(out[128], 2.0); // block (0,1), scale 2
        assert_eq!(out[127 * cols + 128], 2.0);
        assert_eq!(out[128 * cols], 0.5); // block (1,0), scale 0.5
        assert_eq!(out[129 * cols + 127], 0.5);
        assert_eq!(out[128 * cols + 128], 2f32.powi(-127)); // block (1,1), scale code 0
        assert_eq!(out[129 * cols + 128], -1.125 * 2f32.powi(-127));
        // A row range gives the same rows.
        let mut part = vec![0.0f32; 2 * cols];
        dequant_fp8_rows(&w, cols, &scales, 128, 2, &mut part);
        assert_eq!(&part[..], &out[128 * cols..]);
    }

    #[test]
    fn fp4_low_nibble_first() {
        // One row of 64 inputs = 2 blocks.
        let mut w = vec![0u8; 32];
        w[0] = 0x72; // element 0: code 2 (1.0), element 1: code 7 (6.0)
        w[1] = 0x9f; // element 2: code 15 (-6.0), element 3: code 9 (-0.5)
        w[16] = 0x05; // element 32: code 5 (3.0), element 33: 0
        let scales = [e8m0_to_f32(127), e8m0_to_f32(125)]; // 1, 0.25
        let mut out = vec![0.0f32; 64];
        dequant_fp4_rows(&w, 64, &scales, 0, 1, &mut out);
        assert_eq!(&out[..4], &[1.0, 6.0, -6.0, -0.5]);
        assert_eq!(out[4], 0.0);
        assert_eq!(out[32], 0.75);
        assert_eq!(out[33], 0.0);
        // Nibble 8 is negative zero.
        let w2 = [0x08u8; 16];
        let mut out2 = [1.0f32; 32];
        dequant_fp4_rows(&w2, 32, &[1.0], 0, 1, &mut out2);
        assert!(out2[0] == 0.0 && out2[0].is_sign_negative());
    }
}
