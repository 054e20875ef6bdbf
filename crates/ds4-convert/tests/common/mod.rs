//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// `/work/shared/fixtures` (the large fixture sets), if present.
pub fn shared_fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    p.is_dir().then_some(p)
}

/// The tiny official checkpoint committed in the repository.
pub fn repo_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/official")
}

/// The tiny set's `tensor_map.tsv` rows: (official, gguf, hf).
pub fn tensor_map(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c[0].to_string(), c[1].to_string(), c[2].to_string())
        })
        .collect()
}

/// An owned safetensors tensor for building corrupted checkpoints.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a safetensors file.
pub fn read_all(path: &Path) -> Vec<OwnedTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<OwnedTensor> = st
        .iter()
        .map(|(n, v)| OwnedTensor {
            name: n.to_string(),
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Write tensors as one `model.safetensors` plus `config.json` into `dir`.
pub fn write_checkpoint(dir: &Path, tensors: &[OwnedTensor], config: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// The tiny config.
pub fn tiny_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo_tiny().join("config.json")).unwrap())
        .unwrap()
}

/// bf16 bits → f32.
pub fn bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Decode little-endian f32 data.
pub fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Write tensors as `n_shards` shards (round-robin, so consecutive tensors alternate between
/// shards) with a `model.safetensors.index.json`, plus `config.json`.
pub fn write_sharded_checkpoint(
    dir: &Path,
    tensors: &[OwnedTensor],
    config: &serde_json::Value,
    n_shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut map = serde_json::Map::new();
    for s in 0..n_shards {
        let file = format!("model-{:05}-of-{n_shards:05}.safetensors", s + 1);
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n_shards == s)
            .map(|(_, t)| {
                map.insert(t.name.clone(), file.clone().into());
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}
