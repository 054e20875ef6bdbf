//! The CUDA backend: DeepSeek V4 Flash's whole forward pass on one GPU, held to the CPU
//! reference (`ds4_model::CpuBackend`).
//!
//! * Every weight is resident in device memory (plain allocations). Matrix products go through
//!   [`crate::gemv::Gemv`] (ds4's activation numerics); everything else is `kernels/fwd.cu`.
//! * KV state on the device, f32 rows: per layer a raw ring of `window + max_chunk` rows
//!   (position `p` in row `p % raw_cap`), the compressed rows, the indexer rows and the two
//!   compressor frontiers in the CPU layout. [`Backend::export_state`] / `import_state`
//!   convert to and from the backend-neutral [`KvState`] (same frontier convention as the CPU
//!   backend: stale rows cleared), so a snapshot restores on either backend.
//! * A chunk runs layer-major like the CPU backend: batched projections over the chunk's
//!   tokens; the compressors emit every row completed in the chunk in parallel and then advance
//!   the frontier; indexer, top-k and attention run per (token, head).
//! * Kernels read the chunk's first position from device memory, so a single-token decode step
//!   is captured once as a CUDA graph and replayed (one graph without and one with the lightning
//!   indexer's scoring, which starts once a CSA layer holds more than `index_topk` rows); the
//!   only host synchronisation per decode step is reading the logits back.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice,
    SyncOnDrop, sys,
};
use ds4_gguf::GgmlType;
use ds4_model::backend::{attn_geom, index_geom};
use ds4_model::ops::{CompressorGeom, EMPTY_SCORE};
use ds4_model::weights::{CompressorWeights, ExpertsRef, HcWeights, MatRef};
use ds4_model::{
    AttnKind, Backend, KvState, LayerState, Model, ModelError, MoeKind, RopeKind, Shape, Sublayer,
    Trace,
};

use crate::attn_tc::{AttnPrecision, AttnTc};
use crate::fwd::{
    ATT_TARGET_BLOCKS, AttnLaunch, CompDec, CompLaunch, DecQuant, Fwd, IDX_TILE, QkvDec,
    attn_dec_bytes, attn_dec_fits, attn_dec_stride, attn_splits,
};
use crate::gemv::{DevWeight, Gemv};
use crate::pass::{fit_pass, kv_bytes, need_bytes, pass_bytes};
use crate::rt::{DBuf, Pinned, dtoh, dtoh_pinned, htod, htod_pinned};
use crate::tc::{Tc, TcConfig};
use crate::{CudaError, CudaOptions};

fn merr(e: CudaError) -> ModelError {
    ModelError::Backend {
        backend: "cuda".into(),
        reason: e.to_string(),
    }
}

fn cerr(msg: impl Into<String>) -> CudaError {
    CudaError::Driver(msg.into())
}

/// A raw device range typed for the gemv API (`DevicePtr` / `DevicePtrMut` over an address).
struct Dv<'a, T> {
    ptr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _t: PhantomData<T>,
}

/// A fused decode quantization into one format (`Gemv::act_ptrs`'s tuple).
fn dec_quant(q8k: bool, qs: u64, d: u64, bs: u64) -> DecQuant {
    if q8k {
        DecQuant {
            qk: qs,
            dk: d,
            bk: bs,
            ..DecQuant::default()
        }
    } else {
        DecQuant {
            q0: qs,
            d0: d,
            ..DecQuant::default()
        }
    }
}

fn dv<T>(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Dv<'_, T> {
    Dv {
        ptr,
        len,
        stream,
        _t: PhantomData,
    }
}

impl<T> DeviceSlice<T> for Dv<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}
impl<T> DevicePtr<T> for Dv<'_, T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}
impl<T> DevicePtrMut<T> for Dv<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

struct DevHc {
    fn_: DevWeight,
    scale: DBuf,
    base: DBuf,
}

struct DevComp {
    kv: DevWeight,
    gate: DevWeight,
    ape: DBuf,
    norm: DBuf,
    geom: CompressorGeom,
}

struct DevIdx {
    q_b: DevWeight,
    proj: DevWeight,
    comp: DevComp,
}

/// Decode slots of the projections of the attention input `a`, in the order the CPU runs them
/// (indexes of [`AGroup::members`] and of `decode_layer`'s output table).
const A_QA: usize = 0;
const A_KV: usize = 1;
const A_CKV: usize = 2;
const A_CSC: usize = 3;
const A_IKV: usize = 4;
const A_ISC: usize = 5;
/// The indexer's head weights: only needed while the indexer scores.
const A_IW: usize = 6;
const A_SLOTS: usize = 7;

/// Projections of `a` of one type and width stacked into one device matrix: the layer's
/// weights of these slots are row-range views of `w`, and the decode step computes all of them
/// in one matvec into `sc.aj` (no weight is held twice).
struct AGroup {
    w: DevWeight,
    /// `w` without its last rows when they are the indexer's head weights (`A_IW`): what the
    /// decode step runs while the indexer does not score.
    short: Option<DevWeight>,
    /// (slot, first row in `w`) of each member.
    members: Vec<(usize, usize)>,
    /// Offset (floats) of this group's output rows in `sc.aj`.
    out0: usize,
}

struct DevLayer {
    attn: AttnKind,
    moe: MoeKind,
    rope: RopeKind,
    clamp: f32,
    hc_attn: DevHc,
    attn_norm: DBuf,
    q_a: DevWeight,
    q_a_norm: DBuf,
    q_b: DevWeight,
    kv: DevWeight,
    kv_norm: DBuf,
    sinks: DBuf,
    out_a: DevWeight,
    out_b: DevWeight,
    comp: Option<DevComp>,
    idx: Option<DevIdx>,
    hc_ffn: DevHc,
    ffn_norm: DBuf,
    router: DevWeight,
    bias: Option<DBuf>,
    tid2eid: Option<DBuf>,
    gate_exps: DevWeight,
    up_exps: DevWeight,
    down_exps: DevWeight,
    gate_sh: DevWeight,
    up_sh: DevWeight,
    down_sh: DevWeight,
    /// The stacked projections of `a` (empty: every projection on its own).
    a_groups: Vec<AGroup>,
    /// `q_b` and the indexer's `q_b` (both read the normed q_a output) stacked in this order
    /// (the layer's two are views of it): one matvec while the indexer scores.
    qb_stack: Option<DevWeight>,
}

/// KV state of one layer on the device.
struct DevKv {
    ring: DBuf,
    comp: DBuf,
    st_kv: Option<DBuf>,
    st_sc: Option<DBuf>,
    icomp: Option<DBuf>,
    ist_kv: Option<DBuf>,
    ist_sc: Option<DBuf>,
}

/// Chunk scratch (sized for `max_chunk` tokens).
struct Scratch {
    x: DBuf,
    x1: DBuf,
    flat: DBuf,
    mix: DBuf,
    post: DBuf,
    comb: DBuf,
    xin: DBuf,
    a: DBuf,
    qr: DBuf,
    qrn: DBuf,
    q: DBuf,
    kvp: DBuf,
    ckv: DBuf,
    csc: DBuf,
    ikv: DBuf,
    isc: DBuf,
    iq: DBuf,
    iw: DBuf,
    /// Decode: the outputs of the stacked projections of `a` (`AGroup::out0`).
    aj: DBuf,
    scores: DBuf,
    isel: DBuf,
    heads: DBuf,
    part: DBuf,
    /// Decode attention scores `[n_head][att_stride]` (f64), then the chunk maxima.
    att_s: DBuf,
    /// Decode attention split partials.
    att_part: DBuf,
    low: DBuf,
    fout: DBuf,
    b: DBuf,
    rlog: DBuf,
    probs: DBuf,
    sel: DBuf,
    wts: DBuf,
    mid: DBuf,
    routed: DBuf,
    sh_mid: DBuf,
    sh_out: DBuf,
    hmix: DBuf,
    hn: DBuf,
    logits: DBuf,
    act: DBuf,
    /// Q8_0 activations of `a` (then of `b`) `[n][n_embd]`, written by the chunk HC pre
    /// ([`Fwd::hc_pre`]'s fused quantization) for the projections that read them.
    act_pre: DBuf,
    /// Per-token f64 norm factors of the last chunk HC post (`flat = (float)(x·s)`).
    fscale: DBuf,
    mid_act: DBuf,
    /// Decode: the shared expert's quantization of `b`, written by the FFN HC pre alongside the
    /// routed experts' one in `act`.
    act_sh: DBuf,
    /// Decode: the shared expert down's quantization of `sh_mid` (on the side stream, while the
    /// routed experts use `act` and `mid_act`; see [`CudaBackend::shared_side`]).
    act_sd: DBuf,
}

/// Captured decode graphs (one per variant: without / with indexer scoring).
struct Graphs([Option<CudaGraph>; 2]);

/// Timing of the graph decode steps (`DS4_CUDA_STEP_TIMING=1`).
struct StepTiming {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    steps: u64,
    gpu_ms: f64,
    wall_s: f64,
}

impl Drop for StepTiming {
    fn drop(&mut self) {
        if self.steps > 0 {
            let n = self.steps as f64;
            eprintln!(
                "ds4: graph decode: {} steps, GPU {:.1} us/step (events around the replay), launch to synchronized {:.1} us/step",
                self.steps,
                1e3 * self.gpu_ms / n,
                1e6 * self.wall_s / n
            );
        }
    }
}

// SAFETY: the graphs are only launched through `&mut CudaBackend` (one thread at a time); CUDA
// graph executables may be used from any thread as long as calls are serialized.
unsafe impl Send for Graphs {}

/// Rows of logits computed per output-head pass (all-logits prefill).
const LOGIT_ROWS: usize = 64;
/// Bytes of the indexer score buffer (tokens are scored in sub-batches that fit).
const SCORE_BYTES: usize = 256 << 20;

/// The CUDA backend.
pub struct CudaBackend {
    model: Arc<Model>,
    opts: CudaOptions,
    ctx_len: usize,
    max_chunk: usize,
    raw_cap: usize,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    fwd: Fwd,
    gemv: Gemv,
    embed: DBuf,
    embed_type: i32,
    embed_row_bytes: usize,
    /// `DS4_CUDA_PERTURB_ULP=<seed>`: move every embedding value 1 ulp (the drift gate's chaos
    /// floor; seed 1 away from zero, other seeds a hashed up/down pattern).
    perturb: Option<(CudaFunction, u32)>,
    out_hc_fn: DevWeight,
    out_hc_base: DBuf,
    out_norm: DBuf,
    output: DevWeight,
    layers: Vec<DevLayer>,
    kv: Vec<DevKv>,
    sc: Scratch,
    inv_plain: DBuf,
    inv_comp: DBuf,
    d_pos: DBuf,
    d_tok: DBuf,
    score_stride: usize,
    score_batch: usize,
    idx_blocks: usize,
    /// Row stride (doubles) of `sc.att_s`; 0: the decode attention kernels are not used.
    att_stride: usize,
    n_tokens: usize,
    logits: Vec<f32>,
    /// The last token's logits are in `h_logits` (a graph decode step wrote them there), not
    /// in `logits`: [`Backend::logits`] reads them in place.
    logits_pinned: bool,
    /// The graph decode steps leave the logits on the device and copy out only their greedy
    /// pick (`ds4_argmax_pick`, 16 bytes into `h_pick`); [`Backend::logits`] copies the logits
    /// on first use. On by default; `DS4_CUDA_GREEDY_PICK=0` copies the logits in every step.
    device_pick: bool,
    /// Set by a graph step with `device_pick`: `h_logits` is stale until
    /// [`CudaBackend::fetch_logits`] (which [`Backend::logits`] calls) copies them. (`h_pick`
    /// holds the last token's pick while `logits_pinned && device_pick`.)
    logits_on_device: std::cell::Cell<bool>,
    /// A failed lazy copy of the logits ([`Backend::logits`] cannot return it): reported by the
    /// next evaluation.
    fetch_error: std::cell::RefCell<Option<CudaError>>,
    /// `ds4_argmax_pick` scratch, then its 16-byte result.
    d_pick: DBuf,
    h_pick: Pinned,
    chunk_logits: Vec<f32>,
    trace: Option<Trace>,
    graphs: Graphs,
    /// Pinned host memory of the graph decode step: the token it reads (copied in by the graph)
    /// and the logits (copied out by the graph, or on first use with `device_pick`).
    h_tok: Pinned,
    h_logits: Pinned,
    /// `DS4_CUDA_STEP_TIMING=1`: the graph decode steps' GPU time (events around the replay)
    /// and launch-to-synchronized wall time, summed, printed to stderr when the backend drops.
    step_timing: Option<StepTiming>,
    graph_launches: u64,
    /// Tensor-core prefill routes (None: all off).
    tc: Option<Tc>,
    /// The tensor-core attention route (None: off).
    tc_attn: Option<AttnTc>,
    /// Directional steering: each slot's `n_layer × n_embd` directions (`opts.steering`'s
    /// slots, in order); empty without steering.
    steer_dirs: Vec<DBuf>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("opts", &self.opts)
            .field("ctx", &self.ctx_len)
            .field("n_tokens", &self.n_tokens)
            .finish()
    }
}

fn frontier(k: &Option<DBuf>, v: &Option<DBuf>) -> Result<(u64, u64), CudaError> {
    match (k, v) {
        (Some(k), Some(v)) => Ok((k.ptr, v.ptr)),
        _ => Err(cerr("compressor frontier missing")),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn ggml_id(ty: GgmlType) -> Option<i32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 8,
        GgmlType::BF16 => 30,
        _ => return None,
    })
}

struct Loader<'a> {
    m: &'a Model,
    gemv: &'a Gemv,
    stream: &'a Arc<CudaStream>,
}

impl Loader<'_> {
    /// `w` when the caller already has it (a view of a stacked upload), else [`Loader::mat`]
    /// of one matrix.
    fn mat_or(&self, w: Option<DevWeight>, m: &MatRef) -> Result<DevWeight, CudaError> {
        match w {
            Some(w) => Ok(w),
            None => self.mat(m, 1),
        }
    }
    fn mat(&self, w: &MatRef, n_mat: usize) -> Result<DevWeight, CudaError> {
        let rows = w.rows / n_mat;
        self.gemv
            .upload(
                self.stream,
                w.t.ty,
                w.cols,
                rows,
                n_mat,
                w.bytes(&self.m.gguf),
            )
            .map_err(|e| cerr(format!("{}: {e}", w.t.name)))
    }
    fn experts(&self, w: &ExpertsRef) -> Result<DevWeight, CudaError> {
        self.gemv
            .upload(
                self.stream,
                w.t.ty,
                w.cols,
                w.rows,
                w.n_expert,
                w.t.bytes(&self.m.gguf),
            )
            .map_err(|e| cerr(format!("{}: {e}", w.t.name)))
    }
    fn vec(&self, v: &[f32]) -> Result<DBuf, CudaError> {
        DBuf::from_slice(self.stream, v)
    }
    fn hc(&self, h: &HcWeights) -> Result<DevHc, CudaError> {
        Ok(DevHc {
            fn_: self.mat(&h.fn_, 1)?,
            scale: self.vec(&h.scale)?,
            base: self.vec(&h.base)?,
        })
    }
    fn comp(
        &self,
        c: &CompressorWeights,
        geom: CompressorGeom,
        kv: Option<DevWeight>,
        gate: Option<DevWeight>,
    ) -> Result<DevComp, CudaError> {
        Ok(DevComp {
            kv: self.mat_or(kv, &c.kv)?,
            gate: self.mat_or(gate, &c.gate)?,
            ape: self.vec(&c.ape)?,
            norm: self.vec(&c.norm)?,
            geom,
        })
    }

    /// `ms` (one type and width, in this order) uploaded as one stacked weight and a view per
    /// member ([`Gemv::upload_stacked`]), or None (nothing uploaded) when they are fewer than
    /// two, differ in type or width, or the views' regions or output rows (16-byte aligned
    /// floats, as the decode step's consumers read them) would not stay aligned.
    fn stacked(&self, ms: &[&MatRef]) -> Result<Option<(DevWeight, Vec<DevWeight>)>, CudaError> {
        let Some(m0) = ms.first() else {
            return Ok(None);
        };
        let rows: Vec<usize> = ms.iter().map(|m| m.rows).collect();
        let mut row0 = 0;
        let mut out_ok = true;
        for &r in &rows {
            out_ok &= row0 % 4 == 0;
            row0 += r;
        }
        if ms.len() < 2
            || !out_ok
            || ms.iter().any(|m| m.t.ty != m0.t.ty || m.cols != m0.cols)
            || !Gemv::stack_ok(m0.t.ty, m0.cols, &rows)
        {
            return Ok(None);
        }
        let parts: Vec<(usize, &[u8])> =
            ms.iter().map(|m| (m.rows, m.bytes(&self.m.gguf))).collect();
        self.gemv
            .upload_stacked(self.stream, m0.t.ty, m0.cols, &parts)
            .map(Some)
            .map_err(|e| cerr(format!("{} (stacked): {e}", m0.t.name)))
    }

    /// The projections of `a` (by `A_*` slot; None: the layer has no such matrix). With
    /// `stack`, the matrices of one type and width (two or more, in slot order) are uploaded
    /// as one [`AGroup`] and their slots get views of it; a group whose rows would not keep
    /// every view's regions and output rows aligned stays separate. Returns the weights by slot
    /// and the groups (`out0` relative to the layer's first group) with the floats they take.
    #[allow(clippy::type_complexity)]
    fn a_projections(
        &self,
        mats: &[Option<&MatRef>; A_SLOTS],
        stack: bool,
    ) -> Result<([Option<DevWeight>; A_SLOTS], Vec<AGroup>, usize), CudaError> {
        let mut out: [Option<DevWeight>; A_SLOTS] = Default::default();
        let mut groups = Vec::new();
        let mut used = 0usize;
        let mut done = [false; A_SLOTS];
        for first in 0..A_SLOTS {
            let Some(m0) = mats[first] else { continue };
            if done[first] || !stack {
                continue;
            }
            let slots: Vec<usize> = (first..A_SLOTS)
                .filter(|&i| {
                    !done[i] && mats[i].is_some_and(|m| m.t.ty == m0.t.ty && m.cols == m0.cols)
                })
                .collect();
            let ms: Vec<&MatRef> = slots.iter().filter_map(|&i| mats[i]).collect();
            let Some((w, views)) = self.stacked(&ms)? else {
                continue;
            };
            let mut members = Vec::with_capacity(slots.len());
            let mut row0 = 0;
            for (&i, v) in slots.iter().zip(views) {
                members.push((i, row0));
                row0 += v.rows();
                out[i] = Some(v);
                done[i] = true;
            }
            let short = match members.last() {
                Some(&(A_IW, r)) => Some(w.view(0, r)?),
                _ => None,
            };
            groups.push(AGroup {
                short,
                members,
                out0: used,
                w,
            });
            used = (used + row0).next_multiple_of(64);
        }
        for i in 0..A_SLOTS {
            if let (Some(m), None) = (mats[i], &out[i]) {
                out[i] = Some(self.mat(m, 1)?);
            }
        }
        Ok((out, groups, used))
    }
}

/// `DS4_CUDA_STACK_A=0`: the decode step runs every projection of `a` on its own (the weights
/// are then uploaded one by one, as before the stacking).
fn stack_a() -> bool {
    env_on("DS4_CUDA_STACK_A")
}

/// A backend switch that is on unless the environment sets it to `0`.
fn env_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

impl CudaBackend {
    /// A backend on device `opts.device` with room for `ctx` tokens: uploads every weight of
    /// `model` and allocates the KV state and the scratch for chunks of `opts.max_chunk`
    /// tokens. Fails with [`CudaError::NoDriver`] (never panics) when there is no usable driver.
    pub fn new(model: Arc<Model>, ctx: usize, opts: CudaOptions) -> Result<CudaBackend, CudaError> {
        if ctx == 0 {
            return Err(cerr("context size must be at least 1"));
        }
        let s = model.shape.clone();
        Self::check_shape(&s)?;
        let dctx = crate::device::open_context(opts.device)?;
        // One stream, no cross-stream hazards: cudarc's event tracking is not needed and would
        // get in the way of graph capture.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { dctx.disable_event_tracking() };
        let stream = dctx.new_stream().map_err(crate::rt::drv)?;
        let fwd = Fwd::new(&dctx, stream.clone())?;
        let gemv = Gemv::new(&dctx)?;
        let max_chunk = opts.max_chunk.clamp(1, ctx);
        let w = &model.weights;

        let embed_type = ggml_id(w.token_embd.t.ty).ok_or_else(|| {
            cerr(format!(
                "token_embd type {:?} is not supported by the CUDA backend",
                w.token_embd.t.ty
            ))
        })?;
        let embed = DBuf::from_slice(&stream, w.token_embd.bytes(&model.gguf))?;
        let mut steer_dirs = Vec::new();
        if let Some(st) = &opts.steering {
            if !st.fits(&s) {
                return Err(cerr(format!(
                    "steering directions for {:?} (layers, n_embd), the model has ({}, {})",
                    st.dims(),
                    s.n_layer,
                    s.n_embd
                )));
            }
            if st.slots().len() > crate::fwd::STEER_MAX {
                return Err(cerr("more steering slots than the kernel takes"));
            }
            for slot in st.slots() {
                steer_dirs.push(DBuf::from_slice(&stream, &slot.dirs)?);
            }
        }
        let ld = Loader {
            m: &model,
            gemv: &gemv,
            stream: &stream,
        };
        let mut layers = Vec::with_capacity(s.n_layer);
        let stack = stack_a();
        let mut aj_len = 1usize;
        for (il, (lw, lp)) in w.layers.iter().zip(&model.plan.layers).enumerate() {
            let cw = lw
                .compressor
                .as_ref()
                .filter(|_| attn_geom(&s, lp.attn).is_some());
            let iw = lw
                .indexer
                .as_ref()
                .filter(|_| index_geom(&s, lp.attn).is_some());
            let (mut a, a_groups, a_len) = ld.a_projections(
                &[
                    Some(&lw.q_a),
                    Some(&lw.kv),
                    cw.map(|c| &c.kv),
                    cw.map(|c| &c.gate),
                    iw.map(|ix| &ix.comp.kv),
                    iw.map(|ix| &ix.comp.gate),
                    iw.map(|ix| &ix.proj),
                ],
                stack,
            )?;
            aj_len = aj_len.max(a_len);
            let comp = match (&lw.compressor, attn_geom(&s, lp.attn)) {
                (Some(c), Some(g)) => Some(ld.comp(c, g, a[A_CKV].take(), a[A_CSC].take())?),
                _ => None,
            };
            let (mut q_b, mut iq_b, mut qb_stack) = (None, None, None);
            if let Some(ix) = iw.filter(|_| stack)
                && let Some((all, mut v)) = ld.stacked(&[&lw.q_b, &ix.q_b])?
            {
                iq_b = v.pop();
                q_b = v.pop();
                qb_stack = Some(all);
            }
            let idx = match (&lw.indexer, index_geom(&s, lp.attn)) {
                (Some(ix), Some(g)) => Some(DevIdx {
                    q_b: ld.mat_or(iq_b.take(), &ix.q_b)?,
                    proj: ld.mat_or(a[A_IW].take(), &ix.proj)?,
                    comp: ld.comp(&ix.comp, g, a[A_IKV].take(), a[A_ISC].take())?,
                }),
                _ => None,
            };
            let tid2eid = match &lw.tid2eid {
                Some(t) => {
                    let v: Vec<i32> = t.iter().map(|&e| e as i32).collect();
                    Some(DBuf::from_slice(&stream, &v)?)
                }
                None => None,
            };
            let missing = || cerr("projection of a missing");
            layers.push(DevLayer {
                attn: lp.attn,
                moe: lp.moe,
                rope: lp.rope,
                clamp: s.swiglu_clamp[il],
                hc_attn: ld.hc(&lw.hc_attn)?,
                attn_norm: ld.vec(&lw.attn_norm)?,
                q_a: a[A_QA].take().ok_or_else(missing)?,
                q_a_norm: ld.vec(&lw.q_a_norm)?,
                q_b: ld.mat_or(q_b.take(), &lw.q_b)?,
                kv: a[A_KV].take().ok_or_else(missing)?,
                kv_norm: ld.vec(&lw.kv_norm)?,
                sinks: ld.vec(&lw.sinks)?,
                out_a: ld.mat(&lw.out_a, s.o_groups)?,
                out_b: ld.mat(&lw.out_b, 1)?,
                comp,
                idx,
                hc_ffn: ld.hc(&lw.hc_ffn)?,
                ffn_norm: ld.vec(&lw.ffn_norm)?,
                router: ld.mat(&lw.router, 1)?,
                bias: match &lw.router_bias {
                    Some(b) => Some(ld.vec(b)?),
                    None => None,
                },
                tid2eid,
                gate_exps: ld.experts(&lw.gate_exps)?,
                up_exps: ld.experts(&lw.up_exps)?,
                down_exps: ld.experts(&lw.down_exps)?,
                gate_sh: ld.mat(&lw.gate_shexp, 1)?,
                up_sh: ld.mat(&lw.up_shexp, 1)?,
                down_sh: ld.mat(&lw.down_shexp, 1)?,
                a_groups,
                qb_stack,
            });
        }
        let out_hc_fn = ld.mat(&w.out_hc_fn, 1)?;
        let out_hc_base = ld.vec(&w.out_hc_base)?;
        let out_norm = ld.vec(&w.out_norm)?;
        let output = ld.mat(&w.output, 1)?;

        let max_chunk = if opts.fit_chunk {
            let (free, _) = dctx.mem_get_info().map_err(crate::rt::drv)?;
            let pass = fit_pass(&s, &model.plan, ctx, max_chunk, free, SCORE_BYTES);
            if pass < max_chunk {
                eprintln!(
                    "ds4-cuda: prefill passes of {pass} tokens ({max_chunk} need ~{:.1} GiB with \
                     the KV state and reserves, {:.1} GiB free; --prefill-chunk sets it)",
                    need_bytes(&s, &model.plan, ctx, max_chunk, SCORE_BYTES) as f64 / GIB,
                    free as f64 / GIB
                );
            }
            pass
        } else {
            max_chunk
        };
        let free_before = dctx.mem_get_info().map_err(crate::rt::drv)?.0;

        // KV state.
        let hd = s.head_dim;
        let raw_cap = s.window + max_chunk;
        let mut kv = Vec::with_capacity(s.n_layer);
        for lp in &model.plan.layers {
            let ratio = lp.attn.ratio();
            let rows = ctx.checked_div(ratio).map_or(0, |r| r + 1);
            let ag = attn_geom(&s, lp.attn);
            let ig = index_geom(&s, lp.attn);
            let frontier =
                |g: Option<CompressorGeom>| -> Result<(Option<DBuf>, Option<DBuf>), CudaError> {
                    match g {
                        None => Ok((None, None)),
                        Some(g) => {
                            let n = g.state_len();
                            Ok((
                                Some(DBuf::from_slice(&stream, &vec![0f32; n])?),
                                Some(DBuf::from_slice(&stream, &vec![EMPTY_SCORE; n])?),
                            ))
                        }
                    }
                };
            let (st_kv, st_sc) = frontier(ag)?;
            let (ist_kv, ist_sc) = frontier(ig)?;
            kv.push(DevKv {
                ring: DBuf::zeroed(&stream, raw_cap * hd * 4)?,
                comp: DBuf::zeroed(&stream, rows * hd * 4)?,
                st_kv,
                st_sc,
                icomp: match ig {
                    Some(_) => Some(DBuf::zeroed(&stream, rows * s.index_head_dim * 4)?),
                    None => None,
                },
                ist_kv,
                ist_sc,
            });
        }

        // Indexer scoring geometry.
        let csa_ratio = model
            .plan
            .layers
            .iter()
            .filter(|l| l.attn.has_indexer())
            .map(|l| l.attn.ratio())
            .min();
        let score_stride = csa_ratio.map_or(1, |r| ctx / r + 1).next_multiple_of(4);
        let score_batch = (SCORE_BYTES / (score_stride * 4)).clamp(1, max_chunk);
        // Blocks stride over the score tiles: about two waves' worth is plenty (a decode step
        // is captured with this grid; blocks past the last tile exit at once).
        let idx_blocks = score_stride.div_ceil(IDX_TILE).clamp(1, ATT_TARGET_BLOCKS);
        // Int8 indexer scratch (query codes of one score batch, codes of every visible row):
        // ~8 KiB per batch token. Without it (QAT off: the rows are not int8·2^e, every chunk
        // would fall back; DS4_CUDA_IDX_KERNEL=f64: not used) chunks score on the FP64 kernel.
        if opts.qat
            && !crate::fwd::idx_kernel_f64()
            && csa_ratio.is_some()
            && s.index_heads == 64
            && s.index_head_dim == 128
        {
            fwd.reserve_idx8(score_batch, score_stride)?;
        }
        let att_stride = if attn_dec_fits(hd) {
            let kinds: Vec<(usize, bool)> = model
                .plan
                .layers
                .iter()
                .map(|l| (l.attn.ratio(), l.attn.has_indexer()))
                .collect();
            attn_dec_stride(s.window, ctx, &kinds, s.index_topk)
        } else {
            0
        };

        // Scratch.
        let n = max_chunk;
        let e = s.n_embd;
        let hcd = s.hc_dim();
        let f32b = |count: usize| DBuf::zeroed(&stream, count * 4);
        let part_len = (1..=max_chunk.min(ATT_TARGET_BLOCKS))
            .map(|t| {
                let ns = attn_splits(t, s.n_head);
                if ns > 1 { t * s.n_head * ns } else { 0 }
            })
            .max()
            .unwrap_or(0);
        let mut act_bytes = 0usize;
        let mut mid_act_bytes = 0usize;
        let mut act_sh_bytes = 0usize;
        let mut act_sd_bytes = 0usize;
        for l in &layers {
            let mut ws: Vec<&DevWeight> = vec![
                &l.hc_attn.fn_,
                &l.q_a,
                &l.q_b,
                &l.kv,
                &l.out_a,
                &l.out_b,
                &l.hc_ffn.fn_,
                &l.router,
                &l.gate_sh,
                &l.up_sh,
                &l.down_sh,
            ];
            if let Some(c) = &l.comp {
                ws.extend([&c.kv, &c.gate]);
            }
            if let Some(ix) = &l.idx {
                ws.extend([&ix.q_b, &ix.proj, &ix.comp.kv, &ix.comp.gate]);
            }
            for w in ws {
                act_bytes = act_bytes.max(Gemv::act_bytes(w.ty(), w.cols() * w.n_mat(), n));
            }
            act_bytes = act_bytes.max(Gemv::act_bytes(l.gate_exps.ty(), e, n));
            act_sh_bytes = act_sh_bytes.max(Gemv::act_bytes(l.gate_sh.ty(), e, 1));
            act_sd_bytes = act_sd_bytes.max(Gemv::act_bytes(
                l.down_sh.ty(),
                l.down_sh.cols() * l.down_sh.n_mat(),
                1,
            ));
            mid_act_bytes = mid_act_bytes.max(Gemv::act_bytes(
                l.down_exps.ty(),
                s.n_ff_exp,
                n * s.n_expert_used,
            ));
        }
        act_bytes = act_bytes
            .max(Gemv::act_bytes(out_hc_fn.ty(), hcd, n))
            .max(Gemv::act_bytes(output.ty(), e, LOGIT_ROWS.min(n)));
        let any_idx = layers.iter().any(|l| l.idx.is_some());
        let any_comp = layers.iter().any(|l| l.comp.is_some());
        let sc = Scratch {
            x: f32b(n * hcd)?,
            x1: f32b(n * hcd)?,
            flat: f32b(n * hcd)?,
            mix: f32b(n * s.hc_mix())?,
            post: f32b(n * s.hc_mult)?,
            comb: f32b(n * s.hc_mult * s.hc_mult)?,
            xin: f32b(n * e)?,
            a: f32b(n * e)?,
            qr: f32b(n * s.q_lora_rank)?,
            qrn: f32b(n * s.q_lora_rank)?,
            q: f32b(n * s.n_head * hd)?,
            kvp: f32b(n * hd)?,
            ckv: f32b(if any_comp { n * 2 * hd } else { 1 })?,
            csc: f32b(if any_comp { n * 2 * hd } else { 1 })?,
            ikv: f32b(if any_idx { n * 2 * s.index_head_dim } else { 1 })?,
            isc: f32b(if any_idx { n * 2 * s.index_head_dim } else { 1 })?,
            iq: f32b(if any_idx {
                n * s.index_heads * s.index_head_dim
            } else {
                1
            })?,
            iw: f32b(if any_idx { n * s.index_heads } else { 1 })?,
            aj: f32b(aj_len)?,
            scores: f32b(if any_idx {
                score_batch * score_stride
            } else {
                1
            })?,
            isel: f32b(n * s.index_topk.max(1))?,
            heads: f32b(n * s.n_head * hd)?,
            part: DBuf::zeroed(&stream, part_len * (hd + 2) * 8)?,
            att_s: DBuf::zeroed(&stream, attn_dec_bytes(s.n_head, hd, att_stride).0)?,
            att_part: DBuf::zeroed(&stream, attn_dec_bytes(s.n_head, hd, att_stride).1)?,
            low: f32b(n * s.o_groups * s.o_lora_rank)?,
            fout: f32b(n * e)?,
            b: f32b(n * e)?,
            rlog: f32b(n * s.n_expert)?,
            probs: f32b(n * s.n_expert)?,
            sel: f32b(n * s.n_expert_used)?,
            wts: f32b(n * s.n_expert_used)?,
            mid: f32b(n * s.n_expert_used * s.n_ff_exp)?,
            routed: f32b(n * e)?,
            sh_mid: f32b(n * s.n_ff_exp)?,
            sh_out: f32b(n * e)?,
            hmix: f32b(n * s.hc_mult)?,
            hn: f32b(n * e)?,
            logits: f32b(LOGIT_ROWS.min(n) * s.n_vocab)?,
            act: DBuf::zeroed(&stream, act_bytes)?,
            act_pre: DBuf::zeroed(&stream, Gemv::act_bytes(GgmlType::Q8_0, e, n).max(256))?,
            fscale: DBuf::zeroed(&stream, n * 8)?,
            mid_act: DBuf::zeroed(&stream, mid_act_bytes)?,
            act_sh: DBuf::zeroed(&stream, act_sh_bytes.max(256))?,
            act_sd: DBuf::zeroed(&stream, act_sd_bytes.max(256))?,
        };
        let inv_plain = DBuf::from_slice(&stream, &model.plan.rope_plain.inv_freq)?;
        let inv_comp = DBuf::from_slice(&stream, &model.plan.rope_compressed.inv_freq)?;
        let d_pos = DBuf::from_slice(&stream, &[0i32])?;
        let d_tok = DBuf::zeroed(&stream, max_chunk * 4)?;
        let step_timing = if std::env::var("DS4_CUDA_STEP_TIMING").is_ok_and(|v| v == "1") {
            let ev = || {
                dctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(crate::rt::drv)
            };
            Some(StepTiming {
                start: ev()?,
                end: ev()?,
                steps: 0,
                gpu_ms: 0.0,
                wall_s: 0.0,
            })
        } else {
            None
        };
        let h_tok = Pinned::new(&stream, 16)?;
        let h_logits = Pinned::new(&stream, 4 * s.n_vocab)?;
        let h_pick = Pinned::new(&stream, 16)?;
        let d_pick = DBuf::zeroed(&stream, crate::fwd::PICK_PART_BYTES + 16)?;
        let device_pick = std::env::var("DS4_CUDA_GREEDY_PICK").map_or(true, |v| v != "0");
        let (tc, tc_attn) = Self::make_tc(
            &dctx,
            &stream,
            &opts,
            &s,
            &model.plan,
            ctx,
            max_chunk,
            &layers,
            &out_hc_fn,
        )?;
        let free_after = dctx.mem_get_info().map_err(crate::rt::drv)?.0;
        eprintln!(
            "ds4-cuda: prefill passes of up to {max_chunk} tokens; KV state + scratch {:.2} GiB \
             (estimate {:.2}), {:.1} GiB left",
            free_before.saturating_sub(free_after) as f64 / GIB,
            (kv_bytes(&s, &model.plan, ctx) + pass_bytes(&s, max_chunk) + SCORE_BYTES) as f64 / GIB,
            free_after as f64 / GIB
        );
        eprintln!(
            "ds4-cuda: programmatic dependent launch {}",
            if crate::rt::pdl() {
                "on (DS4_CUDA_PDL=0 turns it off)"
            } else {
                "off (DS4_CUDA_PDL=0)"
            }
        );
        {
            // Launches the stacking saves per decode step (without / with indexer scoring).
            let (mut groups, mut saved, mut saved_idx) = (0, 0, 0);
            for l in &layers {
                groups += l.a_groups.len() + usize::from(l.qb_stack.is_some());
                for g in &l.a_groups {
                    let m = g.members.len();
                    let idx_only = g.short.is_some() as usize;
                    saved += (m - idx_only).saturating_sub(1);
                    saved_idx += m - 1;
                }
                saved_idx += usize::from(l.qb_stack.is_some());
            }
            eprintln!(
                "ds4-cuda: {groups} stacked projection groups (DS4_CUDA_STACK_A=0 turns them \
                 off): {saved} matvec launches fewer per decode step ({saved_idx} while the \
                 indexer scores)"
            );
        }
        if !crate::rt::diag_skip().is_empty() {
            eprintln!(
                "ds4-cuda: DS4_CUDA_DIAG_SKIP={}: decode graphs leave these kernels out \
                 (timing diagnostic: the logits are wrong)",
                crate::rt::diag_skip().join(",")
            );
        }
        let perturb = match std::env::var("DS4_CUDA_PERTURB_ULP")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            Some(seed) if seed > 0 => {
                eprintln!(
                    "ds4-cuda: DS4_CUDA_PERTURB_ULP={seed}: token embeddings moved 1 ulp (diagnostic)"
                );
                let m = crate::device::load_module(&dctx, "selftest")?;
                let f = m
                    .load_function("ds4_perturb_ulp")
                    .map_err(|e| cerr(format!("kernel ds4_perturb_ulp: {e}")))?;
                Some((f, seed))
            }
            _ => None,
        };
        stream.synchronize().map_err(crate::rt::drv)?;
        Ok(CudaBackend {
            embed_row_bytes: w.token_embd.row_bytes(),
            model,
            opts,
            ctx_len: ctx,
            max_chunk,
            raw_cap,
            _ctx: dctx,
            stream,
            fwd,
            gemv,
            embed,
            embed_type,
            perturb,
            out_hc_fn,
            out_hc_base,
            out_norm,
            output,
            layers,
            kv,
            sc,
            inv_plain,
            inv_comp,
            d_pos,
            d_tok,
            score_stride,
            score_batch,
            idx_blocks,
            att_stride,
            n_tokens: 0,
            logits: Vec::new(),
            logits_pinned: false,
            device_pick,
            logits_on_device: std::cell::Cell::new(false),
            fetch_error: std::cell::RefCell::new(None),
            d_pick,
            h_pick,
            chunk_logits: Vec::new(),
            trace: None,
            graphs: Graphs([None, None]),
            h_tok,
            h_logits,
            step_timing,
            graph_launches: 0,
            tc,
            tc_attn,
            steer_dirs,
        })
    }

    /// The tensor-core routes in force (`--quality`, `CudaOptions::tc`, the environment), logged
    /// on stderr in one line: the matmul routes' [`Tc`] and the attention route's [`AttnTc`].
    #[allow(clippy::too_many_arguments)]
    fn make_tc(
        dctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        opts: &CudaOptions,
        s: &Shape,
        plan: &ds4_model::Plan,
        ctx: usize,
        max_chunk: usize,
        layers: &[DevLayer],
        out_hc_fn: &DevWeight,
    ) -> Result<(Option<Tc>, Option<AttnTc>), CudaError> {
        let mut routes = if opts.quality {
            crate::TcRoutes::none()
        } else {
            opts.tc.with_env()
        };
        if !routes.any() || max_chunk < crate::tc::MIN_TOKENS {
            eprintln!(
                "ds4-cuda: tensor-core prefill routes off ({})",
                if opts.quality {
                    "--quality: exact kernels only"
                } else if routes.any() {
                    "chunks shorter than the route minimum"
                } else {
                    "disabled"
                }
            );
            return Ok((None, None));
        }
        let mut attn_note = String::new();
        let attn = if routes.attn && AttnTc::supports(s.head_dim) {
            let comp_rows = plan
                .layers
                .iter()
                .map(|l| ctx.checked_div(l.attn.ratio()).map_or(0, |r| r + 1))
                .max()
                .unwrap_or(0);
            let prec = AttnPrecision::from_env();
            let a = AttnTc::new(
                dctx,
                stream,
                s.head_dim,
                s.window + max_chunk,
                comp_rows,
                prec,
            )?;
            attn_note = format!(
                " (attn: {} operands, {:.1} MiB row scratch)",
                if prec == AttnPrecision::Split {
                    "f16 hi+lo"
                } else {
                    "f16"
                },
                a.scratch_bytes() as f64 / (1u64 << 20) as f64
            );
            Some(a)
        } else {
            if routes.attn {
                attn_note = format!(" (attn: no kernel for head_dim {})", s.head_dim);
                routes.attn = false;
            }
            None
        };
        let matmul_routes = crate::TcRoutes {
            attn: false,
            ..routes
        };
        let tc = if matmul_routes.any() {
            let mut f16_cols = out_hc_fn.cols() * out_hc_fn.n_mat();
            for l in layers {
                let mut ws = vec![&l.hc_attn.fn_, &l.hc_ffn.fn_, &l.router];
                if let Some(c) = &l.comp {
                    ws.extend([&c.kv, &c.gate]);
                }
                if let Some(ix) = &l.idx {
                    ws.extend([&ix.q_b, &ix.proj, &ix.comp.kv, &ix.comp.gate]);
                }
                for w in ws {
                    if w.ty() == GgmlType::F16 {
                        f16_cols = f16_cols.max(w.cols() * w.n_mat());
                    }
                }
            }
            // The f16 form of dense / attn_out: scratch for the largest layer matrix (the LM
            // head stays on the int8 kernels).
            let (mut dense_elems, mut dense_cols, mut pair_rows) = (0, 0, 0);
            for l in layers {
                for w in [&l.q_a, &l.q_b, &l.kv, &l.out_a, &l.out_b, &l.down_sh] {
                    if w.ty() == GgmlType::Q8_0 {
                        dense_elems = dense_elems.max(w.rows() * w.n_mat() * w.cols());
                        dense_cols = dense_cols.max(w.cols() * w.n_mat());
                    }
                }
                if l.gate_sh.ty() == GgmlType::Q8_0 {
                    dense_elems = dense_elems.max(2 * l.gate_sh.rows() * l.gate_sh.cols());
                    dense_cols = dense_cols.max(l.gate_sh.cols());
                    pair_rows = pair_rows.max(l.gate_sh.rows());
                }
            }
            let cfg = TcConfig {
                max_tokens: max_chunk,
                max_f16_cols: f16_cols,
                n_expert: s.n_expert,
                n_expert_used: s.n_expert_used,
                down_rows: s.n_embd,
                max_dense_elems: dense_elems,
                max_dense_cols: dense_cols,
                max_pair_rows: pair_rows,
            };
            Some(Tc::new(dctx, stream, cfg, matmul_routes)?)
        } else {
            None
        };
        // Tc may have fallen back from the f16 form of dense / attn_out (no libcublas).
        if let Some(t) = &tc {
            routes.dense_f16 = t.routes().dense_f16;
        }
        eprintln!(
            "ds4-cuda: tensor-core prefill routes (chunks of >= {} tokens): {}{attn_note}",
            crate::tc::MIN_TOKENS,
            routes.describe()
        );
        Ok((tc, attn))
    }

    /// Shape limits of the kernels.
    fn check_shape(s: &Shape) -> Result<(), CudaError> {
        let bad = |what: &str| Err(cerr(format!("the CUDA backend does not support {what}")));
        if s.hc_mult > 16 {
            return bad("hc_mult > 16");
        }
        if !s.head_dim.is_multiple_of(32) || s.head_dim > 512 {
            return bad("head_dim not a multiple of 32 up to 512");
        }
        if !s.n_rot.is_multiple_of(2) || s.n_rot > s.head_dim || s.n_rot > s.index_head_dim {
            return bad("this RoPE width");
        }
        if s.n_expert > 1024 || s.n_expert_used > crate::gemv::MAX_K {
            return bad("more than 1024 experts or more than 8 experts per token");
        }
        if !s.index_head_dim.is_power_of_two() || s.index_head_dim > 1024 {
            return bad("an indexer head dim that is not a power of two up to 1024");
        }
        if !s.n_embd.is_multiple_of(4) {
            return bad("n_embd not a multiple of 4");
        }
        for (il, &r) in s.compress_ratios.iter().enumerate() {
            if s.attn_kind(il).has_indexer() && r > 8 {
                return bad("an overlapping compressor ratio above 8");
            }
        }
        Ok(())
    }

    /// The options the backend was built with.
    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }

    /// Decode steps served by a CUDA graph replay so far.
    pub fn graph_launches(&self) -> u64 {
        self.graph_launches
    }

    /// Device bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        let mut t = self.embed.bytes + self.out_hc_fn.device_bytes() + self.output.device_bytes();
        for l in &self.layers {
            t += l.q_a.device_bytes()
                + l.q_b.device_bytes()
                + l.kv.device_bytes()
                + l.out_a.device_bytes()
                + l.out_b.device_bytes()
                + l.hc_attn.fn_.device_bytes()
                + l.hc_ffn.fn_.device_bytes()
                + l.router.device_bytes()
                + l.gate_exps.device_bytes()
                + l.up_exps.device_bytes()
                + l.down_exps.device_bytes()
                + l.gate_sh.device_bytes()
                + l.up_sh.device_bytes()
                + l.down_sh.device_bytes();
            if let Some(c) = &l.comp {
                t += c.kv.device_bytes() + c.gate.device_bytes();
            }
            if let Some(ix) = &l.idx {
                t += ix.q_b.device_bytes()
                    + ix.proj.device_bytes()
                    + ix.comp.kv.device_bytes()
                    + ix.comp.gate.device_bytes();
            }
        }
        t
    }

    /// Device bytes one decode step streams from the weights: everything but the embedding
    /// table, with only `n_expert_used` of the `n_expert` routed experts of each layer.
    pub fn decode_read_bytes(&self) -> usize {
        let s = self.s();
        let mut t = self.weight_bytes() - self.embed.bytes;
        for l in &self.layers {
            let ex =
                l.gate_exps.device_bytes() + l.up_exps.device_bytes() + l.down_exps.device_bytes();
            t -= ex;
            t += ex / s.n_expert * s.n_expert_used;
        }
        t
    }

    fn s(&self) -> &Shape {
        &self.model.shape
    }

    /// Directional steering of layer `il`'s `which` output for `n` tokens into `y`: `y = f`
    /// (`f` may be `y`), or `y = routed + f` when `routed` is not 0 (the FFN output the HC post
    /// would form), then every slot's edit in order (one launch). Returns false, launching
    /// nothing, when no slot edits this sublayer (the caller runs its normal path).
    fn steer(
        &self,
        il: usize,
        which: Sublayer,
        y: u64,
        f: u64,
        routed: u64,
        n: usize,
    ) -> Result<bool, CudaError> {
        let Some(st) = &self.opts.steering else {
            return Ok(false);
        };
        let e = self.s().n_embd;
        let slots: Vec<(u64, f32)> = st
            .slots()
            .iter()
            .zip(&self.steer_dirs)
            .filter(|(slot, _)| slot.scale(which) != 0.0)
            .map(|(slot, d)| (d.ptr + (4 * il * e) as u64, slot.scale(which)))
            .collect();
        if slots.is_empty() {
            return Ok(false);
        }
        self.fwd.dir_steer(y, f, routed, e, n, &slots)?;
        Ok(true)
    }

    /// The FFN HC post's inputs `(f, routed, k)` for `n` tokens: with FFN steering the sum
    /// routed + shared is formed (the post's own f32 add) and edited into `fout`, which the post
    /// then reads alone; otherwise the shared output and the summed routed experts.
    fn ffn_post_inputs(&self, il: usize, n: usize) -> Result<(u64, u64, usize), CudaError> {
        let sc = &self.sc;
        Ok(
            if self.steer(
                il,
                Sublayer::Ffn,
                sc.fout.ptr,
                sc.sh_out.ptr,
                sc.routed.ptr,
                n,
            )? {
                (sc.fout.ptr, 0, 0)
            } else {
                (sc.sh_out.ptr, sc.routed.ptr, 1)
            },
        )
    }

    /// `y[t] = W·x[t]` for `n` tokens (quantizing `x` when the weight type needs it).
    fn mm(&self, w: &DevWeight, x: u64, n: usize, y: u64) -> Result<(), CudaError> {
        let st = &self.stream;
        let cols = w.cols() * w.n_mat();
        let xs = dv::<f32>(st, x, n * cols);
        let mut act = dv::<u8>(st, self.sc.act.ptr, self.sc.act.bytes);
        self.gemv.quantize_act(st, w.ty(), &xs, n, cols, &mut act)?;
        self.mm_prequant(w, x, n, y)
    }

    /// [`CudaBackend::mm`] where `sc.act` already holds `x` quantized for `w`.
    fn mm_prequant(&self, w: &DevWeight, x: u64, n: usize, y: u64) -> Result<(), CudaError> {
        let st = &self.stream;
        let cols = w.cols() * w.n_mat();
        let xs = dv::<f32>(st, x, n * cols);
        let act = dv::<u8>(st, self.sc.act.ptr, self.sc.act.bytes);
        let mut ys = dv::<f32>(st, y, n * w.rows() * w.n_mat());
        if let Some(tc) = self.tc.as_ref().filter(|t| t.takes_matmul(w, n)) {
            // SAFETY: act holds x quantized for w (the caller's contract), x is [n][cols], y
            // [n][rows·n_mat].
            return unsafe { tc.matmul(st, w, x, self.sc.act.ptr, n, y) };
        }
        self.gemv.matvec(st, w, &xs, &act, n, &mut ys)
    }

    /// Whether the lightning indexer has to score at some token of a chunk ending at `pend`.
    fn indexer_active(&self, pend: usize) -> bool {
        let s = self.s();
        self.layers
            .iter()
            .any(|l| l.idx.is_some() && pend / l.attn.ratio() > s.index_topk)
    }

    /// Enqueue the forward pass of the `n` tokens in `d_tok` at the device position, then
    /// advance it. `indexer` says whether to run the indexer scoring (it must be true when
    /// any token sees more than `index_topk` rows). With `logits = Some(first)` the logits of
    /// rows `first..n` (at most LOGIT_ROWS) are computed into `sc.logits`. With `trace`,
    /// routing and indexer picks are read back after every layer (synchronising; never used
    /// while capturing).
    fn forward(
        &self,
        n: usize,
        indexer: bool,
        logits: Option<usize>,
        mut trace: Option<&mut Trace>,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let fw = &self.fwd;
        let e = s.n_embd;
        let hc = s.hc_mult;
        let hcd = s.hc_dim();
        let hd = s.head_dim;
        let nh = s.n_head;
        let ql = s.q_lora_rank;
        let eps = s.rms_eps;
        let pos = self.d_pos.ptr;
        let qat = self.opts.qat;

        fw.embed(
            self.embed.ptr,
            self.embed_type,
            e,
            self.embed_row_bytes,
            self.d_tok.ptr,
            n,
            hc,
            sc.x.ptr,
        )?;
        if let Some((f, seed)) = &self.perturb {
            let len = n * hc * e;
            crate::rt::launch(
                &self.stream,
                f,
                (len.div_ceil(256) as u32, 1, 1),
                256,
                0,
                &[
                    crate::rt::A::P(sc.x.ptr),
                    crate::rt::A::L(len as i64),
                    crate::rt::A::I(*seed as i32),
                ],
            )?;
        }
        fw.rms_rows(sc.x.ptr, hcd, 0, hcd, eps, sc.flat.ptr, hcd, n)?;

        // Whether the last HC post left `flat` to the next mix product (norm factors in
        // sc.fscale; see flat_scaled).
        let mut attn_scaled = false;
        for (il, l) in self.layers.iter().enumerate() {
            let kvs = &self.kv[il];
            let inv = match l.rope {
                RopeKind::Plain => self.inv_plain.ptr,
                RopeKind::Compressed => self.inv_comp.ptr,
            };
            if n == 1 && trace.is_none() {
                self.decode_layer(il, l, kvs, inv, indexer)?;
                continue;
            }
            // ---- attention sublayer
            self.mix_mm(&l.hc_attn.fn_, sc.x.ptr, n, attn_scaled)?;
            let pre_a = self.hc_pre_chunk(
                &l.hc_attn,
                sc.x.ptr,
                l.attn_norm.ptr,
                sc.a.ptr,
                n,
                [&l.q_a, &l.kv],
            )?;
            self.mm_pre(&l.q_a, sc.a.ptr, n, sc.qr.ptr, pre_a)?;
            fw.rms_rows(sc.qr.ptr, ql, l.q_a_norm.ptr, ql, eps, sc.qrn.ptr, ql, n)?;
            self.mm(&l.q_b, sc.qrn.ptr, n, sc.q.ptr)?;
            // The tensor-core attention route, where it takes the chunk, applies the Q heads'
            // norm + RoPE on its Q load (same bits), unless a trace reads sc.q.
            let comp_rows = kvs.comp.bytes / (hd * 4);
            let mut a = self.attn_launch(l, kvs, inv);
            let tc_attn = self
                .tc_attn
                .as_ref()
                .filter(|t| n >= crate::tc::MIN_TOKENS && t.fits(&a, comp_rows));
            let qnorm = (tc_attn.is_some() && trace.is_none()).then_some(eps);
            if qnorm.is_none() {
                fw.head_norm_rope(sc.q.ptr, nh, hd, s.n_rot, eps, inv, pos, n)?;
            }
            self.mm_pre(&l.kv, sc.a.ptr, n, sc.kvp.ptr, pre_a)?;
            fw.kv_finish(
                sc.kvp.ptr,
                l.kv_norm.ptr,
                hd,
                s.n_rot,
                eps,
                inv,
                pos,
                qat,
                s.n_nope(),
                kvs.ring.ptr,
                self.raw_cap,
                n,
            )?;
            // What the tensor-core f16 scratch holds over the compressor / indexer products.
            let mut f16_held = None;
            if let Some(c) = &l.comp {
                let (k, v) = frontier(&kvs.st_kv, &kvs.st_sc)?;
                self.compressor(
                    c,
                    k,
                    v,
                    kvs.comp.ptr,
                    sc.ckv.ptr,
                    sc.csc.ptr,
                    n,
                    1,
                    &mut f16_held,
                )?;
            }
            if let Some(ix) = &l.idx {
                let icomp = kvs
                    .icomp
                    .as_ref()
                    .ok_or_else(|| cerr("indexer rows missing"))?;
                let (k, v) = frontier(&kvs.ist_kv, &kvs.ist_sc)?;
                self.compressor(
                    &ix.comp,
                    k,
                    v,
                    icomp.ptr,
                    sc.ikv.ptr,
                    sc.isc.ptr,
                    n,
                    2,
                    &mut f16_held,
                )?;
                if indexer {
                    self.indexer(l, ix, icomp.ptr, n, &mut f16_held)?;
                }
                if let Some(tr) = trace.as_deref_mut() {
                    self.trace_indexer(tr, il, n, indexer)?;
                }
            }
            match tc_attn {
                Some(t) => {
                    // The route also writes its output Q8_0-quantized for out_a (the bytes
                    // quantize_act would write into act), skipping the f32 heads when nothing
                    // else reads them (no trace).
                    let cols = l.out_a.cols() * l.out_a.n_mat();
                    let tcm = self
                        .tc
                        .as_ref()
                        .filter(|tc| tc.takes_matmul(&l.out_a, n) && trace.is_none());
                    match tcm.filter(|_| {
                        t.q8_fits()
                            && l.out_a.ty() == GgmlType::Q8_0
                            && cols == nh * hd
                            && Gemv::act_bytes(GgmlType::Q8_0, cols, n) <= sc.act.bytes
                    }) {
                        Some(tc) => {
                            let od = (n * cols).div_ceil(256) as u64 * 256;
                            a.heads = 0;
                            // SAFETY: the addresses of `a` are this layer's KV state and the
                            // chunk scratch, sized for max_chunk tokens; act holds the Q8_0
                            // layout of n rows of nh·hd (checked above), then feeds out_a.
                            unsafe {
                                t.attention(
                                    &self.stream,
                                    &a,
                                    comp_rows,
                                    n,
                                    Some((sc.act.ptr, sc.act.ptr + od)),
                                    qnorm,
                                )?;
                                tc.matmul(
                                    &self.stream,
                                    &l.out_a,
                                    sc.heads.ptr,
                                    sc.act.ptr,
                                    n,
                                    sc.low.ptr,
                                )?;
                            }
                        }
                        None => {
                            // SAFETY: as above, f32 heads only.
                            unsafe { t.attention(&self.stream, &a, comp_rows, n, None, qnorm)? };
                            self.mm(&l.out_a, sc.heads.ptr, n, sc.low.ptr)?;
                        }
                    }
                }
                None => {
                    fw.attention(&a, n, attn_splits(n, nh))?;
                    self.mm(&l.out_a, sc.heads.ptr, n, sc.low.ptr)?;
                }
            }
            self.mm(&l.out_b, sc.low.ptr, n, sc.fout.ptr)?;
            self.steer(il, Sublayer::Attn, sc.fout.ptr, sc.fout.ptr, 0, n)?;
            let ffn_scaled = self.flat_scaled(&l.hc_ffn.fn_, n, trace.is_some());
            fw.hc_post(
                sc.fout.ptr,
                0,
                0,
                sc.x.ptr,
                sc.post.ptr,
                sc.comb.ptr,
                hc,
                e,
                sc.x1.ptr,
                if ffn_scaled { 0 } else { sc.flat.ptr },
                eps,
                n,
                if ffn_scaled { sc.fscale.ptr } else { 0 },
            )?;

            // ---- FFN sublayer
            self.mix_mm(&l.hc_ffn.fn_, sc.x1.ptr, n, ffn_scaled)?;
            let pre_b = self.hc_pre_chunk(
                &l.hc_ffn,
                sc.x1.ptr,
                l.ffn_norm.ptr,
                sc.b.ptr,
                n,
                [&l.gate_sh, &l.up_sh],
            )?;
            self.mm(&l.router, sc.b.ptr, n, sc.rlog.ptr)?;
            self.route(il, l, n)?;
            self.moe(l, n, false, pre_b, true)?;
            // F = routed (summed over the k experts by moe_down) + shared, then HC post.
            // The next layer's mix product forms flat itself where it can (the last layer's
            // flat feeds the output head).
            attn_scaled = self
                .layers
                .get(il + 1)
                .is_some_and(|nl| self.flat_scaled(&nl.hc_attn.fn_, n, trace.is_some()));
            let (f, routed, k) = self.ffn_post_inputs(il, n)?;
            fw.hc_post(
                f,
                routed,
                k,
                sc.x1.ptr,
                sc.post.ptr,
                sc.comb.ptr,
                hc,
                e,
                sc.x.ptr,
                if attn_scaled { 0 } else { sc.flat.ptr },
                eps,
                n,
                if attn_scaled { sc.fscale.ptr } else { 0 },
            )?;
            if let Some(tr) = trace.as_deref_mut() {
                self.trace_layer(tr, il, n)?;
            }
        }

        if let Some(first) = logits {
            self.output_head(first, n - first)?;
        }
        fw.advance_pos(pos, n)
    }

    /// `y = W·x` for one token where `held` says what `sc.act` holds for `x` (the weight type
    /// and width of the last quantization of `x`): a projection with the same activation format
    /// skips its quantization. Returns what `sc.act` holds afterwards.
    fn mm_shared(
        &self,
        w: &DevWeight,
        x: u64,
        y: u64,
        held: Option<(GgmlType, usize)>,
    ) -> Result<Option<(GgmlType, usize)>, CudaError> {
        let cols = w.cols() * w.n_mat();
        let ty = w.ty();
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            // Float activations: nothing is quantized, sc.act is left as it was.
            self.mm(w, x, 1, y)?;
            return Ok(held);
        }
        if held != Some((ty, cols)) {
            self.mm(w, x, 1, y)?;
            return Ok(Some((ty, cols)));
        }
        let st = &self.stream;
        let xs = dv::<f32>(st, x, cols);
        let act = dv::<u8>(st, self.sc.act.ptr, self.sc.act.bytes);
        let mut ys = dv::<f32>(st, y, w.rows() * w.n_mat());
        self.gemv.matvec(st, w, &xs, &act, 1, &mut ys)?;
        Ok(held)
    }

    /// One layer of a single-token step with the decode kernels (the chunk path's values, but
    /// for the order of f64 sums: a stacked matvec may split K differently, 1-ulp ties as in
    /// gemv.rs): the projections of `a` (stacked groups in one matvec each; the compressor /
    /// indexer ones on the side stream), then of the normed q_a output, one launch for the q
    /// heads, the KV row, both compressors and the indexer queries, then the indexer selection,
    /// the two-launch attention and the fused HC kernels; in the FFN the shared expert on the
    /// side stream next to the router and the routed experts.
    fn decode_layer(
        &self,
        il: usize,
        l: &DevLayer,
        kvs: &DevKv,
        inv: u64,
        indexer: bool,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let fw = &self.fwd;
        let e = s.n_embd;
        let hc = s.hc_mult;
        let hd = s.head_dim;
        let nh = s.n_head;
        let ql = s.q_lora_rank;
        let eps = s.rms_eps;
        let pos = self.d_pos.ptr;
        let qat = self.opts.qat;

        // ---- attention sublayer
        // The HC pre (with its mix product) also quantizes `a` for q_a (and the projections
        // sharing its format).
        let q_a_cols = l.q_a.cols() * l.q_a.n_mat();
        let qa = match Gemv::act_ptrs(l.q_a.ty(), q_a_cols, sc.act.ptr) {
            Some((q8k, qs, d, bs)) if q_a_cols == e => dec_quant(q8k, qs, d, bs),
            _ => DecQuant::default(),
        };
        let qa = if qa.fits_hc(e) {
            qa
        } else {
            DecQuant::default()
        };
        // Layer il > 0: the previous layer's FFN post ran wide where this site takes it (the
        // same condition there), and this site's product launch finishes its norm.
        let wide_in = il > 0 && self.post_wide_ok(&l.hc_attn, sc.x.ptr);
        self.hc_pre_site(&l.hc_attn, sc.x.ptr, l.attn_norm.ptr, sc.a.ptr, qa, wide_in)?;
        let held0 = (qa != DecQuant::default()).then(|| (l.q_a.ty(), q_a_cols));
        // The projections of `a`: each stacked group in one matvec into `sc.aj` (its members'
        // outputs are row ranges there), the others on their own into their buffers. The jobs
        // q_a's chain does not need (compressor / indexer slots only) run on the side stream
        // when they all take float activations, concurrently with the q path (joined before
        // qkv_dec); the others here, in order.
        let mut out = [
            sc.qr.ptr, sc.kvp.ptr, sc.ckv.ptr, sc.csc.ptr, sc.ikv.ptr, sc.isc.ptr, sc.iw.ptr,
        ];
        // (weight, output, holds q_a or kv)
        let mut jobs: Vec<(&DevWeight, u64, bool)> = Vec::with_capacity(A_SLOTS);
        let mut done = [false; A_SLOTS];
        for g in &l.a_groups {
            let w = match (&g.short, indexer) {
                (Some(w), false) => w,
                _ => &g.w,
            };
            let y = sc.aj.ptr + 4 * g.out0 as u64;
            let mut q = false;
            for &(slot, row0) in &g.members {
                out[slot] = y + 4 * row0 as u64;
                done[slot] = true;
                q |= slot <= A_KV;
            }
            jobs.push((w, y, q));
        }
        let comp_w = l.comp.as_ref();
        let idx_w = l.idx.as_ref();
        let singles: [(usize, Option<&DevWeight>); A_SLOTS] = [
            (A_QA, Some(&l.q_a)),
            (A_KV, Some(&l.kv)),
            (A_CKV, comp_w.map(|c| &c.kv)),
            (A_CSC, comp_w.map(|c| &c.gate)),
            (A_IKV, idx_w.map(|ix| &ix.comp.kv)),
            (A_ISC, idx_w.map(|ix| &ix.comp.gate)),
            (A_IW, idx_w.filter(|_| indexer).map(|ix| &ix.proj)),
        ];
        for (slot, w) in singles {
            if let Some(w) = w.filter(|_| !done[slot]) {
                jobs.push((w, out[slot], slot <= A_KV));
            }
        }
        let side: Vec<(&DevWeight, u64)> =
            jobs.iter().filter(|j| !j.2).map(|j| (j.0, j.1)).collect();
        let proj_side = self.proj_side_ok(&side);
        if proj_side {
            fw.fork_side()?;
            for &(w, y) in &side {
                self.mm_float_on(fw.side(), w, sc.a.ptr, y)?;
            }
            fw.side_done()?;
        }
        let mut held = held0;
        for &(w, y, q) in &jobs {
            if q || !proj_side {
                held = self.mm_shared(w, sc.a.ptr, y, held)?;
            }
        }
        let mut comp = [CompDec::default(); 2];
        if let Some(c) = &l.comp {
            let (k, v) = frontier(&kvs.st_kv, &kvs.st_sc)?;
            comp[0] = CompDec {
                ckv: out[A_CKV],
                csc: out[A_CSC],
                ape: c.ape.ptr,
                st_kv: k,
                st_sc: v,
                norm: c.norm.ptr,
                rows: kvs.comp.ptr,
                ratio: c.geom.ratio as i64,
                overlap: c.geom.overlap as i64,
                d_c: c.geom.d_c as i64,
                qat_mode: if qat { 1 } else { 0 },
            };
        }
        let mut icomp_ptr = 0;
        if let Some(ix) = &l.idx {
            let icomp = kvs
                .icomp
                .as_ref()
                .ok_or_else(|| cerr("indexer rows missing"))?;
            icomp_ptr = icomp.ptr;
            let (k, v) = frontier(&kvs.ist_kv, &kvs.ist_sc)?;
            comp[1] = CompDec {
                ckv: out[A_IKV],
                csc: out[A_ISC],
                ape: ix.comp.ape.ptr,
                st_kv: k,
                st_sc: v,
                norm: ix.comp.norm.ptr,
                rows: icomp.ptr,
                ratio: ix.comp.geom.ratio as i64,
                overlap: ix.comp.geom.overlap as i64,
                d_c: ix.comp.geom.d_c as i64,
                qat_mode: if qat { 2 } else { 0 },
            };
        }
        // q_a norm, with q_b's Q8_0 quantization of its output in the same launch.
        let q_b_cols = l.q_b.cols() * l.q_b.n_mat();
        let mut held_q = None;
        if Fwd::rms_q8_fits(ql) {
            let (q0, d0) = match Gemv::act_ptrs(l.q_b.ty(), q_b_cols, sc.act.ptr) {
                Some((false, qs, d, _)) if q_b_cols == ql => {
                    held_q = Some((l.q_b.ty(), q_b_cols));
                    (qs, d)
                }
                _ => (0, 0),
            };
            fw.rms_q8_dec(out[A_QA], l.q_a_norm.ptr, ql, eps, sc.qrn.ptr, q0, d0)?;
        } else {
            fw.rms_rows(out[A_QA], ql, l.q_a_norm.ptr, ql, eps, sc.qrn.ptr, ql, 1)?;
        }
        let run_indexer = indexer && l.idx.is_some();
        // While the indexer scores, q_b and its q_b in one matvec (the stack's rows in sc.q).
        let qb_stack = l
            .qb_stack
            .as_ref()
            .filter(|w| run_indexer && sc.q.bytes >= 4 * w.rows());
        let mut iq = sc.iq.ptr;
        if let Some(w) = qb_stack {
            self.mm_shared(w, sc.qrn.ptr, sc.q.ptr, held_q)?;
            iq = sc.q.ptr + 4 * l.q_b.rows() as u64;
        } else {
            let held_q = self.mm_shared(&l.q_b, sc.qrn.ptr, sc.q.ptr, held_q)?;
            if let (Some(ix), true) = (&l.idx, run_indexer) {
                self.mm_shared(&ix.q_b, sc.qrn.ptr, sc.iq.ptr, held_q)?;
            }
        }
        let nih = s.index_heads;
        let ihd = s.index_head_dim;
        if proj_side {
            fw.join_side()?;
        }
        fw.qkv_dec(&QkvDec {
            pos,
            q: sc.q.ptr,
            inv,
            nh: nh as i64,
            hd: hd as i64,
            n_rot: s.n_rot as i64,
            eps: eps as f64,
            kvp: out[A_KV],
            kv_w: l.kv_norm.ptr,
            ring: kvs.ring.ptr,
            raw_cap: self.raw_cap as i64,
            qat: qat as i64,
            n_nope: s.n_nope() as i64,
            comp,
            inv_comp: self.inv_comp.ptr,
            iq: if run_indexer { iq } else { 0 },
            iw: if run_indexer { out[A_IW] } else { 0 },
            nih: nih as i64,
            ihd: ihd as i64,
            iqat: qat as i64,
            wscale: 1.0 / ((ihd * nih) as f64).sqrt(),
        })?;
        if run_indexer {
            self.fwd.indexer_select(
                iq,
                out[A_IW],
                icomp_ptr,
                nih,
                ihd,
                l.attn.ratio(),
                s.index_topk,
                pos,
                0,
                1,
                sc.scores.ptr,
                self.score_stride,
                self.idx_blocks,
                sc.isel.ptr,
            )?;
        }
        let a = self.attn_launch(l, kvs, inv);
        if self.att_stride > 0 {
            // The last split blocks also write the heads Q8_0-quantized for out_a (the bytes
            // quantize_act would write into act), so out_a skips its quantization.
            let cols = l.out_a.cols() * l.out_a.n_mat();
            let q8 = (l.out_a.ty() == GgmlType::Q8_0
                && cols == nh * hd
                && Gemv::act_bytes(GgmlType::Q8_0, cols, 1) <= sc.act.bytes)
                .then(|| Gemv::act_ptrs(GgmlType::Q8_0, cols, sc.act.ptr))
                .flatten()
                .map(|(_, qs, d, _)| (qs, d));
            fw.attention_dec(&a, sc.att_s.ptr, self.att_stride, sc.att_part.ptr, q8)?;
            if q8.is_some() {
                self.mm_prequant(&l.out_a, sc.heads.ptr, 1, sc.low.ptr)?;
            } else {
                self.mm(&l.out_a, sc.heads.ptr, 1, sc.low.ptr)?;
            }
        } else {
            fw.attention(&a, 1, attn_splits(1, nh))?;
            self.mm(&l.out_a, sc.heads.ptr, 1, sc.low.ptr)?;
        }
        self.mm(&l.out_b, sc.low.ptr, 1, sc.fout.ptr)?;
        self.steer(il, Sublayer::Attn, sc.fout.ptr, sc.fout.ptr, 0, 1)?;
        fw.join_side()?;
        let wide_a = self.post_wide_ok(&l.hc_ffn, sc.x1.ptr);
        if wide_a {
            fw.hc_post_wide(
                sc.fout.ptr,
                0,
                0,
                sc.x.ptr,
                sc.post.ptr,
                sc.comb.ptr,
                hc,
                e,
                sc.x1.ptr,
            )?;
        } else {
            fw.hc_post_dec(
                sc.fout.ptr,
                0,
                0,
                sc.x.ptr,
                sc.post.ptr,
                sc.comb.ptr,
                hc,
                e,
                sc.x1.ptr,
                sc.flat.ptr,
                eps,
            )?;
        }

        // ---- FFN sublayer
        // The HC pre (with its mix product) also quantizes `b` for the routed experts (into act) and the shared
        // expert (into act_sh) when their formats differ and nothing in between reuses act.
        let qb = self.ffn_quant(l);
        self.hc_pre_site(&l.hc_ffn, sc.x1.ptr, l.ffn_norm.ptr, sc.b.ptr, qb, wide_a)?;
        let pre_q = qb != DecQuant::default();
        let sh_side = pre_q && self.shared_side_ok(l);
        if sh_side {
            self.shared_side(l)?;
        }
        self.mm(&l.router, sc.b.ptr, 1, sc.rlog.ptr)?;
        self.route(il, l, 1)?;
        self.moe(l, 1, pre_q, None, !sh_side)?;
        fw.join_side()?;
        let (f, routed, k) = self.ffn_post_inputs(il, 1)?;
        // Wide where the next layer's attention site finishes the norm (not before the
        // output head, which reads flat).
        let wide_f = self
            .layers
            .get(il + 1)
            .is_some_and(|nl| self.post_wide_ok(&nl.hc_attn, sc.x.ptr));
        if wide_f {
            return fw.hc_post_wide(
                f,
                routed,
                k,
                sc.x1.ptr,
                sc.post.ptr,
                sc.comb.ptr,
                hc,
                e,
                sc.x.ptr,
            );
        }
        fw.hc_post_dec(
            f,
            routed,
            k,
            sc.x1.ptr,
            sc.post.ptr,
            sc.comb.ptr,
            hc,
            e,
            sc.x.ptr,
            sc.flat.ptr,
            eps,
        )
    }

    /// The F16 `fn` address of a decode site where its mix product runs in
    /// [`Fwd::hc_pre_mix_dec`] (hc 4, F16, 16-byte aligned `fn`, `flat` and streams `x`).
    fn mix_fused(&self, hw: &DevHc, x: u64) -> Option<u64> {
        let s = self.s();
        let f = &hw.fn_;
        let ([fp, ..], _g) = f.region_ptrs(&self.stream);
        let ok = f.ty() == GgmlType::F16
            && f.n_mat() == 1
            && Fwd::hc_pre_mix_fits(s.hc_mult, s.n_embd, f.rows(), f.cols())
            && fp.is_multiple_of(16)
            && x.is_multiple_of(16)
            && self.sc.flat.ptr.is_multiple_of(16);
        ok.then_some(fp)
    }

    /// Whether the HC post that feeds the decode site `hw` (streams `x`) runs wide
    /// ([`Fwd::hc_post_wide`], the norm finished by the site's product launch);
    /// `DS4_CUDA_HC_POST_WIDE=0` turns it off.
    fn post_wide_ok(&self, hw: &DevHc, x: u64) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| env_on("DS4_CUDA_HC_POST_WIDE"));
        let s = self.s();
        on && Fwd::hc_post_wide_fits(s.hc_mult, s.n_embd) && self.mix_fused(hw, x).is_some()
    }

    /// HC pre of a decode site from `sc.flat`: the mix product and the collapse + norm (+ `q`)
    /// in one launch where the kernel takes the site (hc 4, F16 fn), else the F16/F32 matvec
    /// and [`CudaBackend::hc_pre_dec`]; the split goes to the side stream after the mix.
    /// `wide_in`: the streams come from [`Fwd::hc_post_wide`] (flat not yet written; only
    /// where [`CudaBackend::post_wide_ok`] said so).
    fn hc_pre_site(
        &self,
        hw: &DevHc,
        x: u64,
        norm: u64,
        out: u64,
        q: DecQuant,
        wide_in: bool,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let Some(fp) = self.mix_fused(hw, x) else {
            if wide_in {
                return Err(cerr("hc_pre_site: wide HC post without the fused product"));
            }
            self.mm(&hw.fn_, sc.flat.ptr, 1, sc.mix.ptr)?;
            return self.hc_pre_dec(hw, x, norm, out, q);
        };
        self.fwd.hc_pre_mix_dec(
            wide_in.then_some(s.rms_eps),
            sc.flat.ptr,
            fp,
            sc.mix.ptr,
            hw.scale.ptr,
            hw.base.ptr,
            s.hc_mult,
            s.hc_eps,
            x,
            s.n_embd,
            norm,
            s.rms_eps,
            sc.xin.ptr,
            out,
            q,
        )?;
        self.split_side(hw)
    }

    /// The HC split (post, comb) of a site from `sc.mix`, on the side stream.
    fn split_side(&self, hw: &DevHc) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        self.fwd.hc_split_side(
            sc.mix.ptr,
            hw.scale.ptr,
            hw.base.ptr,
            s.hc_mult,
            s.sinkhorn_iters,
            s.hc_eps,
            sc.post.ptr,
            sc.comb.ptr,
        )
    }

    /// HC pre of a site for one token (its mix product already in sc.mix): the split (post,
    /// comb) goes to the side stream — only the HC post needs it — and the collapse + norm runs
    /// here. The caller joins the side stream before the HC post.
    fn hc_pre_dec(
        &self,
        hw: &DevHc,
        x: u64,
        norm: u64,
        out: u64,
        q: DecQuant,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        self.split_side(hw)?;
        self.fwd.hc_pre_dec(
            sc.mix.ptr,
            hw.scale.ptr,
            hw.base.ptr,
            s.hc_mult,
            s.hc_eps,
            x,
            s.n_embd,
            norm,
            s.rms_eps,
            sc.xin.ptr,
            out,
            q,
        )
    }

    /// Whether the decode step runs the projections `projs` (weight, output) of `a` on the side
    /// stream: all take float activations (F16 / BF16 / F32 weights: no quantization scratch
    /// is shared with the main stream). `DS4_CUDA_DEC_PROJ_SIDE=0` keeps them on the main
    /// stream.
    fn proj_side_ok(&self, projs: &[(&DevWeight, u64)]) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| env_on("DS4_CUDA_DEC_PROJ_SIDE"));
        on && !projs.is_empty()
            && projs.iter().all(|(w, _)| {
                matches!(w.ty(), GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
                    && self.tc.as_ref().is_none_or(|t| !t.takes_matmul(w, 1))
            })
    }

    /// `y = W·x` for one token of a float-activation weight (F16 / BF16 / F32), on stream `st`.
    fn mm_float_on(
        &self,
        st: &Arc<CudaStream>,
        w: &DevWeight,
        x: u64,
        y: u64,
    ) -> Result<(), CudaError> {
        let xs = dv::<f32>(st, x, w.cols() * w.n_mat());
        let act = dv::<u8>(st, self.sc.act.ptr, 0);
        let mut ys = dv::<f32>(st, y, w.rows() * w.n_mat());
        self.gemv.matvec(st, w, &xs, &act, 1, &mut ys)
    }

    /// Whether the decode step runs layer `l`'s shared expert on the side stream
    /// ([`CudaBackend::shared_side`]): its kernels are the exact ones the main stream would run
    /// (no tensor-core route at one token). `DS4_CUDA_DEC_SHARED_SIDE=0` keeps it on the main
    /// stream.
    fn shared_side_ok(&self, l: &DevLayer) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| env_on("DS4_CUDA_DEC_SHARED_SIDE"));
        let down_cols = l.down_sh.cols() * l.down_sh.n_mat();
        on && self.tc.as_ref().is_none_or(|t| {
            !t.takes_gate_up(&l.gate_sh, &l.up_sh, 1) && !t.takes_matmul(&l.down_sh, 1)
        }) && down_cols == self.s().n_ff_exp
            && Gemv::act_bytes(l.down_sh.ty(), down_cols, 1) <= self.sc.act_sd.bytes
    }

    /// Decode: the shared expert of layer `l` on the side stream, concurrently with the router
    /// and the routed experts on the main stream (the shared expert is bandwidth-bound, the
    /// routed IQ2_XXS gate/up instruction-bound). Reads `b`'s quantization in `act_sh` (the
    /// FFN HC pre wrote it: only when [`CudaBackend::ffn_quant`] is not the default), writes
    /// `sh_mid`, `act_sd` and `sh_out`, none of which the main stream touches before
    /// [`Fwd::join_side`] (the HC post).
    fn shared_side(&self, l: &DevLayer) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let fw = &self.fwd;
        let side = fw.side();
        let (e, ff) = (s.n_embd, s.n_ff_exp);
        fw.fork_side()?;
        let b = dv::<f32>(side, sc.b.ptr, e);
        let act_sh = dv::<u8>(side, sc.act_sh.ptr, sc.act_sh.bytes);
        let mut sh_mid = dv::<f32>(side, sc.sh_mid.ptr, ff);
        self.gemv.gate_up_swiglu(
            side,
            &l.gate_sh,
            &l.up_sh,
            &b,
            &act_sh,
            1,
            l.clamp,
            &mut sh_mid,
        )?;
        let mid_r = dv::<f32>(side, sc.sh_mid.ptr, ff);
        let mut act = dv::<u8>(side, sc.act_sd.ptr, sc.act_sd.bytes);
        let mut out = dv::<f32>(side, sc.sh_out.ptr, e);
        self.gemv
            .matvec_x(side, &l.down_sh, &mid_r, &mut act, 1, &mut out)?;
        fw.side_done()
    }

    /// The quantizations of `b` the FFN HC pre of a decode step writes (see decode_layer): the
    /// routed experts' format into `act`, the shared expert's into `act_sh`; none (default) when
    /// the two formats are the same, the router's input is quantized, a tensor-core route
    /// would read act, or the kernel can't fuse it.
    fn ffn_quant(&self, l: &DevLayer) -> DecQuant {
        let s = self.s();
        let sc = &self.sc;
        let e = s.n_embd;
        let k = s.n_expert_used;
        let none = DecQuant::default();
        if Gemv::act_ptrs(l.router.ty(), e, 0).is_some()
            || l.gate_exps.cols() != e
            || l.gate_sh.cols() != e
            || l.gate_sh.n_mat() != 1
        {
            return none;
        }
        if let Some(tc) = self.tc.as_ref()
            && (tc.takes_moe_gate_up(&l.gate_exps, &l.up_exps, 1, k)
                || tc.takes_gate_up(&l.gate_sh, &l.up_sh, 1))
        {
            return none;
        }
        let (Some(r), Some(h)) = (
            Gemv::act_ptrs(l.gate_exps.ty(), e, sc.act.ptr),
            Gemv::act_ptrs(l.gate_sh.ty(), e, sc.act_sh.ptr),
        ) else {
            return none;
        };
        if r.0 == h.0 || Gemv::act_bytes(l.gate_sh.ty(), e, 1) > sc.act_sh.bytes {
            return none;
        }
        let (qr, qh) = (dec_quant(r.0, r.1, r.2, r.3), dec_quant(h.0, h.1, h.2, h.3));
        let q = DecQuant {
            q0: qr.q0 | qh.q0,
            d0: qr.d0 | qh.d0,
            qk: qr.qk | qh.qk,
            dk: qr.dk | qh.dk,
            bk: qr.bk | qh.bk,
        };
        if q.fits_hc(e) { q } else { none }
    }

    /// The attention launch of layer `l` over its KV state `kvs` (queries in sc.q, output into
    /// sc.heads), shared by the chunk forward and the decode step.
    fn attn_launch(&self, l: &DevLayer, kvs: &DevKv, inv: u64) -> AttnLaunch {
        let s = self.s();
        let sc = &self.sc;
        AttnLaunch {
            q: sc.q.ptr,
            ring: kvs.ring.ptr,
            raw_cap: self.raw_cap,
            window: s.window,
            comp: kvs.comp.ptr,
            ratio: l.attn.ratio(),
            has_indexer: l.idx.is_some(),
            isel: sc.isel.ptr,
            topk: s.index_topk,
            sinks: l.sinks.ptr,
            scale: s.kq_scale(),
            nh: s.n_head,
            hd: s.head_dim,
            n_rot: s.n_rot,
            inv_freq: inv,
            pos: self.d_pos.ptr,
            part: sc.part.ptr,
            heads: sc.heads.ptr,
        }
    }

    /// HC pre of a site (its mix product already in sc.mix).
    /// Router of `n` tokens (logits in `sc.rlog`): expert ids, probabilities and weights.
    fn route(&self, il: usize, l: &DevLayer, n: usize) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let hash = l.moe == MoeKind::Hash;
        if hash && l.tid2eid.is_none() {
            return Err(cerr(format!("layer {il}: hash routing without tid2eid")));
        }
        self.fwd.router(
            sc.rlog.ptr,
            s.n_expert,
            s.n_expert_used,
            hash,
            l.tid2eid.as_ref().map_or(0, |t| t.ptr),
            self.d_tok.ptr,
            l.bias.as_ref().map_or(0, |b| b.ptr),
            s.expert_weights_scale,
            sc.probs.ptr,
            sc.sel.ptr,
            sc.wts.ptr,
            n,
        )
    }

    /// [`CudaBackend::mm`] where `held` tracks what the tensor-core f16 activation scratch
    /// holds (`(x, cols)` of its last prep, None: unknown): an F16 product of the same `x` and
    /// width skips the prep pass (same operands). Every F16 product between the reset of `held`
    /// and its last use goes through here.
    fn mm_held(
        &self,
        w: &DevWeight,
        x: u64,
        n: usize,
        y: u64,
        held: &mut Option<(u64, usize)>,
    ) -> Result<(), CudaError> {
        let cx = w.cols() * w.n_mat();
        match self
            .tc
            .as_ref()
            .filter(|t| w.ty() == GgmlType::F16 && t.takes_matmul(w, n))
        {
            Some(t) => {
                let same = *held == Some((x, cx));
                // SAFETY: x is [n][cols·n_mat] f32, y [n][rows·n_mat]; `same` only where the
                // scratch holds x's prep (held, maintained by every F16 product in between).
                let now = unsafe { t.matmul_f16_reuse(&self.stream, w, x, n, y, same)? };
                if now {
                    *held = Some((x, cx));
                }
                Ok(())
            }
            None => self.mm(w, x, n, y),
        }
    }

    /// Whether a chunk HC post may skip `flat` and leave the factors to the mix product of
    /// `next` ([`Tc::matmul_scaled`]: same values); never while tracing.
    fn flat_scaled(&self, next: &DevWeight, n: usize, tracing: bool) -> bool {
        let s = self.s();
        !tracing
            && n > 1
            && Fwd::hc_post_fast_fits(s.hc_mult, s.n_embd)
            && self
                .tc
                .as_ref()
                .is_some_and(|t| t.takes_matmul_scaled(next, n, &self.stream))
    }

    /// The HC mix product of a chunk site: from `flat`, or (`scaled`, see
    /// [`CudaBackend::flat_scaled`]) from the streams `x` and the norm factors.
    fn mix_mm(&self, w: &DevWeight, x: u64, n: usize, scaled: bool) -> Result<(), CudaError> {
        let sc = &self.sc;
        match self.tc.as_ref().filter(|_| scaled) {
            // SAFETY: x is [n][hc·e] (the HC post's output), fscale [n] its norm factors
            // (written by that HC post), mix [n][rows].
            Some(t) => unsafe { t.matmul_scaled(&self.stream, w, x, sc.fscale.ptr, n, sc.mix.ptr) },
            None => self.mm(w, sc.flat.ptr, n, sc.mix.ptr),
        }
    }

    /// HC pre of a chunk site: on the fast path `xin` (read by nothing in a chunk) is skipped
    /// and, when either of `users` is Q8_0 over `n_embd` columns, `out`'s Q8_0 activations are
    /// written into `sc.act_pre` (returned; see [`CudaBackend::mm_pre`]).
    fn hc_pre_chunk(
        &self,
        hw: &DevHc,
        x: u64,
        norm: u64,
        out: u64,
        n: usize,
        users: [&DevWeight; 2],
    ) -> Result<Option<u64>, CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let e = s.n_embd;
        if !Fwd::hc_pre_fast_fits(s.hc_mult, e) {
            self.hc_pre(hw, x, norm, out, n)?;
            return Ok(None);
        }
        let q = users
            .iter()
            .any(|w| w.ty() == GgmlType::Q8_0 && w.cols() * w.n_mat() == e)
            && Gemv::act_bytes(GgmlType::Q8_0, e, n) <= sc.act_pre.bytes;
        let od = (n * e).div_ceil(256) as u64 * 256;
        let q8 = q.then_some((sc.act_pre.ptr, sc.act_pre.ptr + od));
        self.fwd.hc_pre(
            sc.mix.ptr,
            hw.scale.ptr,
            hw.base.ptr,
            s.hc_mult,
            s.sinkhorn_iters,
            s.hc_eps,
            x,
            e,
            norm,
            s.rms_eps,
            sc.post.ptr,
            sc.comb.ptr,
            0,
            out,
            n,
            q8,
        )?;
        Ok(q.then_some(sc.act_pre.ptr))
    }

    /// `y[t] = W·x[t]` where `pre` (from [`CudaBackend::hc_pre_chunk`]) holds `x`'s Q8_0
    /// activations over `n_embd` columns: a Q8_0 weight of that width reads them instead of
    /// quantizing `x` again (same bytes); anything else is [`CudaBackend::mm`].
    fn mm_pre(
        &self,
        w: &DevWeight,
        x: u64,
        n: usize,
        y: u64,
        pre: Option<u64>,
    ) -> Result<(), CudaError> {
        let e = self.s().n_embd;
        let Some(p) = pre.filter(|_| w.ty() == GgmlType::Q8_0 && w.cols() * w.n_mat() == e) else {
            return self.mm(w, x, n, y);
        };
        let st = &self.stream;
        if let Some(tc) = self.tc.as_ref().filter(|t| t.takes_matmul(w, n)) {
            // SAFETY: p holds x quantized for w (hc_pre_chunk), x is [n][e], y [n][rows·n_mat].
            return unsafe { tc.matmul(st, w, x, p, n, y) };
        }
        let xs = dv::<f32>(st, x, n * e);
        let act = dv::<u8>(st, p, self.sc.act_pre.bytes);
        let mut ys = dv::<f32>(st, y, n * w.rows() * w.n_mat());
        self.gemv.matvec(st, w, &xs, &act, n, &mut ys)
    }

    fn hc_pre(&self, hw: &DevHc, x: u64, norm: u64, out: u64, n: usize) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        self.fwd.hc_pre(
            sc.mix.ptr,
            hw.scale.ptr,
            hw.base.ptr,
            s.hc_mult,
            s.sinkhorn_iters,
            s.hc_eps,
            x,
            s.n_embd,
            norm,
            s.rms_eps,
            sc.post.ptr,
            sc.comb.ptr,
            sc.xin.ptr,
            out,
            n,
            None,
        )
    }

    /// One compressor over the chunk: projections, emission of completed rows, frontier.
    #[allow(clippy::too_many_arguments)]
    fn compressor(
        &self,
        c: &DevComp,
        st_kv: u64,
        st_sc: u64,
        rows: u64,
        ckv: u64,
        csc: u64,
        n: usize,
        qat_kind: i32,
        held: &mut Option<(u64, usize)>,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let g = c.geom;
        self.mm_held(&c.kv, self.sc.a.ptr, n, ckv, held)?;
        self.mm_held(&c.gate, self.sc.a.ptr, n, csc, held)?;
        let cl = CompLaunch {
            ratio: g.ratio,
            overlap: g.overlap,
            d_c: g.d_c,
            n_rot: s.n_rot,
            n_nope: s.n_nope(),
            qat_mode: if self.opts.qat { qat_kind } else { 0 },
            eps: s.rms_eps,
        };
        self.fwd.compressor(
            cl,
            ckv,
            csc,
            c.ape.ptr,
            st_kv,
            st_sc,
            self.d_pos.ptr,
            c.norm.ptr,
            self.inv_comp.ptr,
            rows,
            n,
        )
    }

    /// Lightning indexer: queries, scores and top-k for the chunk's tokens that need it.
    fn indexer(
        &self,
        l: &DevLayer,
        ix: &DevIdx,
        icomp: u64,
        n: usize,
        held: &mut Option<(u64, usize)>,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let nih = s.index_heads;
        let ihd = s.index_head_dim;
        // proj first: it reads `a`, whose f16 prep the compressors may have left.
        self.mm_held(&ix.proj, sc.a.ptr, n, sc.iw.ptr, held)?;
        self.mm_held(&ix.q_b, sc.qrn.ptr, n, sc.iq.ptr, held)?;
        let wscale = 1.0 / ((ihd * nih) as f64).sqrt();
        self.fwd.indexer_q(
            None,
            sc.iq.ptr,
            sc.iw.ptr,
            nih,
            ihd,
            s.n_rot,
            self.inv_comp.ptr,
            self.d_pos.ptr,
            self.opts.qat,
            wscale,
            n,
        )?;
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(self.score_batch);
            self.fwd.indexer_select(
                sc.iq.ptr,
                sc.iw.ptr,
                icomp,
                nih,
                ihd,
                l.attn.ratio(),
                s.index_topk,
                self.d_pos.ptr,
                t0,
                nt,
                sc.scores.ptr,
                self.score_stride,
                self.idx_blocks,
                sc.isel.ptr,
            )?;
            t0 += nt;
        }
        Ok(())
    }

    /// Routed experts (only the selected ones are read) and the shared expert.
    /// `pre_q` (decode only, see [`CudaBackend::ffn_quant`]): `b` is already quantized for the
    /// routed experts in act and for the shared expert in act_sh.
    /// `sh_pre` (chunks): `sc.act_pre` address holding `b`'s Q8_0 activations (see
    /// [`CudaBackend::hc_pre_chunk`]), used for a Q8_0 shared gate / up of `n_embd` columns.
    /// `shared`: run the shared expert here (false: the decode step runs it on the side stream,
    /// [`CudaBackend::shared_side`]).
    fn moe(
        &self,
        l: &DevLayer,
        n: usize,
        pre_q: bool,
        sh_pre: Option<u64>,
        shared: bool,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let st = &self.stream;
        let e = s.n_embd;
        let k = s.n_expert_used;
        let ff = s.n_ff_exp;
        let b = dv::<f32>(st, sc.b.ptr, n * e);
        let mut act = dv::<u8>(st, sc.act.ptr, sc.act.bytes);
        let ids = dv::<i32>(st, sc.sel.ptr, n * k);
        let wts = dv::<f32>(st, sc.wts.ptr, n * k);
        let mut mid = dv::<f32>(st, sc.mid.ptr, n * k * ff);
        if !pre_q {
            self.gemv
                .quantize_act(st, l.gate_exps.ty(), &b, n, e, &mut act)?;
        }
        let act_r = dv::<u8>(st, sc.act.ptr, sc.act.bytes);
        let tc = self.tc.as_ref();
        if let Some(tc) = tc.filter(|t| t.takes_moe_gate_up(&l.gate_exps, &l.up_exps, n, k)) {
            // SAFETY: act holds b quantized for the experts, sel/wts are [n][k], mid [n·k][ff].
            unsafe {
                tc.moe_gate_up(
                    st,
                    &l.gate_exps,
                    &l.up_exps,
                    sc.act.ptr,
                    sc.sel.ptr,
                    sc.wts.ptr,
                    n,
                    k,
                    l.clamp,
                    sc.mid.ptr,
                )?
            };
        } else {
            self.gemv.moe_gate_up(
                st,
                &l.gate_exps,
                &l.up_exps,
                &b,
                &act_r,
                &ids,
                &wts,
                n,
                k,
                l.clamp,
                &mut mid,
            )?;
        }
        let mid_r = dv::<f32>(st, sc.mid.ptr, n * k * ff);
        let mut mid_act = dv::<u8>(st, sc.mid_act.ptr, sc.mid_act.bytes);
        let mut routed = dv::<f32>(st, sc.routed.ptr, n * e);
        if let Some(tc) = tc.filter(|t| t.takes_moe_down(&l.down_exps, n, k)) {
            let ty = l.down_exps.ty();
            self.gemv
                .quantize_act(st, ty, &mid_r, n * k, ff, &mut mid_act)?;
            // SAFETY: mid_act holds mid quantized for down, sel is [n][k], routed [n][e].
            unsafe {
                tc.moe_down(
                    st,
                    &l.down_exps,
                    sc.mid_act.ptr,
                    sc.sel.ptr,
                    n,
                    k,
                    sc.routed.ptr,
                )?
            };
        } else {
            self.gemv.moe_down(
                st,
                &l.down_exps,
                &mid_r,
                &mut mid_act,
                &ids,
                n,
                k,
                &mut routed,
            )?;
        }
        if !shared {
            return Ok(());
        }
        // Shared expert.
        let act_sh = dv::<u8>(st, sc.act_sh.ptr, sc.act_sh.bytes);
        let sh_pre = sh_pre.filter(|_| {
            !pre_q
                && l.gate_sh.ty() == GgmlType::Q8_0
                && l.up_sh.ty() == GgmlType::Q8_0
                && l.gate_sh.cols() == e
                && l.up_sh.cols() == e
        });
        if !pre_q && sh_pre.is_none() {
            self.gemv
                .quantize_act(st, l.gate_sh.ty(), &b, n, e, &mut act)?;
        }
        let act_ptr = sh_pre.unwrap_or(sc.act.ptr);
        let act_r = match sh_pre {
            Some(p) => dv::<u8>(st, p, sc.act_pre.bytes),
            None if pre_q => act_sh,
            None => act_r,
        };
        let mut sh_mid = dv::<f32>(st, sc.sh_mid.ptr, n * ff);
        if let Some(tc) = tc.filter(|t| t.takes_gate_up(&l.gate_sh, &l.up_sh, n)) {
            // SAFETY: act holds b quantized for the shared expert, sh_mid is [n][ff].
            unsafe { tc.gate_up(st, &l.gate_sh, &l.up_sh, act_ptr, n, l.clamp, sc.sh_mid.ptr)? };
        } else {
            self.gemv.gate_up_swiglu(
                st,
                &l.gate_sh,
                &l.up_sh,
                &b,
                &act_r,
                n,
                l.clamp,
                &mut sh_mid,
            )?;
        }
        self.mm(&l.down_sh, sc.sh_mid.ptr, n, sc.sh_out.ptr)
    }

    fn trace_layer(&self, tr: &mut Trace, il: usize, n: usize) -> Result<(), CudaError> {
        let s = self.s();
        let k = s.n_expert_used;
        let mut sel = vec![0i32; n * k];
        dtoh(&self.stream, &mut sel, self.sc.sel.ptr)?;
        for t in 0..n {
            let mut v: Vec<u32> = sel[t * k..(t + 1) * k].iter().map(|&e| e as u32).collect();
            v.sort_unstable();
            tr.experts[il].extend_from_slice(&v);
        }
        let hcd = s.hc_dim();
        let mut last = vec![0f32; hcd];
        dtoh(&self.stream, &mut last, self.sc.x.f((n - 1) * hcd))?;
        tr.last_hidden[il] = last;
        let sc = &self.sc;
        let mut probes = Vec::new();
        for (name, d) in ds4_model::backend::probe_dims(s) {
            let buf = match name {
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
            let mut v = vec![0f32; d];
            dtoh(&self.stream, &mut v, buf.f((n - 1) * d))?;
            probes.push((name.to_string(), v));
        }
        tr.probes[il] = probes;
        Ok(())
    }

    fn trace_indexer(
        &self,
        tr: &mut Trace,
        il: usize,
        n: usize,
        active: bool,
    ) -> Result<(), CudaError> {
        let s = self.s();
        let topk = s.index_topk;
        let ratio = self.layers[il].attn.ratio();
        let mut isel = vec![0i32; n * topk];
        if active {
            dtoh(&self.stream, &mut isel, self.sc.isel.ptr)?;
        }
        let pos0 = self.n_tokens;
        for t in 0..n {
            let nv = (pos0 + t + 1) / ratio;
            if nv > topk {
                tr.indexer[il].extend_from_slice(&isel[t * topk..(t + 1) * topk]);
            } else {
                for j in 0..topk {
                    tr.indexer[il].push(if j < nv { j as i32 } else { -1 });
                }
            }
        }
        Ok(())
    }

    /// Copy the last graph step's logits into `h_logits` where that step left them on the
    /// device (`device_pick`); nothing otherwise. `sc.logits` holds them until the next
    /// evaluation, which needs `&mut self`.
    fn fetch_logits(&self) -> Result<(), CudaError> {
        if !self.logits_on_device.get() {
            return Ok(());
        }
        // SAFETY: `logits_on_device` is set only by a graph step (`&mut self`), so every slice
        // of `h_logits` handed out before it has ended; the first read after it comes here,
        // copies before making any slice and clears the flag, so no later call writes while a
        // slice made after the copy is alive.
        unsafe {
            crate::rt::dtoh_pinned_shared::<f32>(
                &self.stream,
                &self.h_logits,
                self.s().n_vocab,
                self.sc.logits.ptr,
            )
        }?;
        self.logits_on_device.set(false);
        Ok(())
    }

    /// Capture the one-token decode step (`indexer`: with the indexer scoring) as a CUDA graph:
    /// the token copied in from `h_tok`, the forward pass, then the greedy pick copied out to
    /// `h_pick` (`device_pick`; the logits stay on the device) or the logits to `h_logits`.
    fn capture_decode(&mut self, indexer: bool) -> Result<CudaGraph, CudaError> {
        let v = self.s().n_vocab;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(crate::rt::drv)?;
        let diag = crate::rt::DiagCapture::start();
        let pick_out = self.d_pick.ptr + crate::fwd::PICK_PART_BYTES as u64;
        let r = htod_pinned::<i32>(&self.stream, self.d_tok.ptr, &self.h_tok, 1)
            .and_then(|()| self.forward(1, indexer, Some(0), None))
            .and_then(|()| {
                if self.device_pick {
                    self.fwd
                        .argmax_pick(self.sc.logits.ptr, v, self.d_pick.ptr, pick_out)?;
                    dtoh_pinned::<i32>(&self.stream, &mut self.h_pick, 4, pick_out)
                } else {
                    dtoh_pinned::<f32>(&self.stream, &mut self.h_logits, v, self.sc.logits.ptr)
                }
            });
        drop(diag);
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(crate::rt::drv);
        r?;
        let g = g?.ok_or_else(|| cerr("graph capture produced no graph"))?;
        g.upload().map_err(crate::rt::drv)?;
        Ok(g)
    }

    /// Evaluate one sub-chunk (≤ max_chunk tokens).
    fn eval_sub(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        want_last: bool,
    ) -> Result<(), CudaError> {
        let n = tokens.len();
        let v = self.s().n_vocab;
        let pend = self.n_tokens + n;
        let indexer = self.indexer_active(pend);
        if n == 1 && self.opts.graphs && self.trace.is_none() {
            // The graph copies the token in from pinned memory and its greedy pick (or, with
            // `DS4_CUDA_GREEDY_PICK=0`, the logits) out to pinned memory: no pageable copies,
            // no separate copy calls around the replay.
            self.h_tok.slice_mut::<i32>(1)[0] = tokens[0] as i32;
            let gi = indexer as usize;
            if self.graphs.0[gi].is_none() {
                let graph = self.capture_decode(indexer)?;
                self.graphs.0[gi] = Some(graph);
                // The other variant now too, where this context can reach it (the one with the
                // indexer scoring only where some layer's indexer can activate): the graphs do
                // not depend on the position, and capturing it later would stall generation
                // for tens of ms when the context first crosses the indexer's threshold. Not
                // fatal here: a failure surfaces when that variant is needed.
                let other = !indexer;
                if self.graphs.0[other as usize].is_none()
                    && (!other || self.indexer_active(self.ctx_len))
                    && let Ok(g) = self.capture_decode(other)
                {
                    self.graphs.0[other as usize] = Some(g);
                }
            }
            let t0 = std::time::Instant::now();
            if let Some(t) = &self.step_timing {
                t.start.record(&self.stream).map_err(crate::rt::drv)?;
            }
            let run = || -> Result<(), CudaError> {
                if let Some(g) = &self.graphs.0[gi] {
                    g.launch().map_err(crate::rt::drv)?;
                }
                if let Some(t) = &self.step_timing {
                    t.end.record(&self.stream).map_err(crate::rt::drv)?;
                }
                self.stream.synchronize().map_err(crate::rt::drv)
            };
            if let Err(e) = run() {
                // Never leave a replay running that still reads h_tok or writes h_logits.
                let _ = self.stream.synchronize();
                self.logits.clear();
                self.logits_pinned = false;
                self.logits_on_device.set(false);
                return Err(e);
            }
            self.graph_launches += 1;
            self.logits_pinned = true;
            self.logits_on_device.set(self.device_pick);
            if all_logits {
                self.fetch_logits()?;
                self.chunk_logits
                    .extend_from_slice(self.h_logits.slice::<f32>(v));
            }
            self.n_tokens += 1;
            if let Some(t) = &mut self.step_timing {
                t.wall_s += t0.elapsed().as_secs_f64();
                t.gpu_ms += t.start.elapsed_ms(&t.end).map_err(crate::rt::drv)? as f64;
                t.steps += 1;
            }
            return Ok(());
        }
        // This pass overwrites sc.logits: the last graph step's pick and logits are gone.
        self.logits_pinned = false;
        self.logits_on_device.set(false);
        let toks: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        htod(&self.stream, self.d_tok.ptr, &toks)?;
        let mut trace = self.trace.take();
        let lfirst = if all_logits { 0 } else { n - 1 };
        let first_pass_rows = n - lfirst;
        let direct = first_pass_rows <= LOGIT_ROWS.min(self.max_chunk);
        let r = self.forward(
            n,
            indexer,
            (want_last && direct).then_some(lfirst),
            trace.as_mut(),
        );
        if let Some(tr) = &mut trace {
            tr.n_tokens += n;
        }
        self.trace = trace;
        r?;
        self.n_tokens += n;
        if !want_last {
            return Ok(());
        }
        if direct {
            let rows = n - lfirst;
            let mut buf = vec![0f32; rows * v];
            dtoh(&self.stream, &mut buf, self.sc.logits.ptr)?;
            if all_logits {
                self.chunk_logits.extend_from_slice(&buf);
            }
            self.logits.clear();
            self.logits.extend_from_slice(&buf[(rows - 1) * v..]);
            self.logits_pinned = false;
        } else {
            // All logits of a chunk longer than the logits buffer: output head in passes.
            let mut t0 = 0;
            while t0 < n {
                let nl = (n - t0).min(LOGIT_ROWS.min(self.max_chunk));
                self.output_head(t0, nl)?;
                let mut buf = vec![0f32; nl * v];
                dtoh(&self.stream, &mut buf, self.sc.logits.ptr)?;
                self.chunk_logits.extend_from_slice(&buf);
                t0 += nl;
            }
            self.logits.clear();
            self.logits
                .extend_from_slice(&self.chunk_logits[self.chunk_logits.len() - v..]);
            self.logits_pinned = false;
        }
        Ok(())
    }

    /// Output head for chunk tokens `first..first+nl` (after `forward` left the final HC
    /// streams in sc.x and their norm in sc.flat) into `sc.logits`.
    fn output_head(&self, first: usize, nl: usize) -> Result<(), CudaError> {
        let s = self.s();
        let sc = &self.sc;
        let hcd = s.hc_dim();
        self.mm(&self.out_hc_fn, sc.flat.f(first * hcd), nl, sc.hmix.ptr)?;
        if nl == 1 {
            self.fwd.hc_head_dec(
                sc.hmix.ptr,
                self.model.weights.out_hc_scale,
                self.out_hc_base.ptr,
                s.hc_eps,
                sc.x.f(first * hcd),
                s.hc_mult,
                s.n_embd,
                self.out_norm.ptr,
                s.rms_eps,
                sc.hn.ptr,
            )?;
            return self.mm(&self.output, sc.hn.ptr, nl, sc.logits.ptr);
        }
        self.fwd.hc_head(
            sc.hmix.ptr,
            self.model.weights.out_hc_scale,
            self.out_hc_base.ptr,
            s.hc_eps,
            sc.x.f(first * hcd),
            s.hc_mult,
            s.n_embd,
            self.out_norm.ptr,
            s.rms_eps,
            sc.hn.ptr,
            nl,
        )?;
        self.mm(&self.output, sc.hn.ptr, nl, sc.logits.ptr)
    }

    fn eval_impl(&mut self, tokens: &[u32], all_logits: bool) -> Result<(), ModelError> {
        let s = self.s();
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
        if pos0 + n > self.ctx_len {
            return Err(ModelError::ContextFull {
                ctx: self.ctx_len,
                needed: pos0 + n,
            });
        }
        if let Some(e) = self.fetch_error.take() {
            return Err(merr(e));
        }
        self.chunk_logits.clear();
        let nchunks = n.div_ceil(self.max_chunk);
        for (ci, chunk) in tokens.chunks(self.max_chunk).enumerate() {
            let last = ci + 1 == nchunks;
            self.eval_sub(chunk, all_logits, all_logits || last)
                .map_err(merr)?;
        }
        if !all_logits {
            self.chunk_logits.clear();
        }
        Ok(())
    }

    fn set_pos(&mut self, p: usize) -> Result<(), CudaError> {
        htod(&self.stream, self.d_pos.ptr, &[p as i32])?;
        self.stream.synchronize().map_err(crate::rt::drv)
    }

    fn clear_frontiers(&self) -> Result<(), CudaError> {
        for kv in &self.kv {
            for (k, sc) in [(&kv.st_kv, &kv.st_sc), (&kv.ist_kv, &kv.ist_sc)] {
                if let (Some(k), Some(sc)) = (k, sc) {
                    htod(&self.stream, k.ptr, &vec![0f32; k.bytes / 4])?;
                    htod(&self.stream, sc.ptr, &vec![EMPTY_SCORE; sc.bytes / 4])?;
                }
            }
        }
        Ok(())
    }

    fn export_impl(&self) -> Result<KvState, CudaError> {
        let s = self.s();
        let hd = s.head_dim;
        let ihd = s.index_head_dim;
        let t = self.n_tokens;
        let rl = t.min(s.window);
        self.stream.synchronize().map_err(crate::rt::drv)?;
        let mut layers = Vec::with_capacity(s.n_layer);
        for (kv, l) in self.kv.iter().zip(&self.layers) {
            let mut raw = vec![0f32; rl * hd];
            for (i, p) in (t - rl..t).enumerate() {
                let r = p % self.raw_cap;
                dtoh(
                    &self.stream,
                    &mut raw[i * hd..(i + 1) * hd],
                    kv.ring.f(r * hd),
                )?;
            }
            let ratio = l.attn.ratio();
            let n_comp = t.checked_div(ratio).unwrap_or(0);
            let get = |b: &Option<DBuf>, len: usize| -> Result<Vec<f32>, CudaError> {
                match b {
                    Some(b) => {
                        let mut v = vec![0f32; len];
                        dtoh(&self.stream, &mut v, b.ptr)?;
                        Ok(v)
                    }
                    None => Ok(Vec::new()),
                }
            };
            let comp = if ratio > 0 {
                let mut v = vec![0f32; n_comp * hd];
                dtoh(&self.stream, &mut v, kv.comp.ptr)?;
                v
            } else {
                Vec::new()
            };
            let sl = attn_geom(s, l.attn).map_or(0, |g| g.state_len());
            let isl = index_geom(s, l.attn).map_or(0, |g| g.state_len());
            layers.push(LayerState {
                raw,
                comp,
                state_kv: get(&kv.st_kv, sl)?,
                state_score: get(&kv.st_sc, sl)?,
                index_comp: if kv.icomp.is_some() {
                    get(&kv.icomp, n_comp * ihd)?
                } else {
                    Vec::new()
                },
                index_state_kv: get(&kv.ist_kv, isl)?,
                index_state_score: get(&kv.ist_sc, isl)?,
            });
        }
        Ok(KvState {
            n_tokens: t,
            layers,
        })
    }

    fn import_impl(&mut self, st: &KvState) -> Result<(), CudaError> {
        let s = self.s().clone();
        let hd = s.head_dim;
        let t = st.n_tokens;
        let rl = t.min(s.window);
        for (kv, ls) in self.kv.iter().zip(&st.layers) {
            for (i, p) in (t - rl..t).enumerate() {
                let r = p % self.raw_cap;
                htod(
                    &self.stream,
                    kv.ring.f(r * hd),
                    &ls.raw[i * hd..(i + 1) * hd],
                )?;
            }
            let put = |b: &Option<DBuf>, v: &[f32]| -> Result<(), CudaError> {
                match b {
                    Some(b) if v.len() * 4 <= b.bytes => htod(&self.stream, b.ptr, v),
                    Some(_) => Err(cerr("state larger than the device buffer")),
                    None if v.is_empty() => Ok(()),
                    None => Err(cerr("state for a buffer this layer does not have")),
                }
            };
            if ls.comp.len() * 4 > kv.comp.bytes {
                return Err(cerr("compressed rows exceed the context"));
            }
            htod(&self.stream, kv.comp.ptr, &ls.comp)?;
            put(&kv.st_kv, &ls.state_kv)?;
            put(&kv.st_sc, &ls.state_score)?;
            put(&kv.icomp, &ls.index_comp)?;
            put(&kv.ist_kv, &ls.index_state_kv)?;
            put(&kv.ist_sc, &ls.index_state_score)?;
        }
        self.n_tokens = t;
        self.set_pos(t)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn shape(&self) -> &Shape {
        &self.model.shape
    }

    fn ctx(&self) -> usize {
        self.ctx_len
    }

    fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    fn reset(&mut self) {
        self.n_tokens = 0;
        self.logits.clear();
        self.logits_pinned = false;
        self.chunk_logits.clear();
        // A failure here leaves a broken device; the next eval reports it.
        let _ = self.clear_frontiers();
        let _ = self.set_pos(0);
    }

    fn eval(&mut self, tokens: &[u32], all_logits: bool) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.eval_impl(tokens, all_logits)
    }

    fn logits(&self) -> &[f32] {
        if self.logits_pinned {
            if let Err(e) = self.fetch_logits() {
                // The device failed: no logits now, and the next evaluation fails with it.
                eprintln!("ds4-cuda: cannot copy the logits: {e}");
                *self.fetch_error.borrow_mut() = Some(e);
                return &[];
            }
            self.h_logits.slice::<f32>(self.s().n_vocab)
        } else {
            &self.logits
        }
    }

    fn greedy_pick(&self) -> Option<[u32; 2]> {
        if !(self.logits_pinned && self.device_pick) {
            return None;
        }
        let p = self.h_pick.slice::<i32>(4);
        (p[2] == 0).then_some([p[0] as u32, p[1] as u32])
    }

    fn chunk_logits(&self) -> &[f32] {
        &self.chunk_logits
    }

    fn export_state(&self) -> Result<KvState, ModelError> {
        self.export_impl().map_err(merr)
    }

    fn import_state(&mut self, state: &KvState) -> Result<(), ModelError> {
        let m = self.model.clone();
        state.validate(&m.shape, &m.plan)?;
        if state.n_tokens > self.ctx_len {
            return Err(ModelError::ContextFull {
                ctx: self.ctx_len,
                needed: state.n_tokens,
            });
        }
        self.logits.clear();
        self.logits_pinned = false;
        self.chunk_logits.clear();
        self.import_impl(state).map_err(merr)
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
