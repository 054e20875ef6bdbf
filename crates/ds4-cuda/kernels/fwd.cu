// ds4-nvcc: -fmad=false
//
// The forward pass of DeepSeek V4 Flash on the GPU, everything except the weight matrix
// products (those are gemv.cu's). Every kernel mirrors one `ds4_model::ops` function (or a fused
// sequence of them) with the CPU reference's numerics: the reductions the reference accumulates
// in f64 are accumulated in f64 here, and the file is compiled without FMA contraction so that
// element-wise f32/f64 expressions round exactly as the Rust code does. Hot dot products use
// explicit fma() (allowed: their summation order differs from the CPU's anyway).
//
// Positions are read from device memory (`pos0p` = first position of the chunk), so one captured
// CUDA graph serves every decode step. Token t of a chunk is at position *pos0p + t.

#include "common.cuh"

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace cg = cooperative_groups;

#define EMPTY_SCORE (-1e30f)
#define MAX_HC 16

typedef long long i64;
typedef signed char i8;

// ---------------------------------------------------------------------------------------------
// Helpers

// Block-wide f64 sum; every thread gets the result. `sh` must hold 32 doubles.
__device__ double block_sum_d(double v, double* sh) {
    v = warp_sum_d(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        double r = lane < nw ? sh[lane] : 0.0;
        r = warp_sum_d(r);
        if (lane == 0) sh[0] = r;
    }
    __syncthreads();
    return sh[0];
}

__device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

__device__ __forceinline__ double softplus_d(double x) {
    if (x > 20.0) return x;
    if (x < -20.0) return exp(x);
    return log1p(exp(x));
}

// ops::pow2_scale: the smallest power of two s with amax / s <= maxq.
__device__ float pow2_scale(float amax, float maxq) {
    const double a = (double)amax, m = (double)maxq;
    int k = (int)ceil(log2(a / m));
    while (a > m * ldexp(1.0, k)) k++;
    while (a <= m * ldexp(1.0, k - 1)) k--;
    return (float)ldexp(1.0, k);
}

// ops::e4m3_round.
__device__ float e4m3_round(float v) {
    const float a = fabsf(v);
    if (isnan(a)) return v;
    float r;
    if (a >= 448.0f) {
        r = 448.0f;
    } else if (a < 0.015625f) {
        r = rintf(a * 512.0f) / 512.0f;
    } else {
        const int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
        const float step = ldexpf(1.0f, e - 3);
        r = rintf(a / step) * step;
    }
    return copysignf(r, v);
}

// ops::e2m1_round.
__device__ float e2m1_round(float v) {
    const float a = fabsf(v);
    if (isnan(a)) return v;
    float r;
    if (a <= 0.25f) r = 0.0f;
    else if (a < 0.75f) r = 0.5f;
    else if (a <= 1.25f) r = 1.0f;
    else if (a < 1.75f) r = 1.5f;
    else if (a <= 2.5f) r = 2.0f;
    else if (a < 3.5f) r = 3.0f;
    else if (a <= 5.0f) r = 4.0f;
    else r = 6.0f;
    return copysignf(r, v);
}

// ops::fp8_roundtrip_block on x[0..n) (one thread).
__device__ void fp8_block(float* x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    amax = fmaxf(amax, 1e-4f);
    const float scale = pow2_scale(amax, 448.0f);
    for (int i = 0; i < n; i++) {
        float v = x[i] / scale;
        v = fminf(fmaxf(v, -448.0f), 448.0f);
        x[i] = e4m3_round(v) * scale;
    }
}

// ops::fp4_roundtrip_block on x[0..n) (one thread).
__device__ void fp4_block(float* x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    amax = fmaxf(amax, 6.0f * 1.17549435e-38f);
    const float scale = pow2_scale(amax, 6.0f);
    for (int i = 0; i < n; i++) {
        float v = x[i] / scale;
        v = fminf(fmaxf(v, -6.0f), 6.0f);
        x[i] = e2m1_round(v) * scale;
    }
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_max_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// fp8_block on x[0..n) (n <= 64) by one whole warp: the same values as the one-thread version
// (the block maximum is order-independent, every element is rounded by the same expressions).
__device__ void fp8_block_warp(float* x, int n) {
    const int lane = threadIdx.x & 31;
    const float v0 = lane < n ? x[lane] : 0.0f;
    const float v1 = lane + 32 < n ? x[lane + 32] : 0.0f;
    float a = fmaxf(fmaxf(0.0f, fabsf(v0)), fabsf(v1));
    a = warp_max_f(a);
    const float amax = fmaxf(a, 1e-4f);
    const float scale = pow2_scale(amax, 448.0f);
    if (lane < n) {
        float v = v0 / scale;
        v = fminf(fmaxf(v, -448.0f), 448.0f);
        x[lane] = e4m3_round(v) * scale;
    }
    if (lane + 32 < n) {
        float v = v1 / scale;
        v = fminf(fmaxf(v, -448.0f), 448.0f);
        x[lane + 32] = e4m3_round(v) * scale;
    }
}

// fp4_block on x[0..n) (n <= 32) by one whole warp (same values as the one-thread version).
__device__ void fp4_block_warp(float* x, int n) {
    const int lane = threadIdx.x & 31;
    const float v0 = lane < n ? x[lane] : 0.0f;
    float a = warp_max_f(fmaxf(0.0f, fabsf(v0)));
    const float amax = fmaxf(a, 6.0f * 1.17549435e-38f);
    const float scale = pow2_scale(amax, 6.0f);
    if (lane < n) {
        float v = v0 / scale;
        v = fminf(fmaxf(v, -6.0f), 6.0f);
        x[lane] = e2m1_round(v) * scale;
    }
}

// ops::fp8_kv_qat on a shared row (block-wide; ends with __syncthreads). A warp per 64-block
// when the block is made of whole warps, else a thread per block.
__device__ void fp8_kv_qat_shared(float* row, int n_nope) {
    const int nb = (n_nope + 63) / 64;
    if ((blockDim.x & 31) == 0) {
        const int nw = blockDim.x >> 5;
        for (int b = threadIdx.x >> 5; b < nb; b += nw) {
            const int lo = b * 64;
            fp8_block_warp(row + lo, min(64, n_nope - lo));
        }
    } else {
        for (int b = threadIdx.x; b < nb; b += blockDim.x) {
            const int lo = b * 64;
            const int len = min(64, n_nope - lo);
            fp8_block(row + lo, len);
        }
    }
    __syncthreads();
}

// ops::indexer_qat on a shared row of n (power of two) values (block-wide, ends synced).
__device__ void indexer_qat_shared(float* row, int n) {
    for (int stride = 1; stride < n; stride <<= 1) {
        for (int pi = threadIdx.x; pi < n / 2; pi += blockDim.x) {
            const int blk = pi / stride, off = pi % stride;
            const int i = blk * 2 * stride + off;
            const float a = row[i], b = row[i + stride];
            row[i] = a + b;
            row[i + stride] = a - b;
        }
        __syncthreads();
    }
    const float s = (float)(1.0 / sqrt((double)n));
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = row[i] * s;
    __syncthreads();
    const int nb = (n + 31) / 32;
    if ((blockDim.x & 31) == 0) {
        const int nw = blockDim.x >> 5;
        for (int b = threadIdx.x >> 5; b < nb; b += nw) {
            const int lo = b * 32;
            fp4_block_warp(row + lo, min(32, n - lo));
        }
    } else {
        for (int b = threadIdx.x; b < nb; b += blockDim.x) {
            const int lo = b * 32;
            fp4_block(row + lo, min(32, n - lo));
        }
    }
    __syncthreads();
}

// RoPE on the tail of a shared row of `dim` values (block-wide, ends synced).
__device__ void rope_tail_shared(float* row, int dim, int n_rot, const double* inv_freq, i64 pos,
                                 bool inverse) {
    const int half = n_rot / 2;
    const int start = dim - n_rot;
    for (int k = threadIdx.x; k < half; k += blockDim.x) {
        float c, s;
        rope_cs(inv_freq, k, pos, &c, &s);
        rope_pair(&row[start + 2 * k], &row[start + 2 * k + 1], c, s, inverse);
    }
    __syncthreads();
}

// rms_norm (weight may be null) of a shared row in place (block-wide, ends synced).
__device__ void rms_norm_shared(float* row, int dim, const float* w, float eps, double* sh) {
    double ss = 0.0;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const double v = (double)row[d];
        ss += v * v;
    }
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)dim + (double)eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        double v = (double)row[d] * s;
        if (w) v = v * (double)w[d];
        row[d] = (float)v;
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Position bookkeeping

extern "C" __global__ void ds4_advance_pos(int* pos, int n) {
    PDL_ENTRY();
    if (threadIdx.x == 0 && blockIdx.x == 0) *pos += n;
}

// ---------------------------------------------------------------------------------------------
// Embedding: x[t][h][:] = dequant(table row tokens[t]) for every HC stream h.
// type: GGML id (0 F32, 1 F16, 8 Q8_0, 30 BF16).

extern "C" __global__ void ds4_embed(const unsigned char* table, int type, int e, i64 row_bytes,
                                     const int* tokens, int hc, float* x) {
    PDL_ENTRY();
    // grid (ceil(e / blockDim), n): one element per thread.
    const int t = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= e) return;
    const int tok = tokens[t];
    const unsigned char* row = table + (i64)tok * row_bytes;
    float* xo = x + (i64)t * hc * e;
    float v = 0.0f;
    if (type == 0) {
        v = ((const float*)row)[d];
    } else if (type == 1) {
        v = __half2float(((const __half*)row)[d]);
    } else if (type == 30) {
        v = __uint_as_float(((unsigned)((const unsigned short*)row)[d]) << 16);
    } else if (type == 8) {
        const unsigned char* b = row + (d / 32) * 34;
        const float dd = __half2float(__ushort_as_half(*(const unsigned short*)b));
        v = dd * (float)((const signed char*)(b + 2))[d % 32];
    }
    for (int h = 0; h < hc; h++) xo[(i64)h * e + d] = v;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm of rows (ops::rms_norm / rms_norm_noweight): block per row; in place allowed. Each
// thread keeps its first RMS_CACHE elements in registers, so the row is read once and the loads
// are all in flight together (the sum of squares is one f64 sum in a different order).

#define RMS_CACHE 16

extern "C" __global__ void __launch_bounds__(1024) ds4_rms_norm_rows(const float* x, i64 xs, const float* w, int dim,
                                             float eps, float* out, i64 os) {
    PDL_ENTRY();
    __shared__ double sh[32];
    const float* xr = x + (i64)blockIdx.x * xs;
    float* orow = out + (i64)blockIdx.x * os;
    const int nt = blockDim.x;
    float c[RMS_CACHE];
#pragma unroll
    for (int u = 0; u < RMS_CACHE; u++) {
        const int d = threadIdx.x + u * nt;
        c[u] = d < dim ? xr[d] : 0.0f;
    }
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < RMS_CACHE; u++) ss += (double)c[u] * (double)c[u];
    for (int d = threadIdx.x + RMS_CACHE * nt; d < dim; d += nt) {
        const double v = (double)xr[d];
        ss += v * v;
    }
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)dim + (double)eps);
#pragma unroll
    for (int u = 0; u < RMS_CACHE; u++) {
        const int d = threadIdx.x + u * nt;
        if (d < dim) {
            double v = (double)c[u] * s;
            if (w) v = v * (double)w[d];
            orow[d] = (float)v;
        }
    }
    for (int d = threadIdx.x + RMS_CACHE * nt; d < dim; d += nt) {
        double v = (double)xr[d] * s;
        if (w) v = v * (double)w[d];
        orow[d] = (float)v;
    }
}

// ---------------------------------------------------------------------------------------------
// HC pre (ops::hc_split + hc_collapse + rms_norm): block per token.
// mix [n][nm], x [n][hc][e] -> post [n][hc], comb [n][hc][hc], xin [n][e], a [n][e].

__device__ void hc_split_one(const float* mix, const float* scale, const float* base, int hc,
                             int iters, float hc_eps, float* pre, float* post, float* comb) {
    const double eps = (double)hc_eps;
    for (int i = 0; i < hc; i++) {
        pre[i] = (float)(sigmoid_d((double)mix[i] * (double)scale[0] + (double)base[i]) + eps);
        post[i] = (float)(2.0 * sigmoid_d((double)mix[hc + i] * (double)scale[1] +
                                          (double)base[hc + i]));
    }
    double m[MAX_HC * MAX_HC];
    for (int r = 0; r < hc; r++) {
        double* row = m + r * hc;
        double mx = -INFINITY;
        for (int c = 0; c < hc; c++) {
            const int j = 2 * hc + r * hc + c;
            row[c] = (double)mix[j] * (double)scale[2] + (double)base[j];
            mx = fmax(mx, row[c]);
        }
        double sum = 0.0;
        for (int c = 0; c < hc; c++) {
            row[c] = exp(row[c] - mx);
            sum += row[c];
        }
        for (int c = 0; c < hc; c++) row[c] = row[c] / sum + eps;
    }
    // ops::sinkhorn
    for (int c = 0; c < hc; c++) {
        double s = 0.0;
        for (int r = 0; r < hc; r++) s += m[r * hc + c];
        s += eps;
        for (int r = 0; r < hc; r++) m[r * hc + c] /= s;
    }
    const int it = iters > 1 ? iters : 1;
    for (int k = 1; k < it; k++) {
        for (int r = 0; r < hc; r++) {
            double s = 0.0;
            for (int c = 0; c < hc; c++) s += m[r * hc + c];
            s += eps;
            for (int c = 0; c < hc; c++) m[r * hc + c] /= s;
        }
        for (int c = 0; c < hc; c++) {
            double s = 0.0;
            for (int r = 0; r < hc; r++) s += m[r * hc + c];
            s += eps;
            for (int r = 0; r < hc; r++) m[r * hc + c] /= s;
        }
    }
    for (int i = 0; i < hc * hc; i++) comb[i] = (float)m[i];
}


// The same as hc_split_one, computed by one warp (hc·hc ≤ 32): lane r·hc+c holds m[r][c]; every
// row / column sum gathers its terms with shuffles and adds them in the serial order, so the
// result is bit-identical to hc_split_one (and to ops::hc_split). Called by all 32 lanes.
__device__ void hc_split_warp(const float* mix, const float* scale, const float* base, int hc,
                              int iters, float hc_eps, float* pre, float* post, float* comb) {
    const unsigned FULL = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    const double eps = (double)hc_eps;
    if (lane < hc) {
        pre[lane] = (float)(sigmoid_d((double)mix[lane] * (double)scale[0] + (double)base[lane]) + eps);
        post[lane] = (float)(2.0 * sigmoid_d((double)mix[hc + lane] * (double)scale[1] +
                                             (double)base[hc + lane]));
    }
    const bool on = lane < hc * hc;
    const int r = on ? lane / hc : 0, c = on ? lane % hc : 0;
    double v = 0.0;
    if (on) v = (double)mix[2 * hc + lane] * (double)scale[2] + (double)base[2 * hc + lane];
    double mx = -INFINITY;
    for (int cc = 0; cc < hc; cc++) mx = fmax(mx, __shfl_sync(FULL, v, r * hc + cc));
    v = exp(v - mx);
    double sum = 0.0;
    for (int cc = 0; cc < hc; cc++) sum += __shfl_sync(FULL, v, r * hc + cc);
    v = v / sum + eps;
    const int it = iters > 1 ? iters : 1;
    for (int k = 0; k < it; k++) {
        if (k > 0) {
            double s = 0.0;
            for (int cc = 0; cc < hc; cc++) s += __shfl_sync(FULL, v, r * hc + cc);
            s += eps;
            v /= s;
        }
        double s = 0.0;
        for (int rr = 0; rr < hc; rr++) s += __shfl_sync(FULL, v, rr * hc + c);
        s += eps;
        v /= s;
    }
    if (on) comb[lane] = (float)v;
}

extern "C" __global__ void ds4_hc_pre(const float* mix, int nm, const float* scale,
                                      const float* base, int hc, int iters, float hc_eps,
                                      const float* x, int e, const float* norm_w, float rms_eps,
                                      float* post, float* comb, float* xin, float* a) {
    PDL_ENTRY();
    __shared__ float s_pre[MAX_HC];
    __shared__ float s_post[MAX_HC];
    __shared__ float s_comb[MAX_HC * MAX_HC];
    __shared__ double sh[32];
    const int t = blockIdx.x;
    if (hc * hc <= 32) {
        if (threadIdx.x < 32)
            hc_split_warp(mix + (i64)t * nm, scale, base, hc, iters, hc_eps, s_pre, s_post, s_comb);
    } else if (threadIdx.x == 0) {
        hc_split_one(mix + (i64)t * nm, scale, base, hc, iters, hc_eps, s_pre, s_post, s_comb);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < hc; i += blockDim.x) post[t * hc + i] = s_post[i];
    for (int i = threadIdx.x; i < hc * hc; i += blockDim.x) comb[(i64)t * hc * hc + i] = s_comb[i];
    const float* xt = x + (i64)t * hc * e;
    float* xo = xin + (i64)t * e;
    double ss = 0.0;
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        double acc = 0.0;
        for (int h = 0; h < hc; h++) acc += (double)s_pre[h] * (double)xt[h * e + d];
        const float v = (float)acc;
        xo[d] = v;
        ss += (double)v * (double)v;
    }
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)e + (double)rms_eps);
    float* ao = a + (i64)t * e;
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        ao[d] = (float)(((double)xo[d] * s) * (double)norm_w[d]);
    }
}

// ---------------------------------------------------------------------------------------------
// HC post (ops::hc_post), optionally with the FFN sum (Σ_k routed (f64) + shared) and the next
// site's no-weight RMSNorm (flat): block per token.
// f [n][e]; routed [n][k][e] or null; x [n][hc][e] -> xo [n][hc][e], flat [n][hc*e] or null.

extern "C" __global__ void ds4_hc_post(const float* f, const float* routed, int k, const float* x,
                                       const float* post, const float* comb, int hc, int e,
                                       float* xo, float* flat, float eps) {
    PDL_ENTRY();
    __shared__ float s_post[MAX_HC];
    __shared__ float s_comb[MAX_HC * MAX_HC];
    __shared__ double sh[32];
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < hc; i += blockDim.x) s_post[i] = post[t * hc + i];
    for (int i = threadIdx.x; i < hc * hc; i += blockDim.x) s_comb[i] = comb[(i64)t * hc * hc + i];
    __syncthreads();
    const float* xt = x + (i64)t * hc * e;
    float* ot = xo + (i64)t * hc * e;
    double ss = 0.0;
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        float fd;
        if (routed) {
            double acc = 0.0;
            for (int j = 0; j < k; j++) acc += (double)routed[((i64)t * k + j) * e + d];
            fd = (float)acc + f[(i64)t * e + d];
        } else {
            fd = f[(i64)t * e + d];
        }
        for (int j = 0; j < hc; j++) {
            double acc = (double)s_post[j] * (double)fd;
            for (int i = 0; i < hc; i++) acc += (double)s_comb[i * hc + j] * (double)xt[i * e + d];
            const float v = (float)acc;
            ot[j * e + d] = v;
            ss += (double)v * (double)v;
        }
    }
    if (!flat) return;
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)(hc * e) + (double)eps);
    float* fo = flat + (i64)t * hc * e;
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        for (int j = 0; j < hc; j++) fo[j * e + d] = (float)((double)ot[j * e + d] * s);
    }
}

// ---------------------------------------------------------------------------------------------
// HC head (ops::hc_head_weights + hc_collapse) + output RMSNorm: block per token.
// mix [n][hc] (the out_hc_fn product of the normed streams), x [n][hc][e] -> hn [n][e].
// Dynamic shared memory: e floats.

extern "C" __global__ void ds4_hc_head(const float* mix, float scale, const float* base,
                                       float hc_eps, const float* x, int hc, int e,
                                       const float* norm_w, float rms_eps, float* hn) {
    PDL_ENTRY();
    extern __shared__ float s_y[];
    __shared__ float s_w[MAX_HC];
    __shared__ double sh[32];
    const int t = blockIdx.x;
    if (threadIdx.x < hc) {
        const int i = threadIdx.x;
        s_w[i] = (float)(sigmoid_d((double)mix[t * hc + i] * (double)scale + (double)base[i]) +
                         (double)hc_eps);
    }
    __syncthreads();
    const float* xt = x + (i64)t * hc * e;
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        double acc = 0.0;
        for (int h = 0; h < hc; h++) acc += (double)s_w[h] * (double)xt[h * e + d];
        s_y[d] = (float)acc;
    }
    __syncthreads();
    rms_norm_shared(s_y, e, norm_w, rms_eps, sh);
    for (int d = threadIdx.x; d < e; d += blockDim.x) hn[(i64)t * e + d] = s_y[d];
}

// ---------------------------------------------------------------------------------------------
// Q heads: per-head no-weight RMSNorm + RoPE (in place). grid (nh, n).

extern "C" __global__ void ds4_head_norm_rope(float* q, int nh, int hd, int n_rot, float eps,
                                              const double* inv_freq, const int* pos0p) {
    PDL_ENTRY();
    extern __shared__ float s_row[];
    __shared__ double sh[32];
    const int h = blockIdx.x, t = blockIdx.y;
    float* x = q + ((i64)t * nh + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) s_row[d] = x[d];
    __syncthreads();
    rms_norm_shared(s_row, hd, nullptr, eps, sh);
    rope_tail_shared(s_row, hd, n_rot, inv_freq, (i64)*pos0p + t, false);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) x[d] = s_row[d];
}

// ---------------------------------------------------------------------------------------------
// KV row: RMSNorm with weight, RoPE, FP8 (QAT), store into the raw ring at pos % raw_cap.
// kvp [n][hd]. Block per token, dynamic shared hd floats.

extern "C" __global__ void ds4_kv_finish(const float* kvp, const float* w, int hd, int n_rot,
                                         float eps, const double* inv_freq, const int* pos0p,
                                         int qat, int n_nope, float* ring, int raw_cap) {
    PDL_ENTRY();
    extern __shared__ float s_row[];
    __shared__ double sh[32];
    const int t = blockIdx.x;
    const i64 pos = (i64)*pos0p + t;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) s_row[d] = kvp[(i64)t * hd + d];
    __syncthreads();
    rms_norm_shared(s_row, hd, w, eps, sh);
    rope_tail_shared(s_row, hd, n_rot, inv_freq, pos, false);
    if (qat) fp8_kv_qat_shared(s_row, n_nope);
    float* dst = ring + (pos % raw_cap) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) dst[d] = s_row[d];
}

// ---------------------------------------------------------------------------------------------
// KV compressor (ops::compressor_push / compressor_pool / compressor_emit / compressor_advance)
// for a chunk of n tokens at positions pos0..pos0+n-1.
//
// The chunk's projections are ckv/csc [n][width] (csc without the ape bias). The frontier
// st_kv/st_sc ([rows][width]) holds the state before the chunk: overlap: rows 0..ratio-1 = the
// previous complete window, rows ratio..2·ratio-1 = the current window (slot pos % ratio);
// otherwise rows 0..ratio-1 = the current window. Empty slots: kv 0, score EMPTY_SCORE.

struct CompSrc {
    const float* ckv;
    const float* csc;
    const float* ape;
    const float* st_kv;
    const float* st_sc;
    i64 pos0;
    int ratio;
    int overlap;
    int width;
};

// The (kv, score) of position p, column col, as the CPU frontier would hold it.
__device__ __forceinline__ void comp_fetch(const CompSrc& s, i64 p, int col, float* kv, float* sc) {
    if (p < 0) {
        *kv = 0.0f;
        *sc = EMPTY_SCORE;
        return;
    }
    const int m = (int)(p % s.ratio);
    if (p >= s.pos0) {
        const i64 i = (p - s.pos0) * s.width + col;
        *kv = s.ckv[i];
        *sc = s.csc[i] + s.ape[(i64)m * s.width + col];
        return;
    }
    const i64 w = p / s.ratio;
    const i64 w0 = s.pos0 / s.ratio;
    int row;
    if (w == w0) {
        row = s.overlap ? s.ratio + m : m;
    } else if (s.overlap && w == w0 - 1) {
        row = m;
    } else {
        *kv = 0.0f;
        *sc = EMPTY_SCORE;
        return;
    }
    *kv = s.st_kv[(i64)row * s.width + col];
    *sc = s.st_sc[(i64)row * s.width + col];
}

// Emit the compressed rows completed in the chunk: block b -> row c = pos0/ratio + b (if its
// window ends inside the chunk). qat_mode: 0 none, 1 FP8 on the first n_nope dims, 2 indexer
// (Hadamard + FP4). rows [cap][d_c]. Dynamic shared: d_c floats.
extern "C" __global__ void ds4_comp_emit(const float* ckv, const float* csc, const float* ape,
                                         const float* st_kv, const float* st_sc,
                                         const int* pos0p, int n, int ratio, int overlap, int d_c,
                                         const float* norm, float eps, const double* inv_freq,
                                         int n_rot, int qat_mode, int n_nope, float* rows) {
    PDL_ENTRY();
    extern __shared__ float s_row[];
    __shared__ double sh[32];
    CompSrc s;
    s.ckv = ckv;
    s.csc = csc;
    s.ape = ape;
    s.st_kv = st_kv;
    s.st_sc = st_sc;
    s.pos0 = (i64)*pos0p;
    s.ratio = ratio;
    s.overlap = overlap;
    s.width = overlap ? 2 * d_c : d_c;
    const i64 pend = s.pos0 + n;
    const i64 c = s.pos0 / ratio + blockIdx.x;
    if ((c + 1) * ratio > pend) return;
    const int n_cand = overlap ? 2 * ratio : ratio;
    for (int j = threadIdx.x; j < d_c; j += blockDim.x) {
        double mx = -INFINITY;
        for (int i = 0; i < n_cand; i++) {
            i64 p;
            int col;
            if (overlap) {
                if (i < ratio) {
                    p = (c - 1) * ratio + i;
                    col = j;
                } else {
                    p = c * ratio + (i - ratio);
                    col = d_c + j;
                }
            } else {
                p = c * ratio + i;
                col = j;
            }
            float kv, sc;
            comp_fetch(s, p, col, &kv, &sc);
            mx = fmax(mx, (double)sc);
        }
        float out = 0.0f;
        if (!(mx <= (double)EMPTY_SCORE * 0.5)) {
            double den = 0.0, num = 0.0;
            for (int i = 0; i < n_cand; i++) {
                i64 p;
                int col;
                if (overlap) {
                    if (i < ratio) {
                        p = (c - 1) * ratio + i;
                        col = j;
                    } else {
                        p = c * ratio + (i - ratio);
                        col = d_c + j;
                    }
                } else {
                    p = c * ratio + i;
                    col = j;
                }
                float kv, sc;
                comp_fetch(s, p, col, &kv, &sc);
                const double ex = exp((double)sc - mx);
                den += ex;
                num += ex * (double)kv;
            }
            out = (float)(num / den);
        }
        s_row[j] = out;
    }
    __syncthreads();
    rms_norm_shared(s_row, d_c, norm, eps, sh);
    rope_tail_shared(s_row, d_c, n_rot, inv_freq, c * ratio, false);
    if (qat_mode == 1) fp8_kv_qat_shared(s_row, n_nope);
    else if (qat_mode == 2) indexer_qat_shared(s_row, d_c);
    float* dst = rows + c * d_c;
    for (int j = threadIdx.x; j < d_c; j += blockDim.x) dst[j] = s_row[j];
}

// Advance the frontier over the chunk (in place; run after ds4_comp_emit). One thread per column.
extern "C" __global__ void ds4_comp_frontier(const float* ckv, const float* csc, const float* ape,
                                             float* st_kv, float* st_sc, const int* pos0p, int n,
                                             int ratio, int overlap, int d_c) {
    PDL_ENTRY();
    CompSrc s;
    s.ckv = ckv;
    s.csc = csc;
    s.ape = ape;
    s.st_kv = st_kv;
    s.st_sc = st_sc;
    s.pos0 = (i64)*pos0p;
    s.ratio = ratio;
    s.overlap = overlap;
    s.width = overlap ? 2 * d_c : d_c;
    const i64 pend = s.pos0 + n;
    const i64 wf = pend / ratio;
    for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < s.width;
         col += gridDim.x * blockDim.x) {
        if (!overlap) {
            for (int m = 0; m < ratio; m++) {
                const i64 p = wf * ratio + m;
                if (p < s.pos0) continue;  // unchanged slot of the same window
                float kv = 0.0f, sc = EMPTY_SCORE;
                if (p < pend) comp_fetch(s, p, col, &kv, &sc);
                st_kv[(i64)m * s.width + col] = kv;
                st_sc[(i64)m * s.width + col] = sc;
            }
        } else {
            float nkv[16], nsc[16];
            for (int m = 0; m < ratio && m < 8; m++) {
                comp_fetch(s, (wf - 1) * ratio + m, col, &nkv[m], &nsc[m]);
                const i64 p = wf * ratio + m;
                if (p < pend) {
                    comp_fetch(s, p, col, &nkv[8 + m], &nsc[8 + m]);
                } else {
                    nkv[8 + m] = 0.0f;
                    nsc[8 + m] = EMPTY_SCORE;
                }
            }
            for (int m = 0; m < ratio && m < 8; m++) {
                st_kv[(i64)m * s.width + col] = nkv[m];
                st_sc[(i64)m * s.width + col] = nsc[m];
                st_kv[(i64)(ratio + m) * s.width + col] = nkv[8 + m];
                st_sc[(i64)(ratio + m) * s.width + col] = nsc[8 + m];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lightning indexer.

// Queries: RoPE (compressed family) + Hadamard/FP4 (QAT) per head, weights scaled.
// iq [n][nih][ihd], iw [n][nih]. grid (nih, n), block ihd threads, dynamic shared ihd floats.
extern "C" __global__ void ds4_indexer_q(float* iq, float* iw, int nih, int ihd, int n_rot,
                                         const double* inv_freq, const int* pos0p, int qat,
                                         double wscale) {
    PDL_ENTRY();
    extern __shared__ float s_row[];
    const int h = blockIdx.x, t = blockIdx.y;
    float* x = iq + ((i64)t * nih + h) * ihd;
    for (int d = threadIdx.x; d < ihd; d += blockDim.x) s_row[d] = x[d];
    __syncthreads();
    rope_tail_shared(s_row, ihd, n_rot, inv_freq, (i64)*pos0p + t, false);
    if (qat) indexer_qat_shared(s_row, ihd);
    for (int d = threadIdx.x; d < ihd; d += blockDim.x) x[d] = s_row[d];
    if (threadIdx.x == 0) {
        float* wp = iw + (i64)t * nih + h;
        *wp = (float)((double)*wp * wscale);
    }
}

// ds4_indexer_q for ihd = 128, one warp per head (lane: elements 4·lane..+3 in registers),
// 8 heads per block of 256 threads, grid (nih / 8, n); the RoPE cos/sin of the token are
// computed once per block. Every value goes through the same float expressions as
// ds4_indexer_q (rope_pair, the Hadamard butterflies a+b / a-b, ×(float)(1/sqrt(128)),
// fp4_block_warp's scale and rounding), so the result is bit-identical.
extern "C" __global__ void __launch_bounds__(256) ds4_indexer_q_warp(
    float* iq, float* iw, int nih, int n_rot, const double* inv_freq, const int* pos0p, int qat,
    double wscale) {
    PDL_ENTRY();
    constexpr int IHD = 128;
    __shared__ float s_c[IHD / 2], s_s[IHD / 2];
    const int t = blockIdx.y, lane = threadIdx.x & 31;
    const int h = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int half = n_rot / 2, start = IHD - n_rot;
    const i64 pos = (i64)*pos0p + t;
    float4* x4 = (float4*)(iq + ((i64)t * nih + h) * IHD) + lane;
    const float4 v4 = *x4;
    for (int k = threadIdx.x; k < half; k += blockDim.x) rope_cs(inv_freq, k, pos, &s_c[k], &s_s[k]);
    if (threadIdx.x < 8 && blockIdx.x * 8 + threadIdx.x < nih) {
        float* wp = iw + (i64)t * nih + blockIdx.x * 8 + threadIdx.x;
        *wp = (float)((double)*wp * wscale);
    }
    __syncthreads();
    float x[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
    for (int p = 0; p < 2; p++) {
        const int i = 4 * lane + 2 * p;  // pair (i, i+1)
        if (i >= start) {
            const int k = (i - start) >> 1;
            rope_pair(&x[2 * p], &x[2 * p + 1], s_c[k], s_s[k], false);
        }
    }
    if (qat) {
        // strides 1, 2 inside the lane
        {
            const float a0 = x[0], b0 = x[1], a1 = x[2], b1 = x[3];
            x[0] = a0 + b0;
            x[1] = a0 - b0;
            x[2] = a1 + b1;
            x[3] = a1 - b1;
        }
        {
            const float a0 = x[0], b0 = x[2], a1 = x[1], b1 = x[3];
            x[0] = a0 + b0;
            x[2] = a0 - b0;
            x[1] = a1 + b1;
            x[3] = a1 - b1;
        }
        // strides 4 .. 64: lane strides 1 .. 16
#pragma unroll
        for (int ls = 1; ls < 32; ls <<= 1) {
            const bool upper = (lane & ls) != 0;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float o = __shfl_xor_sync(0xffffffffu, x[j], ls);
                x[j] = upper ? o - x[j] : x[j] + o;
            }
        }
        const float sc = (float)(1.0 / sqrt((double)IHD));
#pragma unroll
        for (int j = 0; j < 4; j++) x[j] = x[j] * sc;
        // FP4 per 32-block = 8 lanes
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) a = fmaxf(a, fmaxf(0.0f, fabsf(x[j])));
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        const float amax = fmaxf(a, 6.0f * 1.17549435e-38f);
        const float scale = pow2_scale(amax, 6.0f);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v = x[j] / scale;
            v = fminf(fmaxf(v, -6.0f), 6.0f);
            x[j] = e2m1_round(v) * scale;
        }
    }
    *x4 = make_float4(x[0], x[1], x[2], x[3]);
}

#define IDX_TILE 8

// Scores (ops::indexer_scores) of tokens t0..t0+gridDim.y-1 that see more than topk rows:
// score[c] = Σ_h w[h]·max(0, q_h·k_c) for c < (p+1)/ratio, summed over heads in order (as the
// CPU does). scores [gridDim.y][sstride]. Block 256 threads; dynamic shared:
// IDX_TILE·nih doubles + nih·(ihd+1) + nih + IDX_TILE·ihd floats.
extern "C" __global__ void ds4_indexer_scores(const float* iq, const float* iw, const float* icomp,
                                              int nih, int ihd, int ratio, int topk,
                                              const int* pos0p, int t0, float* scores,
                                              i64 sstride) {
    PDL_ENTRY();
    extern __shared__ double smem_d[];
    const int t = t0 + blockIdx.y;
    const i64 p = (i64)*pos0p + t;
    const i64 nv = (p + 1) / ratio;
    if (nv <= topk) return;
    const int qs = ihd + 1;
    double* s_c = smem_d;                          // [IDX_TILE][nih]
    float* s_q = (float*)(s_c + IDX_TILE * nih);   // [nih][ihd+1]
    float* s_w = s_q + nih * qs;                   // [nih]
    float* s_k = s_w + nih;                        // [IDX_TILE][ihd]
    const float* qt = iq + (i64)t * nih * ihd;
    for (int i = threadIdx.x; i < nih * ihd; i += blockDim.x) s_q[(i / ihd) * qs + (i % ihd)] = qt[i];
    for (int i = threadIdx.x; i < nih; i += blockDim.x) s_w[i] = iw[(i64)t * nih + i];
    const i64 n_tiles = (nv + IDX_TILE - 1) / IDX_TILE;
    const int nthreads = blockDim.x;
    float* out = scores + (i64)blockIdx.y * sstride;
    for (i64 tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        __syncthreads();
        const i64 r0 = tile * IDX_TILE;
        for (int i = threadIdx.x; i < IDX_TILE * ihd; i += nthreads) {
            const i64 r = r0 + i / ihd;
            s_k[i] = r < nv ? icomp[r * ihd + (i % ihd)] : 0.0f;
        }
        __syncthreads();
        for (int pr = threadIdx.x; pr < IDX_TILE * nih; pr += nthreads) {
            const int r = pr / nih, h = pr % nih;
            const float* qh = s_q + h * qs;
            const float* kr = s_k + r * ihd;
            double d = 0.0;
            for (int i = 0; i < ihd; i++) d = fma((double)qh[i], (double)kr[i], d);
            s_c[r * nih + h] = d > 0.0 ? (double)s_w[h] * d : 0.0;
        }
        __syncthreads();
        if (threadIdx.x < IDX_TILE) {
            const int r = threadIdx.x;
            double acc = 0.0;
            for (int h = 0; h < nih; h++) acc += s_c[r * nih + h];
            if (r0 + r < nv) out[r0 + r] = (float)acc;
        }
    }
}

// Orderable key of a score (NaN ranks as -inf; -0 < +0 as in f32::total_cmp).
__device__ __forceinline__ unsigned fkey(float f) {
    if (isnan(f)) f = -INFINITY;
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block scan of a 0/1 flag; *total gets the block's sum. Block size multiple of 32,
// ≤ 1024. `sh` holds 33 ints.
__device__ int block_excl_scan(int flag, int* total, int* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const unsigned b = __ballot_sync(0xffffffffu, flag);
    const int in_warp = __popc(b & ((1u << lane) - 1u));
    __syncthreads();
    if (lane == 0) sh[w] = __popc(b);
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int i = 0; i < nw; i++) {
            const int v = sh[i];
            sh[i] = acc;
            acc += v;
        }
        sh[32] = acc;
    }
    __syncthreads();
    *total = sh[32];
    return sh[w] + in_warp;
}

// Top-k (ops::topk_indices): the topk largest scores, ties -> lower index, written ascending to
// isel [t][topk], for tokens seeing more than topk rows. grid (nt), block 1024.
extern "C" __global__ void __launch_bounds__(1024) ds4_topk(const float* scores, i64 sstride, int ratio, int topk,
                                    const int* pos0p, int t0, int* isel) {
    PDL_ENTRY();
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_mask;
    __shared__ int s_need;
    __shared__ int sh[33];
    __shared__ unsigned s_wsum[8];
    __shared__ unsigned s_excl0;
    __shared__ int s_found;
    const int t = t0 + blockIdx.x;
    const i64 p = (i64)*pos0p + t;
    const i64 nv = (p + 1) / ratio;
    if (nv <= topk) return;
    const float* s = scores + (i64)blockIdx.x * sstride;
    if (threadIdx.x == 0) {
        s_prefix = 0;
        s_mask = 0;
        s_need = topk;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const unsigned prefix = s_prefix, mask = s_mask;
        for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
            const unsigned k = fkey(s[i]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        // The digit: the highest bin b whose count from the top reaches `need` (bin 0 if none).
        // Threads 0..255 hold the bins in descending order and scan their counts in parallel.
        const unsigned need = (unsigned)s_need;
        unsigned cnt = 0, incl = 0;
        const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
        if (threadIdx.x < 256) {
            cnt = hist[255 - threadIdx.x];
            incl = cnt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            if (lane == 31) s_wsum[wi] = incl;
        }
        if (threadIdx.x == 0) s_found = 0;
        __syncthreads();
        if (threadIdx.x < 256) {
            unsigned off = 0;
            for (int w = 0; w < wi; w++) off += s_wsum[w];
            incl += off;
            const unsigned excl = incl - cnt;
            const int b = 255 - (int)threadIdx.x;
            if (b > 0 && excl < need && incl >= need) {
                s_need = (int)(need - excl);
                s_prefix = prefix | ((unsigned)b << shift);
                s_found = 1;
            }
            if (b == 0) s_excl0 = excl;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            if (!s_found) {
                s_need = (int)(need - s_excl0);
                s_prefix = prefix;
            }
            s_mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    const unsigned thr = s_prefix;
    const int need_eq = s_need;
    int out_base = 0, eq_base = 0;
    int* dst = isel + (i64)t * topk;
    for (i64 i0 = 0; i0 < nv; i0 += blockDim.x) {
        const i64 i = i0 + threadIdx.x;
        unsigned k = 0;
        if (i < nv) k = fkey(s[i]);
        const int gt = (i < nv) && k > thr;
        const int eq = (i < nv) && k == thr;
        int eq_total;
        const int er = block_excl_scan(eq, &eq_total, sh);
        const int take = gt || (eq && eq_base + er < need_eq);
        int sel_total;
        const int pos = block_excl_scan(take, &sel_total, sh);
        if (take) dst[out_base + pos] = (int)i;
        out_base += sel_total;
        eq_base += eq_total;
    }
}

// ---------------------------------------------------------------------------------------------
// Attention with sinks (ops::attention_head) over the raw window + compressed rows, then inverse
// RoPE. grid (nh/hpb, nsplit, n), block hpb·32 threads (one warp per head). With nsplit > 1 the
// per-split (acc, max, den) go to part [n][nh][nsplit][hd+2] and ds4_attn_combine finishes.

#define ATT_MAXJ 16

__device__ void attn_finish(double m, double den, double* acc, int nj, float sink, int hd,
                            int n_rot, const double* inv_freq, i64 p, float* out) {
    const int lane = threadIdx.x & 31;
    const double sk = (double)sink;
    const double M = fmax(sk, m);
    const double corr = (m == -INFINITY) ? 0.0 : exp(m - M);
    const double den_t = exp(sk - M) + den * corr;
    const double inv = 1.0 / den_t;
    const int n_nope = hd - n_rot;
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        if (j < nj) {
            const int d = lane + 32 * j;
            float v = (float)((acc[j] * corr) * inv);
            // inverse RoPE on the tail: pairs (d, d+1) live in lanes (even, odd).
            const float other = __shfl_xor_sync(0xffffffffu, v, 1);
            if (d >= n_nope) {
                const int k = (d - n_nope) >> 1;
                float c, s;
                rope_cs(inv_freq, k, p, &c, &s);
                float x0 = (lane & 1) ? other : v;
                float x1 = (lane & 1) ? v : other;
                rope_pair(&x0, &x1, c, s, true);
                v = (lane & 1) ? x1 : x0;
            }
            out[d] = v;
        }
    }
}

extern "C" __global__ void ds4_attention(const float* q, const float* ring, int raw_cap,
                                         int window, const float* comp, int ratio,
                                         int has_indexer, const int* isel, int topk,
                                         const float* sinks, float scale, int nh, int hd,
                                         int n_rot, const double* inv_freq, const int* pos0p,
                                         int nsplit, double* part, float* heads) {
    PDL_ENTRY();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hpb = blockDim.x >> 5;
    const int h = blockIdx.x * hpb + warp;
    if (h >= nh) return;
    const int split = blockIdx.y;
    const int t = blockIdx.z;
    const i64 p = (i64)*pos0p + t;
    const i64 n_raw = (p + 1) < (i64)window ? (p + 1) : (i64)window;
    const i64 lo = p + 1 - n_raw;
    const i64 nv = ratio ? (p + 1) / ratio : 0;
    const bool use_sel = has_indexer && nv > topk;
    const i64 n_c = use_sel ? (i64)topk : nv;
    const i64 R = n_raw + n_c;
    const i64 r0 = R * split / nsplit, r1 = R * (split + 1) / nsplit;
    const int nj = hd / 32;
    const float* qh = q + ((i64)t * nh + h) * hd;
    double qv[ATT_MAXJ], acc[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        qv[j] = j < nj ? (double)qh[lane + 32 * j] : 0.0;
        acc[j] = 0.0;
    }
    const double sc = (double)scale;
    double m = -INFINITY, den = 0.0;
    const int* sel = isel + (i64)t * topk;
    for (i64 r = r0; r < r1; r++) {
        const float* row;
        if (r < n_raw) {
            row = ring + ((lo + r) % raw_cap) * hd;
        } else {
            const i64 ci = use_sel ? (i64)sel[r - n_raw] : (r - n_raw);
            row = comp + ci * hd;
        }
        double rv[ATT_MAXJ];
        double dot = 0.0;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            if (j < nj) {
                rv[j] = (double)row[lane + 32 * j];
                dot = fma(qv[j], rv[j], dot);
            }
        }
        dot = warp_sum_d(dot);
        const double s = dot * sc;
        const double mn = fmax(m, s);
        const double corr = exp(m - mn);
        const double pr = exp(s - mn);
        den = den * corr + pr;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            if (j < nj) acc[j] = acc[j] * corr + pr * rv[j];
        }
        m = mn;
    }
    if (nsplit > 1) {
        double* pp = part + (((i64)t * nh + h) * nsplit + split) * (hd + 2);
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            if (j < nj) pp[lane + 32 * j] = acc[j];
        }
        if (lane == 0) {
            pp[hd] = m;
            pp[hd + 1] = den;
        }
        return;
    }
    attn_finish(m, den, acc, nj, sinks[h], hd, n_rot, inv_freq, p, heads + ((i64)t * nh + h) * hd);
}

// Combine the splits of ds4_attention. grid (nh, n), block 32.
extern "C" __global__ void ds4_attn_combine(const double* part, int nsplit, const float* sinks,
                                            int nh, int hd, int n_rot, const double* inv_freq,
                                            const int* pos0p, float* heads) {
    PDL_ENTRY();
    const int h = blockIdx.x, t = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int nj = hd / 32;
    const i64 p = (i64)*pos0p + t;
    const double* pp = part + ((i64)t * nh + h) * nsplit * (hd + 2);
    double m = -INFINITY;
    for (int s = 0; s < nsplit; s++) m = fmax(m, pp[s * (hd + 2) + hd]);
    double acc[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) acc[j] = 0.0;
    double den = 0.0;
    for (int s = 0; s < nsplit; s++) {
        const double* ps = pp + s * (hd + 2);
        const double ms = ps[hd];
        if (ms == -INFINITY) continue;
        const double c = exp(ms - m);
        den += ps[hd + 1] * c;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            if (j < nj) acc[j] += ps[lane + 32 * j] * c;
        }
    }
    attn_finish(m, den, acc, nj, sinks[h], hd, n_rot, inv_freq, p, heads + ((i64)t * nh + h) * hd);
}

// ---------------------------------------------------------------------------------------------
// MoE router (ops::router_probs + route_topk / hash + route_weights): block per token, a thread
// per expert (blockDim >= ne, a multiple of 32, <= 1024).
// rlog [n][ne] -> probs [n][ne], sel [n][k] (rank order), wts [n][k].
// The selection ranks every expert by (biased prob descending, index ascending): expert e is
// picked at rank #{e' ahead of e} when that is < k, which is exactly the order of ops::topk_desc.

#define ROUTER_MAXK 16

extern "C" __global__ void __launch_bounds__(1024) ds4_router(const float* rlog, int ne, int k, int hash,
                                      const int* tid2eid, const int* tokens, const float* bias,
                                      float wscale, float* probs, int* sel, float* wts) {
    PDL_ENTRY();
    __shared__ float s_p[1024];
    __shared__ float s_v[1024];
    __shared__ int s_sel[ROUTER_MAXK];
    const int t = blockIdx.x;
    const int e = threadIdx.x;
    const float* l = rlog + (i64)t * ne;
    if (e < ne) {
        const float p = (float)sqrt(softplus_d((double)l[e]));
        probs[(i64)t * ne + e] = p;
        s_p[e] = p;
        float v = p + (bias ? bias[e] : 0.0f);
        if (isnan(v)) v = -INFINITY;
        s_v[e] = v;
    }
    __syncthreads();
    if (hash) {
        const int tok = tokens[t];
        if (e < k) s_sel[e] = tid2eid[(i64)tok * k + e];
    } else if (e < ne) {
        const float v = s_v[e];
        int rank = 0;
        for (int j = 0; j < ne; j++) {
            const float o = s_v[j];
            rank += (o > v || (o == v && j < e)) ? 1 : 0;
        }
        if (rank < k) s_sel[rank] = e;
    }
    __syncthreads();
    if (threadIdx.x < k) {
        // Every writer forms the same sum in the same order (no extra barrier).
        double sum = 0.0;
        for (int j = 0; j < k; j++) {
            const int x = s_sel[j];
            sum += (x >= 0 && x < ne) ? (double)s_p[x] : 0.0;
        }
        const double den = fmax(sum, 6.103515625e-5);
        const int x = s_sel[threadIdx.x];
        const double px = (x >= 0 && x < ne) ? (double)s_p[x] : 0.0;
        sel[(i64)t * k + threadIdx.x] = x;
        wts[(i64)t * k + threadIdx.x] = (float)(px / den * (double)wscale);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU (ops::swiglu) with weight 1 (shared expert): out = silu(min(g,c))·clamp(u,±c).
// g/u/out addressed as [rows][cols] with strides (so gate|up may share one buffer).

extern "C" __global__ void ds4_swiglu(const float* g, const float* u, i64 in_stride, int cols,
                                      int rows, float clamp, float* out, i64 out_stride) {
    PDL_ENTRY();
    const i64 total = (i64)rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols, c = i % cols;
        float gv = g[r * in_stride + c], uv = u[r * in_stride + c];
        if (clamp > 1e-6f) {
            gv = fminf(gv, clamp);
            uv = fminf(fmaxf(uv, -clamp), clamp);
        }
        const double gd = (double)gv;
        const double silu = gd / (1.0 + exp(-gd));
        out[r * out_stride + c] = (float)(silu * (double)uv * 1.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Directional steering (ops::dir_steer, ds4_model::steer): block per token, STEER_T threads.
// y[t] = f[t], or (float)routed[t] + f[t] when routed (the FFN output as ds4_hc_post forms it
// from moe_down's summed experts and the shared expert), then for each slot s in order:
// dot = Σ_i dir_i·y_i (exact f64 products; thread j adds those of the elements j, j + STEER_T,
// ... in order, then block_sum_d: the order ops::steer_dot reproduces), c = scale[s]·dot,
// y_i = (float)(y_i − c·dir_i). Each thread only touches its own elements, so f may equal y.
// Every field of SteerArgs is 8 bytes (host mirror in src/fwd.rs).
#define STEER_T 256
#define STEER_MAX 8
struct SteerArgs {
    float* y;             // [n][e] out
    const float* f;       // [n][e] in (may be y)
    const float* routed;  // [n][e] or null
    i64 e;
    i64 nslot;
    const float* dir[STEER_MAX];  // this layer's direction of each slot
    double scale[STEER_MAX];
};

extern "C" __global__ void __launch_bounds__(STEER_T) ds4_dir_steer(const SteerArgs P) {
    PDL_ENTRY();
    __shared__ double sh[32];
    const i64 e = P.e;
    float* y = P.y + (i64)blockIdx.x * e;
    const float* f = P.f + (i64)blockIdx.x * e;
    if (P.routed) {
        const float* r = P.routed + (i64)blockIdx.x * e;
        for (i64 d = threadIdx.x; d < e; d += STEER_T) y[d] = __fadd_rn(r[d], f[d]);
    } else if (f != y) {
        for (i64 d = threadIdx.x; d < e; d += STEER_T) y[d] = f[d];
    }
    for (int s = 0; s < (int)P.nslot; s++) {
        const float* dir = P.dir[s];
        double part = 0.0;
        for (i64 d = threadIdx.x; d < e; d += STEER_T)
            part = __dadd_rn(part, __dmul_rn((double)dir[d], (double)y[d]));
        const double c = __dmul_rn(P.scale[s], block_sum_d(part, sh));
        for (i64 d = threadIdx.x; d < e; d += STEER_T)
            y[d] = (float)__dsub_rn((double)y[d], __dmul_rn(c, (double)dir[d]));
    }
}

// =============================================================================================
// Decode-step kernels (one token). Same numerics as the chunk kernels above (and as the CPU
// reference): only the order of f64 additions differs. They spread each single-token op over
// many threads and blocks; the cross-block reductions use a "last block" step: every block
// writes its partial, and the last block to arrive (atomic counter, reset by that block so the
// next launch — or graph replay — finds it at 0) sums the partials in block order and finishes.
// No grid-wide waiting, no allocation, nothing that stops a CUDA graph capture.

// True in the last block of the grid to call it (all threads of every block must call it).
__device__ bool arrive_last(unsigned* ctr, unsigned total) {
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned prev = atomicAdd(ctr, 1u);
        const int last = prev == total - 1;
        if (last) atomicExch(ctr, 0u);
        s_last = last;
    }
    __syncthreads();
    const bool last = s_last != 0;
    if (last) __threadfence();
    return last;
}

// hc_split_warp with hc a compile-time constant (the loops unroll, the shuffles of one sum are
// issued together); bit-identical to hc_split_warp.
template <int HC>
__device__ void hc_split_warp_t(const float* mix, const float* scale, const float* base, int iters,
                                float hc_eps, float* pre, float* post, float* comb) {
    const unsigned FULL = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    const double eps = (double)hc_eps;
    if (lane < HC) {
        pre[lane] = (float)(sigmoid_d((double)mix[lane] * (double)scale[0] + (double)base[lane]) + eps);
        post[lane] = (float)(2.0 * sigmoid_d((double)mix[HC + lane] * (double)scale[1] +
                                             (double)base[HC + lane]));
    }
    const bool on = lane < HC * HC;
    const int r = on ? lane / HC : 0, c = on ? lane % HC : 0;
    double v = 0.0;
    if (on) v = (double)mix[2 * HC + lane] * (double)scale[2] + (double)base[2 * HC + lane];
    double g[HC];
#pragma unroll
    for (int cc = 0; cc < HC; cc++) g[cc] = __shfl_sync(FULL, v, r * HC + cc);
    double mx = -INFINITY;
#pragma unroll
    for (int cc = 0; cc < HC; cc++) mx = fmax(mx, g[cc]);
    v = exp(v - mx);
#pragma unroll
    for (int cc = 0; cc < HC; cc++) g[cc] = __shfl_sync(FULL, v, r * HC + cc);
    double sum = 0.0;
#pragma unroll
    for (int cc = 0; cc < HC; cc++) sum += g[cc];
    v = v / sum + eps;
    const int it = iters > 1 ? iters : 1;
    for (int k = 0; k < it; k++) {
        if (k > 0) {
#pragma unroll
            for (int cc = 0; cc < HC; cc++) g[cc] = __shfl_sync(FULL, v, r * HC + cc);
            double s = 0.0;
#pragma unroll
            for (int cc = 0; cc < HC; cc++) s += g[cc];
            s += eps;
            v /= s;
        }
#pragma unroll
        for (int rr = 0; rr < HC; rr++) g[rr] = __shfl_sync(FULL, v, rr * HC + c);
        double s = 0.0;
#pragma unroll
        for (int rr = 0; rr < HC; rr++) s += g[rr];
        s += eps;
        v /= s;
    }
    if (on) comb[lane] = (float)v;
}

// The split (pre, post, comb) of one mix vector, by the first warp of the block.
__device__ void hc_split_dec(const float* mix, const float* scale, const float* base, int hc,
                             int iters, float hc_eps, float* pre, float* post, float* comb) {
    if (hc == 4) {
        if (threadIdx.x < 32) hc_split_warp_t<4>(mix, scale, base, iters, hc_eps, pre, post, comb);
    } else if (hc * hc <= 32) {
        if (threadIdx.x < 32) hc_split_warp(mix, scale, base, hc, iters, hc_eps, pre, post, comb);
    } else if (threadIdx.x == 0) {
        hc_split_one(mix, scale, base, hc, iters, hc_eps, pre, post, comb);
    }
}

// The decode HC kernels run as one thread-block cluster of CL blocks (Hopper): each block
// reduces its slice, the blocks exchange their partial sums through distributed shared memory
// after a hardware cluster barrier, and every block finishes its own slice from registers.
// Element d of the embedding belongs to block (d / CL_T) % CL, thread d % CL_T.
#define CL 8
#define CL_T 512
#define CL_EPT 4

// Sum of v over the whole cluster (block sums added in rank order); every thread gets it.
__device__ double cluster_sum_d(double v, double* sh, double* s_part) {
    v = block_sum_d(v, sh);
    if (threadIdx.x == 0) *s_part = v;
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    double t = 0.0;
#pragma unroll
    for (int r = 0; r < CL; r++) t += *cl.map_shared_rank(s_part, r);
    cl.sync();  // no block leaves (freeing its shared memory) before every block has read it
    return t;
}

__device__ __forceinline__ int cl_d(int u) {
    return (u * CL + (int)blockIdx.x) * CL_T + (int)threadIdx.x;
}

// Activation quantization fused into the decode kernels that produce a GEMV input (numerics of
// ds4_quant_q8_0 / ds4_quant_q8_k in gemv.cu, layouts of gemv.rs act_layout for one row).
// Null pointers: that format is not written.
struct DecQ {
    i8* q0;     // Q8_0 qs (one byte per value)
    float* d0;  // Q8_0 scales (one per 32)
    i8* qk;     // Q8_K qs
    float* dk;  // Q8_K d (one per 256)
    short* bk;  // Q8_K bsums (16 per 256)
};

// Q8_0 of one 32-block held one value per lane (element blk·32 + lane); all lanes call, the warp
// is either wholly on or wholly off.
__device__ __forceinline__ void q8_0_warp(float v, bool on, i64 blk, i8* qs, float* dq) {
    const unsigned FULL = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    const float a = fabsf(v);
    float am = (on && a > 0.f) ? a : 0.f;  // NaN never wins (CPU: `a > amax` is false)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(FULL, am, o));
    if (!on) return;
    const float dd = am / 127.0f;
    const float id = dd != 0.f ? 1.0f / dd : 0.f;
    qs[blk * 32 + lane] = (i8)q8_round(v, id);
    if (lane == 0) dq[blk] = dd;
}

// Q8_K of 256-blocks held one value per thread by 8 consecutive warps of the block (element
// blk·256 + idx, idx = (thread % 256)); every thread of the block calls (block barriers), each
// group of 8 warps is wholly on or off. max = the value of largest |x| (first on ties).
__device__ void q8_k_group(float v, bool on, int idx, i64 blk, i8* qs, float* dq, short* bs) {
    const unsigned FULL = 0xffffffffu;
    __shared__ float s_a[32], s_v[32];
    __shared__ int s_i[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const float aa = fabsf(v);
    float ba = 0.f, bv = 0.f;
    int bi = 0x7fffffff;
    if (on && aa > 0.f) {
        ba = aa;
        bv = v;
        bi = idx;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float oa = __shfl_xor_sync(FULL, ba, o);
        const float ov = __shfl_xor_sync(FULL, bv, o);
        const int oi = __shfl_xor_sync(FULL, bi, o);
        if (oa > ba || (oa == ba && oi < bi)) {
            ba = oa;
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        s_a[w] = ba;
        s_v[w] = bv;
        s_i[w] = bi;
    }
    __syncthreads();
    ba = 0.f;
    bv = 0.f;
    bi = 0x7fffffff;
    const int g0 = w & ~7;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float oa = s_a[g0 + j];
        const float ov = s_v[g0 + j];
        const int oi = s_i[g0 + j];
        if (oa > ba || (oa == ba && oi < bi)) {
            ba = oa;
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();  // s_a / s_v / s_i are free for the next call
    if (!on) return;
    const float iscale = ba != 0.f ? -127.0f / bv : 0.f;
    const float p = __fmul_rn(iscale, v);
    const int qi = (p == p) ? __float2int_rn(p) : 0;
    const int q = ba != 0.f ? max(-128, min(127, qi)) : 0;
    qs[blk * 256 + idx] = (i8)q;
    int s = q;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if ((lane & 15) == 0) bs[blk * 16 + (idx >> 4)] = (short)s;
    if (idx == 0) dq[blk] = ba != 0.f ? 1.0f / iscale : 0.f;
}

// y[d] = Σ_h w[h]·x[h][d], then out = RMSNorm(y)·norm_w (y == out allowed), w[h] =
// sigmoid(mix[h]·scale + base[h]) + hc_eps (scale = scale_p[0], or scale_v when scale_p is
// null). x and norm_w are loaded before the weights are computed. With qo's pointers set, out
// is also quantized (needs e % 256 == 0 for Q8_K, e % 32 for Q8_0, e ≤ CL·CL_T·CL_EPT).
template <int NH>
__device__ void collapse_norm_dec(const float* mix, const float* scale_p, float scale_v,
                                  const float* base, float hc_eps, int hc, const float* x, int e,
                                  const float* norm_w, float rms_eps, float* y, float* out,
                                  DecQ qo) {
    __shared__ double sh[32];
    __shared__ double s_part;
    __shared__ double w_sh[MAX_HC];  // f32 values held as f64 (no per-use conversion)
    float xv[CL_EPT][NH];
    float nv[CL_EPT];
    // Steps that hold an element anywhere in the cluster (uniform: the rest is skipped whole,
    // with its quantization barriers).
    const int nu = min(CL_EPT, (e + CL * CL_T - 1) / (CL * CL_T));
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        const int d = cl_d(u);
#pragma unroll
        for (int h = 0; h < NH; h++) xv[u][h] = (d < e && h < hc) ? x[(i64)h * e + d] : 0.0f;
        nv[u] = d < e ? norm_w[d] : 0.0f;
    }
    if (threadIdx.x < hc) {
        const int i = threadIdx.x;
        const float sc = scale_p ? scale_p[0] : scale_v;
        w_sh[i] = (double)(float)(sigmoid_d((double)mix[i] * (double)sc + (double)base[i]) +
                                  (double)hc_eps);
    }
    __syncthreads();
    float yv[CL_EPT];
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        yv[u] = 0.0f;
        if (u >= nu) continue;
        double acc = 0.0;
#pragma unroll
        for (int h = 0; h < NH; h++) {
            // f32·f32 is exact in f64: the fma rounds as the CPU's mul + add.
            if (h < hc) acc = __fma_rn(w_sh[h], (double)xv[u][h], acc);
        }
        yv[u] = (float)acc;
        const int d = cl_d(u);
        if (d < e) {
            y[d] = yv[u];
            const double yd = (double)yv[u];
            ss = __fma_rn(yd, yd, ss);
        }
    }
    // Beyond CL·CL_T·CL_EPT elements: no register copy (re-read below).
    for (int d = cl_d(CL_EPT); d < e; d += CL * CL_T) {
        double acc = 0.0;
        for (int h = 0; h < hc; h++) acc = __fma_rn(w_sh[h], (double)x[(i64)h * e + d], acc);
        const float v = (float)acc;
        y[d] = v;
        ss = __fma_rn((double)v, (double)v, ss);
    }
    const double tot = cluster_sum_d(ss, sh, &s_part);
    const double s = 1.0 / sqrt(tot / (double)e + (double)rms_eps);
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        if (u >= nu) continue;
        const int d = cl_d(u);
        const float o = (float)(((double)yv[u] * s) * (double)nv[u]);
        if (d < e) out[d] = o;
        if (qo.q0) q8_0_warp(o, d < e, (i64)(d >> 5), qo.q0, qo.d0);
        if (qo.qk) q8_k_group(o, d < e, d & 255, (i64)(d >> 8), qo.qk, qo.dk, qo.bk);
    }
    for (int d = cl_d(CL_EPT); d < e; d += CL * CL_T) {
        out[d] = (float)(((double)y[d] * s) * (double)norm_w[d]);
    }
}

// HC pre of one token (ops::hc_collapse + rms_norm; the split is ds4_hc_split_dec):
// xin = Σ_h pre[h]·x[h], a = RMSNorm(xin)·norm_w, and (pointers set) a's Q8_0 / Q8_K activation
// quantization for the projections that read it. One cluster: grid CL, block CL_T.
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CL_T)
    ds4_hc_pre_dec(const float* mix, const float* scale, const float* base, int hc, float hc_eps,
                   const float* x, int e, const float* norm_w, float rms_eps, float* xin,
                   float* a, i8* q0, float* d0, i8* qk, float* dk, short* bk) {
    PDL_ENTRY();
    const DecQ qo = {q0, d0, qk, dk, bk};
    if (hc == 4) {
        collapse_norm_dec<4>(mix, scale, 0.0f, base, hc_eps, hc, x, e, norm_w, rms_eps, xin, a, qo);
    } else {
        collapse_norm_dec<MAX_HC>(mix, scale, 0.0f, base, hc_eps, hc, x, e, norm_w, rms_eps, xin,
                                  a, qo);
    }
}

// HC mix product of one token (hc = 4: 24 rows) over many blocks: block b takes the HCP_COLS
// columns [b·HCP_COLS, (b+1)·HCP_COLS) of fn [24][he] (F16) and flat [he], and writes
// part[r][b] = Σ fn[r][i]·flat[i] over them (f64 sums of exact f16×f32 products, as the F16
// matvec; only the order of the f64 additions differs). Thread t: 8 columns (one 16-byte load
// per row), rows t/16 + 8·k, written row-major (part[r][b]: ds4_hc_pre_mix_dec's half warps read
// 16 consecutive partials of a row). ds4_hc_pre_mix_dec adds the partials. Grid he / HCP_COLS, block
// HCP_T; needs he % HCP_COLS == 0 and 16-byte aligned flat / xo / fn.
// nss > 0: flat is first computed here from ds4_hc_post_wide's output: flat = RMSNorm_noweight(xo)
// (ss = the nss block partials of Σ xo², added in block order by every warp alike; the
// ds4_hc_post_dec expressions) and written to flat (the row-group-0 threads).
#define HCM_HC 4
#define HCM_NM 24
#define HCP_COLS 128
#define HCP_T 128
extern "C" __global__ void __launch_bounds__(HCP_T)
    ds4_hc_mix_part(float* __restrict__ flat, const float* __restrict__ xo,
                    const double* __restrict__ ssp, int nss, float eps,
                    const __half* __restrict__ fn, double* __restrict__ part, int he) {
    PDL_DEFERRED();
    constexpr int RG = HCP_T / 16, RK = HCM_NM / RG;  // 8 row groups of 3 rows
    const int t = threadIdx.x, cgi = t & 15, rg = t >> 4;
    const i64 c0 = (i64)blockIdx.x * HCP_COLS + cgi * 8;
    uint4 w[RK] = {};
    // Weight prologue (common.cuh): fn is a weight, read before the wait for the HC post. The
    // loads sit in their own branch: in the same basic block ptxas schedules the wait first
    // (checked with cuobjdump: LDG before ACQBULK).
    if (c0 < he) {
#pragma unroll
        for (int k = 0; k < RK; k++)
            w[k] = __ldg(reinterpret_cast<const uint4*>(fn + (i64)(rg + RG * k) * he + c0));
    }
    pdl_wait();
    const float* src = nss > 0 ? xo : flat;
    float4 f0 = *reinterpret_cast<const float4*>(src + c0);
    float4 f1 = *reinterpret_cast<const float4*>(src + c0 + 4);
    if (nss > 0) {
        const int lane = t & 31;
        double ss = 0.0;
        for (int i = lane; i < nss; i += 32) ss += ssp[i];
        const double tot = warp_sum_d(ss);  // the same value in every lane and warp
        const double s = 1.0 / sqrt(tot / (double)he + (double)eps);
        f0 = make_float4((float)((double)f0.x * s), (float)((double)f0.y * s),
                         (float)((double)f0.z * s), (float)((double)f0.w * s));
        f1 = make_float4((float)((double)f1.x * s), (float)((double)f1.y * s),
                         (float)((double)f1.z * s), (float)((double)f1.w * s));
        if (rg == 0) {
            *reinterpret_cast<float4*>(flat + c0) = f0;
            *reinterpret_cast<float4*>(flat + c0 + 4) = f1;
        }
    }
    const double fl[8] = {(double)f0.x, (double)f0.y, (double)f0.z, (double)f0.w,
                          (double)f1.x, (double)f1.y, (double)f1.z, (double)f1.w};
    double acc[RK];
#pragma unroll
    for (int k = 0; k < RK; k++) {
        const __half2* h = reinterpret_cast<const __half2*>(&w[k]);
        double a = 0.0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 v = __half22float2(h[i]);
            a = __fma_rn((double)v.x, fl[2 * i], a);  // exact product (11 × 24 bits)
            a = __fma_rn((double)v.y, fl[2 * i + 1], a);
        }
        acc[k] = a;
    }
    // Sum over the 16 column groups of a half warp (the other half is another row group).
#pragma unroll
    for (int k = 0; k < RK; k++) {
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o);
    }
    if (cgi == 0) {
#pragma unroll
        for (int k = 0; k < RK; k++) part[(i64)(rg + RG * k) * gridDim.x + blockIdx.x] = acc[k];
    }
}

// HC post of one token (hc = 4) over many blocks, without the cluster: xo as ds4_hc_post_dec
// (f = Σ_k routed (f64) + f when routed), and each block's f64 Σ xo² (its values, warp sums
// added in warp order) in ssp[block]; ds4_hc_mix_part finishes the next site's no-weight
// RMSNorm into flat. Element d = thread. Grid e / HPW_T, block HPW_T; needs e % HPW_T == 0.
#define HPW_T 128
extern "C" __global__ void __launch_bounds__(HPW_T)
    ds4_hc_post_wide(const float* __restrict__ f, const float* __restrict__ routed, int k,
                     const float* __restrict__ x, const float* __restrict__ post,
                     const float* __restrict__ comb, int e, float* __restrict__ xo,
                     double* __restrict__ ssp) {
    PDL_ENTRY();
    __shared__ double s_red[HPW_T / 32];
    const int d = blockIdx.x * HPW_T + threadIdx.x;
    const float fv = f[d];
    float xv[HCM_HC];
#pragma unroll
    for (int i = 0; i < HCM_HC; i++) xv[i] = x[(i64)i * e + d];
    double acc = 0.0;
    if (routed) {
        for (int j = 0; j < k; j++) acc += (double)routed[(i64)j * e + d];
    }
    double pj[HCM_HC], cm[HCM_HC * HCM_HC];
#pragma unroll
    for (int i = 0; i < HCM_HC; i++) pj[i] = (double)post[i];
#pragma unroll
    for (int i = 0; i < HCM_HC * HCM_HC; i++) cm[i] = (double)comb[i];
    const float fd = routed ? (float)acc + fv : fv;
    const double fdd = (double)fd;
    double xd[HCM_HC];
#pragma unroll
    for (int i = 0; i < HCM_HC; i++) xd[i] = (double)xv[i];
    double ss = 0.0;
#pragma unroll
    for (int j = 0; j < HCM_HC; j++) {
        double a = pj[j] * fdd;
#pragma unroll
        for (int i = 0; i < HCM_HC; i++) a = __fma_rn(cm[i * HCM_HC + j], xd[i], a);  // exact products
        const float v = (float)a;
        xo[(i64)j * e + d] = v;
        ss = __fma_rn((double)v, (double)v, ss);
    }
    ss = warp_sum_d(ss);
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
#pragma unroll
        for (int w = 0; w < HPW_T / 32; w++) t += s_red[w];
        ssp[blockIdx.x] = t;
    }
}

// The mix of a decode HC site from ds4_hc_mix_part's partials (row-major, nparts per row):
// 12 whole warps, row r = thread / 16 adding partials j, j+16, … then a half-warp tree, into
// s_mix (every block, the same additions) and, by block 0, mix (for the split kernel).
__device__ __forceinline__ void hc_mix_sum(const double* __restrict__ part, int nparts,
                                           float* s_mix, float* mix) {
    if (threadIdx.x < HCM_NM * 16) {
        const int r = threadIdx.x >> 4, j = threadIdx.x & 15;
        double t = 0.0;
#pragma unroll 8
        for (int g = j; g < nparts; g += 16) t += part[(i64)r * nparts + g];
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (j == 0) {
            s_mix[r] = (float)t;
            if (blockIdx.x == 0) mix[r] = (float)t;
        }
    }
}

// HC pre of one token after ds4_hc_mix_part (hc = 4: 24 mix rows): every block adds the
// nparts partials of each row (f64, a fixed order: the same in every block), block 0 writes
// mix (for the split kernel); then ds4_hc_pre_dec (collapse, norm, quantization). Needs
// e ≤ CL·CL_T·CL_EPT. One cluster: grid CL, block CL_T.
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CL_T, 1)
    ds4_hc_pre_mix_dec(const double* __restrict__ part, int nparts, float* mix,
                       const float* scale, const float* base, float hc_eps, const float* x, int e,
                       const float* norm_w, float rms_eps, float* xin, float* a, i8* q0,
                       float* d0, i8* qk, float* dk, short* bk) {
    PDL_ENTRY();
    __shared__ float s_mix[HCM_NM];
    // The collapse's inputs, wanted after the mix: start fetching them now.
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        const int d = cl_d(u);
        if (d < e) {
#pragma unroll
            for (int h = 0; h < HCM_HC; h++)
                asm volatile("prefetch.global.L1 [%0];" ::"l"(x + (i64)h * e + d));
            asm volatile("prefetch.global.L1 [%0];" ::"l"(norm_w + d));
        }
    }
    hc_mix_sum(part, nparts, s_mix, mix);
    __syncthreads();
    const DecQ qo = {q0, d0, qk, dk, bk};
    collapse_norm_dec<HCM_HC>(s_mix, scale, 0.0f, base, hc_eps, HCM_HC, x, e, norm_w, rms_eps,
                              xin, a, qo);
}

// The same without a cluster: grid e / HCR_T independent blocks. Every block adds the partials
// and forms the whole collapse y (all e elements, HCR_EPT steps per thread) for the norm's Σ y²
// (a block sum: the same additions in every block), then normalizes, writes and quantizes only
// its own HCR_T elements (d = block·HCR_T + thread). No cluster launch or cluster barriers; the
// redundant part is hc·e loads (from L2) and hc·e FMAs per block. Same products as the cluster
// kernel; only the order of the f64 additions of Σ y² differs. Needs e % HCR_T == 0 and
// e ≤ HCR_EPT·HCR_T (the host checks).
#define HCR_T 512
#define HCR_EPT 8
extern "C" __global__ void __launch_bounds__(HCR_T, 1)
    ds4_hc_pre_mix_red(const double* __restrict__ part, int nparts, float* mix,
                       const float* scale, const float* base, float hc_eps,
                       const float* __restrict__ x, int e, const float* __restrict__ norm_w,
                       float rms_eps, float* xin, float* a, i8* q0, float* d0, i8* qk, float* dk,
                       short* bk) {
    PDL_ENTRY();
    __shared__ float s_mix[HCM_NM];
    __shared__ double sh[32];
    __shared__ double w_sh[HCM_HC];
    const int t = threadIdx.x;
    const int nu = e / HCR_T;  // element steps = blocks
    const int dm = blockIdx.x * HCR_T + t;
    // The collapse's inputs first (independent loads, all in flight with the partials').
    float xv[HCR_EPT][HCM_HC];
#pragma unroll
    for (int u = 0; u < HCR_EPT; u++)
#pragma unroll
        for (int h = 0; h < HCM_HC; h++) xv[u][h] = u < nu ? x[(i64)h * e + u * HCR_T + t] : 0.0f;
    const float nv = norm_w[dm];
    hc_mix_sum(part, nparts, s_mix, mix);
    __syncthreads();
    if (t < HCM_HC) {
        w_sh[t] = (double)(float)(sigmoid_d((double)s_mix[t] * (double)scale[0] + (double)base[t]) +
                                  (double)hc_eps);
    }
    __syncthreads();
    double ss = 0.0;
    float ym = 0.0f;
#pragma unroll
    for (int u = 0; u < HCR_EPT; u++) {
        if (u >= nu) continue;
        double acc = 0.0;
#pragma unroll
        for (int h = 0; h < HCM_HC; h++) acc = __fma_rn(w_sh[h], (double)xv[u][h], acc);  // exact products
        const float yv = (float)acc;
        const double yd = (double)yv;
        ss = __fma_rn(yd, yd, ss);
        if (u == (int)blockIdx.x) ym = yv;
    }
    const double tot = block_sum_d(ss, sh);
    const double sc = 1.0 / sqrt(tot / (double)e + (double)rms_eps);
    xin[dm] = ym;
    const float o = (float)(((double)ym * sc) * (double)nv);
    a[dm] = o;
    if (q0) q8_0_warp(o, true, (i64)(dm >> 5), q0, d0);
    if (qk) q8_k_group(o, true, dm & 255, (i64)(dm >> 8), qk, dk, bk);
}

// The split (post, comb) of one token alone: one warp. The decode step runs it on a side stream,
// concurrently with the collapse (which needs only pre) and everything up to the HC post.
extern "C" __global__ void ds4_hc_split_dec(const float* mix, const float* scale,
                                            const float* base, int hc, int iters, float hc_eps,
                                            float* post, float* comb) {
    PDL_ENTRY();
    __shared__ float s_pre[MAX_HC];
    __shared__ float s_post[MAX_HC];
    __shared__ float s_comb[MAX_HC * MAX_HC];
    hc_split_dec(mix, scale, base, hc, iters, hc_eps, s_pre, s_post, s_comb);
    __syncthreads();
    for (int i = threadIdx.x; i < hc; i += blockDim.x) post[i] = s_post[i];
    for (int i = threadIdx.x; i < hc * hc; i += blockDim.x) comb[i] = s_comb[i];
}

// HC head + output norm of one token: hn = RMSNorm(Σ_i w_i x_i, norm), w = sigmoid(mix·scale +
// base) + eps. One cluster: grid CL, block CL_T.
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CL_T)
    ds4_hc_head_dec(const float* mix, float scale, const float* base, float hc_eps,
                    const float* x, int hc, int e, const float* norm_w, float rms_eps, float* hn) {
    PDL_ENTRY();
    const DecQ qo = {nullptr, nullptr, nullptr, nullptr, nullptr};
    if (hc == 4) {
        collapse_norm_dec<4>(mix, nullptr, scale, base, hc_eps, hc, x, e, norm_w, rms_eps, hn, hn,
                             qo);
    } else {
        collapse_norm_dec<MAX_HC>(mix, nullptr, scale, base, hc_eps, hc, x, e, norm_w, rms_eps,
                                  hn, hn, qo);
    }
}

// HC post of one token (ops::hc_post; f = Σ_k routed (f64) + f when routed), then the next
// site's no-weight RMSNorm into flat (skipped when flat is null). One cluster: grid CL,
// block CL_T.
template <bool C, typename A, typename B>
struct Sel {
    typedef A T;
};
template <typename A, typename B>
struct Sel<false, A, B> {
    typedef B T;
};

template <int NH>
__device__ void hc_post_dec_body(const float* f, const float* routed, int k, const float* x,
                                 const float* post, const float* comb, int hc, int e, float* xo,
                                 float* flat, float eps) {
    __shared__ double sh[32];
    __shared__ double s_part;
    // post / comb (f32 values) held as f64: no conversion per use. Every product below is
    // f32·f32, exact in f64, so the fma rounds as the CPU's multiply + add.
    __shared__ double s_post[MAX_HC];
    __shared__ double s_comb[MAX_HC * MAX_HC];
    float xv[CL_EPT][NH];
    float fv[CL_EPT];
    float rv[CL_EPT];
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        const int d = cl_d(u);
        const bool on = d < e;
        fv[u] = on ? f[d] : 0.0f;
        rv[u] = (on && routed && k == 1) ? routed[d] : 0.0f;
#pragma unroll
        for (int i = 0; i < NH; i++) xv[u][i] = (on && i < hc) ? x[(i64)i * e + d] : 0.0f;
    }
    // post / comb after the element loads (their latencies overlap).
    for (int i = threadIdx.x; i < hc; i += blockDim.x) s_post[i] = (double)post[i];
    for (int i = threadIdx.x; i < hc * hc; i += blockDim.x) s_comb[i] = (double)comb[i];
    __syncthreads();
    // The f32 outputs, kept as f64 for the norm and flat where registers allow (hc = 4).
    typedef typename Sel<(NH <= 4), double, float>::T OT;
    OT o[CL_EPT][NH];
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        const int d = cl_d(u);
        if (d >= e) continue;
        float fd;
        if (routed) {
            double acc = 0.0;
            if (k == 1) {
                acc += (double)rv[u];
            } else {
                for (int j = 0; j < k; j++) acc += (double)routed[(i64)j * e + d];
            }
            fd = (float)acc + fv[u];
        } else {
            fd = fv[u];
        }
        const double fdd = (double)fd;
        double xd[NH];
#pragma unroll
        for (int i = 0; i < NH; i++) xd[i] = (double)xv[u][i];
#pragma unroll
        for (int j = 0; j < NH; j++) {
            if (j < hc) {
                double acc = s_post[j] * fdd;
#pragma unroll
                for (int i = 0; i < NH; i++) {
                    if (i < hc) acc = __fma_rn(s_comb[i * hc + j], xd[i], acc);
                }
                const float v = (float)acc;
                xo[(i64)j * e + d] = v;
                o[u][j] = (OT)v;
                ss = __fma_rn((double)v, (double)v, ss);
            }
        }
    }
    // Beyond CL·CL_T·CL_EPT elements: no register copy (re-read below).
    for (int d = cl_d(CL_EPT); d < e; d += CL * CL_T) {
        double acc = 0.0;
        for (int j = 0; j < (routed ? k : 0); j++) acc += (double)routed[(i64)j * e + d];
        const float fd = routed ? (float)acc + f[d] : f[d];
        for (int j = 0; j < hc; j++) {
            double a2 = s_post[j] * (double)fd;
            for (int i = 0; i < hc; i++) a2 = __fma_rn(s_comb[i * hc + j], (double)x[(i64)i * e + d], a2);
            const float v = (float)a2;
            xo[(i64)j * e + d] = v;
            ss = __fma_rn((double)v, (double)v, ss);
        }
    }
    if (!flat) return;
    const double tot = cluster_sum_d(ss, sh, &s_part);
    const double s = 1.0 / sqrt(tot / ((double)hc * (double)e) + (double)eps);
#pragma unroll
    for (int u = 0; u < CL_EPT; u++) {
        const int d = cl_d(u);
        if (d >= e) continue;
#pragma unroll
        for (int j = 0; j < NH; j++) {
            if (j < hc) flat[(i64)j * e + d] = (float)((double)o[u][j] * s);
        }
    }
    for (int d = cl_d(CL_EPT); d < e; d += CL * CL_T) {
        for (int j = 0; j < hc; j++) flat[(i64)j * e + d] = (float)((double)xo[(i64)j * e + d] * s);
    }
}

// Any hc (not inlined: its register pressure stays out of the hc = 4 path).
__device__ __noinline__ void hc_post_dec_any(const float* f, const float* routed, int k,
                                             const float* x, const float* post, const float* comb,
                                             int hc, int e, float* xo, float* flat, float eps) {
    hc_post_dec_body<MAX_HC>(f, routed, k, x, post, comb, hc, e, xo, flat, eps);
}

extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CL_T)
    ds4_hc_post_dec(const float* f, const float* routed, int k, const float* x, const float* post,
                    const float* comb, int hc, int e, float* xo, float* flat, float eps) {
    PDL_ENTRY();
    if (hc == 4) {
        hc_post_dec_body<4>(f, routed, k, x, post, comb, hc, e, xo, flat, eps);
    } else {
        hc_post_dec_any(f, routed, k, x, post, comb, hc, e, xo, flat, eps);
    }
}

// ---------------------------------------------------------------------------------------------
// Decode: everything between the attention projections and the attention, in one launch.
// Block roles (blockDim a multiple of 32; dynamic shared: max(hd, d_c, ihd) floats):
//   [0, nh)          q head h: no-weight RMSNorm + RoPE in place (ds4_head_norm_rope)
//   nh               the KV row: RMSNorm(w), RoPE, FP8, into the raw ring (ds4_kv_finish)
//   nh + 1, nh + 2   compressor 0 (attention rows) / 1 (indexer rows): push this token into the
//                    frontier, and when it completes a window emit the pooled row first
//                    (ds4_comp_emit + ds4_comp_frontier for one token)
//   nh + 3 + i       indexer query head i (ds4_indexer_q), when iq is not null
// Every field is 8 bytes wide so the host mirror (#[repr(C)], src/fwd.rs) has the same layout.

struct CompDec {
    const float* ckv;   // [width] this token's kv projection
    const float* csc;   // [width] this token's score projection (without ape)
    const float* ape;   // [ratio][width]
    float* st_kv;       // frontier [rows][width] (CPU layout)
    float* st_sc;
    const float* norm;  // [d_c]
    float* rows;        // compressed rows [cap][d_c]
    i64 ratio;          // 0: no compressor
    i64 overlap;
    i64 d_c;
    i64 qat_mode;       // 0 none, 1 FP8, 2 Hadamard + FP4
};

struct QkvDec {
    const int* pos;
    float* q;
    const double* inv;
    i64 nh;
    i64 hd;
    i64 n_rot;
    double eps;
    const float* kvp;
    const float* kv_w;
    float* ring;
    i64 raw_cap;
    i64 qat;
    i64 n_nope;
    CompDec comp[2];
    const double* inv_comp;
    float* iq;
    float* iw;
    i64 nih;
    i64 ihd;
    i64 iqat;
    double wscale;
};

// Candidate i of output column j of a window completed by this token (ops::compressor_pool's
// candidates, with the token's own slot m taken from its projections).
__device__ __forceinline__ void comp_cand(const CompDec& c, int w, int m, const float* ape_m,
                                          int i, int j, float* kv, float* sc) {
    const int ratio = (int)c.ratio, d_c = (int)c.d_c;
    int row, col;
    bool now;
    if (c.overlap) {
        if (i < ratio) {
            row = i;
            col = j;
            now = false;
        } else {
            row = i;
            col = d_c + j;
            now = (i - ratio) == m;
        }
    } else {
        row = i;
        col = j;
        now = i == m;
    }
    if (now) {
        *kv = c.ckv[col];
        *sc = c.csc[col] + ape_m[col];
    } else {
        *kv = c.st_kv[(i64)row * w + col];
        *sc = c.st_sc[(i64)row * w + col];
    }
}

__device__ void comp_dec_block(const CompDec& c, i64 pos, float eps, int n_rot, int n_nope,
                               const double* inv_comp, float* s_row, double* sh) {
    const int ratio = (int)c.ratio, d_c = (int)c.d_c;
    const bool ov = c.overlap != 0;
    const int w = ov ? 2 * d_c : d_c;
    const int m = (int)(pos % ratio);
    const bool emit = ((pos + 1) % ratio) == 0;
    const float* ape_m = c.ape + (i64)m * w;
    if (emit) {
        const int n_cand = ov ? 2 * ratio : ratio;
        for (int j = threadIdx.x; j < d_c; j += blockDim.x) {
            double mx = -INFINITY;
            for (int i = 0; i < n_cand; i++) {
                float kv, sc;
                comp_cand(c, w, m, ape_m, i, j, &kv, &sc);
                mx = fmax(mx, (double)sc);
            }
            float out = 0.0f;
            if (!(mx <= (double)EMPTY_SCORE * 0.5)) {
                double den = 0.0, num = 0.0;
                for (int i = 0; i < n_cand; i++) {
                    float kv, sc;
                    comp_cand(c, w, m, ape_m, i, j, &kv, &sc);
                    const double ex = exp((double)sc - mx);
                    den += ex;
                    num += ex * (double)kv;
                }
                out = (float)(num / den);
            }
            s_row[j] = out;
        }
    }
    __syncthreads();  // every read of the old frontier is done
    for (int col = threadIdx.x; col < w; col += blockDim.x) {
        const float kv_now = c.ckv[col];
        const float sc_now = c.csc[col] + ape_m[col];
        if (!emit) {
            const i64 r = ov ? ratio + m : m;
            c.st_kv[r * w + col] = kv_now;
            c.st_sc[r * w + col] = sc_now;
        } else if (ov) {
            // ops::compressor_push + compressor_advance: the completed window becomes the
            // previous one, the current one empties.
            for (int r = 0; r < ratio; r++) {
                const i64 src = (i64)(ratio + r) * w + col;
                const float kv = r == m ? kv_now : c.st_kv[src];
                const float sc = r == m ? sc_now : c.st_sc[src];
                c.st_kv[(i64)r * w + col] = kv;
                c.st_sc[(i64)r * w + col] = sc;
                c.st_kv[src] = 0.0f;
                c.st_sc[src] = EMPTY_SCORE;
            }
        } else {
            for (int r = 0; r < ratio; r++) {
                c.st_kv[(i64)r * w + col] = 0.0f;
                c.st_sc[(i64)r * w + col] = EMPTY_SCORE;
            }
        }
    }
    if (!emit) return;
    rms_norm_shared(s_row, d_c, c.norm, eps, sh);
    const i64 crow = pos / ratio;
    rope_tail_shared(s_row, d_c, n_rot, inv_comp, crow * ratio, false);
    if (c.qat_mode == 1) fp8_kv_qat_shared(s_row, n_nope);
    else if (c.qat_mode == 2) indexer_qat_shared(s_row, d_c);
    float* dst = c.rows + crow * d_c;
    for (int j = threadIdx.x; j < d_c; j += blockDim.x) dst[j] = s_row[j];
}

extern "C" __global__ void __launch_bounds__(512) ds4_qkv_dec(const QkvDec P) {
    PDL_ENTRY();
    extern __shared__ float s_row[];
    __shared__ double sh[32];
    const int b = blockIdx.x;
    const int nh = (int)P.nh, hd = (int)P.hd, n_rot = (int)P.n_rot;
    const float eps = (float)P.eps;
    const i64 pos = (i64)*P.pos;
    if (b < nh) {
        float* x = P.q + (i64)b * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) s_row[d] = x[d];
        __syncthreads();
        rms_norm_shared(s_row, hd, nullptr, eps, sh);
        rope_tail_shared(s_row, hd, n_rot, P.inv, pos, false);
        for (int d = threadIdx.x; d < hd; d += blockDim.x) x[d] = s_row[d];
    } else if (b == nh) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) s_row[d] = P.kvp[d];
        __syncthreads();
        rms_norm_shared(s_row, hd, P.kv_w, eps, sh);
        rope_tail_shared(s_row, hd, n_rot, P.inv, pos, false);
        if (P.qat) fp8_kv_qat_shared(s_row, (int)P.n_nope);
        float* dst = P.ring + (pos % P.raw_cap) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dst[d] = s_row[d];
    } else if (b <= nh + 2) {
        const CompDec c = (b == nh + 1) ? P.comp[0] : P.comp[1];
        if (c.ratio == 0) return;
        comp_dec_block(c, pos, eps, n_rot, (int)P.n_nope, P.inv_comp, s_row, sh);
    } else {
        const int h = b - nh - 3;
        if (!P.iq || h >= (int)P.nih) return;
        const int ihd = (int)P.ihd;
        float* x = P.iq + (i64)h * ihd;
        for (int d = threadIdx.x; d < ihd; d += blockDim.x) s_row[d] = x[d];
        __syncthreads();
        rope_tail_shared(s_row, ihd, n_rot, P.inv_comp, pos, false);
        if (P.iqat) indexer_qat_shared(s_row, ihd);
        for (int d = threadIdx.x; d < ihd; d += blockDim.x) x[d] = s_row[d];
        if (threadIdx.x == 0) P.iw[h] = (float)((double)P.iw[h] * P.wscale);
    }
}

// ---------------------------------------------------------------------------------------------
// Decode attention (ops::attention_head + inverse RoPE) in two launches: the scores of every
// (head, row) into S, then per (head, 64-dim slice) the CPU's own two-pass softmax: max over
// the sink and the scores, p = exp(s − max), den and Σ p·v accumulated row by row in the CPU's
// order — only the order of the f64 sum inside each q·k dot differs from the reference.

#define ATT_DEC_HPB 8

struct AttRows {
    const float* ring;
    const float* comp;
    const int* sel;
    i64 n_raw, lo, n_c, R;
    int raw_cap, hd;
    bool use_sel;
};

__device__ __forceinline__ AttRows att_rows(const float* ring, int raw_cap, int window,
                                            const float* comp, int ratio, int has_indexer,
                                            const int* isel, int topk, int hd, i64 p) {
    AttRows a;
    a.ring = ring;
    a.comp = comp;
    a.sel = isel;
    a.raw_cap = raw_cap;
    a.hd = hd;
    a.n_raw = (p + 1) < (i64)window ? (p + 1) : (i64)window;
    a.lo = p + 1 - a.n_raw;
    // Positions stay below 2^31: 32-bit division (the 64-bit one is a long software sequence).
    const i64 nv = ratio ? (i64)((unsigned)(p + 1) / (unsigned)ratio) : 0;
    a.use_sel = has_indexer && nv > topk;
    a.n_c = a.use_sel ? (i64)topk : nv;
    a.R = a.n_raw + a.n_c;
    return a;
}

__device__ __forceinline__ const float* att_row(const AttRows& a, i64 r) {
    if (r < a.n_raw) return a.ring + (i64)((unsigned)(a.lo + r) % (unsigned)a.raw_cap) * a.hd;
    const i64 ci = a.use_sel ? (i64)a.sel[r - a.n_raw] : (r - a.n_raw);
    return a.comp + ci * a.hd;
}

// One reduce-scatter step over lane bit N: lanes with the bit set keep the upper half of v
// (2N values) and add the partner's, the others the lower half.
template <int N>
__device__ __forceinline__ void rs_step(const double* v, double* w, int lane) {
    const bool b = (lane & N) != 0;
#pragma unroll
    for (int i = 0; i < N; i++) {
        const double keep = b ? v[N + i] : v[i];
        const double send = b ? v[i] : v[N + i];
        w[i] = keep + __shfl_xor_sync(0xffffffffu, send, N);
    }
}

// The 32-lane sum of v[lane] (a reduce-scatter of 32 values: 31 shuffles; the additions form
// a fixed tree).
__device__ __forceinline__ double reduce32(const double* v, int lane) {
    double w16[16], w8[8], w4[4], w2[2], w1[1];
    rs_step<16>(v, w16, lane);
    rs_step<8>(w16, w8, lane);
    rs_step<4>(w8, w4, lane);
    rs_step<2>(w4, w2, lane);
    rs_step<1>(w2, w1, lane);
    return w1[0];
}

// S[h][r] = (q_h · row_r)·scale for this block's chunk of rows, and pm[h][chunk] = the chunk's
// largest score (−inf when empty). grid (nch, ceil(nh/8)), block 128 (3 blocks per SM): the
// block's 8 query heads sit in shared memory as f64 (converted once); each warp takes 4 rows
// per step and forms all 32 (head, row) dots, so each row element is converted to f64 once per
// 8 heads.
#define ATS_H 8
#define ATS_U 4
#define ATS_WARPS 4

extern "C" __global__ void __launch_bounds__(ATS_WARPS * 32, 3) ds4_attn_dec_scores(
    const float* q, const float* ring, int raw_cap, int window, const float* comp, int ratio,
    int has_indexer, const int* isel, int topk, float scale, int nh, int hd, const int* pos0p,
    double* S, i64 s_stride, double* pm) {
    PDL_ENTRY();
    __shared__ double s_q[ATS_H][ATT_MAXJ * 32];
    __shared__ double s_m[ATS_WARPS][ATS_H];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hb = blockIdx.y * ATS_H;
    const int nhb = min(ATS_H, nh - hb);
    // The block's queries (contiguous heads): every load issued before any is used.
    constexpr int QV = ATS_H * ATT_MAXJ * 32 / 4 / (ATS_WARPS * 32);
    const int nq4 = nhb * hd / 4;
    const float4* q4 = (const float4*)(q + (i64)hb * hd);
    float4 qv4[QV];
#pragma unroll
    for (int k = 0; k < QV; k++) {
        const int i = threadIdx.x + k * ATS_WARPS * 32;
        qv4[k] = i < nq4 ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const i64 p = (i64)*pos0p;
    const AttRows a = att_rows(ring, raw_cap, window, comp, ratio, has_indexer, isel, topk, hd, p);
    const unsigned R32 = (unsigned)a.R;
    const i64 r0 = R32 * blockIdx.x / gridDim.x, r1 = R32 * (blockIdx.x + 1) / gridDim.x;
    const int nj = hd / 32;
    const double sc = (double)scale;
    const int hs = lane >> 2, us = lane & 3;  // the (head, row) of this lane's dot
    float kv[ATS_U][ATT_MAXJ];
    auto load_rows = [&](i64 r) {
        const float* rows[ATS_U];
#pragma unroll
        for (int u = 0; u < ATS_U; u++) rows[u] = att_row(a, r + u < r1 ? r + u : r1 - 1);
#pragma unroll
        for (int u = 0; u < ATS_U; u++) {
#pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) kv[u][j] = j < nj ? rows[u][lane + 32 * j] : 0.0f;
        }
    };
    i64 r = r0 + ATS_U * warp;
    if (r < r1) load_rows(r);
#pragma unroll
    for (int k = 0; k < QV; k++) {
        const int i = threadIdx.x + k * ATS_WARPS * 32;
        if (4 * i < ATS_H * hd) {
            const int h = 4 * i / hd, d = 4 * i - h * hd;
            double* dst = &s_q[h][d];
            dst[0] = (double)qv4[k].x;
            dst[1] = (double)qv4[k].y;
            dst[2] = (double)qv4[k].z;
            dst[3] = (double)qv4[k].w;
        }
    }
    double mown = -INFINITY;
    __syncthreads();
    for (; r < r1; r += ATS_U * ATS_WARPS) {
        double acc[ATS_H * ATS_U];
#pragma unroll
        for (int i = 0; i < ATS_H * ATS_U; i++) acc[i] = 0.0;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            if (j < nj) {
                double kd[ATS_U];
#pragma unroll
                for (int u = 0; u < ATS_U; u++) kd[u] = (double)kv[u][j];
#pragma unroll
                for (int h = 0; h < ATS_H; h++) {
                    const double qv = s_q[h][lane + 32 * j];
#pragma unroll
                    for (int u = 0; u < ATS_U; u++) acc[h * ATS_U + u] = fma(qv, kd[u], acc[h * ATS_U + u]);
                }
            }
        }
        // The next step's rows load while this one's dots are reduced.
        if (r + ATS_U * ATS_WARPS < r1) load_rows(r + ATS_U * ATS_WARPS);
        const double dot = reduce32(acc, lane);
        if (r + us < r1 && hs < nhb) {
            const double sv = dot * sc;
            S[(i64)(hb + hs) * s_stride + r + us] = sv;
            mown = fmax(mown, sv);
        }
    }
    mown = fmax(mown, __shfl_xor_sync(0xffffffffu, mown, 1));
    mown = fmax(mown, __shfl_xor_sync(0xffffffffu, mown, 2));
    if (us == 0) s_m[warp][hs] = mown;
    __syncthreads();
    if (threadIdx.x < nhb) {
        double m = s_m[0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < ATS_WARPS; w++) m = fmax(m, s_m[w][threadIdx.x]);
        pm[(i64)(hb + threadIdx.x) * gridDim.x + blockIdx.x] = m;
    }
}

// Σ_r p·v for a (8 heads, 64 dims, row split) block — p = exp(s − max) with the max of the sink
// and all scores (from pm), den = exp(sink − max) + Σ p — the block's partial into part, then
// the last of the splits of (heads, dims) adds them up and writes the heads with the inverse
// RoPE (and, with q8s, their Q8_0 activation for out_a). grid (ceil(nh/8), hd/64, splits),
// block 256 (2 per SM): warp w computes the probabilities of head w, then takes every 8th row
// of the tile for all 8 heads (each value converted to f64 once). The tile's scores and row
// values are loaded before the max is known (one dependent round trip less per tile); a tile
// of 160 rows covers a split of Flash's 512 + 128 rows at 4 splits.
// part: [nh][splits][hd + 8] doubles (acc, then the den of each 64-dim slice).
#define ATO_U 20
#define ATO_T (ATO_U * ATT_DEC_HPB)

extern "C" __global__ void __launch_bounds__(256, 2) ds4_attn_dec_out(
    const double* S, i64 s_stride, const double* pm, int nch, const float* ring, int raw_cap,
    int window, const float* comp, int ratio, int has_indexer, const int* isel, int topk,
    const float* sinks, int nh, int hd, int n_rot, const double* inv_freq, const int* pos0p,
    double* part, unsigned* ctr, float* heads, i8* q8s, float* q8d) {
    PDL_ENTRY();
    __shared__ double s_p[ATT_DEC_HPB][ATO_T];
    __shared__ double s_m[ATT_DEC_HPB];
    __shared__ double s_red[ATT_DEC_HPB][ATT_DEC_HPB][64];
    const unsigned FULL = 0xffffffffu;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hbase = blockIdx.x * ATT_DEC_HPB;
    const int nhb = min(ATT_DEC_HPB, nh - hbase);
    const int ds = blockIdx.y, nds = gridDim.y;
    const int split = blockIdx.z, ns = gridDim.z;
    const int rec = hd + 8;
    // Warp w computes the probabilities of head hbase + w (when there is one).
    const bool hon = warp < nhb;
    const int hw = hbase + (hon ? warp : 0);
    double mpart = -INFINITY;
    if (hon) {
#pragma unroll 2
        for (int c = lane; c < nch; c += 32) mpart = fmax(mpart, pm[(i64)hw * nch + c]);
    }
    const double sink = (double)sinks[hw];
    const i64 p = (i64)*pos0p;
    const AttRows a = att_rows(ring, raw_cap, window, comp, ratio, has_indexer, isel, topk, hd, p);
    const i64 rs0 = (unsigned)a.R * split / ns, rs1 = (unsigned)a.R * (split + 1) / ns;
    const int d0 = ds * 64 + 2 * lane;
    double acc[ATT_DEC_HPB][2];
#pragma unroll
    for (int hh = 0; hh < ATT_DEC_HPB; hh++) acc[hh][0] = acc[hh][1] = 0.0;
    double den = 0.0, m = 0.0;
    bool have_m = false;
    // The max of the sink and every chunk maximum (after the first tile's loads are issued).
    auto get_m = [&]() {
        m = fmax(sink, warp_max_d(mpart));
        if (hon && lane == 0) s_m[warp] = m;
        have_m = true;
    };
    for (i64 t0 = rs0; t0 < rs1; t0 += ATO_T) {
        const int nt = (int)((rs1 - t0) < ATO_T ? (rs1 - t0) : ATO_T);
        // Issue the tile's loads first: this warp's head scores and its rows warp + 8·u.
        double sv[(ATO_T + 31) / 32];
#pragma unroll
        for (int k = 0; k < (ATO_T + 31) / 32; k++) {
            const int i = lane + 32 * k;
            sv[k] = (hon && i < nt) ? S[(i64)hw * s_stride + t0 + i] : 0.0;
        }
        const int ir = warp + ATT_DEC_HPB * lane;
        const float* rp = (lane < ATO_U && ir < nt) ? att_row(a, t0 + ir) : ring;
        float2 v[ATO_U];
#pragma unroll
        for (int u = 0; u < ATO_U; u++) {
            const float* pu = (const float*)__shfl_sync(FULL, (unsigned long long)rp, u);
            v[u] = warp + ATT_DEC_HPB * u < nt ? *(const float2*)(pu + d0) : make_float2(0.0f, 0.0f);
        }
        if (!have_m) get_m();
        if (hon) {
#pragma unroll
            for (int k = 0; k < (ATO_T + 31) / 32; k++) {
                const int i = lane + 32 * k;
                if (i < nt) {
                    const double pr = exp(sv[k] - m);
                    s_p[warp][i] = pr;
                    den += pr;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < ATO_U; u++) {
            const int ii = warp + ATT_DEC_HPB * u;
            if (ii < nt) {
                const double x0 = (double)v[u].x, x1 = (double)v[u].y;
#pragma unroll
                for (int hh = 0; hh < ATT_DEC_HPB; hh++) {
                    if (hh < nhb) {
                        const double pr = s_p[hh][ii];
                        acc[hh][0] += pr * x0;
                        acc[hh][1] += pr * x1;
                    }
                }
            }
        }
        __syncthreads();
    }
    if (!have_m) get_m();
    den = warp_sum_d(den);
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < ATT_DEC_HPB; hh++) {
        s_red[warp][hh][2 * lane] = acc[hh][0];
        s_red[warp][hh][2 * lane + 1] = acc[hh][1];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nhb * 64; i += blockDim.x) {
        const int hh = i >> 6, dd = i & 63;
        double t = 0.0;
#pragma unroll
        for (int w = 0; w < ATT_DEC_HPB; w++) t += s_red[w][hh][dd];
        part[((i64)(hbase + hh) * ns + split) * rec + ds * 64 + dd] = t;
    }
    if (warp < nhb && lane == 0) part[((i64)(hbase + warp) * ns + split) * rec + hd + ds] = den;
    if (!arrive_last(ctr + blockIdx.x * nds + ds, (unsigned)ns)) return;
    // The last split block of these heads and dims: add the splits up (in split order).
    {
        const int hh = threadIdx.x >> 5;
        if (hh >= nhb) return;
        const int h = hbase + hh;
        const double* ph = part + (i64)h * ns * rec;
        double a0 = 0.0, a1 = 0.0, dn = exp((double)sinks[h] - s_m[hh]);
        for (int sp = 0; sp < ns; sp++) {
            a0 += __ldcg(ph + (i64)sp * rec + d0);
            a1 += __ldcg(ph + (i64)sp * rec + d0 + 1);
            dn += __ldcg(ph + (i64)sp * rec + hd + ds);
        }
        const double inv = 1.0 / dn;
        float o0 = (float)(a0 * inv), o1 = (float)(a1 * inv);
        if (d0 >= hd - n_rot) {
            float c, s;
            rope_cs(inv_freq, (d0 - (hd - n_rot)) >> 1, p, &c, &s);
            rope_pair(&o0, &o1, c, s, true);
        }
        float* out = heads + (i64)h * hd + d0;
        out[0] = o0;
        out[1] = o1;
        if (q8s) {
            // Q8_0 of the two 32-blocks of this 64-dim slice (ds4_quant_q8_0's numerics and
            // layout: qs[i], d[i / 32]; lanes 0–15 hold the first block, 16–31 the second).
            float am = 0.f;
            const float x0 = fabsf(o0), x1 = fabsf(o1);
            if (x0 > am) am = x0;  // NaN never wins (CPU: `a > amax` is false)
            if (x1 > am) am = x1;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
            const float dd = am / 127.0f;
            const float id = dd != 0.f ? 1.0f / dd : 0.f;
            const i64 e = (i64)h * hd + d0;
            const u32 word = (u32)(q8_round(o0, id) & 255) | ((u32)(q8_round(o1, id) & 255) << 8);
            *reinterpret_cast<unsigned short*>(q8s + e) = (unsigned short)word;
            if ((lane & 15) == 0) q8d[e >> 5] = dd;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Indexer scores (ops::indexer_scores), bit-exact with the CPU: block of nih·4 threads, thread
// (h, k) holds q_h[4j + k] in registers and runs the CPU's dot_f64 accumulator k over a tile of
// rows; lanes k = 0..3 then combine (acc0 + acc1) + (acc2 + acc3) and one thread per row sums
// the heads in order. Needs ihd % 4 == 0, ihd ≤ 128, nih % 8 == 0, nih·4 ≤ 1024.
// grid (blocks, nt); dynamic shared: IDX4_TILE·4·(ihd/4 + 2) + IDX4_TILE·nih doubles.

#define IDX4_TILE 16
#define IDX4_MAXQ 32

extern "C" __global__ void __launch_bounds__(256) ds4_indexer_scores4(const float* iq, const float* iw, const float* icomp,
                                               int nih, int ihd, int ratio, int topk,
                                               const int* pos0p, int t0, float* scores,
                                               i64 sstride) {
    PDL_ENTRY();
    extern __shared__ double smem_d[];
    const int t = t0 + blockIdx.y;
    const i64 p = (i64)*pos0p + t;
    const i64 nv = (p + 1) / ratio;
    if (nv <= topk) return;
    const i64 n_tiles = (nv + IDX4_TILE - 1) / IDX4_TILE;
    if ((i64)blockIdx.x >= n_tiles) return;
    const int nq = ihd / 4, ks = nq + 2;
    double* s_k = smem_d;                   // [IDX4_TILE·4][ks]: row r, lane k, element j
    double* s_t = s_k + IDX4_TILE * 4 * ks;  // [IDX4_TILE][nih]
    const int h = threadIdx.x >> 2, kk = threadIdx.x & 3;
    const float* qh = iq + ((i64)t * nih + h) * ihd;
    double qv[IDX4_MAXQ];
#pragma unroll
    for (int j = 0; j < IDX4_MAXQ; j++) qv[j] = j < nq ? (double)qh[4 * j + kk] : 0.0;
    const double wh = (double)iw[(i64)t * nih + h];
    float* out = scores + (i64)blockIdx.y * sstride;
    for (i64 tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const i64 r0 = tile * IDX4_TILE;
        __syncthreads();
        for (int i = threadIdx.x; i < IDX4_TILE * ihd; i += blockDim.x) {
            const int r = i / ihd, c = i % ihd;
            const i64 row = r0 + r;
            const float v = row < nv ? icomp[row * ihd + c] : 0.0f;
            s_k[(r * 4 + (c & 3)) * ks + (c >> 2)] = (double)v;
        }
        __syncthreads();
        for (int r = 0; r < IDX4_TILE; r += 4) {
            double acc[4] = {0.0, 0.0, 0.0, 0.0};
            const double* kp = s_k + (r * 4 + kk) * ks;
#pragma unroll
            for (int j = 0; j < IDX4_MAXQ; j++) {
                if (j < nq) {
#pragma unroll
                    for (int u = 0; u < 4; u++) acc[u] = fma(qv[j], kp[u * 4 * ks + j], acc[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const double b = acc[u] + __shfl_xor_sync(0xffffffffu, acc[u], 1);
                const double d = b + __shfl_xor_sync(0xffffffffu, b, 2);
                if (kk == 0) s_t[(r + u) * nih + h] = d > 0.0 ? wh * d : 0.0;
            }
        }
        __syncthreads();
        if (threadIdx.x < IDX4_TILE) {
            const int r = threadIdx.x;
            if (r0 + r < nv) {
                double acc = 0.0;
                for (int hh = 0; hh < nih; hh++) acc += s_t[r * nih + hh];
                out[r0 + r] = (float)acc;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Indexer scores on the FP64 tensor cores (DMMA `mma.sync.m16n8k8.f64`), exact under the
// numerics contract: q and k are f32, so every product q_i·k_i is exact in f64 and each dot is an
// f64 sum of exact products (only its order differs from ops::dot_f64); relu·w and the head sum
// run in f64 (w·d rounded as the CPU does, -fmad=false), one rounding to f32 at the end.
//
// Shape: nih = IDXM_NIH (64) heads of ihd = IDXM_IHD (128). One block = TPB adjacent tokens
// (blockIdx.y) and the row tiles blockIdx.x, +gridDim.x, ... of R rows (up to the rows its last
// token sees). The tokens' 64×128 queries are converted to f64 once into shared memory; each row
// tile is staged (f32 → f64) into shared memory, the next tile's f32 values are prefetched into
// registers while the tensor cores run. 8 warps: warp w takes token (w>>1)%TPB, heads
// 32·(w&1)..+32 (two m16 tiles) × rows 8·NI·rg..+8·NI (NI n8 tiles, rg = w/(2·TPB)), so
// R = 32·NI/TPB. Epilogue: relu·w per (head, row), summed over the warp's heads in registers and
// shuffles, the two head halves added through shared memory; a token writes only its own rows
// (r < nv(t)) and only when nv(t) > topk.
// Dynamic shared: ((TPB·64 + R)·IDXM_QS + 2·TPB·R) doubles.

#define IDXM_NIH 64
#define IDXM_IHD 128
#define IDXM_QS (IDXM_IHD + 4)

__device__ __forceinline__ void dmma_16x8x8(double* c, const double* a, const double* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+d"(c[0]), "+d"(c[1]), "+d"(c[2]), "+d"(c[3])
        : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
}

__device__ __forceinline__ void idxm_store4(double* dst, float4 v) {
    double2* d2 = (double2*)dst;
    d2[0] = make_double2((double)v.x, (double)v.y);
    d2[1] = make_double2((double)v.z, (double)v.w);
}

template <int NI, int TPB>
__device__ __forceinline__ void idxm_body(const float* __restrict__ iq, const float* __restrict__ iw,
                                          const float* __restrict__ icomp, int ratio, int topk,
                                          const int* pos0p, int t0, int nt, float* scores,
                                          i64 sstride, int by) {
    constexpr int RG = 4 / TPB;                          // warp row groups
    constexpr int R = RG * 8 * NI;                       // rows per tile
    constexpr int NPF = R * IDXM_IHD / 1024;             // float4 of k per thread per tile
    constexpr int TQ4 = IDXM_NIH * IDXM_IHD / 4;         // float4 of q per token
    constexpr int NQ4 = TPB * TQ4 / 256;                 // float4 of q per thread
    extern __shared__ double smem_d[];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int hw = w & 1, tk = (w >> 1) % TPB, rg = w / (2 * TPB);
    const int tb = TPB * by;              // the block's first token (index into scores)
    const int nb = TPB == 1 ? 1 : min(TPB, nt - tb);  // the block's tokens
    // The tokens' queries and head weights do not depend on the position. With one row group
    // of tiles (decode, latency-bound) the query loads go out together with the position's and
    // the first tile's; the chunk kernels stage them before the tile prefetch (registers).
    constexpr bool early_q = NI == 1;
    float4 qv[NQ4];
    auto load_q = [&]() {
        const float4* q4 = (const float4*)(iq + (i64)(t0 + tb) * IDXM_NIH * IDXM_IHD);
#pragma unroll
        for (int j = 0; j < NQ4; j++) {
            const int i = tid + 256 * j;
            qv[j] = (TPB == 1 || i < nb * TQ4) ? __ldg(q4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    if (early_q) load_q();
    double wv[2][2];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wv[mi][j] = tk < nb ? (double)__ldg(iw + (i64)(t0 + tb + tk) * IDXM_NIH + 32 * hw +
                                                16 * mi + 8 * j + g)
                                : 0.0;
    // 32-bit position arithmetic (contexts are far below 2^31 tokens; fewer registers).
    const int p0 = *pos0p + t0 + tb;   // position of the block's first token
    const int nv = (p0 + nb) / ratio;  // rows seen by its last token (the most)
    if (nv <= topk) return;
    const int n_tiles = (nv + R - 1) / R;
    if ((int)blockIdx.x >= n_tiles) return;
    double* s_q = smem_d;                         // [TPB·64][QS]
    double* s_k = s_q + TPB * IDXM_NIH * IDXM_QS; // [R][QS]
    double* s_red = s_k + R * IDXM_QS;            // [TPB·2][R]
    float4 pf[NPF];
    auto fetch = [&](int tile) {
        const int r0 = tile * R;
#pragma unroll
        for (int j = 0; j < NPF; j++) {
            const int e = 4 * (tid + 256 * j);
            const int row = r0 + e / IDXM_IHD;
            pf[j] = row < nv ? __ldg((const float4*)(icomp + (i64)row * IDXM_IHD + (e % IDXM_IHD)))
                             : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto store_q = [&]() {
#pragma unroll
        for (int j = 0; j < NQ4; j++) {
            const int e = 4 * (tid + 256 * j);
            idxm_store4(s_q + (e / IDXM_IHD) * IDXM_QS + (e % IDXM_IHD), qv[j]);
        }
    };
    if (!early_q) {
        load_q();
        store_q();
    }
    fetch(blockIdx.x);
    if (early_q) store_q();
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const int r0 = tile * R;
        __syncthreads();  // the previous tile's readers of s_k / s_red are done
#pragma unroll
        for (int j = 0; j < NPF; j++) {
            const int e = 4 * (tid + 256 * j);
            idxm_store4(s_k + (e / IDXM_IHD) * IDXM_QS + (e % IDXM_IHD), pf[j]);
        }
        __syncthreads();
        if (tile + (int)gridDim.x < n_tiles) fetch(tile + gridDim.x);
        double acc[2][NI][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < NI; ni++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[mi][ni][c] = 0.0;
        const double* qa = s_q + (tk * IDXM_NIH + 32 * hw + g) * IDXM_QS + tig;
        const double* kb = s_k + (8 * NI * rg + g) * IDXM_QS + tig;
#pragma unroll
        for (int k0 = 0; k0 < IDXM_IHD; k0 += 8) {
            double a[2][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const double* pa = qa + 16 * mi * IDXM_QS + k0;
                a[mi][0] = pa[0];
                a[mi][1] = pa[8 * IDXM_QS];
                a[mi][2] = pa[4];
                a[mi][3] = pa[8 * IDXM_QS + 4];
            }
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const double* pb = kb + 8 * ni * IDXM_QS + k0;
                b[ni][0] = pb[0];
                b[ni][1] = pb[4];
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) dmma_16x8x8(acc[mi][ni], a[mi], b[ni]);
        }
        // acc[mi][ni][c]: token tk, head 32·hw + 16·mi + g + 8·(c >> 1),
        // row 8·NI·rg + 8·ni + 2·tig + (c & 1).
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                double s = 0.0;
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const double d = acc[mi][ni][2 * j + e];
                        if (d > 0.0) s += wv[mi][j] * d;
                    }
                }
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                s += __shfl_xor_sync(0xffffffffu, s, 8);
                s += __shfl_xor_sync(0xffffffffu, s, 16);
                if (g == 0) s_red[(2 * tk + hw) * R + 8 * NI * rg + 8 * ni + 2 * tig + e] = s;
            }
        }
        __syncthreads();
        if (TPB == 1) {
            float* out = scores + (i64)tb * sstride + r0;
            for (int r = tid; r < R; r += 256)
                if (r0 + r < nv) out[r] = (float)(s_red[r] + s_red[R + r]);
        } else for (int i = tid; i < TPB * R; i += 256) {
            const int k = i / R, r = i % R;
            const int nvk = (p0 + k + 1) / ratio;
            if (k < nb && nvk > topk && r0 + r < nvk)
                scores[(i64)(tb + k) * sstride + r0 + r] =
                    (float)(s_red[2 * k * R + r] + s_red[(2 * k + 1) * R + r]);
        }
    }
}

// Decode / small batches: one token per block, row tiles of 32 (≈ nv/32 blocks per token).
extern "C" __global__ void __launch_bounds__(256) ds4_indexer_mma32(
    const float* iq, const float* iw, const float* icomp, int ratio, int topk, const int* pos0p,
    int t0, int nt, float* scores, i64 sstride) {
    PDL_ENTRY();
    idxm_body<1, 1>(iq, iw, icomp, ratio, topk, pos0p, t0, nt, scores, sstride, blockIdx.y);
}

// Chunks: one token per block, row tiles of 128 (one block walks all the token's tiles).
extern "C" __global__ void __launch_bounds__(256, 1) ds4_indexer_mma128(
    const float* iq, const float* iw, const float* icomp, int ratio, int topk, const int* pos0p,
    int t0, int nt, float* scores, i64 sstride) {
    PDL_ENTRY();
    idxm_body<4, 1>(iq, iw, icomp, ratio, topk, pos0p, t0, nt, scores, sstride, blockIdx.y);
}

// Chunks: two adjacent tokens per block share each row tile of 64 (half the row staging per
// product of ds4_indexer_mma128).
extern "C" __global__ void __launch_bounds__(256, 1) ds4_indexer_mma2x64(
    const float* iq, const float* iw, const float* icomp, int ratio, int topk, const int* pos0p,
    int t0, int nt, float* scores, i64 sstride) {
    PDL_ENTRY();
    idxm_body<4, 2>(iq, iw, icomp, ratio, topk, pos0p, t0, nt, scores, sstride, blockIdx.y);
}

// ---------------------------------------------------------------------------------------------
// Indexer scores on the int8 tensor cores (`mma.sync.m16n8k32.s8.s8.s32`), bit-identical to
// ds4_indexer_mma2x64 (and so to ops::indexer_scores) whenever every operand row is an int8
// code row times a power of two, which the QAT (Hadamard + FP4 E2M1 with a power-of-two scale
// per 32-block, §3.6.1) makes true for the query heads and the compressed rows: an FP4 value is
// (2v)·scale/2 with 2v ∈ {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}, and a row whose block scales span at
// most a factor 8 fits one exponent e per row with |code| ≤ 127 (f16 rounding of the stored
// rows keeps this true: it only rounds to coarser multiples of 2^-24).
//
// Exactness: with q_h = Q·2^eq and k_c = K·2^ek (Q, K int8 codes), q_h·k_c = I·2^(eq+ek) where
// I = Σ Q_i·K_i is an exact int32 (|I| ≤ 128·127² < 2^21). The f64 reference sums the exact
// products Q_i·K_i·2^(eq+ek): every partial sum is a multiple of 2^(eq+ek) below 2^21 of it,
// so it is exact in any order and equals I·2^(eq+ek). The epilogue then rounds w·d as the
// reference does: w' = w·2^eq and d' = I·2^ek are exact, w'·d' has the real value of w·d, so
// it rounds to the same f64. Heads are summed in mma2x64's order (per thread 4 heads in
// sequence, a pairwise tree over the 8 lane groups, then the two 32-head halves).
//
// ds4_idx8_prep converts the rows (query heads of the batch, compressed rows visible to its
// last token) into codes + exponent and writes one flag per block (1: some row is not of that
// form: QAT off, NaN/inf, a wide exponent spread). ds4_indexer_i8 runs only when every flag is
// 0; ds4_indexer_mma2x64_fb (the FP64 kernel, y-strided) only when one is set.

#define IDX8_SLOTS 1024
#define IDX8_KS 144  // shared row stride of the code tiles (bytes): conflict-free LDS.128

__device__ __forceinline__ double idx8_pow2(int e) {
    return __longlong_as_double((long long)(1023 + e) << 52);
}

// One warp per row of 128 floats: codes[row][128] = x·2^-e (int8), e per row (exponent of the
// lowest set bit over the row; all-zero rows: 0). Returns true when the row is not exact.
__device__ __forceinline__ bool idx8_row(const float* __restrict__ src, i8* __restrict__ codes,
                                         int* e_out) {
    const int lane = threadIdx.x & 31;
    const float4 v = __ldg((const float4*)src + lane);
    const float xs[4] = {v.x, v.y, v.z, v.w};
    int lo = 1 << 20, hi = -(1 << 20);
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 u = __float_as_uint(xs[i]);
        if ((u & 0x7fffffffu) == 0) continue;
        const int E = (u >> 23) & 255;
        const u32 M = u & 0x7fffffu;
        if (E == 255) {
            bad = true;
            continue;
        }
        int l, h;
        if (E) {
            l = E - 150 + __ffs(M | 0x800000u) - 1;
            h = E - 127;
        } else {
            l = -149 + __ffs(M) - 1;
            h = -149 + 31 - __clz(M);
        }
        lo = min(lo, l);
        hi = max(hi, h);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    bad = __any_sync(0xffffffffu, bad);
    const bool any = hi > -(1 << 20);
    if (any && hi - lo > 6) bad = true;  // |code| < 2^(hi-lo+1) must stay ≤ 127
    const int e = (any && !bad) ? lo : 0;
    u32 word = 0;
    if (!bad) {
        const double s = idx8_pow2(-e);
#pragma unroll
        for (int i = 0; i < 4; i++) word |= ((u32)__double2int_rz((double)xs[i] * s) & 255u) << (8 * i);
    }
    ((u32*)codes)[lane] = word;
    if (lane == 0) *e_out = e;
    return bad;
}

// Query heads of the tokens t0..t0+nt-1 that are scored (they see more than topk rows; rows
// of iq from token t0) and the compressed rows 0..nv-1, nv = (pos + t0 + nt) / ratio. Grid
// IDX8_SLOTS blocks of 256 threads, every block writes slots[blockIdx.x].
extern "C" __global__ void __launch_bounds__(256) ds4_idx8_prep(
    const float* __restrict__ iq, const float* __restrict__ icomp, int ratio, int topk,
    const int* pos0p, int t0, int nt, i8* __restrict__ q8, int* __restrict__ qe,
    i8* __restrict__ k8, double* __restrict__ ks, int* __restrict__ slots) {
    PDL_ENTRY();
    const int pb = *pos0p + t0;  // position of the batch's first token
    const int nv = (pb + nt) / ratio;
    const int nq = nt * IDXM_NIH;
    // First scored token: (pb + t + 1) / ratio > topk.
    const int tf = min(nt, max(0, (topk + 1) * ratio - 1 - pb));
    const int q0 = tf * IDXM_NIH;
    const int total = nv > topk ? nq - q0 + nv : 0;
    const int warps = gridDim.x * 8;
    bool bad = false;
    for (int i = blockIdx.x * 8 + (threadIdx.x >> 5); i < total; i += warps) {
        const int r = q0 + i;
        if (r < nq) {
            bad |= idx8_row(iq + ((i64)t0 * IDXM_NIH + r) * IDXM_IHD, q8 + (i64)r * IDXM_IHD, qe + r);
        } else {
            const int c = r - nq;
            int e;
            bad |= idx8_row(icomp + (i64)c * IDXM_IHD, k8 + (i64)c * IDXM_IHD, &e);
            if ((threadIdx.x & 31) == 0) ks[c] = idx8_pow2(e);
        }
    }
    const int any = __syncthreads_or(bad);
    if (threadIdx.x == 0) slots[blockIdx.x] = any;
}

__device__ __forceinline__ bool idx8_any_bad(const int* slots) {
    int b = 0;
    for (int i = threadIdx.x; i < IDX8_SLOTS; i += blockDim.x) b |= __ldcg(slots + i);
    return __syncthreads_or(b) != 0;
}

__device__ __forceinline__ void imma_16x8x32(int* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async_zfill(void* dst, const void* src, int bytes, int src_bytes) {
    if (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                     "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                     "r"(src_bytes)
                     : "memory");
}

// Geometry of ds4_indexer_mma2x64: block = 2 adjacent tokens (blockIdx.y) × row tiles of 64
// (blockIdx.x, +gridDim.x, ...); warp w: token tk = (w>>1)&1, heads 32·(w&1)..+32 (two m16
// tiles, query codes held in registers), rows 32·(w>>2)..+32 (four n8 tiles). The k dimension
// is permuted identically for both operands (MMA step s, register half j of lane group tig
// covers the 4 bytes at word 8·tig + 2·s + j), so a lane's B operand of one n8 tile is two
// LDS.128. Code tiles are double-buffered with cp.async (rows past nv zero-filled).
// BL: branch-free epilogue (relu as a select of +0.0: s never is -0.0, so adding +0.0 where
// the reference skips leaves it unchanged).
template <bool BL>
__device__ __forceinline__ void idx8_body(
    const i8* __restrict__ q8, const int* __restrict__ qe, const float* __restrict__ iw,
    const i8* __restrict__ k8, const double* __restrict__ ks, const int* __restrict__ slots,
    int ratio, int topk, const int* pos0p, int t0, int nt, float* scores, i64 sstride) {
    constexpr int R = 64;
    __shared__ __align__(16) unsigned char s_k[2][R * IDX8_KS];
    __shared__ __align__(16) double s_ks[2][R];
    __shared__ double s_part[2][2][R][9];  // [token][head half][row][lane group] (+1 pad)
    if (idx8_any_bad(slots)) return;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int hw = w & 1, tk = (w >> 1) & 1, rg = w >> 2;
    const int tb = 2 * blockIdx.y;
    const int nb = min(2, nt - tb);
    const int p0 = *pos0p + t0 + tb;
    const int nv = (p0 + nb) / ratio;
    if (nv <= topk) return;
    const int n_tiles = (nv + R - 1) / R;
    if ((int)blockIdx.x >= n_tiles) return;
    auto stage = [&](int tile, int buf) {
        const int r0 = tile * R;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int c = tid + 256 * j;
            const int r = c >> 3, part = c & 7;
            const int row = r0 + r;
            const bool ok = row < nv;
            cp_async_zfill(&s_k[buf][r * IDX8_KS + part * 16], k8 + (i64)(ok ? row : 0) * IDXM_IHD + part * 16,
                           16, ok ? 16 : 0);
        }
        if (tid < R) {
            const int row = r0 + tid;
            const bool ok = row < nv;
            cp_async_zfill(&s_ks[buf][tid], ks + (ok ? row : 0), 8, ok ? 8 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    stage(blockIdx.x, 0);
    // Query codes (A operands) and w' = w·2^eq of this lane's four heads.
    u32 a[2][4][4];
    double wq[2][2];
    {
        const bool tok = tk < nb;
        const int tq = tb + tk;  // token index within the batch
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int h = 32 * hw + 16 * mi + 8 * j + g;
                const uint4* src = (const uint4*)(q8 + ((i64)tq * IDXM_NIH + h) * IDXM_IHD) + 2 * tig;
                const uint4 x0 = tok ? __ldg(src) : make_uint4(0, 0, 0, 0);
                const uint4 x1 = tok ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
                // step s, half jj: word 8·tig + 2s + jj → a[mi][s][2·jj + j]
                const u32 wd[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    a[mi][s][j] = wd[2 * s];
                    a[mi][s][2 + j] = wd[2 * s + 1];
                }
                wq[mi][j] = tok ? __dmul_rn((double)__ldg(iw + (i64)(t0 + tq) * IDXM_NIH + h),
                                            idx8_pow2(__ldg(qe + (i64)tq * IDXM_NIH + h)))
                                : 0.0;
            }
        }
    }
    const double CM = 6755401588539392.0;  // 2^52 + 2^51 + 2^31
    int it = 0;
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x, it++) {
        const int buf = it & 1;
        const int r0 = tile * R;
        if (tile + (int)gridDim.x < n_tiles) {
            stage(tile + gridDim.x, buf ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        int acc[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[mi][ni][c] = 0;
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const uint4* bp = (const uint4*)&s_k[buf][(32 * rg + 8 * ni + g) * IDX8_KS] + 2 * tig;
            const uint4 b0 = bp[0], b1 = bp[1];
            const u32 bw[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int s = 0; s < 4; s++)
#pragma unroll
                for (int mi = 0; mi < 2; mi++) imma_16x8x32(acc[mi][ni], a[mi][s], bw[2 * s], bw[2 * s + 1]);
        }
        // acc[mi][ni][c]: head 32·hw + 16·mi + g + 8·(c >> 1), row 32·rg + 8·ni + 2·tig + (c & 1).
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int r = 32 * rg + 8 * ni + 2 * tig + e;
                const double sk = s_ks[buf][r];
                const double nc = -CM * sk;
                double s = 0.0;
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int I = acc[mi][ni][2 * j + e];
                        if (BL) {
                            const double m = __hiloint2double(0x43380000, I ^ (int)0x80000000);
                            const double d = __fma_rn(m, sk, nc);  // = I·2^ek exactly
                            const double pr = __dmul_rn(wq[mi][j], d);
                            s = __dadd_rn(s, I > 0 ? pr : 0.0);
                        } else if (I > 0) {
                            const double m = __hiloint2double(0x43380000, I ^ (int)0x80000000);
                            const double d = __fma_rn(m, sk, nc);  // = I·2^ek exactly
                            s = __dadd_rn(s, __dmul_rn(wq[mi][j], d));
                        }
                    }
                }
                s_part[tk][hw][r][g] = s;
            }
        }
        __syncthreads();
        if (tid < 2 * R) {
            const int k = tid / R, r = tid % R;
            const int nvk = (p0 + k + 1) / ratio;
            if (k < nb && nvk > topk && r0 + r < nvk) {
                double t2[2];
#pragma unroll
                for (int h2 = 0; h2 < 2; h2++) {
                    const double* v = s_part[k][h2][r];
                    t2[h2] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
                }
                scores[(i64)(tb + k) * sstride + r0 + r] = (float)(t2[0] + t2[1]);
            }
        }
    }
}

#define IDX8_KERNEL(name, minb, bl)                                                              \
    extern "C" __global__ void __launch_bounds__(256, minb) name(                                \
        const i8* __restrict__ q8, const int* __restrict__ qe, const float* __restrict__ iw,     \
        const i8* __restrict__ k8, const double* __restrict__ ks, const int* __restrict__ slots, \
        int ratio, int topk, const int* pos0p, int t0, int nt, float* scores, i64 sstride) { PDL_ENTRY(); \
        idx8_body<bl>(q8, qe, iw, k8, ks, slots, ratio, topk, pos0p, t0, nt, scores, sstride);   \
    }
// Variants (IdxKernel::Int8 picks one, see fwd.rs): 2 or 3 blocks per SM, branch or select.
IDX8_KERNEL(ds4_indexer_i8, 2, false)
IDX8_KERNEL(ds4_indexer_i8_b3, 3, false)
IDX8_KERNEL(ds4_indexer_i8_bl, 2, true)
IDX8_KERNEL(ds4_indexer_i8_b3bl, 3, true)

// ds4_indexer_mma2x64 behind the int8 kernel: runs only when ds4_idx8_prep flagged a row, over
// the token pairs blockIdx.y, +gridDim.y, ... (a short grid: the common no-op case is cheap).
extern "C" __global__ void __launch_bounds__(256, 1) ds4_indexer_mma2x64_fb(
    const float* iq, const float* iw, const float* icomp, int ratio, int topk, const int* pos0p,
    int t0, int nt, float* scores, i64 sstride, const int* slots) {
    PDL_ENTRY();
    if (!idx8_any_bad(slots)) return;
    const int gy = (nt + 1) / 2;
    for (int by = blockIdx.y; by < gy; by += gridDim.y) {
        idxm_body<4, 2>(iq, iw, icomp, ratio, topk, pos0p, t0, nt, scores, sstride, by);
        __syncthreads();
    }
}

// Chunk (prefill) fast paths of the HC and Q-head kernels. Same numerics as ds4_hc_pre /
// ds4_hc_post / ds4_head_norm_rope (every element is computed by the same expressions, only
// the f64 sum of squares is added in another order), restructured for bandwidth: each thread
// owns whole float4 columns, issues all of its loads before any arithmetic and keeps its values
// in registers until the final store (no re-read, no shared row). The launchers (fwd.rs) use
// them when hc = 4, e % 4 == 0 and e / 4 ≤ FP_T·FP_U (resp. hd % 4 == 0, hd ≤ 512); other
// shapes take the kernels above.

#define FP_U 4

// HC pre for FP_TOK tokens per block (one warp computes the split of each token, all at once),
// then token by token: xin = Σ pre·x (f64), a = RMSNorm(xin)·w. blockDim = 32·FP_TOK.
#define FP_TOK 8
extern "C" __global__ void __launch_bounds__(256, 2) ds4_hc_pre_fast(
    const float* mix, int nm, const float* scale, const float* base, int iters, float hc_eps,
    const float* __restrict__ x, int e, const float* __restrict__ norm_w, float rms_eps,
    float* post, float* comb, float* __restrict__ xin, float* __restrict__ a, int n,
    i8* __restrict__ q0, float* __restrict__ d0) {
    PDL_ENTRY();
    constexpr int HC = 4;
    __shared__ float s_pre[FP_TOK][HC];
    __shared__ float s_post[FP_TOK][HC];
    __shared__ float s_comb[FP_TOK][HC * HC];
    __shared__ double sh[32];
    const int t0 = blockIdx.x * FP_TOK;
    const int e4 = e >> 2;
    const int T = blockDim.x;
    // Token t0's rows are requested before the splits start.
    float4 xv[HC][FP_U];
    {
        const float4* xt = (const float4*)(x + (i64)t0 * HC * e);
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
            const int c = threadIdx.x + u * T;
#pragma unroll
            for (int h = 0; h < HC; h++) xv[h][u] = c < e4 ? xt[h * e4 + c] : make_float4(0, 0, 0, 0);
        }
    }
    {
        const int w = threadIdx.x >> 5;
        const int t = t0 + w;
        if (w < FP_TOK && t < n) {
            hc_split_warp_t<HC>(mix + (i64)t * nm, scale, base, iters, hc_eps, s_pre[w], s_post[w],
                                s_comb[w]);
            const int lane = threadIdx.x & 31;
            if (lane < HC) post[(i64)t * HC + lane] = s_post[w][lane];
            if (lane < HC * HC) comb[(i64)t * HC * HC + lane] = s_comb[w][lane];
        }
    }
    __syncthreads();
    for (int k = 0; k < FP_TOK; k++) {
        const int t = t0 + k;
        if (t >= n) break;
        double pre[HC];
#pragma unroll
        for (int h = 0; h < HC; h++) pre[h] = (double)s_pre[k][h];
        float4 yv[FP_U];
        double ss = 0.0;
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                double acc = 0.0;
#pragma unroll
                for (int h = 0; h < HC; h++) acc += pre[h] * (double)f4_get(xv[h][u], q);
                const float v = (float)acc;
                f4_set(yv[u], q, v);
                ss += (double)v * (double)v;
            }
        }
        // The next token's rows are requested now (xv is free), ahead of this token's stores
        // and reduction.
        if (k + 1 < FP_TOK && t + 1 < n) {
            const float4* xt = (const float4*)(x + (i64)(t + 1) * HC * e);
#pragma unroll
            for (int u = 0; u < FP_U; u++) {
                const int c = threadIdx.x + u * T;
#pragma unroll
                for (int h = 0; h < HC; h++) xv[h][u] = c < e4 ? xt[h * e4 + c] : make_float4(0, 0, 0, 0);
            }
        }
        if (xin) {
            float4* xo = (float4*)(xin + (i64)t * e);
#pragma unroll
            for (int u = 0; u < FP_U; u++) {
                const int c = threadIdx.x + u * T;
                if (c < e4) xo[c] = yv[u];
            }
        }
        ss = block_sum_d(ss, sh);
        const double s = 1.0 / sqrt(ss / (double)e + (double)rms_eps);
        float4* ao = (float4*)(a + (i64)t * e);
        const float4* w4 = (const float4*)norm_w;
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
            const int c = threadIdx.x + u * T;
            const bool ok = c < e4;
            const float4 wv = ok ? w4[c] : make_float4(0, 0, 0, 0);
            float4 r;
#pragma unroll
            for (int q = 0; q < 4; q++)
                f4_set(r, q, (float)(((double)f4_get(yv[u], q) * s) * (double)f4_get(wv, q)));
            if (ok) ao[c] = r;
            // With q0: `a`'s Q8_0 activation quantization (ds4_quant_q8_0's numerics and
            // layout: q0[t·e + i], d0[(t·e + i) / 32]); a 32-block is the float4s of 8
            // consecutive lanes (e % 32 == 0: a group is wholly in or out of range).
            if (q0) {
                float am = 0.f;
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    const float av = fabsf(f4_get(r, q));
                    if (av > am) am = av;  // NaN never wins (CPU: `a > amax` is false)
                }
#pragma unroll
                for (int o = 4; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
                if (ok) {
                    const float dd = am / 127.0f;
                    const float id = dd != 0.f ? 1.0f / dd : 0.f;
                    u32 word = 0;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        word |= (u32)(q8_round(f4_get(r, q), id) & 255) << (8 * q);
                    }
                    ((u32*)(q0 + (i64)t * e))[c] = word;
                    if ((threadIdx.x & 7) == 0) d0[((i64)t * e >> 5) + (c >> 3)] = dd;
                }
            }
        }
    }
}

// HC post (+ routed sum, + flat RMSNorm): block per token, hc = 4. Same expressions as
// ds4_hc_post: fd = (float)Σ_k routed + f; out[j] = post[j]·fd + Σ_i comb[i][j]·x[i] (f64).
extern "C" __global__ void __launch_bounds__(256, 2) ds4_hc_post_fast(
    const float* __restrict__ f, const float* __restrict__ routed, int k,
    const float* __restrict__ x, const float* __restrict__ post, const float* __restrict__ comb,
    int e, float* __restrict__ xo, float* __restrict__ flat, float eps, double* __restrict__ fscale) {
    PDL_ENTRY();
    constexpr int HC = 4;
    __shared__ double sh[32];
    __shared__ double pj[HC], cm[HC * HC];
    const int t = blockIdx.x;
    const int e4 = e >> 2;
    const int T = blockDim.x;
    const float4* xt = (const float4*)(x + (i64)t * HC * e);
    const float4* ft = (const float4*)(f + (i64)t * e);
    float4 xv[HC][FP_U], fv[FP_U];
#pragma unroll
    for (int u = 0; u < FP_U; u++) {
        const int c = threadIdx.x + u * T;
        const bool ok = c < e4;
#pragma unroll
        for (int i = 0; i < HC; i++) xv[i][u] = ok ? xt[i * e4 + c] : make_float4(0, 0, 0, 0);
        fv[u] = ok ? ft[c] : make_float4(0, 0, 0, 0);
    }
    if (threadIdx.x < HC) pj[threadIdx.x] = (double)post[(i64)t * HC + threadIdx.x];
    if (threadIdx.x < HC * HC) cm[threadIdx.x] = (double)comb[(i64)t * HC * HC + threadIdx.x];
    __syncthreads();
    if (routed && k == 1) {
        // The FFN sublayer's case (moe_down already summed the experts): the routed rows are
        // loaded together, not one round trip per column.
        const float4* rt = (const float4*)(routed + (i64)t * e);
        float4 rv[FP_U];
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
            const int c = threadIdx.x + u * T;
            rv[u] = c < e4 ? rt[c] : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                double acc = 0.0;
                acc += (double)f4_get(rv[u], q);
                f4_set(fv[u], q, (float)acc + f4_get(fv[u], q));
            }
        }
    } else if (routed) {
#pragma unroll
        for (int u = 0; u < FP_U; u++) {
            const int c = threadIdx.x + u * T;
            if (c < e4) {
                double acc[4] = {0.0, 0.0, 0.0, 0.0};
                for (int j = 0; j < k; j++) {
                    const float4 r = ((const float4*)(routed + ((i64)t * k + j) * e))[c];
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[q] += (double)f4_get(r, q);
                }
#pragma unroll
                for (int q = 0; q < 4; q++) f4_set(fv[u], q, (float)acc[q] + f4_get(fv[u], q));
            }
        }
    }
    float4 ov[HC][FP_U];
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < FP_U; u++) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const double fd = (double)f4_get(fv[u], q);
            double xd[HC];
#pragma unroll
            for (int i = 0; i < HC; i++) xd[i] = (double)f4_get(xv[i][u], q);
#pragma unroll
            for (int j = 0; j < HC; j++) {
                double acc = pj[j] * fd;
#pragma unroll
                for (int i = 0; i < HC; i++) acc += cm[i * HC + j] * xd[i];
                const float v = (float)acc;
                f4_set(ov[j][u], q, v);
                ss += (double)v * (double)v;
            }
        }
    }
    float4* ot = (float4*)(xo + (i64)t * HC * e);
#pragma unroll
    for (int u = 0; u < FP_U; u++) {
        const int c = threadIdx.x + u * T;
        if (c < e4) {
#pragma unroll
            for (int j = 0; j < HC; j++) ot[j * e4 + c] = ov[j][u];
        }
    }
    if (!flat && !fscale) return;
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)(HC * e) + (double)eps);
    // fscale: the norm factor per token, for a consumer that forms flat = (float)(xo·s) itself
    // (ds4_tc_skinny_tf32s_*); flat = 0 then skips the rows.
    if (fscale && threadIdx.x == 0) fscale[t] = s;
    if (!flat) return;
    float4* fo = (float4*)(flat + (i64)t * HC * e);
#pragma unroll
    for (int u = 0; u < FP_U; u++) {
        const int c = threadIdx.x + u * T;
        if (c < e4) {
#pragma unroll
            for (int j = 0; j < HC; j++) {
                float4 r;
#pragma unroll
                for (int q = 0; q < 4; q++) f4_set(r, q, (float)((double)f4_get(ov[j][u], q) * s));
                fo[j * e4 + c] = r;
            }
        }
    }
}

// Q heads (per-head no-weight RMSNorm + RoPE) for a block of tokens: block per token, a warp
// per head (head_row_load / head_rms_scale, common.cuh; hd ≤ 512), the token's cos/sin pairs
// computed once into shared memory. Each warp handles two heads at a time. The tensor-core
// attention route can apply the same transform on its Q load instead (attn_tc.cu, `qnorm`).
#define HNR_T 256
#define HNR_MAXPAIRS 256
extern "C" __global__ void __launch_bounds__(HNR_T) ds4_head_norm_rope_fast(
    float* __restrict__ q, int nh, int hd, int n_rot, float eps, const double* inv_freq,
    const int* pos0p) {
    PDL_ENTRY();
    __shared__ float s_c[HNR_MAXPAIRS], s_s[HNR_MAXPAIRS];
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int hd4 = hd >> 2, half = n_rot >> 1, start = hd - n_rot;
    const i64 pos = (i64)*pos0p + t;
    float* qt = q + (i64)t * nh * hd;
    for (int kk = threadIdx.x; kk < half; kk += blockDim.x) {
        float c, s;
        rope_cs(inv_freq, kk, pos, &c, &s);
        s_c[kk] = c;
        s_s[kk] = s;
    }
    __syncthreads();
    for (int h0 = w * 2; h0 < nh; h0 += nw * 2) {
        float4 v[2][4];
#pragma unroll
        for (int r = 0; r < 2; r++) head_row_load(qt + (i64)(h0 + r) * hd, hd, h0 + r < nh, v[r]);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const double s = head_rms_scale(v[r], hd, eps);
            if (h0 + r >= nh) continue;
            float4* row = (float4*)(qt + (i64)(h0 + r) * hd);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int c = lane + 32 * u;
                if (c >= hd4) continue;
                float y[4];
#pragma unroll
                for (int qq = 0; qq < 4; qq++) y[qq] = head_norm(f4_get(v[r][u], qq), s);
#pragma unroll
                for (int p = 0; p < 4; p += 2) {
                    const int d = c * 4 + p;
                    if (d >= start) {
                        const int kk = (d - start) >> 1;
                        rope_pair(&y[p], &y[p + 1], s_c[kk], s_s[kk], false);
                    }
                }
                row[c] = make_float4(y[0], y[1], y[2], y[3]);
            }
        }
    }
}

// RMSNorm of short rows (ds4_rms_norm_rows' numerics): a warp per row, lane l owns float4
// columns l, l+32, ... (dim % 4 == 0, dim ≤ 128·RMSW_U, 16-byte aligned rows), loaded together
// before the f64 sum of squares; 8 rows per 256-thread block, no block barrier.
#define RMSW_U 8
extern "C" __global__ void __launch_bounds__(256) ds4_rms_norm_rows_warp(
    const float* x, i64 xs, const float* w, int dim, float eps, float* out, i64 os, int n) {
    PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const int d4 = dim >> 2;
    const float4* xr = (const float4*)(x + row * xs);
    float4 v[RMSW_U];
#pragma unroll
    for (int u = 0; u < RMSW_U; u++) {
        const int c = lane + 32 * u;
        v[u] = c < d4 ? xr[c] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < RMSW_U; u++)
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const double d = (double)f4_get(v[u], q);
            ss += d * d;
        }
    ss = warp_sum_d(ss);
    const double s = 1.0 / sqrt(ss / (double)dim + (double)eps);
    float4* orow = (float4*)(out + row * os);
#pragma unroll
    for (int u = 0; u < RMSW_U; u++) {
        const int c = lane + 32 * u;
        if (c < d4) {
            const float4 wv = w ? ((const float4*)w)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 r;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                double y = (double)f4_get(v[u], q) * s;
                if (w) y = y * (double)f4_get(wv, q);
                f4_set(r, q, (float)y);
            }
            orow[c] = r;
        }
    }
}

// Decode: RMSNorm of one short row (ds4_rms_norm_rows' numerics; the q_a norm) and, with q0 set,
// its Q8_0 activation quantization for the next projection (ds4_quant_q8_0's numerics). One
// block, a float4 of four consecutive values per thread (dim % 32 == 0, dim ≤ 4096, 16-byte
// aligned), the weights loaded with the row, before the f64 sum of squares.
extern "C" __global__ void __launch_bounds__(1024) ds4_rms_q8_dec(const float* x, const float* w,
                                                                  int dim, float eps, float* out,
                                                                  i8* q0, float* d0) {
    PDL_ENTRY();
    __shared__ double sh[32];
    const int t = threadIdx.x;
    const bool on = t < (dim >> 2);
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 v = on ? ((const float4*)x)[t] : z;
    const float4 wv = (on && w) ? ((const float4*)w)[t] : z;
    double ss = 0.0;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const double d = (double)f4_get(v, q);
        ss += d * d;
    }
    ss = block_sum_d(ss, sh);
    const double s = 1.0 / sqrt(ss / (double)dim + (double)eps);
    float4 r;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        double y = (double)f4_get(v, q) * s;
        if (w) y = y * (double)f4_get(wv, q);
        f4_set(r, q, (float)y);
    }
    if (on) ((float4*)out)[t] = r;
    if (!q0) return;
    // Eight lanes per 32-block (dim % 32 == 0: a group is wholly on or off).
    float am = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const float a = fabsf(f4_get(r, q));
        if (a > am) am = a;  // NaN never wins (CPU: `a > amax` is false)
    }
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
    if (!on) return;
    const float dd = am / 127.0f;
    const float id = dd != 0.f ? 1.0f / dd : 0.f;
    u32 word = 0;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        word |= (u32)(q8_round(f4_get(r, q), id) & 255) << (8 * q);
    }
    ((u32*)q0)[t] = word;
    if ((t & 7) == 0) d0[t >> 3] = dd;
}

// ---------------------------------------------------------------------------------------------
// Greedy pick of a decode step (the host reads 16 bytes instead of the vocabulary's logits):
// the first largest logit and the first largest of the others, i.e. the two best under the
// order (value descending, index ascending) — the host's `argmax` and its one-exclusion form.
// NaN never wins and is flagged (the host then scans the logits itself: its argmax keeps a NaN
// at index 0). The order is total, so the result does not depend on how the scan is split.
// grid PICK_BLOCKS (<= 64) × 256: each block's best two go to part[block], the last block
// (arrive_last on ctr) merges them. part: PICK_BLOCKS records, then PICK_BLOCKS NaN flags.
// out: [best, second, nan seen, 0].
struct __align__(16) Top2 {
    float v0;
    unsigned i0;
    float v1;
    unsigned i1;
};

__device__ __forceinline__ bool pick_before(float va, unsigned ia, float vb, unsigned ib) {
    return va > vb || (va == vb && ia < ib);
}

__device__ __forceinline__ void top2_add(Top2& t, float v, unsigned i) {
    if (pick_before(v, i, t.v0, t.i0)) {
        t.v1 = t.v0;
        t.i1 = t.i0;
        t.v0 = v;
        t.i0 = i;
    } else if (pick_before(v, i, t.v1, t.i1)) {
        t.v1 = v;
        t.i1 = i;
    }
}

// The best two of t and o (disjoint index sets).
__device__ __forceinline__ void top2_merge(Top2& t, const Top2& o) {
    top2_add(t, o.v0, o.i0);
    top2_add(t, o.v1, o.i1);
}

__device__ __forceinline__ void top2_shfl_merge(Top2& t, int o) {
    Top2 u;
    u.v0 = __shfl_xor_sync(0xffffffffu, t.v0, o);
    u.i0 = __shfl_xor_sync(0xffffffffu, t.i0, o);
    u.v1 = __shfl_xor_sync(0xffffffffu, t.v1, o);
    u.i1 = __shfl_xor_sync(0xffffffffu, t.i1, o);
    top2_merge(t, u);
}

extern "C" __global__ void __launch_bounds__(256) ds4_argmax_pick(const float* __restrict__ x, int n,
                                                                 Top2* part, unsigned* ctr, unsigned* out) {
    PDL_ENTRY();
    __shared__ Top2 s_t[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    Top2 t = {-INFINITY, 0xffffffffu, -INFINITY, 0xffffffffu};
    int nan = 0;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = x[i];
        if (v != v) nan = 1;
        else top2_add(t, v, (unsigned)i);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top2_shfl_merge(t, o);
    nan = __syncthreads_or(nan);
    if (lane == 0) s_t[warp] = t;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) top2_merge(t, s_t[w]);
        part[blockIdx.x] = t;
        ((unsigned*)(part + gridDim.x))[blockIdx.x] = (unsigned)nan;
    }
    if (!arrive_last(ctr, gridDim.x)) return;
    if (warp != 0) return;
    Top2 m = {-INFINITY, 0xffffffffu, -INFINITY, 0xffffffffu};
    unsigned nf = 0;
    for (int b = lane; b < (int)gridDim.x; b += 32) {
        // Written by other blocks of this launch: read through L2.
        const uint4 p = __ldcg((const uint4*)(part + b));
        top2_merge(m, Top2{__uint_as_float(p.x), p.y, __uint_as_float(p.z), p.w});
        nf |= __ldcg((const unsigned*)(part + gridDim.x) + b);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top2_shfl_merge(m, o);
    nf = __any_sync(0xffffffffu, nf != 0);
    if (lane == 0) {
        out[0] = m.i0;
        out[1] = m.i1;
        out[2] = nf;
        out[3] = 0;
    }
}
