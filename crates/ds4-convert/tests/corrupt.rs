//! Checkpoints the converter must refuse, with the error naming what is wrong, and without
//! leaving an output file behind.

mod common;

use std::path::Path;

use common::*;
use ds4_convert::{ConvertError, ConvertOptions, Recipe, convert_checkpoint, inspect_checkpoint};
use safetensors::Dtype;

fn tiny_tensors() -> Vec<OwnedTensor> {
    read_all(&repo_tiny().join("model.safetensors"))
}

fn take(ts: &mut Vec<OwnedTensor>, name: &str) -> OwnedTensor {
    let i = ts
        .iter()
        .position(|t| t.name == name)
        .unwrap_or_else(|| panic!("{name} not in the tiny checkpoint"));
    ts.remove(i)
}

fn get<'a>(ts: &'a mut [OwnedTensor], name: &str) -> &'a mut OwnedTensor {
    ts.iter_mut().find(|t| t.name == name).unwrap()
}

/// Convert a modified tiny checkpoint; return the error and check nothing was written and that
/// the dry run refuses it too.
fn convert_err(
    tensors: &[OwnedTensor],
    config: &serde_json::Value,
    recipe: Recipe,
) -> ConvertError {
    convert_err_impl(tensors, config, recipe, true)
}

/// As [`convert_err`], for faults only found while streaming the data (the dry run does not
/// read weight data).
fn convert_err_streaming(
    tensors: &[OwnedTensor],
    config: &serde_json::Value,
    recipe: Recipe,
) -> ConvertError {
    convert_err_impl(tensors, config, recipe, false)
}

fn convert_err_impl(
    tensors: &[OwnedTensor],
    config: &serde_json::Value,
    recipe: Recipe,
    dry_run_refuses: bool,
) -> ConvertError {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    write_checkpoint(&ck, tensors, config);
    let out = dir.path().join("out.gguf");
    let err = convert_checkpoint(&ck, &out, &ConvertOptions::new(recipe), &mut |_| {})
        .expect_err("conversion should fail");
    assert_no_output(dir.path());
    assert_eq!(inspect_checkpoint(&ck, recipe).is_err(), dry_run_refuses);
    err
}

fn assert_no_output(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        let name = name.to_string_lossy();
        assert!(
            !name.starts_with("out.gguf"),
            "output {name} was left behind"
        );
    }
}

#[test]
fn the_unmodified_copy_converts() {
    // Baseline for the tests below: the single-file rewrite of the tiny checkpoint is accepted.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    write_checkpoint(&ck, &tiny_tensors(), &tiny_config());
    let out = dir.path().join("out.gguf");
    convert_checkpoint(&ck, &out, &ConvertOptions::new(Recipe::F32), &mut |_| {}).unwrap();
    assert!(out.exists());
}

#[test]
fn missing_tensors_are_named() {
    for name in [
        "layers.3.ffn.gate.bias",
        "layers.0.ffn.experts.5.w2.weight",
        "layers.2.attn.indexer.compressor.ape",
        "layers.0.ffn.gate.tid2eid",
        "hc_head_fn",
        "layers.0.attn.wq_a.scale",
        "layers.4.ffn.experts.7.w1.scale",
    ] {
        let mut ts = tiny_tensors();
        take(&mut ts, name);
        // Drop the orphaned scale with its weight, so the weight itself is what is missing.
        if let Some(stem) = name.strip_suffix(".weight") {
            let scale = format!("{stem}.scale");
            if ts.iter().any(|t| t.name == scale) {
                take(&mut ts, &scale);
            }
        }
        match convert_err(&ts, &tiny_config(), Recipe::F32) {
            ConvertError::MissingTensor { name: n, .. } => assert_eq!(n, name),
            e => panic!("{name}: unexpected error {e}"),
        }
    }
}

#[test]
fn wrong_dtypes_are_refused() {
    // A norm stored as I16 (same byte size).
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.0.attn_norm.weight").dtype = Dtype::I16;
    match convert_err(&ts, &tiny_config(), Recipe::F32) {
        ConvertError::WrongDtype { name, found, .. } => {
            assert_eq!(name, "layers.0.attn_norm.weight");
            assert_eq!(found, "I16");
        }
        e => panic!("unexpected error {e}"),
    }
    // tid2eid stored as F64.
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.1.ffn.gate.tid2eid").dtype = Dtype::F64;
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::WrongDtype { name, .. } if name == "layers.1.ffn.gate.tid2eid"
    ));
    // Packed FP4 is only understood for routed experts.
    let mut ts = tiny_tensors();
    let t = get(&mut ts, "layers.0.ffn.gate.weight"); // BF16 [8, 128]
    t.dtype = Dtype::I8;
    t.shape = vec![8, 256];
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::WrongDtype { name, .. } if name == "layers.0.ffn.gate.weight"
    ));
    // A block scale of the wrong dtype.
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.0.attn.wkv.scale").dtype = Dtype::U8;
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::WrongDtype { name, .. } if name == "layers.0.attn.wkv.scale"
    ));
}

#[test]
fn wrong_shapes_are_refused() {
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.0.attn.attn_sink").shape = vec![2, 2];
    match convert_err(&ts, &tiny_config(), Recipe::F32) {
        ConvertError::WrongShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "layers.0.attn.attn_sink");
            assert_eq!(expected, vec![4]);
            assert_eq!(found, vec![2, 2]);
        }
        e => panic!("unexpected error {e}"),
    }
    // An FP8 matrix transposed (128 x 512 instead of 512 x 128); its scale transposed too.
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.1.attn.wq_b.weight").shape = vec![128, 512];
    get(&mut ts, "layers.1.attn.wq_b.scale").shape = vec![1, 4];
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::WrongShape { name, .. } if name == "layers.1.attn.wq_b.weight"
    ));
    // One expert with the wrong packed width.
    let mut ts = tiny_tensors();
    let t = get(&mut ts, "layers.5.ffn.experts.3.w2.weight"); // I8 [128, 64]
    t.shape = vec![64, 128];
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::WrongShape { name, .. } if name == "layers.5.ffn.experts.3.w2.weight"
    ));
}

#[test]
fn mismatching_scale_shapes_are_refused() {
    let mut ts = tiny_tensors();
    let s = get(&mut ts, "layers.0.attn.wq_b.scale"); // [4, 1]
    assert_eq!(s.shape, vec![4, 1]);
    s.shape = vec![2, 2];
    match convert_err(&ts, &tiny_config(), Recipe::F32) {
        ConvertError::ScaleShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "layers.0.attn.wq_b.scale");
            assert_eq!(expected, vec![4, 1]);
            assert_eq!(found, vec![2, 2]);
        }
        e => panic!("unexpected error {e}"),
    }
    let mut ts = tiny_tensors();
    let s = get(&mut ts, "layers.2.ffn.experts.0.w1.scale"); // [128, 4]
    assert_eq!(s.shape, vec![128, 4]);
    s.shape = vec![64, 8];
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::ScaleShape { name, .. } if name == "layers.2.ffn.experts.0.w1.scale"
    ));
}

#[test]
fn unknown_tensors_are_refused() {
    let extra = |name: &str, shape: Vec<usize>| OwnedTensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        data: vec![0u8; 4 * shape.iter().product::<usize>()],
        shape,
    };
    for t in [
        extra("layers.0.attn.extra_proj.weight", vec![4]),
        // Layer 6 does not exist in a 6-layer config.
        extra("layers.6.attn_norm.weight", vec![128]),
        // Layer 0 is sliding-window only: no compressor.
        extra("layers.0.attn.compressor.norm.weight", vec![128]),
        // Layer 3 is HCA: no indexer.
        extra("layers.3.attn.indexer.compressor.norm.weight", vec![32]),
        // Layer 3 is not hash-routed: no tid2eid.
        extra("layers.3.ffn.gate.tid2eid", vec![4096, 3]),
        // Expert 8 of 8.
        extra("layers.0.ffn.experts.8.w1.weight", vec![128, 128]),
        // No MTP layer in this config.
        extra("mtp.0.enorm.weight", vec![128]),
        extra("model.embed_tokens.weight", vec![4]),
    ] {
        let name = t.name.clone();
        let mut ts = tiny_tensors();
        ts.push(t);
        match convert_err(&ts, &tiny_config(), Recipe::F32) {
            ConvertError::UnknownTensor { name: n } => assert_eq!(n, name),
            e => panic!("{name}: unexpected error {e}"),
        }
    }
    // A block scale next to a weight that is not block-quantized.
    let mut ts = tiny_tensors();
    ts.push(OwnedTensor {
        name: "layers.0.attn_norm.scale".into(),
        dtype: Dtype::F8_E8M0,
        shape: vec![1],
        data: vec![127],
    });
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::UnexpectedScale { name, .. } if name == "layers.0.attn_norm.scale"
    ));
}

#[test]
fn mtp_tensors_are_skipped_when_the_config_has_an_mtp_layer() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    let mut ts = tiny_tensors();
    ts.push(OwnedTensor {
        name: "mtp.0.enorm.weight".into(),
        dtype: Dtype::F32,
        shape: vec![128],
        data: vec![0u8; 512],
    });
    let mut cfg = tiny_config();
    cfg["num_nextn_predict_layers"] = 1.into();
    write_checkpoint(&ck, &ts, &cfg);
    let out = dir.path().join("out.gguf");
    let rep =
        convert_checkpoint(&ck, &out, &ConvertOptions::new(Recipe::F32), &mut |_| {}).unwrap();
    assert_eq!(rep.skipped, vec!["mtp.0.enorm.weight".to_string()]);
}

#[test]
fn out_of_range_values_are_refused() {
    // An expert id >= n_expert in a hash table.
    let mut ts = tiny_tensors();
    let t = get(&mut ts, "layers.2.ffn.gate.tid2eid");
    t.data[8 * 100..8 * 101].copy_from_slice(&8i64.to_le_bytes());
    match convert_err(&ts, &tiny_config(), Recipe::F32) {
        ConvertError::ValueRange {
            name, index, value, ..
        } => {
            assert_eq!(name, "layers.2.ffn.gate.tid2eid");
            assert_eq!(index, 100);
            assert_eq!(value, 8);
        }
        e => panic!("unexpected error {e}"),
    }
    let mut ts = tiny_tensors();
    let t = get(&mut ts, "layers.0.ffn.gate.tid2eid");
    t.data[..8].copy_from_slice(&(-1i64).to_le_bytes());
    assert!(matches!(
        convert_err(&ts, &tiny_config(), Recipe::F32),
        ConvertError::ValueRange { value: -1, .. }
    ));
    // E8M0 code 255 (NaN) as a block scale.
    let mut ts = tiny_tensors();
    get(&mut ts, "layers.1.attn.wkv.scale").data[0] = 255;
    assert!(matches!(
        convert_err_streaming(&ts, &tiny_config(), Recipe::F32),
        ConvertError::ValueRange { name, .. } if name == "layers.1.attn.wkv.scale"
    ));
}

#[test]
fn bad_configs_are_refused() {
    let ts = tiny_tensors();
    let mut cfg = tiny_config();
    cfg.as_object_mut().unwrap().remove("index_topk");
    assert!(matches!(
        convert_err(&ts, &cfg, Recipe::F32),
        ConvertError::ConfigMissing { key } if key == "index_topk"
    ));
    let mut cfg = tiny_config();
    cfg["hc_mult"] = "4".into();
    assert!(matches!(
        convert_err(&ts, &cfg, Recipe::F32),
        ConvertError::ConfigType { key, .. } if key == "hc_mult"
    ));
    // A config that disagrees with the tensors: every tensor's shape is checked against it.
    let mut cfg = tiny_config();
    cfg["q_lora_rank"] = 256.into();
    assert!(matches!(
        convert_err(&ts, &cfg, Recipe::F32),
        ConvertError::WrongShape { .. }
    ));
    // Fewer layers in the config than in the checkpoint: the extra layers are unknown.
    let mut cfg = tiny_config();
    cfg["num_hidden_layers"] = 5.into();
    assert!(matches!(
        convert_err(&ts, &cfg, Recipe::F32),
        ConvertError::UnknownTensor { name } if name.starts_with("layers.5.")
    ));
    // Invalid JSON.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    write_checkpoint(&ck, &ts, &tiny_config());
    std::fs::write(ck.join("config.json"), "{ not json").unwrap();
    let out = dir.path().join("out.gguf");
    assert!(matches!(
        convert_checkpoint(&ck, &out, &ConvertOptions::new(Recipe::F32), &mut |_| {}),
        Err(ConvertError::Json { .. })
    ));
    assert_no_output(dir.path());
}

#[test]
fn bad_indexes_and_shards_are_refused() {
    let ts = tiny_tensors();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ckpt");
    write_checkpoint(&ck, &ts, &tiny_config());
    let out = dir.path().join("out.gguf");
    let run = || convert_checkpoint(&ck, &out, &ConvertOptions::new(Recipe::F32), &mut |_| {});
    let names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
    let index = |extra: Option<(&str, &str)>, drop: Option<&str>| {
        let mut map = serde_json::Map::new();
        for n in &names {
            if Some(n.as_str()) != drop {
                map.insert(n.clone(), "model.safetensors".into());
            }
        }
        if let Some((n, f)) = extra {
            map.insert(n.into(), f.into());
        }
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string()
    };
    let idx = ck.join("model.safetensors.index.json");
    // Listed but absent from its shard.
    std::fs::write(&idx, index(Some(("norm.extra", "model.safetensors")), None)).unwrap();
    assert!(matches!(run(), Err(ConvertError::NotInShard { name, .. }) if name == "norm.extra"));
    // A shard path escaping the folder.
    std::fs::write(&idx, index(Some(("x", "../model.safetensors")), None)).unwrap();
    assert!(matches!(run(), Err(ConvertError::Index { .. })));
    // A shard holding a tensor the index does not list.
    std::fs::write(&idx, index(None, Some("norm.weight"))).unwrap();
    assert!(matches!(run(), Err(ConvertError::Index { .. })));
    // A missing shard file.
    std::fs::write(&idx, index(Some(("x", "model-2.safetensors")), None)).unwrap();
    assert!(matches!(run(), Err(ConvertError::Io { .. })));
    // A truncated shard.
    std::fs::remove_file(&idx).unwrap();
    let st = ck.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(run(), Err(ConvertError::Safetensors { .. })));
    // No checkpoint at all.
    std::fs::remove_file(&st).unwrap();
    assert!(matches!(run(), Err(ConvertError::Io { .. })));
    assert_no_output(dir.path());
}

#[test]
fn recipe_block_sizes_are_checked_before_writing() {
    // hidden 128: routed expert rows cannot be IQ2_XXS / Q4_K (256-blocks).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    for recipe in [Recipe::Q2, Recipe::Q4] {
        let err = convert_checkpoint(
            &repo_tiny(),
            &out,
            &ConvertOptions::new(recipe),
            &mut |_| {},
        )
        .unwrap_err();
        match &err {
            ConvertError::BlockSize {
                tensor, ne0, block, ..
            } => {
                assert_eq!(tensor, "blk.0.ffn_gate_exps.weight");
                assert_eq!((*ne0, *block), (128, 256));
            }
            e => panic!("unexpected error {e}"),
        }
        assert!(err.to_string().contains("blk.0.ffn_gate_exps.weight"));
        assert_no_output(dir.path());
    }
    // q8_0 fits the tiny model (every row a multiple of 32).
    convert_checkpoint(
        &repo_tiny(),
        &out,
        &ConvertOptions::new(Recipe::Q8_0),
        &mut |_| {},
    )
    .unwrap();
}
