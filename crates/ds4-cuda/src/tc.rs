//! Tensor-core prefill routes (owner: "tc"; kernels in `kernels/tc.cu`).
//!
//! Chunks of at least [`MIN_TOKENS`] tokens run their weight products as GEMMs on the tensor
//! cores instead of the decode-style matvec kernels of [`crate::gemv`] (which read the weights
//! once per 8 tokens). Every route keeps ds4's activation numerics (its int8 / Q8_K
//! activation quantization):
//!
//! | route (switch) | weights | operands | numerics vs the exact path |
//! |---|---|---|---|
//! | `dense` (`DS4_CUDA_TC_DENSE_DISABLE`), f16 form (opt-in: `DS4_CUDA_TC_DENSE_F16=1`) | Q8_0 q_a, q_b, kv, out_b, shared gate/up/down | weights `q·d` and ds4's int8 activations `q_x·d_x` rounded to f16 after a power-of-two scaling, cuBLAS f16 GEMM with f32 accumulation ([`crate::tc_f16`]) | ≤ 2^-10 relative per product vs the exact path's product |
//! | `dense`, int8 form (default; always for the LM head, too large for the f16 scratch) | as above | int8 × int8 (`wgmma m64n64k32 s8` for chunks of more than 32 tokens, `mma m16n8k32 s8` otherwise; `DS4_CUDA_TC_DENSE_WG=0`: mma.sync always), activations from [`Gemv::quantize_act`] | each 32-block's integer dot exact; the block term `(d_w·d_x)·isum` added with one FMA |
//! | `attn_out` (`…_ATTN_OUT_DISABLE`) | Q8_0 `attn_output_a` (8 groups) | as dense (f16 form: a strided-batched GEMM) | as dense |
//! | `f16` (`…_F16_DISABLE`) | F16 HC mixing, router, compressors, indexer | f16 × (f16 hi + f16 lo) (`wgmma m64n64k16`, `ds4_tc_f16_wg64_s`; `DS4_CUDA_TC_F16_WG=0`: `mma m16n8k16`, d0's `ds4_tc_f16_64_s`), f32 accumulation, per 16 columns the hi then the lo product; matrices of ≤ 32 rows (HC mixing): f16 × (tf32 hi + lo) (`mma m16n8k8`, kernels/tc_skinny.cu, x read once, no prep pass; `DS4_CUDA_TC_F16_SKINNY=0` turns it off) | ~f32 (x carried to 22 bits) |
//! | `moe_gate` + `moe_up` (fused) | IQ2_XXS / Q2_K / Q4_K / Q8_0 routed gate and up, SwiGLU and the routing weight fused | int8 × Q8_K int8, weights dequantised to exact int8 in shared memory | every super-block's integer sums exact, its f32 term formed as on the CPU |
//! | `moe_down` (`…_MOE_DOWN_DISABLE`) | routed down + fixed-order 6-expert sum | as gate/up | as gate/up; the sum over the k experts in slot order in f64 like the CPU |
//! | `attn` (`…_ATTN_DISABLE`) | chunk attention over the window + compressed rows (`crate::attn_tc`) | f16 hi + lo (`mma m16n8k16`, 3 per product; 2 where the rows are exact in f16), f32 accumulation, f32 online softmax | ~1e-6 relative (`DS4_CUDA_TC_ATTN_F16=1`: plain f16, ~1e-3) |
//!
//! `DS4_CUDA_TC_DISABLE=1` turns every route off; `--quality` (`CudaOptions::quality`) too.
//! The gate and up projections are one fused kernel: both `moe_gate` and `moe_up` must be on
//! for it, otherwise both run on the exact path.
//!
//! So on quantized weights a route differs from the exact path only in the order of the f32
//! sum over a row's block terms (plus, for Q8_0, one rounding per block term): the same size
//! of difference as between the exact path and the CPU.
//!
//! Routed MoE is a grouped GEMM: the (token, slot) pairs of a chunk are bucketed by expert on
//! the device (counts → offsets → permutation, `ds4_tc_moe_bucket`; no host synchronisation,
//! capture-safe), then each CTA takes up to BN pairs of one expert and 64 (gate+up) or 128
//! (down) weight rows. Down writes one row per pair; `ds4_tc_moe_sum` adds a token's k rows in
//! slot order (deterministic, no atomics on outputs). Chunks are processed in sub-batches of
//! at most [`MOE_MAX_TOKENS`] tokens (bounds the per-pair scratch), or, when the pass is larger
//! (`TcConfig::max_tokens` ≥ 2·[`MOE_MAX_TOKENS`], e.g. `--prefill-chunk 8192`), of up to the
//! pass size capped at [`MOE_MAX_PASS_TOKENS`] (fuller 64-pair tiles: on an H100 at 8192
//! tokens, one sub-batch instead of four makes gate+up 1.13× and down 1.13× faster,
//! bench/results/h100/moe-bn128-s7.md). Tiles take 32 or 64 pairs; 128-pair kernels exist for
//! IQ2_XXS gate+up and Q2_K down (one CTA per SM: the dequantised weight tile serves twice the
//! pairs) but measured slower than 64-pair tiles at ~192 pairs per expert (gate+up 9.57 vs
//! 8.43 ms, down 4.71 vs 4.51 ms at 8192 tokens, H100), so they are opt-in. Every width gives
//! bit-identical results (same per-super-block order). `DS4_CUDA_TC_MOE_BN=32|64|128` forces
//! the width (where that kernel exists) and `DS4_CUDA_TC_MOE_BATCH=N` the sub-batch (A/B
//! measurements).
//!
//! The compute calls only enqueue kernels on the stream (graph-capture safe); they take raw
//! device addresses and are `unsafe`: the caller guarantees the buffer sizes stated on each.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, sys};
use ds4_gguf::GgmlType;

use crate::gemv::DevWeight;
use crate::rt::{A, DBuf, drv, launch};
use crate::tc_f16::{DenseF16, F16Limits};
use crate::{CudaError, TcRoutes};

/// Smallest number of tokens that takes a route.
pub const MIN_TOKENS: usize = TcRoutes::MIN_TOKENS;
/// Tokens per routed-MoE sub-batch for passes of fewer than 2·`MOE_MAX_TOKENS` tokens.
pub const MOE_MAX_TOKENS: usize = 2048;
/// Most tokens per routed-MoE sub-batch of a larger pass (the sub-batch follows
/// `TcConfig::max_tokens` up to this): the per-pair scratch is `tokens·k·down_rows·4` bytes
/// (805 MB at 8192 × 6 × 4096).
pub const MOE_MAX_PASS_TOKENS: usize = 8192;

/// Tokens per routed-MoE sub-batch for `cfg` (see the module docs); `DS4_CUDA_TC_MOE_BATCH`
/// overrides it (bounded by `cfg.max_tokens`).
fn moe_batch(cfg: &TcConfig) -> usize {
    let env = std::env::var("DS4_CUDA_TC_MOE_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v >= 1);
    let auto = if cfg.max_tokens >= 2 * MOE_MAX_TOKENS {
        MOE_MAX_PASS_TOKENS
    } else {
        MOE_MAX_TOKENS
    };
    env.unwrap_or(auto).min(cfg.max_tokens).max(1)
}

/// Weight rows one CTA covers (shared-memory A rows).
const BM: usize = 128;
/// Scratch for split-K partial sums (small dense GEMMs that would not fill the card).
const SPLITK_BYTES: usize = 32 << 20;
/// Most split-K parts.
const MAX_SPLITS: usize = 16;
const THREADS: u32 = 256;
/// Warps per CTA of the skinny F16 kernels (`SK_WARPS` in kernels/tc_skinny.cu).
const SKINNY_WARPS: u32 = 16;

fn terr(msg: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(format!("tc: {msg}"))
}

const fn align256(x: usize) -> usize {
    x.div_ceil(256) * 256
}

/// Kernel parameters (`struct TcArgs` in tc.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TcArgs {
    wa0: u64,
    wa1: u64,
    wa2: u64,
    wb0: u64,
    wb1: u64,
    wb2: u64,
    aq: u64,
    ad: u64,
    ascale: u64,
    list: u64,
    cnt: u64,
    off: u64,
    toff: u64,
    wts: u64,
    y: u64,
    r: i32,
    c: i32,
    nb: i32,
    cx: i32,
    grouped: i32,
    n: i32,
    n_exp: i32,
    kdiv: i32,
    ldy: i32,
    kspl: i32,
    nspl: i32,
    ysplit: i32,
    clamp: f32,
}

impl TcArgs {
    /// No split-K.
    fn new() -> TcArgs {
        TcArgs {
            kspl: 1 << 30,
            nspl: 1,
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WKind {
    Q8_0 = 0,
    Iq2Xxs = 1,
    Q2K = 2,
    Q4K = 3,
    F16 = 4,
}

impl WKind {
    fn of(ty: GgmlType) -> Option<WKind> {
        Some(match ty {
            GgmlType::Q8_0 => WKind::Q8_0,
            GgmlType::IQ2_XXS => WKind::Iq2Xxs,
            GgmlType::Q2_K => WKind::Q2K,
            GgmlType::Q4_K => WKind::Q4K,
            GgmlType::F16 => WKind::F16,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        ["q8_0", "iq2_xxs", "q2_k", "q4_k", "f16"][self as usize]
    }
    /// Elements per weight block (Q8_0: 32; K-quants: 256; F16: 1).
    fn block(self) -> usize {
        match self {
            WKind::Q8_0 => 32,
            WKind::F16 => 1,
            _ => 256,
        }
    }
    /// Elements per activation scale (Q8_0: 32, Q8_K: 256).
    fn act_block(self) -> usize {
        if self == WKind::Q8_0 { 32 } else { 256 }
    }
    /// Whether a matrix of `cols` columns (and `rt` rows in all) is supported.
    fn cols_ok(self, cols: usize, rt: usize) -> bool {
        match self {
            WKind::Q8_0 => cols.is_multiple_of(64),
            WKind::F16 => cols.is_multiple_of(16),
            WKind::Iq2Xxs => cols.is_multiple_of(256) && (rt * (cols / 256)).is_multiple_of(2),
            WKind::Q2K | WKind::Q4K => cols.is_multiple_of(256),
        }
    }
}

/// One launch of a skinny tf32 kernel (`ds4_tc_skinny_tf32_*`, or the scaled `..._tf32s_*` with
/// the per-token f64 factors `xs`): `y[t] = W·x[t]` for `n` tokens.
#[allow(clippy::too_many_arguments)]
fn skinny_launch(
    stream: &CudaStream,
    f: &CudaFunction,
    w: &DevWeight,
    w0: u64,
    x: u64,
    n: usize,
    y: u64,
    xs: Option<u64>,
) -> Result<(), CudaError> {
    let rows = w.rows() as i32;
    let mut args = vec![
        A::P(x),
        A::P(w0),
        A::I(rows),
        A::I(w.cols() as i32),
        A::I(n as i32),
        A::P(y),
        A::I(rows),
    ];
    if let Some(xs) = xs {
        args.push(A::P(xs));
    }
    launch(
        stream,
        f,
        (n.div_ceil(16) as u32, 1, 1),
        32 * SKINNY_WARPS,
        0,
        &args,
    )
}

/// Region addresses of a weight in gemv's device layout ([`DevWeight::region_ptrs`]; unused
/// entries 0).
fn regions(w: &DevWeight, stream: &CudaStream) -> (u64, u64, u64) {
    let ([p0, p1, p2], _g) = w.region_ptrs(stream);
    match WKind::of(w.ty()) {
        Some(WKind::Q8_0) | Some(WKind::Iq2Xxs) => (p0, p1, 0),
        Some(WKind::Q2K) => (p0, p1, p2),
        _ => (p0, 0, 0),
    }
}

/// Offset of the scales in gemv's activation scratch for `n` rows of `cols` (qs come first).
fn act_d_offset(cols: usize, n: usize) -> u64 {
    align256(n * cols) as u64
}

/// Scratch sizes of a [`Tc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcConfig {
    /// Most tokens per call.
    pub max_tokens: usize,
    /// Most activation columns (`cols · n_mat`) of an F16 matrix.
    pub max_f16_cols: usize,
    /// Routed experts (≤ 1024).
    pub n_expert: usize,
    /// Experts per token.
    pub n_expert_used: usize,
    /// Rows of the routed down projection (n_embd).
    pub down_rows: usize,
    /// Scratch of the f16 form of `dense` / `attn_out` ([`TcRoutes::dense_f16`]): most weight
    /// elements of one Q8_0 matrix (a shared gate/up pair counts both; 0: no f16 form, the
    /// int8 kernels take every matrix). Larger matrices (the LM head) use the int8 kernels.
    pub max_dense_elems: usize,
    /// Most activation columns (`cols · n_mat`) of a Q8_0 matrix on the f16 form.
    pub max_dense_cols: usize,
    /// Most rows of the shared expert's gate on the f16 form.
    pub max_pair_rows: usize,
}

struct Kern {
    f: CudaFunction,
    smem: u32,
    /// Resident CTAs per SM (the kernel's `__launch_bounds__` minimum).
    minb: u32,
}

/// The dense Q8_0 GEMM kernels for chunks of more than 32 tokens (`DS4_CUDA_TC_DENSE_WG`):
/// `64` (default) = `ds4_tc_q8_0_wg64_*`, wgmma (sm_90a) on 128-row × 64-token tiles, the exact
/// block integer dot converted by `I2FP`; `64m` = `ds4_tc_q8_0_wg64m_*`, the same with d0's
/// magic-number conversion (same values, one more instruction per output and block); `0` = the
/// mma.sync kernels `ds4_tc_q8_0_64_*` (d0). Chunks of at most 32 tokens use d0's 32-token
/// kernels, and routed experts d0's kernels, in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WgVar {
    Off,
    Wg64,
    Wg64m,
}

impl WgVar {
    fn from_env() -> WgVar {
        match std::env::var("DS4_CUDA_TC_DENSE_WG").as_deref() {
            Ok("0") => WgVar::Off,
            Ok("64m") => WgVar::Wg64m,
            _ => WgVar::Wg64,
        }
    }
    /// Kernel name stem (`ds4_tc_q8_0_{stem}_{s,g}`).
    fn stem(self) -> Option<&'static str> {
        match self {
            WgVar::Off => None,
            WgVar::Wg64 => Some("wg64"),
            WgVar::Wg64m => Some("wg64m"),
        }
    }
}

/// Tokens per tile of the wgmma kernels.
const WG_BN: usize = 64;

/// GEMM kernel variants: (kind, tile width BN, index of its shared-memory size and of its CTAs
/// per SM in `ds4_tc_smem_sizes`' output, modes instantiated: false = store, true = SwiGLU).
const SMEM_ORDER: [(WKind, usize, usize, usize, &[bool]); 11] = [
    (WKind::Q8_0, 32, 0, 10, &[false, true]),
    (WKind::Q8_0, 64, 1, 10, &[false, true]),
    (WKind::Iq2Xxs, 32, 2, 11, &[false, true]),
    (WKind::Iq2Xxs, 64, 3, 11, &[false, true]),
    (WKind::Q2K, 32, 4, 12, &[false, true]),
    (WKind::Q2K, 64, 5, 12, &[false, true]),
    (WKind::Q4K, 32, 6, 13, &[false, true]),
    (WKind::Q4K, 64, 7, 13, &[false, true]),
    (WKind::F16, 64, 8, 14, &[false]),
    // 128-pair routed-MoE tiles (one CTA per SM): IQ2_XXS gate+up, Q2_K down.
    (WKind::Iq2Xxs, 128, 17, 18, &[true]),
    (WKind::Q2K, 128, 19, 20, &[false]),
];

/// The tensor-core route kernels, their scratch and the routes in force.
pub struct Tc {
    _module: Arc<CudaModule>,
    routes: TcRoutes,
    cfg: TcConfig,
    sms: u32,
    /// (kind, bn, swiglu) → kernel.
    gemm: Vec<((WKind, usize, bool), Kern)>,
    /// Tokens per routed-MoE sub-batch ([`moe_batch`]).
    moe_tok: usize,
    /// Forced routed-MoE tile width (`DS4_CUDA_TC_MOE_BN`, [`Tc::set_moe_bn`]).
    moe_bn_force: Option<usize>,
    /// The wgmma dense Q8_0 kernels in use (store, SwiGLU) and their tile width.
    wg: Option<(Kern, Kern, usize)>,
    /// The wgmma F16 kernel (`ds4_tc_f16_wg64_s`) unless `DS4_CUDA_TC_F16_WG=0` (then d0's
    /// `ds4_tc_f16_64_s`; [`Tc::set_f16_wg`] for tests).
    f16wg: Kern,
    f16wg_on: bool,
    prep: CudaFunction,
    bucket: CudaFunction,
    sum: CudaFunction,
    splitk_sum: CudaFunction,
    splitk: DBuf,
    f16_hi: DBuf,
    f16_lo: DBuf,
    f16_scale: DBuf,
    cnt: DBuf,
    off: DBuf,
    toff: DBuf,
    perm: DBuf,
    part: DBuf,
    /// The f16 (cuBLAS) form of `dense` / `attn_out`, when [`TcRoutes::dense_f16`].
    f16d: Option<DenseF16>,
    /// `ds4_tc_skinny_tf32_{1..4}` (kernels/tc_skinny.cu): F16 matrices of ≤ 32 rows, when on.
    skinny: Option<(Arc<CudaModule>, Vec<CudaFunction>)>,
}

impl std::fmt::Debug for Tc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tc")
            .field("routes", &self.routes)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Tc {
    /// Load the kernels and allocate scratch for `cfg` (allocates; not for capture).
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        cfg: TcConfig,
        routes: TcRoutes,
    ) -> Result<Tc, CudaError> {
        if cfg.n_expert > 1024 {
            return Err(terr("more than 1024 experts"));
        }
        let module = crate::device::load_module(ctx, "tc")?;
        let func = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| terr(format!("kernel {name}: {e}")))
        };
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)? as u32;
        let smem_max = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(drv)? as u32;
        // Shared-memory sizes as the kernels compute them.
        let sizes_buf = DBuf::zeroed(stream, 32 * 4)?;
        launch(
            stream,
            &func("ds4_tc_smem_sizes")?,
            (1, 1, 1),
            32,
            0,
            &[A::P(sizes_buf.ptr)],
        )?;
        let mut sizes = [0i32; 32];
        crate::rt::dtoh(stream, &mut sizes, sizes_buf.ptr)?;
        if sizes[9] as usize != std::mem::size_of::<TcArgs>() {
            return Err(terr(format!(
                "kernel parameter block is {} bytes, host has {}",
                sizes[9],
                std::mem::size_of::<TcArgs>()
            )));
        }
        let mut gemm = Vec::new();
        for &(kind, bn, si, mi, modes) in SMEM_ORDER.iter() {
            let smem = sizes[si] as u32;
            let minb = sizes[mi].max(1) as u32;
            if smem > smem_max {
                return Err(terr(format!(
                    "{} tile needs {smem} B of shared memory, the device allows {smem_max}",
                    kind.name()
                )));
            }
            for &swiglu in modes {
                let name = format!(
                    "ds4_tc_{}_{bn}_{}",
                    kind.name(),
                    if swiglu { "g" } else { "s" }
                );
                let f = func(&name)?;
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(drv)?;
                gemm.push(((kind, bn, swiglu), Kern { f, smem, minb }));
            }
        }
        // The wgmma dense kernels: shared memory and CTAs per SM at sizes[15], sizes[16].
        let wg = match WgVar::from_env().stem() {
            None => None,
            Some(stem) => {
                let smem = sizes[15] as u32;
                if smem > smem_max {
                    return Err(terr(format!(
                        "{stem} tile needs {smem} B of shared memory, the device allows {smem_max}"
                    )));
                }
                let load = |mode: &str| -> Result<Kern, CudaError> {
                    let f = func(&format!("ds4_tc_q8_0_{stem}_{mode}"))?;
                    f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .map_err(drv)?;
                    Ok(Kern {
                        f,
                        smem,
                        minb: sizes[16].max(1) as u32,
                    })
                };
                Some((load("s")?, load("g")?, WG_BN))
            }
        };
        // The wgmma F16 kernel: shared memory and CTAs per SM at sizes[21], sizes[22].
        let f16wg = {
            let smem = sizes[21] as u32;
            if smem > smem_max {
                return Err(terr(format!(
                    "f16 wgmma tile needs {smem} B of shared memory, the device allows {smem_max}"
                )));
            }
            let f = func("ds4_tc_f16_wg64_s")?;
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(drv)?;
            Kern {
                f,
                smem,
                minb: sizes[22].max(1) as u32,
            }
        };
        let f16wg_on = std::env::var("DS4_CUDA_TC_F16_WG").as_deref() != Ok("0");
        let mut routes = routes;
        let f16d =
            if routes.dense_f16 && (routes.dense || routes.attn_out) && cfg.max_dense_elems > 0 {
                let lim = F16Limits {
                    max_tokens: cfg.max_tokens,
                    max_elems: cfg.max_dense_elems,
                    max_cols: cfg.max_dense_cols,
                    max_pair_rows: cfg.max_pair_rows,
                };
                match DenseF16::new(ctx, stream, lim) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        eprintln!("ds4-cuda: dense routes fall back to their int8 form: {e}");
                        routes.dense_f16 = false;
                        None
                    }
                }
            } else {
                None
            };
        let f16_elems = cfg.max_tokens * cfg.max_f16_cols;
        // The skinny F16 kernels; `DS4_CUDA_TC_F16_SKINNY=0` keeps those matrices on the general
        // f16 kernel (A/B measurements).
        let skinny = if std::env::var("DS4_CUDA_TC_F16_SKINNY").as_deref() == Ok("0") {
            None
        } else {
            let m = crate::device::load_module(ctx, "tc_skinny")?;
            // [plain 1..=4, scaled (ds4_tc_skinny_tf32s_*) 1..=4]
            let fs = ["", "s"]
                .iter()
                .flat_map(|v| (1..=4).map(move |nt| format!("ds4_tc_skinny_tf32{v}_{nt}")))
                .map(|name| {
                    m.load_function(&name)
                        .map_err(|e| terr(format!("kernel {name}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some((m, fs))
        };
        let moe_tok = moe_batch(&cfg);
        let pairs = moe_tok * cfg.n_expert_used;
        let moe_bn_force = std::env::var("DS4_CUDA_TC_MOE_BN")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|b| [32, 64, 128].contains(b));
        Ok(Tc {
            prep: func("ds4_tc_f16_prep")?,
            bucket: func("ds4_tc_moe_bucket")?,
            sum: func("ds4_tc_moe_sum")?,
            splitk_sum: func("ds4_tc_splitk_sum")?,
            splitk: DBuf::zeroed(stream, SPLITK_BYTES)?,
            moe_tok,
            moe_bn_force,
            wg,
            f16wg,
            f16wg_on,
            _module: module,
            routes,
            cfg,
            sms,
            gemm,
            f16_hi: DBuf::zeroed(stream, f16_elems * 2)?,
            f16_lo: DBuf::zeroed(stream, f16_elems * 2)?,
            f16_scale: DBuf::zeroed(stream, cfg.max_tokens * 4)?,
            cnt: DBuf::zeroed(stream, cfg.n_expert * 4)?,
            off: DBuf::zeroed(stream, cfg.n_expert * 4)?,
            toff: DBuf::zeroed(stream, (cfg.n_expert + 1) * 4)?,
            perm: DBuf::zeroed(stream, pairs * 4)?,
            part: DBuf::zeroed(stream, pairs * cfg.down_rows * 4)?,
            f16d,
            skinny,
        })
    }

    /// The routes in force.
    pub fn routes(&self) -> TcRoutes {
        self.routes
    }

    /// Scratch sizes.
    pub fn config(&self) -> TcConfig {
        self.cfg
    }

    /// Device bytes of the scratch.
    pub fn scratch_bytes(&self) -> usize {
        [
            &self.f16_hi,
            &self.f16_lo,
            &self.f16_scale,
            &self.cnt,
            &self.off,
            &self.toff,
            &self.perm,
            &self.part,
            &self.splitk,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum::<usize>()
            + self.f16d.as_ref().map_or(0, |f| f.scratch_bytes())
    }

    /// The f16 form's engine when it takes Q8_0 matrix `w` for `n` tokens.
    fn f16_for(&self, w: &DevWeight, n: usize) -> Option<&DenseF16> {
        self.f16d
            .as_ref()
            .filter(|f| w.ty() == GgmlType::Q8_0 && f.fits(w, n))
    }

    /// The skinny tf32 kernel for F16 matrix `w` (data at `w0`; one matrix of ≤ 32 rows, aligned
    /// rows) applied to activations at `x`, when on; `scaled`: the `..._tf32s_*` form of
    /// [`Tc::matmul_scaled`].
    fn skinny_for(&self, w: &DevWeight, w0: u64, x: u64, scaled: bool) -> Option<&CudaFunction> {
        let (fs, rows) = (&self.skinny.as_ref()?.1, w.rows());
        let ok = w.ty() == GgmlType::F16
            && w.n_mat() == 1
            && (1..=32).contains(&rows)
            && w.cols().is_multiple_of(16)
            && x.is_multiple_of(16)
            && w0.is_multiple_of(8);
        ok.then(|| &fs[4 * usize::from(scaled) + rows.div_ceil(8) - 1])
    }

    /// Whether [`Tc::matmul_scaled`] takes `w` for `n` tokens: [`Tc::matmul`] would run it on
    /// the skinny tf32 kernel (F16, one matrix of ≤ 32 rows).
    pub fn takes_matmul_scaled(&self, w: &DevWeight, n: usize, stream: &CudaStream) -> bool {
        let (w0, _, _) = regions(w, stream);
        self.takes_matmul(w, n) && self.skinny_for(w, w0, 0, true).is_some()
    }

    /// `y[t] = W·((float)(x[t]·xs[t]))` (the product in f64, per token `t`): the same values as
    /// [`Tc::matmul`] of the rows `(float)(x[t]·xs[t])` (what `ds4_hc_post_fast` stores as
    /// `flat`), without those rows in memory. Only where [`Tc::takes_matmul_scaled`].
    ///
    /// # Safety
    /// `x` is `[n][cols]` f32 (16-byte aligned), `xs` `[n]` f64, `y` has room for `n·rows`
    /// f32; all live device allocations used on `stream`.
    pub unsafe fn matmul_scaled(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: u64,
        xs: u64,
        n: usize,
        y: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let (w0, _, _) = regions(w, stream);
        let f = self
            .skinny_for(w, w0, x, true)
            .filter(|_| self.takes_matmul(w, n))
            .ok_or_else(|| terr(format!("unsupported scaled matmul {w:?} for {n} tokens")))?;
        skinny_launch(stream, f, w, w0, x, n, y, Some(xs))
    }

    /// Whether [`Tc::matmul`] of `w` runs on the f16 form of dense / attn_out.
    pub fn matmul_is_f16_form(&self, w: &DevWeight, n: usize) -> bool {
        self.f16_for(w, n).is_some()
    }

    /// Whether [`Tc::gate_up`] of the pair runs on the f16 form.
    pub fn gate_up_is_f16_form(&self, gate: &DevWeight, n: usize) -> bool {
        self.f16d.as_ref().is_some_and(|f| f.fits_pair(gate, n))
    }

    fn kern(&self, kind: WKind, bn: usize, swiglu: bool) -> Result<&Kern, CudaError> {
        self.gemm
            .iter()
            .find(|(k, _)| *k == (kind, bn, swiglu))
            .map(|(_, k)| k)
            .ok_or_else(|| terr(format!("no {} kernel for BN {bn}", kind.name())))
    }

    /// Whether [`Tc::matmul`] takes `w` for `n` tokens under the routes in force (type, shape,
    /// scratch and the route switch: Q8_0 single matrix → `dense`, grouped → `attn_out`,
    /// F16 → `f16`).
    pub fn takes_matmul(&self, w: &DevWeight, n: usize) -> bool {
        if n < MIN_TOKENS || n > self.cfg.max_tokens {
            return false;
        }
        let rt = w.rows() * w.n_mat();
        match WKind::of(w.ty()) {
            Some(WKind::Q8_0) => {
                let on = if w.n_mat() > 1 {
                    self.routes.attn_out
                } else {
                    self.routes.dense
                };
                on && WKind::Q8_0.cols_ok(w.cols(), rt)
            }
            Some(WKind::F16) => {
                self.routes.f16
                    && WKind::F16.cols_ok(w.cols(), rt)
                    && w.cols() * w.n_mat() <= self.cfg.max_f16_cols
            }
            _ => false,
        }
    }

    /// Whether [`Tc::gate_up`] takes the dense (shared-expert) pair (`dense` route).
    pub fn takes_gate_up(&self, gate: &DevWeight, up: &DevWeight, n: usize) -> bool {
        n >= MIN_TOKENS
            && n <= self.cfg.max_tokens
            && self.routes.dense
            && Self::pair_ok(gate, up)
            && gate.n_mat() == 1
            && gate.ty() == GgmlType::Q8_0
            && WKind::Q8_0.cols_ok(gate.cols(), gate.rows())
    }

    fn pair_ok(gate: &DevWeight, up: &DevWeight) -> bool {
        gate.ty() == up.ty()
            && gate.cols() == up.cols()
            && gate.rows() == up.rows()
            && gate.n_mat() == up.n_mat()
    }

    fn moe_ok(&self, w: &DevWeight, n: usize, k: usize) -> bool {
        n >= MIN_TOKENS
            && n <= self.cfg.max_tokens
            && k >= 1
            && k <= self.cfg.n_expert_used
            && w.n_mat() <= self.cfg.n_expert
            && WKind::of(w.ty())
                .is_some_and(|kd| kd != WKind::F16 && kd.cols_ok(w.cols(), w.rows() * w.n_mat()))
    }

    /// Whether [`Tc::moe_gate_up`] takes the routed pair (`moe_gate` and `moe_up` both on).
    pub fn takes_moe_gate_up(&self, gate: &DevWeight, up: &DevWeight, n: usize, k: usize) -> bool {
        self.routes.moe_gate
            && self.routes.moe_up
            && Self::pair_ok(gate, up)
            && self.moe_ok(gate, n, k)
    }

    /// Whether [`Tc::moe_down`] takes the routed down projection (`moe_down` on).
    pub fn takes_moe_down(&self, down: &DevWeight, n: usize, k: usize) -> bool {
        self.routes.moe_down && self.moe_ok(down, n, k) && down.rows() <= self.cfg.down_rows
    }

    fn launch_gemm(
        &self,
        stream: &CudaStream,
        k: &Kern,
        grid: (u32, u32, u32),
        a: &TcArgs,
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65535 || grid.2 > 65535 {
            return Err(terr(format!("grid {grid:?} too large")));
        }
        let mut p: [*mut c_void; 1] = [a as *const TcArgs as *mut c_void];
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: k.smem,
        };
        // SAFETY: the kernel takes one `TcArgs` by value (layout checked against the device's
        // sizeof at start-up); the callers guarantee every address in it covers what the kernel
        // reads and writes for this grid.
        unsafe { crate::rt::launch_raw(stream, &k.f, cfg, &mut p) }
    }

    /// `y[t] = W·x[t]` for `n` tokens (grouped when `w.n_mat() > 1`, as [`crate::gemv::Gemv::matvec`]),
    /// for a weight [`Tc::takes_matmul`] accepts (route switches aside).
    ///
    /// # Safety
    /// Q8_0: `act` holds `Gemv::quantize_act(Q8_0, x, n, cols·n_mat)` (its layout for `n`
    /// rows); F16: `x` is `[n][cols·n_mat]` f32 (`act` unused). `y` has room for
    /// `n·rows·n_mat` f32. All are live device allocations used on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: u64,
        act: u64,
        n: usize,
        y: u64,
    ) -> Result<(), CudaError> {
        // SAFETY: this function's contract.
        unsafe { self.matmul_inner(stream, w, x, act, n, y, false) }.map(|_| ())
    }

    /// [`Tc::matmul`] of an F16 weight that may reuse the f16 activation scratch: with
    /// `prep_held` the prep pass is skipped. Returns whether the scratch now holds `x`'s prep
    /// (the general F16 kernel ran; the skinny kernel reads `x` itself and leaves it as it was).
    ///
    /// # Safety
    /// As [`Tc::matmul`] for F16; with `prep_held`, the last call of this [`Tc`] that returned
    /// `true` was for the same `x`, `n` and `cols·n_mat`, no other F16 product ran on this
    /// `Tc` since (a skinny one aside), and `x` is unchanged.
    pub unsafe fn matmul_f16_reuse(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: u64,
        n: usize,
        y: u64,
        prep_held: bool,
    ) -> Result<bool, CudaError> {
        if w.ty() != GgmlType::F16 {
            return Err(terr(format!("{:?} weights for the f16 reuse", w.ty())));
        }
        if n == 0 {
            return Ok(prep_held);
        }
        // SAFETY: this function's contract.
        unsafe { self.matmul_inner(stream, w, x, 0, n, y, prep_held) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul_inner(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: u64,
        act: u64,
        n: usize,
        y: u64,
        prep_held: bool,
    ) -> Result<bool, CudaError> {
        if n == 0 {
            return Ok(false);
        }
        let kind = WKind::of(w.ty()).ok_or_else(|| terr(format!("{:?} weights", w.ty())))?;
        let rt = w.rows() * w.n_mat();
        if !kind.cols_ok(w.cols(), rt) || n > self.cfg.max_tokens {
            return Err(terr(format!("unsupported matmul {w:?} for {n} tokens")));
        }
        if let Some(f) = self.f16_for(w, n) {
            let cx = w.cols() * w.n_mat();
            // SAFETY: act holds x quantized for w, y is [n][rows·n_mat] (this function's
            // contract).
            return unsafe { f.matmul(stream, w, act, act + act_d_offset(cx, n), n, y) }
                .map(|_| false);
        }
        let cx = w.cols() * w.n_mat();
        let (w0, w1, w2) = regions(w, stream);
        let mut a = TcArgs {
            wa0: w0,
            wa1: w1,
            wa2: w2,
            r: w.rows() as i32,
            c: w.cols() as i32,
            nb: (w.cols() / kind.block()) as i32,
            cx: cx as i32,
            grouped: (w.n_mat() > 1) as i32,
            n: n as i32,
            kdiv: 1,
            ldy: rt as i32,
            y,
            ..TcArgs::new()
        };
        let mut wgk = None;
        let bn = match kind {
            WKind::Q8_0 => {
                a.aq = act;
                a.ad = act + act_d_offset(cx, n);
                match &self.wg {
                    Some((ks, _, wbn)) if n > 32 => {
                        wgk = Some(ks);
                        *wbn
                    }
                    _ => {
                        if n <= 32 {
                            32
                        } else {
                            64
                        }
                    }
                }
            }
            WKind::F16 => {
                if let Some(f) = self.skinny_for(w, w0, x, false) {
                    return skinny_launch(stream, f, w, w0, x, n, y, None).map(|_| prep_held);
                }
                if cx > self.cfg.max_f16_cols {
                    return Err(terr("F16 activations exceed the scratch"));
                }
                if !prep_held {
                    launch(
                        stream,
                        &self.prep,
                        (n as u32, 1, 1),
                        256,
                        0,
                        &[
                            A::P(x),
                            A::I(cx as i32),
                            A::P(self.f16_hi.ptr),
                            A::P(self.f16_lo.ptr),
                            A::P(self.f16_scale.ptr),
                        ],
                    )?;
                }
                a.aq = self.f16_hi.ptr;
                a.ad = self.f16_lo.ptr;
                a.ascale = self.f16_scale.ptr;
                if self.f16wg_on {
                    wgk = Some(&self.f16wg);
                }
                64
            }
            _ => return Err(terr(format!("{:?} is not a dense route type", w.ty()))),
        };
        let k = match wgk {
            Some(k) => k,
            None => self.kern(kind, bn, false)?,
        };
        // F16: the split-K count is that of d0's kernel (one CTA per SM) for the wgmma kernel
        // too, so both give the same bits (their per-split sums agree bit for bit).
        let minb = if kind == WKind::F16 {
            self.kern(kind, bn, false)?.minb
        } else {
            k.minb
        };
        // Split K when the tiles would not fill the card (fixed-order partial-sum reduction).
        let nkb = (w.cols() * if kind == WKind::F16 { 2 } else { 1 }).div_ceil(256);
        let ctas = n.div_ceil(bn) * w.rows().div_ceil(BM) * w.n_mat();
        let target = self.sms as usize * minb as usize;
        let total = n * rt;
        let mut nspl = 1;
        if ctas < target && nkb > 1 {
            nspl = target.div_ceil(ctas).min(nkb).min(MAX_SPLITS);
            while nspl > 1 && nspl * total * 4 > self.splitk.bytes {
                nspl -= 1;
            }
        }
        let kspl = nkb.div_ceil(nspl);
        let nspl = nkb.div_ceil(kspl);
        if nspl > 1 {
            a.kspl = kspl as i32;
            a.nspl = nspl as i32;
            a.ysplit = total as i32;
            a.y = self.splitk.ptr;
        }
        let grid = (
            n.div_ceil(bn) as u32,
            w.rows().div_ceil(BM) as u32,
            (w.n_mat() * nspl) as u32,
        );
        self.launch_gemm(stream, k, grid, &a)?;
        if nspl > 1 {
            let blocks = total.div_ceil(256).min(self.sms as usize * 8) as u32;
            launch(
                stream,
                &self.splitk_sum,
                (blocks, 1, 1),
                256,
                0,
                &[
                    A::P(self.splitk.ptr),
                    A::I(nspl as i32),
                    A::L(total as i64),
                    A::P(y),
                ],
            )?;
        }
        Ok(kind == WKind::F16)
    }

    /// Dense gate/up/SwiGLU (shared expert): `mid[t][r] = silu(min(g,c))·clamp(u,±c)` as
    /// [`crate::gemv::Gemv::gate_up_swiglu`], for a pair [`Tc::takes_gate_up`] accepts.
    ///
    /// # Safety
    /// `act` holds `Gemv::quantize_act(Q8_0, x, n, cols)`; `mid` has room for `n·rows` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gate_up(
        &self,
        stream: &Arc<CudaStream>,
        gate: &DevWeight,
        up: &DevWeight,
        act: u64,
        n: usize,
        clamp: f32,
        mid: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if !Self::pair_ok(gate, up)
            || gate.ty() != GgmlType::Q8_0
            || gate.n_mat() != 1
            || !WKind::Q8_0.cols_ok(gate.cols(), gate.rows())
            || n > self.cfg.max_tokens
        {
            return Err(terr(format!("unsupported gate/up pair {gate:?} {up:?}")));
        }
        if let Some(f) = self.f16d.as_ref().filter(|f| f.fits_pair(gate, n)) {
            let ad = act + act_d_offset(gate.cols(), n);
            // SAFETY: act holds x quantized for the pair, mid is [n][rows] (this function's
            // contract).
            return unsafe { f.gate_up(stream, gate, up, act, ad, n, clamp, mid) };
        }
        let (g0, g1, g2) = regions(gate, stream);
        let (u0, u1, u2) = regions(up, stream);
        let cols = gate.cols();
        let a = TcArgs {
            wa0: g0,
            wa1: g1,
            wa2: g2,
            wb0: u0,
            wb1: u1,
            wb2: u2,
            aq: act,
            ad: act + act_d_offset(cols, n),
            r: gate.rows() as i32,
            c: cols as i32,
            nb: (cols / 32) as i32,
            cx: cols as i32,
            n: n as i32,
            kdiv: 1,
            ldy: gate.rows() as i32,
            y: mid,
            clamp,
            ..TcArgs::new()
        };
        let (k, bn) = match &self.wg {
            Some((_, kg, wbn)) if n > 32 => (kg, *wbn),
            _ => {
                let bn = if n <= 32 { 32 } else { 64 };
                (self.kern(WKind::Q8_0, bn, true)?, bn)
            }
        };
        let grid = (
            n.div_ceil(bn) as u32,
            gate.rows().div_ceil(BM / 2) as u32,
            1,
        );
        self.launch_gemm(stream, k, grid, &a)
    }

    /// Routed-MoE tile width for `nt` tokens of `k` pairs over `n_exp` experts: 64 pairs from
    /// 40 per expert on average, else 32; [`Tc::set_moe_bn`] / `DS4_CUDA_TC_MOE_BN` force one
    /// (128: opt-in, measured slower, see the module docs).
    fn moe_bn(&self, kind: WKind, swiglu: bool, nt: usize, k: usize, n_exp: usize) -> usize {
        let auto = if nt * k >= 40 * n_exp { 64 } else { 32 };
        let bn = self.moe_bn_force.unwrap_or(auto);
        if bn == 128 && self.kern(kind, 128, swiglu).is_err() {
            64
        } else {
            bn
        }
    }

    /// Use the wgmma F16 kernel (`true`, the default unless `DS4_CUDA_TC_F16_WG=0`) or d0's
    /// mma.sync one for F16 matrices (A/B tests).
    pub fn set_f16_wg(&mut self, on: bool) {
        self.f16wg_on = on;
    }

    /// Force the routed-MoE tile width (32, 64 or 128; 128 falls back to 64 for the types
    /// without a 128-pair kernel), or `None` for the automatic choice (A/B tests).
    pub fn set_moe_bn(&mut self, bn: Option<usize>) -> Result<(), CudaError> {
        if bn.is_some_and(|b| ![32, 64, 128].contains(&b)) {
            return Err(terr(format!("MoE tile width {bn:?}")));
        }
        self.moe_bn_force = bn;
        Ok(())
    }

    /// Tokens per routed-MoE sub-batch.
    pub fn moe_batch_tokens(&self) -> usize {
        self.moe_tok
    }

    fn bucket(
        &self,
        stream: &CudaStream,
        ids: u64,
        npairs: usize,
        n_exp: usize,
        bn: usize,
    ) -> Result<(), CudaError> {
        launch(
            stream,
            &self.bucket,
            (1, 1, 1),
            1024,
            0,
            &[
                A::P(ids),
                A::I(npairs as i32),
                A::I(n_exp as i32),
                A::I(bn as i32),
                A::P(self.cnt.ptr),
                A::P(self.off.ptr),
                A::P(self.toff.ptr),
                A::P(self.perm.ptr),
            ],
        )
    }

    fn check_moe(&self, w: &DevWeight, n: usize, k: usize) -> Result<WKind, CudaError> {
        if !self.moe_ok(w, n.max(MIN_TOKENS), k) {
            return Err(terr(format!(
                "unsupported routed experts {w:?}, n {n}, k {k}"
            )));
        }
        WKind::of(w.ty()).ok_or_else(|| terr("type"))
    }

    /// Routed gate/up/SwiGLU as [`crate::gemv::Gemv::moe_gate_up`]: `mid[t][j][r] =
    /// silu(min(g,c))·clamp(u,±c)·w_tj` for the experts `ids[t][j]`.
    ///
    /// # Safety
    /// `act` holds `Gemv::quantize_act(gate.ty(), x, n, cols)`; `ids`, `wts` are `[n][k]`
    /// i32 / f32; `mid` has room for `n·k·rows` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_gate_up(
        &self,
        stream: &Arc<CudaStream>,
        gate: &DevWeight,
        up: &DevWeight,
        act: u64,
        ids: u64,
        wts: u64,
        n: usize,
        k: usize,
        clamp: f32,
        mid: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if !Self::pair_ok(gate, up) {
            return Err(terr("gate and up differ"));
        }
        let kind = self.check_moe(gate, n, k)?;
        let (g0, g1, g2) = regions(gate, stream);
        let (u0, u1, u2) = regions(up, stream);
        let cols = gate.cols();
        let rows = gate.rows();
        let n_exp = gate.n_mat();
        let od = act_d_offset(cols, n);
        let ab = kind.act_block();
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(self.moe_tok);
            let bn = self.moe_bn(kind, true, nt, k, n_exp);
            self.bucket(stream, ids + (4 * t0 * k) as u64, nt * k, n_exp, bn)?;
            let a = TcArgs {
                wa0: g0,
                wa1: g1,
                wa2: g2,
                wb0: u0,
                wb1: u1,
                wb2: u2,
                aq: act + (t0 * cols) as u64,
                ad: act + od + (4 * (t0 * cols / ab)) as u64,
                list: self.perm.ptr,
                cnt: self.cnt.ptr,
                off: self.off.ptr,
                toff: self.toff.ptr,
                wts: wts + (4 * t0 * k) as u64,
                y: mid + (4 * t0 * k * rows) as u64,
                r: rows as i32,
                c: cols as i32,
                nb: (cols / kind.block()) as i32,
                cx: cols as i32,
                n_exp: n_exp as i32,
                kdiv: k as i32,
                ldy: rows as i32,
                clamp,
                ..TcArgs::new()
            };
            let kern = self.kern(kind, bn, true)?;
            let grid = (
                ((nt * k).div_ceil(bn) + n_exp) as u32,
                rows.div_ceil(BM / 2) as u32,
                1,
            );
            self.launch_gemm(stream, kern, grid, &a)?;
            t0 += nt;
        }
        Ok(())
    }

    /// Routed down projection and the sum over each token's `k` experts, as
    /// [`crate::gemv::Gemv::moe_down`] (whose activation quantization the caller runs first):
    /// `out[t][r] = (f32) Σ_j (f64) (down[ids[t][j]] · mid[t][j])[r]`, NaN for a token with an
    /// id outside `0..n_mat`.
    ///
    /// # Safety
    /// `mid_act` holds `Gemv::quantize_act(down.ty(), mid, n·k, down.cols())`; `ids` is
    /// `[n][k]` i32; `out` has room for `n·rows` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_down(
        &self,
        stream: &Arc<CudaStream>,
        down: &DevWeight,
        mid_act: u64,
        ids: u64,
        n: usize,
        k: usize,
        out: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let kind = self.check_moe(down, n, k)?;
        let rows = down.rows();
        if rows > self.cfg.down_rows {
            return Err(terr("down rows exceed the scratch"));
        }
        let (p0, p1, p2) = regions(down, stream);
        let cols = down.cols();
        let n_exp = down.n_mat();
        let od = act_d_offset(cols, n * k);
        let ab = kind.act_block();
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(self.moe_tok);
            let bn = self.moe_bn(kind, false, nt, k, n_exp);
            let ids_t = ids + (4 * t0 * k) as u64;
            self.bucket(stream, ids_t, nt * k, n_exp, bn)?;
            let r0 = t0 * k;
            let a = TcArgs {
                wa0: p0,
                wa1: p1,
                wa2: p2,
                aq: mid_act + (r0 * cols) as u64,
                ad: mid_act + od + (4 * (r0 * cols / ab)) as u64,
                list: self.perm.ptr,
                cnt: self.cnt.ptr,
                off: self.off.ptr,
                toff: self.toff.ptr,
                y: self.part.ptr,
                r: rows as i32,
                c: cols as i32,
                nb: (cols / kind.block()) as i32,
                cx: cols as i32,
                n_exp: n_exp as i32,
                kdiv: 1,
                ldy: rows as i32,
                ..TcArgs::new()
            };
            let kern = self.kern(kind, bn, false)?;
            let grid = (
                ((nt * k).div_ceil(bn) + n_exp) as u32,
                rows.div_ceil(BM) as u32,
                1,
            );
            self.launch_gemm(stream, kern, grid, &a)?;
            let total = nt * rows;
            let blocks = total.div_ceil(256).min(self.sms as usize * 16) as u32;
            launch(
                stream,
                &self.sum,
                (blocks, 1, 1),
                256,
                0,
                &[
                    A::P(self.part.ptr),
                    A::P(ids_t),
                    A::I(nt as i32),
                    A::I(k as i32),
                    A::I(n_exp as i32),
                    A::I(rows as i32),
                    A::P(out + (4 * t0 * rows) as u64),
                ],
            )?;
            t0 += nt;
        }
        Ok(())
    }
}
