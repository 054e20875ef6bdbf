// Weight-streaming matrix-vector kernels for decode (owner: "gemv"). See src/gemv.rs for the API,
// the device layouts and the numerics contract.
//
// Self-contained (no headers) so that NVRTC can compile it as well as nvcc.
//
// Work decomposition (dense kernels): a block is 8 warps; `split` (1, 2, 4 or 8) warps share one
// weight row (split-K, partial sums combined through shared memory in a fixed order), so a block
// covers 8/split rows per step, and blocks stride over the row groups. Every lane loads 16 bytes
// of weights per step (ld.global.nc, no L1 allocation), 4 steps in flight before the first use;
// activations are read through L1 (they are reused by every row).
//
// Numerics (the contract shared with ds4_quant, CPU and GPU alike): every per-block integer sum
// is exact (dp4a); every per-block term is formed in double with the contract's products in the
// contract's order, written with __dmul_rn/__dsub_rn so that nvcc cannot contract them into an
// FMA (which would round differently):
//   Q8_0:     term = ((double)f16(w.d) * (double)x.d) * (double)isum
//   IQ2_XXS:  term = ((double)f16(w.d) * (double)y.d) * (double)bsum, result 0.125 * acc
//   Q2_K/Q4_K: dall = (double)y.d * (double)f16(d), dm = (double)y.d * (double)f16(dmin),
//             term = dall*(double)isum - dm*(double)summs (two rounded products, one rounded sub)
//   F16/BF16/F32 weights x f32 activations: acc += (double)w * (double)x (exact products).
// The terms are summed in double (lanes, warp shuffles, split-K parts, the MoE down's k slots,
// all in double, in any order); the scale (0.125 for IQ2_XXS) multiplies in double and the row
// result is rounded to float once. With exact products, only the order of the double sum
// differs from the CPU, so the f32 results agree bit for bit except at ~1e-8-probability ties.

#define FULL_MASK 0xffffffffu
#define U_STEPS 4

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

enum { T_F32 = 0, T_F16 = 1, T_BF16 = 2, T_Q8_0 = 3, T_Q2_K = 4, T_Q4_K = 5, T_IQ2_XXS = 6 };

__device__ __forceinline__ float h2f(u32 h) {
    float f;
    unsigned short hs = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hs));
    return f;
}
__device__ __forceinline__ float bf2f(u32 h) { return __uint_as_float((h & 0xffffu) << 16); }

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Streaming 16-byte weight load: read once, keep it out of L1.
__device__ __forceinline__ int4 ldw(const void* p) {
    int4 r;
    asm("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
// Activation loads (reused by every row): through L1.
__device__ __forceinline__ int4 lda(const void* p) { return __ldg((const int4*)p); }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ double h2d(u32 h) { return (double)h2f(h); }

// Weight pointers (device layout, see gemv.rs) and the activation pointers.
struct WP {
    const u8* p0;
    const u8* p1;
    const u8* p2;
    int C;   // columns
    int nb;  // blocks per row (C / block elements)
};
struct AP {
    const i8* qs;     // quantized activation values (Q8_0 / Q8_K)
    const float* d;   // per block scale (32 for Q8_0, 256 for Q8_K)
    const short* bs;  // Q8_K: per 16 sums
    const float* x;   // float activations (F32/F16/BF16 weights)
};
struct Tabs {
    const uint2* grid;  // IQ2_XXS grid, shared memory
    const uint4* sign;  // IQ2_XXS sign masks: (mask lo, mask hi, carry lo, carry hi)
};

#include "iq2_grid.cuh"

// Fill the IQ2_XXS tables in shared memory (all threads of the block call this).
__device__ __forceinline__ void init_tabs(uint2* grid, uint4* sign) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        u64 g = ds4_iq2xxs_grid[i];
        grid[i] = make_uint2((u32)g, (u32)(g >> 32));
    }
    for (int i = threadIdx.x; i < 128; i += blockDim.x) {
        u32 s8 = (u32)i | ((u32)(__popc(i) & 1) << 7);
        u32 lo = ((s8 & 15u) * 0x00204081u) & 0x01010101u;
        u32 hi = ((s8 >> 4) * 0x00204081u) & 0x01010101u;
        sign[i] = make_uint4(lo * 0xffu, hi * 0xffu, lo, hi);
    }
    __syncthreads();
}

// ------------------------------------------------------------------------------------------
// Per-type fragment load and dot. `load` reads one warp step of one row (16 bytes per lane);
// `dot` returns this lane's contribution for one token (all lanes must call it: it shuffles).

template <int T> struct Ty;

// F32: 4 columns per lane, 128 per warp step.
template <> struct Ty<T_F32> {
    static constexpr int COLS = 128;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; bool on; };
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int col = it * COLS + lane * 4;
        f.on = col < w.C;
        f.w = f.on ? ldw(w.p0 + (rr * w.C + col) * 4) : make_int4(0, 0, 0, 0);
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs&) {
        if (!f.on) return 0.0;
        int col = it * COLS + lane * 4;
        float4 x = __ldg((const float4*)(a.x + e0 + col));
        // f32 x f32 products are exact in double.
        double s = (double)__int_as_float(f.w.x) * (double)x.x;
        s = fma((double)__int_as_float(f.w.y), (double)x.y, s);
        s = fma((double)__int_as_float(f.w.z), (double)x.z, s);
        s = fma((double)__int_as_float(f.w.w), (double)x.w, s);
        return s;
    }
};

// F16 / BF16: 8 columns per lane, 256 per warp step.
template <bool BF> struct Half16 {
    static constexpr int COLS = 256;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; bool on; };
    __device__ static double cv(u32 h) { return (double)(BF ? bf2f(h) : h2f(h)); }
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int col = it * COLS + lane * 8;
        f.on = col < w.C;
        f.w = f.on ? ldw(w.p0 + (rr * w.C + col) * 2) : make_int4(0, 0, 0, 0);
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs&) {
        if (!f.on) return 0.0;
        int col = it * COLS + lane * 8;
        float4 x0 = __ldg((const float4*)(a.x + e0 + col));
        float4 x1 = __ldg((const float4*)(a.x + e0 + col + 4));
        u32 w0 = (u32)f.w.x, w1 = (u32)f.w.y, w2 = (u32)f.w.z, w3 = (u32)f.w.w;
        // f16/bf16 x f32 products are exact in double.
        double s = cv(w0) * (double)x0.x;
        s = fma(cv(w0 >> 16), (double)x0.y, s);
        s = fma(cv(w1), (double)x0.z, s);
        s = fma(cv(w1 >> 16), (double)x0.w, s);
        s = fma(cv(w2), (double)x1.x, s);
        s = fma(cv(w2 >> 16), (double)x1.y, s);
        s = fma(cv(w3), (double)x1.z, s);
        s = fma(cv(w3 >> 16), (double)x1.w, s);
        return s;
    }
};
template <> struct Ty<T_F16> : Half16<false> {};
template <> struct Ty<T_BF16> : Half16<true> {};

// Q8_0 (repacked: qs [rows][C] i8, d [rows][C/32] f16): lane = half a block, 512 columns per step.
template <> struct Ty<T_Q8_0> {
    static constexpr int COLS = 512;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; float d; bool on; };
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int col = it * COLS + lane * 16;
        f.on = col < w.C;
        if (f.on) {
            f.w = ldw(w.p0 + rr * w.C + col);
            f.d = h2f(__ldg((const u16*)w.p1 + rr * w.nb + (col >> 5)));
        } else {
            f.w = make_int4(0, 0, 0, 0);
            f.d = 0.f;
        }
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs&) {
        int col = it * COLS + lane * 16;
        int s = 0;
        float ad = 0.f;
        if (f.on) {
            int4 q = lda(a.qs + e0 + col);
            s = dp4a(f.w.x, q.x, s);
            s = dp4a(f.w.y, q.y, s);
            s = dp4a(f.w.z, q.z, s);
            s = dp4a(f.w.w, q.w, s);
            ad = __ldg(a.d + ((e0 + col) >> 5));
        }
        s += __shfl_xor_sync(FULL_MASK, s, 1);
        // Contract term: ((double)wd * (double)xd) * (double)isum (the first product is exact).
        return (f.on && !(lane & 1)) ? __dmul_rn(__dmul_rn((double)f.d, (double)ad), (double)s) : 0.0;
    }
};

// Q2_K (repacked: qs [rows][nb][64], scales [rows][nb][16], (d,dmin) [rows][nb] as u32):
// 4 lanes per block (16 qs bytes each = 64 values), 8 blocks (2048 columns) per step.
template <> struct Ty<T_Q2_K> {
    static constexpr int COLS = 2048;
    static constexpr double SCALE = 1.0;
    struct F { int4 q; uint2 sc; u32 dm; bool on; };
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int b = it * 8 + (lane >> 2);
        f.on = b < w.nb;
        if (f.on) {
            i64 blk = rr * w.nb + b;
            f.q = ldw(w.p0 + blk * 64 + (lane & 3) * 16);
            f.sc = __ldg((const uint2*)(w.p1 + blk * 16 + 8 * ((lane & 3) >> 1)));
            f.dm = __ldg((const u32*)w.p2 + blk);
        } else {
            f.q = make_int4(0, 0, 0, 0);
            f.sc = make_uint2(0, 0);
            f.dm = 0;
        }
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs&) {
        int isum = 0, summ = 0;
        float yd = 0.f;
        if (f.on) {
            int b = it * 8 + (lane >> 2);
            int hp = lane & 3, n = hp >> 1, h = hp & 1;
            i64 eb = e0 + (i64)b * 256;
            yd = __ldg(a.d + (eb >> 8));
            int4 bsv = lda(a.bs + (eb >> 4) + 8 * n);  // bsums of groups 8n .. 8n+7
            u32 s0 = f.sc.x;  // scales of groups 8n .. 8n+3
            u32 s1 = f.sc.y;  // 8n+4 .. 8n+7
            const i8* q8 = a.qs + eb + 128 * n + 16 * h;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int4 qa = lda(q8 + 32 * j);
                int sh = 2 * j;
                int s = dp4a((f.q.x >> sh) & 0x03030303, qa.x, 0);
                s = dp4a((f.q.y >> sh) & 0x03030303, qa.y, s);
                s = dp4a((f.q.z >> sh) & 0x03030303, qa.z, s);
                s = dp4a((f.q.w >> sh) & 0x03030303, qa.w, s);
                // group g = 8n + 2j + h: scale byte (2j+h) of the 8-byte window s0|s1
                u32 sw = (j < 2) ? s0 : s1;
                int scb = (int)((sw >> (8 * (2 * (j & 1) + h))) & 0xffu);
                int bw = (j == 0) ? bsv.x : (j == 1) ? bsv.y : (j == 2) ? bsv.z : bsv.w;
                int bsum = (int)(short)(h ? (bw >> 16) : (bw & 0xffff));
                isum += (scb & 15) * s;
                summ += (scb >> 4) * bsum;
            }
        }
        isum += __shfl_xor_sync(FULL_MASK, isum, 1);
        summ += __shfl_xor_sync(FULL_MASK, summ, 1);
        isum += __shfl_xor_sync(FULL_MASK, isum, 2);
        summ += __shfl_xor_sync(FULL_MASK, summ, 2);
        if (!f.on || (lane & 3)) return 0.0;
        double dall = __dmul_rn((double)yd, h2d(f.dm));
        double dmin = __dmul_rn((double)yd, h2d(f.dm >> 16));
        return __dsub_rn(__dmul_rn(dall, (double)isum), __dmul_rn(dmin, (double)summ));
    }
};

// Q4_K (GGUF layout, 144-byte blocks: d, dmin, scales[12], qs[128]): 8 lanes per block
// (16 qs bytes each = 32 values), 4 blocks (1024 columns) per step.
__device__ __forceinline__ int q4k_byte(const int4& hd, int i) {  // scales[i], i in 0..11
    u32 w = (i < 4) ? (u32)hd.y : (i < 8) ? (u32)hd.z : (u32)hd.w;
    return (int)((w >> (8 * (i & 3))) & 0xffu);
}
template <> struct Ty<T_Q4_K> {
    static constexpr int COLS = 1024;
    static constexpr double SCALE = 1.0;
    struct F { int4 q; int4 hd; bool on; };
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int b = it * 4 + (lane >> 3);
        f.on = b < w.nb;
        if (f.on) {
            const u8* blk = w.p0 + (rr * w.nb + b) * 144;
            f.hd = ldw(blk);
            f.q = ldw(blk + 16 + (lane & 7) * 16);
        } else {
            f.q = make_int4(0, 0, 0, 0);
            f.hd = make_int4(0, 0, 0, 0);
        }
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs&) {
        int isum = 0, summ = 0;
        float yd = 0.f;
        if (f.on) {
            int b = it * 4 + (lane >> 3);
            int k = lane & 7, p = k >> 1, hh = k & 1;
            i64 eb = e0 + (i64)b * 256;
            yd = __ldg(a.d + (eb >> 8));
            int j1 = 2 * p, j2 = 2 * p + 1;
            // get_scale_min_k4
            int sc1, m1, sc2, m2;
            if (j1 < 4) {
                sc1 = q4k_byte(f.hd, j1) & 63;
                m1 = q4k_byte(f.hd, j1 + 4) & 63;
            } else {
                sc1 = (q4k_byte(f.hd, j1 + 4) & 0xF) | ((q4k_byte(f.hd, j1 - 4) >> 6) << 4);
                m1 = (q4k_byte(f.hd, j1 + 4) >> 4) | ((q4k_byte(f.hd, j1) >> 6) << 4);
            }
            if (j2 < 4) {
                sc2 = q4k_byte(f.hd, j2) & 63;
                m2 = q4k_byte(f.hd, j2 + 4) & 63;
            } else {
                sc2 = (q4k_byte(f.hd, j2 + 4) & 0xF) | ((q4k_byte(f.hd, j2 - 4) >> 6) << 4);
                m2 = (q4k_byte(f.hd, j2 + 4) >> 4) | ((q4k_byte(f.hd, j2) >> 6) << 4);
            }
            int4 ql = lda(a.qs + eb + 64 * p + 16 * hh);
            int4 qh = lda(a.qs + eb + 64 * p + 32 + 16 * hh);
            int sa = dp4a(f.q.x & 0x0F0F0F0F, ql.x, 0);
            sa = dp4a(f.q.y & 0x0F0F0F0F, ql.y, sa);
            sa = dp4a(f.q.z & 0x0F0F0F0F, ql.z, sa);
            sa = dp4a(f.q.w & 0x0F0F0F0F, ql.w, sa);
            int sb = dp4a((f.q.x >> 4) & 0x0F0F0F0F, qh.x, 0);
            sb = dp4a((f.q.y >> 4) & 0x0F0F0F0F, qh.y, sb);
            sb = dp4a((f.q.z >> 4) & 0x0F0F0F0F, qh.z, sb);
            sb = dp4a((f.q.w >> 4) & 0x0F0F0F0F, qh.w, sb);
            isum = sc1 * sa + sc2 * sb;
            const short* bs = a.bs + (eb >> 4);
            summ = m1 * (int)__ldg(bs + 4 * p + hh) + m2 * (int)__ldg(bs + 4 * p + 2 + hh);
        }
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) {
            isum += __shfl_xor_sync(FULL_MASK, isum, o);
            summ += __shfl_xor_sync(FULL_MASK, summ, o);
        }
        if (!f.on || (lane & 7)) return 0.0;
        double dall = __dmul_rn((double)yd, h2d((u32)f.hd.x));
        double dmin = __dmul_rn((double)yd, h2d((u32)f.hd.x >> 16));
        return __dsub_rn(__dmul_rn(dall, (double)isum), __dmul_rn(dmin, (double)summ));
    }
};

// IQ2_XXS (repacked: qs [rows][nb][64], d [rows][nb] f16): 4 lanes per block (two 32-groups
// each), 8 blocks (2048 columns) per step. The row result is 0.125 · Σ blocks (CPU order of ops).
__device__ __forceinline__ int iq2_group(u32 a0, u32 a1, int4 q0, int4 q1, const Tabs& t) {
    int s = 0;
    uint2 g;
    uint4 m;
    g = t.grid[a0 & 255];
    m = t.sign[a1 & 127];
    s = dp4a((int)((g.x ^ m.x) + m.z), q0.x, s);
    s = dp4a((int)((g.y ^ m.y) + m.w), q0.y, s);
    g = t.grid[(a0 >> 8) & 255];
    m = t.sign[(a1 >> 7) & 127];
    s = dp4a((int)((g.x ^ m.x) + m.z), q0.z, s);
    s = dp4a((int)((g.y ^ m.y) + m.w), q0.w, s);
    g = t.grid[(a0 >> 16) & 255];
    m = t.sign[(a1 >> 14) & 127];
    s = dp4a((int)((g.x ^ m.x) + m.z), q1.x, s);
    s = dp4a((int)((g.y ^ m.y) + m.w), q1.y, s);
    g = t.grid[a0 >> 24];
    m = t.sign[(a1 >> 21) & 127];
    s = dp4a((int)((g.x ^ m.x) + m.z), q1.z, s);
    s = dp4a((int)((g.y ^ m.y) + m.w), q1.w, s);
    return s * (int)(2 * (a1 >> 28) + 1);
}
template <> struct Ty<T_IQ2_XXS> {
    static constexpr int COLS = 2048;
    static constexpr double SCALE = 0.125;
    struct F { int4 w; float d; bool on; };
    __device__ static void load(F& f, const WP& w, i64 rr, int it, int lane) {
        int b = it * 8 + (lane >> 2);
        f.on = b < w.nb;
        if (f.on) {
            i64 blk = rr * w.nb + b;
            f.w = ldw(w.p0 + blk * 64 + (lane & 3) * 16);
            f.d = h2f(__ldg((const u16*)w.p1 + blk));
        } else {
            f.w = make_int4(0, 0, 0, 0);
            f.d = 0.f;
        }
    }
    __device__ static double dot(const F& f, const AP& a, i64 e0, int it, int lane, const Tabs& t) {
        int bsum = 0;
        float yd = 0.f;
        if (f.on) {
            int b = it * 8 + (lane >> 2);
            i64 eb = e0 + (i64)b * 256;
            yd = __ldg(a.d + (eb >> 8));
            const i8* q8 = a.qs + eb + (lane & 3) * 64;
            int4 q0 = lda(q8), q1 = lda(q8 + 16), q2 = lda(q8 + 32), q3 = lda(q8 + 48);
            bsum = iq2_group((u32)f.w.x, (u32)f.w.y, q0, q1, t) +
                   iq2_group((u32)f.w.z, (u32)f.w.w, q2, q3, t);
        }
        bsum += __shfl_xor_sync(FULL_MASK, bsum, 1);
        bsum += __shfl_xor_sync(FULL_MASK, bsum, 2);
        if (!f.on || (lane & 3)) return 0.0;
        return __dmul_rn(__dmul_rn((double)f.d, (double)yd), (double)bsum);
    }
};

// ------------------------------------------------------------------------------------------
// Dense (and grouped) matvec: y[t][rr] = W[rr] · x[t][m·C*grouped ..], rr over RT = n_mat·R
// rows, m = rr / R, for NT tokens at most (n ≤ NT actually used).

template <int T, int NT>
__device__ __forceinline__ void gemv_body(WP w, AP a, float* __restrict__ y, int RT, int R, int Cx,
                                          int grouped, int n, int split) {
    typedef Ty<T> K;
    __shared__ uint2 s_grid[256];
    __shared__ uint4 s_sign[128];
    __shared__ double s_red[8][NT];
    Tabs tabs = {s_grid, s_sign};
    if (T == T_IQ2_XXS) init_tabs(s_grid, s_sign);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rpb = 8 / split, rl = warp / split, part = warp % split;
    const int nit = (w.C + K::COLS - 1) / K::COLS;
    const int it0 = part * nit / split, it1 = (part + 1) * nit / split;
    const int ngroups = (RT + rpb - 1) / rpb;
    for (int g = blockIdx.x; g < ngroups; g += gridDim.x) {
        const i64 rr = (i64)g * rpb + rl;
        double acc[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = 0.0;
        if (rr < RT) {
            const i64 m = rr / R;
            const i64 eoff = grouped ? m * (i64)w.C : 0;
            for (int it = it0; it < it1; it += U_STEPS) {
                typename K::F f[U_STEPS];
#pragma unroll
                for (int u = 0; u < U_STEPS; u++) {
                    if (it + u < it1) K::load(f[u], w, rr, it + u, lane);
                    else f[u].on = false;
                }
#pragma unroll
                for (int u = 0; u < U_STEPS; u++) {
                    if (it + u < it1) {  // warp-uniform
#pragma unroll
                        for (int t = 0; t < NT; t++)
                            if (t < n) acc[t] += K::dot(f[u], a, (i64)t * Cx + eoff, it + u, lane, tabs);
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = warp_sum(acc[t]);
        if (split == 1) {
            if (lane == 0 && rr < RT) {
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) y[(i64)t * RT + rr] = (float)(K::SCALE * acc[t]);
            }
        } else {
            if (lane == 0) {
#pragma unroll
                for (int t = 0; t < NT; t++) s_red[warp][t] = acc[t];
            }
            __syncthreads();
            if (part == 0 && lane == 0 && rr < RT) {
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    double s = s_red[warp][t];
                    for (int p = 1; p < split; p++) s += s_red[warp + p][t];
                    if (t < n) y[(i64)t * RT + rr] = (float)(K::SCALE * s);
                }
            }
            __syncthreads();
        }
    }
}

#define GEMV_ARGS                                                                              \
    const u8 *p0, const u8 *p1, const u8 *p2, const i8 *aq, const float *ad, const short *abs_, \
        const float *x, float *y, int RT, int R, int C, int Cx, int grouped, int n, int split
#define GEMV_CALL(T, NT)                                                                       \
    WP w = {p0, p1, p2, C, C / ((T == T_F32 || T == T_F16 || T == T_BF16) ? 1 : (T == T_Q8_0 ? 32 : 256))}; \
    AP a = {aq, ad, abs_, x};                                                                  \
    gemv_body<T, NT>(w, a, y, RT, R, Cx, grouped, n, split);

#define GEMV_INST(name, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) ds4_gemv_##name##_1(GEMV_ARGS) { GEMV_CALL(T, 1) }        \
    extern "C" __global__ void __launch_bounds__(256) ds4_gemv_##name##_2(GEMV_ARGS) { GEMV_CALL(T, 2) }        \
    extern "C" __global__ void __launch_bounds__(256) ds4_gemv_##name##_4(GEMV_ARGS) { GEMV_CALL(T, 4) }        \
    extern "C" __global__ void __launch_bounds__(256) ds4_gemv_##name##_8(GEMV_ARGS) { GEMV_CALL(T, 8) }

GEMV_INST(f32, T_F32)
GEMV_INST(f16, T_F16)
GEMV_INST(bf16, T_BF16)
GEMV_INST(q8_0, T_Q8_0)
GEMV_INST(q2_k, T_Q2_K)
GEMV_INST(q4_k, T_Q4_K)
GEMV_INST(iq2_xxs, T_IQ2_XXS)

// ------------------------------------------------------------------------------------------
// Routed MoE gate/up + SwiGLU: one warp per (token t, slot j, row r), reading the gate and the
// up row of expert ids[t][j]. g, u are the f32 row results (double accumulation, one rounding);
// mid[t][j][r] = silu(min(g,c))·clamp(u,±c)·w_tj computed in double like the CPU (clamp skipped
// when c ≤ 1e-6). ids == null: dense (one matrix, k = 1, w = 1).
// An id outside [0, n_mat) writes NaN.

template <int T>
__device__ __forceinline__ void moe_gate_up_body(WP wg, WP wu, AP a, const int* __restrict__ ids,
                                                 const float* __restrict__ wts, float* __restrict__ mid,
                                                 int R, int n_mat, int n, int k, float clamp) {
    typedef Ty<T> K;
    __shared__ uint2 s_grid[256];
    __shared__ uint4 s_sign[128];
    Tabs tabs = {s_grid, s_sign};
    if (T == T_IQ2_XXS) init_tabs(s_grid, s_sign);
    const int lane = threadIdx.x & 31;
    const i64 units = (i64)n * k * R;
    const i64 nwarps = (i64)gridDim.x * (blockDim.x >> 5);
    const int nit = (wg.C + K::COLS - 1) / K::COLS;
    for (i64 u = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); u < units; u += nwarps) {
        const i64 tj = u / R;  // t*k + j
        const int r = (int)(u % R);
        const int t = (int)(tj / k);
        int e = ids ? __ldg(ids + tj) : 0;
        if (e < 0 || e >= n_mat) {
            if (lane == 0) mid[u] = __int_as_float(0x7fc00000);
            continue;
        }
        const i64 rr = (i64)e * R + r;
        const i64 e0 = (i64)t * wg.C;
        double ag = 0.0, au = 0.0;
        for (int it = 0; it < nit; it += U_STEPS / 2) {
            typename K::F fg[U_STEPS / 2], fu[U_STEPS / 2];
#pragma unroll
            for (int s = 0; s < U_STEPS / 2; s++) {
                if (it + s < nit) {
                    K::load(fg[s], wg, rr, it + s, lane);
                    K::load(fu[s], wu, rr, it + s, lane);
                } else {
                    fg[s].on = false;
                    fu[s].on = false;
                }
            }
#pragma unroll
            for (int s = 0; s < U_STEPS / 2; s++) {
                if (it + s < nit) {
                    ag += K::dot(fg[s], a, e0, it + s, lane, tabs);
                    au += K::dot(fu[s], a, e0, it + s, lane, tabs);
                }
            }
        }
        ag = warp_sum(ag);
        au = warp_sum(au);
        if (lane == 0) {
            float g = (float)(K::SCALE * ag), v = (float)(K::SCALE * au);
            if (clamp > 1e-6f) {
                g = fminf(g, clamp);
                v = fminf(fmaxf(v, -clamp), clamp);
            }
            double gd = (double)g;
            double silu = gd / (1.0 + exp(-gd));
            double wt = ids ? (double)__ldg(wts + tj) : 1.0;
            mid[u] = (float)(silu * (double)v * wt);
        }
    }
}

#define MOE_GU_ARGS                                                                           \
    const u8 *g0, const u8 *g1, const u8 *g2, const u8 *u0, const u8 *u1, const u8 *u2,      \
        const i8 *aq, const float *ad, const short *abs_, const float *x, const int *ids,     \
        const float *wts, float *mid, int R, int C, int n_mat, int n, int k, float clamp
#define MOE_GU_INST(name, T, BS)                                                              \
    extern "C" __global__ void __launch_bounds__(256) ds4_moe_gate_up_##name(MOE_GU_ARGS) {   \
        WP wg = {g0, g1, g2, C, C / BS};                                                      \
        WP wu = {u0, u1, u2, C, C / BS};                                                      \
        AP a = {aq, ad, abs_, x};                                                             \
        moe_gate_up_body<T>(wg, wu, a, ids, wts, mid, R, n_mat, n, k, clamp);                 \
    }
MOE_GU_INST(f32, T_F32, 1)
MOE_GU_INST(f16, T_F16, 1)
MOE_GU_INST(bf16, T_BF16, 1)
MOE_GU_INST(q8_0, T_Q8_0, 32)
MOE_GU_INST(q2_k, T_Q2_K, 256)
MOE_GU_INST(q4_k, T_Q4_K, 256)
MOE_GU_INST(iq2_xxs, T_IQ2_XXS, 256)

// ------------------------------------------------------------------------------------------
// Routed MoE down: one warp per (token t, row r): out[t][r] = (float) Σ_j (double) d_j, where
// d_j = (float)(scale · acc_j) is expert j's row result rounded to f32 exactly as the CPU's
// per-expert matvec (acc_j: the double accumulator of down[ids[t][j]][r] · act[t·k + j]), and
// the sum over the k slots is in double in slot order with one final rounding, as the CPU does.
// k ≤ 8. An id outside [0, n_mat) gives NaN.

#define MAXK 8
template <int T>
__device__ __forceinline__ void moe_down_body(WP w, AP a, const int* __restrict__ ids, float* __restrict__ out,
                                              int R, int n_mat, int n, int k) {
    typedef Ty<T> K;
    __shared__ uint2 s_grid[256];
    __shared__ uint4 s_sign[128];
    Tabs tabs = {s_grid, s_sign};
    if (T == T_IQ2_XXS) init_tabs(s_grid, s_sign);
    const int lane = threadIdx.x & 31;
    const i64 units = (i64)n * R;
    const i64 nwarps = (i64)gridDim.x * (blockDim.x >> 5);
    const int nit = (w.C + K::COLS - 1) / K::COLS;
    for (i64 u = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); u < units; u += nwarps) {
        const int t = (int)(u / R);
        const int r = (int)(u % R);
        int ex[MAXK];
        bool bad = false;
#pragma unroll
        for (int j = 0; j < MAXK; j++) {
            ex[j] = (j < k) ? __ldg(ids + (i64)t * k + j) : 0;
            if (j < k && (ex[j] < 0 || ex[j] >= n_mat)) bad = true;
        }
        if (bad) {
            if (lane == 0) out[u] = __int_as_float(0x7fc00000);
            continue;
        }
        double acc[MAXK];
#pragma unroll
        for (int j = 0; j < MAXK; j++) acc[j] = 0.0;
        for (int it = 0; it < nit; it++) {
#pragma unroll
            for (int j0 = 0; j0 < MAXK; j0 += 4) {
                if (j0 < k) {  // experts in chunks of 4: 4 rows in flight, bounded registers
                    typename K::F f[4];
#pragma unroll
                    for (int jj = 0; jj < 4; jj++) {
                        if (j0 + jj < k) K::load(f[jj], w, (i64)ex[j0 + jj] * R + r, it, lane);
                        else f[jj].on = false;
                    }
#pragma unroll
                    for (int jj = 0; jj < 4; jj++) {
                        if (j0 + jj < k)
                            acc[j0 + jj] += K::dot(f[jj], a, ((i64)t * k + j0 + jj) * w.C, it, lane, tabs);
                    }
                }
            }
        }
        double s = 0.0;
#pragma unroll
        for (int j = 0; j < MAXK; j++) {
            double v = warp_sum(acc[j]);
            // Each expert's row result is an f32 (the CPU's per-expert matvec), then the k
            // slots are summed in double.
            if (j < k) s += (double)(float)(K::SCALE * v);
        }
        if (lane == 0) out[u] = (float)s;
    }
}

#define MOE_DOWN_ARGS                                                                         \
    const u8 *p0, const u8 *p1, const u8 *p2, const i8 *aq, const float *ad, const short *abs_, \
        const float *x, const int *ids, float *out, int R, int C, int n_mat, int n, int k
#define MOE_DOWN_INST(name, T, BS)                                                            \
    extern "C" __global__ void __launch_bounds__(256) ds4_moe_down_##name(MOE_DOWN_ARGS) {    \
        WP w = {p0, p1, p2, C, C / BS};                                                       \
        AP a = {aq, ad, abs_, x};                                                             \
        moe_down_body<T>(w, a, ids, out, R, n_mat, n, k);                                     \
    }
MOE_DOWN_INST(f32, T_F32, 1)
MOE_DOWN_INST(f16, T_F16, 1)
MOE_DOWN_INST(bf16, T_BF16, 1)
MOE_DOWN_INST(q8_0, T_Q8_0, 32)
MOE_DOWN_INST(q2_k, T_Q2_K, 256)
MOE_DOWN_INST(q4_k, T_Q4_K, 256)
MOE_DOWN_INST(iq2_xxs, T_IQ2_XXS, 256)

// ------------------------------------------------------------------------------------------
// Activation quantization (ds4 CPU numerics, model-spec §3.0 / §5.6).

// Q8_0 activations: one warp per 32-block. d = amax/127 (IEEE division), id = d ? 1/d : 0,
// q = clamp(rint(x·id), -128, 127) (round-half-even; NaN → 0 like the CPU's saturating cast).
extern "C" __global__ void ds4_quant_q8_0(const float* __restrict__ x, i8* __restrict__ qs,
                                          float* __restrict__ d, i64 nblocks) {
    const int lane = threadIdx.x & 31;
    const i64 nw = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks; b += nw) {
        float v = x[b * 32 + lane];
        float am = fabsf(v);
        if (!(am == am)) am = 0.f;  // NaN never wins (CPU: `a > amax` is false)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(FULL_MASK, am, o));
        float dd = am / 127.0f;
        float id = dd != 0.f ? 1.0f / dd : 0.f;
        float p = __fmul_rn(v, id);
        int q = (p == p) ? __float2int_rn(p) : 0;
        q = max(-128, min(127, q));
        qs[b * 32 + lane] = (i8)q;
        if (lane == 0) d[b] = dd;
    }
}

// Q8_K activations: one warp per 256-block, 8 consecutive values per lane. max = the value of
// largest |x| (first on ties), iscale = -127/max, q = clamp(rint(iscale·x)), bsums per 16,
// d = 1/iscale; an all-zero block gives d = 0, q = 0.
extern "C" __global__ void ds4_quant_q8_k(const float* __restrict__ x, i8* __restrict__ qs,
                                          float* __restrict__ d, short* __restrict__ bs, i64 nblocks) {
    const int lane = threadIdx.x & 31;
    const i64 nw = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks; b += nw) {
        const float* xb = x + b * 256 + lane * 8;
        float4 v0 = *(const float4*)xb, v1 = *(const float4*)(xb + 4);
        float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        float ba = 0.f, bv = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float aa = fabsf(v[i]);
            if (aa > ba) {
                ba = aa;
                bv = v[i];
                bi = lane * 8 + i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float oa = __shfl_xor_sync(FULL_MASK, ba, o);
            float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (oa > ba || (oa == ba && oi < bi)) {
                ba = oa;
                bv = ov;
                bi = oi;
            }
        }
        int q[8];
        float iscale = 0.f;
        if (ba != 0.f) iscale = -127.0f / bv;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float p = __fmul_rn(iscale, v[i]);
            int qi = (p == p) ? __float2int_rn(p) : 0;
            q[i] = (ba != 0.f) ? max(-128, min(127, qi)) : 0;
        }
        u32 w0 = (u32)(q[0] & 255) | ((u32)(q[1] & 255) << 8) | ((u32)(q[2] & 255) << 16) | ((u32)(q[3] & 255) << 24);
        u32 w1 = (u32)(q[4] & 255) | ((u32)(q[5] & 255) << 8) | ((u32)(q[6] & 255) << 16) | ((u32)(q[7] & 255) << 24);
        *(uint2*)(qs + b * 256 + lane * 8) = make_uint2(w0, w1);
        int s = q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
        s += __shfl_xor_sync(FULL_MASK, s, 1);
        if (!(lane & 1)) bs[b * 16 + (lane >> 1)] = (short)s;
        if (lane == 0) d[b] = (ba != 0.f) ? 1.0f / iscale : 0.f;
    }
}

// ------------------------------------------------------------------------------------------
// Repacking GGUF blocks into the device layouts (upload time; one thread per block).

extern "C" __global__ void ds4_repack_q8_0(const u8* __restrict__ raw, u8* __restrict__ qs,
                                           u16* __restrict__ d, i64 nblocks) {
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (i64)gridDim.x * blockDim.x) {
        const u8* s = raw + b * 34;
        d[b] = (u16)(s[0] | (s[1] << 8));
        u32* o = (u32*)(qs + b * 32);
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = (u32)s[2 + 4 * i] | ((u32)s[3 + 4 * i] << 8) | ((u32)s[4 + 4 * i] << 16) | ((u32)s[5 + 4 * i] << 24);
    }
}

extern "C" __global__ void ds4_repack_q2_k(const u8* __restrict__ raw, u8* __restrict__ qs,
                                           u8* __restrict__ sc, u32* __restrict__ dm, i64 nblocks) {
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (i64)gridDim.x * blockDim.x) {
        const u32* s = (const u32*)(raw + b * 84);  // 84 = 4·21: 4-byte aligned blocks
        u32* os = (u32*)(sc + b * 16);
        u32* oq = (u32*)(qs + b * 64);
#pragma unroll
        for (int i = 0; i < 4; i++) os[i] = s[i];
#pragma unroll
        for (int i = 0; i < 16; i++) oq[i] = s[4 + i];
        dm[b] = s[20];
    }
}

extern "C" __global__ void ds4_repack_iq2_xxs(const u8* __restrict__ raw, u8* __restrict__ qs,
                                              u16* __restrict__ d, i64 nblocks) {
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (i64)gridDim.x * blockDim.x) {
        const u16* s = (const u16*)(raw + b * 66);  // 66 = 2·33: 2-byte aligned blocks
        d[b] = s[0];
        u16* o = (u16*)(qs + b * 64);
#pragma unroll
        for (int i = 0; i < 32; i++) o[i] = s[1 + i];
    }
}

// ------------------------------------------------------------------------------------------
// Benchmark helper: stream n16 16-byte words (the read-bandwidth ceiling for the kernels above).
extern "C" __global__ void __launch_bounds__(256) ds4_bench_read(const u8* __restrict__ p, i64 n16, int* out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    int acc = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += 4 * stride) {
        int4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
            v[u] = (i + u * stride < n16) ? ldw(p + 16 * (i + u * stride)) : make_int4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < 4; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x5eed1234) out[0] = acc;  // keeps the loads alive
}
