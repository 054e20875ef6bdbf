//! Official checkpoint names ↔ ds4's GGUF names, and the GGUF tensor inventory of a shape
//! (model-spec §2.3).
//!
//! Every GGUF tensor's `ne` is the reverse of its official safetensors shape, except the
//! stacked routed-expert tensors `blk.L.ffn_{gate,up,down}_exps.weight`, whose `ne` is
//! `[in, out, n_expert]` and whose expert `E` is the official `layers.L.ffn.experts.E.w{1,3,2}`.

use ds4_model::{AttnKind, Shape};

/// What a tensor is, which decides its GGUF type under each recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorClass {
    /// `token_embd.weight`.
    Embedding,
    /// `output.weight` (the LM head).
    Output,
    /// Hyper-connection `fn` matrices (`hc_attn_fn`, `hc_ffn_fn`, `output_hc_fn`).
    HcFn,
    /// 1-D tensors: norms, sinks, HC scale/base, router bias.
    Vector,
    /// Attention projections `attn_q_a`, `attn_q_b`, `attn_kv`, `attn_output_a/b`.
    AttnProj,
    /// Shared-expert matrices.
    SharedExpert,
    /// Matrices ds4 keeps in F16: router, compressor kv/gate, indexer q_b/proj.
    Dense16,
    /// Compressor / indexer-compressor position biases (`*_ape`).
    Ape,
    /// Stacked routed experts, gate (`w1`) or up (`w3`).
    ExpertGateUp,
    /// Stacked routed experts, down (`w2`).
    ExpertDown,
    /// Hash-routing table (I32).
    Tid2Eid,
}

/// Where the data of a GGUF tensor comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One official tensor, shape = reverse of the GGUF `ne`.
    Single(String),
    /// `layers.{layer}.ffn.experts.{e}.w{w}.weight` for `e` in `0..n_expert`, each of official
    /// shape `[ne1, ne0]`.
    Experts {
        layer: usize,
        w: u8,
        n_expert: usize,
    },
}

/// One tensor of the GGUF file to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// GGUF name.
    pub name: String,
    /// GGUF dims (`ne0` first).
    pub ne: Vec<u64>,
    pub class: TensorClass,
    pub source: Source,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
    /// Row length (`ne0`).
    pub fn ne0(&self) -> u64 {
        self.ne[0]
    }
    /// Official names this tensor reads (weights only; block scales are found next to them).
    pub fn official_names(&self) -> Vec<String> {
        match &self.source {
            Source::Single(n) => vec![n.clone()],
            Source::Experts { layer, w, n_expert } => (0..*n_expert)
                .map(|e| expert_official_name(*layer, e, *w))
                .collect(),
        }
    }
}

/// The official name of expert `e`'s matrix `w{w}` in layer `layer`.
pub fn expert_official_name(layer: usize, e: usize, w: u8) -> String {
    format!("layers.{layer}.ffn.experts.{e}.w{w}.weight")
}

/// Global tensors: (official name, GGUF name, class).
const GLOBAL: [(&str, &str, TensorClass); 6] = [
    ("embed.weight", "token_embd.weight", TensorClass::Embedding),
    ("hc_head_fn", "output_hc_fn.weight", TensorClass::HcFn),
    (
        "hc_head_scale",
        "output_hc_scale.weight",
        TensorClass::Vector,
    ),
    ("hc_head_base", "output_hc_base.weight", TensorClass::Vector),
    ("norm.weight", "output_norm.weight", TensorClass::Vector),
    ("head.weight", "output.weight", TensorClass::Output),
];

/// Per-layer tensors: (official suffix after `layers.L.`, GGUF suffix after `blk.L.`, class).
const LAYER: [(&str, &str, TensorClass); 32] = [
    ("hc_attn_fn", "hc_attn_fn.weight", TensorClass::HcFn),
    ("hc_attn_scale", "hc_attn_scale.weight", TensorClass::Vector),
    ("hc_attn_base", "hc_attn_base.weight", TensorClass::Vector),
    ("attn_norm.weight", "attn_norm.weight", TensorClass::Vector),
    ("attn.wq_a.weight", "attn_q_a.weight", TensorClass::AttnProj),
    (
        "attn.q_norm.weight",
        "attn_q_a_norm.weight",
        TensorClass::Vector,
    ),
    ("attn.wq_b.weight", "attn_q_b.weight", TensorClass::AttnProj),
    ("attn.wkv.weight", "attn_kv.weight", TensorClass::AttnProj),
    (
        "attn.kv_norm.weight",
        "attn_kv_a_norm.weight",
        TensorClass::Vector,
    ),
    ("attn.attn_sink", "attn_sinks.weight", TensorClass::Vector),
    (
        "attn.wo_a.weight",
        "attn_output_a.weight",
        TensorClass::AttnProj,
    ),
    (
        "attn.wo_b.weight",
        "attn_output_b.weight",
        TensorClass::AttnProj,
    ),
    (
        "attn.compressor.ape",
        "attn_compressor_ape.weight",
        TensorClass::Ape,
    ),
    (
        "attn.compressor.wkv.weight",
        "attn_compressor_kv.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.compressor.wgate.weight",
        "attn_compressor_gate.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.compressor.norm.weight",
        "attn_compressor_norm.weight",
        TensorClass::Vector,
    ),
    (
        "attn.indexer.wq_b.weight",
        "indexer.attn_q_b.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.indexer.weights_proj.weight",
        "indexer.proj.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.indexer.compressor.ape",
        "indexer_compressor_ape.weight",
        TensorClass::Ape,
    ),
    (
        "attn.indexer.compressor.wkv.weight",
        "indexer_compressor_kv.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.indexer.compressor.wgate.weight",
        "indexer_compressor_gate.weight",
        TensorClass::Dense16,
    ),
    (
        "attn.indexer.compressor.norm.weight",
        "indexer_compressor_norm.weight",
        TensorClass::Vector,
    ),
    ("hc_ffn_fn", "hc_ffn_fn.weight", TensorClass::HcFn),
    ("hc_ffn_scale", "hc_ffn_scale.weight", TensorClass::Vector),
    ("hc_ffn_base", "hc_ffn_base.weight", TensorClass::Vector),
    ("ffn_norm.weight", "ffn_norm.weight", TensorClass::Vector),
    (
        "ffn.gate.weight",
        "ffn_gate_inp.weight",
        TensorClass::Dense16,
    ),
    ("ffn.gate.bias", "exp_probs_b.bias", TensorClass::Vector),
    (
        "ffn.gate.tid2eid",
        "ffn_gate_tid2eid.weight",
        TensorClass::Tid2Eid,
    ),
    (
        "ffn.shared_experts.w1.weight",
        "ffn_gate_shexp.weight",
        TensorClass::SharedExpert,
    ),
    (
        "ffn.shared_experts.w3.weight",
        "ffn_up_shexp.weight",
        TensorClass::SharedExpert,
    ),
    (
        "ffn.shared_experts.w2.weight",
        "ffn_down_shexp.weight",
        TensorClass::SharedExpert,
    ),
];

/// Routed expert parts: (official `w`, GGUF suffix, class).
const EXPERT_PARTS: [(u8, &str, TensorClass); 3] = [
    (1, "ffn_gate_exps.weight", TensorClass::ExpertGateUp),
    (3, "ffn_up_exps.weight", TensorClass::ExpertGateUp),
    (2, "ffn_down_exps.weight", TensorClass::ExpertDown),
];

/// The GGUF destination of an official tensor name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GgufTarget {
    /// The whole GGUF tensor.
    Tensor(String),
    /// Expert `expert` of a stacked expert tensor.
    Expert { name: String, expert: usize },
}

impl GgufTarget {
    /// The GGUF tensor name.
    pub fn name(&self) -> &str {
        match self {
            GgufTarget::Tensor(n) | GgufTarget::Expert { name: n, .. } => n,
        }
    }
}

fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// Map an official checkpoint tensor name (weights, not `.scale` siblings) to its GGUF
/// destination, for any layer count. `None` for names outside the DeepSeek V4 layout.
pub fn official_to_gguf(name: &str) -> Option<GgufTarget> {
    if let Some((_, g, _)) = GLOBAL.iter().find(|(o, _, _)| *o == name) {
        return Some(GgufTarget::Tensor((*g).to_string()));
    }
    let rest = name.strip_prefix("layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let layer = parse_index(idx)?;
    if let Some((_, g, _)) = LAYER.iter().find(|(o, _, _)| *o == rest) {
        return Some(GgufTarget::Tensor(format!("blk.{layer}.{g}")));
    }
    let rest = rest.strip_prefix("ffn.experts.")?;
    let (e, rest) = rest.split_once('.')?;
    let expert = parse_index(e)?;
    let w = match rest {
        "w1.weight" => 1,
        "w2.weight" => 2,
        "w3.weight" => 3,
        _ => return None,
    };
    let (_, g, _) = EXPERT_PARTS.iter().find(|(pw, _, _)| *pw == w)?;
    Some(GgufTarget::Expert {
        name: format!("blk.{layer}.{g}"),
        expert,
    })
}

/// Map a GGUF tensor name back to the official name (for stacked expert tensors, the name of
/// expert 0's matrix with `*` in place of the expert index).
pub fn gguf_to_official(name: &str) -> Option<String> {
    if let Some((o, _, _)) = GLOBAL.iter().find(|(_, g, _)| *g == name) {
        return Some((*o).to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let layer = parse_index(idx)?;
    if let Some((o, _, _)) = LAYER.iter().find(|(_, g, _)| *g == rest) {
        return Some(format!("layers.{layer}.{o}"));
    }
    let (w, _, _) = EXPERT_PARTS.iter().find(|(_, g, _)| *g == rest)?;
    Some(format!("layers.{layer}.ffn.experts.*.w{w}.weight"))
}

fn layer_class(suffix: &str) -> TensorClass {
    LAYER
        .iter()
        .find(|(_, g, _)| *g == suffix)
        .map(|(_, _, c)| *c)
        .unwrap_or(TensorClass::Vector)
}

/// The GGUF tensor inventory of `shape` (model-spec §2.3), in file order.
///
/// `has_gate_bias(layer)` tells whether the checkpoint has `layers.L.ffn.gate.bias`: the
/// bias is required on top-k routed layers and converted when present on hash layers.
pub fn plan_tensors(shape: &Shape, has_gate_bias: &dyn Fn(usize) -> bool) -> Vec<PlannedTensor> {
    let h = shape.n_embd as u64;
    let v = shape.n_vocab as u64;
    let hc = shape.hc_mult as u64;
    let hc_dim = shape.hc_dim() as u64;
    let mix = shape.hc_mix() as u64;
    let mut out = Vec::new();
    let global = |out: &mut Vec<PlannedTensor>, gguf: &str, ne: Vec<u64>| {
        let (o, _, class) = GLOBAL
            .iter()
            .find(|(_, g, _)| *g == gguf)
            .copied()
            .unwrap_or(("", "", TensorClass::Vector));
        out.push(PlannedTensor {
            name: gguf.to_string(),
            ne,
            class,
            source: Source::Single(o.to_string()),
        });
    };
    global(&mut out, "token_embd.weight", vec![h, v]);

    for il in 0..shape.n_layer {
        let kind = shape.attn_kind(il);
        let mut push = |suffix: &str, ne: Vec<u64>| {
            let official = LAYER
                .iter()
                .find(|(_, g, _)| *g == suffix)
                .map(|(o, _, _)| *o)
                .unwrap_or("");
            out.push(PlannedTensor {
                name: format!("blk.{il}.{suffix}"),
                ne,
                class: layer_class(suffix),
                source: Source::Single(format!("layers.{il}.{official}")),
            });
        };
        let q_lora = shape.q_lora_rank as u64;
        let hd = shape.head_dim as u64;
        push("hc_attn_fn.weight", vec![hc_dim, mix]);
        push("hc_attn_scale.weight", vec![3]);
        push("hc_attn_base.weight", vec![mix]);
        push("attn_norm.weight", vec![h]);
        push("attn_q_a.weight", vec![h, q_lora]);
        push("attn_q_a_norm.weight", vec![q_lora]);
        push("attn_q_b.weight", vec![q_lora, shape.n_head as u64 * hd]);
        push("attn_kv.weight", vec![h, hd]);
        push("attn_kv_a_norm.weight", vec![hd]);
        push("attn_sinks.weight", vec![shape.n_head as u64]);
        let o_rank = (shape.o_groups * shape.o_lora_rank) as u64;
        push(
            "attn_output_a.weight",
            vec![shape.group_in() as u64, o_rank],
        );
        push("attn_output_b.weight", vec![o_rank, h]);
        if kind.is_compressed() {
            let coff = kind.coff() as u64;
            let ratio = kind.ratio() as u64;
            push("attn_compressor_ape.weight", vec![coff * hd, ratio]);
            push("attn_compressor_kv.weight", vec![h, coff * hd]);
            push("attn_compressor_gate.weight", vec![h, coff * hd]);
            push("attn_compressor_norm.weight", vec![hd]);
        }
        if let AttnKind::Csa { ratio } = kind {
            let coff = kind.coff() as u64;
            let idim = shape.index_head_dim as u64;
            let ih = shape.index_heads as u64;
            push("indexer.attn_q_b.weight", vec![q_lora, ih * idim]);
            push("indexer.proj.weight", vec![h, ih]);
            push(
                "indexer_compressor_ape.weight",
                vec![coff * idim, ratio as u64],
            );
            push("indexer_compressor_kv.weight", vec![h, coff * idim]);
            push("indexer_compressor_gate.weight", vec![h, coff * idim]);
            push("indexer_compressor_norm.weight", vec![idim]);
        }
        push("hc_ffn_fn.weight", vec![hc_dim, mix]);
        push("hc_ffn_scale.weight", vec![3]);
        push("hc_ffn_base.weight", vec![mix]);
        push("ffn_norm.weight", vec![h]);
        let n_exp = shape.n_expert as u64;
        push("ffn_gate_inp.weight", vec![h, n_exp]);
        if !shape.is_hash_layer(il) || has_gate_bias(il) {
            push("exp_probs_b.bias", vec![n_exp]);
        }
        if shape.is_hash_layer(il) {
            push(
                "ffn_gate_tid2eid.weight",
                vec![shape.n_expert_used as u64, v],
            );
        }
        let ff = shape.n_ff_exp as u64;
        for (w, suffix, class) in EXPERT_PARTS {
            let ne = if w == 2 {
                vec![ff, h, n_exp]
            } else {
                vec![h, ff, n_exp]
            };
            out.push(PlannedTensor {
                name: format!("blk.{il}.{suffix}"),
                ne,
                class,
                source: Source::Experts {
                    layer: il,
                    w,
                    n_expert: shape.n_expert,
                },
            });
        }
        let sh_ff = ff * shape.n_expert_shared as u64;
        let mut push = |suffix: &str, ne: Vec<u64>| {
            let official = LAYER
                .iter()
                .find(|(_, g, _)| *g == suffix)
                .map(|(o, _, _)| *o)
                .unwrap_or("");
            out.push(PlannedTensor {
                name: format!("blk.{il}.{suffix}"),
                ne,
                class: layer_class(suffix),
                source: Source::Single(format!("layers.{il}.{official}")),
            });
        };
        push("ffn_gate_shexp.weight", vec![h, sh_ff]);
        push("ffn_up_shexp.weight", vec![h, sh_ff]);
        push("ffn_down_shexp.weight", vec![sh_ff, h]);
    }

    global(&mut out, "output_hc_fn.weight", vec![hc_dim, hc]);
    global(&mut out, "output_hc_scale.weight", vec![1]);
    global(&mut out, "output_hc_base.weight", vec![hc]);
    global(&mut out, "output_norm.weight", vec![h]);
    global(&mut out, "output.weight", vec![h, v]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_and_layer_names_map_both_ways() {
        let cases = [
            ("embed.weight", "token_embd.weight"),
            ("head.weight", "output.weight"),
            ("norm.weight", "output_norm.weight"),
            ("hc_head_fn", "output_hc_fn.weight"),
            ("hc_head_scale", "output_hc_scale.weight"),
            ("hc_head_base", "output_hc_base.weight"),
            ("layers.0.attn.attn_sink", "blk.0.attn_sinks.weight"),
            ("layers.12.attn.wq_a.weight", "blk.12.attn_q_a.weight"),
            ("layers.42.attn.wo_b.weight", "blk.42.attn_output_b.weight"),
            (
                "layers.2.attn.compressor.ape",
                "blk.2.attn_compressor_ape.weight",
            ),
            (
                "layers.2.attn.indexer.wq_b.weight",
                "blk.2.indexer.attn_q_b.weight",
            ),
            (
                "layers.2.attn.indexer.weights_proj.weight",
                "blk.2.indexer.proj.weight",
            ),
            (
                "layers.4.attn.indexer.compressor.norm.weight",
                "blk.4.indexer_compressor_norm.weight",
            ),
            ("layers.3.ffn.gate.bias", "blk.3.exp_probs_b.bias"),
            ("layers.1.ffn.gate.tid2eid", "blk.1.ffn_gate_tid2eid.weight"),
            ("layers.5.ffn.gate.weight", "blk.5.ffn_gate_inp.weight"),
            (
                "layers.5.ffn.shared_experts.w2.weight",
                "blk.5.ffn_down_shexp.weight",
            ),
            ("layers.7.hc_ffn_fn", "blk.7.hc_ffn_fn.weight"),
            ("layers.1000.ffn_norm.weight", "blk.1000.ffn_norm.weight"),
        ];
        for (o, g) in cases {
            assert_eq!(
                official_to_gguf(o),
                Some(GgufTarget::Tensor(g.to_string())),
                "{o}"
            );
            assert_eq!(gguf_to_official(g).as_deref(), Some(o), "{g}");
        }
    }

    #[test]
    fn experts_map_to_stacked_tensors() {
        assert_eq!(
            official_to_gguf("layers.3.ffn.experts.255.w1.weight"),
            Some(GgufTarget::Expert {
                name: "blk.3.ffn_gate_exps.weight".into(),
                expert: 255
            })
        );
        assert_eq!(
            official_to_gguf("layers.0.ffn.experts.0.w3.weight")
                .unwrap()
                .name(),
            "blk.0.ffn_up_exps.weight"
        );
        assert_eq!(
            official_to_gguf("layers.0.ffn.experts.7.w2.weight")
                .unwrap()
                .name(),
            "blk.0.ffn_down_exps.weight"
        );
        assert_eq!(
            gguf_to_official("blk.9.ffn_down_exps.weight").as_deref(),
            Some("layers.9.ffn.experts.*.w2.weight")
        );
    }

    #[test]
    fn foreign_names_do_not_map() {
        for n in [
            "layers.0.attn.wq_a.scale",
            "layers.x.attn_norm.weight",
            "layers.01.attn_norm.weight",
            "layers.0.ffn.experts.0.w4.weight",
            "layers.0.ffn.experts..w1.weight",
            "layers.0.attn.unknown",
            "mtp.0.enorm.weight",
            "model.embed_tokens.weight",
            "",
        ] {
            assert_eq!(official_to_gguf(n), None, "{n}");
        }
        assert_eq!(gguf_to_official("blk.0.nope.weight"), None);
    }

    #[test]
    fn flash_inventory_matches_the_spec() {
        let s = Shape::flash();
        let plan = plan_tensors(&s, &|_| false);
        let get = |n: &str| plan.iter().find(|t| t.name == n).unwrap();
        assert_eq!(get("token_embd.weight").ne, vec![4096, 129280]);
        assert_eq!(get("output_hc_fn.weight").ne, vec![16384, 4]);
        assert_eq!(get("output_hc_scale.weight").ne, vec![1]);
        assert_eq!(get("blk.0.hc_attn_fn.weight").ne, vec![16384, 24]);
        assert_eq!(get("blk.0.attn_q_b.weight").ne, vec![1024, 32768]);
        assert_eq!(get("blk.0.attn_output_a.weight").ne, vec![4096, 8192]);
        assert_eq!(get("blk.0.attn_output_b.weight").ne, vec![8192, 4096]);
        assert_eq!(get("blk.2.attn_compressor_ape.weight").ne, vec![1024, 4]);
        assert_eq!(get("blk.3.attn_compressor_ape.weight").ne, vec![512, 128]);
        assert_eq!(get("blk.3.attn_compressor_kv.weight").ne, vec![4096, 512]);
        assert_eq!(get("blk.2.attn_compressor_kv.weight").ne, vec![4096, 1024]);
        assert_eq!(get("blk.2.indexer.attn_q_b.weight").ne, vec![1024, 8192]);
        assert_eq!(get("blk.2.indexer.proj.weight").ne, vec![4096, 64]);
        assert_eq!(get("blk.2.indexer_compressor_ape.weight").ne, vec![256, 4]);
        assert_eq!(
            get("blk.2.indexer_compressor_kv.weight").ne,
            vec![4096, 256]
        );
        assert_eq!(get("blk.2.indexer_compressor_norm.weight").ne, vec![128]);
        assert_eq!(get("blk.2.ffn_gate_tid2eid.weight").ne, vec![6, 129280]);
        assert_eq!(get("blk.3.exp_probs_b.bias").ne, vec![256]);
        assert_eq!(get("blk.3.ffn_gate_exps.weight").ne, vec![4096, 2048, 256]);
        assert_eq!(get("blk.3.ffn_down_exps.weight").ne, vec![2048, 4096, 256]);
        assert_eq!(get("blk.3.ffn_down_shexp.weight").ne, vec![2048, 4096]);
        assert_eq!(get("output.weight").ne, vec![4096, 129280]);
        let names: Vec<&str> = plan.iter().map(|t| t.name.as_str()).collect();
        assert!(!names.contains(&"blk.0.attn_compressor_kv.weight"));
        assert!(!names.contains(&"blk.3.indexer.proj.weight"));
        assert!(!names.contains(&"blk.3.ffn_gate_tid2eid.weight"));
        assert!(!names.contains(&"blk.2.exp_probs_b.bias"));
        // Per layer: 12 attention + 4 HC-ffn/norm + router + 3 experts + 3 shared = 23,
        // + bias on routed layers, + tid2eid on hash layers, + 4 compressor, + 6 indexer.
        let mut expected = 6;
        for il in 0..43 {
            expected += 23 + 1;
            match s.attn_kind(il) {
                AttnKind::Swa => {}
                AttnKind::Hca { .. } => expected += 4,
                AttnKind::Csa { .. } => expected += 10,
            }
        }
        assert_eq!(plan.len(), expected);
        // Every single-source tensor maps back to its GGUF name.
        for t in &plan {
            for o in t.official_names() {
                assert_eq!(official_to_gguf(&o).unwrap().name(), t.name);
            }
            assert!(gguf_to_official(&t.name).is_some());
        }
        // Hash-layer bias is converted when present.
        let plan = plan_tensors(&s, &|il| il == 1);
        assert!(plan.iter().any(|t| t.name == "blk.1.exp_probs_b.bias"));
        assert!(!plan.iter().any(|t| t.name == "blk.0.exp_probs_b.bias"));
    }
}
