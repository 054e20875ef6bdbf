//! Bit-exactness against gguf-py 0.19.0 through committed fixtures (scripts/quant_fixtures.py).

mod common;

use common::{Fixture, same_f32};
use ds4_quant::{GgmlType, dequantize, quantize};

fn check_exact(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| !same_f32(got[i], want[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: {} of {} values differ; first at {}: got {:e} ({:#x}) want {:e} ({:#x})",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        got[bad[0]].to_bits(),
        want[bad[0]],
        want[bad[0]].to_bits()
    );
}

#[test]
fn dequantize_matches_gguf_py_bit_exact() {
    for name in [
        "F32", "F16", "BF16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS", "Q8_K",
    ] {
        let fx = Fixture::load(&format!("deq_{name}.fix"));
        let ty = GgmlType::from_id(fx.u32s("type")[0]).unwrap();
        assert_eq!(ty.name(), name);
        let bytes = fx.u8s("bytes");
        let want = fx.f32s("f32");
        let mut got = vec![0.0f32; want.len()];
        dequantize(ty, bytes, &mut got).unwrap();
        check_exact(name, &got, want);
        // Same through a misaligned copy of the bytes (the copying fallback path).
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        let mut got2 = vec![0.0f32; want.len()];
        dequantize(ty, &shifted[1..], &mut got2).unwrap();
        check_exact(name, &got2, want);
    }
}

#[test]
fn quantizers_reproduce_fixture_bytes_and_gguf_py_dequantizes_them_identically() {
    for name in [
        "F16",
        "BF16",
        "Q8_0",
        "Q2_K",
        "Q2_K_imp",
        "Q4_K",
        "Q4_K_imp",
        "IQ2_XXS",
        "IQ2_XXS_imp",
    ] {
        let fx = Fixture::load(&format!("quant_{name}.fix"));
        let ty = GgmlType::from_id(fx.u32s("type")[0]).unwrap();
        let ne0 = fx.u32s("ne0")[0] as usize;
        let input = fx.f32s("input");
        let imp = fx.opt_f32s("importance");
        let bytes = fx.u8s("bytes");
        // Our quantizer is deterministic: same bytes as when the fixture was written (for Q8_0,
        // F16 and BF16 these are also gguf-py's quantizer bytes; all were checked against GGML).
        let q = quantize(ty, input, ne0, imp).unwrap();
        assert!(
            q == bytes,
            "{name}: quantized bytes differ from the fixture"
        );
        // gguf-py's dequantization of our bytes equals ours.
        let want = fx.f32s("f32");
        let mut got = vec![0.0f32; want.len()];
        dequantize(ty, bytes, &mut got).unwrap();
        check_exact(name, &got, want);
    }
}
