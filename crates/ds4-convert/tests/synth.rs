//! `ds4 synth`: deterministic synthetic files with ds4's inventory and sane values.

use ds4_convert::{Recipe, SynthOptions, plan_tensors, shape_from_official_config, synth_gguf};
use ds4_gguf::{GgmlType, Gguf};
use ds4_model::Shape;

/// Flash's per-head shapes with hidden 256 and expert width 256 (the flashdims model).
fn small_shape() -> Shape {
    let mut cfg: serde_json::Value =
        serde_json::from_str(include_str!("data/tiny_config.json")).unwrap();
    cfg["hidden_size"] = 256.into();
    cfg["moe_intermediate_size"] = 256.into();
    cfg["head_dim"] = 512.into();
    cfg["qk_rope_head_dim"] = 64.into();
    cfg["index_head_dim"] = 128.into();
    shape_from_official_config(&cfg).unwrap()
}

fn synth(dir: &std::path::Path, recipe: Recipe, seed: u64) -> std::path::PathBuf {
    let out = dir.join(format!("synth-{recipe}-{seed}.gguf"));
    let opts = SynthOptions {
        shape: small_shape(),
        recipe,
        seed,
        name: None,
        vocab: None,
    };
    let mut last = None;
    let rep = synth_gguf(&out, &opts, &mut |p| last = Some(p)).unwrap();
    let last = last.unwrap();
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(rep.file_bytes, std::fs::metadata(&out).unwrap().len());
    out
}

#[test]
fn synth_is_deterministic_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::fs::read(synth(dir.path(), Recipe::Q2, 1)).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let b = std::fs::read(synth(dir2.path(), Recipe::Q2, 1)).unwrap();
    assert!(a == b, "same seed, different bytes");
    let c = std::fs::read(synth(dir.path(), Recipe::Q2, 2)).unwrap();
    assert_eq!(a.len(), c.len());
    assert!(a != c, "different seeds, same bytes");
}

#[test]
fn synth_files_have_the_inventory_and_sane_values() {
    let dir = tempfile::tempdir().unwrap();
    let shape = small_shape();
    for recipe in [Recipe::Q2, Recipe::Q4, Recipe::F16] {
        let path = synth(dir.path(), recipe, 42);
        let g = Gguf::open(&path).unwrap();
        assert_eq!(Shape::from_gguf(&g).unwrap(), shape);
        let plan = plan_tensors(&shape, &|_| false);
        assert_eq!(g.tensors().len(), plan.len());
        for (info, t) in g.tensors().iter().zip(&plan) {
            assert_eq!(info.name, t.name);
            assert_eq!(info.dims, t.ne);
            assert_eq!(info.ty, recipe.tensor_type(t.class), "{}", t.name);
        }
        // The vocabulary loads, with ds4's specials.
        let tok = ds4_tokenizer::Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.vocab_size(), shape.n_vocab);
        assert_eq!(tok.bos_id(), 0);
        assert_eq!(tok.eos_id(), 1);
        let ids = tok.encode("hi").unwrap();
        assert_eq!(tok.decode(&ids), b"hi");

        for t in g.tensors() {
            let data = g.data_of(t);
            if t.ty == GgmlType::I32 {
                let ids: Vec<i32> = data
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                for row in ids.chunks(shape.n_expert_used) {
                    assert!(row.iter().all(|&e| (0..shape.n_expert as i32).contains(&e)));
                    for (i, e) in row.iter().enumerate() {
                        assert!(!row[..i].contains(e), "{}: repeated expert", t.name);
                    }
                }
                continue;
            }
            let v = ds4_quant::dequantize_to_vec(t.ty, data).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
            if t.dims.len() == 1 {
                let want = if t.name.ends_with("_norm.weight") || t.name.ends_with("_scale.weight")
                {
                    1.0
                } else {
                    0.0
                };
                assert!(v.iter().all(|&x| x == want), "{}", t.name);
                continue;
            }
            let want = if t.name == "token_embd.weight" {
                1.0
            } else if t.name.ends_with("_ape.weight") {
                0.5
            } else if t.name == "output.weight" {
                2.5 / (t.dims[0] as f64).sqrt()
            } else {
                1.0 / (t.dims[0] as f64).sqrt()
            };
            let n = v.len() as f64;
            let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n).sqrt();
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
            // Pools are scaled on a sample of 4096 blocks and rounded to f16: within 5 %.
            assert!(
                (rms / want - 1.0).abs() < 0.05,
                "{recipe} {}: rms {rms}, want {want}",
                t.name
            );
            assert!(mean.abs() < 0.1 * want, "{recipe} {}: mean {mean}", t.name);
        }
    }
}

#[test]
fn synth_refuses_shapes_the_recipe_cannot_store() {
    let mut cfg: serde_json::Value =
        serde_json::from_str(include_str!("data/tiny_config.json")).unwrap();
    cfg["num_hidden_layers"] = 4.into();
    cfg["compress_ratios"] = serde_json::json!([0, 0, 4, 128]);
    let shape = shape_from_official_config(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let opts = SynthOptions {
        shape,
        recipe: Recipe::Q2,
        seed: 1,
        name: None,
        vocab: None,
    };
    assert!(matches!(
        synth_gguf(&out, &opts, &mut |_| {}),
        Err(ds4_convert::ConvertError::BlockSize { .. })
    ));
    assert!(!out.exists());
}

/// Throughput on real Flash shapes: `DS4_SYNTH_BENCH_DIR=/dev/shm DS4_SYNTH_BENCH_LAYERS=3
/// cargo test -p ds4-convert --release --test synth -- --ignored --nocapture`.
#[test]
#[ignore]
fn synth_flash_speed() {
    let Ok(dir) = std::env::var("DS4_SYNTH_BENCH_DIR") else {
        eprintln!("skipped: DS4_SYNTH_BENCH_DIR is unset");
        return;
    };
    let layers = std::env::var("DS4_SYNTH_BENCH_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let out = std::path::Path::new(&dir).join("ds4-synth-bench.gguf");
    let opts = SynthOptions {
        shape: Shape::flash_layers(layers),
        ..SynthOptions::default()
    };
    let t0 = std::time::Instant::now();
    let rep = synth_gguf(&out, &opts, &mut |_| {}).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "flash {layers} layers q2: {:.2} GiB in {secs:.2} s = {:.2} GiB/s (pools {} MiB)",
        rep.file_bytes as f64 / (1u64 << 30) as f64,
        rep.file_bytes as f64 / (1u64 << 30) as f64 / secs,
        rep.pool_bytes >> 20
    );
    let g = Gguf::open(&out).unwrap();
    assert_eq!(Shape::from_gguf(&g).unwrap(), Shape::flash_layers(layers));
    drop(g);
    std::fs::remove_file(&out).unwrap();
}
