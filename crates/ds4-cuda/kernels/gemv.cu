// Weight-streaming matrix-vector kernels for decode (owner: "gemv"). See src/gemv.rs for the API,
// the device layouts and the numerics contract.
//
// Self-contained (one local header, spliced in for NVRTC) so that NVRTC can compile it too.
//
// Work decomposition. Every kernel works on tiles: a warp takes RR (virtual) rows and streams
// them U warp steps at a time (a warp step is one 16-byte load per lane and row, COLS columns);
// all RR·U loads of a chunk are issued before the first one is used; the dense kernels issue a
// block's first chunk, and fill the lookup tables, before their PDL wait (weight prologue,
// common.cuh), the routed gate/up only its tables (its expert ids come after the wait). The LPB lanes of one quant block
// each form exact integer partial sums for every row of the chunk; a reduce-scatter over those
// lanes leaves lane q with the block sums of row q (mod LPB), so the f64 block terms are
// computed by all lanes instead of one in LPB. At the end of a tile the f64 accumulators are
// summed over the lanes that hold the same row (and over split-K warps through shared memory,
// in a fixed order).
//   dense matvec: tiles of RR consecutive rows, split-K over `split` warps of a block;
//   MoE gate/up: RR virtual rows = RR/2 (gate, up) row pairs of one expert, one token;
//   MoE down: RR rows, the virtual steps run over (slot j, column step), split over warps.
// Weights are read with ld.global.nc.L1::no_allocate (streamed once); activations through L1
// (every row reuses them).
//
// IQ2_XXS decoding: one 8-weight group is a PRMT of a constant pool {8,25,43,-8,-25,-43} with a
// selector = grid selector | sign selector, both from shared-memory tables that hold one copy
// per lane (lane l's copy of entry i at word 32·i + l), so the 32 lookups of a warp never
// conflict on a bank.
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

#include "common.cuh"

#define FULL_MASK 0xffffffffu

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
__device__ __forceinline__ double h2d(u32 h) {
    double d;
    unsigned short hs = (unsigned short)h;
    asm("cvt.f64.f16 %0, %1;" : "=d"(d) : "h"(hs));
    return d;
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
__device__ __forceinline__ u32 ldu16(const void* p) { return (u32)__ldg((const u16*)p); }

__device__ __forceinline__ int4 zero4() { return make_int4(0, 0, 0, 0); }

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

#include "iq2_grid.cuh"

// IQ2_XXS tables in dynamic shared memory: 256 grid selectors then 128 sign selectors, 32
// copies each (see the header comment): lane l's copy of grid entry i is the word at byte
// 128·i + 4·l, of sign entry i at byte 32768 + 128·i + 4·l.
extern __shared__ __align__(16) u32 s_tab[];
static __device__ const u32 ds4_iq2_pool[32] = {
    0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u,
    0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u,
    0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u,
    0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u,
    0x002b1908u, 0x002b1908u, 0x002b1908u, 0x002b1908u};
struct Tabs {
    u32 l4;   // 4 · lane
    u32 plo;  // the low pool word in a register (an opaque value: not rematerialized per PRMT)
};
__device__ __forceinline__ Tabs make_tabs(int lane) {
    Tabs t;
    t.l4 = 4u * (u32)lane;
    // Loaded per lane (all entries equal) so that the compiler keeps it in a vector register
    // instead of re-moving a uniform constant into one before every PRMT.
    t.plo = __ldg(&ds4_iq2_pool[lane]);
    return t;
}

__device__ __forceinline__ void iq2_init(u32* tab) {
    for (int e = threadIdx.x; e < 384 * 8; e += blockDim.x) {
        const int i = e >> 3, part = e & 7;
        u32 v = 0;
        if (i < 256) {
            const u64 g = __ldg(&ds4_iq2xxs_grid[i]);
#pragma unroll
            for (int b = 0; b < 8; b++) {
                const u32 m = (u32)(g >> (8 * b)) & 0xffu;
                v |= (m == 0x08u ? 0u : m == 0x19u ? 1u : 2u) << (4 * b);
            }
        } else {
            const u32 s7 = (u32)(i - 256);
            const u32 s8 = s7 | ((u32)(__popc(s7) & 1) << 7);
#pragma unroll
            for (int b = 0; b < 8; b++)
                if ((s8 >> b) & 1u) v |= 4u << (4 * b);
        }
        *(uint4*)(tab + i * 32 + part * 4) = make_uint4(v, v, v, v);
    }
}

// PRMT without __byte_perm's masking of the selector (our selector nibbles never set bit 3).
__device__ __forceinline__ int prmt(u32 a, u32 b, u32 c) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return (int)d;
}
__device__ __forceinline__ u32 tab_at(u32 byte_off) {
    return *(const u32*)((const char*)s_tab + byte_off);
}

// One IQ2_XXS group of 32 weights (a0: 4 grid indices, a1: 4×7 sign bits + 4-bit scale) times
// 32 int8 activations: (2·scale + 1) · Σ (±grid)·q8, exact. Each 8 weights: two table words
// (grid index·128 and sign index·128 are shifted/masked straight out of a0/a1), one OR, two
// PRMTs of the pool {8,25,43,0,-8,-25,-43,0}, two dp4a.
__device__ __forceinline__ int iq2_group(u32 a0, u32 a1, int4 q0, int4 q1, const Tabs& t) {
    const u32 PLO = t.plo, PHI = 0x00d5e7f8u;  // bytes 8, 25, 43, 0 | -8, -25, -43, 0
    const u32 l4 = t.l4;
    int s = 0;
    u32 sel;
    sel = tab_at(((a0 << 7) & 0x7f80u) | l4) | tab_at(32768u + (((a1 << 7) & 0x3f80u) | l4));
    s = dp4a(prmt(PLO, PHI, sel), q0.x, s);
    s = dp4a(prmt(PLO, PHI, sel >> 16), q0.y, s);
    sel = tab_at(((a0 >> 1) & 0x7f80u) | l4) | tab_at(32768u + ((a1 & 0x3f80u) | l4));
    s = dp4a(prmt(PLO, PHI, sel), q0.z, s);
    s = dp4a(prmt(PLO, PHI, sel >> 16), q0.w, s);
    sel = tab_at(((a0 >> 9) & 0x7f80u) | l4) | tab_at(32768u + (((a1 >> 7) & 0x3f80u) | l4));
    s = dp4a(prmt(PLO, PHI, sel), q1.x, s);
    s = dp4a(prmt(PLO, PHI, sel >> 16), q1.y, s);
    sel = tab_at(((a0 >> 17) & 0x7f80u) | l4) | tab_at(32768u + (((a1 >> 14) & 0x3f80u) | l4));
    s = dp4a(prmt(PLO, PHI, sel), q1.z, s);
    s = dp4a(prmt(PLO, PHI, sel >> 16), q1.w, s);
    return s * (int)(2u * (a1 >> 28) + 1u);
}

// ------------------------------------------------------------------------------------------
// Per-type fragments. F: one lane's weights of one row step (`load`, 16 bytes + scales);
// A: one lane's activations of one step (`act`). Float types (LPB = 1): `fpart` is the lane's
// f64 partial. Quantized types: `ipart` gives the lane's exact integer partials (NI of them),
// `scales` the block's scale fields and `term` the block's f64 term from the block's integers.

template <int T> struct Ty;

// F32: 4 columns per lane, 128 per warp step.
template <> struct Ty<T_F32> {
    static constexpr int COLS = 128, LPB = 1, NI = 1;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; };
    struct A { double x[4]; };
    struct S { int dummy; };
    __device__ static void zero(F& f) { f.w = zero4(); }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int col = it * COLS + lane * 4;
        if (col < w.C) f.w = ldw(w.p0 + (row * w.C + col) * 4);
        else zero(f);
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int col = it * COLS + lane * 4;
        float4 x = col < w.C ? __ldg((const float4*)(ap.x + e0 + col)) : make_float4(0.f, 0.f, 0.f, 0.f);
        a.x[0] = x.x;
        a.x[1] = x.y;
        a.x[2] = x.z;
        a.x[3] = x.w;
    }
    // f32 x f32 products are exact in double.
    __device__ static double fpart(const F& f, const A& a) {
        double s = (double)__int_as_float(f.w.x) * a.x[0];
        s = fma((double)__int_as_float(f.w.y), a.x[1], s);
        s = fma((double)__int_as_float(f.w.z), a.x[2], s);
        s = fma((double)__int_as_float(f.w.w), a.x[3], s);
        return s;
    }
};

// F16 / BF16: 8 columns per lane, 256 per warp step.
template <bool BF> struct Half16 {
    static constexpr int COLS = 256, LPB = 1, NI = 1;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; };
    struct A { double x[8]; };
    struct S { int dummy; };
    __device__ static double cv(u32 h) { return BF ? (double)bf2f(h) : h2d(h); }
    __device__ static void zero(F& f) { f.w = zero4(); }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int col = it * COLS + lane * 8;
        if (col < w.C) f.w = ldw(w.p0 + (row * w.C + col) * 2);
        else zero(f);
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int col = it * COLS + lane * 8;
        float4 x0 = make_float4(0.f, 0.f, 0.f, 0.f), x1 = x0;
        if (col < w.C) {
            x0 = __ldg((const float4*)(ap.x + e0 + col));
            x1 = __ldg((const float4*)(ap.x + e0 + col + 4));
        }
        a.x[0] = x0.x;
        a.x[1] = x0.y;
        a.x[2] = x0.z;
        a.x[3] = x0.w;
        a.x[4] = x1.x;
        a.x[5] = x1.y;
        a.x[6] = x1.z;
        a.x[7] = x1.w;
    }
    // f16/bf16 x f32 products are exact in double.
    __device__ static double fpart(const F& f, const A& a) {
        const u32 w0 = (u32)f.w.x, w1 = (u32)f.w.y, w2 = (u32)f.w.z, w3 = (u32)f.w.w;
        double s = cv(w0) * a.x[0];
        s = fma(cv(w0 >> 16), a.x[1], s);
        s = fma(cv(w1), a.x[2], s);
        s = fma(cv(w1 >> 16), a.x[3], s);
        s = fma(cv(w2), a.x[4], s);
        s = fma(cv(w2 >> 16), a.x[5], s);
        s = fma(cv(w3), a.x[6], s);
        s = fma(cv(w3 >> 16), a.x[7], s);
        return s;
    }
};
template <> struct Ty<T_F16> : Half16<false> {};
template <> struct Ty<T_BF16> : Half16<true> {};

// Q8_0 (repacked: qs [rows][C] i8, d [rows][C/32] f16): lane = half a block, 512 columns per step.
template <> struct Ty<T_Q8_0> {
    static constexpr int COLS = 512, LPB = 2, NI = 1;
    static constexpr double SCALE = 1.0;
    struct F { int4 w; u32 d; };
    struct A { int4 q; float d; };
    struct S { u32 wd; float xd; };
    __device__ static void zero(F& f) {
        f.w = zero4();
        f.d = 0;
    }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int col = it * COLS + lane * 16;
        if (col < w.C) {
            f.w = ldw(w.p0 + row * w.C + col);
            f.d = ldu16(w.p1 + 2 * (row * w.nb + (col >> 5)));
        } else {
            zero(f);
        }
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int col = it * COLS + lane * 16;
        if (col < w.C) {
            a.q = lda(ap.qs + e0 + col);
            a.d = __ldg(ap.d + ((e0 + col) >> 5));
        } else {
            a.q = zero4();
            a.d = 0.f;
        }
    }
    __device__ static void ipart(const F& f, const A& a, int, const Tabs&, int* o) {
        int s = dp4a(f.w.x, a.q.x, 0);
        s = dp4a(f.w.y, a.q.y, s);
        s = dp4a(f.w.z, a.q.z, s);
        o[0] = dp4a(f.w.w, a.q.w, s);
    }
    __device__ static S scales(const F& f, const A& a) { return S{f.d, a.d}; }
    __device__ static double term(const S& s, const int* i) {
        return __dmul_rn(__dmul_rn(h2d(s.wd), (double)s.xd), (double)i[0]);
    }
};

// Q2_K (repacked: qs [rows][nb][64], scales [rows][nb][16], (d,dmin) [rows][nb] as u32):
// 4 lanes per block (16 qs bytes each = 64 values), 8 blocks (2048 columns) per step.
template <> struct Ty<T_Q2_K> {
    static constexpr int COLS = 2048, LPB = 4, NI = 2;
    static constexpr double SCALE = 1.0;
    struct F { int4 q; uint2 sc; u32 dm; };
    struct A { int4 q8[4]; int4 bsv; float yd; };
    struct S { u32 dm; float yd; };
    __device__ static void zero(F& f) {
        f.q = zero4();
        f.sc = make_uint2(0, 0);
        f.dm = 0;
    }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int b = it * 8 + (lane >> 2);
        if (b < w.nb) {
            const i64 blk = row * w.nb + b;
            f.q = ldw(w.p0 + blk * 64 + (lane & 3) * 16);
            f.sc = __ldg((const uint2*)(w.p1 + blk * 16 + 8 * ((lane & 3) >> 1)));
            f.dm = __ldg((const u32*)w.p2 + blk);
        } else {
            zero(f);
        }
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int b = it * 8 + (lane >> 2);
        if (b < w.nb) {
            const int hp = lane & 3, n = hp >> 1, h = hp & 1;
            const i64 eb = e0 + (i64)b * 256;
            a.yd = __ldg(ap.d + (eb >> 8));
            a.bsv = lda(ap.bs + (eb >> 4) + 8 * n);  // bsums of groups 8n .. 8n+7
            const i8* q8 = ap.qs + eb + 128 * n + 16 * h;
#pragma unroll
            for (int j = 0; j < 4; j++) a.q8[j] = lda(q8 + 32 * j);
        } else {
            a.yd = 0.f;
            a.bsv = zero4();
#pragma unroll
            for (int j = 0; j < 4; j++) a.q8[j] = zero4();
        }
    }
    __device__ static void ipart(const F& f, const A& a, int lane, const Tabs&, int* o) {
        const int h = lane & 1;
        int isum = 0, summ = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int sh = 2 * j;
            int s = dp4a((f.q.x >> sh) & 0x03030303, a.q8[j].x, 0);
            s = dp4a((f.q.y >> sh) & 0x03030303, a.q8[j].y, s);
            s = dp4a((f.q.z >> sh) & 0x03030303, a.q8[j].z, s);
            s = dp4a((f.q.w >> sh) & 0x03030303, a.q8[j].w, s);
            // group g = 8n + 2j + h: scale byte (2j+h) of the 8-byte window sc
            const u32 sw = (j < 2) ? f.sc.x : f.sc.y;
            const int scb = (int)((sw >> (8 * (2 * (j & 1) + h))) & 0xffu);
            const int bw = (j == 0) ? a.bsv.x : (j == 1) ? a.bsv.y : (j == 2) ? a.bsv.z : a.bsv.w;
            const int bsum = (int)(short)(h ? (bw >> 16) : (bw & 0xffff));
            isum += (scb & 15) * s;
            summ += (scb >> 4) * bsum;
        }
        o[0] = isum;
        o[1] = summ;
    }
    __device__ static S scales(const F& f, const A& a) { return S{f.dm, a.yd}; }
    __device__ static double term(const S& s, const int* i) {
        const double dall = __dmul_rn((double)s.yd, h2d(s.dm));
        const double dm = __dmul_rn((double)s.yd, h2d(s.dm >> 16));
        return __dsub_rn(__dmul_rn(dall, (double)i[0]), __dmul_rn(dm, (double)i[1]));
    }
};

// Q4_K (GGUF layout, 144-byte blocks: d, dmin, scales[12], qs[128]): 8 lanes per block
// (16 qs bytes each = 32 values), 4 blocks (1024 columns) per step.
__device__ __forceinline__ int q4k_byte(const int4& hd, int i) {  // scales[i], i in 0..11
    u32 w = (i < 4) ? (u32)hd.y : (i < 8) ? (u32)hd.z : (u32)hd.w;
    return (int)((w >> (8 * (i & 3))) & 0xffu);
}
template <> struct Ty<T_Q4_K> {
    static constexpr int COLS = 1024, LPB = 8, NI = 2;
    static constexpr double SCALE = 1.0;
    struct F { int4 q; int4 hd; };
    struct A { int4 ql; int4 qh; int bs1; int bs2; float yd; };
    struct S { u32 dm; float yd; };
    __device__ static void zero(F& f) {
        f.q = zero4();
        f.hd = zero4();
    }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int b = it * 4 + (lane >> 3);
        if (b < w.nb) {
            const u8* blk = w.p0 + (row * w.nb + b) * 144;
            f.hd = ldw(blk);
            f.q = ldw(blk + 16 + (lane & 7) * 16);
        } else {
            zero(f);
        }
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int b = it * 4 + (lane >> 3);
        if (b < w.nb) {
            const int k = lane & 7, p = k >> 1, hh = k & 1;
            const i64 eb = e0 + (i64)b * 256;
            a.yd = __ldg(ap.d + (eb >> 8));
            a.ql = lda(ap.qs + eb + 64 * p + 16 * hh);
            a.qh = lda(ap.qs + eb + 64 * p + 32 + 16 * hh);
            const short* bs = ap.bs + (eb >> 4);
            a.bs1 = (int)__ldg(bs + 4 * p + hh);
            a.bs2 = (int)__ldg(bs + 4 * p + 2 + hh);
        } else {
            a.yd = 0.f;
            a.ql = zero4();
            a.qh = zero4();
            a.bs1 = 0;
            a.bs2 = 0;
        }
    }
    __device__ static void ipart(const F& f, const A& a, int lane, const Tabs&, int* o) {
        const int p = (lane & 7) >> 1;
        const int j1 = 2 * p, j2 = 2 * p + 1;
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
        int sa = dp4a(f.q.x & 0x0F0F0F0F, a.ql.x, 0);
        sa = dp4a(f.q.y & 0x0F0F0F0F, a.ql.y, sa);
        sa = dp4a(f.q.z & 0x0F0F0F0F, a.ql.z, sa);
        sa = dp4a(f.q.w & 0x0F0F0F0F, a.ql.w, sa);
        int sb = dp4a((f.q.x >> 4) & 0x0F0F0F0F, a.qh.x, 0);
        sb = dp4a((f.q.y >> 4) & 0x0F0F0F0F, a.qh.y, sb);
        sb = dp4a((f.q.z >> 4) & 0x0F0F0F0F, a.qh.z, sb);
        sb = dp4a((f.q.w >> 4) & 0x0F0F0F0F, a.qh.w, sb);
        o[0] = sc1 * sa + sc2 * sb;
        o[1] = m1 * a.bs1 + m2 * a.bs2;
    }
    __device__ static S scales(const F& f, const A& a) { return S{(u32)f.hd.x, a.yd}; }
    __device__ static double term(const S& s, const int* i) {
        const double dall = __dmul_rn((double)s.yd, h2d(s.dm));
        const double dm = __dmul_rn((double)s.yd, h2d(s.dm >> 16));
        return __dsub_rn(__dmul_rn(dall, (double)i[0]), __dmul_rn(dm, (double)i[1]));
    }
};

// IQ2_XXS (repacked: qs [rows][nb][64], d [rows][nb] f16): 4 lanes per block (two 32-groups
// each), 8 blocks (2048 columns) per step. The row result is 0.125 · Σ blocks.
template <> struct Ty<T_IQ2_XXS> {
    static constexpr int COLS = 2048, LPB = 4, NI = 1;
    static constexpr double SCALE = 0.125;
    struct F { int4 w; u32 d; };
    struct A { int4 q[4]; float d; };
    struct S { u32 wd; float yd; };
    __device__ static void zero(F& f) {
        f.w = zero4();
        f.d = 0;
    }
    __device__ static void load(F& f, const WP& w, i64 row, int it, int lane) {
        const int b = it * 8 + (lane >> 2);
        if (b < w.nb) {
            const i64 blk = row * w.nb + b;
            f.w = ldw(w.p0 + blk * 64 + (lane & 3) * 16);
            f.d = ldu16(w.p1 + 2 * blk);
        } else {
            zero(f);
        }
    }
    __device__ static void act(A& a, const AP& ap, const WP& w, i64 e0, int it, int lane) {
        const int b = it * 8 + (lane >> 2);
        if (b < w.nb) {
            const i64 eb = e0 + (i64)b * 256;
            a.d = __ldg(ap.d + (eb >> 8));
            const i8* q8 = ap.qs + eb + (lane & 3) * 64;
#pragma unroll
            for (int j = 0; j < 4; j++) a.q[j] = lda(q8 + 16 * j);
        } else {
            a.d = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++) a.q[j] = zero4();
        }
    }
    __device__ static void ipart(const F& f, const A& a, int, const Tabs& t, int* o) {
        o[0] = iq2_group((u32)f.w.x, (u32)f.w.y, a.q[0], a.q[1], t) +
               iq2_group((u32)f.w.z, (u32)f.w.w, a.q[2], a.q[3], t);
    }
    __device__ static S scales(const F& f, const A& a) { return S{f.d, a.d}; }
    __device__ static double term(const S& s, const int* i) {
        return __dmul_rn(__dmul_rn(h2d(s.wd), (double)s.yd), (double)i[0]);
    }
};

// ------------------------------------------------------------------------------------------
// Tile arithmetic shared by all kernels.

// v[i][*] (i < L) are this lane's partials for L row steps; afterwards v[0][*] holds, on the
// lane with (lane & (L-1)) == q, the sum over the L lanes of its group for row step q.
template <int L, int NI>
__device__ __forceinline__ void rscatter(int (&v)[L][NI], int lane) {
#pragma unroll
    for (int h = L / 2; h >= 1; h >>= 1) {
        const bool up = (lane & h) != 0;
#pragma unroll
        for (int i = 0; i < h; i++) {
#pragma unroll
            for (int c = 0; c < NI; c++) {
                const int send = up ? v[i][c] : v[i + h][c];
                const int keep = up ? v[i + h][c] : v[i][c];
                v[i][c] = keep + __shfl_xor_sync(FULL_MASK, send, h);
            }
        }
    }
}

// Accumulate one chunk: f[u][v] are the weights of virtual row v at step u (u < nu valid);
// actf(a, t, u) loads token t's activations of step u. Lane q's acc[t][g] is the f64 partial of
// row g·LPB + q (LPB = 1: of row g).
template <int T, int RR, int U, int NT, class ActFn>
__device__ __forceinline__ void accum_chunk(const typename Ty<T>::F (&f)[U][RR], int nu, int n,
                                            int lane, const Tabs& tb, ActFn actf,
                                            double (&acc)[NT][RR / Ty<T>::LPB]) {
    typedef Ty<T> K;
    constexpr int L = K::LPB;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (t < n) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (u < nu) {  // warp-uniform
                    typename K::A a;
                    actf(a, t, u);
                    if constexpr (L == 1) {
#pragma unroll
                        for (int v = 0; v < RR; v++) acc[t][v] += K::fpart(f[u][v], a);
                    } else {
                        const int q = lane & (L - 1);
#pragma unroll
                        for (int g = 0; g < RR / L; g++) {
                            int iv[L][K::NI];
                            typename K::S sc[L];
#pragma unroll
                            for (int i = 0; i < L; i++) {
                                K::ipart(f[u][g * L + i], a, lane, tb, iv[i]);
                                sc[i] = K::scales(f[u][g * L + i], a);
                            }
                            rscatter<L, K::NI>(iv, lane);
                            typename K::S my = sc[0];
#pragma unroll
                            for (int i = 1; i < L; i++)
                                if (q == i) my = sc[i];
                            acc[t][g] += K::term(my, iv[0]);
                        }
                    }
                }
            }
        }
    }
}

// Sum acc over the lanes that hold the same rows (lane bits ≥ log2 LPB).
template <int L, int NT, int NA>
__device__ __forceinline__ void lane_reduce(double (&acc)[NT][NA]) {
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int a = 0; a < NA; a++)
#pragma unroll
            for (int o = L; o < 32; o <<= 1) acc[t][a] += __shfl_xor_sync(FULL_MASK, acc[t][a], o);
}

// ------------------------------------------------------------------------------------------
// Dense (and grouped) matvec: y[t][rr] = W[rr] · x[t][m·C·grouped ..] for rows rr in
// [row0, row0 + nrows) (of RT; m = rr / Rm), n ≤ NT tokens. A block holds `split`·tpb warps:
// tpb tiles of RR rows, each split over `split` warps. Tiles never straddle two matrices (the
// host launches matrix by matrix when Rm is not a multiple of RR).
// GU (dense gate/up + SwiGLU, the shared expert): virtual row 2p of a tile is gate row r0+p,
// 2p+1 the up row (w2); y[t][r] = silu(min(g,c))·clamp(u,±c) (c ≤ 1e-6: no clamp).

template <int T>
__device__ __forceinline__ void swiglu_out(double gd, double ud, float clamp, double wt, float* o) {
    float g = (float)(Ty<T>::SCALE * gd), v = (float)(Ty<T>::SCALE * ud);
    if (clamp > 1e-6f) {
        g = fminf(g, clamp);
        v = fminf(fmaxf(v, -clamp), clamp);
    }
    const double gg = (double)g;
    const double silu = gg / (1.0 + exp(-gg));
    *o = (float)(silu * (double)v * wt);
}

template <int T, int NT, int RR, int U, bool GU>
__device__ __forceinline__ void dense_body(const WP& w, const WP& w2, const AP& ap, float* __restrict__ y,
                                           int RT, int row0, int nrows, int Rm, int Cx, int grouped,
                                           int n, int split, float clamp) {
    typedef Ty<T> K;
    constexpr int L = K::LPB, NA = RR / L, PRT = GU ? RR / 2 : RR;
    __shared__ double s_red[8][RR][NT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const Tabs tb = make_tabs(lane);
    const int tpb = (blockDim.x >> 5) / split, tl = warp / split, part = warp % split;
    const int nit = (w.C + K::COLS - 1) / K::COLS;
    const int s0 = part * nit / split, s1 = (part + 1) * nit / split;
    const int rend = row0 + nrows;
    const int ngroups = (nrows + tpb * PRT - 1) / (tpb * PRT);
    typename K::F f[U][RR];
    auto load_chunk = [&](int g, int s) {
        const int r0 = row0 + (g * tpb + tl) * PRT;
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int v = 0; v < RR; v++) {
                const int pr = r0 + (GU ? (v >> 1) : v);
                if (s + u < s1 && pr < rend) K::load(f[u][v], (GU && (v & 1)) ? w2 : w, pr, s + u, lane);
                else K::zero(f[u][v]);
            }
    };
    // Weight prologue (PDL_DEFERRED): the first chunk's weight loads and the lookup tables
    // read only weights, so they are issued before the wait for the previous kernel; the
    // activations are read after it.
    bool pre = false;
    if ((int)blockIdx.x < ngroups && s0 < s1) {
        load_chunk(blockIdx.x, s0);
        pre = true;
    }
    if (T == T_IQ2_XXS) {
        iq2_init(s_tab);
        __syncthreads();
    }
    pdl_wait();
    for (int g = blockIdx.x; g < ngroups; g += gridDim.x) {
        const int r0 = row0 + (g * tpb + tl) * PRT;
        const i64 eoff = grouped ? (i64)(r0 / Rm) * w.C : 0;
        double acc[NT][NA];
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int a = 0; a < NA; a++) acc[t][a] = 0.0;
        for (int s = s0; s < s1; s += U) {
            if (!pre) load_chunk(g, s);
            pre = false;
            accum_chunk<T, RR, U, NT>(
                f, min(U, s1 - s), n, lane, tb,
                [&](typename K::A& a, int t, int u) { K::act(a, ap, w, (i64)t * Cx + eoff, s + u, lane); },
                acc);
        }
        lane_reduce<L>(acc);
        if (split > 1) {
            // Combine the parts in a fixed order (part 0 first) through shared memory.
            if (lane < L) {
#pragma unroll
                for (int a = 0; a < NA; a++)
#pragma unroll
                    for (int t = 0; t < NT; t++) s_red[warp][a * L + lane][t] = acc[t][a];
            }
            __syncthreads();
            if (part == 0 && lane < L) {
#pragma unroll
                for (int a = 0; a < NA; a++)
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        double sum = s_red[warp][a * L + lane][t];
                        for (int p = 1; p < split; p++) sum += s_red[warp + p][a * L + lane][t];
                        acc[t][a] = sum;
                    }
            }
        }
        // Lane q < L of a part-0 warp holds virtual rows a·L + q (L = 1: lane 0 holds all).
        if (part == 0) {
            if constexpr (!GU) {
                if (lane < L) {
#pragma unroll
                    for (int a = 0; a < NA; a++) {
                        const int r = r0 + a * L + lane;
#pragma unroll
                        for (int t = 0; t < NT; t++)
                            if (t < n && r < rend) y[(i64)t * RT + r] = (float)(K::SCALE * acc[t][a]);
                    }
                }
            } else if constexpr (L == 1) {
                if (lane == 0) {
#pragma unroll
                    for (int p = 0; p < PRT; p++)
#pragma unroll
                        for (int t = 0; t < NT; t++)
                            if (t < n && r0 + p < rend)
                                swiglu_out<T>(acc[t][2 * p], acc[t][2 * p + 1], clamp, 1.0, y + (i64)t * RT + r0 + p);
                }
            } else {
#pragma unroll
                for (int a = 0; a < NA; a++)
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        const double other = __shfl_xor_sync(FULL_MASK, acc[t][a], 1);
                        const int pr = r0 + (a * L + lane) / 2;
                        if (lane < L && !(lane & 1) && t < n && pr < rend)
                            swiglu_out<T>(acc[t][a], other, clamp, 1.0, y + (i64)t * RT + pr);
                    }
            }
        }
        if (split > 1) __syncthreads();
    }
}

#define GEMV_ARGS                                                                                 \
    const u8 *p0, const u8 *p1, const u8 *p2, const i8 *aq, const float *ad, const short *abs_,   \
        const float *x, float *y, int RT, int row0, int nrows, int Rm, int C, int Cx, int grouped, \
        int n, int split
#define GEMV_INST(name, T, BS, NT, RR, U)                                                         \
    extern "C" __global__ void __launch_bounds__(256) ds4_gemv_##name##_##NT##_##RR##x##U(GEMV_ARGS) { PDL_DEFERRED(); \
        const WP w = {p0, p1, p2, C, C / BS};                                                     \
        const AP a = {aq, ad, abs_, x};                                                           \
        dense_body<T, NT, RR, U, false>(w, w, a, y, RT, row0, nrows, Rm, Cx, grouped, n, split, 0.f); \
    }
// Tile shapes (RR rows x U steps) per type and token count, in order of preference: keep in
// sync with Kind::dense_tiles in gemv.rs.
#define GEMV_FLOAT(name, T, BS)                                                                   \
    GEMV_INST(name, T, BS, 1, 1, 8)                                                               \
    GEMV_INST(name, T, BS, 1, 4, 2)                                                               \
    GEMV_INST(name, T, BS, 2, 1, 8)                                                               \
    GEMV_INST(name, T, BS, 2, 4, 2)                                                               \
    GEMV_INST(name, T, BS, 4, 1, 8)                                                               \
    GEMV_INST(name, T, BS, 8, 1, 8)
GEMV_FLOAT(f32, T_F32, 1)
GEMV_FLOAT(f16, T_F16, 1)
GEMV_FLOAT(bf16, T_BF16, 1)
GEMV_INST(q8_0, T_Q8_0, 32, 1, 4, 2)
GEMV_INST(q8_0, T_Q8_0, 32, 1, 2, 4)
GEMV_INST(q8_0, T_Q8_0, 32, 1, 2, 8)
GEMV_INST(q8_0, T_Q8_0, 32, 2, 4, 2)
GEMV_INST(q8_0, T_Q8_0, 32, 2, 2, 4)
GEMV_INST(q8_0, T_Q8_0, 32, 4, 2, 4)
GEMV_INST(q8_0, T_Q8_0, 32, 8, 2, 4)
#define GEMV_K4(name, T)                                                                          \
    GEMV_INST(name, T, 256, 1, 4, 2)                                                              \
    GEMV_INST(name, T, 256, 1, 8, 1)                                                              \
    GEMV_INST(name, T, 256, 2, 4, 2)                                                              \
    GEMV_INST(name, T, 256, 2, 8, 1)                                                              \
    GEMV_INST(name, T, 256, 4, 4, 2)                                                              \
    GEMV_INST(name, T, 256, 8, 4, 2)
GEMV_K4(q2_k, T_Q2_K)
GEMV_K4(iq2_xxs, T_IQ2_XXS)
GEMV_INST(q4_k, T_Q4_K, 256, 1, 8, 1)
GEMV_INST(q4_k, T_Q4_K, 256, 2, 8, 1)
GEMV_INST(q4_k, T_Q4_K, 256, 4, 8, 1)
GEMV_INST(q4_k, T_Q4_K, 256, 8, 8, 1)

// Dense gate/up + SwiGLU (shared expert), split-K like the matvec; y = mid [n][R].
#define GATE_UP_ARGS                                                                              \
    const u8 *g0, const u8 *g1, const u8 *g2, const u8 *u0, const u8 *u1, const u8 *u2,          \
        const i8 *aq, const float *ad, const short *abs_, const float *x, float *mid, int R,      \
        int C, int n, int split, float clamp
#define GATE_UP_INST(name, T, BS, NT, RR, U)                                                      \
    extern "C" __global__ void __launch_bounds__(256) ds4_gate_up_##name##_##NT##_##RR##x##U(GATE_UP_ARGS) { PDL_DEFERRED(); \
        const WP wg = {g0, g1, g2, C, C / BS};                                                    \
        const WP wu = {u0, u1, u2, C, C / BS};                                                    \
        const AP a = {aq, ad, abs_, x};                                                           \
        dense_body<T, NT, RR, U, true>(wg, wu, a, mid, R, 0, R, R, C, 0, n, split, clamp);        \
    }
// Keep in sync with Kind::gate_up_dense_tiles in gemv.rs.
#define GATE_UP_ALL_NT(name, T, BS, RR, U)                                                        \
    GATE_UP_INST(name, T, BS, 1, RR, U)                                                           \
    GATE_UP_INST(name, T, BS, 2, RR, U)                                                           \
    GATE_UP_INST(name, T, BS, 4, RR, U)                                                           \
    GATE_UP_INST(name, T, BS, 8, RR, U)
GATE_UP_ALL_NT(f32, T_F32, 1, 2, 4)
GATE_UP_ALL_NT(f16, T_F16, 1, 2, 4)
GATE_UP_ALL_NT(bf16, T_BF16, 1, 2, 4)
GATE_UP_INST(q8_0, T_Q8_0, 32, 1, 4, 2)
GATE_UP_INST(q8_0, T_Q8_0, 32, 1, 2, 4)
GATE_UP_INST(q8_0, T_Q8_0, 32, 2, 4, 2)
GATE_UP_INST(q8_0, T_Q8_0, 32, 4, 2, 4)
GATE_UP_INST(q8_0, T_Q8_0, 32, 8, 2, 4)
GATE_UP_ALL_NT(q2_k, T_Q2_K, 256, 4, 2)
GATE_UP_ALL_NT(q4_k, T_Q4_K, 256, 8, 1)
GATE_UP_ALL_NT(iq2_xxs, T_IQ2_XXS, 256, 4, 2)

// ------------------------------------------------------------------------------------------
// Routed MoE gate/up + SwiGLU: one warp per (token t, slot j, tile of RR/2 rows) of expert
// ids[t][j]; virtual row 2p is the gate row r0+p, 2p+1 the up row. g, u are the f32 row
// results (double accumulation, one rounding); mid[t][j][r] = silu(min(g,c))·clamp(u,±c)·w_tj
// computed in double like the CPU (clamp skipped when c ≤ 1e-6). ids == null: dense (one
// matrix, k = 1, w = 1). An id outside [0, n_mat) writes NaN.

template <int T, int RR, int U>
__device__ __forceinline__ void gate_up_body(const WP& wg, const WP& wu, const AP& ap,
                                             const int* __restrict__ ids, const float* __restrict__ wts,
                                             float* __restrict__ mid, int Rm, int n_mat, int n, int k,
                                             float clamp) {
    typedef Ty<T> K;
    constexpr int L = K::LPB, NA = RR / L, PR = RR / 2;
    const int lane = threadIdx.x & 31;
    const Tabs tb = make_tabs(lane);
    const int tiles = (Rm + PR - 1) / PR;
    const int units = n * k * tiles;  // < 2^31 (checked on the host): 32-bit index math
    const int nw = gridDim.x * (blockDim.x >> 5);
    const int nit = (wg.C + K::COLS - 1) / K::COLS;
    typename K::F f[U][RR];
    auto load_chunk = [&](int e, int r0, int s) {
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int v = 0; v < RR; v++) {
                const int pr = r0 + (v >> 1);
                if (s + u < nit && pr < Rm) K::load(f[u][v], (v & 1) ? wu : wg, (i64)e * Rm + pr, s + u, lane);
                else K::zero(f[u][v]);
            }
    };
    auto expert = [&](int tj) {
        const int e = ids ? __ldg(ids + tj) : 0;
        return (e < 0 || e >= n_mat) ? -1 : e;
    };
    // PDL_DEFERRED: the lookup tables (constants) are filled before the wait for the previous
    // kernel; the expert ids (and so every weight address) only after it.
    if (T == T_IQ2_XXS) {
        iq2_init(s_tab);
        __syncthreads();
    }
    pdl_wait();
    int u = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool pre = false;
    if (u < units) {
        const int e = expert((unsigned)u / (unsigned)tiles);
        if (e >= 0) {
            load_chunk(e, (int)((unsigned)u % (unsigned)tiles) * PR, 0);
            pre = true;
        }
    }
    for (; u < units; u += nw) {
        const int tj = (int)((unsigned)u / (unsigned)tiles);
        const int r0 = (int)((unsigned)u % (unsigned)tiles) * PR;
        const int t = (int)((unsigned)tj / (unsigned)k);
        const int e = expert(tj);
        if (e < 0) {
            if (lane < PR && r0 + lane < Rm) mid[(i64)tj * Rm + r0 + lane] = __int_as_float(0x7fc00000);
            pre = false;
            continue;
        }
        double acc[1][NA];
#pragma unroll
        for (int a = 0; a < NA; a++) acc[0][a] = 0.0;
        for (int s = 0; s < nit; s += U) {
            if (!pre) load_chunk(e, r0, s);
            pre = false;
            accum_chunk<T, RR, U, 1>(
                f, min(U, nit - s), 1, lane, tb,
                [&](typename K::A& a, int, int uu) { K::act(a, ap, wg, (i64)t * wg.C, s + uu, lane); }, acc);
        }
        lane_reduce<L>(acc);
        const double wt = ids ? (double)__ldg(wts + tj) : 1.0;
        if constexpr (L == 1) {
            if (lane == 0) {
#pragma unroll
                for (int p = 0; p < PR; p++)
                    if (r0 + p < Rm) swiglu_out<T>(acc[0][2 * p], acc[0][2 * p + 1], clamp, wt, mid + (i64)tj * Rm + r0 + p);
            }
        } else {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const double other = __shfl_xor_sync(FULL_MASK, acc[0][a], 1);
                const int pr = r0 + (a * L + lane) / 2;
                if (lane < L && !(lane & 1) && pr < Rm) swiglu_out<T>(acc[0][a], other, clamp, wt, mid + (i64)tj * Rm + pr);
            }
        }
    }
}

#define MOE_GU_ARGS                                                                           \
    const u8 *g0, const u8 *g1, const u8 *g2, const u8 *u0, const u8 *u1, const u8 *u2,      \
        const i8 *aq, const float *ad, const short *abs_, const float *x, const int *ids,     \
        const float *wts, float *mid, int R, int C, int n_mat, int n, int k, float clamp
// Tile shapes and variants (MINB: min resident blocks, a register cap): keep in sync with
// Kind::gate_up_variants in gemv.rs.
#define MOE_GU_INST(name, T, BS, RR, U, MINB)                                                 \
    extern "C" __global__ void __launch_bounds__(256, MINB) ds4_moe_gate_up_##name(MOE_GU_ARGS) { PDL_DEFERRED(); \
        const WP wg = {g0, g1, g2, C, C / BS};                                                \
        const WP wu = {u0, u1, u2, C, C / BS};                                                \
        const AP a = {aq, ad, abs_, x};                                                       \
        gate_up_body<T, RR, U>(wg, wu, a, ids, wts, mid, R, n_mat, n, k, clamp);              \
    }
MOE_GU_INST(f32, T_F32, 1, 2, 4, 1)
MOE_GU_INST(f16, T_F16, 1, 2, 4, 1)
MOE_GU_INST(bf16, T_BF16, 1, 2, 4, 1)
MOE_GU_INST(q8_0, T_Q8_0, 32, 2, 4, 1)
MOE_GU_INST(q2_k, T_Q2_K, 256, 4, 2, 1)
MOE_GU_INST(q4_k, T_Q4_K, 256, 8, 1, 1)
MOE_GU_INST(iq2_xxs, T_IQ2_XXS, 256, 4, 2, 1)
MOE_GU_INST(iq2_xxs_lb3, T_IQ2_XXS, 256, 4, 2, 3)

// ------------------------------------------------------------------------------------------
// Routed MoE down: out[t][r] = (float) Σ_j (double)(float)(scale · acc_j), acc_j the double
// accumulator of down[ids[t][j]][r] · act[t·k + j]: each expert's row result is rounded to f32 as
// the CPU's per-expert matvec does, then the k slots are summed in double in slot order (numerics
// contract). A block holds `split`·tpb warps: tpb tiles of RR rows of one token; the tile's
// virtual steps (slot j, column step) are split over `split` = k·m warps, m per slot, combined
// through shared memory in a fixed order. An id outside [0, n_mat) gives NaN for the token's
// outputs.

template <int T, int RR, int U>
__device__ __forceinline__ void down_body(const WP& w, const AP& ap, const int* __restrict__ ids,
                                          float* __restrict__ out, int Rm, int n_mat, int n, int k,
                                          int split) {
    typedef Ty<T> K;
    constexpr int L = K::LPB, NA = RR / L;
    __shared__ double s_red[8][RR];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const Tabs tb = make_tabs(lane);
    const int tpb = (blockDim.x >> 5) / split, tl = warp / split, part = warp % split;
    const int nit = (w.C + K::COLS - 1) / K::COLS;
    const int vs = k * nit;
    const int s0 = part * vs / split, s1 = (part + 1) * vs / split;
    const int tiles = (Rm + RR - 1) / RR;
    const int gpt = (tiles + tpb - 1) / tpb;
    const int ngroups = n * gpt;
    typename K::F f[U][RR];
    auto load_chunk = [&](int g, int s) {
        const int t = g / gpt;
        const int r0 = ((g % gpt) * tpb + tl) * RR;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = nit == 1 ? s + u : (s + u) / nit, it = (s + u) - j * nit;
            int e = (s + u < s1) ? __ldg(ids + (i64)t * k + j) : 0;
            if (e < 0 || e >= n_mat) e = 0;  // the output is NaN anyway
#pragma unroll
            for (int v = 0; v < RR; v++) {
                if (s + u < s1 && r0 + v < Rm) K::load(f[u][v], w, (i64)e * Rm + r0 + v, it, lane);
                else K::zero(f[u][v]);
            }
        }
    };
    bool pre = false;
    if ((int)blockIdx.x < ngroups && s0 < s1) {
        load_chunk(blockIdx.x, s0);
        pre = true;
    }
    if (T == T_IQ2_XXS) {
        iq2_init(s_tab);
        __syncthreads();
    }
    for (int g = blockIdx.x; g < ngroups; g += gridDim.x) {
        const int t = g / gpt;
        const int r0 = ((g % gpt) * tpb + tl) * RR;
        bool bad = false;
        for (int j = 0; j < k; j++) {
            const int e = __ldg(ids + (i64)t * k + j);
            bad |= e < 0 || e >= n_mat;
        }
        double acc[1][NA];
#pragma unroll
        for (int a = 0; a < NA; a++) acc[0][a] = 0.0;
        for (int s = s0; s < s1; s += U) {
            if (!pre) load_chunk(g, s);
            pre = false;
            accum_chunk<T, RR, U, 1>(
                f, min(U, s1 - s), 1, lane, tb,
                [&](typename K::A& a, int, int uu) {
                    const int j = nit == 1 ? s + uu : (s + uu) / nit, it = (s + uu) - j * nit;
                    K::act(a, ap, w, ((i64)t * k + j) * w.C, it, lane);
                },
                acc);
        }
        lane_reduce<L>(acc);
        if (lane < L) {
#pragma unroll
            for (int a = 0; a < NA; a++) s_red[warp][a * L + lane] = acc[0][a];
        }
        if (split > 1) __syncthreads();
        if (part == 0 && lane < L) {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const int r = r0 + a * L + lane;
                // split = k·m (the host guarantees it): parts j·m .. j·m+m-1 cover exactly slot
                // j. Each slot's row result is rounded to f32 (the CPU's per-expert matvec),
                // then the k slots are summed in double in slot order.
                const int m = split / k;
                double tot = 0.0;
                for (int j = 0; j < k; j++) {
                    double sj = 0.0;
                    for (int q = 0; q < m; q++) sj += s_red[warp + j * m + q][a * L + lane];
                    tot += (double)(float)(K::SCALE * sj);
                }
                if (r < Rm) out[(i64)t * Rm + r] = bad ? __int_as_float(0x7fc00000) : (float)tot;
            }
        }
        if (split > 1) __syncthreads();
    }
}

#define MOE_DOWN_ARGS                                                                         \
    const u8 *p0, const u8 *p1, const u8 *p2, const i8 *aq, const float *ad, const short *abs_, \
        const float *x, const int *ids, float *out, int R, int C, int n_mat, int n, int k, int split
// Tile shapes and variants: keep in sync with Kind::down_variants in gemv.rs.
#define MOE_DOWN_INST(name, T, BS, RR, U)                                                     \
    extern "C" __global__ void __launch_bounds__(256) ds4_moe_down_##name(MOE_DOWN_ARGS) { PDL_ENTRY();    \
        const WP w = {p0, p1, p2, C, C / BS};                                                 \
        const AP a = {aq, ad, abs_, x};                                                       \
        down_body<T, RR, U>(w, a, ids, out, R, n_mat, n, k, split);                           \
    }
MOE_DOWN_INST(f32, T_F32, 1, 1, 8)
MOE_DOWN_INST(f16, T_F16, 1, 1, 8)
MOE_DOWN_INST(bf16, T_BF16, 1, 1, 8)
MOE_DOWN_INST(q8_0, T_Q8_0, 32, 2, 4)
MOE_DOWN_INST(q2_k, T_Q2_K, 256, 4, 2)
MOE_DOWN_INST(q4_k, T_Q4_K, 256, 8, 1)
MOE_DOWN_INST(iq2_xxs, T_IQ2_XXS, 256, 4, 2)
MOE_DOWN_INST(q2_k_4x1, T_Q2_K, 256, 4, 1)
MOE_DOWN_INST(iq2_xxs_4x1, T_IQ2_XXS, 256, 4, 1)
// Register-capped (3 resident blocks of 256 threads) form of the 4×1 tiles.
#define MOE_DOWN_INST_LB(name, T, BS, RR, U, MINB)                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) ds4_moe_down_##name(MOE_DOWN_ARGS) { PDL_ENTRY(); \
        const WP w = {p0, p1, p2, C, C / BS};                                                 \
        const AP a = {aq, ad, abs_, x};                                                       \
        down_body<T, RR, U>(w, a, ids, out, R, n_mat, n, k, split);                           \
    }
MOE_DOWN_INST_LB(q2_k_4x1_lb3, T_Q2_K, 256, 4, 1, 3)
MOE_DOWN_INST_LB(iq2_xxs_4x1_lb3, T_IQ2_XXS, 256, 4, 1, 3)

// ------------------------------------------------------------------------------------------
// Activation quantization (ds4 CPU numerics, model-spec §3.0 / §5.6).

// Q8_0 activations: d = amax/127 (IEEE division), id = d ? 1/d : 0, q = clamp(rint(x·id),
// -128, 127) (round-half-even; NaN → 0 like the CPU's saturating cast). Eight lanes per
// 32-block, four consecutive values (one float4) per lane, so a warp covers four blocks per
// step; QQ_UNROLL steps are loaded before any is reduced. nblocks·32 floats, 16-byte aligned.
#define QQ_UNROLL 4
extern "C" __global__ void ds4_quant_q8_0(const float* __restrict__ x, i8* __restrict__ qs,
                                          float* __restrict__ d, i64 nblocks) {
    PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    const i64 nw = (i64)gridDim.x * (blockDim.x >> 5);
    const i64 ngroups = (nblocks + 3) >> 2;  // groups of 4 blocks (128 floats) per warp step
    const i64 w0 = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    for (i64 g0 = w0; g0 < ngroups; g0 += nw * QQ_UNROLL) {
        float4 v[QQ_UNROLL];
#pragma unroll
        for (int r = 0; r < QQ_UNROLL; r++) {
            const i64 b = (g0 + r * nw) * 4 + (lane >> 3);
            v[r] = b < nblocks ? ((const float4*)x)[b * 8 + (lane & 7)] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int r = 0; r < QQ_UNROLL; r++) {
            const i64 b = (g0 + r * nw) * 4 + (lane >> 3);
            const float e[4] = {v[r].x, v[r].y, v[r].z, v[r].w};
            float am = 0.f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float a = fabsf(e[k]);
                if (a > am) am = a;  // NaN never wins (CPU: `a > amax` is false)
            }
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(FULL_MASK, am, o));
            if (b >= nblocks) continue;
            const float dd = am / 127.0f;
            const float id = dd != 0.f ? 1.0f / dd : 0.f;
            u32 word = 0;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                word |= (u32)(q8_round(e[k], id) & 255) << (8 * k);
            }
            ((u32*)qs)[b * 8 + (lane & 7)] = word;
            if ((lane & 7) == 0) d[b] = dd;
        }
    }
}

// Q8_K activations: one warp per 256-block, 8 consecutive values per lane. max = the value of
// largest |x| (first on ties), iscale = -127/max, q = clamp(rint(iscale·x)), bsums per 16,
// d = 1/iscale; an all-zero block gives d = 0, q = 0.
extern "C" __global__ void ds4_quant_q8_k(const float* __restrict__ x, i8* __restrict__ qs,
                                          float* __restrict__ d, short* __restrict__ bs, i64 nblocks) {
    PDL_ENTRY();
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
    PDL_ENTRY();
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
    PDL_ENTRY();
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
    PDL_ENTRY();
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
    PDL_ENTRY();
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
