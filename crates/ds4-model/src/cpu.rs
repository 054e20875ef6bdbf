//! The CPU reference backend: DeepSeek V4 Flash's forward pass on any shape, multi-threaded
//! with rayon.
//!
//! A chunk of `n` tokens runs layer-major: every projection is a batched matmul over the chunk
//! (bit-identical to per-token matvecs, so chunking never changes the numbers); the
//! compressors run sequentially per token (they are a recurrence); indexer scoring, top-k and
//! attention then run in parallel over the chunk's tokens and heads. Decode is the same code
//! with `n = 1`. Scratch buffers grow to the largest chunk seen and are reused, so the decode
//! loop does not allocate (apart from the quantized-activation buffers `ds4_quant` builds for
//! Q8_0 / K-quant weights).
//!
//! KV rows are kept in f32 (ds4 rounds raw rows to f16: that is its storage choice, not part of
//! the model, and the references omit it).

use std::cell::RefCell;
use std::sync::Arc;

use ds4_gguf::Gguf;
use rayon::prelude::*;

use crate::backend::{Backend, KvState, LayerState, Trace, attn_geom, index_geom};
use crate::engine::Model;
use crate::error::{ModelError, Result};
use crate::linear::{dequantize_row, matmul, qexpert, qmat};
use crate::ops::{self, CompressorGeom};
use crate::plan::{MoeKind, RopeKind};
use crate::shape::Shape;
use crate::steer::{Steering, Sublayer};
use crate::weights::{CompressorWeights, HcWeights, LayerWeights};

/// KV state of one layer, CPU layout.
#[derive(Clone, Debug)]
struct LayerKv {
    /// Ring of `window` raw rows: position `p` lives in row `p % window`.
    raw: Vec<f32>,
    /// Compressed rows, appended (capacity reserved for the context).
    comp: Vec<f32>,
    st_kv: Vec<f32>,
    st_sc: Vec<f32>,
    icomp: Vec<f32>,
    ist_kv: Vec<f32>,
    ist_sc: Vec<f32>,
}

/// Per-thread scratch for attention and indexer scoring.
#[derive(Default)]
struct TlScratch {
    scores: Vec<f64>,
    acc: Vec<f64>,
    iscores: Vec<f32>,
    idx: Vec<u32>,
}

thread_local! {
    static TL: RefCell<TlScratch> = RefCell::new(TlScratch::default());
}

/// Chunk scratch (grows to the largest chunk, then reused).
#[derive(Default)]
struct Scratch {
    cap: usize,
    x: Vec<f32>,
    x1: Vec<f32>,
    flat: Vec<f32>,
    mix: Vec<f32>,
    pre: Vec<f32>,
    post: Vec<f32>,
    comb: Vec<f32>,
    xin: Vec<f32>,
    a: Vec<f32>,
    qr: Vec<f32>,
    qrn: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    ckv: Vec<f32>,
    csc: Vec<f32>,
    ikv: Vec<f32>,
    isc: Vec<f32>,
    iq: Vec<f32>,
    iw: Vec<f32>,
    heads: Vec<f32>,
    grp_in: Vec<f32>,
    grp_out: Vec<f32>,
    low: Vec<f32>,
    fout: Vec<f32>,
    b: Vec<f32>,
    rlog: Vec<f32>,
    probs: Vec<f32>,
    biased: Vec<f32>,
    sel: Vec<u32>,
    wts: Vec<f32>,
    moe_x: Vec<f32>,
    moe_g: Vec<f32>,
    moe_u: Vec<f32>,
    moe_m: Vec<f32>,
    moe_d: Vec<f32>,
    order: Vec<u32>,
    offsets: Vec<usize>,
    fill: Vec<usize>,
    dout: Vec<f32>,
    sh_g: Vec<f32>,
    sh_u: Vec<f32>,
    sh_m: Vec<f32>,
    sh_out: Vec<f32>,
    rawbuf: Vec<f32>,
    isel: Vec<u32>,
    isel_n: Vec<usize>,
    row: Vec<f32>,
    ecos: Vec<f32>,
    esin: Vec<f32>,
    cos_p: Vec<f32>,
    sin_p: Vec<f32>,
    cos_c: Vec<f32>,
    sin_c: Vec<f32>,
    hmix: Vec<f32>,
    hw: Vec<f32>,
    hy: Vec<f32>,
    hn: Vec<f32>,
    /// Unit tests: every steered sublayer output `(layer, sublayer, rows)` of the last evals.
    #[cfg(test)]
    steered: Vec<(usize, Sublayer, Vec<f32>)>,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Scratch {
    fn ensure(&mut self, s: &Shape, n: usize) {
        if n <= self.cap {
            return;
        }
        let e = s.n_embd;
        let hcd = s.hc_dim();
        let k = s.n_expert_used;
        let half = s.n_rot / 2;
        for (v, per) in [
            (&mut self.x, hcd),
            (&mut self.x1, hcd),
            (&mut self.flat, hcd),
            (&mut self.mix, s.hc_mix()),
            (&mut self.pre, s.hc_mult),
            (&mut self.post, s.hc_mult),
            (&mut self.comb, s.hc_mult * s.hc_mult),
            (&mut self.xin, e),
            (&mut self.a, e),
            (&mut self.qr, s.q_lora_rank),
            (&mut self.qrn, s.q_lora_rank),
            (&mut self.q, s.n_head * s.head_dim),
            (&mut self.kv, s.head_dim),
            (&mut self.ckv, 2 * s.head_dim),
            (&mut self.csc, 2 * s.head_dim),
            (&mut self.ikv, 2 * s.index_head_dim),
            (&mut self.isc, 2 * s.index_head_dim),
            (&mut self.iq, s.index_heads * s.index_head_dim),
            (&mut self.iw, s.index_heads),
            (&mut self.heads, s.n_head * s.head_dim),
            (&mut self.grp_in, s.group_in()),
            (&mut self.grp_out, s.o_lora_rank),
            (&mut self.low, s.o_groups * s.o_lora_rank),
            (&mut self.fout, e),
            (&mut self.b, e),
            (&mut self.rlog, s.n_expert),
            (&mut self.probs, s.n_expert),
            (&mut self.wts, k),
            (&mut self.moe_x, k * e),
            (&mut self.moe_g, k * s.n_ff_exp),
            (&mut self.moe_u, k * s.n_ff_exp),
            (&mut self.moe_m, k * s.n_ff_exp),
            (&mut self.moe_d, k * e),
            (&mut self.dout, k * e),
            (&mut self.sh_g, s.n_ff_exp),
            (&mut self.sh_u, s.n_ff_exp),
            (&mut self.sh_m, s.n_ff_exp),
            (&mut self.sh_out, e),
            (&mut self.cos_p, half),
            (&mut self.sin_p, half),
            (&mut self.cos_c, half),
            (&mut self.sin_c, half),
            (&mut self.hmix, s.hc_mult),
            (&mut self.hw, s.hc_mult),
            (&mut self.hy, e),
            (&mut self.hn, e),
        ] {
            grow(v, n * per);
        }
        grow(&mut self.rawbuf, (s.window + n) * s.head_dim);
        grow(&mut self.biased, s.n_expert);
        grow(&mut self.row, s.head_dim.max(s.index_head_dim));
        grow(&mut self.ecos, half);
        grow(&mut self.esin, half);
        if self.sel.len() < n * k {
            self.sel.resize(n * k, 0);
            self.order.resize(n * k, 0);
        }
        self.offsets.resize(s.n_expert + 1, 0);
        self.fill.resize(s.n_expert + 1, 0);
        if self.isel.len() < n * s.index_topk {
            self.isel.resize(n * s.index_topk, 0);
        }
        if self.isel_n.len() < n {
            self.isel_n.resize(n, 0);
        }
        self.cap = n;
    }
}

/// The CPU reference backend.
pub struct CpuBackend {
    model: Arc<Model>,
    pool: Arc<rayon::ThreadPool>,
    qat: bool,
    ctx: usize,
    n_tokens: usize,
    kv: Vec<LayerKv>,
    sc: Scratch,
    logits: Vec<f32>,
    chunk_logits: Vec<f32>,
    trace: Option<Trace>,
    steering: Option<Arc<Steering>>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("qat", &self.qat)
            .field("ctx", &self.ctx)
            .field("n_tokens", &self.n_tokens)
            .finish()
    }
}

fn backend_err(reason: impl Into<String>) -> ModelError {
    ModelError::Backend {
        backend: "cpu".into(),
        reason: reason.into(),
    }
}

impl CpuBackend {
    /// A backend with room for `ctx` tokens (`ctx ≥ 1`).
    pub fn new(
        model: Arc<Model>,
        pool: Arc<rayon::ThreadPool>,
        qat: bool,
        ctx: usize,
    ) -> Result<CpuBackend> {
        if ctx == 0 {
            return Err(ModelError::BadOption(
                "context size must be at least 1".into(),
            ));
        }
        let s = &model.shape;
        let kv = model
            .plan
            .layers
            .iter()
            .map(|lp| {
                let ratio = lp.attn.ratio();
                let comp_rows = ctx.checked_div(ratio).map_or(0, |r| r + 1);
                let ag = attn_geom(s, lp.attn);
                let ig = index_geom(s, lp.attn);
                let st = |g: Option<CompressorGeom>| {
                    let n = g.map_or(0, |g| g.state_len());
                    (vec![0.0f32; n], vec![ops::EMPTY_SCORE; n])
                };
                let (st_kv, st_sc) = st(ag);
                let (ist_kv, ist_sc) = st(ig);
                LayerKv {
                    raw: vec![0.0; s.window * s.head_dim],
                    comp: Vec::with_capacity(comp_rows * s.head_dim),
                    st_kv,
                    st_sc,
                    icomp: Vec::with_capacity(if ig.is_some() {
                        comp_rows * s.index_head_dim
                    } else {
                        0
                    }),
                    ist_kv,
                    ist_sc,
                }
            })
            .collect();
        Ok(CpuBackend {
            model,
            pool,
            qat,
            ctx,
            n_tokens: 0,
            kv,
            sc: Scratch::default(),
            logits: Vec::new(),
            chunk_logits: Vec::new(),
            trace: None,
            steering: None,
        })
    }

    /// The backend with directional steering (`None`: the normal path). Fails when the
    /// directions are for another shape.
    pub fn with_steering(mut self, steering: Option<Arc<Steering>>) -> Result<CpuBackend> {
        if let Some(st) = &steering
            && !st.fits(&self.model.shape)
        {
            return Err(ModelError::Steering(format!(
                "directions for {:?} (layers, n_embd), the model has ({}, {})",
                st.dims(),
                self.model.shape.n_layer,
                self.model.shape.n_embd
            )));
        }
        self.steering = steering;
        Ok(self)
    }

    /// The directional steering this backend applies.
    pub fn steering(&self) -> Option<&Arc<Steering>> {
        self.steering.as_ref()
    }

    /// Whether the QAT simulation is on.
    pub fn qat(&self) -> bool {
        self.qat
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn eval_chunk(&mut self, tokens: &[u32], all_logits: bool) -> Result<()> {
        let model = self.model.clone();
        let m = &*model;
        let s = &m.shape;
        let n = tokens.len();
        let pos0 = self.n_tokens;
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= s.n_vocab {
                return Err(ModelError::TokenOutOfRange {
                    token: t,
                    pos: pos0 + i,
                    n_vocab: s.n_vocab,
                });
            }
        }
        if pos0 + n > self.ctx {
            return Err(ModelError::ContextFull {
                ctx: self.ctx,
                needed: pos0 + n,
            });
        }
        self.sc.ensure(s, n);
        let hcd = s.hc_dim();
        let e = s.n_embd;
        // Embedding, broadcast to the HC streams.
        for (t, &tok) in tokens.iter().enumerate() {
            let xs = &mut self.sc.x[t * hcd..(t + 1) * hcd];
            dequantize_row(&m.gguf, &m.weights.token_embd, tok as usize, &mut xs[..e])?;
            let (first, rest) = xs.split_at_mut(e);
            for r in rest.chunks_exact_mut(e) {
                r.copy_from_slice(first);
            }
        }
        // RoPE tables of the chunk.
        let half = s.n_rot / 2;
        for t in 0..n {
            let p = pos0 + t;
            m.plan.rope_plain.cos_sin(
                p,
                &mut self.sc.cos_p[t * half..(t + 1) * half],
                &mut self.sc.sin_p[t * half..(t + 1) * half],
            );
            m.plan.rope_compressed.cos_sin(
                p,
                &mut self.sc.cos_c[t * half..(t + 1) * half],
                &mut self.sc.sin_c[t * half..(t + 1) * half],
            );
        }
        if let Some(tr) = &mut self.trace {
            tr.n_tokens += n;
        }
        for il in 0..s.n_layer {
            let mut ctx = LayerCtx {
                m,
                il,
                lw: &m.weights.layers[il],
                qat: self.qat,
                pos0,
                n,
                tokens,
                steering: self.steering.as_deref(),
            };
            ctx.attention(&mut self.sc, &mut self.kv[il], self.trace.as_mut())?;
            ctx.ffn(&mut self.sc, self.trace.as_mut())?;
            if let Some(tr) = &mut self.trace {
                let last = &self.sc.x[(n - 1) * hcd..n * hcd];
                tr.last_hidden[il].clear();
                tr.last_hidden[il].extend_from_slice(last);
                let sc = &self.sc;
                tr.probes[il] = crate::backend::probe_dims(s)
                    .iter()
                    .map(|&(name, d)| {
                        let buf: &[f32] = match name {
                            "a" => &sc.a,
                            "qr" => &sc.qr,
                            "q" => &sc.q,
                            "heads" => &sc.heads,
                            "low" => &sc.low,
                            "x1" => &sc.x1,
                            "b" => &sc.b,
                            "rlog" => &sc.rlog,
                            _ => &sc.sh_out,
                        };
                        (name.to_string(), buf[(n - 1) * d..n * d].to_vec())
                    })
                    .collect();
            }
        }
        // Output head.
        let first = if all_logits { 0 } else { n - 1 };
        let nl = n - first;
        output_head(m, &mut self.sc, first, nl)?;
        let v = s.n_vocab;
        if all_logits {
            self.chunk_logits.resize(n * v, 0.0);
            matmul(
                &m.gguf,
                &m.weights.output,
                &self.sc.hn[..n * e],
                n,
                &mut self.chunk_logits,
            )?;
            self.logits.resize(v, 0.0);
            self.logits
                .copy_from_slice(&self.chunk_logits[(n - 1) * v..n * v]);
        } else {
            self.chunk_logits.clear();
            self.logits.resize(v, 0.0);
            matmul(
                &m.gguf,
                &m.weights.output,
                &self.sc.hn[..e],
                1,
                &mut self.logits,
            )?;
        }
        self.n_tokens += n;
        Ok(())
    }
}

/// HC head + output norm for tokens `first..first+nl` of the chunk, into `sc.hn[..nl]`.
fn output_head(m: &Model, sc: &mut Scratch, first: usize, nl: usize) -> Result<()> {
    let s = &m.shape;
    let w = &m.weights;
    let hcd = s.hc_dim();
    let e = s.n_embd;
    let hc = s.hc_mult;
    let x = &sc.x[first * hcd..(first + nl) * hcd];
    sc.flat[..nl * hcd]
        .par_chunks_mut(hcd)
        .zip(x.par_chunks(hcd))
        .for_each(|(f, xs)| ops::rms_norm_noweight(xs, s.rms_eps, f));
    matmul(
        &m.gguf,
        &w.out_hc_fn,
        &sc.flat[..nl * hcd],
        nl,
        &mut sc.hmix[..nl * hc],
    )?;
    for t in 0..nl {
        ops::hc_head_weights(
            &sc.hmix[t * hc..(t + 1) * hc],
            w.out_hc_scale,
            &w.out_hc_base,
            s.hc_eps,
            &mut sc.hw[..hc],
        );
        ops::hc_collapse(&x[t * hcd..(t + 1) * hcd], &sc.hw[..hc], &mut sc.hy[..e]);
        ops::rms_norm(
            &sc.hy[..e],
            &w.out_norm,
            s.rms_eps,
            &mut sc.hn[t * e..(t + 1) * e],
        );
    }
    Ok(())
}

/// Everything one layer needs for one chunk.
struct LayerCtx<'a> {
    m: &'a Model,
    il: usize,
    lw: &'a LayerWeights,
    qat: bool,
    pos0: usize,
    n: usize,
    tokens: &'a [u32],
    steering: Option<&'a Steering>,
}

/// HC pre for `n` tokens: `x` → `xin` (collapsed input), `post`, `comb`.
#[allow(clippy::too_many_arguments)]
fn hc_pre(
    g: &Gguf,
    s: &Shape,
    hw: &HcWeights,
    n: usize,
    x: &[f32],
    flat: &mut [f32],
    mix: &mut [f32],
    pre: &mut [f32],
    post: &mut [f32],
    comb: &mut [f32],
    xin: &mut [f32],
) -> Result<()> {
    let hcd = s.hc_dim();
    let hc = s.hc_mult;
    let nm = s.hc_mix();
    let e = s.n_embd;
    flat[..n * hcd]
        .par_chunks_mut(hcd)
        .zip(x[..n * hcd].par_chunks(hcd))
        .for_each(|(f, xs)| ops::rms_norm_noweight(xs, s.rms_eps, f));
    matmul(g, &hw.fn_, &flat[..n * hcd], n, &mut mix[..n * nm])?;
    for t in 0..n {
        ops::hc_split(
            &mix[t * nm..(t + 1) * nm],
            &hw.scale,
            &hw.base,
            hc,
            s.sinkhorn_iters,
            s.hc_eps,
            &mut pre[t * hc..(t + 1) * hc],
            &mut post[t * hc..(t + 1) * hc],
            &mut comb[t * hc * hc..(t + 1) * hc * hc],
        );
    }
    xin[..n * e]
        .par_chunks_mut(e)
        .zip(x[..n * hcd].par_chunks(hcd))
        .zip(pre[..n * hc].par_chunks(hc))
        .for_each(|((o, xs), p)| ops::hc_collapse(xs, p, o));
    Ok(())
}

/// HC post for `n` tokens: `out[t] = post ⊗ f[t] + combᵀ x[t]`.
fn hc_post_all(
    s: &Shape,
    n: usize,
    f: &[f32],
    x: &[f32],
    post: &[f32],
    comb: &[f32],
    out: &mut [f32],
) {
    let hcd = s.hc_dim();
    let hc = s.hc_mult;
    let e = s.n_embd;
    out[..n * hcd]
        .par_chunks_mut(hcd)
        .enumerate()
        .for_each(|(t, o)| {
            ops::hc_post(
                &f[t * e..(t + 1) * e],
                &x[t * hcd..(t + 1) * hcd],
                &post[t * hc..(t + 1) * hc],
                &comb[t * hc * hc..(t + 1) * hc * hc],
                o,
            )
        });
}

/// One compressor step for position `pos`; appends an emitted row to `rows`.
#[allow(clippy::too_many_arguments)]
fn compressor_step(
    m: &Model,
    g: CompressorGeom,
    cw: &CompressorWeights,
    pos: usize,
    kv: &[f32],
    score: &mut [f32],
    st_kv: &mut [f32],
    st_sc: &mut [f32],
    rows: &mut Vec<f32>,
    row: &mut [f32],
    ecos: &mut [f32],
    esin: &mut [f32],
    qat: ops::RowQat,
) {
    let w = g.width();
    let slot = pos % g.ratio;
    for (v, &a) in score.iter_mut().zip(&cw.ape[slot * w..(slot + 1) * w]) {
        *v += a;
    }
    if ops::compressor_push(g, st_kv, st_sc, pos, kv, score) {
        let row = &mut row[..g.d_c];
        m.plan
            .rope_compressed
            .cos_sin(pos + 1 - g.ratio, ecos, esin);
        ops::compressor_emit(
            g,
            st_kv,
            st_sc,
            &cw.norm,
            m.shape.rms_eps,
            ecos,
            esin,
            qat,
            row,
        );
        rows.extend_from_slice(row);
        ops::compressor_advance(g, st_kv, st_sc);
    }
}

impl LayerCtx<'_> {
    fn attention(
        &mut self,
        sc: &mut Scratch,
        kvs: &mut LayerKv,
        trace: Option<&mut Trace>,
    ) -> Result<()> {
        let m = self.m;
        let g = &*m.gguf;
        let s = &m.shape;
        let lw = self.lw;
        let lp = &m.plan.layers[self.il];
        let n = self.n;
        let pos0 = self.pos0;
        let e = s.n_embd;
        let hd = s.head_dim;
        let nh = s.n_head;
        let half = s.n_rot / 2;
        let eps = s.rms_eps;

        hc_pre(
            g,
            s,
            &lw.hc_attn,
            n,
            &sc.x,
            &mut sc.flat,
            &mut sc.mix,
            &mut sc.pre,
            &mut sc.post,
            &mut sc.comb,
            &mut sc.xin,
        )?;
        sc.a[..n * e]
            .par_chunks_mut(e)
            .zip(sc.xin[..n * e].par_chunks(e))
            .for_each(|(o, x)| ops::rms_norm(x, &lw.attn_norm, eps, o));
        let a = &sc.a[..n * e];

        let (cos_l, sin_l) = match lp.rope {
            RopeKind::Plain => (&sc.cos_p, &sc.sin_p),
            RopeKind::Compressed => (&sc.cos_c, &sc.sin_c),
        };

        // Q path.
        let ql = s.q_lora_rank;
        matmul(g, &lw.q_a, a, n, &mut sc.qr[..n * ql])?;
        sc.qrn[..n * ql]
            .par_chunks_mut(ql)
            .zip(sc.qr[..n * ql].par_chunks(ql))
            .for_each(|(o, x)| ops::rms_norm(x, &lw.q_a_norm, eps, o));
        matmul(g, &lw.q_b, &sc.qrn[..n * ql], n, &mut sc.q[..n * nh * hd])?;
        sc.q[..n * nh * hd]
            .par_chunks_mut(nh * hd)
            .enumerate()
            .for_each(|(t, q)| {
                ops::head_rms_norm_inplace(q, hd, eps);
                let (c, sn) = (
                    &cos_l[t * half..(t + 1) * half],
                    &sin_l[t * half..(t + 1) * half],
                );
                ops::rope_heads(q, hd, c, sn, false);
            });

        // KV path.
        matmul(g, &lw.kv, a, n, &mut sc.kv[..n * hd])?;
        let qat = self.qat;
        let n_nope = s.n_nope();
        sc.kv[..n * hd]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(t, kv)| {
                ops::rms_norm_inplace(kv, &lw.kv_norm, eps);
                ops::rope_tail(
                    kv,
                    &cos_l[t * half..(t + 1) * half],
                    &sin_l[t * half..(t + 1) * half],
                    false,
                );
                if qat {
                    ops::fp8_kv_qat(kv, n_nope);
                }
            });

        // Compressors (sequential: a recurrence over tokens).
        let ratio = lp.attn.ratio();
        if let (Some(cw), Some(geom)) = (&lw.compressor, attn_geom(s, lp.attn)) {
            let w = geom.width();
            matmul(g, &cw.kv, a, n, &mut sc.ckv[..n * w])?;
            matmul(g, &cw.gate, a, n, &mut sc.csc[..n * w])?;
            let igeom = index_geom(s, lp.attn);
            if let (Some(ix), Some(ig)) = (&lw.indexer, igeom) {
                let iw = ig.width();
                matmul(g, &ix.comp.kv, a, n, &mut sc.ikv[..n * iw])?;
                matmul(g, &ix.comp.gate, a, n, &mut sc.isc[..n * iw])?;
            }
            for t in 0..n {
                let pos = pos0 + t;
                compressor_step(
                    m,
                    geom,
                    cw,
                    pos,
                    &sc.ckv[t * w..(t + 1) * w],
                    &mut sc.csc[t * w..(t + 1) * w],
                    &mut kvs.st_kv,
                    &mut kvs.st_sc,
                    &mut kvs.comp,
                    &mut sc.row,
                    &mut sc.ecos[..half],
                    &mut sc.esin[..half],
                    if qat {
                        ops::RowQat::Fp8 { n_nope }
                    } else {
                        ops::RowQat::Off
                    },
                );
                if let (Some(ix), Some(ig)) = (&lw.indexer, igeom) {
                    let iw = ig.width();
                    compressor_step(
                        m,
                        ig,
                        &ix.comp,
                        pos,
                        &sc.ikv[t * iw..(t + 1) * iw],
                        &mut sc.isc[t * iw..(t + 1) * iw],
                        &mut kvs.ist_kv,
                        &mut kvs.ist_sc,
                        &mut kvs.icomp,
                        &mut sc.row,
                        &mut sc.ecos[..half],
                        &mut sc.esin[..half],
                        if qat {
                            ops::RowQat::Indexer
                        } else {
                            ops::RowQat::Off
                        },
                    );
                }
            }
        }

        // Indexer selection (CSA), in parallel over the tokens that see more than top-k rows.
        let topk = s.index_topk;
        let visible = |t: usize| (pos0 + t + 1).checked_div(ratio).unwrap_or(0);
        if let Some(ix) = &lw.indexer {
            let any = (0..n).any(|t| visible(t) > topk);
            let ihd = s.index_head_dim;
            let nih = s.index_heads;
            if any {
                matmul(
                    g,
                    &ix.q_b,
                    &sc.qrn[..n * ql],
                    n,
                    &mut sc.iq[..n * nih * ihd],
                )?;
                matmul(g, &ix.proj, a, n, &mut sc.iw[..n * nih])?;
                let wscale = 1.0 / ((ihd * nih) as f64).sqrt();
                let cos_c = &sc.cos_c;
                let sin_c = &sc.sin_c;
                sc.iq[..n * nih * ihd]
                    .par_chunks_mut(nih * ihd)
                    .zip(sc.iw[..n * nih].par_chunks_mut(nih))
                    .enumerate()
                    .for_each(|(t, (q, w))| {
                        if visible(t) <= topk {
                            return;
                        }
                        for h in q.chunks_exact_mut(ihd) {
                            ops::rope_tail(
                                h,
                                &cos_c[t * half..(t + 1) * half],
                                &sin_c[t * half..(t + 1) * half],
                                false,
                            );
                            if qat {
                                ops::indexer_qat(h);
                            }
                        }
                        for v in w.iter_mut() {
                            *v = (*v as f64 * wscale) as f32;
                        }
                    });
            }
            let icomp = &kvs.icomp;
            let iq = &sc.iq;
            let iw = &sc.iw;
            sc.isel[..n * topk]
                .par_chunks_mut(topk)
                .zip(sc.isel_n[..n].par_iter_mut())
                .enumerate()
                .for_each(|(t, (sel, cnt))| {
                    let nv = visible(t);
                    if nv <= topk {
                        *cnt = nv;
                        for (i, v) in sel.iter_mut().enumerate().take(nv) {
                            *v = i as u32;
                        }
                        return;
                    }
                    TL.with(|tl| {
                        let tl = &mut *tl.borrow_mut();
                        tl.iscores.resize(nv, 0.0);
                        ops::indexer_scores(
                            &iq[t * nih * ihd..(t + 1) * nih * ihd],
                            &iw[t * nih..(t + 1) * nih],
                            &icomp[..nv * ihd],
                            ihd,
                            &mut tl.iscores,
                        );
                        *cnt = ops::topk_indices(&tl.iscores, topk, &mut tl.idx, sel);
                    });
                });
            if let Some(tr) = trace {
                let out = &mut tr.indexer[self.il];
                for t in 0..n {
                    let c = sc.isel_n[t];
                    for j in 0..topk {
                        out.push(if j < c {
                            sc.isel[t * topk + j] as i32
                        } else {
                            -1
                        });
                    }
                }
            }
        }

        // Raw window: the previous rows (from the ring) then the chunk's rows, contiguous.
        let win = s.window;
        let prev = pos0.min(win - 1);
        let base = pos0 - prev;
        for i in 0..prev {
            let p = base + i;
            let r = p % win;
            sc.rawbuf[i * hd..(i + 1) * hd].copy_from_slice(&kvs.raw[r * hd..(r + 1) * hd]);
        }
        sc.rawbuf[prev * hd..(prev + n) * hd].copy_from_slice(&sc.kv[..n * hd]);
        for t in 0..n {
            let r = (pos0 + t) % win;
            kvs.raw[r * hd..(r + 1) * hd].copy_from_slice(&sc.kv[t * hd..(t + 1) * hd]);
        }

        // Attention, in parallel over (token, head).
        let scale = s.kq_scale();
        let rawbuf = &sc.rawbuf;
        let comp = &kvs.comp;
        let isel = &sc.isel;
        let isel_n = &sc.isel_n;
        let q = &sc.q;
        let has_indexer = lp.attn.has_indexer();
        sc.heads[..n * nh * hd]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(i, out)| {
                let (t, h) = (i / nh, i % nh);
                let p = pos0 + t;
                let lo = (p + 1).saturating_sub(win);
                let raw = &rawbuf[(lo - base) * hd..(p - base + 1) * hd];
                let nv = visible(t);
                let sel = if has_indexer && nv > topk {
                    Some(&isel[t * topk..t * topk + isel_n[t]])
                } else {
                    None
                };
                TL.with(|tl| {
                    let tl = &mut *tl.borrow_mut();
                    ops::attention_head(
                        &q[i * hd..(i + 1) * hd],
                        raw,
                        comp,
                        nv,
                        sel,
                        lw.sinks[h],
                        scale,
                        &mut tl.scores,
                        &mut tl.acc,
                        out,
                    );
                });
                ops::rope_tail(
                    out,
                    &cos_l[t * half..(t + 1) * half],
                    &sin_l[t * half..(t + 1) * half],
                    true,
                );
            });

        // Grouped low-rank output projection.
        let gi = s.group_in();
        let ol = s.o_lora_rank;
        let ng = s.o_groups;
        let out_a = qmat(g, &lw.out_a)?;
        for grp in 0..ng {
            for t in 0..n {
                let src = &sc.heads[t * nh * hd + grp * gi..t * nh * hd + (grp + 1) * gi];
                sc.grp_in[t * gi..(t + 1) * gi].copy_from_slice(src);
            }
            let sub = out_a
                .sub_rows(grp * ol, ol)
                .map_err(|e| backend_err(format!("{}: {e}", lw.out_a.t.name)))?;
            let r = if n == 1 {
                sub.matvec(&sc.grp_in[..gi], &mut sc.grp_out[..ol])
            } else {
                sub.matmul(&sc.grp_in[..n * gi], n, &mut sc.grp_out[..n * ol])
            };
            r.map_err(|e| backend_err(format!("{}: {e}", lw.out_a.t.name)))?;
            for t in 0..n {
                sc.low[t * ng * ol + grp * ol..t * ng * ol + (grp + 1) * ol]
                    .copy_from_slice(&sc.grp_out[t * ol..(t + 1) * ol]);
            }
        }
        matmul(
            g,
            &lw.out_b,
            &sc.low[..n * ng * ol],
            n,
            &mut sc.fout[..n * e],
        )?;
        self.steer(sc, Sublayer::Attn);
        hc_post_all(s, n, &sc.fout, &sc.x, &sc.post, &sc.comb, &mut sc.x1);
        Ok(())
    }

    /// Directional steering of the sublayer output `sc.fout` (every token of the chunk), just
    /// before its HC post; nothing when no slot edits this sublayer.
    fn steer(&self, sc: &mut Scratch, which: Sublayer) {
        let Some(st) = self.steering.filter(|st| st.active(which)) else {
            return;
        };
        let e = self.m.shape.n_embd;
        let il = self.il;
        sc.fout[..self.n * e]
            .par_chunks_mut(e)
            .for_each(|y| st.apply_row(which, il, y));
        #[cfg(test)]
        sc.steered.push((il, which, sc.fout[..self.n * e].to_vec()));
    }

    fn ffn(&mut self, sc: &mut Scratch, trace: Option<&mut Trace>) -> Result<()> {
        let m = self.m;
        let g = &*m.gguf;
        let s = &m.shape;
        let lw = self.lw;
        let lp = &m.plan.layers[self.il];
        let n = self.n;
        let e = s.n_embd;
        let k = s.n_expert_used;
        let ff = s.n_ff_exp;
        let ne = s.n_expert;
        hc_pre(
            g,
            s,
            &lw.hc_ffn,
            n,
            &sc.x1,
            &mut sc.flat,
            &mut sc.mix,
            &mut sc.pre,
            &mut sc.post,
            &mut sc.comb,
            &mut sc.xin,
        )?;
        sc.b[..n * e]
            .par_chunks_mut(e)
            .zip(sc.xin[..n * e].par_chunks(e))
            .for_each(|(o, x)| ops::rms_norm(x, &lw.ffn_norm, s.rms_eps, o));
        let b = &sc.b[..n * e];

        // Router.
        matmul(g, &lw.router, b, n, &mut sc.rlog[..n * ne])?;
        for t in 0..n {
            let p = &mut sc.probs[t * ne..(t + 1) * ne];
            ops::router_probs(&sc.rlog[t * ne..(t + 1) * ne], p);
            let sel = &mut sc.sel[t * k..(t + 1) * k];
            match lp.moe {
                MoeKind::Hash => {
                    let table = lw
                        .tid2eid
                        .as_ref()
                        .ok_or_else(|| backend_err("hash layer without tid2eid"))?;
                    let tok = self.tokens[t] as usize;
                    sel.copy_from_slice(&table[tok * k..(tok + 1) * k]);
                }
                MoeKind::Routed => {
                    ops::route_topk(p, lw.router_bias.as_deref(), &mut sc.biased[..ne], sel)
                }
            }
            ops::route_weights(
                p,
                sel,
                s.expert_weights_scale,
                &mut sc.wts[t * k..(t + 1) * k],
            );
        }
        if let Some(tr) = trace {
            let out = &mut tr.experts[self.il];
            for t in 0..n {
                let start = out.len();
                out.extend_from_slice(&sc.sel[t * k..(t + 1) * k]);
                out[start..].sort_unstable();
            }
        }

        // Routed experts: group the (token, slot) pairs by expert.
        let clamp = s.swiglu_clamp[self.il];
        sc.offsets.fill(0);
        for &ex in &sc.sel[..n * k] {
            sc.offsets[ex as usize + 1] += 1;
        }
        for i in 0..ne {
            sc.offsets[i + 1] += sc.offsets[i];
        }
        sc.fill.copy_from_slice(&sc.offsets);
        for (i, &ex) in sc.sel[..n * k].iter().enumerate() {
            sc.order[sc.fill[ex as usize]] = i as u32;
            sc.fill[ex as usize] += 1;
        }
        for ex in 0..ne {
            let (o0, o1) = (sc.offsets[ex], sc.offsets[ex + 1]);
            let cnt = o1 - o0;
            if cnt == 0 {
                continue;
            }
            for (j, &pair) in sc.order[o0..o1].iter().enumerate() {
                let t = pair as usize / k;
                sc.moe_x[j * e..(j + 1) * e].copy_from_slice(&b[t * e..(t + 1) * e]);
            }
            let gate = qexpert(g, &lw.gate_exps, ex)?;
            let up = qexpert(g, &lw.up_exps, ex)?;
            let down = qexpert(g, &lw.down_exps, ex)?;
            let xs = &sc.moe_x[..cnt * e];
            let mm = |q: &ds4_quant::QMatrix, x: &[f32], y: &mut [f32], name: &str| {
                if cnt == 1 {
                    q.matvec(x, y)
                } else {
                    q.matmul(x, cnt, y)
                }
                .map_err(|err| backend_err(format!("{name}: {err}")))
            };
            mm(&gate, xs, &mut sc.moe_g[..cnt * ff], &lw.gate_exps.t.name)?;
            mm(&up, xs, &mut sc.moe_u[..cnt * ff], &lw.up_exps.t.name)?;
            for (j, &pair) in sc.order[o0..o1].iter().enumerate() {
                ops::swiglu(
                    &sc.moe_g[j * ff..(j + 1) * ff],
                    &sc.moe_u[j * ff..(j + 1) * ff],
                    clamp,
                    sc.wts[pair as usize],
                    &mut sc.moe_m[j * ff..(j + 1) * ff],
                );
            }
            mm(
                &down,
                &sc.moe_m[..cnt * ff],
                &mut sc.moe_d[..cnt * e],
                &lw.down_exps.t.name,
            )?;
            for (j, &pair) in sc.order[o0..o1].iter().enumerate() {
                let p = pair as usize;
                sc.dout[p * e..(p + 1) * e].copy_from_slice(&sc.moe_d[j * e..(j + 1) * e]);
            }
        }

        // Shared expert.
        matmul(g, &lw.gate_shexp, b, n, &mut sc.sh_g[..n * ff])?;
        matmul(g, &lw.up_shexp, b, n, &mut sc.sh_u[..n * ff])?;
        sc.sh_m[..n * ff]
            .par_chunks_mut(ff)
            .zip(sc.sh_g[..n * ff].par_chunks(ff))
            .zip(sc.sh_u[..n * ff].par_chunks(ff))
            .for_each(|((o, gg), u)| ops::swiglu(gg, u, clamp, 1.0, o));
        matmul(
            g,
            &lw.down_shexp,
            &sc.sh_m[..n * ff],
            n,
            &mut sc.sh_out[..n * e],
        )?;

        // F = Σ_k routed (slot order) + shared.
        let dout = &sc.dout;
        let sh = &sc.sh_out;
        sc.fout[..n * e]
            .par_chunks_mut(e)
            .enumerate()
            .for_each(|(t, f)| {
                for (d, fd) in f.iter_mut().enumerate() {
                    let mut acc = 0f64;
                    for j in 0..k {
                        acc += dout[(t * k + j) * e + d] as f64;
                    }
                    *fd = (acc as f32) + sh[t * e + d];
                }
            });
        self.steer(sc, Sublayer::Ffn);
        hc_post_all(s, n, &sc.fout, &sc.x1, &sc.post, &sc.comb, &mut sc.x);
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn shape(&self) -> &Shape {
        &self.model.shape
    }

    fn ctx(&self) -> usize {
        self.ctx
    }

    fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    fn reset(&mut self) {
        self.n_tokens = 0;
        for l in &mut self.kv {
            l.comp.clear();
            l.icomp.clear();
            ops::compressor_clear(&mut l.st_kv, &mut l.st_sc);
            ops::compressor_clear(&mut l.ist_kv, &mut l.ist_sc);
        }
        self.logits.clear();
        self.chunk_logits.clear();
    }

    fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let pool = self.pool.clone();
        pool.install(|| self.eval_chunk(tokens, all_logits))
    }

    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn chunk_logits(&self) -> &[f32] {
        &self.chunk_logits
    }

    fn export_state(&self) -> Result<KvState> {
        let s = &self.model.shape;
        let hd = s.head_dim;
        let t = self.n_tokens;
        let rl = t.min(s.window);
        let layers = self
            .kv
            .iter()
            .map(|l| {
                let mut raw = Vec::with_capacity(rl * hd);
                for p in t - rl..t {
                    let r = p % s.window;
                    raw.extend_from_slice(&l.raw[r * hd..(r + 1) * hd]);
                }
                LayerState {
                    raw,
                    comp: l.comp.clone(),
                    state_kv: l.st_kv.clone(),
                    state_score: l.st_sc.clone(),
                    index_comp: l.icomp.clone(),
                    index_state_kv: l.ist_kv.clone(),
                    index_state_score: l.ist_sc.clone(),
                }
            })
            .collect();
        Ok(KvState {
            n_tokens: t,
            layers,
        })
    }

    fn import_state(&mut self, st: &KvState) -> Result<()> {
        let m = self.model.clone();
        let s = &m.shape;
        st.validate(s, &m.plan)?;
        if st.n_tokens > self.ctx {
            return Err(ModelError::ContextFull {
                ctx: self.ctx,
                needed: st.n_tokens,
            });
        }
        let hd = s.head_dim;
        let t = st.n_tokens;
        let rl = t.min(s.window);
        for (l, ls) in self.kv.iter_mut().zip(&st.layers) {
            for (i, p) in (t - rl..t).enumerate() {
                let r = p % s.window;
                l.raw[r * hd..(r + 1) * hd].copy_from_slice(&ls.raw[i * hd..(i + 1) * hd]);
            }
            l.comp.clear();
            l.comp.extend_from_slice(&ls.comp);
            l.icomp.clear();
            l.icomp.extend_from_slice(&ls.index_comp);
            l.st_kv.copy_from_slice(&ls.state_kv);
            l.st_sc.copy_from_slice(&ls.state_score);
            l.ist_kv.copy_from_slice(&ls.index_state_kv);
            l.ist_sc.copy_from_slice(&ls.index_state_score);
        }
        self.n_tokens = t;
        self.logits.clear();
        self.chunk_logits.clear();
        Ok(())
    }

    fn set_trace(&mut self, on: bool) {
        self.trace = on.then(|| {
            let nl = self.model.shape.n_layer;
            Trace {
                n_tokens: 0,
                experts: vec![Vec::new(); nl],
                indexer: vec![Vec::new(); nl],
                last_hidden: vec![Vec::new(); nl],
                probes: vec![Vec::new(); nl],
            }
        });
    }

    fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::engine::{Engine, EngineOptions};
    use crate::session::SessionOptions;
    use crate::steer::SteeringSlot;

    /// A small random model (the built-in structure with a 512-token vocabulary, f32
    /// weights), synthesized once.
    fn model() -> Arc<Model> {
        static M: OnceLock<Arc<Model>> = OnceLock::new();
        M.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.gguf");
            let mut shape = ds4_convert::builtin::tiny_shape();
            shape.n_vocab = 512;
            let opts = ds4_convert::SynthOptions {
                shape,
                recipe: ds4_convert::Recipe::F32,
                seed: 11,
                ..Default::default()
            };
            ds4_convert::synth_gguf(&p, &opts, &mut |_| {}).unwrap();
            let g = Gguf::from_bytes(std::fs::read(&p).unwrap()).unwrap();
            Arc::new(Model::load(Arc::new(g)).unwrap())
        })
        .clone()
    }

    /// `n_layer × n_embd` random unit directions.
    fn unit_dirs(s: &Shape, seed: u64) -> Vec<f32> {
        crate::steer::random_unit_directions(s, seed)
    }

    fn steering(m: &Model, slots: Vec<(Vec<f32>, f32, f32)>) -> Option<Arc<Steering>> {
        let slots = slots
            .into_iter()
            .enumerate()
            .map(|(i, (dirs, ffn, attn))| SteeringSlot {
                source: format!("slot{i}"),
                dirs,
                ffn,
                attn,
            })
            .collect();
        Steering::new(&m.shape, slots).unwrap().map(Arc::new)
    }

    fn backend(m: &Arc<Model>, st: Option<Arc<Steering>>) -> CpuBackend {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        CpuBackend::new(m.clone(), pool, true, 64)
            .unwrap()
            .with_steering(st)
            .unwrap()
    }

    const PROMPT: [u32; 9] = [1, 17, 300, 5, 5, 42, 511, 0, 99];

    fn logits(m: &Arc<Model>, st: Option<Arc<Steering>>) -> Vec<f32> {
        let mut b = backend(m, st);
        b.eval(&PROMPT, true).unwrap();
        b.chunk_logits().to_vec()
    }

    /// The captured rows are the sublayer outputs after the edit: with scale 1 they have no
    /// component along the layer's direction, with scale 0.5 half of it is left. Every layer's
    /// attention output is edited, then its FFN output.
    #[test]
    fn steering_edits_every_sublayer_output() {
        let m = model();
        let s = &m.shape;
        let e = s.n_embd;
        let d = unit_dirs(s, 5);
        let comp = |rows: &[f32], il: usize| -> Vec<(f64, f64)> {
            rows.chunks(e)
                .map(|r| {
                    let n = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                    (ops::steer_dot(&d[il * e..(il + 1) * e], r), n)
                })
                .collect()
        };
        let mut b = backend(&m, steering(&m, vec![(d.clone(), 1.0, 1.0)]));
        b.eval(&PROMPT, false).unwrap();
        let log = std::mem::take(&mut b.sc.steered);
        assert_eq!(log.len(), 2 * s.n_layer);
        for (i, (il, which, rows)) in log.iter().enumerate() {
            assert_eq!(*il, i / 2);
            let want = if i % 2 == 0 {
                Sublayer::Attn
            } else {
                Sublayer::Ffn
            };
            assert_eq!(*which, want);
            assert_eq!(rows.len(), PROMPT.len() * e);
            for (t, (dot, norm)) in comp(rows, *il).into_iter().enumerate() {
                assert!(norm > 0.0);
                assert!(
                    dot.abs() <= 1e-6 * norm,
                    "layer {il} {which:?} token {t}: component {dot:e} of |y| {norm:e}"
                );
            }
        }
        // Scale 0.5 (FFN only): a component is left (so the check above can fail), and no
        // attention output is touched.
        let mut b = backend(&m, steering(&m, vec![(d.clone(), 0.5, 0.0)]));
        b.eval(&PROMPT, false).unwrap();
        let log = std::mem::take(&mut b.sc.steered);
        assert_eq!(log.len(), s.n_layer);
        let mut left = 0;
        for (il, which, rows) in &log {
            assert_eq!(*which, Sublayer::Ffn);
            left += comp(rows, *il)
                .iter()
                .filter(|(dot, norm)| dot.abs() > 1e-3 * norm)
                .count();
        }
        assert!(left > s.n_layer * PROMPT.len() / 2, "{left}");
    }

    /// No steering, zero directions (the edit runs and changes nothing) and the engine's
    /// option give the same logits bit for bit; a non-zero edit changes them; slot order
    /// matters; chunked prefill equals token-by-token decode with steering on.
    #[test]
    fn steering_logits() {
        let m = model();
        let s = &m.shape;
        let base = logits(&m, None);
        let zeros = vec![0f32; s.n_layer * s.n_embd];
        assert_eq!(
            logits(&m, steering(&m, vec![(zeros.clone(), 5.0, -3.0)])),
            base
        );
        assert!(steering(&m, vec![(unit_dirs(s, 1), 0.0, 0.0)]).is_none());
        let (d1, d2) = (unit_dirs(s, 1), unit_dirs(s, 2));
        let st = steering(&m, vec![(d1.clone(), 2.0, 0.0), (d2.clone(), 0.0, -1.0)]);
        let steered = logits(&m, st.clone());
        assert_ne!(steered, base);
        let ffn_only = logits(&m, steering(&m, vec![(d1.clone(), 2.0, 0.0)]));
        assert_ne!(ffn_only, base);
        assert_ne!(ffn_only, steered);
        // Two edits of one sublayer do not commute: the order is the slots' order.
        let ab = logits(
            &m,
            steering(&m, vec![(d1.clone(), 1.0, 0.0), (d2.clone(), -2.0, 0.0)]),
        );
        let ba = logits(
            &m,
            steering(&m, vec![(d2.clone(), -2.0, 0.0), (d1.clone(), 1.0, 0.0)]),
        );
        assert_ne!(ab, ba);
        // The engine's option reaches its backends and sessions.
        let eng = Engine::from_model(
            m.clone(),
            EngineOptions {
                threads: Some(2),
                steering: st.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let mut sess = eng
            .new_session(SessionOptions {
                ctx: 64,
                prefill_chunk: 4,
            })
            .unwrap();
        assert_eq!(sess.prefill_all_logits(&PROMPT).unwrap(), steered);
        // Token by token.
        let mut b = backend(&m, st);
        let v = s.n_vocab;
        for (i, &t) in PROMPT.iter().enumerate() {
            b.eval(&[t], false).unwrap();
            assert_eq!(b.logits(), &steered[i * v..(i + 1) * v], "token {i}");
        }
        // Directions for another shape are refused.
        let mut other = s.clone();
        other.n_embd *= 2;
        let wrong = Steering::new(
            &other,
            vec![SteeringSlot {
                source: "x".into(),
                dirs: vec![0.0; other.n_layer * other.n_embd],
                ffn: 1.0,
                attn: 0.0,
            }],
        )
        .unwrap()
        .map(Arc::new);
        assert!(backend_result(&m, wrong.clone()).is_err());
        let e = Engine::from_model(
            m.clone(),
            EngineOptions {
                steering: wrong,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("steering"), "{e}");
    }

    fn backend_result(m: &Arc<Model>, st: Option<Arc<Steering>>) -> Result<CpuBackend> {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap(),
        );
        CpuBackend::new(m.clone(), pool, true, 8)?.with_steering(st)
    }
}
