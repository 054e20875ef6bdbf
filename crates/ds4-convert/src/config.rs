//! The model [`Shape`] from an official DeepSeek V4 `config.json`.
//!
//! Official keys (as in the fixture configs and the released Flash config): `hidden_size`,
//! `num_hidden_layers`, `compress_ratios` (one entry per layer, an extra trailing entry for the
//! MTP layer is allowed), `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling {factor,
//! original_max_position_embeddings, beta_fast, beta_slow}`, `index_*`, `o_groups`,
//! `o_lora_rank`, `swiglu_limit`, `hc_*`, .... The HF transformers spellings of the same
//! information (`layer_types` + `compress_rates`, `mlp_layer_types`, `rope_parameters`,
//! `partial_rotary_factor`) are accepted when the official key is absent.

use ds4_model::Shape;
use serde_json::Value;

use crate::error::{ConvertError, Result};

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("array of {}", a.len()),
        Value::Object(_) => "object".into(),
    }
}

struct Cfg<'a> {
    root: &'a Value,
}

impl<'a> Cfg<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.root.get(key).filter(|v| !v.is_null())
    }

    fn need(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| ConvertError::ConfigMissing {
            key: key.to_string(),
        })
    }

    fn uint_of(key: &str, v: &Value) -> Result<usize> {
        let n = v
            .as_u64()
            .or_else(|| {
                // Accept integral floats such as 64.0.
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| ConvertError::ConfigType {
                key: key.to_string(),
                expected: "non-negative integer",
                found: describe(v),
            })?;
        usize::try_from(n).map_err(|_| ConvertError::ConfigValue {
            key: key.to_string(),
            found: n.to_string(),
            reason: "too large".into(),
        })
    }

    fn uint(&self, key: &str) -> Result<usize> {
        Self::uint_of(key, self.need(key)?)
    }

    fn float_of(key: &str, v: &Value) -> Result<f64> {
        let f = v.as_f64().ok_or_else(|| ConvertError::ConfigType {
            key: key.to_string(),
            expected: "number",
            found: describe(v),
        })?;
        if !f.is_finite() {
            return Err(ConvertError::ConfigValue {
                key: key.to_string(),
                found: f.to_string(),
                reason: "not finite".into(),
            });
        }
        Ok(f)
    }

    fn float(&self, key: &str) -> Result<f64> {
        Self::float_of(key, self.need(key)?)
    }
}

/// Build and validate the model shape from an official `config.json` value.
///
/// Fails with a typed error naming the key when a key is missing, has the wrong JSON type or
/// a value DeepSeek V4 does not have (non-yarn RoPE scaling, a scoring function other than
/// `sqrtsoftplus`, `norm_topk_prob = false`, ...), and with [`ConvertError::Shape`] when the
/// values are inconsistent (or claim Flash's hidden size without being Flash).
pub fn shape_from_official_config(config: &Value) -> Result<Shape> {
    if !config.is_object() {
        return Err(ConvertError::ConfigType {
            key: "(root)".into(),
            expected: "object",
            found: describe(config),
        });
    }
    let c = Cfg { root: config };

    // Values that are fixed in DeepSeek V4 and not representable in the GGUF: refuse others.
    if let Some(v) = c.get("scoring_func") {
        match v.as_str() {
            Some("sqrtsoftplus") => {}
            Some(s) => {
                return Err(ConvertError::ConfigValue {
                    key: "scoring_func".into(),
                    found: format!("{s:?}"),
                    reason: "DeepSeek V4 scores experts with sqrt(softplus)".into(),
                });
            }
            None => {
                return Err(ConvertError::ConfigType {
                    key: "scoring_func".into(),
                    expected: "string",
                    found: describe(v),
                });
            }
        }
    }
    if let Some(v) = c.get("norm_topk_prob") {
        match v.as_bool() {
            Some(true) => {}
            Some(false) => {
                return Err(ConvertError::ConfigValue {
                    key: "norm_topk_prob".into(),
                    found: "false".into(),
                    reason: "DeepSeek V4 renormalises the top-k weights".into(),
                });
            }
            None => {
                return Err(ConvertError::ConfigType {
                    key: "norm_topk_prob".into(),
                    expected: "bool",
                    found: describe(v),
                });
            }
        }
    }
    if let Some(v) = c.get("hidden_act")
        && v.as_str() != Some("silu")
    {
        return Err(ConvertError::ConfigValue {
            key: "hidden_act".into(),
            found: describe(v),
            reason: "DeepSeek V4 uses SwiGLU (silu)".into(),
        });
    }
    if let Some(v) = c.get("tie_word_embeddings")
        && v.as_bool() != Some(false)
    {
        return Err(ConvertError::ConfigValue {
            key: "tie_word_embeddings".into(),
            found: describe(v),
            reason: "DeepSeek V4 has a separate output head".into(),
        });
    }

    let n_layer = c.uint("num_hidden_layers")?;
    let head_dim = c.uint("head_dim")?;

    // Compress ratios: official `compress_ratios`, or HF `layer_types` + `compress_rates`.
    let compress_ratios: Vec<usize> = if let Some(v) = c.get("compress_ratios") {
        let arr = v.as_array().ok_or_else(|| ConvertError::ConfigType {
            key: "compress_ratios".into(),
            expected: "array of integers",
            found: describe(v),
        })?;
        if arr.len() < n_layer {
            return Err(ConvertError::ConfigValue {
                key: "compress_ratios".into(),
                found: format!("{} entries", arr.len()),
                reason: format!("needs one per layer (num_hidden_layers = {n_layer})"),
            });
        }
        arr[..n_layer]
            .iter()
            .map(|e| Cfg::uint_of("compress_ratios", e))
            .collect::<Result<_>>()?
    } else if let Some(v) = c.get("layer_types") {
        let arr = v.as_array().ok_or_else(|| ConvertError::ConfigType {
            key: "layer_types".into(),
            expected: "array of strings",
            found: describe(v),
        })?;
        if arr.len() < n_layer {
            return Err(ConvertError::ConfigValue {
                key: "layer_types".into(),
                found: format!("{} entries", arr.len()),
                reason: format!("needs one per layer (num_hidden_layers = {n_layer})"),
            });
        }
        let rates = c.need("compress_rates")?;
        arr[..n_layer]
            .iter()
            .map(|e| {
                let s = e.as_str().ok_or_else(|| ConvertError::ConfigType {
                    key: "layer_types".into(),
                    expected: "array of strings",
                    found: describe(e),
                })?;
                if s == "sliding_attention" {
                    return Ok(0);
                }
                let r = rates.get(s).ok_or_else(|| ConvertError::ConfigValue {
                    key: "layer_types".into(),
                    found: format!("{s:?}"),
                    reason: "unknown layer type (not in compress_rates)".into(),
                })?;
                Cfg::uint_of("compress_rates", r)
            })
            .collect::<Result<_>>()?
    } else {
        return Err(ConvertError::ConfigMissing {
            key: "compress_ratios".into(),
        });
    };

    let n_hash_layer = if c.get("num_hash_layers").is_some() {
        c.uint("num_hash_layers")?
    } else if let Some(v) = c.get("mlp_layer_types") {
        let arr = v.as_array().ok_or_else(|| ConvertError::ConfigType {
            key: "mlp_layer_types".into(),
            expected: "array of strings",
            found: describe(v),
        })?;
        let n = arr
            .iter()
            .take_while(|e| e.as_str() == Some("hash_moe"))
            .count();
        if arr[n..].iter().any(|e| e.as_str() == Some("hash_moe")) {
            return Err(ConvertError::ConfigValue {
                key: "mlp_layer_types".into(),
                found: describe(v),
                reason: "hash-routed layers must come first".into(),
            });
        }
        n
    } else {
        return Err(ConvertError::ConfigMissing {
            key: "num_hash_layers".into(),
        });
    };

    let n_rot = if c.get("qk_rope_head_dim").is_some() {
        c.uint("qk_rope_head_dim")?
    } else if c.get("partial_rotary_factor").is_some() {
        let f = c.float("partial_rotary_factor")?;
        let r = f * head_dim as f64;
        if r.fract() != 0.0 || r <= 0.0 {
            return Err(ConvertError::ConfigValue {
                key: "partial_rotary_factor".into(),
                found: f.to_string(),
                reason: format!("gives a non-integral rope dimension for head_dim {head_dim}"),
            });
        }
        r as usize
    } else {
        return Err(ConvertError::ConfigMissing {
            key: "qk_rope_head_dim".into(),
        });
    };

    let (rope_key, rope) = match (c.get("rope_scaling"), c.get("rope_parameters")) {
        (Some(v), _) => ("rope_scaling", v),
        (None, Some(v)) => ("rope_parameters", v),
        (None, None) => {
            return Err(ConvertError::ConfigMissing {
                key: "rope_scaling".into(),
            });
        }
    };
    if !rope.is_object() {
        return Err(ConvertError::ConfigType {
            key: rope_key.into(),
            expected: "object",
            found: describe(rope),
        });
    }
    let sub = |k: &str| -> Result<&Value> {
        rope.get(k)
            .filter(|v| !v.is_null())
            .ok_or_else(|| ConvertError::ConfigMissing {
                key: format!("{rope_key}.{k}"),
            })
    };
    if let Some(t) = rope.get("rope_type").or_else(|| rope.get("type"))
        && t.as_str() != Some("yarn")
    {
        return Err(ConvertError::ConfigValue {
            key: format!("{rope_key}.rope_type"),
            found: describe(t),
            reason: "DeepSeek V4 uses YaRN on its compressed layers".into(),
        });
    }
    let yarn_factor = Cfg::float_of(&format!("{rope_key}.factor"), sub("factor")?)?;
    let yarn_orig_ctx = Cfg::uint_of(
        &format!("{rope_key}.original_max_position_embeddings"),
        sub("original_max_position_embeddings")?,
    )? as u64;
    let yarn_beta_fast = Cfg::float_of(&format!("{rope_key}.beta_fast"), sub("beta_fast")?)?;
    let yarn_beta_slow = Cfg::float_of(&format!("{rope_key}.beta_slow"), sub("beta_slow")?)?;

    let swiglu = c.float("swiglu_limit")? as f32;
    let context_length = match c.get("max_position_embeddings") {
        Some(v) => Cfg::uint_of("max_position_embeddings", v)? as u64,
        None => 0,
    };
    let n_head_kv = match c.get("num_key_value_heads") {
        Some(v) => Cfg::uint_of("num_key_value_heads", v)?,
        None => 1,
    };
    let n_expert_shared = match c.get("n_shared_experts") {
        Some(v) => Cfg::uint_of("n_shared_experts", v)?,
        None => 1,
    };

    let shape = Shape {
        n_layer,
        n_embd: c.uint("hidden_size")?,
        n_vocab: c.uint("vocab_size")?,
        n_head: c.uint("num_attention_heads")?,
        n_head_kv,
        head_dim,
        value_dim: head_dim,
        n_rot,
        q_lora_rank: c.uint("q_lora_rank")?,
        o_groups: c.uint("o_groups")?,
        o_lora_rank: c.uint("o_lora_rank")?,
        n_expert: c.uint("n_routed_experts")?,
        n_expert_used: c.uint("num_experts_per_tok")?,
        n_expert_shared,
        n_ff_exp: c.uint("moe_intermediate_size")?,
        n_hash_layer,
        window: c.uint("sliding_window")?,
        index_heads: c.uint("index_n_heads")?,
        index_head_dim: c.uint("index_head_dim")?,
        index_topk: c.uint("index_topk")?,
        hc_mult: c.uint("hc_mult")?,
        sinkhorn_iters: c.uint("hc_sinkhorn_iters")?,
        hc_eps: c.float("hc_eps")? as f32,
        rms_eps: c.float("rms_norm_eps")? as f32,
        compress_ratios,
        swiglu_clamp: vec![swiglu; n_layer],
        rope_base: c.float("rope_theta")? as f32,
        compress_rope_base: c.float("compress_rope_theta")? as f32,
        yarn_factor: yarn_factor as f32,
        yarn_orig_ctx,
        yarn_beta_fast: yarn_beta_fast as f32,
        yarn_beta_slow: yarn_beta_slow as f32,
        expert_weights_scale: c.float("routed_scaling_factor")? as f32,
        context_length,
    };
    shape.validate()?;
    if shape.claims_flash() {
        shape.check_flash()?;
    }
    // The same checks the reader applies (round trip through the metadata it will read).
    let back = Shape::from_metadata(&shape.to_metadata())?;
    if back != shape {
        return Err(ConvertError::Verify(
            "the shape does not survive a metadata round trip".into(),
        ));
    }
    Ok(shape)
}

/// Number of MTP (next-token prediction) layers the checkpoint carries
/// (`num_nextn_predict_layers`, 0 when absent). Their tensors (`mtp.*`) are not part of the
/// main GGUF.
pub fn mtp_layer_count(config: &Value) -> Result<usize> {
    match config.get("num_nextn_predict_layers") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => Cfg::uint_of("num_nextn_predict_layers", v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Value {
        serde_json::from_str(include_str!("../tests/data/tiny_config.json")).unwrap()
    }

    #[test]
    fn tiny_config_gives_the_tiny_shape() {
        let s = shape_from_official_config(&tiny()).unwrap();
        assert_eq!(s.n_layer, 6);
        assert_eq!(s.n_embd, 128);
        assert_eq!(s.n_vocab, 4096);
        assert_eq!(s.n_head, 4);
        assert_eq!(s.head_dim, 128);
        assert_eq!(s.n_rot, 16);
        assert_eq!(s.q_lora_rank, 128);
        assert_eq!((s.o_groups, s.o_lora_rank), (2, 128));
        assert_eq!((s.n_expert, s.n_expert_used, s.n_ff_exp), (8, 3, 128));
        assert_eq!(s.n_hash_layer, 3);
        assert_eq!(s.compress_ratios, vec![0, 0, 4, 128, 4, 128]);
        assert_eq!(
            (s.index_heads, s.index_head_dim, s.index_topk),
            (64, 32, 16)
        );
        assert_eq!(s.swiglu_clamp, vec![10.0; 6]);
        assert_eq!(s.yarn_orig_ctx, 65536);
        assert_eq!(s.yarn_factor, 16.0);
        assert_eq!((s.yarn_beta_fast, s.yarn_beta_slow), (32.0, 1.0));
        assert_eq!(s.rope_base, 10000.0);
        assert_eq!(s.compress_rope_base, 160000.0);
        assert_eq!(s.expert_weights_scale, 1.5);
        assert_eq!(s.context_length, 1_048_576);
        assert_eq!(s.rms_eps, 1e-6);
    }

    #[test]
    fn hf_spellings_are_accepted() {
        let mut v = tiny();
        let o = v.as_object_mut().unwrap();
        o.remove("compress_ratios");
        o.remove("num_hash_layers");
        o.remove("qk_rope_head_dim");
        let rope = o.remove("rope_scaling").unwrap();
        o.insert("rope_parameters".into(), rope);
        o.insert("partial_rotary_factor".into(), serde_json::json!(0.125));
        o.insert(
            "layer_types".into(),
            serde_json::json!([
                "sliding_attention",
                "sliding_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention"
            ]),
        );
        o.insert(
            "compress_rates".into(),
            serde_json::json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}),
        );
        o.insert(
            "mlp_layer_types".into(),
            serde_json::json!(["hash_moe", "hash_moe", "hash_moe", "moe", "moe", "moe"]),
        );
        assert_eq!(
            shape_from_official_config(&v).unwrap(),
            shape_from_official_config(&tiny()).unwrap()
        );
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("hidden_size");
        match shape_from_official_config(&v).unwrap_err() {
            ConvertError::ConfigMissing { key } => assert_eq!(key, "hidden_size"),
            e => panic!("{e}"),
        }
        let mut v = tiny();
        v["o_groups"] = serde_json::json!("2");
        match shape_from_official_config(&v).unwrap_err() {
            ConvertError::ConfigType { key, .. } => assert_eq!(key, "o_groups"),
            e => panic!("{e}"),
        }
        let mut v = tiny();
        v["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("beta_fast");
        match shape_from_official_config(&v).unwrap_err() {
            ConvertError::ConfigMissing { key } => assert_eq!(key, "rope_scaling.beta_fast"),
            e => panic!("{e}"),
        }
        let mut v = tiny();
        v["compress_ratios"] = serde_json::json!([0, 0, 4]);
        assert!(matches!(
            shape_from_official_config(&v).unwrap_err(),
            ConvertError::ConfigValue { .. }
        ));
        let mut v = tiny();
        v["scoring_func"] = serde_json::json!("softmax");
        assert!(matches!(
            shape_from_official_config(&v).unwrap_err(),
            ConvertError::ConfigValue { .. }
        ));
        assert!(shape_from_official_config(&serde_json::json!([1, 2])).is_err());
    }

    #[test]
    fn inconsistent_values_are_refused() {
        // 3 heads do not split into 2 output groups.
        let mut v = tiny();
        v["num_attention_heads"] = serde_json::json!(3);
        assert!(matches!(
            shape_from_official_config(&v).unwrap_err(),
            ConvertError::Shape(_)
        ));
        // Claims Flash's hidden size with tiny's other dims.
        let mut v = tiny();
        v["hidden_size"] = serde_json::json!(4096);
        assert!(matches!(
            shape_from_official_config(&v).unwrap_err(),
            ConvertError::Shape(ds4_model::ShapeError::NotFlash { .. })
        ));
    }

    #[test]
    fn flash_config_gives_flash() {
        let mut v = tiny();
        let set = |v: &mut Value, k: &str, x: Value| {
            v[k] = x;
        };
        set(&mut v, "vocab_size", 129280.into());
        set(&mut v, "hidden_size", 4096.into());
        set(&mut v, "moe_intermediate_size", 2048.into());
        set(&mut v, "num_hidden_layers", 43.into());
        set(&mut v, "num_attention_heads", 64.into());
        set(&mut v, "head_dim", 512.into());
        set(&mut v, "q_lora_rank", 1024.into());
        set(&mut v, "num_experts_per_tok", 6.into());
        set(&mut v, "n_routed_experts", 256.into());
        set(&mut v, "o_groups", 8.into());
        set(&mut v, "o_lora_rank", 1024.into());
        set(&mut v, "index_head_dim", 128.into());
        set(&mut v, "index_topk", 512.into());
        set(&mut v, "qk_rope_head_dim", 64.into());
        set(&mut v, "num_nextn_predict_layers", 1.into());
        let mut ratios = vec![0u32, 0];
        for il in 2..43 {
            ratios.push(if il % 2 == 0 { 4 } else { 128 });
        }
        ratios.push(0); // the MTP layer
        set(&mut v, "compress_ratios", serde_json::json!(ratios));
        assert_eq!(shape_from_official_config(&v).unwrap(), Shape::flash());
        assert_eq!(mtp_layer_count(&v).unwrap(), 1);
    }
}
