//! f32 rows → GGUF tensor bytes for the recipe types (block formats through `ds4_quant`).

use ds4_gguf::GgmlType;

/// Whether the converter can produce `ty` (I32 is written directly for `tid2eid`; the others
/// through [`encode`]).
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::I32
            | GgmlType::F32
            | GgmlType::F16
            | GgmlType::Q8_0
            | GgmlType::Q2_K
            | GgmlType::Q4_K
            | GgmlType::IQ2_XXS
    )
}

/// Encode `src` (rows of `ne0` values) as `ty`. `importance` (one weight per column) is used by
/// Q2_K, Q4_K and IQ2_XXS; IQ2_XXS without it uses `Σ_rows w²` over the rows given (ds4's
/// fallback, so routed experts are encoded one expert at a time).
pub fn encode(
    ty: GgmlType,
    src: &[f32],
    ne0: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, String> {
    if ne0 == 0 || !src.len().is_multiple_of(ne0) {
        return Err(format!("{} values do not form rows of {ne0}", src.len()));
    }
    match ty {
        GgmlType::F32 => Ok(src.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(src
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect()),
        GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
            ds4_quant::quantize(ty, src, ne0, importance).map_err(|e| e.to_string())
        }
        other => Err(format!("no encoder for {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_types() {
        let b = encode(GgmlType::F32, &[1.0, -2.0], 2, None).unwrap();
        assert_eq!(b, [0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]);
        let b = encode(GgmlType::F16, &[1.0, -2.0], 1, None).unwrap();
        assert_eq!(b, [0x00, 0x3c, 0x00, 0xc0]);
        assert!(encode(GgmlType::F32, &[1.0, 2.0, 3.0], 2, None).is_err());
        assert!(encode(GgmlType::Q5_K, &[0.0; 256], 256, None).is_err());
        assert!(!supported(GgmlType::Q5_K));
    }

    #[test]
    fn block_types_round_trip_within_their_resolution() {
        // Two rows of 256 values.
        let src: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for (ty, tol) in [
            (GgmlType::Q8_0, 2.0 / 254.0 + 1e-3),
            (GgmlType::Q4_K, 2.0 / 15.0 + 0.05),
        ] {
            let b = encode(ty, &src, 256, None).unwrap();
            assert_eq!(b.len(), 2 * ty.block_bytes() * 256 / ty.block_size());
            let back = ds4_quant::dequantize_to_vec(ty, &b).unwrap();
            let max = src
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max <= tol, "{ty}: max error {max} > {tol}");
        }
        for ty in [GgmlType::Q2_K, GgmlType::IQ2_XXS] {
            let b = encode(ty, &src, 256, None).unwrap();
            assert_eq!(b.len(), 2 * ty.block_bytes());
        }
    }
}
