//! Model shape: every dimension and constant of DeepSeek V4 Flash, read from GGUF metadata
//! (`deepseek4.*` keys), checked for internal consistency, and — for a file that claims to be
//! Flash (`embedding_length == 4096`) — checked against the Flash preset key by key.
//!
//! Tiny test models use the same code with smaller values.

use ds4_gguf::{Gguf, MetaType, MetaValue};

/// Metadata key names (ds4's GGUF layout).
pub mod keys {
    pub const ARCH: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const BLOCK_COUNT: &str = "deepseek4.block_count";
    pub const CONTEXT_LENGTH: &str = "deepseek4.context_length";
    pub const EMBEDDING_LENGTH: &str = "deepseek4.embedding_length";
    pub const VOCAB_SIZE: &str = "deepseek4.vocab_size";
    pub const HEAD_COUNT: &str = "deepseek4.attention.head_count";
    pub const HEAD_COUNT_KV: &str = "deepseek4.attention.head_count_kv";
    pub const KEY_LENGTH: &str = "deepseek4.attention.key_length";
    pub const VALUE_LENGTH: &str = "deepseek4.attention.value_length";
    pub const ROPE_DIMS: &str = "deepseek4.rope.dimension_count";
    pub const Q_LORA_RANK: &str = "deepseek4.attention.q_lora_rank";
    pub const O_LORA_RANK: &str = "deepseek4.attention.output_lora_rank";
    pub const O_GROUPS: &str = "deepseek4.attention.output_group_count";
    pub const EXPERT_COUNT: &str = "deepseek4.expert_count";
    pub const EXPERT_USED: &str = "deepseek4.expert_used_count";
    pub const EXPERT_FF: &str = "deepseek4.expert_feed_forward_length";
    pub const EXPERT_SHARED: &str = "deepseek4.expert_shared_count";
    pub const HASH_LAYERS: &str = "deepseek4.hash_layer_count";
    pub const EXPERT_GROUPS: &str = "deepseek4.expert_group_count";
    pub const EXPERT_GROUPS_USED: &str = "deepseek4.expert_group_used_count";
    pub const SLIDING_WINDOW: &str = "deepseek4.attention.sliding_window";
    pub const INDEXER_HEADS: &str = "deepseek4.attention.indexer.head_count";
    pub const INDEXER_DIM: &str = "deepseek4.attention.indexer.key_length";
    pub const INDEXER_TOPK: &str = "deepseek4.attention.indexer.top_k";
    pub const HC_COUNT: &str = "deepseek4.hyper_connection.count";
    pub const HC_SINKHORN: &str = "deepseek4.hyper_connection.sinkhorn_iterations";
    pub const HC_EPS: &str = "deepseek4.hyper_connection.epsilon";
    pub const COMPRESS_RATIOS: &str = "deepseek4.attention.compress_ratios";
    pub const SWIGLU_CLAMP: &str = "deepseek4.swiglu_clamp_exp";
    pub const YARN_ORIG_CTX: &str = "deepseek4.rope.scaling.original_context_length";
    pub const ROPE_BASE: &str = "deepseek4.rope.freq_base";
    pub const YARN_FACTOR: &str = "deepseek4.rope.scaling.factor";
    pub const YARN_BETA_FAST: &str = "deepseek4.rope.scaling.yarn_beta_fast";
    pub const YARN_BETA_SLOW: &str = "deepseek4.rope.scaling.yarn_beta_slow";
    pub const COMPRESS_ROPE_BASE: &str = "deepseek4.attention.compress_rope_freq_base";
    pub const EXPERT_WEIGHTS_SCALE: &str = "deepseek4.expert_weights_scale";
    pub const RMS_EPS: &str = "deepseek4.attention.layer_norm_rms_epsilon";
    pub const EXPERT_WEIGHTS_NORM: &str = "deepseek4.expert_weights_norm";
}

/// Errors about the model's metadata.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShapeError {
    #[error("metadata key {key} is missing")]
    Missing { key: &'static str },
    #[error("metadata key {key} has type {found}, expected {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key {key} = {found} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        found: String,
        reason: String,
    },
    #[error(
        "file claims to be DeepSeek V4 Flash (embedding_length 4096) but {key} = {found}, Flash has {expected}"
    )]
    NotFlash {
        key: &'static str,
        expected: String,
        found: String,
    },
}

/// Attention kind of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    /// Raw sliding window only (compress ratio 0).
    Swa,
    /// Compressed sparse attention: overlapping ratio-4 compressor + lightning indexer.
    Csa { ratio: usize },
    /// Heavily compressed attention: plain compressor, no indexer.
    Hca { ratio: usize },
}

impl AttnKind {
    /// Compression ratio (0 for SWA).
    pub fn ratio(self) -> usize {
        match self {
            AttnKind::Swa => 0,
            AttnKind::Csa { ratio } | AttnKind::Hca { ratio } => ratio,
        }
    }
    /// Whether the layer has a compressor.
    pub fn is_compressed(self) -> bool {
        !matches!(self, AttnKind::Swa)
    }
    /// Whether the layer has a lightning indexer.
    pub fn has_indexer(self) -> bool {
        matches!(self, AttnKind::Csa { .. })
    }
    /// Compressor overlap factor: 2 for CSA (each row pools two windows), 1 otherwise.
    pub fn coff(self) -> usize {
        if self.has_indexer() { 2 } else { 1 }
    }
}

/// The compress ratio that makes a layer CSA (overlap + indexer); every other non-zero ratio is HCA.
pub const CSA_RATIO: usize = 4;

/// All dimensions and constants of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub n_rot: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_expert_shared: usize,
    pub n_ff_exp: usize,
    pub n_hash_layer: usize,
    pub window: usize,
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub rms_eps: f32,
    /// Per layer, length `n_layer`.
    pub compress_ratios: Vec<usize>,
    /// Per layer, length `n_layer`.
    pub swiglu_clamp: Vec<f32>,
    pub rope_base: f32,
    pub compress_rope_base: f32,
    pub yarn_factor: f32,
    pub yarn_orig_ctx: u64,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub expert_weights_scale: f32,
    pub context_length: u64,
}

impl Shape {
    /// The DeepSeek V4 Flash preset (43 layers).
    pub fn flash() -> Shape {
        Shape::flash_layers(43)
    }

    /// Flash with its first `n_layer` layers (synthetic benchmark files).
    pub fn flash_layers(n_layer: usize) -> Shape {
        let ratios = (0..n_layer)
            .map(|il| match il {
                0 | 1 => 0,
                _ if il % 2 == 0 => 4,
                _ => 128,
            })
            .collect();
        Shape {
            n_layer,
            n_embd: 4096,
            n_vocab: 129280,
            n_head: 64,
            n_head_kv: 1,
            head_dim: 512,
            value_dim: 512,
            n_rot: 64,
            q_lora_rank: 1024,
            o_groups: 8,
            o_lora_rank: 1024,
            n_expert: 256,
            n_expert_used: 6,
            n_expert_shared: 1,
            n_ff_exp: 2048,
            n_hash_layer: 3.min(n_layer),
            window: 128,
            index_heads: 64,
            index_head_dim: 128,
            index_topk: 512,
            hc_mult: 4,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
            compress_ratios: ratios,
            swiglu_clamp: vec![10.0; n_layer],
            rope_base: 10000.0,
            compress_rope_base: 160000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 65536,
            yarn_beta_fast: 32.0,
            yarn_beta_slow: 1.0,
            expert_weights_scale: 1.5,
            context_length: 1_048_576,
        }
    }

    /// Number of non-RoPE dims of a head.
    pub fn n_nope(&self) -> usize {
        self.head_dim - self.n_rot
    }
    /// Width of the flattened HC state (`hc_mult * n_embd`).
    pub fn hc_dim(&self) -> usize {
        self.hc_mult * self.n_embd
    }
    /// Outputs of an HC `fn` matrix: `(2 + hc_mult) * hc_mult`.
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }
    /// Input width of one output-projection group.
    pub fn group_in(&self) -> usize {
        self.n_head / self.o_groups * self.head_dim
    }
    /// Attention kind of layer `il`.
    pub fn attn_kind(&self, il: usize) -> AttnKind {
        match self.compress_ratios[il] {
            0 => AttnKind::Swa,
            CSA_RATIO => AttnKind::Csa { ratio: CSA_RATIO },
            r => AttnKind::Hca { ratio: r },
        }
    }
    /// Whether layer `il` routes by token hash (`tid2eid`) instead of the router's top-k.
    pub fn is_hash_layer(&self, il: usize) -> bool {
        il < self.n_hash_layer
    }
    /// Attention softmax scale `1/sqrt(head_dim)`.
    pub fn kq_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Whether this shape claims to be Flash (embedding_length 4096).
    pub fn claims_flash(&self) -> bool {
        self.n_embd == 4096
    }

    /// Read and validate the shape from a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Shape, ShapeError> {
        Shape::from_metadata(g.metadata())
    }

    /// Read and validate the shape from metadata records.
    pub fn from_metadata(md: &[(String, MetaValue)]) -> Result<Shape, ShapeError> {
        use keys::*;
        let get = |key: &str| md.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let uint = |key: &'static str| -> Result<usize, ShapeError> {
            let v = get(key).ok_or(ShapeError::Missing { key })?;
            let n = v.as_u64().ok_or_else(|| ShapeError::WrongType {
                key,
                expected: "unsigned integer",
                found: describe(v),
            })?;
            usize::try_from(n).map_err(|_| ShapeError::Invalid {
                key,
                found: n.to_string(),
                reason: "too large".into(),
            })
        };
        let opt_uint = |key: &'static str| -> Result<usize, ShapeError> {
            match get(key) {
                None => Ok(0),
                Some(_) => uint(key),
            }
        };
        let float = |key: &'static str| -> Result<f32, ShapeError> {
            let v = get(key).ok_or(ShapeError::Missing { key })?;
            let f = v.as_f64().ok_or_else(|| ShapeError::WrongType {
                key,
                expected: "number",
                found: describe(v),
            })?;
            if !f.is_finite() {
                return Err(ShapeError::Invalid {
                    key,
                    found: f.to_string(),
                    reason: "not finite".into(),
                });
            }
            Ok(f as f32)
        };
        let n_layer = uint(BLOCK_COUNT)?;
        let ratios_v = get(COMPRESS_RATIOS).ok_or(ShapeError::Missing {
            key: COMPRESS_RATIOS,
        })?;
        let ratios = ratios_v
            .as_i64_array()
            .ok_or_else(|| ShapeError::WrongType {
                key: COMPRESS_RATIOS,
                expected: "array of integers",
                found: describe(ratios_v),
            })?;
        if ratios.len() < n_layer {
            return Err(ShapeError::Invalid {
                key: COMPRESS_RATIOS,
                found: format!("{} entries", ratios.len()),
                reason: format!("needs at least block_count = {n_layer}"),
            });
        }
        let mut compress_ratios = Vec::with_capacity(n_layer);
        for &r in &ratios[..n_layer] {
            let r = usize::try_from(r).map_err(|_| ShapeError::Invalid {
                key: COMPRESS_RATIOS,
                found: r.to_string(),
                reason: "negative ratio".into(),
            })?;
            compress_ratios.push(r);
        }
        let clamp_v = get(SWIGLU_CLAMP).ok_or(ShapeError::Missing { key: SWIGLU_CLAMP })?;
        let clamps = clamp_v
            .as_f64_array()
            .ok_or_else(|| ShapeError::WrongType {
                key: SWIGLU_CLAMP,
                expected: "array of numbers",
                found: describe(clamp_v),
            })?;
        if clamps.len() < n_layer {
            return Err(ShapeError::Invalid {
                key: SWIGLU_CLAMP,
                found: format!("{} entries", clamps.len()),
                reason: format!("needs at least block_count = {n_layer}"),
            });
        }
        let norm_v = get(EXPERT_WEIGHTS_NORM).ok_or(ShapeError::Missing {
            key: EXPERT_WEIGHTS_NORM,
        })?;
        match norm_v.as_bool() {
            Some(true) => {}
            Some(false) => {
                return Err(ShapeError::Invalid {
                    key: EXPERT_WEIGHTS_NORM,
                    found: "false".into(),
                    reason: "DeepSeek V4 renormalises the top-k weights".into(),
                });
            }
            None => {
                return Err(ShapeError::WrongType {
                    key: EXPERT_WEIGHTS_NORM,
                    expected: "bool",
                    found: describe(norm_v),
                });
            }
        }
        let context_length = match get(CONTEXT_LENGTH) {
            Some(v) => v.as_u64().unwrap_or(0),
            None => 0,
        };
        let shape = Shape {
            n_layer,
            n_embd: uint(EMBEDDING_LENGTH)?,
            n_vocab: uint(VOCAB_SIZE)?,
            n_head: uint(HEAD_COUNT)?,
            n_head_kv: uint(HEAD_COUNT_KV)?,
            head_dim: uint(KEY_LENGTH)?,
            value_dim: uint(VALUE_LENGTH)?,
            n_rot: uint(ROPE_DIMS)?,
            q_lora_rank: uint(Q_LORA_RANK)?,
            o_groups: uint(O_GROUPS)?,
            o_lora_rank: uint(O_LORA_RANK)?,
            n_expert: uint(EXPERT_COUNT)?,
            n_expert_used: uint(EXPERT_USED)?,
            n_expert_shared: uint(EXPERT_SHARED)?,
            n_ff_exp: uint(EXPERT_FF)?,
            n_hash_layer: uint(HASH_LAYERS)?,
            window: uint(SLIDING_WINDOW)?,
            index_heads: uint(INDEXER_HEADS)?,
            index_head_dim: uint(INDEXER_DIM)?,
            index_topk: uint(INDEXER_TOPK)?,
            hc_mult: uint(HC_COUNT)?,
            sinkhorn_iters: uint(HC_SINKHORN)?,
            hc_eps: float(HC_EPS)?,
            rms_eps: float(RMS_EPS)?,
            compress_ratios,
            swiglu_clamp: clamps[..n_layer].iter().map(|&c| c as f32).collect(),
            rope_base: float(ROPE_BASE)?,
            compress_rope_base: float(COMPRESS_ROPE_BASE)?,
            yarn_factor: float(YARN_FACTOR)?,
            yarn_orig_ctx: uint(YARN_ORIG_CTX)? as u64,
            yarn_beta_fast: float(YARN_BETA_FAST)?,
            yarn_beta_slow: float(YARN_BETA_SLOW)?,
            expert_weights_scale: float(EXPERT_WEIGHTS_SCALE)?,
            context_length,
        };
        for key in [EXPERT_GROUPS, EXPERT_GROUPS_USED] {
            let n = opt_uint(key)?;
            if n != 0 {
                return Err(ShapeError::Invalid {
                    key,
                    found: n.to_string(),
                    reason: "group routing is not part of DeepSeek V4 (must be 0)".into(),
                });
            }
        }
        shape.validate()?;
        if shape.claims_flash() {
            shape.check_flash()?;
        }
        Ok(shape)
    }

    /// Internal consistency: every coupling the forward pass relies on.
    pub fn validate(&self) -> Result<(), ShapeError> {
        use keys::*;
        let bad = |key: &'static str, found: usize, reason: &str| {
            Err(ShapeError::Invalid {
                key,
                found: found.to_string(),
                reason: reason.to_string(),
            })
        };
        let positive: [(&'static str, usize); 19] = [
            (BLOCK_COUNT, self.n_layer),
            (EMBEDDING_LENGTH, self.n_embd),
            (VOCAB_SIZE, self.n_vocab),
            (HEAD_COUNT, self.n_head),
            (KEY_LENGTH, self.head_dim),
            (Q_LORA_RANK, self.q_lora_rank),
            (O_GROUPS, self.o_groups),
            (O_LORA_RANK, self.o_lora_rank),
            (EXPERT_COUNT, self.n_expert),
            (EXPERT_USED, self.n_expert_used),
            (EXPERT_FF, self.n_ff_exp),
            (SLIDING_WINDOW, self.window),
            (HC_COUNT, self.hc_mult),
            (HC_SINKHORN, self.sinkhorn_iters),
            (ROPE_DIMS, self.n_rot),
            (INDEXER_HEADS, self.index_heads),
            (INDEXER_DIM, self.index_head_dim),
            (INDEXER_TOPK, self.index_topk),
            (YARN_ORIG_CTX, self.yarn_orig_ctx as usize),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, v, "must be positive");
            }
        }
        const LIMIT: usize = 1 << 24;
        for (key, v) in [
            (EMBEDDING_LENGTH, self.n_embd),
            (VOCAB_SIZE, self.n_vocab),
            (HEAD_COUNT, self.n_head),
            (KEY_LENGTH, self.head_dim),
            (EXPERT_COUNT, self.n_expert),
            (EXPERT_FF, self.n_ff_exp),
            (Q_LORA_RANK, self.q_lora_rank),
            (O_LORA_RANK, self.o_lora_rank),
            (INDEXER_HEADS, self.index_heads),
            (INDEXER_DIM, self.index_head_dim),
            (SLIDING_WINDOW, self.window),
            (INDEXER_TOPK, self.index_topk),
        ] {
            if v > LIMIT {
                return bad(key, v, "absurdly large");
            }
        }
        if self.n_layer > 4096 {
            return bad(BLOCK_COUNT, self.n_layer, "absurdly large");
        }
        if self.hc_mult > 16 || self.sinkhorn_iters > 1000 {
            return bad(HC_COUNT, self.hc_mult, "hc_mult must be <= 16");
        }
        if self.n_head_kv != 1 {
            return bad(
                HEAD_COUNT_KV,
                self.n_head_kv,
                "DeepSeek V4 has one shared K=V head",
            );
        }
        if self.value_dim != self.head_dim {
            return bad(
                VALUE_LENGTH,
                self.value_dim,
                "must equal key_length (K = V)",
            );
        }
        if !self.n_rot.is_multiple_of(2) || self.n_rot > self.head_dim {
            return bad(ROPE_DIMS, self.n_rot, "must be even and <= key_length");
        }
        if self.index_head_dim < self.n_rot || !self.index_head_dim.is_power_of_two() {
            return bad(
                INDEXER_DIM,
                self.index_head_dim,
                "must be a power of two (Hadamard) and >= rope dims",
            );
        }
        if !self.index_head_dim.is_multiple_of(32) {
            return bad(
                INDEXER_DIM,
                self.index_head_dim,
                "must be a multiple of 32 (FP4 blocks)",
            );
        }
        if !self.n_head.is_multiple_of(self.o_groups) {
            return bad(O_GROUPS, self.o_groups, "must divide head_count");
        }
        if self.n_expert_used > self.n_expert {
            return bad(EXPERT_USED, self.n_expert_used, "exceeds expert_count");
        }
        if self.n_expert_shared != 1 {
            return bad(EXPERT_SHARED, self.n_expert_shared, "must be 1");
        }
        if self.n_hash_layer > self.n_layer {
            return bad(HASH_LAYERS, self.n_hash_layer, "exceeds block_count");
        }
        for &r in &self.compress_ratios {
            if r != 0 && r < 2 {
                return bad(COMPRESS_RATIOS, r, "ratio must be 0 or >= 2");
            }
            if r > 1 << 20 {
                return bad(COMPRESS_RATIOS, r, "absurdly large");
            }
        }
        for &c in &self.swiglu_clamp {
            if !(c.is_finite() && c >= 0.0) {
                return Err(ShapeError::Invalid {
                    key: SWIGLU_CLAMP,
                    found: c.to_string(),
                    reason: "must be finite and >= 0".into(),
                });
            }
        }
        let floats = [
            (HC_EPS, self.hc_eps),
            (RMS_EPS, self.rms_eps),
            (ROPE_BASE, self.rope_base),
            (COMPRESS_ROPE_BASE, self.compress_rope_base),
            (YARN_FACTOR, self.yarn_factor),
        ];
        for (key, v) in floats {
            if v.is_nan() || v <= 0.0 {
                return Err(ShapeError::Invalid {
                    key,
                    found: v.to_string(),
                    reason: "must be positive".into(),
                });
            }
        }
        Ok(())
    }

    /// Check every value against the Flash preset (any layer count from 1 to 43 is accepted, for
    /// truncated benchmark files; per-layer arrays are checked for the layers present).
    pub fn check_flash(&self) -> Result<(), ShapeError> {
        use keys::*;
        if self.n_layer == 0 || self.n_layer > 43 {
            return Err(ShapeError::NotFlash {
                key: BLOCK_COUNT,
                expected: "43 (or fewer for a truncated file)".into(),
                found: self.n_layer.to_string(),
            });
        }
        let f = Shape::flash_layers(self.n_layer);
        let ints: [(&'static str, usize, usize); 22] = [
            (EMBEDDING_LENGTH, f.n_embd, self.n_embd),
            (VOCAB_SIZE, f.n_vocab, self.n_vocab),
            (HEAD_COUNT, f.n_head, self.n_head),
            (HEAD_COUNT_KV, f.n_head_kv, self.n_head_kv),
            (KEY_LENGTH, f.head_dim, self.head_dim),
            (VALUE_LENGTH, f.value_dim, self.value_dim),
            (ROPE_DIMS, f.n_rot, self.n_rot),
            (Q_LORA_RANK, f.q_lora_rank, self.q_lora_rank),
            (O_LORA_RANK, f.o_lora_rank, self.o_lora_rank),
            (O_GROUPS, f.o_groups, self.o_groups),
            (EXPERT_COUNT, f.n_expert, self.n_expert),
            (EXPERT_USED, f.n_expert_used, self.n_expert_used),
            (EXPERT_FF, f.n_ff_exp, self.n_ff_exp),
            (EXPERT_SHARED, f.n_expert_shared, self.n_expert_shared),
            (
                HASH_LAYERS,
                f.n_hash_layer.min(self.n_layer),
                self.n_hash_layer,
            ),
            (SLIDING_WINDOW, f.window, self.window),
            (INDEXER_HEADS, f.index_heads, self.index_heads),
            (INDEXER_DIM, f.index_head_dim, self.index_head_dim),
            (INDEXER_TOPK, f.index_topk, self.index_topk),
            (HC_COUNT, f.hc_mult, self.hc_mult),
            (HC_SINKHORN, f.sinkhorn_iters, self.sinkhorn_iters),
            (
                YARN_ORIG_CTX,
                f.yarn_orig_ctx as usize,
                self.yarn_orig_ctx as usize,
            ),
        ];
        for (key, expected, found) in ints {
            if expected != found {
                return Err(ShapeError::NotFlash {
                    key,
                    expected: expected.to_string(),
                    found: found.to_string(),
                });
            }
        }
        let floats = [
            (HC_EPS, f.hc_eps, self.hc_eps),
            (RMS_EPS, f.rms_eps, self.rms_eps),
            (ROPE_BASE, f.rope_base, self.rope_base),
            (
                COMPRESS_ROPE_BASE,
                f.compress_rope_base,
                self.compress_rope_base,
            ),
            (YARN_FACTOR, f.yarn_factor, self.yarn_factor),
            (YARN_BETA_FAST, f.yarn_beta_fast, self.yarn_beta_fast),
            (YARN_BETA_SLOW, f.yarn_beta_slow, self.yarn_beta_slow),
            (
                EXPERT_WEIGHTS_SCALE,
                f.expert_weights_scale,
                self.expert_weights_scale,
            ),
        ];
        for (key, expected, found) in floats {
            // ds4's config_expect_f32 tolerance.
            if (found - expected).abs() > expected.abs().max(1.0) * 1e-6 {
                return Err(ShapeError::NotFlash {
                    key,
                    expected: expected.to_string(),
                    found: found.to_string(),
                });
            }
        }
        for il in 0..self.n_layer {
            if self.compress_ratios[il] != f.compress_ratios[il] {
                return Err(ShapeError::NotFlash {
                    key: COMPRESS_RATIOS,
                    expected: format!("{} at layer {il}", f.compress_ratios[il]),
                    found: self.compress_ratios[il].to_string(),
                });
            }
            if self.swiglu_clamp[il] != 10.0 {
                return Err(ShapeError::NotFlash {
                    key: SWIGLU_CLAMP,
                    expected: format!("10 at layer {il}"),
                    found: self.swiglu_clamp[il].to_string(),
                });
            }
        }
        Ok(())
    }

    /// The metadata records that describe this shape (for writers: convert, synth).
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        use keys::*;
        let u = |v: usize| MetaValue::U32(v as u32);
        let ratios: Vec<u32> = self.compress_ratios.iter().map(|&r| r as u32).collect();
        let v: Vec<(&str, MetaValue)> = vec![
            (ARCH, MetaValue::String("deepseek4".into())),
            (BLOCK_COUNT, u(self.n_layer)),
            (CONTEXT_LENGTH, u(self.context_length as usize)),
            (EMBEDDING_LENGTH, u(self.n_embd)),
            (VOCAB_SIZE, u(self.n_vocab)),
            (HEAD_COUNT, u(self.n_head)),
            (HEAD_COUNT_KV, u(self.n_head_kv)),
            (KEY_LENGTH, u(self.head_dim)),
            (VALUE_LENGTH, u(self.value_dim)),
            (ROPE_DIMS, u(self.n_rot)),
            (Q_LORA_RANK, u(self.q_lora_rank)),
            (O_LORA_RANK, u(self.o_lora_rank)),
            (O_GROUPS, u(self.o_groups)),
            (EXPERT_COUNT, u(self.n_expert)),
            (EXPERT_USED, u(self.n_expert_used)),
            (EXPERT_FF, u(self.n_ff_exp)),
            (EXPERT_SHARED, u(self.n_expert_shared)),
            (HASH_LAYERS, u(self.n_hash_layer)),
            (SLIDING_WINDOW, u(self.window)),
            (INDEXER_HEADS, u(self.index_heads)),
            (INDEXER_DIM, u(self.index_head_dim)),
            (INDEXER_TOPK, u(self.index_topk)),
            (HC_COUNT, u(self.hc_mult)),
            (HC_SINKHORN, u(self.sinkhorn_iters)),
            (HC_EPS, MetaValue::F32(self.hc_eps)),
            (COMPRESS_RATIOS, MetaValue::u32_array(&ratios)),
            (SWIGLU_CLAMP, MetaValue::f32_array(&self.swiglu_clamp)),
            (YARN_ORIG_CTX, MetaValue::U64(self.yarn_orig_ctx)),
            (ROPE_BASE, MetaValue::F32(self.rope_base)),
            (YARN_FACTOR, MetaValue::F32(self.yarn_factor)),
            (YARN_BETA_FAST, MetaValue::F32(self.yarn_beta_fast)),
            (YARN_BETA_SLOW, MetaValue::F32(self.yarn_beta_slow)),
            (COMPRESS_ROPE_BASE, MetaValue::F32(self.compress_rope_base)),
            (
                EXPERT_WEIGHTS_SCALE,
                MetaValue::F32(self.expert_weights_scale),
            ),
            (RMS_EPS, MetaValue::F32(self.rms_eps)),
            (EXPERT_WEIGHTS_NORM, MetaValue::Bool(true)),
        ];
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(t, items) if *t != MetaType::Array => {
            format!("array of {} {t}", items.len())
        }
        other => other.meta_type().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_round_trips_through_metadata() {
        let f = Shape::flash();
        let md = f.to_metadata();
        let back = Shape::from_metadata(&md).unwrap();
        assert_eq!(back, f);
        assert_eq!(f.attn_kind(0), AttnKind::Swa);
        assert_eq!(f.attn_kind(2), AttnKind::Csa { ratio: 4 });
        assert_eq!(f.attn_kind(3), AttnKind::Hca { ratio: 128 });
        assert_eq!(f.attn_kind(42), AttnKind::Csa { ratio: 4 });
        assert_eq!(f.hc_mix(), 24);
        assert_eq!(f.group_in(), 4096);
        assert_eq!(f.n_nope(), 448);
    }

    #[test]
    fn flash_lying_about_a_dimension_is_refused() {
        let mut md = Shape::flash().to_metadata();
        for (k, v) in md.iter_mut() {
            if k == keys::HEAD_COUNT {
                *v = MetaValue::U32(32);
            }
        }
        let err = Shape::from_metadata(&md).unwrap_err();
        assert_eq!(
            err,
            ShapeError::NotFlash {
                key: keys::HEAD_COUNT,
                expected: "64".into(),
                found: "32".into()
            }
        );
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let md: Vec<_> = Shape::flash()
            .to_metadata()
            .into_iter()
            .filter(|(k, _)| k != keys::VOCAB_SIZE)
            .collect();
        assert_eq!(
            Shape::from_metadata(&md).unwrap_err(),
            ShapeError::Missing {
                key: keys::VOCAB_SIZE
            }
        );
        let mut md = Shape::flash().to_metadata();
        for (k, v) in md.iter_mut() {
            if k == keys::EMBEDDING_LENGTH {
                *v = MetaValue::String("4096".into());
            }
        }
        assert!(matches!(
            Shape::from_metadata(&md).unwrap_err(),
            ShapeError::WrongType {
                key: keys::EMBEDDING_LENGTH,
                ..
            }
        ));
    }

    #[test]
    fn truncated_flash_is_accepted() {
        let s = Shape::flash_layers(6);
        let md = s.to_metadata();
        assert_eq!(Shape::from_metadata(&md).unwrap(), s);
    }
}
