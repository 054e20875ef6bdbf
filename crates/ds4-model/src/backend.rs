//! The step-level backend interface, the backend-neutral KV state and the debug trace.

use crate::error::{ModelError, Result};
use crate::ops::CompressorGeom;
use crate::plan::Plan;
use crate::shape::{AttnKind, Shape};

/// A backend evaluates chunks of tokens at the current position of its KV state.
///
/// Implemented by the CPU reference backend ([`crate::cpu::CpuBackend`]); the CUDA backend
/// implements it in `ds4-cuda`. A [`crate::Session`] drives it (chunking, sync, snapshots).
pub trait Backend: Send {
    /// Short name ("cpu", "cuda").
    fn name(&self) -> &str;
    /// The model shape.
    fn shape(&self) -> &Shape;
    /// Context size: the most tokens the state can hold.
    fn ctx(&self) -> usize;
    /// Tokens already evaluated into the state (the position of the next token).
    fn n_tokens(&self) -> usize;
    /// Empty the state (position 0).
    fn reset(&mut self);
    /// Evaluate `tokens` at positions `n_tokens()..n_tokens()+tokens.len()` as one chunk.
    /// The logits of the last token are then in [`Backend::logits`]; with `all_logits`, the
    /// logits of every token of the chunk are in [`Backend::chunk_logits`] (`[n][vocab]`).
    fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<()>;
    /// Logits of the last evaluated token (`n_vocab`); empty before the first eval.
    fn logits(&self) -> &[f32];
    /// The greedy pick of [`Backend::logits`], where the backend found it itself (the CUDA
    /// graph decode step, on the device): `[best, second]`, the first largest logit and the
    /// first largest of the others, over logits without NaN. None: scan the logits.
    fn greedy_pick(&self) -> Option<[u32; 2]> {
        None
    }
    /// Logits of every token of the last chunk evaluated with `all_logits`.
    fn chunk_logits(&self) -> &[f32];
    /// A copy of the KV state.
    fn export_state(&self) -> Result<KvState>;
    /// Replace the KV state (validated against the shape).
    fn import_state(&mut self, state: &KvState) -> Result<()>;
    /// Start (true, clearing any previous trace) or stop recording a [`Trace`].
    fn set_trace(&mut self, on: bool);
    /// The trace recorded since `set_trace(true)`.
    fn trace(&self) -> Option<&Trace>;
}

/// Debug trace of the evaluated tokens: routing decisions and the last token's streams.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// Tokens traced.
    pub n_tokens: usize,
    /// Per layer: the experts used by every traced token (`n_expert_used` each, ascending).
    pub experts: Vec<Vec<u32>>,
    /// Per layer: the compressed rows the indexer let every traced token attend to
    /// (`index_topk` slots each, ascending, `-1` for unused slots; every visible row when the
    /// token sees at most `index_topk`). Empty for layers without an indexer.
    pub indexer: Vec<Vec<i32>>,
    /// Per layer: the HC streams output by the layer at the last traced token
    /// (`hc_mult·n_embd`).
    pub last_hidden: Vec<Vec<f32>>,
    /// Per layer: named intermediates of the last traced token, the same names on every backend
    /// (`a` attention input, `qr`, `q`, `heads` attention output, `low`, `x1` streams after the
    /// attention sublayer, `b` FFN input, `rlog` router logits, `sh_out` shared expert), for
    /// locating the first operation where two backends differ.
    pub probes: Vec<Vec<(String, Vec<f32>)>>,
}

/// The intermediates every backend records in [`Trace::probes`], with their per-token length.
pub fn probe_dims(s: &crate::shape::Shape) -> [(&'static str, usize); 9] {
    let e = s.n_embd;
    [
        ("a", e),
        ("qr", s.q_lora_rank),
        ("q", s.n_head * s.head_dim),
        ("heads", s.n_head * s.head_dim),
        ("low", s.o_groups * s.o_lora_rank),
        ("x1", s.hc_dim()),
        ("b", e),
        ("rlog", s.n_expert),
        ("sh_out", e),
    ]
}

/// KV state of one layer, backend-neutral (the snapshot's layout, model-spec §4.5).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    /// Raw sliding-window rows for positions `T-Rl..T` in logical order, `Rl = min(T, window)`
    /// rows of `head_dim`.
    pub raw: Vec<f32>,
    /// Compressed attention rows (`n_comp` rows of `head_dim`); empty for SWA layers.
    pub comp: Vec<f32>,
    /// Attention compressor frontier (`rows × width` each); empty for SWA layers.
    pub state_kv: Vec<f32>,
    pub state_score: Vec<f32>,
    /// Indexer compressed rows (`n_index_comp` rows of `index_head_dim`); CSA layers only.
    pub index_comp: Vec<f32>,
    /// Indexer compressor frontier; CSA layers only.
    pub index_state_kv: Vec<f32>,
    pub index_state_score: Vec<f32>,
}

/// The whole KV state.
#[derive(Clone, Debug, PartialEq)]
pub struct KvState {
    pub n_tokens: usize,
    pub layers: Vec<LayerState>,
}

/// The attention compressor geometry of a layer kind (`None` for SWA).
pub fn attn_geom(shape: &Shape, kind: AttnKind) -> Option<CompressorGeom> {
    match kind {
        AttnKind::Swa => None,
        k => Some(CompressorGeom {
            ratio: k.ratio(),
            overlap: k.has_indexer(),
            d_c: shape.head_dim,
        }),
    }
}

/// The indexer compressor geometry of a layer kind (`None` without indexer).
pub fn index_geom(shape: &Shape, kind: AttnKind) -> Option<CompressorGeom> {
    kind.has_indexer().then(|| CompressorGeom {
        ratio: kind.ratio(),
        overlap: true,
        d_c: shape.index_head_dim,
    })
}

impl KvState {
    /// The empty state.
    pub fn empty(shape: &Shape, plan: &Plan) -> KvState {
        let layers = plan
            .layers
            .iter()
            .map(|lp| {
                let st = |g: Option<CompressorGeom>| {
                    let n = g.map_or(0, |g| g.state_len());
                    (vec![0.0; n], vec![crate::ops::EMPTY_SCORE; n])
                };
                let (state_kv, state_score) = st(attn_geom(shape, lp.attn));
                let (index_state_kv, index_state_score) = st(index_geom(shape, lp.attn));
                LayerState {
                    raw: Vec::new(),
                    comp: Vec::new(),
                    state_kv,
                    state_score,
                    index_comp: Vec::new(),
                    index_state_kv,
                    index_state_score,
                }
            })
            .collect();
        KvState {
            n_tokens: 0,
            layers,
        }
    }

    /// Check every size against the shape: `Rl = min(T, window)` raw rows, `floor(T/ratio)`
    /// compressed and indexer rows, frontier sizes.
    pub fn validate(&self, shape: &Shape, plan: &Plan) -> Result<()> {
        let bad = |reason: String| ModelError::Backend {
            backend: "state".into(),
            reason,
        };
        if self.layers.len() != shape.n_layer {
            return Err(bad(format!(
                "{} layers, the model has {}",
                self.layers.len(),
                shape.n_layer
            )));
        }
        let t = self.n_tokens;
        let rl = t.min(shape.window);
        for (il, (l, lp)) in self.layers.iter().zip(&plan.layers).enumerate() {
            let check = |what: &str, got: usize, want: usize| {
                if got == want {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "layer {il}: {what} has {got} values, expected {want}"
                    )))
                }
            };
            check("raw rows", l.raw.len(), rl * shape.head_dim)?;
            let ratio = lp.attn.ratio();
            let n_comp = t.checked_div(ratio).unwrap_or(0);
            check("compressed rows", l.comp.len(), n_comp * shape.head_dim)?;
            let sl = attn_geom(shape, lp.attn).map_or(0, |g| g.state_len());
            check("compressor kv", l.state_kv.len(), sl)?;
            check("compressor score", l.state_score.len(), sl)?;
            let ig = index_geom(shape, lp.attn);
            let n_icomp = if ig.is_some() { n_comp } else { 0 };
            check(
                "indexer rows",
                l.index_comp.len(),
                n_icomp * shape.index_head_dim,
            )?;
            let isl = ig.map_or(0, |g| g.state_len());
            check("indexer kv", l.index_state_kv.len(), isl)?;
            check("indexer score", l.index_state_score.len(), isl)?;
        }
        Ok(())
    }
}
