//! Converting the tiny fixture model: exactness against the HF weights, inventory, metadata.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use ds4_convert::{ConvertOptions, Recipe, convert_checkpoint};
use ds4_gguf::{GgmlType, Gguf};
use ds4_model::Shape;
use safetensors::{Dtype, SafeTensors};

fn convert_tiny(recipe: Recipe) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("tiny-{recipe}.gguf"));
    let mut last = None;
    let report = convert_checkpoint(&repo_tiny(), &out, &ConvertOptions::new(recipe), &mut |p| {
        last = Some(p)
    })
    .unwrap();
    let last = last.unwrap();
    assert!(last.tensor_done);
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(last.index + 1, last.n_tensors);
    assert_eq!(report.n_tensors, last.n_tensors);
    assert_eq!(report.file_bytes, std::fs::metadata(&out).unwrap().len());
    assert!(report.skipped.is_empty());
    (dir, out)
}

/// f32 conversion of the tiny checkpoint equals the HF bf16 weights bit for bit.
#[test]
fn tiny_f32_equals_hf_weights_bit_for_bit() {
    let Some(fx) = shared_fixtures() else {
        eprintln!("skipped: ../shared/fixtures is absent");
        return;
    };
    let (_dir, out) = convert_tiny(Recipe::F32);
    let g = Gguf::open(&out).unwrap();
    let shape = Shape::from_gguf(&g).unwrap();
    assert_eq!(shape.n_layer, 6);
    assert_eq!(shape.n_embd, 128);

    let hf_bytes = std::fs::read(fx.join("tiny/hf/model.safetensors")).unwrap();
    let hf = SafeTensors::deserialize(&hf_bytes).unwrap();
    let map = tensor_map(&fx.join("tiny/tensor_map.tsv"));

    // Expected values per GGUF tensor, assembled from the HF tensors.
    let mut expected: HashMap<String, Vec<u32>> = HashMap::new();
    let hf_f32 = |name: &str| -> Vec<f32> {
        let v = hf.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::BF16, "{name}");
        v.data()
            .chunks_exact(2)
            .map(|b| bf16(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    };
    let mut expert_rows: HashMap<String, Vec<(usize, Vec<f32>)>> = HashMap::new();
    for (_official, gguf, hfname) in &map {
        if let Some((base, idx)) = hfname.split_once('[') {
            // model.layers.L.mlp.experts.gate_up_proj[E, :F] / [E, F:] / down_proj[E]
            let idx = idx.trim_end_matches(']');
            let parts: Vec<&str> = idx.split(',').map(str::trim).collect();
            let e: usize = parts[0].parse().unwrap();
            let v = hf.tensor(base).unwrap();
            let sh = v.shape().to_vec(); // [E, rows, cols]
            let all = hf_f32(base);
            let per = sh[1] * sh[2];
            let mat = &all[e * per..(e + 1) * per];
            let rows: Vec<f32> = if parts.len() == 1 {
                mat.to_vec()
            } else {
                let sel = parts[1];
                let (lo, hi) = if let Some(hi) = sel.strip_prefix(':') {
                    (0, hi.parse::<usize>().unwrap())
                } else {
                    (sel.trim_end_matches(':').parse::<usize>().unwrap(), sh[1])
                };
                mat[lo * sh[2]..hi * sh[2]].to_vec()
            };
            expert_rows.entry(gguf.clone()).or_default().push((e, rows));
        } else if hfname.ends_with("tid2eid") {
            let v = hf.tensor(hfname).unwrap();
            assert_eq!(v.dtype(), Dtype::I64);
            let ids: Vec<u32> = v
                .data()
                .chunks_exact(8)
                .map(|b| {
                    let x = i64::from_le_bytes(b.try_into().unwrap());
                    (x as i32) as u32
                })
                .collect();
            expected.insert(gguf.clone(), ids);
        } else {
            let vals = hf_f32(hfname);
            expected.insert(gguf.clone(), vals.iter().map(|v| v.to_bits()).collect());
        }
    }
    for (gguf, mut rows) in expert_rows {
        rows.sort_by_key(|(e, _)| *e);
        let flat: Vec<u32> = rows
            .into_iter()
            .enumerate()
            .flat_map(|(i, (e, r))| {
                assert_eq!(i, e);
                r.into_iter().map(f32::to_bits)
            })
            .collect();
        expected.insert(gguf, flat);
    }

    // The file holds exactly the tensors of the tensor map, with the HF values.
    let names: BTreeSet<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    let want: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(names, want);
    let mut n_checked = 0usize;
    for t in g.tensors() {
        let data = g.data_of(t);
        let got: Vec<u32> = if t.ty == GgmlType::I32 {
            data.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        } else {
            assert_eq!(t.ty, GgmlType::F32, "{}", t.name);
            f32s(data).into_iter().map(f32::to_bits).collect()
        };
        let exp = &expected[&t.name];
        assert_eq!(got.len(), exp.len(), "{}", t.name);
        if let Some(i) = (0..got.len()).find(|&i| got[i] != exp[i]) {
            panic!(
                "{}: element {i} is {:#010x}, HF has {:#010x}",
                t.name, got[i], exp[i]
            );
        }
        n_checked += got.len();
    }
    // Every parameter of the model was compared (5.88 M + the tid2eid tables).
    assert_eq!(n_checked, 5_884_473);
}

/// The inventory and metadata of the tiny GGUF, with the type of every tensor, for f32 and f16.
#[test]
fn tiny_inventory_and_metadata() {
    let (_dir, out) = convert_tiny(Recipe::F16);
    let g = Gguf::open(&out).unwrap();
    let shape = Shape::from_gguf(&g).unwrap();
    let map = tensor_map(&repo_tiny().join("../tensor_map.tsv"));
    let want: BTreeSet<&str> = map.iter().map(|(_, g, _)| g.as_str()).collect();
    let got: BTreeSet<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(got, want);
    for t in g.tensors() {
        let vector = t.dims.len() == 1;
        let want_ty = if t.name.ends_with("tid2eid.weight") {
            GgmlType::I32
        } else if vector {
            GgmlType::F32
        } else {
            GgmlType::F16
        };
        assert_eq!(t.ty, want_ty, "{}", t.name);
    }
    let get = |n: &str| g.tensor_info(n).unwrap().dims.clone();
    assert_eq!(get("token_embd.weight"), vec![128, 4096]);
    assert_eq!(get("output_hc_fn.weight"), vec![512, 4]);
    assert_eq!(get("blk.0.hc_attn_fn.weight"), vec![512, 24]);
    assert_eq!(get("blk.0.ffn_gate_exps.weight"), vec![128, 128, 8]);
    assert_eq!(get("blk.0.ffn_gate_tid2eid.weight"), vec![3, 4096]);
    assert_eq!(get("blk.2.attn_compressor_ape.weight"), vec![256, 4]);
    assert_eq!(get("blk.3.attn_compressor_ape.weight"), vec![128, 128]);
    assert_eq!(get("blk.2.indexer_compressor_ape.weight"), vec![64, 4]);
    assert_eq!(get("blk.0.attn_output_a.weight"), vec![256, 256]);
    assert_eq!(shape.compress_ratios, vec![0, 0, 4, 128, 4, 128]);
    assert_eq!(
        g.get(ds4_convert::RECIPE_KEY).unwrap().as_str(),
        Some("f16")
    );
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("deepseek4")
    );
    assert!(g.get("general.name").unwrap().as_str().is_some());
    assert_eq!(g.get("general.file_type").unwrap().as_u32(), Some(1));
    // No tokenizer requested: no tokenizer keys.
    assert!(
        g.metadata()
            .iter()
            .all(|(k, _)| !k.starts_with("tokenizer."))
    );

    // f16 values are the f32 values rounded to half (all tiny weights are bf16-exact; compare
    // against the f32 file).
    let (_dir32, out32) = convert_tiny(Recipe::F32);
    let g32 = Gguf::open(&out32).unwrap();
    for t in g.tensors().iter().filter(|t| t.ty == GgmlType::F16) {
        let a = g.data_of(t);
        let b = f32s(g32.tensor_data(&t.name).unwrap());
        for (i, (h, f)) in a.chunks_exact(2).zip(&b).enumerate() {
            let h = u16::from_le_bytes([h[0], h[1]]);
            assert_eq!(h, half::f16::from_f32(*f).to_bits(), "{} [{i}]", t.name);
        }
    }
}

#[test]
fn name_option_and_no_partial_file_left() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("named.gguf");
    let opts = ConvertOptions {
        name: Some("tiny test".into()),
        ..ConvertOptions::new(Recipe::F32)
    };
    convert_checkpoint(&repo_tiny(), &out, &opts, &mut |_| {}).unwrap();
    let g = Gguf::open(&out).unwrap();
    assert_eq!(g.get("general.name").unwrap().as_str(), Some("tiny test"));
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("named.gguf")]);
}

/// A checkpoint split into several shards (more than are kept mapped at once) converts to the
/// same bytes as the single-file one.
#[test]
fn sharded_checkpoint_converts_identically() {
    let tensors = read_all(&repo_tiny().join("model.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let sharded = dir.path().join("sharded");
    write_sharded_checkpoint(&sharded, &tensors, &tiny_config(), 5);
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    for (input, out) in [(repo_tiny(), &a), (sharded, &b)] {
        convert_checkpoint(&input, out, &ConvertOptions::new(Recipe::Q8_0), &mut |_| {}).unwrap();
    }
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}
