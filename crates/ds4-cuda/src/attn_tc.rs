//! Tensor-core chunk attention: the `attn` prefill route (kernels in `kernels/attn_tc.cu`).
//!
//! Replaces the exact `ds4_attention` (one warp per (token, head), f64 online softmax) for
//! prefill chunks of at least [`crate::TcRoutes::MIN_TOKENS`] tokens. Per token, the 64 heads
//! attend to the same rows (raw window from the ring + compressed rows, all of them or the
//! indexer's top-k) and a row is both key and value, so the attention is two small GEMMs per
//! token, run FlashAttention-style with `mma.sync m16n8k16` (f16 operands, f32 accumulation,
//! online softmax in f32 registers); see the kernel file for the tiling.
//!
//! | precision ([`AttnPrecision`]) | operands | products | error vs the exact kernel |
//! |---|---|---|---|
//! | `Split` (default) | every operand as two f16, `x ≈ hi + lo` (22 bits) | 3 mmas (hi·hi + hi·lo + lo·hi); 2 where the rows are exact in f16 | ~1e-6 relative (f32 accumulation) |
//! | `F16` (`DS4_CUDA_TC_ATTN_F16=1`) | plain f16 (11 bits) | 1 mma | ~1e-4 at score spread 1, ~2e-3 at 3 |
//!
//! Why `Split` is the default: a CPU emulation of the `F16` arithmetic inside the reference
//! forward pass (tiny / flashdims f32 fixtures, QAT off, all prompt positions) moved the logits
//! by mean rms 2e-3 but flipped discrete choices (indexer top-k, expert routing) at a few
//! positions: worst-row rms 0.83, top-20 overlap 13/20 and one top-1 change on flashdims' 630-token
//! prompt — outside the drift gate's tight tier. Emulating `Split` gave mean rms 8e-7, worst
//! 1.5e-6, same top-1 and top-20 everywhere.
//!
//! The rows live in the KV state as f32; [`AttnTc::attention`] first rewrites the ring (every
//! slot) and the compressed rows visible to the chunk as `[row][hi | lo]` f16 into the route's
//! scratch (`ds4_attn_tc_prep`), with a flag per row and eighth of the dims telling whether the
//! lo part is zero there. The model's rows are exact in f16 over their 448 nope dims (the FP8
//! KV round trip leaves 4 significant bits), so for the warps of those eighths the products
//! with the rows' lo part add exactly zero: a warp skips them for a 32-row tile whose rows are
//! all flagged (same bits; `DS4_CUDA_TC_ATTN_LOSKIP=0` turns it off). With head dim 512 the
//! prep also writes each row compact, `[hi | lo of the RoPE eighth]`, and a launch whose every
//! readable row is flagged exact in eighths 0-6 gathers those (1152 instead of 2048 bytes a row;
//! `DS4_CUDA_TC_ATTN_COMPACT=0` turns it off). Together −10 % attention time at 8192 tokens on
//! an H200 (`bench/README.md`, session 17). It then runs
//! persistent CTAs of 16 warps (one per SM), each over (token, 32 heads) items `blockIdx.x`, `+ gridDim.x`, … with their row tiles as one stream (the
//! next item's first tile is gathered while the current item's last one is processed). Decode
//! (and chunks shorter than the route minimum) keep the exact kernel. The chunk forward pass
//! leaves the Q heads' RMSNorm + RoPE to the route (`qnorm`): the kernel applies it on its Q
//! load with `ds4_head_norm_rope_fast`'s numerics (shared helpers in `common.cuh`), saving that
//! kernel's read + write of the queries.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, sys};

use crate::CudaError;
use crate::fwd::AttnLaunch;
use crate::rt::{A, DBuf, drv, launch};

/// Head dims the route has kernels for.
pub const HEAD_DIMS: [usize; 2] = [512, 128];
/// Heads per CTA (`AT_HPC`).
const HPC: usize = 32;
/// Threads per CTA (`AT_THREADS`: 16 warps).
const THREADS: u32 = 512;

fn aerr(msg: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(format!("attn_tc: {msg}"))
}

/// Operand precision of the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPrecision {
    /// hi + lo f16 operands, three mmas per product (near-f32; the default).
    Split,
    /// Plain f16 operands (opt-in: `DS4_CUDA_TC_ATTN_F16=1`).
    F16,
}

impl AttnPrecision {
    /// `F16` when `DS4_CUDA_TC_ATTN_F16` is set (non-empty, not "0"), else `Split`.
    pub fn from_env() -> AttnPrecision {
        match std::env::var("DS4_CUDA_TC_ATTN_F16") {
            Ok(v) if !v.is_empty() && v != "0" => AttnPrecision::F16,
            _ => AttnPrecision::Split,
        }
    }

    /// Short name (`split` / `f16`).
    pub fn name(self) -> &'static str {
        match self {
            AttnPrecision::Split => "split",
            AttnPrecision::F16 => "f16",
        }
    }
}

/// The route's kernels and scratch for one head dim.
pub struct AttnTc {
    _module: Arc<CudaModule>,
    prep: CudaFunction,
    kern: CudaFunction,
    smem: u32,
    hd: usize,
    precision: AttnPrecision,
    raw_cap: usize,
    comp_rows: usize,
    prep_blocks: u32,
    /// Persistent grid: at most one CTA per SM.
    sms: u32,
    scratch: DBuf,
    /// Per scratch row (ring slots, then compressed rows): bit s set when the row's lo part is
    /// zero in eighth s of the dims (written by `ds4_attn_tc_prep`).
    flags: DBuf,
    /// Skip the hi·lo products of tiles whose rows are exact in f16 there (`Split` only;
    /// `DS4_CUDA_TC_ATTN_LOSKIP=0` turns it off). Same bits either way.
    lo_skip: bool,
    /// Head dim 512, `Split`: the rows also as `[row][hi | lo of eighth 7]` f16 (ring slots,
    /// then compressed rows), gathered instead of the full rows when every row a launch can
    /// read is exact in eighths 0-6 (`DS4_CUDA_TC_ATTN_COMPACT=0` turns it off).
    compact: Option<DBuf>,
    /// Whether the last launch ran compact (written by its first CTA).
    rep: DBuf,
}

impl std::fmt::Debug for AttnTc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnTc")
            .field("hd", &self.hd)
            .field("precision", &self.precision)
            .field("raw_cap", &self.raw_cap)
            .field("comp_rows", &self.comp_rows)
            .finish()
    }
}

impl AttnTc {
    /// Whether the route has kernels for `hd`.
    pub fn supports(hd: usize) -> bool {
        HEAD_DIMS.contains(&hd)
    }

    /// Load the kernels and allocate the f16 row scratch: `raw_cap` ring rows and up to
    /// `comp_rows` compressed rows (the most any layer holds) of `hd` (allocates; not for
    /// capture).
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        hd: usize,
        raw_cap: usize,
        comp_rows: usize,
        precision: AttnPrecision,
    ) -> Result<AttnTc, CudaError> {
        let idx = HEAD_DIMS
            .iter()
            .position(|&d| d == hd)
            .ok_or_else(|| aerr(format!("no kernel for head_dim {hd}")))?;
        let module = crate::device::load_module(ctx, "attn_tc")?;
        let func = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| aerr(format!("kernel {name}: {e}")))
        };
        let sizes_buf = DBuf::zeroed(stream, 16)?;
        launch(
            stream,
            &func("ds4_attn_tc_smem")?,
            (1, 1, 1),
            32,
            0,
            &[A::P(sizes_buf.ptr)],
        )?;
        let mut sizes = [0i32; 4];
        crate::rt::dtoh(stream, &mut sizes, sizes_buf.ptr)?;
        let var = 2 * idx + usize::from(precision == AttnPrecision::F16);
        let smem = sizes[var] as u32;
        let smem_max = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(drv)? as u32;
        if smem > smem_max {
            return Err(aerr(format!(
                "the head_dim {hd} tile needs {smem} B of shared memory, the device allows {smem_max}"
            )));
        }
        let sfx = if precision == AttnPrecision::F16 {
            "h"
        } else {
            "x"
        };
        let kern = func(&format!("ds4_attn_tc_{hd}_{sfx}"))?;
        kern.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(drv)?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)? as u32;
        let scratch = DBuf::zeroed(stream, (raw_cap + comp_rows) * hd * 4)?;
        let flags = DBuf::zeroed(stream, (raw_cap + comp_rows) * 4)?;
        let lo_skip = std::env::var("DS4_CUDA_TC_ATTN_LOSKIP").map_or(true, |v| v != "0");
        let compact = if hd == 512
            && precision == AttnPrecision::Split
            && std::env::var("DS4_CUDA_TC_ATTN_COMPACT").map_or(true, |v| v != "0")
        {
            Some(DBuf::zeroed(
                stream,
                (raw_cap + comp_rows) * (hd + hd / 8) * 2,
            )?)
        } else {
            None
        };
        let rep = DBuf::zeroed(stream, 16)?;
        Ok(AttnTc {
            prep: func("ds4_attn_tc_prep")?,
            kern,
            _module: module,
            smem,
            hd,
            precision,
            raw_cap,
            comp_rows,
            prep_blocks: sms * 4,
            sms,
            scratch,
            flags,
            lo_skip,
            compact,
            rep,
        })
    }

    /// Turn the skipping of zero hi·lo products on or off (the output bits do not change; for
    /// tests and A/B timing).
    pub fn set_lo_skip(&mut self, on: bool) {
        self.lo_skip = on;
    }

    /// The row flags the last [`AttnTc::attention`] call's preparation wrote: ring slots
    /// `0..raw_cap`, then compressed rows (bit s: the row's lo part is zero in eighth s of the
    /// dims; compressed rows not visible to that chunk keep older values).
    pub fn row_flags(&self, stream: &Arc<CudaStream>) -> Result<Vec<u32>, CudaError> {
        let mut v = vec![0u32; self.raw_cap + self.comp_rows];
        crate::rt::dtoh(stream, &mut v, self.flags.ptr)?;
        Ok(v)
    }

    /// Whether the last [`AttnTc::attention`] call gathered compact rows.
    pub fn last_compact(&self, stream: &Arc<CudaStream>) -> Result<bool, CudaError> {
        let mut v = [0u32; 1];
        crate::rt::dtoh(stream, &mut v, self.rep.ptr)?;
        Ok(v[0] == 1)
    }

    /// The operand precision.
    pub fn precision(&self) -> AttnPrecision {
        self.precision
    }

    /// Device bytes of the row scratch.
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.bytes + self.flags.bytes + self.compact.as_ref().map_or(0, |c| c.bytes)
    }

    /// Whether [`AttnTc::attention`] takes this launch geometry (head dim, ring, scratch).
    pub(crate) fn fits(&self, a: &AttnLaunch, comp_rows: usize) -> bool {
        a.hd == self.hd
            && a.raw_cap == self.raw_cap
            && comp_rows <= self.comp_rows
            && a.n_rot <= a.hd
            && a.n_rot.is_multiple_of(2)
    }

    /// Whether [`AttnTc::attention`] can also write the Q8_0 activation quantization of its
    /// output (a 32-dim block within one warp's eighth of the head dims).
    pub(crate) fn q8_fits(&self) -> bool {
        (self.hd / 8).is_multiple_of(32)
    }

    /// Attention (+ inverse RoPE) of the `n` tokens of `a` into `a.heads`, as
    /// [`crate::fwd::Fwd::attention`] computes it (`a.part` unused). `comp_rows` is the size
    /// (rows) of the layer's compressed-row buffer `a.comp` (0 without one).
    /// With `q8 = Some((qs, d))` (only where [`AttnTc::q8_fits`]) the kernel also writes the
    /// `[n][nh·hd]` output quantized as `Gemv::quantize_act(Q8_0, heads, n, nh·hd)` does (same
    /// bytes: `qs` its int8 values, `d` its scales, i.e. `act` and `act + align256(n·nh·hd)`);
    /// `a.heads = 0` then skips the f32 output.
    /// With `qnorm = Some(eps)`, `a.q` holds the queries before their per-head RMSNorm + RoPE
    /// ([`crate::fwd::Fwd::head_norm_rope`], left to this call): the kernel applies it on its Q
    /// load with the numerics of `ds4_head_norm_rope_fast` (the form that launcher takes for
    /// every geometry the route fits), so the output is bit-identical to that launch followed
    /// by this call without `qnorm`; `a.q` is left as it was.
    ///
    /// # Safety
    /// Every address of `a` is a live device allocation of the sizes the exact kernel reads
    /// and writes for these `n` tokens, on `stream`; `q8` (if any) has room for the Q8_0
    /// activation layout of `n` rows of `nh·hd`.
    pub(crate) unsafe fn attention(
        &self,
        stream: &CudaStream,
        a: &AttnLaunch,
        comp_rows: usize,
        n: usize,
        q8: Option<(u64, u64)>,
        qnorm: Option<f32>,
    ) -> Result<(), CudaError> {
        if q8.is_some() && !self.q8_fits() {
            return Err(aerr(format!("Q8_0 output with head dim {}", self.hd)));
        }
        if q8.is_none() && a.heads == 0 {
            return Err(aerr("no output".to_string()));
        }
        if qnorm.is_some() && !a.q.is_multiple_of(16) {
            return Err(aerr("Q norm on an unaligned q"));
        }
        let (q8s, q8d) = q8.unwrap_or((0, 0));
        if n == 0 {
            return Ok(());
        }
        if !self.fits(a, comp_rows) {
            return Err(aerr(format!(
                "launch (hd {}, raw_cap {}, {comp_rows} compressed rows) does not fit the route (hd {}, raw_cap {}, {} rows)",
                a.hd, a.raw_cap, self.hd, self.raw_cap, self.comp_rows
            )));
        }
        let items = a.nh.div_ceil(HPC) * n;
        if items > i32::MAX as usize {
            return Err(aerr(format!("{n} tokens in one launch")));
        }
        let hd = self.hd;
        let ring16 = self.scratch.ptr;
        let comp16 = ring16 + (self.raw_cap * hd * 4) as u64;
        let flags = self.flags.ptr;
        let skip = self.lo_skip && self.precision == AttnPrecision::Split;
        // Compact rows (only with the skip): ring slots, then compressed rows.
        let rowc = match (&self.compact, skip) {
            (Some(c), true) => c.ptr,
            _ => 0,
        };
        let crow = (hd + hd / 8) * 2;
        let prep = |src: u64, rows: usize, ratio: usize, dst: u64, fl: u64, dstc: u64| {
            launch(
                stream,
                &self.prep,
                (self.prep_blocks, 1, 1),
                256,
                0,
                &[
                    A::P(src),
                    A::I(rows as i32),
                    A::P(a.pos),
                    A::I(n as i32),
                    A::I(ratio as i32),
                    A::I(hd as i32),
                    A::P(dst),
                    A::P(fl),
                    A::P(dstc),
                ],
            )
        };
        prep(a.ring, self.raw_cap, 0, ring16, flags, rowc)?;
        if a.ratio > 0 && comp_rows > 0 {
            prep(
                a.comp,
                comp_rows,
                a.ratio,
                comp16,
                flags + (self.raw_cap * 4) as u64,
                if rowc == 0 {
                    0
                } else {
                    rowc + (self.raw_cap * crow) as u64
                },
            )?;
        }
        launch(
            stream,
            &self.kern,
            ((items as u32).min(self.sms), 1, 1),
            THREADS,
            self.smem,
            &[
                A::P(a.q),
                A::P(ring16),
                A::I(a.raw_cap as i32),
                A::I(a.window as i32),
                A::P(comp16),
                A::I(a.ratio as i32),
                A::I(a.has_indexer as i32),
                A::P(a.isel),
                A::I(a.topk as i32),
                A::P(a.sinks),
                A::F(a.scale),
                A::I(a.nh as i32),
                A::I(a.n_rot as i32),
                A::P(a.inv_freq),
                A::P(a.pos),
                A::P(a.heads),
                A::P(q8s),
                A::P(q8d),
                A::I(n as i32),
                A::I(i32::from(qnorm.is_some())),
                A::F(qnorm.unwrap_or(0.0)),
                A::P(if skip { flags } else { 0 }),
                A::P(rowc),
                A::P(self.rep.ptr),
            ],
        )
    }
}
