//! The operations of the DeepSeek V4 forward pass as plain slice functions: the CPU backend is
//! built from them, and the CUDA backend's kernel tests call them as the reference on random
//! inputs.
//!
//! Numerics: inputs and outputs are f32; reductions (norms, softmaxes, attention, HC mixing,
//! the indexer's dot products) are accumulated in f64 and rounded once at the end — this is the
//! reference, so it is as exact as is cheap. The QAT round trips are exact (bit-for-bit equal to
//! ds4's C functions; see `tests/qat_vectors.rs`).

/// Score of an empty compressor frontier slot (ds4's CPU `DS4_NEG_INF`).
pub const EMPTY_SCORE: f32 = -1e30;

// ------------------------------------------------------------------------------------------
// Norms

/// `out = x / sqrt(mean(x²) + eps) · w` (sum of squares in f64).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let s = rms_scale(x, eps);
    for ((o, &v), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = ((v as f64 * s) * wi as f64) as f32;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let s = rms_scale(x, eps);
    for (v, &wi) in x.iter_mut().zip(w) {
        *v = ((*v as f64 * s) * wi as f64) as f32;
    }
}

/// `out = x / sqrt(mean(x²) + eps)`.
pub fn rms_norm_noweight(x: &[f32], eps: f32, out: &mut [f32]) {
    let s = rms_scale(x, eps);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 * s) as f32;
    }
}

/// [`rms_norm_noweight`] in place.
pub fn rms_norm_noweight_inplace(x: &mut [f32], eps: f32) {
    let s = rms_scale(x, eps);
    for v in x.iter_mut() {
        *v = (*v as f64 * s) as f32;
    }
}

/// The no-weight RMSNorm applied independently to every `head_dim`-wide head of `x`.
pub fn head_rms_norm_inplace(x: &mut [f32], head_dim: usize, eps: f32) {
    for h in x.chunks_exact_mut(head_dim) {
        rms_norm_noweight_inplace(h, eps);
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f64 {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    1.0 / (ss / x.len().max(1) as f64 + eps as f64).sqrt()
}

// ------------------------------------------------------------------------------------------
// RoPE

/// Rotate the last `2·cos.len()` dims of `x` (one head) by the angles whose cos/sin are given,
/// interleaved pairs `(2k, 2k+1)` of the tail; `inverse` rotates by the negated angles.
pub fn rope_tail(x: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let n_rot = 2 * cos.len();
    let start = x.len() - n_rot;
    let tail = &mut x[start..];
    for (k, pair) in tail.chunks_exact_mut(2).enumerate() {
        let c = cos[k] as f64;
        let s = if inverse { -sin[k] } else { sin[k] } as f64;
        let (x0, x1) = (pair[0] as f64, pair[1] as f64);
        pair[0] = (x0 * c - x1 * s) as f32;
        pair[1] = (x0 * s + x1 * c) as f32;
    }
}

/// [`rope_tail`] on every `head_dim`-wide head of `x`.
pub fn rope_heads(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    for h in x.chunks_exact_mut(head_dim) {
        rope_tail(h, cos, sin, inverse);
    }
}

// ------------------------------------------------------------------------------------------
// Manifold-constrained hyper-connections

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Split an HC mix vector (`(2+hc)·hc` values) into `pre` (`hc`), `post` (`hc`) and the
/// Sinkhorn-normalised `comb` (`hc·hc`, row-major `comb[r*hc + c]`), model-spec §3.2:
/// `pre = sigmoid(mix·s0 + b) + eps`, `post = 2·sigmoid(mix·s1 + b)`,
/// `comb = Sinkhorn(softmax_rows(mix·s2 + b) + eps)` (one column normalisation, then
/// `iters-1` row+column normalisations, each dividing by `sum + eps`).
#[allow(clippy::too_many_arguments)]
pub fn hc_split(
    mix: &[f32],
    scale: &[f32],
    base: &[f32],
    hc: usize,
    iters: usize,
    eps: f32,
    pre: &mut [f32],
    post: &mut [f32],
    comb: &mut [f32],
) {
    let eps = eps as f64;
    for i in 0..hc {
        pre[i] = (sigmoid(mix[i] as f64 * scale[0] as f64 + base[i] as f64) + eps) as f32;
        post[i] =
            (2.0 * sigmoid(mix[hc + i] as f64 * scale[1] as f64 + base[hc + i] as f64)) as f32;
    }
    let mut m = [0f64; 16 * 16];
    let m = &mut m[..hc * hc];
    for r in 0..hc {
        let row = &mut m[r * hc..(r + 1) * hc];
        for (c, v) in row.iter_mut().enumerate() {
            let j = 2 * hc + r * hc + c;
            *v = mix[j] as f64 * scale[2] as f64 + base[j] as f64;
        }
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v = *v / sum + eps;
        }
    }
    sinkhorn(m, hc, iters, eps);
    for (o, &v) in comb.iter_mut().zip(m.iter()) {
        *o = v as f32;
    }
}

/// Sinkhorn normalisation of a row-major `hc×hc` matrix: column normalisation, then
/// `iters-1` times (row, column); every division is by `sum + eps`.
pub fn sinkhorn(m: &mut [f64], hc: usize, iters: usize, eps: f64) {
    let col_norm = |m: &mut [f64]| {
        for c in 0..hc {
            let s: f64 = (0..hc).map(|r| m[r * hc + c]).sum::<f64>() + eps;
            for r in 0..hc {
                m[r * hc + c] /= s;
            }
        }
    };
    col_norm(m);
    for _ in 1..iters.max(1) {
        for r in 0..hc {
            let row = &mut m[r * hc..(r + 1) * hc];
            let s: f64 = row.iter().sum::<f64>() + eps;
            for v in row.iter_mut() {
                *v /= s;
            }
        }
        col_norm(m);
    }
}

/// `out[d] = Σ_h w[h]·x[h][d]` (`x` is `hc` streams of `out.len()` values).
pub fn hc_collapse(x: &[f32], w: &[f32], out: &mut [f32]) {
    let n = out.len();
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = 0f64;
        for (h, &wh) in w.iter().enumerate() {
            acc += wh as f64 * x[h * n + d] as f64;
        }
        *o = acc as f32;
    }
}

/// HC post: `out[j][d] = post[j]·f[d] + Σ_i comb[i][j]·x[i][d]` (comb used transposed).
pub fn hc_post(f: &[f32], x: &[f32], post: &[f32], comb: &[f32], out: &mut [f32]) {
    let n = f.len();
    let hc = post.len();
    for j in 0..hc {
        let o = &mut out[j * n..(j + 1) * n];
        for (d, od) in o.iter_mut().enumerate() {
            let mut acc = post[j] as f64 * f[d] as f64;
            for i in 0..hc {
                acc += comb[i * hc + j] as f64 * x[i * n + d] as f64;
            }
            *od = acc as f32;
        }
    }
}

/// HC head weights: `w[i] = sigmoid(mix[i]·scale + base[i]) + eps`.
pub fn hc_head_weights(mix: &[f32], scale: f32, base: &[f32], eps: f32, w: &mut [f32]) {
    for ((o, &m), &b) in w.iter_mut().zip(mix).zip(base) {
        *o = (sigmoid(m as f64 * scale as f64 + b as f64) + eps as f64) as f32;
    }
}

// ------------------------------------------------------------------------------------------
// QAT simulation

/// FP8 E4M3FN maximum.
pub const E4M3_MAX: f32 = 448.0;
/// FP8 KV block size.
pub const FP8_BLOCK: usize = 64;
/// FP4 E2M1 maximum.
pub const E2M1_MAX: f32 = 6.0;
/// FP4 block size.
pub const FP4_BLOCK: usize = 32;

/// Nearest E4M3FN value to `v` (|v| ≤ 448 expected; larger magnitudes give ±448), ties to the
/// even code, sign preserved.
pub fn e4m3_round(v: f32) -> f32 {
    let a = v.abs();
    let r = if a.is_nan() {
        return v;
    } else if a >= E4M3_MAX {
        E4M3_MAX
    } else if a < 0.015625 {
        // Subnormal range (and the first normal binade edge): step 2^-9.
        (a * 512.0).round_ties_even() / 512.0
    } else {
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        let step = pow2(e - 3);
        (a / step).round_ties_even() * step
    };
    r.copysign(v)
}

/// Nearest E2M1 value (`{0, 0.5, 1, 1.5, 2, 3, 4, 6}`) to `v`, ties to the even index, sign
/// preserved; magnitudes above 6 give ±6.
pub fn e2m1_round(v: f32) -> f32 {
    let a = v.abs();
    if a.is_nan() {
        return v;
    }
    let r: f32 = if a <= 0.25 {
        0.0
    } else if a < 0.75 {
        0.5
    } else if a <= 1.25 {
        1.0
    } else if a < 1.75 {
        1.5
    } else if a <= 2.5 {
        2.0
    } else if a < 3.5 {
        3.0
    } else if a <= 5.0 {
        4.0
    } else {
        6.0
    };
    r.copysign(v)
}

fn pow2(k: i32) -> f32 {
    (2f64).powi(k) as f32
}

/// The smallest power of two `s` with `amax / s ≤ max_q` (exact comparison).
pub fn pow2_scale(amax: f32, max_q: f32) -> f32 {
    let (a, m) = (amax as f64, max_q as f64);
    let mut k = (a / m).log2().ceil() as i32;
    while a > m * 2f64.powi(k) {
        k += 1;
    }
    while a <= m * 2f64.powi(k - 1) {
        k -= 1;
    }
    pow2(k)
}

/// FP8 round trip of one block: `amax = max(max|x|, 1e-4)`, power-of-two scale,
/// `x = e4m3(clamp(x/scale, ±448))·scale`.
pub fn fp8_roundtrip_block(x: &mut [f32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
    let scale = pow2_scale(amax, E4M3_MAX);
    for v in x.iter_mut() {
        *v = e4m3_round((*v / scale).clamp(-E4M3_MAX, E4M3_MAX)) * scale;
    }
}

/// FP8 KV simulation of an attention row: the first `n_nope` dims in blocks of 64; when
/// `n_nope` is not a multiple of 64 the trailing partial block is its own block (the Flash
/// shape, 448 = 7·64, never has one). The RoPE tail is untouched.
pub fn fp8_kv_qat(x: &mut [f32], n_nope: usize) {
    for b in x[..n_nope].chunks_mut(FP8_BLOCK) {
        fp8_roundtrip_block(b);
    }
}

/// FP4 round trip of one block: `amax = max(max|x|, 6·2^-126)`, power-of-two scale,
/// `x = e2m1(clamp(x/scale, ±6))·scale`.
pub fn fp4_roundtrip_block(x: &mut [f32]) {
    let amax = x
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(6.0 * f32::MIN_POSITIVE);
    let scale = pow2_scale(amax, E2M1_MAX);
    for v in x.iter_mut() {
        *v = e2m1_round((*v / scale).clamp(-E2M1_MAX, E2M1_MAX)) * scale;
    }
}

/// FP4 round trip in blocks of 32.
pub fn fp4_qat(x: &mut [f32]) {
    for b in x.chunks_mut(FP4_BLOCK) {
        fp4_roundtrip_block(b);
    }
}

/// In-place Walsh-Hadamard transform (Sylvester order: butterflies `(a,b) → (a+b, a−b)` at
/// strides 1, 2, 4, …), in f32, then scaled by `1/sqrt(n)` (rounded to f32). `x.len()` must be
/// a power of two.
pub fn hadamard_inplace(x: &mut [f32]) {
    let n = x.len();
    let mut stride = 1;
    while stride < n {
        for blk in x.chunks_exact_mut(2 * stride) {
            let (lo, hi) = blk.split_at_mut(stride);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        stride *= 2;
    }
    let s = (1.0 / (n as f64).sqrt()) as f32;
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// Indexer QAT of one head (query head or compressed key row): Hadamard, then FP4 per 32.
pub fn indexer_qat(x: &mut [f32]) {
    hadamard_inplace(x);
    fp4_qat(x);
}

// ------------------------------------------------------------------------------------------
// KV compressor

/// Geometry of a compressor: window `ratio`, overlapping (CSA) or not (HCA), output width `d_c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressorGeom {
    pub ratio: usize,
    pub overlap: bool,
    pub d_c: usize,
}

impl CompressorGeom {
    /// Frontier rows: `2·ratio` (overlap: previous + current window) or `ratio`.
    pub fn rows(&self) -> usize {
        if self.overlap {
            2 * self.ratio
        } else {
            self.ratio
        }
    }
    /// Frontier / projection width: `2·d_c` (overlap) or `d_c`.
    pub fn width(&self) -> usize {
        if self.overlap { 2 * self.d_c } else { self.d_c }
    }
    /// Frontier size in floats (each of kv and score).
    pub fn state_len(&self) -> usize {
        self.rows() * self.width()
    }
}

/// Reset a frontier to empty (kv 0, score [`EMPTY_SCORE`]).
pub fn compressor_clear(state_kv: &mut [f32], state_score: &mut [f32]) {
    state_kv.fill(0.0);
    state_score.fill(EMPTY_SCORE);
}

/// Store one token's projections in the frontier (`score` must already include `ape[pos %
/// ratio]`). Returns true when the token completes a window (a row must be emitted with
/// [`compressor_pool`] and then [`compressor_advance`] called).
pub fn compressor_push(
    g: CompressorGeom,
    state_kv: &mut [f32],
    state_score: &mut [f32],
    pos: usize,
    kv: &[f32],
    score: &[f32],
) -> bool {
    let m = pos % g.ratio;
    let row = if g.overlap { g.ratio + m } else { m };
    let w = g.width();
    state_kv[row * w..(row + 1) * w].copy_from_slice(kv);
    state_score[row * w..(row + 1) * w].copy_from_slice(score);
    (pos + 1).is_multiple_of(g.ratio)
}

/// Pool the frontier into one `d_c` row: per column, a softmax over the candidate slots of
/// `score` weighting `kv` (overlap: the first half of the previous window's rows and the second
/// half of the current window's rows; otherwise all `ratio` rows). Empty slots get weight 0.
pub fn compressor_pool(g: CompressorGeom, state_kv: &[f32], state_score: &[f32], out: &mut [f32]) {
    let w = g.width();
    let d = g.d_c;
    // Candidate (row, column offset) pairs.
    let n_cand = if g.overlap { 2 * g.ratio } else { g.ratio };
    let cand = |i: usize| -> (usize, usize) {
        if g.overlap {
            if i < g.ratio { (i, 0) } else { (i, d) }
        } else {
            (i, 0)
        }
    };
    for (j, o) in out.iter_mut().enumerate().take(d) {
        let mut mx = f64::NEG_INFINITY;
        for i in 0..n_cand {
            let (r, off) = cand(i);
            mx = mx.max(state_score[r * w + off + j] as f64);
        }
        if mx <= EMPTY_SCORE as f64 * 0.5 {
            *o = 0.0;
            continue;
        }
        let (mut den, mut num) = (0f64, 0f64);
        for i in 0..n_cand {
            let (r, off) = cand(i);
            let e = (state_score[r * w + off + j] as f64 - mx).exp();
            den += e;
            num += e * state_kv[r * w + off + j] as f64;
        }
        *o = (num / den) as f32;
    }
}

/// After an emission: an overlapping frontier moves the current window to the "previous" rows
/// and empties the current ones; a plain frontier empties everything. (ds4 leaves stale rows in
/// place and clears them only after a prefill, §4.3; emptying them at once gives the same
/// picture after every step, so snapshots are deterministic.)
pub fn compressor_advance(g: CompressorGeom, state_kv: &mut [f32], state_score: &mut [f32]) {
    if g.overlap {
        let half = g.ratio * g.width();
        state_kv.copy_within(half..2 * half, 0);
        state_score.copy_within(half..2 * half, 0);
        compressor_clear(&mut state_kv[half..], &mut state_score[half..]);
    } else {
        compressor_clear(state_kv, state_score);
    }
}

/// The QAT round trip applied to an emitted compressed row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowQat {
    /// None (QAT off).
    Off,
    /// Attention rows: FP8 on the first `n_nope` dims ([`fp8_kv_qat`]).
    Fp8 { n_nope: usize },
    /// Indexer rows: Hadamard + FP4 ([`indexer_qat`]).
    Indexer,
}

/// Emit one compressed row from a complete frontier (model-spec §3.5): pool, RMSNorm with
/// `norm`, RoPE by the angles `cos`/`sin` (those of the window's first position,
/// `pos + 1 − ratio`, in the layer's compressed rope family), then the QAT round trip.
/// `out` is `d_c` long. The caller then calls [`compressor_advance`].
#[allow(clippy::too_many_arguments)]
pub fn compressor_emit(
    g: CompressorGeom,
    state_kv: &[f32],
    state_score: &[f32],
    norm: &[f32],
    eps: f32,
    cos: &[f32],
    sin: &[f32],
    qat: RowQat,
    out: &mut [f32],
) {
    compressor_pool(g, state_kv, state_score, out);
    rms_norm_inplace(out, norm, eps);
    rope_tail(out, cos, sin, false);
    match qat {
        RowQat::Off => {}
        RowQat::Fp8 { n_nope } => fp8_kv_qat(out, n_nope),
        RowQat::Indexer => indexer_qat(out),
    }
}

// ------------------------------------------------------------------------------------------
// Lightning indexer

/// Indexer scores of one query against `keys` (`n` rows of `head_dim`):
/// `score[c] = Σ_h w[h]·max(0, q[h]·k[c])` (`w` already scaled by `1/sqrt(head_dim·heads)`).
pub fn indexer_scores(q: &[f32], w: &[f32], keys: &[f32], head_dim: usize, out: &mut [f32]) {
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(head_dim)) {
        let mut acc = 0f64;
        for (qh, &wh) in q.chunks_exact(head_dim).zip(w) {
            let d = dot_f64(qh, k);
            if d > 0.0 {
                acc += wh as f64 * d;
            }
        }
        *o = acc as f32;
    }
}

/// Indices of the `k` largest scores, ties → lower index first (NaN ranks lowest), written
/// to `out[..k]` sorted ascending; `scratch` is reused. Returns the number written
/// (`min(k, scores.len())`).
pub fn topk_indices(scores: &[f32], k: usize, scratch: &mut Vec<u32>, out: &mut [u32]) -> usize {
    let n = scores.len();
    let k = k.min(n);
    scratch.clear();
    scratch.extend(0..n as u32);
    let key = |i: u32| {
        let s = scores[i as usize];
        if s.is_nan() { f32::NEG_INFINITY } else { s }
    };
    let cmp = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    if k > 0 && k < n {
        scratch.select_nth_unstable_by(k - 1, cmp);
    }
    let sel = &mut scratch[..k];
    sel.sort_unstable();
    out[..k].copy_from_slice(sel);
    k
}

/// Top-k by descending score, ties → lower index first (ds4's stable insertion `topk_desc`),
/// written to `out[..k]` in rank order.
pub fn topk_desc(scores: &[f32], out: &mut [u32]) {
    let k = out.len();
    let mut n = 0usize;
    let mut vals = [f32::NEG_INFINITY; 64];
    let big = k > vals.len();
    if big {
        // Rare (k > 64): plain sort.
        let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
        idx.sort_by(|a, b| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        });
        out.copy_from_slice(&idx[..k]);
        return;
    }
    for (i, &v) in scores.iter().enumerate() {
        if n == k && v <= vals[n - 1] {
            continue;
        }
        let mut j = if n < k {
            n += 1;
            n - 1
        } else {
            n - 1
        };
        while j > 0 && vals[j - 1] < v {
            vals[j] = vals[j - 1];
            out[j] = out[j - 1];
            j -= 1;
        }
        vals[j] = v;
        out[j] = i as u32;
    }
}

// ------------------------------------------------------------------------------------------
// Attention

/// Dot product accumulated in f64.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        acc[0] += x[0] as f64 * y[0] as f64;
        acc[1] += x[1] as f64 * y[1] as f64;
        acc[2] += x[2] as f64 * y[2] as f64;
        acc[3] += x[3] as f64 * y[3] as f64;
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += *x as f64 * *y as f64;
    }
    s
}

/// One attention head with a learned sink over `raw` rows (`n_raw` contiguous rows of
/// `head_dim`) followed by compressed rows `comp` (`sel = Some(idx)`: only those rows, in that
/// order; `None`: the first `n_comp` rows). `s_r = q·kv_r·scale`;
/// `out = Σ_r softmax_r(s ∪ {sink})·kv_r` (the sink has no value). `buf` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_head(
    q: &[f32],
    raw: &[f32],
    comp: &[f32],
    n_comp: usize,
    sel: Option<&[u32]>,
    sink: f32,
    scale: f32,
    buf: &mut Vec<f64>,
    acc: &mut Vec<f64>,
    out: &mut [f32],
) {
    let hd = q.len();
    let n_raw = raw.len() / hd;
    let n_c = sel.map_or(n_comp, |s| s.len());
    let comp_row = |i: usize| -> &[f32] {
        let r = sel.map_or(i, |s| s[i] as usize);
        &comp[r * hd..(r + 1) * hd]
    };
    buf.clear();
    let scale = scale as f64;
    let mut mx = sink as f64;
    for r in raw.chunks_exact(hd) {
        let s = dot_f64(q, r) * scale;
        mx = mx.max(s);
        buf.push(s);
    }
    for i in 0..n_c {
        let s = dot_f64(q, comp_row(i)) * scale;
        mx = mx.max(s);
        buf.push(s);
    }
    let mut den = (sink as f64 - mx).exp();
    acc.clear();
    acc.resize(hd, 0.0);
    for (i, s) in buf.iter().enumerate() {
        let p = (s - mx).exp();
        den += p;
        let row = if i < n_raw {
            &raw[i * hd..(i + 1) * hd]
        } else {
            comp_row(i - n_raw)
        };
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += p * v as f64;
        }
    }
    let inv = 1.0 / den;
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = (a * inv) as f32;
    }
}

// ------------------------------------------------------------------------------------------
// MoE

/// `softplus(x)` (stable).
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// Router probabilities `p = sqrt(softplus(logit))`.
pub fn router_probs(logits: &[f32], p: &mut [f32]) {
    for (o, &l) in p.iter_mut().zip(logits) {
        *o = softplus(l as f64).sqrt() as f32;
    }
}

/// Routed selection: top-k of `p + bias` (ties → lower expert first), in rank order.
pub fn route_topk(p: &[f32], bias: Option<&[f32]>, biased: &mut [f32], sel: &mut [u32]) {
    for (i, o) in biased.iter_mut().enumerate() {
        *o = p[i] + bias.map_or(0.0, |b| b[i]);
    }
    topk_desc(biased, sel);
}

/// Expert weights: `w_k = p[sel_k] / max(Σ p[sel], 2^-14) · scale` (unbiased `p`).
pub fn route_weights(p: &[f32], sel: &[u32], scale: f32, w: &mut [f32]) {
    let sum: f64 = sel.iter().map(|&e| p[e as usize] as f64).sum();
    let den = sum.max(6.103515625e-5);
    for (o, &e) in w.iter_mut().zip(sel) {
        *o = (p[e as usize] as f64 / den * scale as f64) as f32;
    }
}

/// SwiGLU with clamp and weight: `out = silu(min(g, c))·clamp(u, −c, c)·w` (no clamp when
/// `c ≤ 1e-6`).
pub fn swiglu(g: &[f32], u: &[f32], clamp: f32, w: f32, out: &mut [f32]) {
    let on = clamp > 1e-6;
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        let (gv, uv) = if on {
            (gv.min(clamp), uv.clamp(-clamp, clamp))
        } else {
            (gv, uv)
        };
        let gv = gv as f64;
        let silu = gv / (1.0 + (-gv).exp());
        *o = (silu * uv as f64 * w as f64) as f32;
    }
}

// ------------------------------------------------------------------------------------------
// Directional steering (ds4's `--dir-steering-*`, see `crate::steer`)

/// Lanes of the steering dot product's reduction: the CUDA kernel's block size (`STEER_T` in
/// `ds4-cuda/kernels/fwd.cu`). The reduction order below is part of the definition, so the CPU
/// and the GPU compute the same f64 dot, bit for bit.
pub const STEER_LANES: usize = 256;

/// `Σ_i (f64)d_i·(f64)y_i` in a fixed order: lane `j` (of [`STEER_LANES`]) adds the exact
/// products of the elements `i ≡ j (mod STEER_LANES)` in ascending order (starting from 0),
/// then each warp of 32 lanes is reduced by the xor butterfly (distances 16, 8, 4, 2, 1:
/// `v[l] + v[l ^ o]`, the CUDA `warp_sum_d`), then the warp sums (zero-padded to 32) by the same
/// butterfly (the CUDA `block_sum_d`). The products are exact (two f32 mantissas fit in an f64
/// one), so only this order matters.
pub fn steer_dot(d: &[f32], y: &[f32]) -> f64 {
    let mut lanes = [0f64; STEER_LANES];
    for (i, (&a, &b)) in d.iter().zip(y).enumerate() {
        let l = i % STEER_LANES;
        lanes[l] += a as f64 * b as f64;
    }
    fn butterfly(v: &mut [f64; 32]) {
        for o in [16usize, 8, 4, 2, 1] {
            let old = *v;
            for (l, x) in v.iter_mut().enumerate() {
                *x = old[l] + old[l ^ o];
            }
        }
    }
    let mut warps = [0f64; 32];
    for (w, chunk) in lanes.chunks_exact(32).enumerate() {
        let mut v = [0f64; 32];
        v.copy_from_slice(chunk);
        butterfly(&mut v);
        warps[w] = v[0];
    }
    butterfly(&mut warps);
    warps[0]
}

/// One directional-steering edit of one row: `y ← y − scale·d·(d·y)`, with
/// `dot` = [`steer_dot`], `c = (f64)scale·dot` and `y_i = (f32)((f64)y_i − c·(f64)d_i)`.
/// Positive `scale` removes the component of `y` along the unit direction `d`, negative
/// amplifies it; `scale = 0` leaves `y` unchanged (callers skip it).
pub fn dir_steer(y: &mut [f32], d: &[f32], scale: f32) {
    let c = scale as f64 * steer_dot(d, y);
    for (v, &di) in y.iter_mut().zip(d) {
        *v = (*v as f64 - c * di as f64) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_grid() {
        assert_eq!(e4m3_round(448.0), 448.0);
        assert_eq!(e4m3_round(-500.0), -448.0);
        assert_eq!(e4m3_round(432.0), 448.0); // tie between 416 (odd) and 448 (even)
        assert_eq!(e4m3_round(1.0 + 1.0 / 16.0), 1.0); // tie 1.0 (even) / 1.125
        assert_eq!(e4m3_round(1.125 + 1.0 / 16.0), 1.25); // tie 1.125 (odd) / 1.25 (even)
        assert_eq!(e4m3_round(1.0 / 1024.0), 0.0); // half of the subnormal step → 0 (even)
        assert_eq!(e4m3_round(3.0 / 1024.0), 2.0 / 512.0);
        assert_eq!(e4m3_round(0.0146), 7.0 / 512.0);
    }

    #[test]
    fn e2m1_grid() {
        let cases = [
            (0.25, 0.0),
            (0.26, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.1, 6.0),
            (-3.2, -3.0),
        ];
        for (x, y) in cases {
            assert_eq!(e2m1_round(x), y, "{x}");
        }
    }

    #[test]
    fn scales() {
        assert_eq!(pow2_scale(448.0 / 128.0, 448.0), 1.0 / 128.0);
        let above = f32::from_bits((448.0f32 / 128.0).to_bits() + 1);
        assert_eq!(pow2_scale(above, 448.0), 1.0 / 64.0);
        assert_eq!(pow2_scale(1e-4, 448.0), 2f32.powi(-22));
        assert_eq!(pow2_scale(6.0 * f32::MIN_POSITIVE, 6.0), f32::MIN_POSITIVE);
    }

    #[test]
    fn topk_ties_lower_index_first() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0];
        let mut out = [0u32; 2];
        topk_desc(&s, &mut out);
        assert_eq!(out, [1, 2]);
        let mut scratch = Vec::new();
        let mut o = [0u32; 3];
        assert_eq!(topk_indices(&s, 3, &mut scratch, &mut o), 3);
        assert_eq!(o, [1, 2, 4]);
        let z = [0.0f32; 6];
        assert_eq!(topk_indices(&z, 2, &mut scratch, &mut o), 2);
        assert_eq!(&o[..2], &[0, 1]);
    }

    #[test]
    fn sinkhorn_is_doubly_stochastic() {
        let mix: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let base = vec![0.1f32; 24];
        let (mut pre, mut post, mut comb) = ([0f32; 4], [0f32; 4], [0f32; 16]);
        hc_split(
            &mix,
            &[1.0, 0.5, 2.0],
            &base,
            4,
            20,
            1e-6,
            &mut pre,
            &mut post,
            &mut comb,
        );
        for r in 0..4 {
            let row: f32 = comb[r * 4..r * 4 + 4].iter().sum();
            let col: f32 = (0..4).map(|i| comb[i * 4 + r]).sum();
            assert!(
                (row - 1.0).abs() < 1e-3 && (col - 1.0).abs() < 1e-5,
                "{row} {col}"
            );
        }
        assert!(pre.iter().all(|&p| p > 0.0 && p < 1.0 + 1e-5));
        assert!(post.iter().all(|&p| p > 0.0 && p < 2.0));
    }

    #[test]
    fn hadamard_is_orthonormal() {
        let mut x = vec![0f32; 128];
        x[3] = 1.0;
        hadamard_inplace(&mut x);
        let n2: f32 = x.iter().map(|v| v * v).sum();
        assert!((n2 - 1.0).abs() < 1e-6);
        hadamard_inplace(&mut x);
        assert!((x[3] - 1.0).abs() < 1e-6 && x[4].abs() < 1e-6);
    }

    #[test]
    fn compressor_overlap_pools_prev_and_current() {
        let g = CompressorGeom {
            ratio: 4,
            overlap: true,
            d_c: 2,
        };
        let mut kv = vec![0f32; g.state_len()];
        let mut sc = vec![0f32; g.state_len()];
        compressor_clear(&mut kv, &mut sc);
        let mut out = [0f32; 2];
        // First window: only the current rows (second half columns) count.
        for pos in 0..4 {
            let v = pos as f32;
            let emit = compressor_push(g, &mut kv, &mut sc, pos, &[100.0, 100.0, v, v], &[0.0; 4]);
            assert_eq!(emit, pos == 3);
        }
        compressor_pool(g, &kv, &sc, &mut out);
        assert_eq!(out, [1.5, 1.5]); // mean of 0..3
        compressor_advance(g, &mut kv, &mut sc);
        for pos in 4..8 {
            compressor_push(g, &mut kv, &mut sc, pos, &[10.0, 10.0, 0.0, 0.0], &[0.0; 4]);
        }
        compressor_pool(g, &kv, &sc, &mut out);
        // previous window first half (100) and current second half (0): mean 50.
        assert_eq!(out, [50.0, 50.0]);
    }

    #[test]
    fn attention_sink_only_and_uniform() {
        let q = [0.0f32; 4];
        let raw = [1.0f32, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let (mut b, mut a) = (Vec::new(), Vec::new());
        let mut out = [0f32; 4];
        // Scores all 0 and sink 0: weights 1/3 each, sink has no value.
        attention_head(&q, &raw, &[], 0, None, 0.0, 1.0, &mut b, &mut a, &mut out);
        for (o, want) in out.iter().zip([4.0f32 / 3.0; 4]) {
            assert!((o - want).abs() < 1e-6);
        }
    }

    #[test]
    fn router_weights_floor_and_scale() {
        let p = [0.5f32, 0.25, 0.25, 0.0];
        let mut w = [0f32; 2];
        route_weights(&p, &[0, 1], 1.5, &mut w);
        assert!((w[0] - 1.0).abs() < 1e-7 && (w[1] - 0.5).abs() < 1e-7);
        route_weights(&[0.0, 0.0], &[0, 1], 1.5, &mut w);
        assert_eq!(w, [0.0, 0.0]);
    }

    #[test]
    fn steer_dot_is_the_f64_dot() {
        let mut st = 0x1234_5678_9abc_def1_u64;
        let mut r = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            ((st >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for n in [1usize, 7, 256, 300, 4096, 5000] {
            let d: Vec<f32> = (0..n).map(|_| r()).collect();
            let y: Vec<f32> = (0..n).map(|_| r() * 10.0).collect();
            let naive: f64 = d.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = d
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = steer_dot(&d, &y);
            assert!(
                (got - naive).abs() <= 1e-13 * mag,
                "n {n}: {got} vs {naive}"
            );
        }
        // One element: exactly its product.
        assert_eq!(steer_dot(&[3.0], &[-0.5]), -1.5);
    }

    #[test]
    fn dir_steer_removes_and_amplifies() {
        // One-hot direction: scale 1 zeroes that coordinate exactly, the others are untouched.
        let y0 = [1.5f32, -2.25, 3.0, 0.125];
        let d = [0.0f32, 1.0, 0.0, 0.0];
        let mut y = y0;
        dir_steer(&mut y, &d, 1.0);
        assert_eq!(y, [1.5, 0.0, 3.0, 0.125]);
        // Scale −1 doubles it; scale 0 is the identity.
        let mut y = y0;
        dir_steer(&mut y, &d, -1.0);
        assert_eq!(y, [1.5, -4.5, 3.0, 0.125]);
        let mut y = y0;
        dir_steer(&mut y, &d, 0.0);
        assert_eq!(y, y0);
        // A unit direction: the component along it is removed (up to f32 rounding).
        let n = 4096;
        let raw: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let norm = raw.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let d: Vec<f32> = raw.iter().map(|&v| (v as f64 / norm) as f32).collect();
        let mut y: Vec<f32> = (0..n)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.3)
            .collect();
        let ny = y.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        assert!(steer_dot(&d, &y).abs() > 1e-3 * ny);
        dir_steer(&mut y, &d, 1.0);
        assert!(steer_dot(&d, &y).abs() < 1e-6 * ny, "{}", steer_dot(&d, &y));
    }
}
