//! Scalar float conversions with ds4/GGML semantics.

/// IEEE binary16 → f32 (exact; subnormals, infinities and NaN payloads preserved).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man · 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            sign | v.to_bits()
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 → IEEE binary16 bits, round-to-nearest-even; overflow → ±inf; NaN → sign | 0x7e00
/// (ds4's `f32_to_f16`, the GGML FP16 conversion).
#[inline]
pub fn f32_to_f16(f: f32) -> u16 {
    // Port of the branch-free GGML/FP16 algorithm; all float steps are exact IEEE operations.
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xFF00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xFF00_0000 {
            0x7E00
        } else {
            nonsign
        }) as u16
}

/// `f16_to_f32(f32_to_f16(x))`.
#[inline]
pub fn f16_round(x: f32) -> f32 {
    f16_to_f32(f32_to_f16(x))
}

/// bfloat16 → f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 → bfloat16 bits, round-to-nearest-even; NaN → quiet NaN (GGML `ggml_compute_fp32_to_bf16`).
#[inline]
pub fn f32_to_bf16(f: f32) -> u16 {
    let bits = f.to_bits();
    if (bits & 0x7fff_ffff) > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    ((bits as u64 + (0x7fff + ((bits >> 16) & 1)) as u64) >> 16) as u16
}

/// GGML `nearest_int`: round-half-even via the 1.5·2^23 magic constant. Exact for
/// `|x| ≤ 4194303`; for larger or non-finite `x` it returns an unspecified value in ±2^22
/// (GGML asserts instead), never panics.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// C `lrintf` (current rounding mode = nearest-even), saturating instead of UB for huge or NaN
/// input (NaN → 0). Only used where the result is then clamped to the int8 range.
#[inline]
pub(crate) fn lrint_sat(x: f32) -> i32 {
    x.round_ties_even() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn f16_to_f32_exhaustive_vs_half() {
        for h in 0..=u16::MAX {
            let a = f16_to_f32(h);
            let b = f16::from_bits(h).to_f32();
            if b.is_nan() {
                assert!(a.is_nan(), "{h:#x}");
                assert_eq!(a.to_bits() & 0x8000_0000, b.to_bits() & 0x8000_0000);
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn f32_to_f16_vs_half_rne() {
        // Every f16 value, the midpoints between neighbours (ties), and a stride over all f32.
        let check = |x: f32| {
            let a = f32_to_f16(x);
            if x.is_nan() {
                assert_eq!(a & 0x7fff, 0x7e00);
                assert_eq!(a & 0x8000, ((x.to_bits() >> 16) & 0x8000) as u16);
            } else {
                assert_eq!(a, f16::from_f32(x).to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        };
        for h in 0..=u16::MAX {
            let x = f16::from_bits(h).to_f32();
            check(x);
            let next = f16::from_bits(h.wrapping_add(1)).to_f32();
            if x.is_finite() && next.is_finite() && (h & 0x7fff) != 0x7bff {
                check(((x as f64 + next as f64) / 2.0) as f32);
            }
        }
        let mut bits: u32 = 0;
        while let Some(b) = bits.checked_add(65_537) {
            check(f32::from_bits(b));
            bits = b;
        }
        check(65520.0);
        check(65519.99);
        check(-1e9);
        check(f32::NAN);
        check(-f32::NAN);
    }

    #[test]
    fn bf16_conversions() {
        let mut bits: u32 = 0;
        while let Some(b) = bits.checked_add(40_961) {
            let x = f32::from_bits(b);
            let a = f32_to_bf16(x);
            if x.is_nan() {
                assert!(bf16_to_f32(a).is_nan());
            } else {
                assert_eq!(a, bf16::from_f32(x).to_bits(), "{:#x}", b);
            }
            bits = b;
        }
        for h in 0..=u16::MAX {
            let b = bf16::from_bits(h).to_f32();
            if !b.is_nan() {
                assert_eq!(bf16_to_f32(h).to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn nearest_int_is_round_half_even_in_range() {
        for &(x, r) in &[
            (0.5f32, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (3.49, 3),
            (-3.51, -4),
            (4194303.0, 4194303),
            (-4194303.0, -4194303),
        ] {
            assert_eq!(nearest_int(x), r, "{x}");
            assert_eq!(lrint_sat(x), r, "{x}");
        }
        // Out of range: no panic.
        let _ = nearest_int(f32::NAN);
        let _ = nearest_int(1e30);
        assert_eq!(lrint_sat(f32::NAN), 0);
        assert_eq!(lrint_sat(1e30), i32::MAX);
    }
}
