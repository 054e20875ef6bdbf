//! Session snapshots in ds4's payload layout (model-spec §4.5), generalised to the shape.
//!
//! Little-endian. Header of 13 u32: magic `"DSV4"` (0x34565344), version 1, context size,
//! prefill chunk, raw cap, raw window, compressed cap, token count `T`, layers, head dim,
//! indexer head dim, vocab, live raw rows `Rl = min(T, raw window)`. Body: `u32[T]` tokens,
//! `f32[vocab]` logits, `u32[layers]` n_comp, `u32[layers]` n_index_comp, then per layer the
//! `Rl` raw rows (logical order), and for compressed layers the compressed rows, the compressor
//! `state_kv` and `state_score`, and for CSA layers the indexer rows and the indexer frontier.
//!
//! Generalisation: raw cap = raw window = `min(window, ctx)`; compressed cap =
//! `ctx / min_ratio + 2` (`ctx/4 + 2` for Flash); frontier sizes follow the layer geometry.
//!
//! Loading refuses, with a typed error: a short payload, trailing bytes, wrong magic or
//! version, a layer count / head dim / indexer dim / vocab that differs from the model, a
//! saved context larger than the session's or `T ≥ ctx`, a raw window that differs, `Rl ≠
//! min(T, window)`, compressed counts that are not `floor(T / ratio)` (or exceed the cap),
//! indexer counts that differ from the attention counts, token ids outside the vocabulary.
//! Unlike ds4 it accepts a different prefill chunk size: in this engine the state does not
//! depend on chunking (prefill in any chunking is bit-identical).

use crate::backend::{KvState, LayerState, attn_geom, index_geom};
use crate::plan::Plan;
use crate::shape::Shape;

/// "DSV4" little-endian.
pub const MAGIC: u32 = 0x3456_5344;
/// Payload version.
pub const VERSION: u32 = 1;
/// Header fields (u32).
pub const HEADER_FIELDS: usize = 13;

/// Errors reading a snapshot payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot truncated: {what} needs {need} bytes, {have} remain")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("not a session snapshot: magic {0:#010x}, expected 0x34565344 (\"DSV4\")")]
    BadMagic(u32),
    #[error("unsupported snapshot version {0} (expected 1)")]
    BadVersion(u32),
    #[error("snapshot {field} is {found}, this session has {expected}")]
    Mismatch {
        field: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("invalid snapshot: {0}")]
    Invalid(String),
    #[error("snapshot has {0} trailing bytes")]
    Trailing(u64),
}

/// The header of a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub ctx: u32,
    pub prefill_chunk: u32,
    pub raw_cap: u32,
    pub raw_window: u32,
    pub comp_cap: u32,
    pub n_tokens: u32,
    pub n_layer: u32,
    pub head_dim: u32,
    pub index_head_dim: u32,
    pub n_vocab: u32,
    pub raw_live: u32,
}

/// A decoded payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub header: SnapshotHeader,
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub state: KvState,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32, SnapshotError> {
    u32::try_from(v).map_err(|_| SnapshotError::Invalid(format!("{what} {v} does not fit in u32")))
}

/// Compressed cap for a context: `ctx / min_ratio + 2`.
pub fn comp_cap(plan: &Plan, ctx: usize) -> usize {
    ctx / plan.min_ratio() + 2
}

/// Encode a payload. `state` must be valid for the shape (as exported by a backend).
#[allow(clippy::too_many_arguments)]
pub fn encode(
    shape: &Shape,
    plan: &Plan,
    ctx: usize,
    prefill_chunk: usize,
    tokens: &[u32],
    logits: &[f32],
    state: &KvState,
) -> Result<Vec<u8>, SnapshotError> {
    let t = tokens.len();
    if state.n_tokens != t {
        return Err(SnapshotError::Invalid(format!(
            "state holds {} tokens, the token list {t}",
            state.n_tokens
        )));
    }
    if logits.len() != shape.n_vocab {
        return Err(SnapshotError::Invalid(format!(
            "{} logits, vocab is {}",
            logits.len(),
            shape.n_vocab
        )));
    }
    state
        .validate(shape, plan)
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let raw_window = shape.window.min(ctx);
    let rl = t.min(raw_window);
    let mut out = Vec::new();
    for v in [
        MAGIC,
        VERSION,
        u32_of(ctx, "context")?,
        u32_of(prefill_chunk, "prefill chunk")?,
        u32_of(raw_window, "raw cap")?,
        u32_of(raw_window, "raw window")?,
        u32_of(comp_cap(plan, ctx), "compressed cap")?,
        u32_of(t, "token count")?,
        u32_of(shape.n_layer, "layers")?,
        u32_of(shape.head_dim, "head dim")?,
        u32_of(shape.index_head_dim, "indexer head dim")?,
        u32_of(shape.n_vocab, "vocab")?,
        u32_of(rl, "live raw rows")?,
    ] {
        put_u32(&mut out, v);
    }
    for &tok in tokens {
        put_u32(&mut out, tok);
    }
    put_f32s(&mut out, logits);
    for l in &state.layers {
        put_u32(&mut out, u32_of(l.comp.len() / shape.head_dim, "n_comp")?);
    }
    for l in &state.layers {
        put_u32(
            &mut out,
            u32_of(l.index_comp.len() / shape.index_head_dim, "n_index_comp")?,
        );
    }
    for (l, lp) in state.layers.iter().zip(&plan.layers) {
        // The state holds min(T, window) rows; the payload holds min(T, raw window) (smaller
        // only when ctx < window): the last rl rows.
        let skip = l.raw.len() - rl * shape.head_dim;
        put_f32s(&mut out, &l.raw[skip..]);
        if lp.attn.is_compressed() {
            put_f32s(&mut out, &l.comp);
            put_f32s(&mut out, &l.state_kv);
            put_f32s(&mut out, &l.state_score);
        }
        if lp.attn.has_indexer() {
            put_f32s(&mut out, &l.index_comp);
            put_f32s(&mut out, &l.index_state_kv);
            put_f32s(&mut out, &l.index_state_score);
        }
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: u64) -> Result<&'a [u8], SnapshotError> {
        let have = (self.buf.len() - self.pos) as u64;
        if n > have {
            return Err(SnapshotError::Truncated {
                what,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32s(&mut self, what: &'static str, n: usize) -> Result<Vec<u32>, SnapshotError> {
        let b = self.take(what, n as u64 * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn f32s(&mut self, what: &'static str, n: usize) -> Result<Vec<f32>, SnapshotError> {
        let b = self.take(what, n as u64 * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Decode and validate a payload for a session of `ctx` tokens on this model.
pub fn decode(
    bytes: &[u8],
    shape: &Shape,
    plan: &Plan,
    ctx: usize,
) -> Result<Snapshot, SnapshotError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic = r.u32("header")?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic(magic));
    }
    let version = r.u32("header")?;
    if version != VERSION {
        return Err(SnapshotError::BadVersion(version));
    }
    let mut h = [0u32; HEADER_FIELDS - 2];
    for v in h.iter_mut() {
        *v = r.u32("header")?;
    }
    let header = SnapshotHeader {
        ctx: h[0],
        prefill_chunk: h[1],
        raw_cap: h[2],
        raw_window: h[3],
        comp_cap: h[4],
        n_tokens: h[5],
        n_layer: h[6],
        head_dim: h[7],
        index_head_dim: h[8],
        n_vocab: h[9],
        raw_live: h[10],
    };
    let mismatch = |field, expected: usize, found: u32| {
        if expected as u64 != found as u64 {
            Err(SnapshotError::Mismatch {
                field,
                expected: expected as u64,
                found: found as u64,
            })
        } else {
            Ok(())
        }
    };
    mismatch("layer count", shape.n_layer, header.n_layer)?;
    mismatch("head dim", shape.head_dim, header.head_dim)?;
    mismatch(
        "indexer head dim",
        shape.index_head_dim,
        header.index_head_dim,
    )?;
    mismatch("vocab", shape.n_vocab, header.n_vocab)?;
    if header.ctx as usize > ctx {
        return Err(SnapshotError::Mismatch {
            field: "context size (saved larger than the session's)",
            expected: ctx as u64,
            found: header.ctx as u64,
        });
    }
    let t = header.n_tokens as usize;
    if t >= ctx || t >= header.ctx as usize {
        return Err(SnapshotError::Invalid(format!(
            "{t} tokens do not fit a context of {} (saved {})",
            ctx, header.ctx
        )));
    }
    let raw_window = shape.window.min(ctx);
    mismatch("raw window", raw_window, header.raw_window)?;
    if header.raw_cap < header.raw_window {
        return Err(SnapshotError::Invalid(format!(
            "raw cap {} is below the raw window {}",
            header.raw_cap, header.raw_window
        )));
    }
    let rl = t.min(raw_window);
    mismatch("live raw rows", rl, header.raw_live)?;
    let hd = shape.head_dim;
    let ihd = shape.index_head_dim;

    let tokens = r.u32s("tokens", t)?;
    if let Some((i, &bad)) = tokens
        .iter()
        .enumerate()
        .find(|(_, tok)| **tok as usize >= shape.n_vocab)
    {
        return Err(SnapshotError::Invalid(format!(
            "token {bad} at position {i} is outside the vocabulary ({})",
            shape.n_vocab
        )));
    }
    let logits = r.f32s("logits", shape.n_vocab)?;
    let n_comp = r.u32s("compressed counts", shape.n_layer)?;
    let n_icomp = r.u32s("indexer counts", shape.n_layer)?;
    for (il, lp) in plan.layers.iter().enumerate() {
        let ratio = lp.attn.ratio();
        let want = t.checked_div(ratio).unwrap_or(0);
        if n_comp[il] as usize != want || want > header.comp_cap as usize && ratio > 0 {
            return Err(SnapshotError::Invalid(format!(
                "layer {il}: {} compressed rows, {t} tokens at ratio {ratio} make {want} (cap {})",
                n_comp[il], header.comp_cap
            )));
        }
        let iwant = if lp.attn.has_indexer() { want } else { 0 };
        if n_icomp[il] as usize != iwant {
            return Err(SnapshotError::Invalid(format!(
                "layer {il}: {} indexer rows, expected {iwant}",
                n_icomp[il]
            )));
        }
    }
    let mut layers = Vec::with_capacity(shape.n_layer);
    for (il, lp) in plan.layers.iter().enumerate() {
        let raw = r.f32s("raw rows", rl * hd)?;
        let (mut comp, mut state_kv, mut state_score) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(g) = attn_geom(shape, lp.attn) {
            comp = r.f32s("compressed rows", n_comp[il] as usize * hd)?;
            state_kv = r.f32s("compressor state", g.state_len())?;
            state_score = r.f32s("compressor scores", g.state_len())?;
        }
        let (mut index_comp, mut index_state_kv, mut index_state_score) =
            (Vec::new(), Vec::new(), Vec::new());
        if let Some(g) = index_geom(shape, lp.attn) {
            index_comp = r.f32s("indexer rows", n_icomp[il] as usize * ihd)?;
            index_state_kv = r.f32s("indexer state", g.state_len())?;
            index_state_score = r.f32s("indexer scores", g.state_len())?;
        }
        layers.push(LayerState {
            raw,
            comp,
            state_kv,
            state_score,
            index_comp,
            index_state_kv,
            index_state_score,
        });
    }
    let rest = (bytes.len() - r.pos) as u64;
    if rest != 0 {
        return Err(SnapshotError::Trailing(rest));
    }
    Ok(Snapshot {
        header,
        tokens,
        logits,
        state: KvState {
            n_tokens: t,
            layers,
        },
    })
}
