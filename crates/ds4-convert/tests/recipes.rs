//! Every recipe on the flashdims model (hidden 256, expert width 256, so the K-quants and
//! IQ2_XXS apply): the files load as the same shape, every tensor has the type of ds4's
//! published recipe, and the quantized values stay within each format's resolution of the exact
//! (f32) conversion.

mod common;

use std::collections::BTreeSet;

use common::*;
use ds4_convert::{ConvertOptions, Recipe, convert_checkpoint};
use ds4_gguf::{GgmlType, Gguf};
use ds4_model::Shape;

/// The type ds4's published files (and our recipes) give a tensor, written out by name.
fn expected_type(name: &str, ndim: usize, recipe: Recipe) -> GgmlType {
    use GgmlType as G;
    if name.ends_with("ffn_gate_tid2eid.weight") {
        return G::I32;
    }
    if ndim == 1 {
        return G::F32;
    }
    match recipe {
        Recipe::F32 => return G::F32,
        Recipe::F16 => return G::F16,
        _ => {}
    }
    let gate_up = name.ends_with("ffn_gate_exps.weight") || name.ends_with("ffn_up_exps.weight");
    let down = name.ends_with("ffn_down_exps.weight");
    if gate_up || down {
        return match (recipe, gate_up) {
            (Recipe::Q2, true) => G::IQ2_XXS,
            (Recipe::Q2, false) => G::Q2_K,
            (Recipe::Q4, _) => G::Q4_K,
            _ => G::Q8_0,
        };
    }
    let q8 = [
        ".attn_q_a.weight",
        ".attn_q_b.weight",
        ".attn_kv.weight",
        ".attn_output_a.weight",
        ".attn_output_b.weight",
        "_shexp.weight",
    ];
    // (`blk.L.indexer.attn_q_b.weight` is an indexer tensor, F16 in ds4's files.)
    let indexer = name.contains(".indexer.");
    if name == "output.weight" || (!indexer && q8.iter().any(|s| name.ends_with(s))) {
        G::Q8_0
    } else {
        // token_embd, HC fn, router, compressor, indexer, ape.
        G::F16
    }
}

fn rel_rms(exact: &[f32], approx: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in exact.iter().zip(approx) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn every_recipe_on_flashdims() {
    let Some(fx) = shared_fixtures() else {
        eprintln!("skipped: ../shared/fixtures is absent");
        return;
    };
    let input = fx.join("flashdims/official");
    let map = tensor_map(&fx.join("flashdims/tensor_map.tsv"));
    let want_names: BTreeSet<&str> = map.iter().map(|(_, g, _)| g.as_str()).collect();
    let dir = tempfile::tempdir().unwrap();

    let exact_path = dir.path().join("f32.gguf");
    convert_checkpoint(
        &input,
        &exact_path,
        &ConvertOptions::new(Recipe::F32),
        &mut |_| {},
    )
    .unwrap();
    let exact = Gguf::open(&exact_path).unwrap();
    let shape = Shape::from_gguf(&exact).unwrap();
    assert_eq!(
        (shape.n_embd, shape.head_dim, shape.n_ff_exp),
        (256, 512, 256)
    );

    // Largest relative RMS error per quantized type over all tensors of that type.
    let mut worst: Vec<(GgmlType, f64)> = Vec::new();
    for recipe in Recipe::ALL {
        let path = dir.path().join(format!("{recipe}.gguf"));
        let report =
            convert_checkpoint(&input, &path, &ConvertOptions::new(recipe), &mut |_| {}).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(Shape::from_gguf(&g).unwrap(), shape, "{recipe}");
        assert_eq!(
            g.get(ds4_convert::RECIPE_KEY).unwrap().as_str(),
            Some(recipe.name())
        );
        let names: BTreeSet<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, want_names, "{recipe}");
        assert_eq!(report.n_tensors, want_names.len());
        for t in g.tensors() {
            let want = expected_type(&t.name, t.dims.len(), recipe);
            assert_eq!(t.ty, want, "{recipe}: {}", t.name);
            let e = exact.tensor_info(&t.name).unwrap();
            assert_eq!(t.dims, e.dims, "{recipe}: {}", t.name);
            let data = g.data_of(t);
            if t.ty == GgmlType::I32 || t.ty == GgmlType::F32 {
                assert_eq!(data, exact.data_of(e), "{recipe}: {}", t.name);
                continue;
            }
            let ref_vals = f32s(exact.data_of(e));
            let got = ds4_quant::dequantize_to_vec(t.ty, data).unwrap();
            assert_eq!(got.len(), ref_vals.len());
            match t.ty {
                GgmlType::F16 => {
                    for (i, (a, b)) in ref_vals.iter().zip(&got).enumerate() {
                        assert_eq!(
                            *b,
                            half::f16::from_f32(*a).to_f32(),
                            "{recipe}: {} [{i}]",
                            t.name
                        );
                    }
                }
                GgmlType::Q8_0 => {
                    // Per 32-block: rounding to d = amax/127 (error <= d/2) plus the f16
                    // rounding of d (relative 2^-11, times |q| <= 127).
                    for (b, (x, y)) in ref_vals.chunks(32).zip(got.chunks(32)).enumerate() {
                        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let bound = amax / 254.0 * 1.001 + amax / 2048.0 + 1e-30;
                        for (a, q) in x.iter().zip(y) {
                            assert!(
                                (a - q).abs() <= bound,
                                "{recipe}: {} block {b}: {a} vs {q} (bound {bound})",
                                t.name
                            );
                        }
                    }
                }
                ty => {
                    let r = rel_rms(&ref_vals, &got);
                    match worst.iter_mut().find(|(t2, _)| *t2 == ty) {
                        Some((_, w)) => *w = w.max(r),
                        None => worst.push((ty, r)),
                    }
                }
            }
        }
    }
    // Relative RMS error of the low-bit expert formats on these FP4-grid weights. A tensor
    // written in the wrong order or with the wrong scales would be near or above 1.
    // Measured (deterministic quantizers): Q4_K 0.065, Q2_K 0.303, IQ2_XXS 0.353; the bounds
    // leave about 30 % headroom.
    for (ty, r) in &worst {
        eprintln!("{ty}: worst relative RMS error {r:.4}");
        let bound = match ty {
            GgmlType::Q4_K => 0.085,
            GgmlType::Q2_K => 0.40,
            GgmlType::IQ2_XXS => 0.46,
            _ => unreachable!(),
        };
        assert!(*r < bound, "{ty}: relative RMS error {r} >= {bound}");
    }
    assert_eq!(worst.len(), 3);
}
