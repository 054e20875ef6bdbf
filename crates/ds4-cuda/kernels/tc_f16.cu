// The f16 dense route (src/tc_f16.rs): Q8_0 weights and ds4's Q8_0-quantized activations
// (int8 per 32-block with an f32 scale, gemv's quantize_act) dequantized to f16 for a cuBLAS
// GEMM (f16 × f16 → f32 accumulation on the tensor cores).
//
// Scaling: each operand is multiplied by a power of two before its f16 rounding so that its
// bound 127·max|d| (d: the matrix's weight scales, or the activation block scales) lands in
// [2^14, 2^15); products and sums then stay far from f16's subnormal and overflow ranges, and
// the GEMM's alpha = 2^-(e_x + e_w) undoes both exactly. A weight q·d is formed exactly in f32
// (7 + 11 significant bits) and rounded once to f16; an activation q·d_x is formed in f32 and
// rounded to f16.
//
// Calls per GEMM: the scale slots are zeroed (memset), ds4_tcf_absmax takes max|d_x| and
// max|d|, ds4_tcf_convert writes both f16 operands and alpha, cuBLAS runs, and for the shared
// expert ds4_tcf_swiglu forms the SwiGLU of the gate/up product.
#include "common.cuh"

typedef long long i64;
typedef signed char i8;
#define FULL_MASK 0xffffffffu

// slot layout (u32 words): [0] max|x| bits, [1] max|d| bits, [2] alpha (f32), [3] beta = 0.
__device__ __forceinline__ float h2f_(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ void block_max_to(float m, u32* slot) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, o));
    // Non-negative floats order like their bit patterns; NaN (bits above +inf) wins.
    if ((threadIdx.x & 31) == 0 && m > 0.f) atomicMax(slot, __float_as_uint(m));
}

// max|x| over nx floats (the activation block scales) into slot[0]; max|d| over the f16 weight
// scales d0[0..nd0) and d1[0..nd1) into slot[1]. Grid-stride; slot zeroed before.
extern "C" __global__ void __launch_bounds__(256) ds4_tcf_absmax(const float* __restrict__ x, i64 nx,
                                                                 const u16* __restrict__ d0, i64 nd0,
                                                                 const u16* __restrict__ d1, i64 nd1,
                                                                 u32* __restrict__ slot) {
    PDL_ENTRY();
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    float m = 0.f;
    if ((nx & 3) == 0 && ((unsigned long long)x & 15) == 0) {
        for (i64 i = i0; i < nx / 4; i += stride) {
            const float4 v = __ldg((const float4*)x + i);
            m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        }
    } else {
        for (i64 i = i0; i < nx; i += stride) m = fmaxf(m, fabsf(__ldg(x + i)));
    }
    block_max_to(m, slot);
    float md = 0.f;
    for (i64 i = i0; i < nd0 + nd1; i += stride) {
        const u16 h = i < nd0 ? __ldg(d0 + i) : __ldg(d1 + (i - nd0));
        md = fmaxf(md, fabsf(h2f_(h)));
    }
    block_max_to(md, slot + 1);
}

// 2^e with max·2^e in [2^14, 2^15) (e in [-60, 60]; 0 for a zero or non-finite max).
__device__ __forceinline__ int scale_exp(float am) {
    int e = 0;
    if (am > 0.f && am <= 3.4e38f) {
        int ex;
        frexpf(am, &ex);
        e = min(60, max(-60, 15 - ex));
    }
    return e;
}

// Q8_0 32-block b as f16 (q·d·2^e), 8 values for lane part `part` of 4, into dst.
__device__ __forceinline__ void q8_block_f16(const i8* __restrict__ q, float d, u16* __restrict__ dst) {
    const int2 qq = __ldg((const int2*)q);
    u32 o[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int w = k < 2 ? qq.x : qq.y;
        const int s = (k & 1) * 16;
        const float lo = __fmul_rn((float)(signed char)((w >> s) & 0xff), d);
        const float hi = __fmul_rn((float)(signed char)((w >> (s + 8)) & 0xff), d);
        o[k] = f2h(lo) | ((u32)f2h(hi) << 16);
    }
    *(uint4*)dst = make_uint4(o[0], o[1], o[2], o[3]);
}

// Activations: xh = f16(xq·xd·2^ex) for the nx/32 blocks of ds4's Q8_0 activations (xq int8,
// xd f32 per 32; blocks [0, bx) of the grid). Weights: wh = f16(q·d·2^ew) for the Q8_0 blocks
// of up to two matrices (blocks [bx, grid): nb0 blocks of (q0, d0), then nb1 of (q1, d1)).
// Four threads per 32-block, 8 values each. alpha = 2^-(ex+ew) into slot[2].
extern "C" __global__ void __launch_bounds__(256) ds4_tcf_convert(const i8* __restrict__ xq,
                                                                  const float* __restrict__ xd, i64 nx, int bx,
                                                                  const i8* __restrict__ q0, const u16* __restrict__ d0,
                                                                  i64 nb0, const i8* __restrict__ q1,
                                                                  const u16* __restrict__ d1, i64 nb1,
                                                                  u32* slot, u16* __restrict__ xh,
                                                                  u16* __restrict__ wh) {
    PDL_ENTRY();
    // Bounds: |q| ≤ 127 for both operands.
    const int ex = scale_exp(127.f * __uint_as_float(slot[0]));
    const int ew = scale_exp(127.f * __uint_as_float(slot[1]));
    if (blockIdx.x == 0 && threadIdx.x == 0) ((float*)slot)[2] = ldexpf(1.0f, -(ex + ew));
    if ((int)blockIdx.x < bx) {
        const i64 stride = (i64)bx * blockDim.x;
        for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < nx / 8; u += stride) {
            const i64 b = u >> 2;
            q8_block_f16(xq + u * 8, ldexpf(__ldg(xd + b), ex), xh + u * 8);
        }
        return;
    }
    const i64 nbt = nb0 + nb1;
    const i64 stride = (i64)(gridDim.x - bx) * blockDim.x;
    for (i64 u = (i64)(blockIdx.x - bx) * blockDim.x + threadIdx.x; u < nbt * 4; u += stride) {
        const i64 b = u >> 2;
        const int part = (int)(u & 3);
        const bool first = b < nb0;
        const i64 bb = first ? b : b - nb0;
        const float d = ldexpf(h2f_(__ldg((first ? d0 : d1) + bb)), ew);
        q8_block_f16((first ? q0 : q1) + bb * 32 + part * 8, d, wh + b * 32 + part * 8);
    }
}

// Shared-expert SwiGLU from the gate/up product gu[t] = [gate rows | up rows] (f32, 2·rows per
// token): mid[t][r] = silu(min(g, c))·clamp(u, ±c) (no clamp when c ≤ 1e-6), in f64 like the
// route kernels' epilogue.
extern "C" __global__ void __launch_bounds__(256) ds4_tcf_swiglu(const float* __restrict__ gu, int rows, i64 n,
                                                                 float clamp, float* __restrict__ mid) {
    PDL_ENTRY();
    const i64 total = n * rows;
    for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += (i64)gridDim.x * blockDim.x) {
        const i64 t = u / rows;
        const int r = (int)(u - t * rows);
        float gv = __ldg(gu + t * 2 * rows + r);
        float uv = __ldg(gu + t * 2 * rows + rows + r);
        if (clamp > 1e-6f) {
            gv = fminf(gv, clamp);
            uv = fminf(fmaxf(uv, -clamp), clamp);
        }
        const double gd = (double)gv;
        const double silu = gd / (1.0 + exp(-gd));
        mid[u] = (float)(silu * (double)uv);
    }
}
