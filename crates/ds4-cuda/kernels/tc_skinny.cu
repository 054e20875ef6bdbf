// The f16 route for skinny F16 matrices (≤ 32 rows, e.g. the HC mixing fn, 24 × 16384):
// y[t][r] = Σ_k W[r][k]·x[t][k] on the tensor cores with tf32 operands (mma m16n8k8, f32
// accumulation), read straight from global memory: no activation prep pass, no shared-memory
// staging, x read once.
//
// Numerics: x is split as hi + lo, hi = tf32(x) (round to nearest), lo = tf32(x − hi) (x − hi is
// exact in f32): 22 significant bits of x, in f32's exponent range (no per-token scaling). W is
// f16, exact in tf32. Two mmas per product (lo first), f32 accumulation. The same class as the
// general f16 route (x carried to 22 bits, f32 sums): only the f32 summation order differs.
//
// Work split: a CTA of SK_WARPS warps takes 16 tokens (the mma's M); warp w takes the 16-column
// K groups w, w + SK_WARPS, …; its partial 16 × 8·NT tile is added to the others in warp order
// (shared memory, fixed order: deterministic). Thread (g, tg) of a group at column c reads
// x[t0 + g][c + 4tg .. +3] and x[t0 + g + 8][…] (one 16-byte load each) and W[8j + g][c + 4tg ..
// +3] (8 bytes per n8 tile j); mma step s ∈ {0, 1} maps the fragment's k slots tg and tg + 4 to
// columns c + 4tg + 2s and c + 4tg + 2s + 1 (a permutation of K shared by both operands).
// Needs cols % 16 == 0 and 16-byte aligned rows (x) / 8-byte aligned rows (W).
#include <cuda_fp16.h>
#include "common.cuh"

typedef unsigned int u32;
typedef long long i64;

#define SK_WARPS 16
#define SK_UNROLL 4

__device__ __forceinline__ u32 tf32_rna(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// d += a·b (tf32 × tf32 → f32, m16n8k8)
__device__ __forceinline__ void mma_tf32(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT, bool SC>
__device__ __forceinline__ void skinny_group(const float* xa, const float* xb, const __half* const* wr,
                                             int c, float (&acc)[NT][4], double sa, double sb) {
    const float4 va = *(const float4*)(xa + c);
    const float4 vb = *(const float4*)(xb + c);
    uint2 wv[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) wv[j] = *(const uint2*)(wr[j] + c);
    float fa[4] = {va.x, va.y, va.z, va.w};
    float fb[4] = {vb.x, vb.y, vb.z, vb.w};
    if (SC) {
        // x is the unnormalised row and sa / sb its token's RMSNorm factor: the operand is
        // (float)(x·s) in f64, the value ds4_hc_post_fast would have stored as `flat`.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            fa[i] = (float)((double)fa[i] * sa);
            fb[i] = (float)((double)fb[i] * sb);
        }
    }
    u32 ha[4], la[4], hb[4], lb[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        ha[i] = tf32_rna(fa[i]);
        la[i] = tf32_rna(__fsub_rn(fa[i], __uint_as_float(ha[i])));
        hb[i] = tf32_rna(fb[i]);
        lb[i] = tf32_rna(__fsub_rn(fb[i], __uint_as_float(hb[i])));
    }
#pragma unroll
    for (int s = 0; s < 2; s++) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const float2 w2 = __half22float2(*(const __half2*)(s ? &wv[j].y : &wv[j].x));
            const u32 b0 = __float_as_uint(w2.x), b1 = __float_as_uint(w2.y);
            mma_tf32(acc[j], la[2 * s], lb[2 * s], la[2 * s + 1], lb[2 * s + 1], b0, b1);
            mma_tf32(acc[j], ha[2 * s], hb[2 * s], ha[2 * s + 1], hb[2 * s + 1], b0, b1);
        }
    }
}

// x [n][cols] f32, w [rows][cols] f16 (rows ≤ 8·NT), y [n][ldy] f32 (columns 0..rows).
// Grid ceil(n / 16), block 32·SK_WARPS. SC: the operand row t is (float)(x[t]·xs[t]) (f64).
template <int NT, bool SC>
__device__ void skinny_tf32(const float* __restrict__ x, const __half* __restrict__ w, int rows,
                            int cols, int n, float* __restrict__ y, int ldy,
                            const double* __restrict__ xs) {
    __shared__ float s_part[SK_WARPS][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tg = lane & 3;
    const int t0 = blockIdx.x * 16;
    const float* xa = x + (i64)min(t0 + g, n - 1) * cols + 4 * tg;
    const float* xb = x + (i64)min(t0 + g + 8, n - 1) * cols + 4 * tg;
    const double sa = SC ? xs[min(t0 + g, n - 1)] : 1.0;
    const double sb = SC ? xs[min(t0 + g + 8, n - 1)] : 1.0;
    const __half* wr[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) wr[j] = w + (i64)min(8 * j + g, rows - 1) * cols + 4 * tg;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[j][q] = 0.f;
    const int ng = cols >> 4;
    int gi = warp;
#pragma unroll 1
    for (; gi + (SK_UNROLL - 1) * SK_WARPS < ng; gi += SK_UNROLL * SK_WARPS) {
#pragma unroll
        for (int u = 0; u < SK_UNROLL; u++)
            skinny_group<NT, SC>(xa, xb, wr, 16 * (gi + u * SK_WARPS), acc, sa, sb);
    }
#pragma unroll 1
    for (; gi < ng; gi += SK_WARPS) skinny_group<NT, SC>(xa, xb, wr, 16 * gi, acc, sa, sb);
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int q = 0; q < 4; q++) s_part[warp][4 * j + q][lane] = acc[j][q];
    __syncthreads();
    // Thread i of the first NT·128 sums slot (i / 32, lane i % 32) over the warps in order.
    for (int i = threadIdx.x; i < NT * 128; i += blockDim.x) {
        const int slot = i >> 5, l = i & 31;
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < SK_WARPS; ww++) s = __fadd_rn(s, s_part[ww][slot][l]);
        const int j = slot >> 2, q = slot & 3;
        const int tok = t0 + (l >> 2) + 8 * (q >> 1);
        const int r = 8 * j + 2 * (l & 3) + (q & 1);
        if (tok < n && r < rows) y[(i64)tok * ldy + r] = s;
    }
}

#define SK_INST(NT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) ds4_tc_skinny_tf32_##NT(              \
        const float* __restrict__ x, const __half* __restrict__ w, int rows, int cols, int n,          \
        float* __restrict__ y, int ldy) { PDL_ENTRY();                                               \
        skinny_tf32<NT, false>(x, w, rows, cols, n, y, ldy, nullptr);                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) ds4_tc_skinny_tf32s_##NT(             \
        const float* __restrict__ x, const __half* __restrict__ w, int rows, int cols, int n,          \
        float* __restrict__ y, int ldy, const double* __restrict__ xs) { PDL_ENTRY();                \
        skinny_tf32<NT, true>(x, w, rows, cols, n, y, ldy, xs);                                       \
    }
SK_INST(1)
SK_INST(2)
SK_INST(3)
SK_INST(4)
