//! Launch wrappers of the `fwd.cu` kernels (the backend and the op tests share them, so the
//! argument conventions live in one place). Every pointer is a raw device address; `pos` is
//! the address of the device `i32` holding the first position of the chunk.

#![allow(clippy::too_many_arguments)]

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig};

use crate::CudaError;
use crate::rt::{A, DBuf, launch};

/// Heads per attention block (one warp each).
pub(crate) const ATT_HPB: usize = 8;
/// Threads per block of the HC kernels (one block per token): decode runs one token, so the
/// block must be wide to keep the HBM loads of the 4 streams in flight.
const HC_THREADS: usize = 1024;
/// Chunk fast paths of fwd.cu (`ds4_hc_pre_fast`, `ds4_hc_post_fast`): threads per block,
/// float4 columns per thread (FP_U) and tokens per `ds4_hc_pre_fast` block (FP_TOK).
const FP_T: usize = 256;
const FP_U: usize = 4;
const FP_TOK: usize = 8;

/// Every non-null address 16-byte aligned (float4 access).
fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|&p| p % 16 == 0)
}
/// Target blocks for split attention (about two waves of a 132-SM card).
pub(crate) const ATT_TARGET_BLOCKS: usize = 264;
/// Most splits of one (token, head) attention.
pub(crate) const ATT_MAX_SPLIT: usize = 16;
/// Rows of one indexer scoring tile (IDX_TILE in fwd.cu).
pub(crate) const IDX_TILE: usize = 8;

/// Splits of the attention of a chunk of `n` tokens (1: no combine pass).
pub(crate) fn attn_splits(n: usize, nh: usize) -> usize {
    let base = n * nh.div_ceil(ATT_HPB);
    if base >= ATT_TARGET_BLOCKS / 2 {
        1
    } else {
        ATT_TARGET_BLOCKS.div_ceil(base).clamp(1, ATT_MAX_SPLIT)
    }
}

/// Dynamic shared memory of `ds4_indexer_scores`.
pub(crate) fn indexer_smem(nih: usize, ihd: usize) -> usize {
    IDX_TILE * nih * 8 + (nih * (ihd + 1) + nih + IDX_TILE * ihd) * 4
}

/// Rows of one `ds4_indexer_scores4` tile (IDX4_TILE in fwd.cu).
pub(crate) const IDX4_TILE: usize = 16;

/// Whether the exact register-blocked indexer scoring kernel fits this indexer shape.
pub(crate) fn indexer4_fits(nih: usize, ihd: usize) -> bool {
    nih.is_multiple_of(8) && nih * 4 <= 256 && ihd.is_multiple_of(4) && ihd <= 128
}

/// Dynamic shared memory of `ds4_indexer_scores4`.
pub(crate) fn indexer4_smem(nih: usize, ihd: usize) -> usize {
    (IDX4_TILE * 4 * (ihd / 4 + 2) + IDX4_TILE * nih) * 8
}

/// Heads and head dim of the FP64 tensor-core indexer kernels (IDXM_NIH, IDXM_IHD in fwd.cu).
const IDXM_NIH: usize = 64;
const IDXM_IHD: usize = 128;
/// Token batches up to this size use the 32-row tiles (`Mma32`, decode), larger ones the int8
/// path or `Mma2x64` (see [`IdxKernel::Auto`]).
const IDXM_SMALL_BATCH: usize = 8;

/// Whether the FP64 tensor-core indexer kernels (`ds4_indexer_mma32/128`) fit this shape.
pub(crate) fn indexer_mma_fits(nih: usize, ihd: usize) -> bool {
    nih == IDXM_NIH && ihd == IDXM_IHD
}

/// Dynamic shared memory of an FP64 tensor-core indexer kernel with `tpb` tokens per block and
/// row tiles of `rows`.
pub(crate) fn indexer_mma_smem(tpb: usize, rows: usize) -> usize {
    ((tpb * IDXM_NIH + rows) * (IDXM_IHD + 4) + 2 * tpb * rows) * 8
}

/// Which kernel scores the indexer rows (the op tests and benches pick one; the backend uses
/// `Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdxKernel {
    /// The tensor-core kernels where the shape fits: `Mma32` for ≤ 8 tokens, else `Int8` when
    /// [`Fwd::reserve_idx8`] made room for the batch (the backend does with QAT on, unless
    /// `DS4_CUDA_IDX_KERNEL=f64`), else `Mma2x64`; where they do not fit, the register-blocked
    /// scalar kernel, else the generic one.
    Auto,
    /// `ds4_indexer_scores4` (f64 FMA on the CUDA cores, the CPU's exact summation order).
    Scalar4,
    /// `ds4_indexer_mma32` (FP64 tensor cores, 32-row tiles).
    Mma32,
    /// `ds4_indexer_mma128` (FP64 tensor cores, 128-row tiles).
    Mma128,
    /// `ds4_indexer_mma2x64` (FP64 tensor cores, two tokens per block, 64-row tiles).
    Mma2x64,
    /// `ds4_idx8_prep` + `ds4_indexer_i8` (int8 tensor cores on the exact int8·2^e form of the
    /// QAT operands, same geometry and head-sum order as `Mma2x64`, bit-identical to it) +
    /// `ds4_indexer_mma2x64_fb` (the FP64 kernel, run only when some row is not of that form).
    /// Needs [`Fwd::reserve_idx8`] room for the batch, else it is `Mma2x64`.
    Int8,
}

/// Blocks of `ds4_idx8_prep` (one flag each; IDX8_SLOTS in fwd.cu).
pub(crate) const IDX8_SLOTS: usize = 1024;

/// `DS4_CUDA_IDX_KERNEL=f64`: chunks score on `ds4_indexer_mma2x64` (the FP64 tensor cores)
/// instead of the int8 path ([`IdxKernel::Int8`]).
pub(crate) fn idx_kernel_f64() -> bool {
    static F64: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F64.get_or_init(|| std::env::var("DS4_CUDA_IDX_KERNEL").is_ok_and(|v| v == "f64"))
}

/// Scratch of the int8 indexer path: query codes `[tokens][64][128]` i8, their exponents
/// `[tokens][64]` i32, compressed-row codes `[rows][128]` i8, row scales `[rows]` f64
/// (2^e), and the IDX8_SLOTS prep flags.
struct Idx8Buf {
    tokens: usize,
    rows: usize,
    q8: DBuf,
    qe: DBuf,
    k8: DBuf,
    ks: DBuf,
    slots: DBuf,
}

/// Blocks (one thread-block cluster) and threads per block of the decode HC kernels (CL and
/// CL_T in fwd.cu).
const DEC_HC_BLOCKS: usize = 8;
const DEC_HC_THREADS: usize = 512;
/// `ds4_hc_mix_part`: mix rows (hc = 4), columns and threads per block (HCM_NM, HCP_COLS,
/// HCP_T in fwd.cu), and the most blocks (hc·e ≤ 4 · the cluster's element capacity).
const HCM_ROWS: usize = 24;
const HCP_COLS: usize = 128;
const HCP_T: usize = 128;
const HCM_MAX_PARTS: usize = 4 * DEC_HC_BLOCKS * DEC_HC_THREADS * 4 / HCP_COLS;
/// `ds4_hc_post_wide`: threads (elements) per block (HPW_T in fwd.cu) and the most blocks.
const HPW_T: usize = 128;
const HPW_MAX_PARTS: usize = DEC_HC_BLOCKS * DEC_HC_THREADS * 4 / HPW_T;
/// `ds4_hc_pre_mix_red`: threads (elements) per block and element steps per thread (HCR_T,
/// HCR_EPT in fwd.cu).
const HCR_T: usize = 512;
const HCR_EPT: usize = 8;

/// Device addresses of an activation quantization fused into a decode kernel (0 = that format
/// is not written): Q8_0 (`q0` qs, `d0` scales) and Q8_K (`qk` qs, `dk` scales, `bk` bsums), in
/// the one-row layouts of the GEMV activations (`Gemv::act_ptrs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecQuant {
    pub q0: u64,
    pub d0: u64,
    pub qk: u64,
    pub dk: u64,
    pub bk: u64,
}

impl DecQuant {
    /// Whether a cluster HC kernel can quantize `e` values (every value in registers, whole
    /// warps / 256-groups).
    pub fn fits_hc(&self, e: usize) -> bool {
        let on0 = self.q0 != 0;
        let onk = self.qk != 0;
        if !on0 && !onk {
            return true;
        }
        e <= DEC_HC_BLOCKS * DEC_HC_THREADS * 4
            && (!on0 || e.is_multiple_of(32))
            && (!onk || e.is_multiple_of(256))
    }
}
/// Threads of `ds4_qkv_dec`.
const QKV_DEC_THREADS: usize = 512;
/// Row chunks of `ds4_attn_dec_scores` (its grid is fixed when a decode step is captured):
/// 48 chunks × 8 head groups of Flash's 64 heads fill 132 SMs × 3 blocks in one wave.
const ATT_DEC_CHUNKS: usize = 48;
/// Row splits of `ds4_attn_dec_out` (added up by the last split block of each head group).
const ATT_DEC_SPLITS: usize = 4;
/// The most chunks / splits the buffers hold (`DS4_CUDA_ATT_CHUNKS`, `DS4_CUDA_ATT_SPLITS`
/// choose others than the defaults above: tuning switches).
const ATT_DEC_CHUNKS_MAX: usize = 128;
const ATT_DEC_SPLITS_MAX: usize = 16;

/// A tuning switch `name` (1..=max), or `default` (said on stderr when the value is not one).
fn tune_env(name: &str, default: usize, max: usize) -> usize {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => {
            eprintln!("ds4-cuda: {name}={n} (tuning switch; default {default})");
            n
        }
        _ => {
            eprintln!("ds4-cuda: {name}={v:?} is not in 1..={max}: using {default}");
            default
        }
    }
}

/// Row chunks of `ds4_attn_dec_scores` in use.
fn att_chunks() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| tune_env("DS4_CUDA_ATT_CHUNKS", ATT_DEC_CHUNKS, ATT_DEC_CHUNKS_MAX))
}

/// Row splits of `ds4_attn_dec_out` in use.
fn att_dec_splits() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| tune_env("DS4_CUDA_ATT_SPLITS", ATT_DEC_SPLITS, ATT_DEC_SPLITS_MAX))
}
/// Heads per block of `ds4_attn_dec_out` (ATT_DEC_HPB in fwd.cu).
const ATT_DEC_HPB: usize = 8;
/// Heads per block of `ds4_attn_dec_scores` (ATS_H in fwd.cu).
const ATT_SCORES_HPB: usize = 8;
/// Threads of `ds4_attn_dec_scores` (ATS_WARPS warps).
const ATT_SCORES_THREADS: usize = 128;
/// First counter of `ds4_attn_dec_out` (one per head group and 64-dim slice).
const CTR_ATT: usize = 64;
/// The counter of `ds4_argmax_pick`.
const CTR_PICK: usize = 0;
/// Blocks of `ds4_argmax_pick` (at most 64: its last block merges them with one warp).
pub(crate) const PICK_BLOCKS: usize = 32;
/// Bytes of the `ds4_argmax_pick` scratch: a 16-byte record and a NaN flag per block.
pub(crate) const PICK_PART_BYTES: usize = PICK_BLOCKS * 20;
/// Counters (u32) of the "last block" kernels (each kernel its own slots; launches on one
/// stream never overlap, and the last block resets its counter to 0).
const DEC_COUNTERS: usize = 256;

/// Whether the single-token attention kernels cover this head size.
pub(crate) fn attn_dec_fits(hd: usize) -> bool {
    hd.is_multiple_of(64) && hd <= 32 * 16
}

/// Bytes of the decode attention buffers for `nh` heads of `hd` and a score row stride of
/// `stride` doubles: `(scores + chunk maxima, split partials)`.
pub(crate) fn attn_dec_bytes(nh: usize, hd: usize, stride: usize) -> (usize, usize) {
    (
        nh * (stride + ATT_DEC_CHUNKS_MAX) * 8,
        nh * ATT_DEC_SPLITS_MAX * (hd + 8) * 8,
    )
}

/// Doubles per head of the decode attention score buffer for a context of `ctx` tokens:
/// the raw window plus the most compressed rows any layer attends to.
pub(crate) fn attn_dec_stride(
    window: usize,
    ctx: usize,
    layers: &[(usize, bool)],
    topk: usize,
) -> usize {
    let comp = layers
        .iter()
        .filter(|(r, _)| *r > 0)
        .map(|&(r, idx)| {
            let nv = ctx / r + 1;
            if idx { nv.min(topk) } else { nv }
        })
        .max()
        .unwrap_or(0);
    (window + comp + 1).next_multiple_of(4)
}

/// One compressor of [`QkvDec`] (fwd.cu `CompDec`; every field 8 bytes). `ratio` 0: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CompDec {
    pub ckv: u64,
    pub csc: u64,
    pub ape: u64,
    pub st_kv: u64,
    pub st_sc: u64,
    pub norm: u64,
    pub rows: u64,
    pub ratio: i64,
    pub overlap: i64,
    pub d_c: i64,
    pub qat_mode: i64,
}

/// The argument of `ds4_qkv_dec` (fwd.cu `QkvDec`, same field order; every field 8 bytes):
/// the q heads, the KV row, both compressors and the indexer queries of one decode token.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QkvDec {
    pub pos: u64,
    pub q: u64,
    pub inv: u64,
    pub nh: i64,
    pub hd: i64,
    pub n_rot: i64,
    pub eps: f64,
    pub kvp: u64,
    pub kv_w: u64,
    pub ring: u64,
    pub raw_cap: i64,
    pub qat: i64,
    pub n_nope: i64,
    pub comp: [CompDec; 2],
    pub inv_comp: u64,
    pub iq: u64,
    pub iw: u64,
    pub nih: i64,
    pub ihd: i64,
    pub iqat: i64,
    pub wscale: f64,
}

const _: () = assert!(std::mem::size_of::<CompDec>() == 88);
const _: () = assert!(std::mem::size_of::<QkvDec>() == 336);

/// Most steering slots of one `ds4_dir_steer` launch (STEER_MAX in fwd.cu).
pub(crate) const STEER_MAX: usize = 8;
/// Threads of `ds4_dir_steer` (STEER_T in fwd.cu): the lanes of its dot product, which
/// `ds4_model::ops::steer_dot` reproduces.
const STEER_T: usize = 256;
const _: () = assert!(STEER_T == ds4_model::ops::STEER_LANES);
const _: () = assert!(STEER_MAX >= ds4_model::steer::MAX_SLOTS);

/// The argument of `ds4_dir_steer` (fwd.cu `SteerArgs`, same field order; every field 8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SteerArgs {
    y: u64,
    f: u64,
    routed: u64,
    e: i64,
    nslot: i64,
    dir: [u64; STEER_MAX],
    scale: [f64; STEER_MAX],
}

const _: () = assert!(std::mem::size_of::<SteerArgs>() == 40 + 16 * STEER_MAX);

pub(crate) fn cerr(msg: impl Into<String>) -> CudaError {
    CudaError::Driver(msg.into())
}

/// The kernels of `fwd.cu` and the stream they run on.
pub(crate) struct Fwd {
    pub stream: Arc<CudaStream>,
    advance_pos: CudaFunction,
    embed: CudaFunction,
    rms_rows: CudaFunction,
    rms_rows_warp: CudaFunction,
    hc_pre: CudaFunction,
    hc_post: CudaFunction,
    hc_pre_fast: CudaFunction,
    hc_post_fast: CudaFunction,
    head_norm_rope_fast: CudaFunction,
    hc_head: CudaFunction,
    head_norm_rope: CudaFunction,
    kv_finish: CudaFunction,
    comp_emit: CudaFunction,
    comp_frontier: CudaFunction,
    indexer_q: CudaFunction,
    indexer_q_warp: CudaFunction,
    indexer_scores: CudaFunction,
    topk: CudaFunction,
    attention: CudaFunction,
    attn_combine: CudaFunction,
    router: CudaFunction,
    swiglu: CudaFunction,
    hc_pre_dec: CudaFunction,
    hc_post_dec: CudaFunction,
    hc_head_dec: CudaFunction,
    qkv_dec: CudaFunction,
    attn_dec_scores: CudaFunction,
    attn_dec_out: CudaFunction,
    indexer_scores4: CudaFunction,
    indexer_mma32: CudaFunction,
    indexer_mma128: CudaFunction,
    indexer_mma2x64: CudaFunction,
    indexer_mma2x64_fb: CudaFunction,
    idx8_prep: CudaFunction,
    /// `ds4_indexer_i8`, `_b3`, `_bl`, `_b3bl` (2 / 3 blocks per SM, branch / select epilogue).
    indexer_i8: [CudaFunction; 4],
    /// Which of them [`IdxKernel::Int8`] launches (`DS4_CUDA_IDX8_VARIANT`, default 2:
    /// `_bl`, the fastest on an H200, see bench/results/h200/indexer-int8-s8.md).
    idx8_variant: std::sync::atomic::AtomicUsize,
    /// Int8 indexer scratch ([`Fwd::reserve_idx8`]).
    idx8: Mutex<Option<Idx8Buf>>,
    hc_split_dec: CudaFunction,
    rms_q8_dec: CudaFunction,
    hc_pre_mix_dec: CudaFunction,
    /// `ds4_hc_pre_mix_red`: the same without a cluster (independent blocks, each forming the
    /// whole collapse for the norm); launched instead where it fits unless
    /// `DS4_CUDA_HC_PRE_RED=0`.
    hc_pre_mix_red: CudaFunction,
    /// Whether [`Fwd::hc_pre_mix_dec`] may launch `hc_pre_mix_red` (tests select each kernel).
    hc_pre_red_on: std::sync::atomic::AtomicBool,
    hc_mix_part: CudaFunction,
    hc_post_wide: CudaFunction,
    dir_steer: CudaFunction,
    argmax_pick: CudaFunction,
    /// Side stream of the decode step (the HC split, the compressor / indexer projections and
    /// the shared expert run there, off the critical path; see the backend's `decode_layer`)
    /// and the events that fork it from and join it back into `stream`.
    side: Arc<CudaStream>,
    ev_fork: CudaEvent,
    ev_join: CudaEvent,
    /// DEC_COUNTERS u32 counters (zero between launches).
    dec: DBuf,
    /// Partial sums of the decode HC mix product (`ds4_hc_mix_part`: HCM_ROWS f64 per block).
    mixp: DBuf,
    /// Block partials of Σ xo² from `ds4_hc_post_wide` (f64 per block).
    ssp: DBuf,
}

/// Geometry of a compressor launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CompLaunch {
    pub ratio: usize,
    pub overlap: bool,
    pub d_c: usize,
    pub n_rot: usize,
    pub n_nope: usize,
    /// 0 none, 1 FP8 (attention rows), 2 Hadamard+FP4 (indexer rows).
    pub qat_mode: i32,
    pub eps: f32,
}

/// Arguments of an attention launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnLaunch {
    pub q: u64,
    pub ring: u64,
    pub raw_cap: usize,
    pub window: usize,
    pub comp: u64,
    pub ratio: usize,
    pub has_indexer: bool,
    pub isel: u64,
    pub topk: usize,
    pub sinks: u64,
    pub scale: f32,
    pub nh: usize,
    pub hd: usize,
    pub n_rot: usize,
    pub inv_freq: u64,
    pub pos: u64,
    pub part: u64,
    pub heads: u64,
}

/// Allow `f` `smem` bytes of dynamic shared memory (above the 48 KiB default).
fn big_smem(f: CudaFunction, smem: usize) -> Result<CudaFunction, CudaError> {
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| cerr(format!("shared memory attribute: {e}")))?;
    Ok(f)
}

impl Fwd {
    pub fn new(ctx: &Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Fwd, CudaError> {
        let m = crate::device::load_module(ctx, "fwd")?;
        let f = |name: &str| {
            m.load_function(name)
                .map_err(|e| cerr(format!("kernel {name}: {e}")))
        };
        Ok(Fwd {
            advance_pos: f("ds4_advance_pos")?,
            embed: f("ds4_embed")?,
            rms_rows: f("ds4_rms_norm_rows")?,
            rms_rows_warp: f("ds4_rms_norm_rows_warp")?,
            hc_pre: f("ds4_hc_pre")?,
            hc_post: f("ds4_hc_post")?,
            hc_pre_fast: f("ds4_hc_pre_fast")?,
            hc_post_fast: f("ds4_hc_post_fast")?,
            head_norm_rope_fast: f("ds4_head_norm_rope_fast")?,
            hc_head: f("ds4_hc_head")?,
            head_norm_rope: f("ds4_head_norm_rope")?,
            kv_finish: f("ds4_kv_finish")?,
            comp_emit: f("ds4_comp_emit")?,
            comp_frontier: f("ds4_comp_frontier")?,
            indexer_q: f("ds4_indexer_q")?,
            indexer_q_warp: f("ds4_indexer_q_warp")?,
            indexer_scores: f("ds4_indexer_scores")?,
            topk: f("ds4_topk")?,
            attention: f("ds4_attention")?,
            attn_combine: f("ds4_attn_combine")?,
            router: f("ds4_router")?,
            swiglu: f("ds4_swiglu")?,
            hc_pre_dec: f("ds4_hc_pre_dec")?,
            hc_post_dec: f("ds4_hc_post_dec")?,
            hc_head_dec: f("ds4_hc_head_dec")?,
            qkv_dec: f("ds4_qkv_dec")?,
            attn_dec_scores: f("ds4_attn_dec_scores")?,
            attn_dec_out: f("ds4_attn_dec_out")?,
            indexer_scores4: f("ds4_indexer_scores4")?,
            indexer_mma32: big_smem(f("ds4_indexer_mma32")?, indexer_mma_smem(1, 32))?,
            indexer_mma128: big_smem(f("ds4_indexer_mma128")?, indexer_mma_smem(1, 128))?,
            indexer_mma2x64: big_smem(f("ds4_indexer_mma2x64")?, indexer_mma_smem(2, 64))?,
            indexer_mma2x64_fb: big_smem(f("ds4_indexer_mma2x64_fb")?, indexer_mma_smem(2, 64))?,
            idx8_prep: f("ds4_idx8_prep")?,
            indexer_i8: [
                f("ds4_indexer_i8")?,
                f("ds4_indexer_i8_b3")?,
                f("ds4_indexer_i8_bl")?,
                f("ds4_indexer_i8_b3bl")?,
            ],
            idx8_variant: std::sync::atomic::AtomicUsize::new(
                std::env::var("DS4_CUDA_IDX8_VARIANT")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|&v| v < 4)
                    .unwrap_or(2),
            ),
            idx8: Mutex::new(None),
            hc_split_dec: f("ds4_hc_split_dec")?,
            rms_q8_dec: f("ds4_rms_q8_dec")?,
            hc_pre_mix_dec: f("ds4_hc_pre_mix_dec")?,
            hc_pre_mix_red: f("ds4_hc_pre_mix_red")?,
            hc_pre_red_on: std::sync::atomic::AtomicBool::new(
                !std::env::var("DS4_CUDA_HC_PRE_RED").is_ok_and(|v| v == "0"),
            ),
            hc_mix_part: f("ds4_hc_mix_part")?,
            hc_post_wide: f("ds4_hc_post_wide")?,
            dir_steer: f("ds4_dir_steer")?,
            argmax_pick: f("ds4_argmax_pick")?,
            side: stream
                .fork()
                .map_err(|e| cerr(format!("side stream: {e}")))?,
            ev_fork: ctx
                .new_event(None)
                .map_err(|e| cerr(format!("event: {e}")))?,
            ev_join: ctx
                .new_event(None)
                .map_err(|e| cerr(format!("event: {e}")))?,
            dec: DBuf::zeroed(&stream, DEC_COUNTERS * 4)?,
            mixp: DBuf::zeroed(&stream, HCM_MAX_PARTS * HCM_ROWS * 8)?,
            ssp: DBuf::zeroed(&stream, HPW_MAX_PARTS * 8)?,
            stream,
        })
    }

    fn ctr(&self, slot: usize) -> u64 {
        self.dec.ptr + 4 * slot as u64
    }

    /// Launch a kernel whose only parameter is the `#[repr(C)]` struct `arg`.
    fn go_struct<T: Copy>(
        &self,
        f: &CudaFunction,
        grid: usize,
        block: usize,
        smem: usize,
        arg: &T,
    ) -> Result<(), CudaError> {
        if grid == 0 {
            return Ok(());
        }
        let mut ptrs = [arg as *const T as *mut c_void];
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (block as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the kernel takes exactly one parameter of type T's C mirror (same field
        // order, every field 8 bytes, sizes asserted above); the driver copies it at launch.
        unsafe { crate::rt::launch_raw(&self.stream, f, cfg, &mut ptrs) }
    }

    fn go(
        &self,
        f: &CudaFunction,
        grid: (usize, usize, usize),
        block: usize,
        smem: usize,
        args: &[A],
    ) -> Result<(), CudaError> {
        launch(
            &self.stream,
            f,
            (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block as u32,
            smem as u32,
            args,
        )
    }

    /// `*pos += n`.
    pub fn advance_pos(&self, pos: u64, n: usize) -> Result<(), CudaError> {
        self.go(
            &self.advance_pos,
            (1, 1, 1),
            32,
            0,
            &[A::P(pos), A::I(n as i32)],
        )
    }

    /// `x[t][h][:] = table row tokens[t]` (GGML type id `ty`) for every HC stream.
    pub fn embed(
        &self,
        table: u64,
        ty: i32,
        e: usize,
        row_bytes: usize,
        tokens: u64,
        n: usize,
        hc: usize,
        x: u64,
    ) -> Result<(), CudaError> {
        self.go(
            &self.embed,
            (e.div_ceil(256), n, 1),
            256,
            0,
            &[
                A::P(table),
                A::I(ty),
                A::I(e as i32),
                A::L(row_bytes as i64),
                A::P(tokens),
                A::I(hc as i32),
                A::P(x),
            ],
        )
    }

    /// RMSNorm of `n` rows (`w` = 0: no weight); row strides `xs`, `os` in floats.
    pub fn rms_rows(
        &self,
        x: u64,
        xs: usize,
        w: u64,
        dim: usize,
        eps: f32,
        out: u64,
        os: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        // Short rows: a warp per row (float4 columns, at most 8 per lane: RMSW_U in fwd.cu).
        if dim.is_multiple_of(4)
            && dim <= 1024
            && xs.is_multiple_of(4)
            && os.is_multiple_of(4)
            && aligned16(&[x, w, out])
        {
            return self.go(
                &self.rms_rows_warp,
                (n.div_ceil(8), 1, 1),
                256,
                0,
                &[
                    A::P(x),
                    A::L(xs as i64),
                    A::P(w),
                    A::I(dim as i32),
                    A::F(eps),
                    A::P(out),
                    A::L(os as i64),
                    A::I(n as i32),
                ],
            );
        }
        // About 4 elements per thread (at most 16 stay in registers: RMS_CACHE in fwd.cu).
        let threads = dim.div_ceil(4).next_multiple_of(32).clamp(32, 1024);
        self.go(
            &self.rms_rows,
            (n, 1, 1),
            threads,
            0,
            &[
                A::P(x),
                A::L(xs as i64),
                A::P(w),
                A::I(dim as i32),
                A::F(eps),
                A::P(out),
                A::L(os as i64),
            ],
        )
    }

    /// Whether [`Fwd::hc_pre`] takes its chunk fast path for this shape (then `xin` may be 0
    /// and `q8` may be given; `e % 32 == 0` for `q8`).
    pub fn hc_pre_fast_fits(hc: usize, e: usize) -> bool {
        hc == 4 && e.is_multiple_of(32) && e / 4 <= FP_T * FP_U
    }

    /// HC pre: `mix` `[n][(2+hc)·hc]` → `post`, `comb`, `xin = Σ pre·x`, `a = RMSNorm(xin, norm)`.
    /// On the chunk fast path ([`Fwd::hc_pre_fast_fits`]) `xin = 0` skips that output and
    /// `q8 = Some((qs, d))` also writes `a` quantized as `Gemv::quantize_act(Q8_0, a, n, e)`
    /// does (same bytes; `qs` = act, `d` = act + align256(n·e)); elsewhere both are errors.
    pub fn hc_pre(
        &self,
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        iters: usize,
        hc_eps: f32,
        x: u64,
        e: usize,
        norm: u64,
        rms_eps: f32,
        post: u64,
        comb: u64,
        xin: u64,
        a: u64,
        n: usize,
        q8: Option<(u64, u64)>,
    ) -> Result<(), CudaError> {
        let fast =
            hc == 4 && e.is_multiple_of(4) && e / 4 <= FP_T * FP_U && aligned16(&[x, norm, xin, a]);
        let q8_ok = Self::hc_pre_fast_fits(hc, e) && q8.is_none_or(|(q, _)| q % 4 == 0);
        if (q8.is_some() && !(fast && q8_ok)) || (xin == 0 && !fast) {
            return Err(CudaError::Driver(format!(
                "hc_pre: no fast path (hc {hc}, e {e}) for a Q8_0 output or a skipped xin"
            )));
        }
        let (q0, d0) = q8.unwrap_or((0, 0));
        if fast {
            return self.go(
                &self.hc_pre_fast,
                (n.div_ceil(FP_TOK), 1, 1),
                FP_T,
                0,
                &[
                    A::P(mix),
                    A::I(((2 + hc) * hc) as i32),
                    A::P(scale),
                    A::P(base),
                    A::I(iters as i32),
                    A::F(hc_eps),
                    A::P(x),
                    A::I(e as i32),
                    A::P(norm),
                    A::F(rms_eps),
                    A::P(post),
                    A::P(comb),
                    A::P(xin),
                    A::P(a),
                    A::I(n as i32),
                    A::P(q0),
                    A::P(d0),
                ],
            );
        }
        self.go(
            &self.hc_pre,
            (n, 1, 1),
            HC_THREADS,
            0,
            &[
                A::P(mix),
                A::I(((2 + hc) * hc) as i32),
                A::P(scale),
                A::P(base),
                A::I(hc as i32),
                A::I(iters as i32),
                A::F(hc_eps),
                A::P(x),
                A::I(e as i32),
                A::P(norm),
                A::F(rms_eps),
                A::P(post),
                A::P(comb),
                A::P(xin),
                A::P(a),
            ],
        )
    }

    /// Whether [`Fwd::hc_post`] takes its chunk fast path for this shape (given 16-byte
    /// aligned buffers); only there may `fscale` be given.
    pub fn hc_post_fast_fits(hc: usize, e: usize) -> bool {
        hc == 4 && e.is_multiple_of(4) && e / 4 <= FP_T * FP_U
    }

    /// HC post: `xo = post ⊗ (f + Σ_k routed) + combᵀ x` (routed `[n][k][e]` or 0), then
    /// `flat = RMSNorm_noweight(xo)` (flat = 0: skipped). `fscale` (fast path only, 0: none)
    /// gets the f64 norm factor `s` of each token (`flat = (float)(xo·s)`).
    pub fn hc_post(
        &self,
        f: u64,
        routed: u64,
        k: usize,
        x: u64,
        post: u64,
        comb: u64,
        hc: usize,
        e: usize,
        xo: u64,
        flat: u64,
        eps: f32,
        n: usize,
        fscale: u64,
    ) -> Result<(), CudaError> {
        if Self::hc_post_fast_fits(hc, e) && aligned16(&[f, routed, x, xo, flat, fscale]) {
            let threads = (e / 4).div_ceil(FP_U).next_multiple_of(32).clamp(32, FP_T);
            return self.go(
                &self.hc_post_fast,
                (n, 1, 1),
                threads,
                0,
                &[
                    A::P(f),
                    A::P(routed),
                    A::I(k as i32),
                    A::P(x),
                    A::P(post),
                    A::P(comb),
                    A::I(e as i32),
                    A::P(xo),
                    A::P(flat),
                    A::F(eps),
                    A::P(fscale),
                ],
            );
        }
        if fscale != 0 {
            return Err(CudaError::Driver(format!(
                "hc_post: no fast path (hc {hc}, e {e}) for the norm factors"
            )));
        }
        self.go(
            &self.hc_post,
            (n, 1, 1),
            HC_THREADS,
            0,
            &[
                A::P(f),
                A::P(routed),
                A::I(k as i32),
                A::P(x),
                A::P(post),
                A::P(comb),
                A::I(hc as i32),
                A::I(e as i32),
                A::P(xo),
                A::P(flat),
                A::F(eps),
            ],
        )
    }

    /// HC head + output norm: `hn = RMSNorm(Σ_i w_i x_i, norm)`, `w = sigmoid(mix·scale+base)+eps`.
    pub fn hc_head(
        &self,
        mix: u64,
        scale: f32,
        base: u64,
        hc_eps: f32,
        x: u64,
        hc: usize,
        e: usize,
        norm: u64,
        rms_eps: f32,
        hn: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        self.go(
            &self.hc_head,
            (n, 1, 1),
            256,
            e * 4,
            &[
                A::P(mix),
                A::F(scale),
                A::P(base),
                A::F(hc_eps),
                A::P(x),
                A::I(hc as i32),
                A::I(e as i32),
                A::P(norm),
                A::F(rms_eps),
                A::P(hn),
            ],
        )
    }

    /// Per-head no-weight RMSNorm + RoPE of `q` `[n][nh][hd]` in place.
    pub fn head_norm_rope(
        &self,
        q: u64,
        nh: usize,
        hd: usize,
        n_rot: usize,
        eps: f32,
        inv_freq: u64,
        pos: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        if hd.is_multiple_of(4)
            && hd <= 512
            && n_rot.is_multiple_of(2)
            && n_rot <= hd
            && n_rot / 2 <= 256
            && aligned16(&[q])
        {
            return self.go(
                &self.head_norm_rope_fast,
                (n, 1, 1),
                256,
                0,
                &[
                    A::P(q),
                    A::I(nh as i32),
                    A::I(hd as i32),
                    A::I(n_rot as i32),
                    A::F(eps),
                    A::P(inv_freq),
                    A::P(pos),
                ],
            );
        }
        self.go(
            &self.head_norm_rope,
            (nh, n, 1),
            hd.min(256),
            hd * 4,
            &[
                A::P(q),
                A::I(nh as i32),
                A::I(hd as i32),
                A::I(n_rot as i32),
                A::F(eps),
                A::P(inv_freq),
                A::P(pos),
            ],
        )
    }

    /// KV rows: RMSNorm(w), RoPE, FP8 (qat), stored at ring row `pos % raw_cap`.
    pub fn kv_finish(
        &self,
        kvp: u64,
        w: u64,
        hd: usize,
        n_rot: usize,
        eps: f32,
        inv_freq: u64,
        pos: u64,
        qat: bool,
        n_nope: usize,
        ring: u64,
        raw_cap: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        self.go(
            &self.kv_finish,
            (n, 1, 1),
            hd.min(256),
            hd * 4,
            &[
                A::P(kvp),
                A::P(w),
                A::I(hd as i32),
                A::I(n_rot as i32),
                A::F(eps),
                A::P(inv_freq),
                A::P(pos),
                A::I(qat as i32),
                A::I(n_nope as i32),
                A::P(ring),
                A::I(raw_cap as i32),
            ],
        )
    }

    /// A compressor over a chunk of `n` tokens: emit the completed rows into `rows`, then
    /// advance the frontier (`st_kv`, `st_sc`).
    pub fn compressor(
        &self,
        g: CompLaunch,
        ckv: u64,
        csc: u64,
        ape: u64,
        st_kv: u64,
        st_sc: u64,
        pos: u64,
        norm: u64,
        inv_freq: u64,
        rows: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        self.go(
            &self.comp_emit,
            (n / g.ratio + 1, 1, 1),
            g.d_c.min(512),
            g.d_c * 4,
            &[
                A::P(ckv),
                A::P(csc),
                A::P(ape),
                A::P(st_kv),
                A::P(st_sc),
                A::P(pos),
                A::I(n as i32),
                A::I(g.ratio as i32),
                A::I(g.overlap as i32),
                A::I(g.d_c as i32),
                A::P(norm),
                A::F(g.eps),
                A::P(inv_freq),
                A::I(g.n_rot as i32),
                A::I(g.qat_mode),
                A::I(g.n_nope as i32),
                A::P(rows),
            ],
        )?;
        let width = if g.overlap { 2 * g.d_c } else { g.d_c };
        self.go(
            &self.comp_frontier,
            (width.div_ceil(256), 1, 1),
            256,
            0,
            &[
                A::P(ckv),
                A::P(csc),
                A::P(ape),
                A::P(st_kv),
                A::P(st_sc),
                A::P(pos),
                A::I(n as i32),
                A::I(g.ratio as i32),
                A::I(g.overlap as i32),
                A::I(g.d_c as i32),
            ],
        )
    }

    /// Indexer queries: RoPE + Hadamard/FP4 (qat) per head, weights × `wscale`. `warp`: the
    /// kernel (`Some(true)`: `ds4_indexer_q_warp`, one warp per head — ihd 128, nih a multiple
    /// of 8, iq 16-byte aligned; `Some(false)`: the block-per-head `ds4_indexer_q`; `None`: the
    /// warp kernel where the shape fits). Both give the same bits.
    pub fn indexer_q(
        &self,
        warp: Option<bool>,
        iq: u64,
        iw: u64,
        nih: usize,
        ihd: usize,
        n_rot: usize,
        inv_freq: u64,
        pos: u64,
        qat: bool,
        wscale: f64,
        n: usize,
    ) -> Result<(), CudaError> {
        let warp_fits = ihd == 128
            && nih.is_multiple_of(8)
            && n_rot.is_multiple_of(2)
            && n_rot <= ihd
            && iq.is_multiple_of(16);
        let warp = warp.unwrap_or(warp_fits);
        if warp && !warp_fits {
            return Err(CudaError::Driver(format!(
                "ds4_indexer_q_warp does not fit {nih} heads of {ihd} with {n_rot} rotated dims"
            )));
        }
        if warp {
            return self.go(
                &self.indexer_q_warp,
                (nih / 8, n, 1),
                256,
                0,
                &[
                    A::P(iq),
                    A::P(iw),
                    A::I(nih as i32),
                    A::I(n_rot as i32),
                    A::P(inv_freq),
                    A::P(pos),
                    A::I(qat as i32),
                    A::D(wscale),
                ],
            );
        }
        self.go(
            &self.indexer_q,
            (nih, n, 1),
            ihd.min(1024),
            ihd * 4,
            &[
                A::P(iq),
                A::P(iw),
                A::I(nih as i32),
                A::I(ihd as i32),
                A::I(n_rot as i32),
                A::P(inv_freq),
                A::P(pos),
                A::I(qat as i32),
                A::D(wscale),
            ],
        )
    }

    /// Indexer scores and top-k of tokens `t0..t0+nt` (only those seeing more than `topk`
    /// rows): `scores` `[nt][sstride]`, `isel` `[n][topk]` (ascending indices).
    pub fn indexer_select(
        &self,
        iq: u64,
        iw: u64,
        icomp: u64,
        nih: usize,
        ihd: usize,
        ratio: usize,
        topk: usize,
        pos: u64,
        t0: usize,
        nt: usize,
        scores: u64,
        sstride: usize,
        blocks: usize,
        isel: u64,
    ) -> Result<(), CudaError> {
        self.indexer_scores(
            IdxKernel::Auto,
            iq,
            iw,
            icomp,
            nih,
            ihd,
            ratio,
            topk,
            pos,
            t0,
            nt,
            scores,
            sstride,
            blocks,
        )?;
        self.go(
            &self.topk,
            (nt, 1, 1),
            1024,
            0,
            &[
                A::P(scores),
                A::L(sstride as i64),
                A::I(ratio as i32),
                A::I(topk as i32),
                A::P(pos),
                A::I(t0 as i32),
                A::P(isel),
            ],
        )
    }

    /// Room for the int8 indexer path ([`IdxKernel::Int8`]): batches of up to `tokens` tokens
    /// seeing up to `rows` compressed rows (grows, never shrinks).
    pub fn reserve_idx8(&self, tokens: usize, rows: usize) -> Result<(), CudaError> {
        let mut g = self.idx8.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref()
            .is_some_and(|b| b.tokens >= tokens && b.rows >= rows)
        {
            return Ok(());
        }
        let (tokens, rows) = g
            .as_ref()
            .map_or((tokens, rows), |b| (b.tokens.max(tokens), b.rows.max(rows)));
        let st = &self.stream;
        *g = Some(Idx8Buf {
            tokens,
            rows,
            q8: DBuf::zeroed(st, tokens * IDXM_NIH * IDXM_IHD)?,
            qe: DBuf::zeroed(st, tokens * IDXM_NIH * 4)?,
            k8: DBuf::zeroed(st, rows * IDXM_IHD)?,
            ks: DBuf::zeroed(st, rows * 8)?,
            slots: DBuf::zeroed(st, IDX8_SLOTS * 4)?,
        });
        Ok(())
    }

    /// Indexer scores only (ops::indexer_scores) of tokens `t0..t0+nt` seeing more than
    /// `topk` rows into `scores` `[nt][sstride]`, with kernel `kernel` (falls back to the
    /// generic kernel where the chosen one does not fit the shape). `blocks` bounds the row
    /// blocks per token (they stride over the row tiles); a fixed `(blocks, sstride, nt)` gives
    /// a fixed grid (decode graphs capture it).
    pub fn indexer_scores(
        &self,
        kernel: IdxKernel,
        iq: u64,
        iw: u64,
        icomp: u64,
        nih: usize,
        ihd: usize,
        ratio: usize,
        topk: usize,
        pos: u64,
        t0: usize,
        nt: usize,
        scores: u64,
        sstride: usize,
        blocks: usize,
    ) -> Result<(), CudaError> {
        let mma_ok = indexer_mma_fits(nih, ihd)
            && (iq | icomp).is_multiple_of(16)
            && (t0 * nih * ihd).is_multiple_of(4);
        // (tokens per block, rows per tile)
        let mma = match kernel {
            IdxKernel::Auto if mma_ok && nt <= IDXM_SMALL_BATCH => Some((1, 32)),
            IdxKernel::Auto if mma_ok && idx_kernel_f64() => Some((2, 64)),
            IdxKernel::Auto | IdxKernel::Int8 if mma_ok => {
                let g = self.idx8.lock().unwrap_or_else(|e| e.into_inner());
                match g.as_ref() {
                    Some(b) if b.tokens >= nt && b.rows >= sstride => {
                        return self.indexer_scores_i8(
                            b, iq, iw, icomp, ratio, topk, pos, t0, nt, scores, sstride, blocks,
                        );
                    }
                    _ => Some((2, 64)),
                }
            }
            IdxKernel::Mma32 if mma_ok => Some((1, 32)),
            IdxKernel::Mma128 if mma_ok => Some((1, 128)),
            IdxKernel::Mma2x64 if mma_ok => Some((2, 64)),
            _ => None,
        };
        if let Some((tpb, rows)) = mma {
            let gy = nt.div_ceil(tpb);
            // Row blocks per token group: enough for about two waves of a 132-SM card in total.
            let gx = sstride
                .div_ceil(rows)
                .min(blocks)
                .min((2 * ATT_TARGET_BLOCKS).div_ceil(gy.max(1)))
                .max(1);
            let f = match (tpb, rows) {
                (1, 32) => &self.indexer_mma32,
                (1, _) => &self.indexer_mma128,
                _ => &self.indexer_mma2x64,
            };
            return self.go(
                f,
                (gx, gy, 1),
                256,
                indexer_mma_smem(tpb, rows),
                &[
                    A::P(iq),
                    A::P(iw),
                    A::P(icomp),
                    A::I(ratio as i32),
                    A::I(topk as i32),
                    A::P(pos),
                    A::I(t0 as i32),
                    A::I(nt as i32),
                    A::P(scores),
                    A::L(sstride as i64),
                ],
            );
        }
        let args = [
            A::P(iq),
            A::P(iw),
            A::P(icomp),
            A::I(nih as i32),
            A::I(ihd as i32),
            A::I(ratio as i32),
            A::I(topk as i32),
            A::P(pos),
            A::I(t0 as i32),
            A::P(scores),
            A::L(sstride as i64),
        ];
        if indexer4_fits(nih, ihd) {
            self.go(
                &self.indexer_scores4,
                (blocks, nt, 1),
                nih * 4,
                indexer4_smem(nih, ihd),
                &args,
            )
        } else {
            self.go(
                &self.indexer_scores,
                (blocks, nt, 1),
                256,
                indexer_smem(nih, ihd),
                &args,
            )
        }
    }

    /// Whether the decode HC pre may run without a cluster (`ds4_hc_pre_mix_red`, where it
    /// fits; default on unless `DS4_CUDA_HC_PRE_RED=0`) or always on the cluster kernel.
    pub fn set_hc_pre_red(&self, on: bool) {
        self.hc_pre_red_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Select the int8 scores kernel variant (0..4, see `indexer_i8`).
    pub fn set_idx8_variant(&self, v: usize) {
        self.idx8_variant
            .store(v.min(3), std::sync::atomic::Ordering::Relaxed);
    }

    /// Address of the int8 path's prep flags (IDX8_SLOTS i32; any non-zero after a launch:
    /// that launch fell back to the FP64 kernel), if reserved.
    pub fn idx8_slots(&self) -> Option<u64> {
        let g = self.idx8.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|b| b.slots.ptr)
    }

    /// The int8 path of [`IdxKernel::Int8`] (the grid of `Mma2x64`).
    fn indexer_scores_i8(
        &self,
        b: &Idx8Buf,
        iq: u64,
        iw: u64,
        icomp: u64,
        ratio: usize,
        topk: usize,
        pos: u64,
        t0: usize,
        nt: usize,
        scores: u64,
        sstride: usize,
        blocks: usize,
    ) -> Result<(), CudaError> {
        self.go(
            &self.idx8_prep,
            (IDX8_SLOTS, 1, 1),
            256,
            0,
            &[
                A::P(iq),
                A::P(icomp),
                A::I(ratio as i32),
                A::I(topk as i32),
                A::P(pos),
                A::I(t0 as i32),
                A::I(nt as i32),
                A::P(b.q8.ptr),
                A::P(b.qe.ptr),
                A::P(b.k8.ptr),
                A::P(b.ks.ptr),
                A::P(b.slots.ptr),
            ],
        )?;
        let gy = nt.div_ceil(2);
        let gx = sstride
            .div_ceil(64)
            .min(blocks)
            .min((2 * ATT_TARGET_BLOCKS).div_ceil(gy.max(1)))
            .max(1);
        let v = self.idx8_variant.load(std::sync::atomic::Ordering::Relaxed);
        self.go(
            &self.indexer_i8[v],
            (gx, gy, 1),
            256,
            0,
            &[
                A::P(b.q8.ptr),
                A::P(b.qe.ptr),
                A::P(iw),
                A::P(b.k8.ptr),
                A::P(b.ks.ptr),
                A::P(b.slots.ptr),
                A::I(ratio as i32),
                A::I(topk as i32),
                A::P(pos),
                A::I(t0 as i32),
                A::I(nt as i32),
                A::P(scores),
                A::L(sstride as i64),
            ],
        )?;
        self.go(
            &self.indexer_mma2x64_fb,
            (gx, gy.min(ATT_TARGET_BLOCKS.div_ceil(gx)), 1),
            256,
            indexer_mma_smem(2, 64),
            &[
                A::P(iq),
                A::P(iw),
                A::P(icomp),
                A::I(ratio as i32),
                A::I(topk as i32),
                A::P(pos),
                A::I(t0 as i32),
                A::I(nt as i32),
                A::P(scores),
                A::L(sstride as i64),
                A::P(b.slots.ptr),
            ],
        )
    }

    /// Attention (+ inverse RoPE) of `n` tokens into `heads`; `nsplit > 1` goes through `part`.
    pub fn attention(&self, a: &AttnLaunch, n: usize, nsplit: usize) -> Result<(), CudaError> {
        self.go(
            &self.attention,
            (a.nh.div_ceil(ATT_HPB), nsplit, n),
            ATT_HPB * 32,
            0,
            &[
                A::P(a.q),
                A::P(a.ring),
                A::I(a.raw_cap as i32),
                A::I(a.window as i32),
                A::P(a.comp),
                A::I(a.ratio as i32),
                A::I(a.has_indexer as i32),
                A::P(a.isel),
                A::I(a.topk as i32),
                A::P(a.sinks),
                A::F(a.scale),
                A::I(a.nh as i32),
                A::I(a.hd as i32),
                A::I(a.n_rot as i32),
                A::P(a.inv_freq),
                A::P(a.pos),
                A::I(nsplit as i32),
                A::P(a.part),
                A::P(a.heads),
            ],
        )?;
        if nsplit > 1 {
            self.go(
                &self.attn_combine,
                (a.nh, n, 1),
                32,
                0,
                &[
                    A::P(a.part),
                    A::I(nsplit as i32),
                    A::P(a.sinks),
                    A::I(a.nh as i32),
                    A::I(a.hd as i32),
                    A::I(a.n_rot as i32),
                    A::P(a.inv_freq),
                    A::P(a.pos),
                    A::P(a.heads),
                ],
            )?;
        }
        Ok(())
    }

    /// Router: probs, selection (hash table or biased top-k), weights.
    pub fn router(
        &self,
        rlog: u64,
        ne: usize,
        k: usize,
        hash: bool,
        tid2eid: u64,
        tokens: u64,
        bias: u64,
        wscale: f32,
        probs: u64,
        sel: u64,
        wts: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        self.go(
            &self.router,
            (n, 1, 1),
            ne.next_multiple_of(32).clamp(32, 1024),
            0,
            &[
                A::P(rlog),
                A::I(ne as i32),
                A::I(k as i32),
                A::I(hash as i32),
                A::P(tid2eid),
                A::P(tokens),
                A::P(bias),
                A::F(wscale),
                A::P(probs),
                A::P(sel),
                A::P(wts),
            ],
        )
    }

    /// SwiGLU with weight 1 over `rows × cols` (strided rows).
    pub fn swiglu(
        &self,
        g: u64,
        u: u64,
        in_stride: usize,
        cols: usize,
        rows: usize,
        clamp: f32,
        out: u64,
        out_stride: usize,
    ) -> Result<(), CudaError> {
        let total = rows * cols;
        self.go(
            &self.swiglu,
            (total.div_ceil(256).clamp(1, 4096), 1, 1),
            256,
            0,
            &[
                A::P(g),
                A::P(u),
                A::L(in_stride as i64),
                A::I(cols as i32),
                A::I(rows as i32),
                A::F(clamp),
                A::P(out),
                A::L(out_stride as i64),
            ],
        )
    }

    // ---- decode-step kernels (one token)

    /// HC pre of one token without the split: `xin = Σ pre·x`, `a = RMSNorm(xin, norm)` (the
    /// split is [`Fwd::hc_split_side`] / [`Fwd::hc_split`]); `q` (default: none) also writes
    /// `a`'s activation quantization (see [`DecQuant`]).
    pub fn hc_pre_dec(
        &self,
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        hc_eps: f32,
        x: u64,
        e: usize,
        norm: u64,
        rms_eps: f32,
        xin: u64,
        a: u64,
        q: DecQuant,
    ) -> Result<(), CudaError> {
        if !q.fits_hc(e) {
            return Err(cerr(format!(
                "hc_pre_dec: quantization of {e} values not fused"
            )));
        }
        self.go(
            &self.hc_pre_dec,
            (DEC_HC_BLOCKS, 1, 1),
            DEC_HC_THREADS,
            0,
            &[
                A::P(mix),
                A::P(scale),
                A::P(base),
                A::I(hc as i32),
                A::F(hc_eps),
                A::P(x),
                A::I(e as i32),
                A::P(norm),
                A::F(rms_eps),
                A::P(xin),
                A::P(a),
                A::P(q.q0),
                A::P(q.d0),
                A::P(q.qk),
                A::P(q.dk),
                A::P(q.bk),
            ],
        )
    }

    /// Whether [`Fwd::hc_pre_mix_dec`] takes a site with `hc` streams of `e` and an F16 `fn`
    /// matrix of `rows` × `cols`.
    pub fn hc_pre_mix_fits(hc: usize, e: usize, rows: usize, cols: usize) -> bool {
        hc == 4
            && rows == (2 + hc) * hc
            && cols == hc * e
            && (hc * e).is_multiple_of(HCP_COLS)
            && e <= DEC_HC_BLOCKS * DEC_HC_THREADS * 4
    }

    /// HC pre of one token with the site's mix product: `mix = fn·flat` (`fn` F16
    /// `[(2+hc)·hc][hc·e]`, written to `mix` for the split), then as [`Fwd::hc_pre_dec`].
    /// Two launches: the product's partial sums over hc·e/128 blocks (`ds4_hc_mix_part`), then
    /// the cluster that adds them and runs the collapse / norm / quantization. Only where
    /// [`Fwd::hc_pre_mix_fits`]; `flat`, `x` and `fn_` 16-byte aligned. `post_eps = Some(eps)`:
    /// the streams `x` come from [`Fwd::hc_post_wide`], and `flat = RMSNorm_noweight(x, eps)` is
    /// computed (and written) by the product launch first. `fn_` is read before the product
    /// kernel's PDL wait (weight prologue): it must not be written by the kernel launched just
    /// before (model weights never are).
    pub fn hc_pre_mix_dec(
        &self,
        post_eps: Option<f32>,
        flat: u64,
        fn_: u64,
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        hc_eps: f32,
        x: u64,
        e: usize,
        norm: u64,
        rms_eps: f32,
        xin: u64,
        a: u64,
        q: DecQuant,
    ) -> Result<(), CudaError> {
        if !Self::hc_pre_mix_fits(hc, e, (2 + hc) * hc, hc * e)
            || !q.fits_hc(e)
            || !aligned16(&[flat, fn_, x])
            || (post_eps.is_some() && !Self::hc_post_wide_fits(hc, e))
        {
            return Err(cerr(format!("hc_pre_mix_dec: hc {hc} e {e} not supported")));
        }
        let parts = hc * e / HCP_COLS;
        debug_assert!(parts <= HCM_MAX_PARTS && (2 + hc) * hc == HCM_ROWS);
        let nss = if post_eps.is_some() { e / HPW_T } else { 0 };
        self.go(
            &self.hc_mix_part,
            (parts, 1, 1),
            HCP_T,
            0,
            &[
                A::P(flat),
                A::P(x),
                A::P(self.ssp.ptr),
                A::I(nss as i32),
                A::F(post_eps.unwrap_or(0.0)),
                A::P(fn_),
                A::P(self.mixp.ptr),
                A::I((hc * e) as i32),
            ],
        )?;
        let red_on = self
            .hc_pre_red_on
            .load(std::sync::atomic::Ordering::Relaxed);
        let (k, grid, threads) = if red_on && e.is_multiple_of(HCR_T) && e <= HCR_T * HCR_EPT {
            (&self.hc_pre_mix_red, e / HCR_T, HCR_T)
        } else {
            (&self.hc_pre_mix_dec, DEC_HC_BLOCKS, DEC_HC_THREADS)
        };
        self.go(
            k,
            (grid, 1, 1),
            threads,
            0,
            &[
                A::P(self.mixp.ptr),
                A::I(parts as i32),
                A::P(mix),
                A::P(scale),
                A::P(base),
                A::F(hc_eps),
                A::P(x),
                A::I(e as i32),
                A::P(norm),
                A::F(rms_eps),
                A::P(xin),
                A::P(a),
                A::P(q.q0),
                A::P(q.d0),
                A::P(q.qk),
                A::P(q.dk),
                A::P(q.bk),
            ],
        )
    }

    /// RMSNorm of one row of `dim` floats (`w` = 0: no weight) into `out`, and with `q0`/`d0`
    /// set (non-zero) its Q8_0 activation quantization (qs, scales) in the same launch.
    /// Needs `dim % 32 == 0`, `dim ≤ 4096` and 16-byte aligned x / w / out / q0.
    pub fn rms_q8_dec(
        &self,
        x: u64,
        w: u64,
        dim: usize,
        eps: f32,
        out: u64,
        q0: u64,
        d0: u64,
    ) -> Result<(), CudaError> {
        if !Self::rms_q8_fits(dim) || !aligned16(&[x, w, out, q0]) {
            return Err(cerr(format!(
                "rms_q8_dec: dim {dim} or alignment unsupported"
            )));
        }
        let threads = (dim / 4).next_multiple_of(32);
        self.go(
            &self.rms_q8_dec,
            (1, 1, 1),
            threads,
            0,
            &[
                A::P(x),
                A::P(w),
                A::I(dim as i32),
                A::F(eps),
                A::P(out),
                A::P(q0),
                A::P(d0),
            ],
        )
    }

    /// Whether [`Fwd::rms_q8_dec`] takes rows of `dim` floats.
    pub fn rms_q8_fits(dim: usize) -> bool {
        dim > 0 && dim.is_multiple_of(32) && dim <= 4096
    }

    fn split_args(
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        iters: usize,
        hc_eps: f32,
        post: u64,
        comb: u64,
    ) -> [A; 8] {
        [
            A::P(mix),
            A::P(scale),
            A::P(base),
            A::I(hc as i32),
            A::I(iters as i32),
            A::F(hc_eps),
            A::P(post),
            A::P(comb),
        ]
    }

    /// The HC split (`post`, `comb`) of one token on the main stream.
    pub fn hc_split(
        &self,
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        iters: usize,
        hc_eps: f32,
        post: u64,
        comb: u64,
    ) -> Result<(), CudaError> {
        let args = Self::split_args(mix, scale, base, hc, iters, hc_eps, post, comb);
        self.go(&self.hc_split_dec, (1, 1, 1), 32, 0, &args)
    }

    /// The HC split (`post`, `comb`) of one token on the side stream, after everything enqueued
    /// on the main stream so far; [`Fwd::join_side`] makes the main stream wait for it.
    pub fn hc_split_side(
        &self,
        mix: u64,
        scale: u64,
        base: u64,
        hc: usize,
        iters: usize,
        hc_eps: f32,
        post: u64,
        comb: u64,
    ) -> Result<(), CudaError> {
        self.fork_side()?;
        let args = Self::split_args(mix, scale, base, hc, iters, hc_eps, post, comb);
        launch(&self.side, &self.hc_split_dec, (1, 1, 1), 32, 0, &args)?;
        self.side_done()
    }

    /// The side stream, for decode work that runs concurrently with the main stream between
    /// [`Fwd::fork_side`] and [`Fwd::side_done`].
    pub fn side(&self) -> &Arc<CudaStream> {
        &self.side
    }

    /// The side stream waits for everything enqueued on the main stream so far.
    pub fn fork_side(&self) -> Result<(), CudaError> {
        let ev = |e: cudarc::driver::DriverError| cerr(format!("side stream: {e}"));
        self.ev_fork.record(&self.stream).map_err(ev)?;
        self.side.wait(&self.ev_fork).map_err(ev)
    }

    /// Marks the side stream's work so far as what [`Fwd::join_side`] waits for.
    pub fn side_done(&self) -> Result<(), CudaError> {
        self.ev_join
            .record(&self.side)
            .map_err(|e| cerr(format!("side stream: {e}")))
    }

    /// The main stream waits for the side stream's work so far.
    pub fn join_side(&self) -> Result<(), CudaError> {
        self.stream
            .wait(&self.ev_join)
            .map_err(|e| cerr(format!("side stream: {e}")))
    }

    /// HC post of one token: `xo = post ⊗ (f + Σ_k routed) + combᵀ x` (routed `[k][e]` or 0),
    /// then `flat = RMSNorm_noweight(xo)` (flat = 0: skipped).
    pub fn hc_post_dec(
        &self,
        f: u64,
        routed: u64,
        k: usize,
        x: u64,
        post: u64,
        comb: u64,
        hc: usize,
        e: usize,
        xo: u64,
        flat: u64,
        eps: f32,
    ) -> Result<(), CudaError> {
        self.go(
            &self.hc_post_dec,
            (DEC_HC_BLOCKS, 1, 1),
            DEC_HC_THREADS,
            0,
            &[
                A::P(f),
                A::P(routed),
                A::I(k as i32),
                A::P(x),
                A::P(post),
                A::P(comb),
                A::I(hc as i32),
                A::I(e as i32),
                A::P(xo),
                A::P(flat),
                A::F(eps),
            ],
        )
    }

    /// Whether [`Fwd::hc_post_wide`] takes `hc` streams of `e`.
    pub fn hc_post_wide_fits(hc: usize, e: usize) -> bool {
        hc == 4 && e > 0 && e.is_multiple_of(HPW_T) && e / HPW_T <= HPW_MAX_PARTS
    }

    /// HC post of one token over many blocks (no cluster): `xo` as [`Fwd::hc_post_dec`], and
    /// the block partials of Σ xo² for the next site's no-weight RMSNorm, which
    /// [`Fwd::hc_pre_mix_dec`] with `post_eps` finishes (flat is not written here).
    pub fn hc_post_wide(
        &self,
        f: u64,
        routed: u64,
        k: usize,
        x: u64,
        post: u64,
        comb: u64,
        hc: usize,
        e: usize,
        xo: u64,
    ) -> Result<(), CudaError> {
        if !Self::hc_post_wide_fits(hc, e) {
            return Err(cerr(format!("hc_post_wide: hc {hc} e {e} not supported")));
        }
        self.go(
            &self.hc_post_wide,
            (e / HPW_T, 1, 1),
            HPW_T,
            0,
            &[
                A::P(f),
                A::P(routed),
                A::I(k as i32),
                A::P(x),
                A::P(post),
                A::P(comb),
                A::I(e as i32),
                A::P(xo),
                A::P(self.ssp.ptr),
            ],
        )
    }

    /// The greedy pick of `n` logits at `x` into `out` (4 × u32: the first largest logit, the
    /// first largest of the others, whether any is NaN, 0); `part`: [`PICK_PART_BYTES`] of
    /// scratch. See `ds4_argmax_pick`.
    pub fn argmax_pick(&self, x: u64, n: usize, part: u64, out: u64) -> Result<(), CudaError> {
        self.go(
            &self.argmax_pick,
            (PICK_BLOCKS, 1, 1),
            256,
            0,
            &[
                A::P(x),
                A::I(n as i32),
                A::P(part),
                A::P(self.ctr(CTR_PICK)),
                A::P(out),
            ],
        )
    }

    /// Directional steering of `n` rows of `e` (`ops::dir_steer` for each `(direction, scale)`
    /// of `slots`, in order): `y = f` (`f` may be `y`), or `y = routed + f` (f32) when `routed`
    /// is not 0 (the FFN output the HC post would form), then the edits. Nothing is launched
    /// without slots.
    pub fn dir_steer(
        &self,
        y: u64,
        f: u64,
        routed: u64,
        e: usize,
        n: usize,
        slots: &[(u64, f32)],
    ) -> Result<(), CudaError> {
        if slots.is_empty() {
            return Ok(());
        }
        if slots.len() > STEER_MAX {
            return Err(cerr(format!(
                "dir_steer: {} slots, at most {STEER_MAX}",
                slots.len()
            )));
        }
        let mut a = SteerArgs {
            y,
            f,
            routed,
            e: e as i64,
            nslot: slots.len() as i64,
            ..Default::default()
        };
        for (i, &(d, s)) in slots.iter().enumerate() {
            a.dir[i] = d;
            a.scale[i] = s as f64;
        }
        self.go_struct(&self.dir_steer, n, STEER_T, 0, &a)
    }

    /// HC head + output norm of one token.
    pub fn hc_head_dec(
        &self,
        mix: u64,
        scale: f32,
        base: u64,
        hc_eps: f32,
        x: u64,
        hc: usize,
        e: usize,
        norm: u64,
        rms_eps: f32,
        hn: u64,
    ) -> Result<(), CudaError> {
        self.go(
            &self.hc_head_dec,
            (DEC_HC_BLOCKS, 1, 1),
            DEC_HC_THREADS,
            0,
            &[
                A::P(mix),
                A::F(scale),
                A::P(base),
                A::F(hc_eps),
                A::P(x),
                A::I(hc as i32),
                A::I(e as i32),
                A::P(norm),
                A::F(rms_eps),
                A::P(hn),
            ],
        )
    }

    /// The q heads, the KV row, the compressors and the indexer queries of one decode token
    /// (one launch; see `ds4_qkv_dec`).
    pub fn qkv_dec(&self, p: &QkvDec) -> Result<(), CudaError> {
        let iq_blocks = if p.iq != 0 { p.nih as usize } else { 0 };
        let smem = [p.hd, p.comp[0].d_c, p.comp[1].d_c, p.ihd]
            .into_iter()
            .max()
            .unwrap_or(0) as usize
            * 4;
        self.go_struct(
            &self.qkv_dec,
            p.nh as usize + 3 + iq_blocks,
            QKV_DEC_THREADS,
            smem,
            p,
        )
    }

    /// Attention (+ inverse RoPE) of one token into `heads`, through the score buffer `s`
    /// (`nh` rows of `s_stride` doubles, at least the rows the token attends to, then the chunk
    /// maxima) and the split partials `part` (sizes: [`attn_dec_bytes`]). With
    /// `q8 = Some((qs, d))` the heads are also written as the Q8_0 activation of one row of
    /// `nh·hd` (the bytes `ds4_quant_q8_0` would write: qs at `qs`, the scales at `d`).
    pub fn attention_dec(
        &self,
        a: &AttnLaunch,
        s: u64,
        s_stride: usize,
        part: u64,
        q8: Option<(u64, u64)>,
    ) -> Result<(), CudaError> {
        let pm = s + (a.nh * s_stride * 8) as u64;
        let groups = a.nh.div_ceil(ATT_DEC_HPB);
        if groups * (a.hd / 64) > DEC_COUNTERS - CTR_ATT {
            return Err(cerr("attention_dec: too many heads"));
        }
        self.go(
            &self.attn_dec_scores,
            (att_chunks(), a.nh.div_ceil(ATT_SCORES_HPB), 1),
            ATT_SCORES_THREADS,
            0,
            &[
                A::P(a.q),
                A::P(a.ring),
                A::I(a.raw_cap as i32),
                A::I(a.window as i32),
                A::P(a.comp),
                A::I(a.ratio as i32),
                A::I(a.has_indexer as i32),
                A::P(a.isel),
                A::I(a.topk as i32),
                A::F(a.scale),
                A::I(a.nh as i32),
                A::I(a.hd as i32),
                A::P(a.pos),
                A::P(s),
                A::L(s_stride as i64),
                A::P(pm),
            ],
        )?;
        self.go(
            &self.attn_dec_out,
            (groups, a.hd / 64, att_dec_splits()),
            ATT_DEC_HPB * 32,
            0,
            &[
                A::P(s),
                A::L(s_stride as i64),
                A::P(pm),
                A::I(att_chunks() as i32),
                A::P(a.ring),
                A::I(a.raw_cap as i32),
                A::I(a.window as i32),
                A::P(a.comp),
                A::I(a.ratio as i32),
                A::I(a.has_indexer as i32),
                A::P(a.isel),
                A::I(a.topk as i32),
                A::P(a.sinks),
                A::I(a.nh as i32),
                A::I(a.hd as i32),
                A::I(a.n_rot as i32),
                A::P(a.inv_freq),
                A::P(a.pos),
                A::P(part),
                A::P(self.ctr(CTR_ATT)),
                A::P(a.heads),
                A::P(q8.map_or(0, |(qs, _)| qs)),
                A::P(q8.map_or(0, |(_, d)| d)),
            ],
        )
    }
}
