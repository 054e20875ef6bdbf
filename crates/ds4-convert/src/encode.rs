//! f32 rows → GGUF tensor bytes for the recipe types.

use ds4_gguf::GgmlType;

/// Whether [`encode`] can produce `ty`.
pub fn supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::I32)
}

/// Encode `src` (rows of `ne0` values) as `ty`. `importance` (one weight per column) is used by
/// the importance-aware quantizers.
pub fn encode(
    ty: GgmlType,
    src: &[f32],
    ne0: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, String> {
    let _ = importance;
    if ne0 == 0 || !src.len().is_multiple_of(ne0) {
        return Err(format!("{} values do not form rows of {ne0}", src.len()));
    }
    match ty {
        GgmlType::F32 => Ok(src.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(src
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect()),
        other => Err(format!("no encoder for {other}")),
    }
}
