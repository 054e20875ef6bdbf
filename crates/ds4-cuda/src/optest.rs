//! Host-slice entry points to every `fwd.cu` kernel, for the op-level tests (each kernel is
//! checked against its `ds4_model::ops` function on random inputs). Each call uploads its
//! inputs, runs the kernel through the same launch wrappers the backend uses, and reads the
//! outputs back. Not a stable API.

// Host-side test harness: results are returned as tuples of the kernels' output vectors.
#![allow(clippy::type_complexity)]
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use ds4_model::ops::CompressorGeom;

use crate::CudaError;
use crate::attn_tc::{AttnPrecision, AttnTc};
pub use crate::fwd::IdxKernel;
use crate::fwd::{AttnLaunch, CompDec, CompLaunch, Fwd, QkvDec, attn_dec_bytes, attn_splits};
use crate::rt::{DBuf, dtoh, htod};

/// The kernels on one device, driven with host slices.
pub struct GpuOps {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    fwd: Fwd,
    pos: DBuf,
}

/// Host inputs of one attention call ([`GpuOps::attention_timed`]); the layouts of
/// [`GpuOps::attention`]'s arguments.
#[derive(Clone, Copy, Debug)]
pub struct AttnInputs<'a> {
    pub q: &'a [f32],
    pub ring: &'a [f32],
    pub raw_cap: usize,
    pub window: usize,
    pub comp: &'a [f32],
    pub ratio: usize,
    pub has_indexer: bool,
    pub isel: &'a [i32],
    pub topk: usize,
    pub sinks: &'a [f32],
    pub scale: f32,
    pub nh: usize,
    pub hd: usize,
    pub n_rot: usize,
    pub inv_freq: &'a [f64],
    pub pos0: usize,
    pub n: usize,
}

/// The device copies of an [`AttnInputs`]'s arrays (q, ring, comp, isel, sinks, inv_freq).
struct AttnUploads([DBuf; 6]);

impl AttnUploads {
    /// The launch description over these uploads (`pos`, `part`, `heads` device addresses).
    fn launch(&self, a: &AttnInputs<'_>, pos: u64, part: u64, heads: u64) -> AttnLaunch {
        let [q, ring, comp, isel, sinks, inv_freq] = &self.0;
        AttnLaunch {
            q: q.ptr,
            ring: ring.ptr,
            raw_cap: a.raw_cap,
            window: a.window,
            comp: comp.ptr,
            ratio: a.ratio,
            has_indexer: a.has_indexer,
            isel: isel.ptr,
            topk: a.topk,
            sinks: sinks.ptr,
            scale: a.scale,
            nh: a.nh,
            hd: a.hd,
            n_rot: a.n_rot,
            inv_freq: inv_freq.ptr,
            pos,
            part,
            heads,
        }
    }
}

/// Outputs of [`GpuOps::hc_pre`].
#[derive(Clone, Debug)]
pub struct HcPreOut {
    pub post: Vec<f32>,
    pub comb: Vec<f32>,
    pub xin: Vec<f32>,
    pub a: Vec<f32>,
}

/// One compressor of [`GpuOps::qkv_dec`]: geometry, QAT mode (0 none, 1 FP8, 2 indexer), this
/// token's projections (`ckv`, `csc` without ape), and the state before the token.
#[derive(Clone, Debug)]
pub struct CompDecIn<'a> {
    pub g: CompressorGeom,
    pub qat_mode: i32,
    pub ckv: &'a [f32],
    pub csc: &'a [f32],
    pub ape: &'a [f32],
    pub st_kv: &'a [f32],
    pub st_sc: &'a [f32],
    pub norm: &'a [f32],
    pub rows: &'a [f32],
}

/// Inputs of [`GpuOps::qkv_dec`] (one decode token at `pos`).
#[derive(Clone, Debug)]
pub struct QkvDecIn<'a> {
    pub pos: usize,
    pub q: &'a [f32],
    pub nh: usize,
    pub hd: usize,
    pub n_rot: usize,
    pub eps: f32,
    pub inv: &'a [f64],
    pub kvp: &'a [f32],
    pub kv_w: &'a [f32],
    pub ring: &'a [f32],
    pub raw_cap: usize,
    pub qat: bool,
    pub n_nope: usize,
    pub comp: [Option<CompDecIn<'a>>; 2],
    pub inv_comp: &'a [f64],
    /// Indexer queries `[nih][ihd]` and weights `[nih]`.
    pub iq: Option<(&'a [f32], &'a [f32])>,
    pub nih: usize,
    pub ihd: usize,
    pub iqat: bool,
    pub wscale: f64,
}

/// Outputs of [`GpuOps::qkv_dec`]: q, the ring, per compressor `(rows, st_kv, st_sc)`, and
/// the indexer `(iq, iw)`.
#[derive(Clone, Debug)]
pub struct QkvDecOut {
    pub q: Vec<f32>,
    pub ring: Vec<f32>,
    pub comp: [Option<(Vec<f32>, Vec<f32>, Vec<f32>)>; 2],
    pub iq: Option<(Vec<f32>, Vec<f32>)>,
}

impl GpuOps {
    /// Open device `ordinal` and load the kernels.
    pub fn new(ordinal: usize) -> Result<GpuOps, CudaError> {
        let ctx = crate::device::open_context(ordinal)?;
        // SAFETY: every buffer is used on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(crate::rt::drv)?;
        let fwd = Fwd::new(&ctx, stream.clone())?;
        let pos = DBuf::from_slice(&stream, &[0i32])?;
        Ok(GpuOps {
            _ctx: ctx,
            stream,
            fwd,
            pos,
        })
    }

    fn attn_upload(&self, a: &AttnInputs<'_>) -> Result<AttnUploads, CudaError> {
        Ok(AttnUploads([
            self.up(a.q)?,
            self.up(a.ring)?,
            self.up(a.comp)?,
            self.up(a.isel)?,
            self.up(a.sinks)?,
            self.up(a.inv_freq)?,
        ]))
    }

    fn up<T: Copy>(&self, v: &[T]) -> Result<DBuf, CudaError> {
        DBuf::from_slice(&self.stream, v)
    }
    fn zeros(&self, n: usize) -> Result<DBuf, CudaError> {
        DBuf::zeroed(&self.stream, n * 4)
    }
    fn down<T: Copy + Default>(&self, b: &DBuf, n: usize) -> Result<Vec<T>, CudaError> {
        let mut v = vec![T::default(); n];
        self.stream.synchronize().map_err(crate::rt::drv)?;
        dtoh(&self.stream, &mut v, b.ptr)?;
        Ok(v)
    }
    fn set_pos(&self, p: usize) -> Result<(), CudaError> {
        htod(&self.stream, self.pos.ptr, &[p as i32])
    }

    /// `rows` rows of `dim` (`ops::rms_norm` with `w`, else `rms_norm_noweight`).
    pub fn rms_norm_rows(
        &self,
        x: &[f32],
        dim: usize,
        w: Option<&[f32]>,
        eps: f32,
    ) -> Result<Vec<f32>, CudaError> {
        let rows = x.len() / dim;
        let dx = self.up(x)?;
        let dw = match w {
            Some(w) => Some(self.up(w)?),
            None => None,
        };
        let out = self.zeros(x.len())?;
        self.fwd.rms_rows(
            dx.ptr,
            dim,
            dw.as_ref().map_or(0, |b| b.ptr),
            dim,
            eps,
            out.ptr,
            dim,
            rows,
        )?;
        self.down(&out, x.len())
    }

    /// HC pre of `n` tokens: `mix` `[n][(2+hc)·hc]`, `x` `[n][hc][e]`.
    pub fn hc_pre(
        &self,
        mix: &[f32],
        scale: &[f32],
        base: &[f32],
        hc: usize,
        iters: usize,
        hc_eps: f32,
        x: &[f32],
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        n: usize,
    ) -> Result<HcPreOut, CudaError> {
        let (dm, ds, db, dx, dn) = (
            self.up(mix)?,
            self.up(scale)?,
            self.up(base)?,
            self.up(x)?,
            self.up(norm)?,
        );
        let post = self.zeros(n * hc)?;
        let comb = self.zeros(n * hc * hc)?;
        let xin = self.zeros(n * e)?;
        let a = self.zeros(n * e)?;
        self.fwd.hc_pre(
            dm.ptr, ds.ptr, db.ptr, hc, iters, hc_eps, dx.ptr, e, dn.ptr, rms_eps, post.ptr,
            comb.ptr, xin.ptr, a.ptr, n, None,
        )?;
        Ok(HcPreOut {
            post: self.down(&post, n * hc)?,
            comb: self.down(&comb, n * hc * hc)?,
            xin: self.down(&xin, n * e)?,
            a: self.down(&a, n * e)?,
        })
    }

    /// [`GpuOps::hc_pre`] on the chunk fast path with `xin` skipped and `a`'s Q8_0 activation
    /// quantization fused: returns `(out, act)` (`out.xin` empty; `act` the `[n][e]` Q8_0
    /// layout of `Gemv::quantize_act`: int8 values, then the f32 scales at align256(n·e)).
    pub fn hc_pre_q8(
        &self,
        mix: &[f32],
        scale: &[f32],
        base: &[f32],
        hc: usize,
        iters: usize,
        hc_eps: f32,
        x: &[f32],
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        n: usize,
    ) -> Result<(HcPreOut, Vec<u8>), CudaError> {
        let (dm, ds, db, dx, dn) = (
            self.up(mix)?,
            self.up(scale)?,
            self.up(base)?,
            self.up(x)?,
            self.up(norm)?,
        );
        let post = self.zeros(n * hc)?;
        let comb = self.zeros(n * hc * hc)?;
        let a = self.zeros(n * e)?;
        let bytes = crate::gemv::Gemv::act_bytes(ds4_gguf::GgmlType::Q8_0, e, n);
        let act = DBuf::from_slice(&self.stream, &vec![0xa5u8; bytes])?;
        let od = (n * e).div_ceil(256) * 256;
        self.fwd.hc_pre(
            dm.ptr,
            ds.ptr,
            db.ptr,
            hc,
            iters,
            hc_eps,
            dx.ptr,
            e,
            dn.ptr,
            rms_eps,
            post.ptr,
            comb.ptr,
            0,
            a.ptr,
            n,
            Some((act.ptr, act.ptr + od as u64)),
        )?;
        Ok((
            HcPreOut {
                post: self.down(&post, n * hc)?,
                comb: self.down(&comb, n * hc * hc)?,
                xin: Vec::new(),
                a: self.down(&a, n * e)?,
            },
            self.down(&act, bytes)?,
        ))
    }

    /// HC post of `n` tokens (`routed`: `[n][k][e]` and `k`), returns `(xo, flat)`.
    pub fn hc_post(
        &self,
        f: &[f32],
        routed: Option<(&[f32], usize)>,
        x: &[f32],
        post: &[f32],
        comb: &[f32],
        hc: usize,
        e: usize,
        eps: f32,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let (df, dx, dp, dc) = (self.up(f)?, self.up(x)?, self.up(post)?, self.up(comb)?);
        let (dr, k) = match routed {
            Some((r, k)) => (Some(self.up(r)?), k),
            None => (None, 0),
        };
        let xo = self.zeros(n * hc * e)?;
        let flat = self.zeros(n * hc * e)?;
        self.fwd.hc_post(
            df.ptr,
            dr.as_ref().map_or(0, |b| b.ptr),
            k,
            dx.ptr,
            dp.ptr,
            dc.ptr,
            hc,
            e,
            xo.ptr,
            flat.ptr,
            eps,
            n,
            0,
        )?;
        Ok((self.down(&xo, n * hc * e)?, self.down(&flat, n * hc * e)?))
    }

    /// [`GpuOps::hc_post`] on the chunk fast path with the per-token norm factors also
    /// written: returns `(xo, flat, fscale)`.
    pub fn hc_post_scaled(
        &self,
        f: &[f32],
        routed: Option<(&[f32], usize)>,
        x: &[f32],
        post: &[f32],
        comb: &[f32],
        hc: usize,
        e: usize,
        eps: f32,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f64>), CudaError> {
        let (df, dx, dp, dc) = (self.up(f)?, self.up(x)?, self.up(post)?, self.up(comb)?);
        let (dr, k) = match routed {
            Some((r, k)) => (Some(self.up(r)?), k),
            None => (None, 0),
        };
        let xo = self.zeros(n * hc * e)?;
        let flat = self.zeros(n * hc * e)?;
        let fs = self.up(&vec![f64::NAN; n])?;
        self.fwd.hc_post(
            df.ptr,
            dr.as_ref().map_or(0, |b| b.ptr),
            k,
            dx.ptr,
            dp.ptr,
            dc.ptr,
            hc,
            e,
            xo.ptr,
            flat.ptr,
            eps,
            n,
            fs.ptr,
        )?;
        Ok((
            self.down(&xo, n * hc * e)?,
            self.down(&flat, n * hc * e)?,
            self.down(&fs, n)?,
        ))
    }

    /// HC head + output norm of `n` tokens.
    pub fn hc_head(
        &self,
        mix: &[f32],
        scale: f32,
        base: &[f32],
        hc_eps: f32,
        x: &[f32],
        hc: usize,
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        n: usize,
    ) -> Result<Vec<f32>, CudaError> {
        let (dm, db, dx, dn) = (self.up(mix)?, self.up(base)?, self.up(x)?, self.up(norm)?);
        let hn = self.zeros(n * e)?;
        self.fwd.hc_head(
            dm.ptr, scale, db.ptr, hc_eps, dx.ptr, hc, e, dn.ptr, rms_eps, hn.ptr, n,
        )?;
        self.down(&hn, n * e)
    }

    /// Q heads of `n` tokens at positions `pos0..`: per-head norm + RoPE.
    pub fn head_norm_rope(
        &self,
        q: &[f32],
        nh: usize,
        hd: usize,
        n_rot: usize,
        eps: f32,
        inv_freq: &[f64],
        pos0: usize,
        n: usize,
    ) -> Result<Vec<f32>, CudaError> {
        let dq = self.up(q)?;
        let di = self.up(inv_freq)?;
        self.set_pos(pos0)?;
        self.fwd
            .head_norm_rope(dq.ptr, nh, hd, n_rot, eps, di.ptr, self.pos.ptr, n)?;
        self.down(&dq, q.len())
    }

    /// KV rows of `n` tokens at `pos0..`; returns the whole ring (`raw_cap` rows).
    pub fn kv_finish(
        &self,
        kvp: &[f32],
        w: &[f32],
        hd: usize,
        n_rot: usize,
        eps: f32,
        inv_freq: &[f64],
        pos0: usize,
        qat: bool,
        n_nope: usize,
        raw_cap: usize,
        n: usize,
    ) -> Result<Vec<f32>, CudaError> {
        let (dk, dw, di) = (self.up(kvp)?, self.up(w)?, self.up(inv_freq)?);
        let ring = self.zeros(raw_cap * hd)?;
        self.set_pos(pos0)?;
        self.fwd.kv_finish(
            dk.ptr,
            dw.ptr,
            hd,
            n_rot,
            eps,
            di.ptr,
            self.pos.ptr,
            qat,
            n_nope,
            ring.ptr,
            raw_cap,
            n,
        )?;
        self.down(&ring, raw_cap * hd)
    }

    /// A compressor over `n` tokens at `pos0..` (`ckv`, `csc` `[n][width]`, `csc` without
    /// ape). `rows` is the compressed-row buffer before the chunk (`cap` rows); returns
    /// `(rows, st_kv, st_sc)` after it.
    pub fn compressor(
        &self,
        g: CompressorGeom,
        n_rot: usize,
        n_nope: usize,
        qat_mode: i32,
        eps: f32,
        ckv: &[f32],
        csc: &[f32],
        ape: &[f32],
        st_kv: &[f32],
        st_sc: &[f32],
        norm: &[f32],
        inv_freq: &[f64],
        rows: &[f32],
        pos0: usize,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), CudaError> {
        let (dk, dc, da) = (self.up(ckv)?, self.up(csc)?, self.up(ape)?);
        let (sk, ss) = (self.up(st_kv)?, self.up(st_sc)?);
        let (dn, di, dr) = (self.up(norm)?, self.up(inv_freq)?, self.up(rows)?);
        self.set_pos(pos0)?;
        let cl = CompLaunch {
            ratio: g.ratio,
            overlap: g.overlap,
            d_c: g.d_c,
            n_rot,
            n_nope,
            qat_mode,
            eps,
        };
        self.fwd.compressor(
            cl,
            dk.ptr,
            dc.ptr,
            da.ptr,
            sk.ptr,
            ss.ptr,
            self.pos.ptr,
            dn.ptr,
            di.ptr,
            dr.ptr,
            n,
        )?;
        Ok((
            self.down(&dr, rows.len())?,
            self.down(&sk, st_kv.len())?,
            self.down(&ss, st_sc.len())?,
        ))
    }

    /// Indexer queries of `n` tokens at `pos0..`: returns `(iq, iw)`.
    pub fn indexer_q(
        &self,
        iq: &[f32],
        iw: &[f32],
        nih: usize,
        ihd: usize,
        n_rot: usize,
        inv_freq: &[f64],
        pos0: usize,
        qat: bool,
        wscale: f64,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let (q, w, _) = self.indexer_q_timed(
            None, iq, iw, nih, ihd, n_rot, inv_freq, pos0, qat, wscale, n, 0,
        )?;
        Ok((q, w))
    }

    /// Indexer queries with the kernel chosen as [`Fwd::indexer_q`]'s `warp`: `(iq, iw)` of one run, and the median milliseconds of
    /// `reps` further runs (in place, so they run on already-transformed values; 0 with reps 0).
    pub fn indexer_q_timed(
        &self,
        warp: Option<bool>,
        iq: &[f32],
        iw: &[f32],
        nih: usize,
        ihd: usize,
        n_rot: usize,
        inv_freq: &[f64],
        pos0: usize,
        qat: bool,
        wscale: f64,
        n: usize,
        reps: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, f64), CudaError> {
        let (dq, dw, di) = (self.up(iq)?, self.up(iw)?, self.up(inv_freq)?);
        self.set_pos(pos0)?;
        let once = || {
            self.fwd.indexer_q(
                warp,
                dq.ptr,
                dw.ptr,
                nih,
                ihd,
                n_rot,
                di.ptr,
                self.pos.ptr,
                qat,
                wscale,
                n,
            )
        };
        once()?;
        let out = (self.down(&dq, iq.len())?, self.down(&dw, iw.len())?);
        let ms = if reps > 0 {
            self.median_ms(reps, once)?.unwrap_or(0.0)
        } else {
            0.0
        };
        Ok((out.0, out.1, ms))
    }

    /// Indexer scores and top-k of `n` tokens at `pos0..` over `icomp` (rows of `ihd`):
    /// returns `(scores [n][stride], isel [n][topk])`; `stride = icomp rows` rounded up.
    pub fn indexer_select(
        &self,
        iq: &[f32],
        iw: &[f32],
        icomp: &[f32],
        nih: usize,
        ihd: usize,
        ratio: usize,
        topk: usize,
        pos0: usize,
        n: usize,
        blocks: usize,
    ) -> Result<(Vec<f32>, usize, Vec<i32>), CudaError> {
        let rows = icomp.len() / ihd;
        let stride = (rows + 1).next_multiple_of(4);
        let (dq, dw, dc) = (self.up(iq)?, self.up(iw)?, self.up(icomp)?);
        let scores = self.zeros(n * stride)?;
        let isel = self.zeros(n * topk)?;
        self.set_pos(pos0)?;
        self.fwd.indexer_select(
            dq.ptr,
            dw.ptr,
            dc.ptr,
            nih,
            ihd,
            ratio,
            topk,
            self.pos.ptr,
            0,
            n,
            scores.ptr,
            stride,
            blocks,
            isel.ptr,
        )?;
        Ok((
            self.down(&scores, n * stride)?,
            stride,
            self.down(&isel, n * topk)?,
        ))
    }

    /// Indexer scores only (no top-k) of tokens `t0..n` of `n` tokens at `pos0..` (a score
    /// batch that starts inside the pass, as the backend's batches past the first do) with
    /// kernel `kernel`, inputs uploaded once, run `reps` times after a warm-up with `stride`
    /// floats per token row and `blocks` row blocks at most (the backend passes its
    /// `idx_blocks`). Returns the scores `[n][stride]` of the last run (unscored entries and
    /// the rows of tokens before `t0` NaN) and the median milliseconds of one call (0 with
    /// `reps` 0).
    pub fn indexer_scores_timed(
        &self,
        kernel: IdxKernel,
        iq: &[f32],
        iw: &[f32],
        icomp: &[f32],
        nih: usize,
        ihd: usize,
        ratio: usize,
        topk: usize,
        pos0: usize,
        n: usize,
        t0: usize,
        stride: usize,
        blocks: usize,
        reps: usize,
    ) -> Result<(Vec<f32>, f64), CudaError> {
        if t0 >= n {
            return Err(CudaError::Driver(format!(
                "indexer batch starts at token {t0} of {n}"
            )));
        }
        let (dq, dw, dc) = (self.up(iq)?, self.up(iw)?, self.up(icomp)?);
        let scores = self.up(&vec![f32::NAN; n * stride])?;
        self.set_pos(pos0)?;
        if nih == 64 && ihd == 128 {
            self.fwd.reserve_idx8(n - t0, stride)?;
        }
        let once = || {
            self.fwd.indexer_scores(
                kernel,
                dq.ptr,
                dw.ptr,
                dc.ptr,
                nih,
                ihd,
                ratio,
                topk,
                self.pos.ptr,
                t0,
                n - t0,
                scores.ptr + (t0 * stride * 4) as u64,
                stride,
                blocks,
            )
        };
        let ms = self.median_ms(reps, once)?.unwrap_or(0.0);
        Ok((self.down(&scores, n * stride)?, ms))
    }

    /// Whether the decode HC pre may run without a cluster (see `Fwd::set_hc_pre_red`).
    pub fn set_hc_pre_red(&self, on: bool) {
        self.fwd.set_hc_pre_red(on);
    }

    /// Int8 indexer scores kernel variant (0: `ds4_indexer_i8`, 1: `_b3`, 2: `_bl` (the
    /// default), 3: `_b3bl`).
    pub fn set_idx8_variant(&self, v: usize) {
        self.fwd.set_idx8_variant(v);
    }

    /// Whether the last int8 indexer launch ([`IdxKernel::Int8`]) found a row that is not
    /// int8·2^e and so ran the FP64 kernel (false before any).
    pub fn idx8_fell_back(&self) -> Result<bool, CudaError> {
        let Some(p) = self.fwd.idx8_slots() else {
            return Ok(false);
        };
        let mut v = vec![0i32; crate::fwd::IDX8_SLOTS];
        self.stream.synchronize().map_err(crate::rt::drv)?;
        dtoh(&self.stream, &mut v, p)?;
        Ok(v.iter().any(|&x| x != 0))
    }

    /// Attention of `n` tokens at `pos0..` (`nsplit` 0: the backend's choice).
    pub fn attention(
        &self,
        q: &[f32],
        ring: &[f32],
        raw_cap: usize,
        window: usize,
        comp: &[f32],
        ratio: usize,
        has_indexer: bool,
        isel: &[i32],
        topk: usize,
        sinks: &[f32],
        scale: f32,
        nh: usize,
        hd: usize,
        n_rot: usize,
        inv_freq: &[f64],
        pos0: usize,
        n: usize,
        nsplit: usize,
    ) -> Result<Vec<f32>, CudaError> {
        let nsplit = if nsplit == 0 {
            attn_splits(n, nh)
        } else {
            nsplit
        };
        let (dq, dr, dc) = (self.up(q)?, self.up(ring)?, self.up(comp)?);
        let (ds, dsk, di) = (self.up(isel)?, self.up(sinks)?, self.up(inv_freq)?);
        let part = DBuf::zeroed(&self.stream, n * nh * nsplit * (hd + 2) * 8)?;
        let heads = self.zeros(n * nh * hd)?;
        self.set_pos(pos0)?;
        let a = AttnLaunch {
            q: dq.ptr,
            ring: dr.ptr,
            raw_cap,
            window,
            comp: dc.ptr,
            ratio,
            has_indexer,
            isel: ds.ptr,
            topk,
            sinks: dsk.ptr,
            scale,
            nh,
            hd,
            n_rot,
            inv_freq: di.ptr,
            pos: self.pos.ptr,
            part: part.ptr,
            heads: heads.ptr,
        };
        self.fwd.attention(&a, n, nsplit)?;
        self.down(&heads, n * nh * hd)
    }

    /// One attention call as [`GpuOps::attention`], inputs uploaded once, run `reps` times
    /// after a warm-up: `route` None = the exact kernel (with the backend's split choice),
    /// `Some(p)` = the tensor-core route (`crate::attn_tc`) with operand precision `p`. Returns
    /// the output of the last run and the median milliseconds of one call (the route's f16 row
    /// preparation included).
    pub fn attention_timed(
        &self,
        a: &AttnInputs<'_>,
        route: Option<AttnPrecision>,
        reps: usize,
    ) -> Result<(Vec<f32>, f64), CudaError> {
        let (n, nh, hd) = (a.n, a.nh, a.hd);
        let nsplit = attn_splits(n, nh);
        let up = self.attn_upload(a)?;
        let part = if route.is_none() && nsplit > 1 {
            DBuf::zeroed(&self.stream, n * nh * nsplit * (hd + 2) * 8)?
        } else {
            DBuf::zeroed(&self.stream, 16)?
        };
        let heads = self.up(&vec![f32::NAN; n * nh * hd])?;
        self.set_pos(a.pos0)?;
        let l = up.launch(a, self.pos.ptr, part.ptr, heads.ptr);
        let comp_rows = if a.ratio > 0 { a.comp.len() / hd } else { 0 };
        let tc = match route {
            Some(p) => Some(AttnTc::new(
                &self._ctx,
                &self.stream,
                hd,
                a.raw_cap,
                comp_rows,
                p,
            )?),
            None => None,
        };
        let once = || -> Result<(), CudaError> {
            match &tc {
                // SAFETY: every address of `l` is an upload above, sized for n tokens.
                Some(t) => unsafe { t.attention(&self.stream, &l, comp_rows, n, None, None) },
                None => self.fwd.attention(&l, n, nsplit),
            }
        };
        let ms = self.median_ms(reps, once)?.unwrap_or(f64::NAN);
        Ok((self.down(&heads, n * nh * hd)?, ms))
    }

    /// The tensor-core attention route with and without the skipping of zero hi·lo products
    /// (rows exact in f16 in a warp's eighth of the dims): `(skipping, not skipping, row
    /// flags, compact)`, the flags as [`AttnTc::row_flags`] (ring slots, then compressed rows),
    /// `compact` whether the skipping run gathered compact rows ([`AttnTc::last_compact`]).
    #[allow(clippy::type_complexity)]
    pub fn attention_route_lo_skip(
        &self,
        a: &AttnInputs<'_>,
        prec: AttnPrecision,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<u32>, bool), CudaError> {
        let (n, nh, hd) = (a.n, a.nh, a.hd);
        let up = self.attn_upload(a)?;
        let part = DBuf::zeroed(&self.stream, 16)?;
        let mut out = Vec::new();
        let comp_rows = if a.ratio > 0 { a.comp.len() / hd } else { 0 };
        let mut t = AttnTc::new(&self._ctx, &self.stream, hd, a.raw_cap, comp_rows, prec)?;
        let mut compact = false;
        for on in [true, false] {
            let heads = self.up(&vec![f32::NAN; n * nh * hd])?;
            self.set_pos(a.pos0)?;
            let l = up.launch(a, self.pos.ptr, part.ptr, heads.ptr);
            t.set_lo_skip(on);
            // SAFETY: every address of `l` is an upload above, sized for n tokens.
            unsafe { t.attention(&self.stream, &l, comp_rows, n, None, None)? };
            if on {
                compact = t.last_compact(&self.stream)?;
            }
            out.push(self.down(&heads, n * nh * hd)?);
        }
        let off = out.pop().unwrap_or_default();
        let flags = t.row_flags(&self.stream)?;
        Ok((out.pop().unwrap_or_default(), off, flags, compact))
    }

    /// The tensor-core attention route with its fused Q8_0 output (hd / 8 a multiple of 32):
    /// returns `(heads, act, act_only)`: the f32 output and the `[n][nh·hd]` Q8_0 activation
    /// layout written together, then the layout of a second run without the f32 output.
    pub fn attention_route_q8(
        &self,
        a: &AttnInputs<'_>,
        prec: AttnPrecision,
    ) -> Result<(Vec<f32>, Vec<u8>, Vec<u8>), CudaError> {
        let (n, nh, hd) = (a.n, a.nh, a.hd);
        let up = self.attn_upload(a)?;
        let part = DBuf::zeroed(&self.stream, 16)?;
        let heads = self.up(&vec![f32::NAN; n * nh * hd])?;
        let bytes = crate::gemv::Gemv::act_bytes(ds4_gguf::GgmlType::Q8_0, nh * hd, n);
        let od = (n * nh * hd).div_ceil(256) * 256;
        let act = DBuf::from_slice(&self.stream, &vec![0xa5u8; bytes])?;
        let act2 = DBuf::from_slice(&self.stream, &vec![0x5au8; bytes])?;
        self.set_pos(a.pos0)?;
        let mut l = up.launch(a, self.pos.ptr, part.ptr, heads.ptr);
        let comp_rows = if a.ratio > 0 { a.comp.len() / hd } else { 0 };
        let t = AttnTc::new(&self._ctx, &self.stream, hd, a.raw_cap, comp_rows, prec)?;
        // SAFETY: every address of `l` is an upload above, sized for n tokens; act / act2 hold
        // the Q8_0 layout of n rows of nh·hd.
        unsafe {
            t.attention(
                &self.stream,
                &l,
                comp_rows,
                n,
                Some((act.ptr, act.ptr + od as u64)),
                None,
            )?;
            l.heads = 0;
            t.attention(
                &self.stream,
                &l,
                comp_rows,
                n,
                Some((act2.ptr, act2.ptr + od as u64)),
                None,
            )?;
        }
        Ok((
            self.down(&heads, n * nh * hd)?,
            self.down(&act, bytes)?,
            self.down(&act2, bytes)?,
        ))
    }

    /// The tensor-core attention route on raw queries with the per-head RMSNorm + RoPE fused
    /// into its Q load (`qnorm = Some(eps)`), and the unfused sequence (`Fwd::head_norm_rope`
    /// on the queries, then the route): returns `(fused, unfused)` f32 heads.
    pub fn attention_route_qnorm(
        &self,
        a: &AttnInputs<'_>,
        prec: AttnPrecision,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let (n, nh, hd) = (a.n, a.nh, a.hd);
        let up = self.attn_upload(a)?;
        let part = DBuf::zeroed(&self.stream, 16)?;
        let fused = self.up(&vec![f32::NAN; n * nh * hd])?;
        let unfused = self.up(&vec![f32::NAN; n * nh * hd])?;
        self.set_pos(a.pos0)?;
        let mut l = up.launch(a, self.pos.ptr, part.ptr, fused.ptr);
        let comp_rows = if a.ratio > 0 { a.comp.len() / hd } else { 0 };
        let t = AttnTc::new(&self._ctx, &self.stream, hd, a.raw_cap, comp_rows, prec)?;
        // SAFETY: every address of `l` is an upload above, sized for n tokens.
        unsafe { t.attention(&self.stream, &l, comp_rows, n, None, Some(eps))? };
        self.fwd
            .head_norm_rope(l.q, nh, hd, a.n_rot, eps, l.inv_freq, l.pos, n)?;
        l.heads = unfused.ptr;
        // SAFETY: as above.
        unsafe { t.attention(&self.stream, &l, comp_rows, n, None, None)? };
        Ok((
            self.down(&fused, n * nh * hd)?,
            self.down(&unfused, n * nh * hd)?,
        ))
    }

    /// Router of `n` tokens: returns `(probs, sel, wts)`.
    pub fn router(
        &self,
        rlog: &[f32],
        ne: usize,
        k: usize,
        tid2eid: Option<&[i32]>,
        tokens: &[i32],
        bias: Option<&[f32]>,
        wscale: f32,
        n: usize,
    ) -> Result<(Vec<f32>, Vec<i32>, Vec<f32>), CudaError> {
        let dl = self.up(rlog)?;
        let dt = match tid2eid {
            Some(t) => Some(self.up(t)?),
            None => None,
        };
        let dtok = self.up(tokens)?;
        let db = match bias {
            Some(b) => Some(self.up(b)?),
            None => None,
        };
        let probs = self.zeros(n * ne)?;
        let sel = self.zeros(n * k)?;
        let wts = self.zeros(n * k)?;
        self.fwd.router(
            dl.ptr,
            ne,
            k,
            tid2eid.is_some(),
            dt.as_ref().map_or(0, |b| b.ptr),
            dtok.ptr,
            db.as_ref().map_or(0, |b| b.ptr),
            wscale,
            probs.ptr,
            sel.ptr,
            wts.ptr,
            n,
        )?;
        Ok((
            self.down(&probs, n * ne)?,
            self.down(&sel, n * k)?,
            self.down(&wts, n * k)?,
        ))
    }

    /// SwiGLU (weight 1) of `g`, `u` (same length).
    pub fn swiglu(&self, g: &[f32], u: &[f32], clamp: f32) -> Result<Vec<f32>, CudaError> {
        let (dg, du) = (self.up(g)?, self.up(u)?);
        let out = self.zeros(g.len())?;
        self.fwd
            .swiglu(dg.ptr, du.ptr, g.len(), g.len(), 1, clamp, out.ptr, g.len())?;
        self.down(&out, g.len())
    }

    /// Embedding of `tokens` from a table of GGML type id `ty` (0 F32, 1 F16, 8 Q8_0, 30 BF16).
    pub fn embed(
        &self,
        table: &[u8],
        ty: i32,
        e: usize,
        row_bytes: usize,
        tokens: &[i32],
        hc: usize,
    ) -> Result<Vec<f32>, CudaError> {
        let (dt, dk) = (self.up(table)?, self.up(tokens)?);
        let n = tokens.len();
        let x = self.zeros(n * hc * e)?;
        self.fwd
            .embed(dt.ptr, ty, e, row_bytes, dk.ptr, n, hc, x.ptr)?;
        self.down(&x, n * hc * e)
    }

    /// The greedy pick of `x` (`ds4_argmax_pick`): `[best, second, nan seen, 0]`, from two runs
    /// in a row into a cleared result each time, as graph steps run it (the second run needs
    /// the first one's counter reset).
    pub fn argmax_pick(&self, x: &[f32]) -> Result<[[u32; 4]; 2], CudaError> {
        let dx = self.up(x)?;
        let part = self.zeros(crate::fwd::PICK_PART_BYTES / 4)?;
        let mut r = [[0u32; 4]; 2];
        for run in &mut r {
            let out = self.up(&[u32::MAX; 4])?;
            self.fwd.argmax_pick(dx.ptr, x.len(), part.ptr, out.ptr)?;
            run.copy_from_slice(&self.down::<u32>(&out, 4)?);
        }
        Ok(r)
    }

    /// `*pos += n` on the device, read back (checks the position bookkeeping kernel).
    pub fn advance_pos(&self, pos0: usize, n: usize) -> Result<i32, CudaError> {
        self.set_pos(pos0)?;
        self.fwd.advance_pos(self.pos.ptr, n)?;
        Ok(self.down::<i32>(&self.pos, 1)?[0])
    }

    // ---- decode-step kernels (one token)

    /// HC pre of one token (`ds4_hc_split_dec` + `ds4_hc_pre_dec`); `side`: the split runs on
    /// the side stream (as in the decode step), else on the main stream.
    pub fn hc_pre_dec(
        &self,
        mix: &[f32],
        scale: &[f32],
        base: &[f32],
        hc: usize,
        iters: usize,
        hc_eps: f32,
        x: &[f32],
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        side: bool,
    ) -> Result<HcPreOut, CudaError> {
        let (dm, ds, db, dx, dn) = (
            self.up(mix)?,
            self.up(scale)?,
            self.up(base)?,
            self.up(x)?,
            self.up(norm)?,
        );
        let post = self.zeros(hc)?;
        let comb = self.zeros(hc * hc)?;
        let xin = self.zeros(e)?;
        let a = self.zeros(e)?;
        if side {
            self.fwd.hc_split_side(
                dm.ptr, ds.ptr, db.ptr, hc, iters, hc_eps, post.ptr, comb.ptr,
            )?;
        } else {
            self.fwd.hc_split(
                dm.ptr, ds.ptr, db.ptr, hc, iters, hc_eps, post.ptr, comb.ptr,
            )?;
        }
        self.fwd.hc_pre_dec(
            dm.ptr,
            ds.ptr,
            db.ptr,
            hc,
            hc_eps,
            dx.ptr,
            e,
            dn.ptr,
            rms_eps,
            xin.ptr,
            a.ptr,
            crate::fwd::DecQuant::default(),
        )?;
        if side {
            self.fwd.join_side()?;
        }
        Ok(HcPreOut {
            post: self.down(&post, hc)?,
            comb: self.down(&comb, hc * hc)?,
            xin: self.down(&xin, e)?,
            a: self.down(&a, e)?,
        })
    }

    /// HC pre collapse + norm of one token (`ds4_hc_pre_dec`) with the fused activation
    /// quantization of `a` into the one-row layouts of `q8_0` (a Q8_0-activation weight type)
    /// and/or `q8_k` (a Q8_K-activation type); returns `(a, q8_0 act bytes, q8_k act bytes)`
    /// (an empty vector for a format not asked for).
    pub fn hc_pre_dec_quant(
        &self,
        mix: &[f32],
        scale: &[f32],
        base: &[f32],
        hc: usize,
        hc_eps: f32,
        x: &[f32],
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        q8_0: Option<ds4_gguf::GgmlType>,
        q8_k: Option<ds4_gguf::GgmlType>,
    ) -> Result<(Vec<f32>, Vec<u8>, Vec<u8>), CudaError> {
        let (_, a, q0, qk) = self.hc_pre_mix_dec(
            mix, None, scale, base, hc, hc_eps, x, e, norm, rms_eps, q8_0, q8_k,
        )?;
        Ok((a, q0, qk))
    }

    /// [`GpuOps::hc_pre_dec_quant`], and with `fused = Some((flat, fn))` (fn: F16 bits
    /// `[(2+hc)·hc][hc·e]`) the mix product in the same launch (`ds4_hc_pre_mix_dec`; `mix`
    /// unused); returns `(mix, a, q8_0 act, q8_k act)`.
    pub fn hc_pre_mix_dec(
        &self,
        mix: &[f32],
        fused: Option<(&[f32], &[u16])>,
        scale: &[f32],
        base: &[f32],
        hc: usize,
        hc_eps: f32,
        x: &[f32],
        e: usize,
        norm: &[f32],
        rms_eps: f32,
        q8_0: Option<ds4_gguf::GgmlType>,
        q8_k: Option<ds4_gguf::GgmlType>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<u8>, Vec<u8>), CudaError> {
        use crate::gemv::Gemv;
        let (dm, ds, db, dx, dn) = (
            self.up(mix)?,
            self.up(scale)?,
            self.up(base)?,
            self.up(x)?,
            self.up(norm)?,
        );
        let xin = self.zeros(e)?;
        let a = self.zeros(e)?;
        let mut q = crate::fwd::DecQuant::default();
        let mut bufs = Vec::new();
        for (ty, want_k) in [(q8_0, false), (q8_k, true)] {
            let Some(ty) = ty else {
                bufs.push(None);
                continue;
            };
            let bytes = Gemv::act_bytes(ty, e, 1);
            let buf = DBuf::zeroed(&self.stream, bytes)?;
            let (k, qs, d, bs) = Gemv::act_ptrs(ty, e, buf.ptr)
                .ok_or_else(|| crate::fwd::cerr(format!("{ty:?}: no activation quantization")))?;
            if k != want_k {
                return Err(crate::fwd::cerr(format!("{ty:?}: wrong activation format")));
            }
            if k {
                (q.qk, q.dk, q.bk) = (qs, d, bs);
            } else {
                (q.q0, q.d0) = (qs, d);
            }
            bufs.push(Some((buf, bytes)));
        }
        let nm = (2 + hc) * hc;
        let dmix = self.zeros(nm)?;
        match fused {
            Some((flat, fnw)) => {
                let (dfl, dfn) = (self.up(flat)?, self.up(fnw)?);
                self.fwd.hc_pre_mix_dec(
                    None, dfl.ptr, dfn.ptr, dmix.ptr, ds.ptr, db.ptr, hc, hc_eps, dx.ptr, e,
                    dn.ptr, rms_eps, xin.ptr, a.ptr, q,
                )?;
            }
            None => self.fwd.hc_pre_dec(
                dm.ptr, ds.ptr, db.ptr, hc, hc_eps, dx.ptr, e, dn.ptr, rms_eps, xin.ptr, a.ptr, q,
            )?,
        }
        let mix_out = if fused.is_some() {
            self.down(&dmix, nm)?
        } else {
            mix.to_vec()
        };
        let a = self.down(&a, e)?;
        let mut out = Vec::new();
        for b in &bufs {
            out.push(match b {
                Some((buf, bytes)) => self.down::<u8>(buf, *bytes)?,
                None => Vec::new(),
            });
        }
        let qk = out.pop().unwrap_or_default();
        let q0 = out.pop().unwrap_or_default();
        Ok((mix_out, a, q0, qk))
    }

    /// RMSNorm of one row (`ds4_rms_q8_dec`; `w` empty: no weight) and, with `quant`, its Q8_0
    /// activation quantization; returns `(out, act bytes)` (act empty without `quant`).
    pub fn rms_q8_dec(
        &self,
        x: &[f32],
        w: &[f32],
        eps: f32,
        quant: bool,
    ) -> Result<(Vec<f32>, Vec<u8>), CudaError> {
        use crate::gemv::Gemv;
        let dim = x.len();
        let dx = self.up(x)?;
        let dw = if w.is_empty() {
            None
        } else {
            Some(self.up(w)?)
        };
        let out = self.zeros(dim)?;
        let ty = ds4_gguf::GgmlType::Q8_0;
        let bytes = Gemv::act_bytes(ty, dim, 1);
        let act = DBuf::zeroed(&self.stream, bytes.max(16))?;
        let (q0, d0) = match (quant, Gemv::act_ptrs(ty, dim, act.ptr)) {
            (true, Some((false, qs, d, _))) => (qs, d),
            (true, _) => return Err(crate::fwd::cerr("rms_q8_dec: no Q8_0 layout")),
            _ => (0, 0),
        };
        self.fwd.rms_q8_dec(
            dx.ptr,
            dw.as_ref().map_or(0, |b| b.ptr),
            dim,
            eps,
            out.ptr,
            q0,
            d0,
        )?;
        let o = self.down(&out, dim)?;
        let a = if quant {
            self.down::<u8>(&act, bytes)?
        } else {
            Vec::new()
        };
        Ok((o, a))
    }

    /// HC post of one token (`ds4_hc_post_dec`); returns `(xo, flat)`.
    pub fn hc_post_dec(
        &self,
        f: &[f32],
        routed: Option<(&[f32], usize)>,
        x: &[f32],
        post: &[f32],
        comb: &[f32],
        hc: usize,
        e: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let (df, dx, dp, dc) = (self.up(f)?, self.up(x)?, self.up(post)?, self.up(comb)?);
        let (dr, k) = match routed {
            Some((r, k)) => (Some(self.up(r)?), k),
            None => (None, 0),
        };
        let xo = self.zeros(hc * e)?;
        let flat = self.zeros(hc * e)?;
        self.fwd.hc_post_dec(
            df.ptr,
            dr.as_ref().map_or(0, |b| b.ptr),
            k,
            dx.ptr,
            dp.ptr,
            dc.ptr,
            hc,
            e,
            xo.ptr,
            flat.ptr,
            eps,
        )?;
        Ok((self.down(&xo, hc * e)?, self.down(&flat, hc * e)?))
    }

    /// Directional steering of `n` rows of `e` (`ds4_dir_steer`): `f` (plus `routed`, both
    /// `[n][e]`) edited by each `(direction [e], scale)` of `slots` in order. `in_place`: the
    /// kernel reads and writes one buffer (only without `routed`), as the attention site does.
    pub fn dir_steer(
        &self,
        f: &[f32],
        routed: Option<&[f32]>,
        e: usize,
        n: usize,
        slots: &[(&[f32], f32)],
        in_place: bool,
    ) -> Result<Vec<f32>, CudaError> {
        let df = self.up(f)?;
        let dr = match routed {
            Some(r) => Some(self.up(r)?),
            None => None,
        };
        let dirs: Vec<DBuf> = slots
            .iter()
            .map(|(d, _)| self.up(d))
            .collect::<Result<_, _>>()?;
        let y = if in_place && routed.is_none() {
            None
        } else {
            Some(self.up(&vec![f32::NAN; n * e])?)
        };
        let yp = y.as_ref().map_or(df.ptr, |b| b.ptr);
        let sl: Vec<(u64, f32)> = dirs.iter().zip(slots).map(|(d, s)| (d.ptr, s.1)).collect();
        self.fwd
            .dir_steer(yp, df.ptr, dr.as_ref().map_or(0, |b| b.ptr), e, n, &sl)?;
        self.down(y.as_ref().unwrap_or(&df), n * e)
    }

    /// The wide HC post of one token (`ds4_hc_post_wide`, hc = 4) and then the next site's
    /// product launch finishing its no-weight norm (`Fwd::hc_pre_mix_dec` with `post_eps`;
    /// hc_eps 1e-6, no quantization); `fnw`: F16 bits `[24][4·e]`. Returns `(xo, flat, mix, a)`.
    pub fn hc_post_wide_mix(
        &self,
        f: &[f32],
        routed: Option<(&[f32], usize)>,
        x: &[f32],
        post: &[f32],
        comb: &[f32],
        e: usize,
        eps: f32,
        fnw: &[u16],
        scale: &[f32],
        base: &[f32],
        norm: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>), CudaError> {
        let hc = 4;
        let (df, dx, dp, dc) = (self.up(f)?, self.up(x)?, self.up(post)?, self.up(comb)?);
        let (dr, k) = match routed {
            Some((r, k)) => (Some(self.up(r)?), k),
            None => (None, 0),
        };
        let xo = self.zeros(hc * e)?;
        let flat = self.zeros(hc * e)?;
        self.fwd.hc_post_wide(
            df.ptr,
            dr.as_ref().map_or(0, |b| b.ptr),
            k,
            dx.ptr,
            dp.ptr,
            dc.ptr,
            hc,
            e,
            xo.ptr,
        )?;
        let (dfn, ds, db, dn) = (
            self.up(fnw)?,
            self.up(scale)?,
            self.up(base)?,
            self.up(norm)?,
        );
        let nm = (2 + hc) * hc;
        let dmix = self.zeros(nm)?;
        let xin = self.zeros(e)?;
        let a = self.zeros(e)?;
        self.fwd.hc_pre_mix_dec(
            Some(eps),
            flat.ptr,
            dfn.ptr,
            dmix.ptr,
            ds.ptr,
            db.ptr,
            hc,
            1e-6,
            xo.ptr,
            e,
            dn.ptr,
            eps,
            xin.ptr,
            a.ptr,
            crate::fwd::DecQuant::default(),
        )?;
        Ok((
            self.down(&xo, hc * e)?,
            self.down(&flat, hc * e)?,
            self.down(&dmix, nm)?,
            self.down(&a, e)?,
        ))
    }

    /// HC head + output norm of one token (`ds4_hc_head_dec`).
    pub fn hc_head_dec(
        &self,
        mix: &[f32],
        scale: f32,
        base: &[f32],
        hc_eps: f32,
        x: &[f32],
        hc: usize,
        e: usize,
        norm: &[f32],
        rms_eps: f32,
    ) -> Result<Vec<f32>, CudaError> {
        let (dm, db, dx, dn) = (self.up(mix)?, self.up(base)?, self.up(x)?, self.up(norm)?);
        let hn = self.zeros(e)?;
        self.fwd.hc_head_dec(
            dm.ptr, scale, db.ptr, hc_eps, dx.ptr, hc, e, dn.ptr, rms_eps, hn.ptr,
        )?;
        self.down(&hn, e)
    }

    /// Everything between the projections and the attention of one decode token
    /// (`ds4_qkv_dec`).
    pub fn qkv_dec(&self, a: &QkvDecIn<'_>) -> Result<QkvDecOut, CudaError> {
        let dq = self.up(a.q)?;
        let (di, dic) = (self.up(a.inv)?, self.up(a.inv_comp)?);
        let (dk, dw, dring) = (self.up(a.kvp)?, self.up(a.kv_w)?, self.up(a.ring)?);
        let mut keep: Vec<DBuf> = Vec::new();
        let mut comp = [CompDec::default(); 2];
        let mut comp_bufs: [Option<(DBuf, DBuf, DBuf, usize, usize)>; 2] = [None, None];
        for (i, c) in a.comp.iter().enumerate() {
            let Some(c) = c else { continue };
            let (ckv, csc, ape, norm) = (
                self.up(c.ckv)?,
                self.up(c.csc)?,
                self.up(c.ape)?,
                self.up(c.norm)?,
            );
            let (sk, ss, rows) = (self.up(c.st_kv)?, self.up(c.st_sc)?, self.up(c.rows)?);
            comp[i] = CompDec {
                ckv: ckv.ptr,
                csc: csc.ptr,
                ape: ape.ptr,
                st_kv: sk.ptr,
                st_sc: ss.ptr,
                norm: norm.ptr,
                rows: rows.ptr,
                ratio: c.g.ratio as i64,
                overlap: c.g.overlap as i64,
                d_c: c.g.d_c as i64,
                qat_mode: c.qat_mode as i64,
            };
            keep.extend([ckv, csc, ape, norm]);
            comp_bufs[i] = Some((rows, sk, ss, c.rows.len(), c.st_kv.len()));
        }
        let iqb = match a.iq {
            Some((q, w)) => Some((self.up(q)?, self.up(w)?)),
            None => None,
        };
        self.set_pos(a.pos)?;
        let p = QkvDec {
            pos: self.pos.ptr,
            q: dq.ptr,
            inv: di.ptr,
            nh: a.nh as i64,
            hd: a.hd as i64,
            n_rot: a.n_rot as i64,
            eps: a.eps as f64,
            kvp: dk.ptr,
            kv_w: dw.ptr,
            ring: dring.ptr,
            raw_cap: a.raw_cap as i64,
            qat: a.qat as i64,
            n_nope: a.n_nope as i64,
            comp,
            inv_comp: dic.ptr,
            iq: iqb.as_ref().map_or(0, |b| b.0.ptr),
            iw: iqb.as_ref().map_or(0, |b| b.1.ptr),
            nih: a.nih as i64,
            ihd: a.ihd as i64,
            iqat: a.iqat as i64,
            wscale: a.wscale,
        };
        self.fwd.qkv_dec(&p)?;
        let mut comp_out: [Option<(Vec<f32>, Vec<f32>, Vec<f32>)>; 2] = [None, None];
        for (o, b) in comp_out.iter_mut().zip(&comp_bufs) {
            if let Some((rows, sk, ss, nr, ns)) = b {
                *o = Some((
                    self.down(rows, *nr)?,
                    self.down(sk, *ns)?,
                    self.down(ss, *ns)?,
                ));
            }
        }
        let iq = match (&iqb, a.iq) {
            (Some((bq, bw)), Some((q, w))) => {
                Some((self.down(bq, q.len())?, self.down(bw, w.len())?))
            }
            _ => None,
        };
        drop(keep);
        Ok(QkvDecOut {
            q: self.down(&dq, a.q.len())?,
            ring: self.down(&dring, a.ring.len())?,
            comp: comp_out,
            iq,
        })
    }

    /// Attention of one token at `pos` through the decode kernels; with `with_q8` also the
    /// heads' Q8_0 activation for out_a (one row of `nh·hd`, the gemv layout).
    pub fn attention_dec(
        &self,
        with_q8: bool,
        q: &[f32],
        ring: &[f32],
        raw_cap: usize,
        window: usize,
        comp: &[f32],
        ratio: usize,
        has_indexer: bool,
        isel: &[i32],
        topk: usize,
        sinks: &[f32],
        scale: f32,
        nh: usize,
        hd: usize,
        n_rot: usize,
        inv_freq: &[f64],
        pos: usize,
    ) -> Result<(Vec<f32>, Option<Vec<u8>>), CudaError> {
        let (dq, dr, dc) = (self.up(q)?, self.up(ring)?, self.up(comp)?);
        let (ds, dsk, di) = (self.up(isel)?, self.up(sinks)?, self.up(inv_freq)?);
        let nv = (pos + 1).checked_div(ratio).unwrap_or(0);
        let n_c = if has_indexer { nv.min(topk) } else { nv };
        let stride = (window + n_c + 1).next_multiple_of(4);
        let (sb, pb) = attn_dec_bytes(nh, hd, stride);
        let sbuf = DBuf::zeroed(&self.stream, sb)?;
        let pbuf = DBuf::zeroed(&self.stream, pb)?;
        let heads = self.zeros(nh * hd)?;
        self.set_pos(pos)?;
        let a = AttnLaunch {
            q: dq.ptr,
            ring: dr.ptr,
            raw_cap,
            window,
            comp: dc.ptr,
            ratio,
            has_indexer,
            isel: ds.ptr,
            topk,
            sinks: dsk.ptr,
            scale,
            nh,
            hd,
            n_rot,
            inv_freq: di.ptr,
            pos: self.pos.ptr,
            part: 0,
            heads: heads.ptr,
        };
        let act_bytes = crate::gemv::Gemv::act_bytes(ds4_gguf::GgmlType::Q8_0, nh * hd, 1);
        let act = DBuf::from_slice(&self.stream, &vec![0xa5u8; act_bytes])?;
        let q8 = with_q8
            .then(|| crate::gemv::Gemv::act_ptrs(ds4_gguf::GgmlType::Q8_0, nh * hd, act.ptr))
            .flatten()
            .map(|(_, qs, d, _)| (qs, d));
        self.fwd.attention_dec(&a, sbuf.ptr, stride, pbuf.ptr, q8)?;
        let act = if with_q8 {
            Some(self.down(&act, act_bytes)?)
        } else {
            None
        };
        Ok((self.down(&heads, nh * hd)?, act))
    }
}

/// Shape of one [`GpuOps::bench_small_ops`] run (DeepSeek V4 Flash: hc 4, e 4096, 64 heads ×
/// 512, rope 64, q_a rank 1024).
#[derive(Clone, Copy, Debug)]
pub struct SmallOpsShape {
    pub n: usize,
    pub hc: usize,
    pub e: usize,
    pub nh: usize,
    pub hd: usize,
    pub n_rot: usize,
    pub ql: usize,
}

impl GpuOps {
    /// Run `once` as a warm-up, then `reps` times between CUDA events: the median
    /// milliseconds (None when `reps` is 0).
    fn median_ms(
        &self,
        reps: usize,
        mut once: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<Option<f64>, CudaError> {
        once()?;
        self.stream.synchronize().map_err(crate::rt::drv)?;
        let ev = || {
            self._ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(crate::rt::drv)
        };
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let (e0, e1) = (ev()?, ev()?);
            e0.record(&self.stream).map_err(crate::rt::drv)?;
            once()?;
            e1.record(&self.stream).map_err(crate::rt::drv)?;
            e1.synchronize().map_err(crate::rt::drv)?;
            times.push(e0.elapsed_ms(&e1).map_err(crate::rt::drv)? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times.get(times.len() / 2).copied())
    }

    /// Time the chunk (prefill) versions of the small memory-bound kernels at `s` on random
    /// inputs, each through the launch wrapper the backend uses: returns (name, median µs of
    /// `reps` runs after one warm-up).
    pub fn bench_small_ops(
        &self,
        s: SmallOpsShape,
        reps: usize,
    ) -> Result<Vec<(String, f64)>, CudaError> {
        use crate::gemv::Gemv;
        use ds4_gguf::GgmlType;
        let (n, hc, e, nh, hd) = (s.n, s.hc, s.e, s.nh, s.hd);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |len: usize, sc: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * sc
                })
                .collect()
        };
        let nm = (2 + hc) * hc;
        let mix = self.up(&rnd(n * nm, 1.0))?;
        let scale = self.up(&[0.7f32, 0.9, 1.1])?;
        let base = self.up(&rnd(nm, 0.5))?;
        let x = self.up(&rnd(n * hc * e, 1.0))?;
        let norm = self.up(&rnd(e.max(16384), 1.0))?;
        let f = self.up(&rnd(n * e, 1.0))?;
        let routed = self.up(&rnd(n * e, 1.0))?;
        let post = self.up(&rnd(n * hc, 1.0))?;
        let comb = self.up(&rnd(n * hc * hc, 0.5))?;
        let (xo, flat) = (self.zeros(n * hc * e)?, self.zeros(n * hc * e)?);
        let (opost, ocomb) = (self.zeros(n * hc)?, self.zeros(n * hc * hc)?);
        let (xin, a) = (self.zeros(n * e)?, self.zeros(n * e)?);
        let q = self.up(&rnd(n * nh * hd, 1.0))?;
        let inv: Vec<f64> = (0..s.n_rot / 2)
            .map(|k| 10000f64.powf(-2.0 * k as f64 / s.n_rot as f64))
            .collect();
        let dinv = self.up(&inv)?;
        self.set_pos(1000)?;
        let qr = self.up(&rnd(n * s.ql, 1.0))?;
        let qrn = self.zeros(n * s.ql)?;
        let gemv = Gemv::new(&self._ctx)?;
        let xs = self
            .stream
            .clone_htod(&rnd(n * hc * e, 1.0))
            .map_err(crate::rt::drv)?;
        let mut act = self
            .stream
            .alloc_zeros::<u8>(Gemv::act_bytes(GgmlType::Q8_0, hc * e, n))
            .map_err(crate::rt::drv)?;
        let tcm = crate::device::load_module(&self._ctx, "tc")?;
        let prep = tcm
            .load_function("ds4_tc_f16_prep")
            .map_err(crate::rt::drv)?;
        let (hi, lo, asc) = (
            self.zeros(n * hc * e / 2)?,
            self.zeros(n * hc * e / 2)?,
            self.zeros(n)?,
        );

        let mut out = Vec::new();
        let mut time = |name: String, f: &mut dyn FnMut() -> Result<(), CudaError>| {
            let ms = self.median_ms(reps, f)?;
            out.push((name, ms.map_or(f64::NAN, |m| m * 1e3)));
            Ok::<(), CudaError>(())
        };
        let fw = &self.fwd;
        time(format!("hc_pre n={n} hc={hc} e={e}"), &mut || {
            fw.hc_pre(
                mix.ptr, scale.ptr, base.ptr, hc, 20, 1e-6, x.ptr, e, norm.ptr, 1e-6, opost.ptr,
                ocomb.ptr, xin.ptr, a.ptr, n, None,
            )
        })?;
        time(format!("hc_post+flat n={n} (attn, no routed)"), &mut || {
            fw.hc_post(
                f.ptr, 0, 0, x.ptr, post.ptr, comb.ptr, hc, e, xo.ptr, flat.ptr, 1e-6, n, 0,
            )
        })?;
        time(format!("hc_post+flat n={n} (ffn, routed k=1)"), &mut || {
            fw.hc_post(
                f.ptr, routed.ptr, 1, x.ptr, post.ptr, comb.ptr, hc, e, xo.ptr, flat.ptr, 1e-6, n,
                0,
            )
        })?;
        time(format!("head_norm_rope n={n} {nh}x{hd}"), &mut || {
            fw.head_norm_rope(q.ptr, nh, hd, s.n_rot, 1e-6, dinv.ptr, self.pos.ptr, n)
        })?;
        time(format!("rms_norm_rows n={n} dim={}", s.ql), &mut || {
            fw.rms_rows(qr.ptr, s.ql, norm.ptr, s.ql, 1e-6, qrn.ptr, s.ql, n)
        })?;
        time(
            format!("rms_norm_rows n={n} dim={} noweight", hc * e),
            &mut || fw.rms_rows(x.ptr, hc * e, 0, hc * e, 1e-6, xo.ptr, hc * e, n),
        )?;
        for cols in [e, hc * e] {
            time(format!("quant_q8_0 n={n} cols={cols}"), &mut || {
                gemv.quantize_act(&self.stream, GgmlType::Q8_0, &xs, n, cols, &mut act)
            })?;
        }
        for cols in [e, hc * e] {
            time(format!("tc_f16_prep n={n} cols={cols}"), &mut || {
                crate::rt::launch(
                    &self.stream,
                    &prep,
                    (n as u32, 1, 1),
                    256,
                    0,
                    &[
                        crate::rt::A::P(x.ptr),
                        crate::rt::A::I(cols as i32),
                        crate::rt::A::P(hi.ptr),
                        crate::rt::A::P(lo.ptr),
                        crate::rt::A::P(asc.ptr),
                    ],
                )
            })?;
        }
        Ok(out)
    }
}
