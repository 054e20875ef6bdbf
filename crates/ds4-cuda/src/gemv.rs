//! Weight-streaming matrix-vector kernels for decode (owner: "gemv"; kernels in `kernels/gemv.cu`).
//!
//! # API (frozen; additions only)
//!
//! ```text
//! Gemv::new(ctx: &Arc<CudaContext>) -> Result<Gemv, CudaError>
//! Gemv::supported(ty) -> bool                       // F32 F16 BF16 Q8_0 Q2_K Q4_K IQ2_XXS
//! Gemv::upload(&self, stream, ty, cols, rows, n_mat, gguf_bytes: &[u8]) -> Result<DevWeight>
//! Gemv::upload_device(&self, stream, ty, cols, rows, n_mat, raw: &impl DevicePtr<u8>) -> Result<DevWeight>
//! Gemv::stack_ok(ty, cols, rows: &[usize]) -> bool
//! Gemv::upload_stacked(&self, stream, ty, cols, parts: &[(rows, &[u8])]) -> Result<(DevWeight, Vec<DevWeight>)>
//! DevWeight::view(&self, row0, rows) -> Result<DevWeight>   // rows of one matrix, no copy
//! DevWeight::region_ptrs(&self, stream) -> ([u64; 3], guard) // the layout's region addresses
//! Gemv::act_bytes(ty, cols, n) -> usize             // scratch for n quantized activation rows
//! Gemv::quantize_act(&self, stream, ty, x, n, cols, act)
//! Gemv::matvec(&self, stream, w, x, act, n, y)      // y[t] = W·x[t]; act prepared by quantize_act
//! Gemv::matvec_x(&self, stream, w, x, act_scratch, n, y)   // quantize_act + matvec
//! Gemv::gate_up_swiglu(&self, stream, gate, up, x, act, n, clamp, mid)   // dense (shared expert)
//! Gemv::moe_gate_up(&self, stream, gate, up, x, act, ids, weights, n, k, clamp, mid)
//! Gemv::moe_down(&self, stream, down, mid, mid_act_scratch, ids, n, k, out)
//! Gemv::dense_tile_shapes(ty, n) -> &[(rows, steps)]   // what Tuning::force_tile indexes
//! ```
//!
//! * `stream: &Arc<CudaStream>`; device buffers are anything implementing cudarc's
//!   [`DevicePtr`] / [`DevicePtrMut`] (`CudaSlice`, `CudaView`, `CudaViewMut`). Lengths are in
//!   elements of the buffer type and may be larger than needed. Float buffers (`x`) and the
//!   activation scratch must be 16-byte aligned (every `CudaSlice` is; a view must start at a
//!   multiple of 4 floats / 16 bytes).
//! * None of the compute calls (`quantize_act`, `matvec*`, `gate_up_swiglu`, `moe_*`) allocates,
//!   synchronizes or copies to/from the host: they only enqueue kernels on `stream`, so they
//!   can be captured into a CUDA graph. (If cudarc's event tracking is on, reading the device
//!   pointers records cudarc's events as for any launch; turn it off for graph capture with
//!   `CudaContext::disable_event_tracking`.) `upload*` allocate, synchronize their stream after a repack
//!   kernel (the weight prologue of the decode kernels reads weights before the PDL wait), and
//!   are not for capture.
//! * Arguments are checked on the host (types, shapes, lengths, alignment) and a violation is
//!   `CudaError::Driver("gemv: ...")`. Expert ids are checked on the device: an id outside
//!   `0..n_mat` makes the affected outputs NaN (never an out-of-bounds read).
//!
//! # Shapes
//!
//! A [`DevWeight`] holds `n_mat` matrices of `rows × cols` (GGUF: `ne0 = cols`, rows of the
//! stacked tensor `n_mat·rows`), i.e. an expert tensor (`n_mat` = 256) or a dense matrix
//! (`n_mat` = 1) or a grouped projection (`attn_output_a`: `n_mat` = 8 groups of 1024 rows).
//!
//! * `matvec`: for token `t < n`, `x[t]` has `n_mat·cols` values and matrix `m` multiplies
//!   `x[t][m·cols ..(m+1)·cols]` into `y[t][m·rows ..(m+1)·rows]`; so `n_mat = 1` is a plain
//!   matvec and `n_mat = 8` is ds4's grouped output projection (model-spec §3.8).
//!   `y` is `[n][n_mat·rows]`. Any `n` works (tokens run in passes of up to 8 that read the
//!   weights once per pass).
//! * `moe_gate_up`: `ids`, `weights`: `[n][k]` (i32, f32) on the device; `mid` is
//!   `[n][k][rows]` with `mid[t][j] = silu(min(g, c))·clamp(u, ±c)·w_tj` where `g`, `u` are
//!   the gate/up rows of expert `ids[t][j]` times token `t`'s input (`x[t]`, `cols` values,
//!   quantized in `act` for quantized types). The SwiGLU is computed in f64 like the CPU
//!   (`ds4_model::ops::swiglu`); the clamp is skipped when `c ≤ 1e-6`. `k ≤ 8`.
//! * `gate_up_swiglu`: the same for a dense pair (shared expert): `mid` `[n][rows]`, weight 1.
//! * `moe_down`: quantizes `mid` (`[n·k][cols]`) into `mid_act_scratch`
//!   (`act_bytes(down.ty, cols, n·k)` bytes) and computes
//!   `out[t][r] = (f32) Σ_j acc_j` where `acc_j` is the unrounded f64 accumulator of
//!   `(down[ids[t][j]] · mid[t][j])[r]` (scale included): one rounding for the whole routed
//!   sum, as the numerics contract says. `out` is `[n][rows]`.
//!   (The shared-expert output is added by the caller, as the CPU does.)
//!
//! # Numerics (contract, tested in `tests/gemv.rs`)
//!
//! The same contract as the CPU (`ds4_quant` dot products and `QMatrix`): every float reduction
//! that feeds an f32 result is carried out in f64 with exact products or products in a fixed
//! order, and rounded to f32 once.
//!
//! * Activation quantization is bit-identical to `ds4_quant`: Q8_0 weights → ds4's float-scale
//!   int8 per 32 (`d = amax/127`, round-half-even); Q2_K / Q4_K / IQ2_XXS → Q8_K (§5.6);
//!   F32 / F16 / BF16 → none (`x` is read directly).
//! * Q8_0 × Q8_0-act: per block an exact integer `isum`;
//!   `term = ((f64) f16(w.d) · (f64) x.d) · (f64) isum` (two f64 products in this order; the
//!   first is exact); result `(f32) Σ term`.
//! * IQ2_XXS × Q8_K: exact integer `bsum` per block; `term = ((f64) f16(w.d) · (f64) y.d) ·
//!   (f64) bsum`; result `(f32)(0.125 · Σ term)`.
//! * Q2_K / Q4_K × Q8_K: exact integers `isum`, `summs`; `dall = (f64) y.d · (f64) f16(d)`,
//!   `dm = (f64) y.d · (f64) f16(dmin)`, `term = dall·isum − dm·summs` as two rounded products
//!   and one rounded subtraction (`__dmul_rn`/`__dsub_rn`: no FMA contraction); result
//!   `(f32) Σ term`.
//! * F16 / BF16 / F32 weights × f32 activations: `acc += (f64) w · (f64) x` (exact products);
//!   result `(f32) acc`.
//! * Sums over blocks, lanes, warp shuffles, split-K parts and the MoE down's `k` slots are all
//!   in f64 (in an order that differs from the CPU's); a scale (0.125) multiplies in f64 before
//!   the single final rounding. `moe_down` rounds each slot's row result to f32 (the CPU's
//!   per-expert matvec), then sums the `k` slots in f64 and rounds once more.
//!
//! Since all products are formed identically, only the order of an f64 sum differs from the CPU:
//! the f32 results are bit-identical except when the exact sum lies within ~1e-16 (relative) of
//! an f32 rounding boundary, where they differ by 1 ulp.
//!
//! # Device layouts (`DevWeight::region_ptrs` gives a weight's region addresses, views included)
//!
//! With `RT = n_mat·rows`, `nb = cols / block elements`, regions 256-byte aligned:
//! * F32, F16, BF16, Q4_K: the GGUF bytes unchanged (Q4_K blocks are 144 = 9·16 bytes).
//! * Q8_0: `qs [RT][cols] i8`, then `d [RT][nb] f16`.
//! * Q2_K: `qs [RT][nb][64]`, then `scales [RT][nb][16]`, then `(d | dmin << 16) [RT][nb] u32`.
//! * IQ2_XXS: `qs [RT][nb][64]`, then `d [RT][nb] f16`.
//!
//! A [`DevWeight`] may be a row-range view of another one's allocation (`view`, `upload_stacked`:
//! several matrices of one type and width stacked so that one matvec computes all of them, with
//! each matrix a view, no weight held twice): its regions then start `row0` rows into the
//! stack's regions. Every user of the layout (this module, `tc.rs`, `tc_f16.rs`, the backend)
//! takes the region addresses from `DevWeight::region_ptrs`.
//!
//! Activation scratch (`act_bytes`), for `n` rows of `cols`: Q8_0: `qs [n·cols] i8`, then
//! `d [n·cols/32] f32`; Q8_K: `qs [n·cols] i8`, `d [n·cols/256] f32`, `bsums [n·cols/16] i16`.
//!
//! # Kernels
//!
//! Tiles: a warp takes RR rows and streams them U warp steps at a time (a warp step is one
//! 16-byte load per lane and row), issuing all RR·U loads of a chunk before using any; the
//! lanes of one quant block reduce-scatter their exact integer partials so that every lane
//! forms f64 block terms for one row. Activations are read through L1, the weights with
//! streaming loads. Dense matvecs pick a tile shape and a split-K factor from the matrix shape
//! (enough warps to cover the card; more for float weights and for passes of several tokens).
//! `gate_up_swiglu` (shared expert) uses the same split-K tiles over (gate, up) row pairs and
//! reads the weights once per pass of up to 8 tokens. MoE gate/up runs (gate, up) row pairs of
//! the selected experts per warp; MoE down splits the (slot, step) sequence of each row tile
//! over several warps. IQ2_XXS decodes with PRMT from per-lane copies of its lookup tables in
//! shared memory (48 KiB per block). See the header of `kernels/gemv.cu` and
//! `bench/results/h200/decode-kernels-gemv.md` for the measurements behind the plans.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig,
};
use ds4_gguf::GgmlType;

use crate::CudaError;
use crate::device::load_module;

/// Weight types the kernels support.
pub const SUPPORTED: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

/// Threads per block of every compute kernel (at most; 8 warps).
const BLOCK: u32 = 256;
/// Dynamic shared memory of the IQ2_XXS kernels: 384 table entries × 32 lane copies × 4 bytes.
const IQ2_SMEM: u32 = 384 * 32 * 4;
/// Token buckets of the dense kernels (tokens per weight pass).
const NT_BUCKETS: [usize; 4] = [1, 2, 4, 8];
/// Largest `k` (experts per token) of the MoE kernels.
pub const MAX_K: usize = 8;

fn gerr(msg: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(format!("gemv: {msg}"))
}

fn drv(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

const fn align256(x: usize) -> usize {
    x.div_ceil(256) * 256
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    Q8_0 = 3,
    Q2K = 4,
    Q4K = 5,
    Iq2Xxs = 6,
}

const KIND_NAMES: [&str; 7] = ["f32", "f16", "bf16", "q8_0", "q2_k", "q4_k", "iq2_xxs"];

impl Kind {
    fn of(ty: GgmlType) -> Option<Kind> {
        Some(match ty {
            GgmlType::F32 => Kind::F32,
            GgmlType::F16 => Kind::F16,
            GgmlType::BF16 => Kind::Bf16,
            GgmlType::Q8_0 => Kind::Q8_0,
            GgmlType::Q2_K => Kind::Q2K,
            GgmlType::Q4_K => Kind::Q4K,
            GgmlType::IQ2_XXS => Kind::Iq2Xxs,
            _ => return None,
        })
    }

    /// Elements per block, bytes per GGUF block.
    fn block(self) -> (usize, usize) {
        match self {
            Kind::F32 => (1, 4),
            Kind::F16 | Kind::Bf16 => (1, 2),
            Kind::Q8_0 => (32, 34),
            Kind::Q2K => (256, 84),
            Kind::Q4K => (256, 144),
            Kind::Iq2Xxs => (256, 66),
        }
    }

    /// Columns one warp step covers (must match `Ty<T>::COLS` in gemv.cu).
    fn warp_cols(self) -> usize {
        match self {
            Kind::F32 => 128,
            Kind::F16 | Kind::Bf16 => 256,
            Kind::Q8_0 => 512,
            Kind::Q2K | Kind::Iq2Xxs => 2048,
            Kind::Q4K => 1024,
        }
    }

    /// Dense tile shapes `(rows, steps)` for the token bucket `nt` (1, 2, 4, 8), in order of
    /// preference (the first whose steps fit the row is taken): must match the `GEMV_INST` list
    /// of gemv.cu.
    fn dense_tiles(self, nt: usize) -> &'static [(usize, usize)] {
        match (self, nt) {
            (Kind::F32 | Kind::F16 | Kind::Bf16, 1 | 2) => &[(1, 8), (4, 2)],
            (Kind::F32 | Kind::F16 | Kind::Bf16, _) => &[(1, 8)],
            (Kind::Q8_0, 1) => &[(4, 2), (2, 4), (2, 8)],
            (Kind::Q8_0, 2) => &[(4, 2), (2, 4)],
            (Kind::Q8_0, _) => &[(2, 4)],
            (Kind::Q2K | Kind::Iq2Xxs, 1 | 2) => &[(4, 2), (8, 1)],
            (Kind::Q2K | Kind::Iq2Xxs, _) => &[(4, 2)],
            (Kind::Q4K, _) => &[(8, 1)],
        }
    }

    /// Tiles `(virtual rows = 2·row pairs, steps)` of the dense gate/up + SwiGLU kernels (the
    /// shared expert), as `dense_tiles`: must match the `GATE_UP_INST` list of gemv.cu.
    fn gate_up_dense_tiles(self, nt: usize) -> &'static [(usize, usize)] {
        match (self, nt) {
            (Kind::F32 | Kind::F16 | Kind::Bf16, _) => &[(2, 4)],
            (Kind::Q8_0, 1) => &[(4, 2), (2, 4)],
            (Kind::Q8_0, 2) => &[(4, 2)],
            (Kind::Q8_0, _) => &[(2, 4)],
            (Kind::Q2K | Kind::Iq2Xxs, _) => &[(4, 2)],
            (Kind::Q4K, _) => &[(8, 1)],
        }
    }

    /// MoE gate/up kernel variants `(name suffix, virtual rows = 2·row pairs, steps)`, the
    /// default first: must match the `MOE_GU_INST` list of gemv.cu.
    fn gate_up_variants(self) -> &'static [(&'static str, usize, usize)] {
        match self {
            Kind::F32 | Kind::F16 | Kind::Bf16 | Kind::Q8_0 => &[("", 2, 4)],
            Kind::Q2K => &[("", 4, 2)],
            Kind::Iq2Xxs => &[("", 4, 2), ("_lb3", 4, 2)],
            Kind::Q4K => &[("", 8, 1)],
        }
    }

    /// MoE down kernel variants `(name suffix, rows, steps)`, the default first: must match
    /// the `MOE_DOWN_INST` list of gemv.cu.
    fn down_variants(self) -> &'static [(&'static str, usize, usize)] {
        match self {
            Kind::F32 | Kind::F16 | Kind::Bf16 => &[("", 1, 8)],
            Kind::Q8_0 => &[("", 2, 4)],
            // `_lb3`: the 4×1 tiles capped at 85 registers (3 resident blocks of 256 threads
            // instead of 2): 11.6 vs 14.7 µs for the Flash Q2_K down, k = 6, on the H200.
            Kind::Q2K | Kind::Iq2Xxs => &[("_4x1_lb3", 4, 1), ("_4x1", 4, 1), ("", 4, 2)],
            Kind::Q4K => &[("", 8, 1)],
        }
    }

    /// Dynamic shared memory of this kind's kernels (the IQ2_XXS lookup tables).
    fn smem(self) -> u32 {
        if self == Kind::Iq2Xxs { IQ2_SMEM } else { 0 }
    }

    /// Column multiple the kernels need (block size; 16-byte lanes for float types).
    fn col_multiple(self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::F16 | Kind::Bf16 => 8,
            _ => self.block().0,
        }
    }

    fn act(self) -> ActKind {
        match self {
            Kind::F32 | Kind::F16 | Kind::Bf16 => ActKind::Float,
            Kind::Q8_0 => ActKind::Q8_0,
            Kind::Q2K | Kind::Q4K | Kind::Iq2Xxs => ActKind::Q8K,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    Float,
    Q8_0,
    Q8K,
}

/// (total bytes, offset of d, offset of bsums) of the activation scratch for `n` rows of `cols`.
fn act_layout(k: ActKind, cols: usize, n: usize) -> (usize, usize, usize) {
    let e = n * cols;
    match k {
        ActKind::Float => (0, 0, 0),
        ActKind::Q8_0 => {
            let od = align256(e);
            (od + 4 * (e / 32), od, 0)
        }
        ActKind::Q8K => {
            let od = align256(e);
            let ob = align256(od + 4 * (e / 256));
            (ob + 2 * (e / 16), od, ob)
        }
    }
}

/// (total bytes, region offsets) of the device layout of a weight.
fn weight_layout(k: Kind, cols: usize, rt: usize) -> (usize, [usize; 3]) {
    let (be, bb) = k.block();
    let nbt = rt * (cols / be);
    match k {
        Kind::F32 | Kind::F16 | Kind::Bf16 | Kind::Q4K => (nbt * bb, [0, 0, 0]),
        Kind::Q8_0 => {
            let o1 = align256(rt * cols);
            (o1 + 2 * nbt, [0, o1, 0])
        }
        Kind::Q2K => {
            let o1 = align256(64 * nbt);
            let o2 = align256(o1 + 16 * nbt);
            (o2 + 4 * nbt, [0, o1, o2])
        }
        Kind::Iq2Xxs => {
            let o1 = align256(64 * nbt);
            (o1 + 2 * nbt, [0, o1, 0])
        }
    }
}

/// Bytes one row takes in each region of the device layout (single-region kinds repeat the
/// value, so that a row offset moves every region pointer alike).
fn row_bytes(k: Kind, cols: usize) -> [usize; 3] {
    let (be, bb) = k.block();
    let nb = cols / be;
    match k {
        Kind::F32 | Kind::F16 | Kind::Bf16 | Kind::Q4K => [nb * bb; 3],
        // Unused third regions follow the first (what `weight_layout`'s zero offset gives).
        Kind::Q8_0 => [cols, 2 * nb, cols],
        Kind::Q2K => [64 * nb, 16 * nb, 4 * nb],
        Kind::Iq2Xxs => [64 * nb, 2 * nb, 64 * nb],
    }
}

/// A weight tensor in device memory, in this module's layout (see the module docs): its own
/// allocation, or a row-range view of a stacked allocation ([`Gemv::upload_stacked`],
/// [`DevWeight::view`]), in which case its regions lie inside the stack's regions.
pub struct DevWeight {
    ty: GgmlType,
    kind: Kind,
    cols: usize,
    rows: usize,
    n_mat: usize,
    data: Arc<CudaSlice<u8>>,
    /// Absolute byte offsets in `data` of the layout's regions (single-region kinds: all three
    /// the same).
    off: [usize; 3],
    /// Device bytes this weight accounts for (the allocation; a view: its rows' share).
    bytes: usize,
}

impl std::fmt::Debug for DevWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevWeight")
            .field("ty", &self.ty)
            .field("cols", &self.cols)
            .field("rows", &self.rows)
            .field("n_mat", &self.n_mat)
            .field("bytes", &self.bytes)
            .field("view", &self.is_view())
            .finish()
    }
}

impl DevWeight {
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Inputs per row (GGUF ne0).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Rows per matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of stacked matrices (experts / groups; 1 for a dense matrix).
    pub fn n_mat(&self) -> usize {
        self.n_mat
    }
    /// Device bytes held (the GGUF size plus at most a few hundred bytes of alignment); for a
    /// row-range view, the bytes of its rows (the stack holds them; views of one stack add up
    /// to it, less its alignment padding).
    pub fn device_bytes(&self) -> usize {
        self.bytes
    }
    /// Bytes of the GGUF tensor (what one full read streams).
    pub fn gguf_bytes(&self) -> usize {
        gguf_bytes(self.ty, self.cols, self.rows, self.n_mat).unwrap_or(0)
    }
    /// Bytes one matrix (one expert) streams.
    pub fn matrix_bytes(&self) -> usize {
        self.gguf_bytes() / self.n_mat.max(1)
    }
    /// Device addresses of the regions of this weight's layout (see the module docs, "Device
    /// layouts"): Q8_0 / IQ2_XXS `[qs, d, qs]`, Q2_K `[qs, scales, dm]`, F32 / F16 / BF16 /
    /// Q4_K the GGUF bytes (all three equal). Every user of the layout takes its addresses from
    /// here (views included). The guard is cudarc's read bookkeeping: hold it until the launch
    /// is enqueued.
    pub fn region_ptrs<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> ([u64; 3], cudarc::driver::SyncOnDrop<'a>) {
        let (p, g) = self.data.device_ptr(stream);
        (self.off.map(|o| p + o as u64), g)
    }
    /// Whether this weight shares its allocation with other weights (a row-range view).
    pub fn is_view(&self) -> bool {
        self.bytes != self.data.len() || self.off[0] != 0
    }
    /// Rows `row0 .. row0 + rows` of a single-matrix weight as a weight of their own, sharing
    /// the device memory (no copy): every region pointer moves by `row0` rows. Its regions must
    /// stay 16-byte aligned (else an error), which the matvec kernels need; the tensor-core
    /// kernels have only been given 256-byte aligned regions, as a plain allocation's are:
    /// the backend stacks only where [`Gemv::stack_ok`] says every view keeps that.
    pub fn view(&self, row0: usize, rows: usize) -> Result<DevWeight, CudaError> {
        if self.n_mat != 1 || rows == 0 || row0.checked_add(rows).is_none_or(|e| e > self.rows) {
            return Err(gerr(format!(
                "view of rows {row0}+{rows} of {self:?} (single matrices only)"
            )));
        }
        let rb = row_bytes(self.kind, self.cols);
        let mut off = self.off;
        for (o, b) in off.iter_mut().zip(rb) {
            *o += row0 * b;
        }
        if off.iter().any(|o| !o.is_multiple_of(16)) {
            return Err(gerr(format!(
                "view of rows {row0}+{rows} of {self:?}: regions not 16-byte aligned"
            )));
        }
        Ok(DevWeight {
            ty: self.ty,
            kind: self.kind,
            cols: self.cols,
            rows,
            n_mat: 1,
            data: self.data.clone(),
            off,
            bytes: gguf_bytes(self.ty, self.cols, rows, 1).unwrap_or(0),
        })
    }
}

/// GGUF byte size of `n_mat` matrices of `rows × cols` of type `ty` (None: unsupported type,
/// `cols` not a multiple of the block size, or overflow).
pub fn gguf_bytes(ty: GgmlType, cols: usize, rows: usize, n_mat: usize) -> Option<usize> {
    let k = Kind::of(ty)?;
    let (be, bb) = k.block();
    if !cols.is_multiple_of(be) {
        return None;
    }
    (cols / be)
        .checked_mul(bb)?
        .checked_mul(rows)?
        .checked_mul(n_mat)
}

/// Tuning knobs (defaults are what the benchmark chose; exposed for the benchmark and tests).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Dense matvecs: raise split-K (1, 2, 4, 8) until `tiles·split ≥ target_warps_per_sm · SMs`.
    pub target_warps_per_sm: u32,
    /// Force a split (1, 2, 4 or 8) for dense matvecs; 0 = automatic.
    pub force_split: u32,
    /// Force a dense tile shape: `i ≥ 1` takes entry `i − 1` (clamped) of the type's list
    /// (see [`Gemv::dense_tile_shapes`]); 0 = automatic.
    pub force_tile: u32,
    /// Force the MoE down split over (slot, step) pairs (1..=8, rounded up to a multiple of k and
    /// capped at the largest multiple of k ≤ 8); 0 = automatic.
    pub down_split: u32,
    /// MoE gate/up kernel variant (0 = the default; see `gate_up_variants` in gemv.rs).
    pub gate_up_variant: u32,
    /// MoE down kernel variant (0 = the default; see `down_variants` in gemv.rs).
    pub down_variant: u32,
    /// Cap on resident blocks per SM used to size grids (0 = the occupancy limit).
    pub max_blocks_per_sm: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            target_warps_per_sm: 15,
            force_split: 0,
            force_tile: 0,
            down_split: 0,
            gate_up_variant: 0,
            down_variant: 0,
            max_blocks_per_sm: 0,
        }
    }
}

impl Tuning {
    /// The defaults, with the MoE kernel variants taken from `DS4_CUDA_MOE_GU_VARIANT` and
    /// `DS4_CUDA_MOE_DOWN_VARIANT` when set (indexes into the per-kind variant lists; for A/B
    /// timing of whole decode steps).
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        let mut t = Tuning::default();
        if let Some(v) = var("DS4_CUDA_MOE_GU_VARIANT") {
            t.gate_up_variant = v;
        }
        if let Some(v) = var("DS4_CUDA_MOE_DOWN_VARIANT") {
            t.down_variant = v;
        }
        t
    }
}

struct Func {
    f: CudaFunction,
    /// Max resident blocks of BLOCK threads per SM.
    occ: u32,
    /// Tile rows and steps per chunk.
    rr: usize,
    u: usize,
    /// Dynamic shared memory bytes.
    smem: u32,
}

/// The loaded kernels. Cheap to share (`&Gemv` everywhere; all methods take `&self`).
pub struct Gemv {
    _module: Arc<CudaModule>,
    sms: u32,
    /// Per kind, per token bucket, the tile variants (`Kind::dense_tiles`).
    gemv: Vec<[Vec<Func>; 4]>,
    /// The same for the dense gate/up + SwiGLU kernels (`Kind::gate_up_dense_tiles`).
    gate_up_dense: Vec<[Vec<Func>; 4]>,
    /// Per kind, the MoE kernel variants (`Kind::gate_up_variants`, `Kind::down_variants`).
    gate_up: Vec<Vec<Func>>,
    down: Vec<Vec<Func>>,
    quant_q8_0: Func,
    quant_q8_k: Func,
    repack_q8_0: CudaFunction,
    repack_q2_k: CudaFunction,
    repack_iq2_xxs: CudaFunction,
    bench_read: Func,
    /// Launch tuning (see [`Tuning`]).
    pub tuning: Tuning,
}

/// Device pointer of a buffer plus its length check.
fn dptr<'a, T>(
    b: &'a impl DevicePtr<T>,
    stream: &'a CudaStream,
    need: usize,
    what: &str,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>), CudaError> {
    if b.len() < need {
        return Err(gerr(format!(
            "{what}: buffer has {} elements, {need} needed",
            b.len()
        )));
    }
    Ok(b.device_ptr(stream))
}

fn dptr_mut<'a, T>(
    b: &'a mut impl DevicePtrMut<T>,
    stream: &'a CudaStream,
    need: usize,
    what: &str,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>), CudaError> {
    if b.len() < need {
        return Err(gerr(format!(
            "{what}: buffer has {} elements, {need} needed",
            b.len()
        )));
    }
    Ok(b.device_ptr_mut(stream))
}

fn check_align(p: u64, a: u64, what: &str) -> Result<(), CudaError> {
    if !p.is_multiple_of(a) {
        return Err(gerr(format!("{what}: device pointer not {a}-byte aligned")));
    }
    Ok(())
}

/// Index in `NT_BUCKETS` of the pass size for `rem` remaining tokens.
fn nt_bucket(rem: usize) -> usize {
    match rem {
        0 | 1 => 0,
        2 => 1,
        3 | 4 => 2,
        _ => 3,
    }
}

/// `units` work items over at most `max` workers so that every worker gets the same count.
fn balanced(units: usize, max: usize) -> usize {
    if units == 0 {
        return 0;
    }
    let per = units.div_ceil(max.max(1));
    units.div_ceil(per)
}

fn cfg(blocks: usize) -> LaunchConfig {
    cfg_t(blocks, BLOCK, 0)
}

fn cfg_t(blocks: usize, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

impl Gemv {
    /// Load the `gemv` kernel module into `ctx`.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Gemv, CudaError> {
        let module = load_module(ctx, "gemv")?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(drv)? as u32;
        let load_t = |name: &str, rr: usize, u: usize, smem: u32| -> Result<Func, CudaError> {
            let f = module
                .load_function(name)
                .map_err(|e| gerr(format!("kernel {name}: {e}")))?;
            if smem > 0 {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(drv)?;
            }
            let occ = f
                .occupancy_max_active_blocks_per_multiprocessor(BLOCK, smem as usize, None)
                .map_err(drv)?
                .max(1);
            Ok(Func {
                f,
                occ,
                rr,
                u,
                smem,
            })
        };
        let load = |name: &str| load_t(name, 1, 1, 0);
        let kinds = [
            Kind::F32,
            Kind::F16,
            Kind::Bf16,
            Kind::Q8_0,
            Kind::Q2K,
            Kind::Q4K,
            Kind::Iq2Xxs,
        ];
        let mut gemv = Vec::new();
        let mut gate_up_dense = Vec::new();
        let mut gate_up = Vec::new();
        let mut down = Vec::new();
        for (k, name) in kinds.into_iter().zip(KIND_NAMES) {
            let sm = k.smem();
            let mut per_nt: [Vec<Func>; 4] = Default::default();
            for (bi, nt) in NT_BUCKETS.into_iter().enumerate() {
                for &(rr, u) in k.dense_tiles(nt) {
                    per_nt[bi].push(load_t(
                        &format!("ds4_gemv_{name}_{nt}_{rr}x{u}"),
                        rr,
                        u,
                        sm,
                    )?);
                }
            }
            gemv.push(per_nt);
            let mut per_nt: [Vec<Func>; 4] = Default::default();
            for (bi, nt) in NT_BUCKETS.into_iter().enumerate() {
                for &(rr, u) in k.gate_up_dense_tiles(nt) {
                    per_nt[bi].push(load_t(
                        &format!("ds4_gate_up_{name}_{nt}_{rr}x{u}"),
                        rr,
                        u,
                        sm,
                    )?);
                }
            }
            gate_up_dense.push(per_nt);
            let mut v = Vec::new();
            for &(suf, rr, u) in k.gate_up_variants() {
                v.push(load_t(&format!("ds4_moe_gate_up_{name}{suf}"), rr, u, sm)?);
            }
            gate_up.push(v);
            let mut v = Vec::new();
            for &(suf, rr, u) in k.down_variants() {
                v.push(load_t(&format!("ds4_moe_down_{name}{suf}"), rr, u, sm)?);
            }
            down.push(v);
        }
        let quant_q8_0 = load("ds4_quant_q8_0")?;
        let quant_q8_k = load("ds4_quant_q8_k")?;
        let raw = |name: &str| module.load_function(name).map_err(drv);
        Ok(Gemv {
            repack_q8_0: raw("ds4_repack_q8_0")?,
            repack_q2_k: raw("ds4_repack_q2_k")?,
            repack_iq2_xxs: raw("ds4_repack_iq2_xxs")?,
            bench_read: load("ds4_bench_read")?,
            _module: module,
            sms,
            gemv,
            gate_up_dense,
            gate_up,
            down,
            quant_q8_0,
            quant_q8_k,
            tuning: Tuning::from_env(),
        })
    }

    /// Whether weights of type `ty` are supported.
    pub fn supported(ty: GgmlType) -> bool {
        Kind::of(ty).is_some()
    }

    /// Multiprocessor count of the device.
    pub fn sm_count(&self) -> u32 {
        self.sms
    }

    fn kind(ty: GgmlType) -> Result<Kind, CudaError> {
        Kind::of(ty).ok_or_else(|| gerr(format!("weight type {ty:?} is not supported")))
    }

    fn check_shape(
        k: Kind,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
    ) -> Result<(), CudaError> {
        if cols == 0 || rows == 0 || n_mat == 0 {
            return Err(gerr(format!("empty weight {cols}×{rows}×{n_mat}")));
        }
        if !cols.is_multiple_of(k.col_multiple()) {
            return Err(gerr(format!(
                "{ty:?}: cols {cols} is not a multiple of {}",
                k.col_multiple()
            )));
        }
        if n_mat
            .checked_mul(rows)
            .is_none_or(|rt| rt > i32::MAX as usize)
            || cols > i32::MAX as usize / 2
        {
            return Err(gerr("weight too large"));
        }
        Ok(())
    }

    /// Upload a GGUF tensor (`n_mat` matrices of `rows × cols`, `bytes` exactly its GGUF size)
    /// and convert it to the device layout. Allocates; not for graph capture.
    pub fn upload(
        &self,
        stream: &Arc<CudaStream>,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
        bytes: &[u8],
    ) -> Result<DevWeight, CudaError> {
        let k = Self::kind(ty)?;
        Self::check_shape(k, ty, cols, rows, n_mat)?;
        let need = gguf_bytes(ty, cols, rows, n_mat).ok_or_else(|| gerr("size overflow"))?;
        if bytes.len() != need {
            return Err(gerr(format!(
                "{ty:?} {cols}×{rows}×{n_mat}: {} bytes given, {need} expected",
                bytes.len()
            )));
        }
        let raw = stream.clone_htod(bytes).map_err(drv)?;
        self.upload_device(stream, ty, cols, rows, n_mat, &raw)
    }

    /// Like [`Gemv::upload`] from GGUF bytes already in device memory (`raw` is not kept).
    pub fn upload_device(
        &self,
        stream: &Arc<CudaStream>,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        n_mat: usize,
        raw: &impl DevicePtr<u8>,
    ) -> Result<DevWeight, CudaError> {
        let k = Self::kind(ty)?;
        Self::check_shape(k, ty, cols, rows, n_mat)?;
        let need = gguf_bytes(ty, cols, rows, n_mat).ok_or_else(|| gerr("size overflow"))?;
        let rt = rows * n_mat;
        let (total, off) = weight_layout(k, cols, rt);
        let mut data = stream.alloc_zeros::<u8>(total).map_err(drv)?;
        let nbt = (rt * (cols / k.block().0)) as i64;
        {
            let (src, _g) = dptr(raw, stream, need, "upload source")?;
            check_align(src, 4, "upload source")?;
            let (dst, _h) = data.device_ptr_mut(stream);
            let blocks = (nbt as usize).div_ceil(256).min(65535);
            let f = match k {
                Kind::Q8_0 => Some(&self.repack_q8_0),
                Kind::Q2K => Some(&self.repack_q2_k),
                Kind::Iq2Xxs => Some(&self.repack_iq2_xxs),
                _ => None,
            };
            match f {
                None => {
                    // SAFETY: both buffers hold at least `need` bytes (checked / allocated).
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            dst,
                            src,
                            need,
                            stream.cu_stream(),
                        )
                    }
                    .map_err(drv)?;
                }
                Some(f) => {
                    let (o1, o2) = (dst + off[1] as u64, dst + off[2] as u64);
                    let mut p: Vec<*mut std::ffi::c_void> =
                        crate::rt::kargs![&src, &dst, &o1].to_vec();
                    if k == Kind::Q2K {
                        p.extend(crate::rt::kargs![&o2]);
                    }
                    p.extend(crate::rt::kargs![&nbt]);
                    // SAFETY: the repack kernels read `nbt` GGUF blocks from `src` (`need`
                    // bytes) and write the regions of `data` laid out by `weight_layout`.
                    unsafe { crate::rt::launch_raw(stream, f, cfg(blocks), &mut p) }?;
                    // The decode kernels read weights before their PDL wait (weight
                    // prologue, kernels/common.cuh): no kernel may still be writing them when
                    // one is launched. (A copy is never overlapped by a PDL launch.)
                    stream.synchronize().map_err(drv)?;
                }
            }
        }
        Ok(DevWeight {
            ty,
            kind: k,
            cols,
            rows,
            n_mat,
            bytes: data.len(),
            data: Arc::new(data),
            off,
        })
    }

    /// Whether single matrices of type `ty`, `cols` inputs and the given row counts can be
    /// stacked by [`Gemv::upload_stacked`] with every member's regions 256-byte aligned (as a
    /// plain allocation's are, so that every kernel sees the alignment it would see unstacked).
    pub fn stack_ok(ty: GgmlType, cols: usize, rows: &[usize]) -> bool {
        let Some(k) = Kind::of(ty) else {
            return false;
        };
        if cols == 0 || !cols.is_multiple_of(k.col_multiple()) || rows.contains(&0) {
            return false;
        }
        let rb = row_bytes(k, cols);
        let mut row0 = 0usize;
        for &r in rows {
            if rb.iter().any(|b| !(row0 * b).is_multiple_of(256)) {
                return false;
            }
            row0 += r;
        }
        true
    }

    /// Upload single matrices of one type and width (`parts`: `(rows, GGUF bytes)` each) as
    /// ONE weight of all their rows in order (one matvec computes all of them into consecutive
    /// rows of `y`), and return it with a row-range view per part ([`DevWeight::view`]; no
    /// copy: the views and the stack share one allocation). A view gives the same results as
    /// the part uploaded alone. Allocates; not for graph capture.
    pub fn upload_stacked(
        &self,
        stream: &Arc<CudaStream>,
        ty: GgmlType,
        cols: usize,
        parts: &[(usize, &[u8])],
    ) -> Result<(DevWeight, Vec<DevWeight>), CudaError> {
        let rows: Vec<usize> = parts.iter().map(|p| p.0).collect();
        if parts.is_empty() || !Self::stack_ok(ty, cols, &rows) {
            return Err(gerr(format!(
                "{ty:?} × {cols}: rows {rows:?} cannot be stacked (alignment)"
            )));
        }
        let mut total = 0usize;
        for &(r, b) in parts {
            let need = gguf_bytes(ty, cols, r, 1).ok_or_else(|| gerr("size overflow"))?;
            if b.len() != need {
                return Err(gerr(format!(
                    "{ty:?} {cols}×{r}: {} bytes given, {need} expected",
                    b.len()
                )));
            }
            total += need;
        }
        let mut buf = Vec::with_capacity(total);
        for &(_, b) in parts {
            buf.extend_from_slice(b);
        }
        let all = self.upload(stream, ty, cols, rows.iter().sum(), 1, &buf)?;
        let mut views = Vec::with_capacity(parts.len());
        let mut row0 = 0;
        for &r in &rows {
            views.push(all.view(row0, r)?);
            row0 += r;
        }
        Ok((all, views))
    }

    /// Bytes of activation scratch for `n` rows of `cols` inputs to weights of type `ty`
    /// (0 for F32 / F16 / BF16 and unsupported types).
    pub fn act_bytes(ty: GgmlType, cols: usize, n: usize) -> usize {
        match Kind::of(ty) {
            Some(k) => act_layout(k.act(), cols, n).0,
            None => 0,
        }
    }

    /// Device addresses of one row of `cols` activations quantized for weights of type `ty` in a
    /// scratch at `base`, in the layout [`Gemv::quantize_act`] writes for `n = 1`:
    /// `Some((q8_k, qs, d, bsums))` (`q8_k` false: Q8_0, bsums 0); None for float activations
    /// and unsupported types, or when `cols` is not a multiple of the block.
    pub fn act_ptrs(ty: GgmlType, cols: usize, base: u64) -> Option<(bool, u64, u64, u64)> {
        let ak = Kind::of(ty)?.act();
        let (_, od, ob) = act_layout(ak, cols, 1);
        match ak {
            ActKind::Float => None,
            ActKind::Q8_0 if cols.is_multiple_of(32) => Some((false, base, base + od as u64, 0)),
            ActKind::Q8K if cols.is_multiple_of(256) => {
                Some((true, base, base + od as u64, base + ob as u64))
            }
            _ => None,
        }
    }

    /// Quantize `n` rows of `x` (`[n][cols]` f32) into `act` for weights of type `ty` (no-op for
    /// float types). `cols` must be a multiple of 32 (Q8_0) or 256 (K-quants, IQ2_XXS).
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_act(
        &self,
        stream: &Arc<CudaStream>,
        ty: GgmlType,
        x: &impl DevicePtr<f32>,
        n: usize,
        cols: usize,
        act: &mut impl DevicePtrMut<u8>,
    ) -> Result<(), CudaError> {
        let ak = Self::kind(ty)?.act();
        if ak == ActKind::Float || n == 0 || cols == 0 {
            return Ok(());
        }
        let total = act_layout(ak, cols, n).0;
        let (xp, _gx) = dptr(x, stream, n * cols, "quantize_act x")?;
        let (ap, _ga) = dptr_mut(act, stream, total, "quantize_act act")?;
        self.quantize_raw(stream, ak, xp, ap, n, cols)
    }

    fn quantize_raw(
        &self,
        stream: &CudaStream,
        ak: ActKind,
        xp: u64,
        ap: u64,
        n: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        if ak == ActKind::Float || n == 0 || cols == 0 {
            return Ok(());
        }
        let bs = if ak == ActKind::Q8_0 { 32 } else { 256 };
        if !cols.is_multiple_of(bs) {
            return Err(gerr(format!(
                "quantize_act: cols {cols} not a multiple of {bs}"
            )));
        }
        check_align(xp, 16, "quantize_act x")?;
        check_align(ap, 16, "quantize_act act")?;
        let (_, od, ob) = act_layout(ak, cols, n);
        let nblocks = (n * cols / bs) as i64;
        let blocks = (nblocks as usize).div_ceil(8).min(self.sms as usize * 16);
        let (adp, abp) = (ap + od as u64, ap + ob as u64);
        let f = if ak == ActKind::Q8_0 {
            &self.quant_q8_0.f
        } else {
            &self.quant_q8_k.f
        };
        let mut p: Vec<*mut std::ffi::c_void> = crate::rt::kargs![&xp, &ap, &adp].to_vec();
        if ak == ActKind::Q8K {
            p.extend(crate::rt::kargs![&abp]);
        }
        p.extend(crate::rt::kargs![&nblocks]);
        // SAFETY: reads n·cols floats of x, writes the act layout (lengths checked by callers).
        unsafe { crate::rt::launch_raw(stream, f, cfg(blocks), &mut p) }
    }

    /// Benchmark helper: read `buf` once (16-byte streaming loads, full-occupancy grid);
    /// `sink` gets a value only in the unlikely case the data XOR to a magic constant.
    #[doc(hidden)]
    pub fn bench_read(
        &self,
        stream: &Arc<CudaStream>,
        buf: &CudaSlice<u8>,
        sink: &mut CudaSlice<i32>,
    ) -> Result<(), CudaError> {
        let n16 = (buf.len() / 16) as i64;
        let (bp, _gb) = buf.device_ptr(stream);
        let (sp, _gs) = dptr_mut(sink, stream, 1, "bench_read sink")?;
        let blocks = self.max_blocks(&self.bench_read);
        let mut p = crate::rt::kargs![&bp, &n16, &sp];
        // SAFETY: reads n16·16 ≤ len bytes of buf, may write one int of sink (len ≥ 1 checked).
        unsafe { crate::rt::launch_raw(stream, &self.bench_read.f, cfg(blocks), &mut p) }
    }

    /// Dense tile shapes `(rows, steps)` the kernels offer for weights of type `ty` in passes of
    /// up to `n` tokens (what [`Tuning::force_tile`] indexes).
    pub fn dense_tile_shapes(ty: GgmlType, n: usize) -> &'static [(usize, usize)] {
        match Kind::of(ty) {
            Some(k) => k.dense_tiles(NT_BUCKETS[nt_bucket(n.max(1))]),
            None => &[],
        }
    }

    /// The tile `(rows, steps)` and split the first pass of `matvec(w, .., n)` uses (for the
    /// benchmark).
    #[doc(hidden)]
    pub fn plan_matvec(&self, w: &DevWeight, n: usize) -> (usize, usize, usize) {
        let b = nt_bucket(n.max(1));
        let vars = &self.gemv[w.kind as usize][b];
        let (v, s) = self.plan_dense(vars, false, w.kind, NT_BUCKETS[b], w.rows * w.n_mat, w.cols);
        let f = &self.gemv[w.kind as usize][b][v];
        (f.rr, f.u, s)
    }

    /// (tile variant, split) of a dense kernel over `rt` rows of `cols` columns; `pair`: the
    /// tiles hold (gate, up) row pairs.
    fn plan_dense(
        &self,
        vars: &[Func],
        pair: bool,
        k: Kind,
        nt: usize,
        rt: usize,
        cols: usize,
    ) -> (usize, usize) {
        let nit = cols.div_ceil(k.warp_cols());
        // The first variant (in order of preference) whose chunk fits the row, else the one
        // with the fewest steps per chunk.
        let pick = |nitp: usize| -> usize {
            if self.tuning.force_tile != 0 {
                return (self.tuning.force_tile as usize - 1).min(vars.len() - 1);
            }
            vars.iter().position(|f| f.u <= nitp).unwrap_or_else(|| {
                (0..vars.len())
                    .min_by_key(|&i| (vars[i].u, vars[i].rr))
                    .unwrap_or(0)
            })
        };
        let tiles = |v: usize| rt.div_ceil(if pair { vars[v].rr / 2 } else { vars[v].rr });
        if self.tuning.force_split != 0 {
            let s = (self.tuning.force_split as usize)
                .clamp(1, 8)
                .next_power_of_two();
            return (pick(nit.div_ceil(s)), s);
        }
        let v = pick(nit);
        // Split-K until the card holds enough warps (float weights with long chunks, and matvec
        // passes of several tokens, cost more arithmetic per byte and want more; H200 sweep:
        // Q8_0 8192×4096 at 4 / 8 tokens best at split 2 / 4, the dense gate/up at 8 tokens
        // best unsplit).
        let mut target = self.sms as usize * self.tuning.target_warps_per_sm as usize;
        if k.act() == ActKind::Float && vars[v].u >= 8 {
            target *= 2;
        }
        if !pair {
            target *= (nt / 2).max(1);
        }
        let mut s = 1;
        while s < 8 && 2 * s <= nit && tiles(v) * s < target {
            s *= 2;
        }
        (v, s)
    }

    fn max_blocks(&self, f: &Func) -> usize {
        let mut occ = f.occ;
        if self.tuning.max_blocks_per_sm != 0 {
            occ = occ.min(self.tuning.max_blocks_per_sm);
        }
        self.sms as usize * occ as usize
    }

    /// Check the input buffers of a weight product and return (x ptr, act ptr) and guards.
    fn inputs<'a>(
        stream: &'a CudaStream,
        ak: ActKind,
        x: &'a impl DevicePtr<f32>,
        act: &'a impl DevicePtr<u8>,
        n: usize,
        cols: usize,
        what: &str,
    ) -> Result<(u64, u64, Vec<cudarc::driver::SyncOnDrop<'a>>), CudaError> {
        if ak == ActKind::Float {
            let (xp, g) = dptr(x, stream, n * cols, what)?;
            check_align(xp, 16, what)?;
            Ok((xp, 0, vec![g]))
        } else {
            let total = act_layout(ak, cols, n).0;
            let (ap, g) = dptr(act, stream, total, what)?;
            check_align(ap, 16, what)?;
            Ok((0, ap, vec![g]))
        }
    }

    /// `y[t] = W·x[t]` for `n` tokens (see the module docs for shapes). Quantized types read
    /// `act`, which must hold `quantize_act(w.ty(), x, n, w.n_mat()·w.cols())`; float types
    /// read `x` (and ignore `act`, which may be empty).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: &impl DevicePtr<f32>,
        act: &impl DevicePtr<u8>,
        n: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let cx = w.cols * w.n_mat;
        let (xp, ap, _g) = Self::inputs(stream, w.kind.act(), x, act, n, cx, "matvec input")?;
        let (yp, _gy) = dptr_mut(y, stream, n * w.rows * w.n_mat, "matvec y")?;
        self.matvec_raw(stream, w, xp, ap, n, yp)
    }

    /// [`Gemv::quantize_act`] then [`Gemv::matvec`]; `act` is scratch of at least
    /// `act_bytes(w.ty(), w.n_mat()·w.cols(), n)` bytes (unused for float types).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_x(
        &self,
        stream: &Arc<CudaStream>,
        w: &DevWeight,
        x: &impl DevicePtr<f32>,
        act: &mut impl DevicePtrMut<u8>,
        n: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let ak = w.kind.act();
        let cx = w.cols * w.n_mat;
        let (xp, _gx) = dptr(x, stream, n * cx, "matvec_x x")?;
        check_align(xp, 16, "matvec_x x")?;
        let (ap, _ga) = if ak == ActKind::Float {
            (0, None)
        } else {
            let total = act_layout(ak, cx, n).0;
            let (p, g) = dptr_mut(act, stream, total, "matvec_x act")?;
            (p, Some(g))
        };
        let (yp, _gy) = dptr_mut(y, stream, n * w.rows * w.n_mat, "matvec_x y")?;
        self.quantize_raw(stream, ak, xp, ap, n, cx)?;
        self.matvec_raw(stream, w, xp, ap, n, yp)
    }

    fn matvec_raw(
        &self,
        stream: &CudaStream,
        w: &DevWeight,
        xp: u64,
        ap: u64,
        n: usize,
        yp: u64,
    ) -> Result<(), CudaError> {
        let k = w.kind;
        let ak = k.act();
        let rt = w.rows * w.n_mat;
        let cx = w.cols * w.n_mat;
        let (_, od, ob) = act_layout(ak, cx, n);
        let ([p0, p1, p2], _gw) = w.region_ptrs(stream);
        let (rt_i, r_i, c_i, cx_i) = (rt as i32, w.rows as i32, w.cols as i32, cx as i32);
        let grouped: i32 = (w.n_mat > 1) as i32;
        let mut t0 = 0usize;
        while t0 < n {
            let bucket = nt_bucket(n - t0);
            let np = (n - t0).min(NT_BUCKETS[bucket]);
            let vars = &self.gemv[k as usize][bucket];
            let (vi, split) = self.plan_dense(vars, false, k, NT_BUCKETS[bucket], rt, w.cols);
            let func = &vars[vi];
            let tpb = 8 / split;
            // Tiles must not straddle two matrices: else launch matrix by matrix.
            let ranges: Vec<(usize, usize)> = if w.n_mat > 1 && !w.rows.is_multiple_of(func.rr) {
                (0..w.n_mat).map(|m| (m * w.rows, w.rows)).collect()
            } else {
                vec![(0, rt)]
            };
            let e0 = (t0 * cx) as u64;
            let (xq, aq, adq, abq) = match ak {
                ActKind::Float => (xp + 4 * e0, 0, 0, 0),
                ActKind::Q8_0 => (0, ap + e0, ap + od as u64 + 4 * (e0 / 32), 0),
                ActKind::Q8K => (
                    0,
                    ap + e0,
                    ap + od as u64 + 4 * (e0 / 256),
                    ap + ob as u64 + 2 * (e0 / 16),
                ),
            };
            let yq = yp + 4 * (t0 * rt) as u64;
            let (np_i, split_i) = (np as i32, split as i32);
            for (row0, nrows) in ranges {
                let ngroups = nrows.div_ceil(tpb * func.rr);
                let blocks = balanced(ngroups, self.max_blocks(func));
                let (row0_i, nrows_i) = (row0 as i32, nrows as i32);
                let mut p = crate::rt::kargs![
                    &p0, &p1, &p2, &aq, &adq, &abq, &xq, &yq, &rt_i, &row0_i, &nrows_i, &r_i, &c_i,
                    &cx_i, &grouped, &np_i, &split_i
                ];
                // SAFETY: the kernel reads the weight (layout of `w`), np rows of cx activations
                // and writes np·rt floats of y (lengths checked by the callers).
                unsafe {
                    crate::rt::launch_raw(stream, &func.f, cfg_t(blocks, BLOCK, func.smem), &mut p)
                }?;
            }
            t0 += np;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gate_up_raw(
        &self,
        stream: &CudaStream,
        gate: &DevWeight,
        up: &DevWeight,
        xp: u64,
        ap: u64,
        idp: u64,
        wtp: u64,
        n: usize,
        k: usize,
        clamp: f32,
        mp: u64,
    ) -> Result<(), CudaError> {
        let kind = gate.kind;
        let cols = gate.cols;
        let (_, od, ob) = act_layout(kind.act(), cols, n);
        let ([gp, g1, g2], _g1) = gate.region_ptrs(stream);
        let ([upp, u1, u2], _g2) = up.region_ptrs(stream);
        let (adp, abp) = (ap + od as u64, ap + ob as u64);
        let vars = &self.gate_up[kind as usize];
        let func = &vars[(self.tuning.gate_up_variant as usize).min(vars.len() - 1)];
        let units = n * k * gate.rows.div_ceil(func.rr / 2);
        if units > i32::MAX as usize {
            return Err(gerr(format!(
                "moe_gate_up: {units} work units exceed the 32-bit index"
            )));
        }
        let warps = balanced(units, self.max_blocks(func) * 8);
        let blocks = warps.div_ceil(8);
        let (r_i, c_i, nm_i, n_i, k_i) = (
            gate.rows as i32,
            cols as i32,
            gate.n_mat as i32,
            n as i32,
            k as i32,
        );
        let mut p = crate::rt::kargs![
            &gp, &g1, &g2, &upp, &u1, &u2, &ap, &adp, &abp, &xp, &idp, &wtp, &mp, &r_i, &c_i,
            &nm_i, &n_i, &k_i, &clamp
        ];
        // SAFETY: reads rows of the selected experts only (ids checked on the device), n rows
        // of activations, n·k ids/weights, writes n·k·rows of mid (lengths checked by callers).
        unsafe { crate::rt::launch_raw(stream, &func.f, cfg_t(blocks, BLOCK, func.smem), &mut p) }
    }

    /// Dense gate/up + SwiGLU (single matrices) through the split-K tile kernels, in passes of
    /// up to 8 tokens that read the weights once.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_dense_raw(
        &self,
        stream: &CudaStream,
        gate: &DevWeight,
        up: &DevWeight,
        xp: u64,
        ap: u64,
        n: usize,
        clamp: f32,
        mp: u64,
    ) -> Result<(), CudaError> {
        let k = gate.kind;
        let ak = k.act();
        let (rows, cols) = (gate.rows, gate.cols);
        let (_, od, ob) = act_layout(ak, cols, n);
        let ([gp, g1, g2], _g1) = gate.region_ptrs(stream);
        let ([upp, u1, u2], _g2) = up.region_ptrs(stream);
        let (r_i, c_i) = (rows as i32, cols as i32);
        let mut t0 = 0usize;
        while t0 < n {
            let bucket = nt_bucket(n - t0);
            let np = (n - t0).min(NT_BUCKETS[bucket]);
            let vars = &self.gate_up_dense[k as usize][bucket];
            let (vi, split) = self.plan_dense(vars, true, k, NT_BUCKETS[bucket], rows, cols);
            let func = &vars[vi];
            let tpb = 8 / split;
            let e0 = (t0 * cols) as u64;
            let (xq, aq, adq, abq) = match ak {
                ActKind::Float => (xp + 4 * e0, 0, 0, 0),
                ActKind::Q8_0 => (0, ap + e0, ap + od as u64 + 4 * (e0 / 32), 0),
                ActKind::Q8K => (
                    0,
                    ap + e0,
                    ap + od as u64 + 4 * (e0 / 256),
                    ap + ob as u64 + 2 * (e0 / 16),
                ),
            };
            let mq = mp + 4 * (t0 * rows) as u64;
            let ngroups = rows.div_ceil(tpb * (func.rr / 2));
            let blocks = balanced(ngroups, self.max_blocks(func));
            let (np_i, split_i) = (np as i32, split as i32);
            let mut p = crate::rt::kargs![
                &gp, &g1, &g2, &upp, &u1, &u2, &aq, &adq, &abq, &xq, &mq, &r_i, &c_i, &np_i,
                &split_i, &clamp
            ];
            // SAFETY: reads both weights (their layouts), np rows of cols activations and
            // writes np·rows floats of mid (lengths checked by the caller).
            unsafe {
                crate::rt::launch_raw(stream, &func.f, cfg_t(blocks, BLOCK, func.smem), &mut p)
            }?;
            t0 += np;
        }
        Ok(())
    }

    fn check_pair(gate: &DevWeight, up: &DevWeight) -> Result<(), CudaError> {
        if gate.ty != up.ty
            || gate.cols != up.cols
            || gate.rows != up.rows
            || gate.n_mat != up.n_mat
        {
            return Err(gerr(format!(
                "gate {gate:?} and up {up:?} differ in type or shape"
            )));
        }
        Ok(())
    }

    /// Routed MoE gate/up/SwiGLU for `n` tokens with `k` experts each (see the module docs).
    /// `act` must hold `quantize_act(gate.ty(), x, n, gate.cols())` for quantized types (float
    /// types read `x`).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gate_up(
        &self,
        stream: &Arc<CudaStream>,
        gate: &DevWeight,
        up: &DevWeight,
        x: &impl DevicePtr<f32>,
        act: &impl DevicePtr<u8>,
        ids: &impl DevicePtr<i32>,
        weights: &impl DevicePtr<f32>,
        n: usize,
        k: usize,
        clamp: f32,
        mid: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 || k == 0 {
            return Ok(());
        }
        Self::check_pair(gate, up)?;
        if k > MAX_K {
            return Err(gerr(format!("k = {k} > {MAX_K}")));
        }
        let (xp, ap, _g) = Self::inputs(
            stream,
            gate.kind.act(),
            x,
            act,
            n,
            gate.cols,
            "moe_gate_up input",
        )?;
        let (idp, _gi) = dptr(ids, stream, n * k, "moe_gate_up ids")?;
        let (wtp, _gw) = dptr(weights, stream, n * k, "moe_gate_up weights")?;
        let (mp, _gm) = dptr_mut(mid, stream, n * k * gate.rows, "moe_gate_up mid")?;
        self.gate_up_raw(stream, gate, up, xp, ap, idp, wtp, n, k, clamp, mp)
    }

    /// Dense gate/up/SwiGLU (shared expert): `mid[t][r] = silu(min(g,c))·clamp(u,±c)` with
    /// `g`, `u` the rows of the single-matrix `gate`, `up` times `x[t]`; `mid` is `[n][rows]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_up_swiglu(
        &self,
        stream: &Arc<CudaStream>,
        gate: &DevWeight,
        up: &DevWeight,
        x: &impl DevicePtr<f32>,
        act: &impl DevicePtr<u8>,
        n: usize,
        clamp: f32,
        mid: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        Self::check_pair(gate, up)?;
        if gate.n_mat != 1 {
            return Err(gerr("gate_up_swiglu needs single-matrix weights"));
        }
        let (xp, ap, _g) = Self::inputs(
            stream,
            gate.kind.act(),
            x,
            act,
            n,
            gate.cols,
            "gate_up_swiglu input",
        )?;
        let (mp, _gm) = dptr_mut(mid, stream, n * gate.rows, "gate_up_swiglu mid")?;
        self.gate_up_dense_raw(stream, gate, up, xp, ap, n, clamp, mp)
    }

    /// Routed MoE down projection and sum over the `k` experts of each token (see the module
    /// docs). `mid` is `[n·k][down.cols()]`; `mid_act` is scratch of at least
    /// `act_bytes(down.ty(), down.cols(), n·k)` bytes; `out` is `[n][down.rows()]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_down(
        &self,
        stream: &Arc<CudaStream>,
        down: &DevWeight,
        mid: &impl DevicePtr<f32>,
        mid_act: &mut impl DevicePtrMut<u8>,
        ids: &impl DevicePtr<i32>,
        n: usize,
        k: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        if n == 0 || k == 0 {
            return Ok(());
        }
        if k > MAX_K {
            return Err(gerr(format!("k = {k} > {MAX_K}")));
        }
        let kind = down.kind;
        let ak = kind.act();
        let cols = down.cols;
        let (xp, _gx) = dptr(mid, stream, n * k * cols, "moe_down mid")?;
        check_align(xp, 16, "moe_down mid")?;
        let (total, od, ob) = act_layout(ak, cols, n * k);
        let (ap, _ga) = if ak == ActKind::Float {
            (0u64, None)
        } else {
            let (p, g) = dptr_mut(mid_act, stream, total, "moe_down mid_act")?;
            (p, Some(g))
        };
        let (idp, _gi) = dptr(ids, stream, n * k, "moe_down ids")?;
        let (op, _go) = dptr_mut(out, stream, n * down.rows, "moe_down out")?;
        self.quantize_raw(stream, ak, xp, ap, n * k, cols)?;
        let ([wp, p1, p2], _gw) = down.region_ptrs(stream);
        let (adp, abp) = (ap + od as u64, ap + ob as u64);
        let vars = &self.down[kind as usize];
        let func = &vars[(self.tuning.down_variant as usize).min(vars.len() - 1)];
        // Split the (slot, step) sequence of a tile over k·m warps, m per slot, so that every
        // warp's range lies in one slot (each slot's row is rounded to f32 before the slot sum,
        // as on the CPU).
        if k == 0 || k > MAX_K {
            return Err(gerr(format!("moe_down: k = {k} (1..=MAX_K supported)")));
        }
        let vs = k * cols.div_ceil(kind.warp_cols());
        let want = if self.tuning.down_split != 0 {
            self.tuning.down_split as usize
        } else {
            // About three chunks per warp (H200 sweeps: Flash Q2_K down, k = 6, 4×1 tiles:
            // split 2 at 10.4–10.6 µs, 3 at 10.3–11.6 µs, 1 or 6 slower).
            vs.div_ceil(3 * func.u)
        };
        let split = k * want.div_ceil(k).clamp(1, (8 / k).max(1));
        let tpb = 8 / split;
        let threads = (32 * split * tpb) as u32;
        let gpt = down.rows.div_ceil(func.rr).div_ceil(tpb);
        let per_sm = (func.occ as usize * 8 / (split * tpb)).max(1);
        let mut per_sm_cap = per_sm;
        if self.tuning.max_blocks_per_sm != 0 {
            per_sm_cap = per_sm_cap.min(self.tuning.max_blocks_per_sm as usize);
        }
        let blocks = balanced(n * gpt, self.sms as usize * per_sm_cap);
        let (r_i, c_i, nm_i, n_i, k_i, s_i) = (
            down.rows as i32,
            cols as i32,
            down.n_mat as i32,
            n as i32,
            k as i32,
            split as i32,
        );
        let mut p = crate::rt::kargs![
            &wp, &p1, &p2, &ap, &adp, &abp, &xp, &idp, &op, &r_i, &c_i, &nm_i, &n_i, &k_i, &s_i
        ];
        // SAFETY: reads the selected experts' rows (ids checked on the device), n·k rows of
        // mid / its quantization (checked), writes n·rows floats of out (checked).
        unsafe { crate::rt::launch_raw(stream, &func.f, cfg_t(blocks, threads, func.smem), &mut p) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view's regions (`DevWeight::view`: `off[i] + row0 · row_bytes[i]`) are exactly where
    /// the stack's layout puts those rows, inside the stack's regions and clear of the next
    /// region; where `stack_ok` holds they stay 256-byte aligned like a plain allocation's.
    #[test]
    fn stacked_views_match_the_layout() {
        for ty in SUPPORTED {
            let k = Kind::of(ty).unwrap();
            for cols in [256usize, 1024, 4096] {
                for rows in [vec![1024, 512], vec![1024, 1024, 256, 256, 64], vec![3, 5]] {
                    let rt: usize = rows.iter().sum();
                    let (total, off) = weight_layout(k, cols, rt);
                    let rb = row_bytes(k, cols);
                    // Regions: every distinct offset, with its end (the next one or total).
                    let mut starts: Vec<usize> = off.to_vec();
                    starts.sort_unstable();
                    starts.dedup();
                    let end_of =
                        |o: usize| starts.iter().copied().find(|&s| s > o).unwrap_or(total);
                    let ok = Gemv::stack_ok(ty, cols, &rows);
                    let mut row0 = 0;
                    for &r in &rows {
                        for i in 0..3 {
                            let a = off[i] + row0 * rb[i];
                            let e = a + r * rb[i];
                            assert!(
                                e <= end_of(off[i]),
                                "{ty:?} {cols} rows {rows:?}: region {i} of rows {row0}+{r} \
                                 ends at {e}, past its region"
                            );
                            if ok {
                                assert!(a.is_multiple_of(256), "{ty:?} {cols} {rows:?}");
                            }
                        }
                        row0 += r;
                    }
                    // The regions of all rows fill each region exactly (no row left out).
                    for i in 0..3 {
                        assert!(off[i] + rt * rb[i] <= end_of(off[i]));
                        assert!(end_of(off[i]) - (off[i] + rt * rb[i]) < 256);
                    }
                }
            }
        }
    }

    #[test]
    fn stack_ok_refuses_what_views_cannot_align() {
        // Q8_0 with 3 blocks per row: one row of qs is 96 bytes, so a second part would start
        // off the 256-byte grid.
        assert!(!Gemv::stack_ok(GgmlType::Q8_0, 96, &[1, 1]));
        // 256 rows of it end on the grid (qs 256·96, d 256·6 bytes).
        assert!(Gemv::stack_ok(GgmlType::Q8_0, 96, &[256, 1]));
        // Flash's shapes stack.
        assert!(Gemv::stack_ok(GgmlType::Q8_0, 4096, &[1024, 512]));
        assert!(Gemv::stack_ok(
            GgmlType::F16,
            4096,
            &[1024, 1024, 256, 256, 64]
        ));
        // Empty parts, zero or odd widths, unsupported types.
        assert!(!Gemv::stack_ok(GgmlType::Q8_0, 4096, &[1024, 0]));
        assert!(!Gemv::stack_ok(GgmlType::Q8_0, 0, &[1]));
        assert!(!Gemv::stack_ok(GgmlType::Q8_0, 100, &[1]));
        assert!(!Gemv::stack_ok(GgmlType::Q5_K, 4096, &[1, 1]));
    }
}
