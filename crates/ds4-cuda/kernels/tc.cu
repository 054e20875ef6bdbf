// Tensor-core prefill routes (owner: "tc"). See src/tc.rs for the API, the switches and the
// numerics contract.
//
// Self-contained but for iq2_grid.cuh, which build.rs splices in for NVRTC, so that NVRTC can
// compile it as well as nvcc.
//
// Two mma.sync GEMM templates, one per group of weight types, and a wgmma one for dense Q8_0:
//   d0::Lay / d0::Tc  Q8_0 and F16 (ds4_tc_q8_0_*, ds4_tc_f16_64_s; TC_INST_D0): the weights are
//                     copied into shared memory as stored. This is the code of commit b0637e2,
//                     kept as it was (same SASS as b0637e2 with PDL_ENTRY() added).
//   Lay / Tc          IQ2_XXS, Q2_K and Q4_K (ds4_tc_iq2_xxs_*, ds4_tc_q2_k_*, ds4_tc_q4_k_*;
//                     TC_INST): raw blocks copied, then dequantised to int8 in shared memory once
//                     per stage. The session-4 rewrite for the routed MoE experts (IQ2_XXS
//                     gate/up, Q2_K down): per-row address tables, interleaved warp columns,
//                     tiles past the valid pairs skipped, register IQ2_XXS signs, Q2_K mins from
//                     activation sums. Session 6: IQ2_XXS dequant through grid-code and sign
//                     tables forming a prmt selector into the ±grid palette; IQ2_XXS / Q2_K
//                     mmas of the warp's valid n8 tiles in warp-uniform code (no predicated
//                     mma.sync, no WARPSYNC per mma).
//   wg                dense Q8_0 with wgmma (ds4_tc_q8_0_wg64_*, sm_90a; see the section): the
//                     default for dense chunks of more than 32 tokens, 1.4-1.5x d0 on an H100.
// The mma.sync templates are two because the rewrite's skeleton changes measured 3-10% slower for the latency-
// bound Q8_0 / F16 kernels on an H200 (bench/results/h200/tc-prefill.md, "Session 4"); each
// template holds only the code of its own types. Both serve dense matrices (tokens) and routed
// experts (MoE pair lists, P.list), in M_STORE and M_SWIGLU modes.
//
// Common skeleton: a CTA computes a 128-row (weights) × BN-token tile with 8 warps (4 along the
// rows × 2 along the tokens, warp tile 32 × BN/2) using mma.sync m16n8k32 s8·s8→s32 (quantized
// weights × ds4's int8 activations) or m16n8k16 f16·f16→f32 (F16 weights). K advances in stages
// of 256 bytes per row (8 steps of 32 bytes: 32 int8 or 16 f16), loaded with cp.async into a
// 2- or 3-stage shared-memory ring (XOR-swizzled 16-byte chunks, read with ldmatrix).
//
// Exactness (int8 routes): every mma K-step of 32 covers exactly one Q8_0 block or one 32-wide
// sub-block, so each per-block integer dot product is exact; block scales are applied as ds4
// does on the CPU:
//   Q8_0    acc += (d_w·d_x) · isum               (one FMA per block; the CPU rounds the product
//                                                  (d_w·d_x)·isum before adding)
//   IQ2_XXS isum = Σ_sub ls·Σ q8·(±grid)           (s32), acc += (d·yd)·isum, y = 0.125·acc
//   Q2_K    isum = Σ (sc&15)·q2·q8 (scale folded into the int8 weight, ≤ 45),
//           summ = Σ_j (sc_j>>4)·Σ_{k in j} q8 (per-16 activation sums × the mins: two
//           m16n8k16 mmas per stage),
//           acc += (yd·d)·isum − (yd·dmin)·summ
//   Q4_K    isum = Σ_sub sc·Σ q4·q8 (s32), summ = Σ min·q8 (second mma with the 6-bit mins
//           broadcast as the A operand), acc += (yd·d)·isum − (yd·dmin)·summ
// so the result differs from the CPU only by the order of the f32 sum over blocks (and, for
// Q8_0, one rounding per block term).
// F16: y = W·x with x split into two f16 halves, x·2^e = hi + lo (2^e a per-token power of two
// that puts max|x| in [2^14, 2^15)): two f16 mmas with f32 accumulation, then ·2^-e. W is
// exact in f16, hi+lo carries 22 bits of x: near-f32 results.

#include "common.cuh"

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define TC_THREADS 256
#define TC_BM 128
#define MAGIC_I 0x4B400000
#define MAGIC_F 12582912.0f

enum { W_Q8_0 = 0, W_IQ2 = 1, W_Q2K = 2, W_Q4K = 3, W_F16 = 4 };
enum { M_STORE = 0, M_SWIGLU = 1 };

// Kernel parameters (mirrored by `TcArgs` in src/tc.rs: 15 pointers, then 12 ints and a float).
struct TcArgs {
    const u8* wa0;  // weight tensor 0 (the matrix; gate in SWIGLU mode): regions 0, 1, 2
    const u8* wa1;
    const u8* wa2;
    const u8* wb0;  // weight tensor 1 (up in SWIGLU mode)
    const u8* wb1;
    const u8* wb2;
    const u8* aq;        // activations: int8 qs [rows][Cx], or f16 hi
    const u8* ad;        // f32 block scales (Q8_0: per 32, K-quants: per 256), or f16 lo
    const float* ascale; // F16: per activation row multiplier (2^-e)
    const int* list;     // MoE: pair permutation (null: dense)
    const int* cnt;      // MoE: pairs per expert
    const int* off;      // MoE: first pair of each expert in `list`
    const int* toff;     // MoE: first tile of each expert, [n_exp + 1]
    const float* wts;    // SWIGLU: routing weight per output row (null: 1)
    float* y;
    int R;        // rows per matrix
    int C;        // columns per matrix
    int nb;       // weight blocks per row (Q8_0: C/32, K-quants: C/256)
    int Cx;       // activation row stride (elements)
    int grouped;  // dense grouped (attn out_a): matrix z reads columns z·C.., writes rows z·R..
    int n;        // dense: tokens
    int n_exp;    // MoE: experts
    int kdiv;     // activation row = source row / kdiv
    int ldy;      // output row stride (floats)
    int kspl;     // K stages per split (split-K: blockIdx.z = group · nspl + split)
    int nspl;     // splits (> 1: split s writes partial sums to y + s·ysplit)
    int ysplit;   // floats between split outputs
    float clamp;  // SWIGLU clamp (≤ 1e-6: none)
};

__device__ __forceinline__ float h2f(u32 h) {
    float f;
    unsigned short hs = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hs));
    return f;
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
// d = a·b + c (s8 × s8 → s32, m16n8k32)
__device__ __forceinline__ void mma_s8(int* d, const u32* a, u32 b0, u32 b1, const int* c) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]),
          "r"(c[2]), "r"(c[3]));
}
// d = a·b + c (s8 × s8 → s32, m16n8k16)
__device__ __forceinline__ void mma_s8k16(int* d, u32 a0, u32 a1, u32 b0, const int* c) {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
}
// Byte permute (selector nibbles of c: bits 0..2 pick a byte of {b, a}; bit 3 must be 0 here).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 c) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// d += a·b (f16 × f16 → f32, m16n8k16)
__device__ __forceinline__ void mma_f16(float* d, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `ch` (0..15) of row `r` in a 256-byte-row tile (XOR swizzle:
// the 8 rows an ldmatrix reads hit 8 different bank groups).
__device__ __forceinline__ int swz(int r, int ch) { return r * 256 + ((ch ^ (r & 7)) << 4); }

__host__ __device__ constexpr int al128(int x) { return (x + 127) / 128 * 128; }

#include "iq2_grid.cuh"

// Q4_K get_scale_min_k4 (ggml): sub-block j of the 12 packed scale bytes q.
__device__ __forceinline__ void q4k_scale_min(int j, const u8* q, int& sc, int& mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}


// Output row and weight tensor (0/1) of shared-memory A row j (both templates). SWIGLU tiles
// hold 64 output rows as gate/up groups of 16: A rows 32i..32i+15 are gate rows r0+16i..,
// A rows 32i+16..32i+31 the same rows of up.
template <int MODE>
__device__ __forceinline__ int tc_out_row(int r0, int j, int& mat) {
    if (MODE == M_SWIGLU) {
        mat = (j >> 4) & 1;
        return r0 + 16 * (j >> 5) + (j & 15);
    }
    mat = 0;
    return r0 + j;
}

// Which B rows (tokens / (token, slot) pairs) and which matrix the CTA takes, for both
// templates' run(P): sets m (matrix / expert), base and nvalid (B rows base..base+nvalid-1 of
// the pair list P.list, else tokens) and sp (K split; left alone for a pair list), and returns
// from run() when the CTA has nothing to do. A macro, not a function: the same code as an
// inline function returning a bool changes the SASS of all 17 GEMM kernels.
#define TC_TILE_OR_RETURN(P, BN, m, nvalid, base, sp)                                              \
    do {                                                                                           \
        if ((P).list) {                                                                            \
            const int i_ = blockIdx.x;                                                             \
            if (i_ >= __ldg((P).toff + (P).n_exp)) return;                                         \
            int lo_ = 0, hi_ = (P).n_exp; /* toff[lo_] <= i_ < toff[hi_] */                        \
            while (hi_ - lo_ > 1) {                                                                \
                const int mid_ = (lo_ + hi_) >> 1;                                                 \
                if (__ldg((P).toff + mid_) <= i_) lo_ = mid_;                                      \
                else hi_ = mid_;                                                                   \
            }                                                                                      \
            (m) = lo_;                                                                             \
            const int start_ = (i_ - __ldg((P).toff + (m))) * (BN);                                \
            (nvalid) = min((BN), __ldg((P).cnt + (m)) - start_);                                   \
            (base) = __ldg((P).off + (m)) + start_;                                                \
        } else {                                                                                   \
            (m) = blockIdx.z / (P).nspl;                                                           \
            (sp) = blockIdx.z % (P).nspl;                                                          \
            (base) = blockIdx.x * (BN);                                                            \
            (nvalid) = min((BN), (P).n - (base));                                                  \
        }                                                                                          \
        if ((nvalid) <= 0) return;                                                                 \
    } while (0)

// Epilogue of one output column c of n8 tile ni (B row src), for both templates: the
// accumulators times cs; M_STORE writes y[src][rows] (split sp, grouped matrix m), M_SWIGLU
// (gate = facc[0], up = facc[1]) writes silu(min(g, clamp))·clamp(u, ±clamp)·wts[src].
template <int MODE, int NT>
__device__ __forceinline__ void tc_store_col(const TcArgs& P, const float (&facc)[2][NT][4], int ni,
                                             int c, int src, float cs, int m, int sp, int r0, int wm,
                                             int g) {
    if (MODE == M_STORE) {
        float* yrow = P.y + (i64)sp * P.ysplit + (i64)src * P.ldy + (P.grouped ? (i64)m * P.R : 0);
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = r0 + 32 * wm + 16 * mi + g + 8 * h;
                if (r < P.R) yrow[r] = __fmul_rn(cs, facc[mi][ni][2 * h + c]);
            }
    } else {
        const double wt = P.wts ? (double)__ldg(P.wts + src) : 1.0;
        float* yrow = P.y + (i64)src * P.ldy;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = r0 + 16 * wm + g + 8 * h;
            if (r >= P.R) continue;
            float gv = __fmul_rn(cs, facc[0][ni][2 * h + c]);
            float uv = __fmul_rn(cs, facc[1][ni][2 * h + c]);
            if (P.clamp > 1e-6f) {
                gv = fminf(gv, P.clamp);
                uv = fminf(fmaxf(uv, -P.clamp), P.clamp);
            }
            const double gd = (double)gv;
            const double silu = gd / (1.0 + exp(-gd));
            yrow[r] = (float)(silu * (double)uv * wt);
        }
    }
}

// ------------------------------------------------------------------------------------------
// d0: the direct-copy kernels (Q8_0, F16: ds4_tc_q8_0_*, ds4_tc_f16_64_s; dense matrices and,
// for Q8_0, routed experts), the code of commit b0637e2 (their SASS is that of b0637e2's
// kernels with the PDL_ENTRY() added since).
// The weights are used as stored (no dequantisation): cp.async copies them straight into the
// stage's A tile. The session-4 rewrite below (per-row address tables, interleaved warp columns,
// empty-tile skipping) measured 3-10% slower for these latency-bound kernels on an H200
// (bench/results/h200/tc-prefill.md, "Session 4"), so they keep this code.
namespace d0 {
// Shared-memory layout of one kernel variant: s_src / s_arow, then the NS-stage ring.
template <int T, int BN>
struct Lay {
    // Pipeline depth and CTAs per SM: two CTAs of 2 stages for Q8_0, one CTA of 3 for F16.
    static constexpr int NS = (T == W_F16) ? 3 : 2;
    static constexpr int MINB = (NS == 2) ? 2 : 1;
    static constexpr int A_ST = TC_BM * 256;                        // weights, 256 bytes a row
    static constexpr int AM_ST = (T == W_Q8_0) ? TC_BM * 16 : 0;    // Q8_0: f16 d of 8 blocks a row
    static constexpr int B_ST = BN * 256 * (T == W_F16 ? 2 : 1);     // activations (F16: hi, lo)
    static constexpr int BM_ST = (T == W_Q8_0) ? BN * 32 : 0;       // Q8_0: f32 scale of 8 blocks
    static constexpr int S_A = 0;
    static constexpr int S_AM = al128(A_ST);
    static constexpr int S_B = S_AM + al128(AM_ST);
    static constexpr int S_BM = S_B + al128(B_ST);
    static constexpr int STAGE = S_BM + al128(BM_ST);
    static constexpr int O_SRC = 0;
    static constexpr int O_AROW = BN * 4;
    static constexpr int O_ST = al128(2 * BN * 4);
    static constexpr int TOTAL = O_ST + NS * STAGE;
};

template <int T, int BN, int MODE>
struct Tc {
    typedef Lay<T, BN> L;
    static constexpr int NT = BN / 16;  // n8 tiles per warp (warp tile BN/2 tokens)
    static constexpr int WTN = BN / 2;
    static constexpr int OUTR = (MODE == M_SWIGLU) ? TC_BM / 2 : TC_BM;

    __device__ static void issue(const TcArgs& P, u8* sm, int kb, int buf, int m, int r0, int CB,
                                 int acol) {
        const int tid = threadIdx.x;
        u8* st = sm + L::O_ST + buf * L::STAGE;
        const int* s_arow = (const int*)(sm + L::O_AROW);
        const int kbyte = kb * 256;
        // ---- A
        for (int c = tid; c < TC_BM * 16; c += TC_THREADS) {
            const int j = c >> 4, ch = c & 15;
            if (kbyte + 16 * ch < CB) {
                int mat;
                const int r = min(tc_out_row<MODE>(r0, j, mat), P.R - 1);
                const i64 rr = (i64)m * P.R + r;
                const u8* src = (mat ? P.wb0 : P.wa0) + rr * CB + kbyte + 16 * ch;
                cp16(st + L::S_A + swz(j, ch), src);
            }
        }
        if (T == W_Q8_0) {
            for (int c = tid; c < TC_BM * 4; c += TC_THREADS) {
                const int j = c >> 2, w = c & 3;
                if (8 * kb + 2 * w < P.nb) {
                    int mat;
                    const int r = min(tc_out_row<MODE>(r0, j, mat), P.R - 1);
                    const i64 rr = (i64)m * P.R + r;
                    const u8* src = (mat ? P.wb1 : P.wa1) + 2 * (rr * P.nb + 8 * kb + 2 * w);
                    cp4(st + L::S_AM + j * 16 + 4 * w, src);
                }
            }
        }
        // ---- B (activation rows of this tile)
        const int esz = (T == W_F16) ? 2 : 1;
        for (int c = tid; c < BN * 16; c += TC_THREADS) {
            const int b = c >> 4, ch = c & 15;
            if (kbyte + 16 * ch < CB) {
                const i64 e0 = (i64)s_arow[b] * P.Cx + acol;
                const i64 o = e0 * esz + kbyte + 16 * ch;
                cp16(st + L::S_B + swz(b, ch), P.aq + o);
                if (T == W_F16) cp16(st + L::S_B + BN * 256 + swz(b, ch), P.ad + o);
            }
        }
        if (T == W_Q8_0) {
            for (int c = tid; c < BN * 8; c += TC_THREADS) {
                const int b = c >> 3, s = c & 7;
                if (8 * kb + s < P.nb) {
                    const i64 e0 = (i64)s_arow[b] * P.Cx + acol;
                    cp4(st + L::S_BM + 4 * c, P.ad + 4 * (e0 / 32 + 8 * kb + s));
                }
            }
        }
    }

    __device__ static void run(const TcArgs& P) {
        extern __shared__ __align__(128) u8 sm[];
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wm = warp >> 1, wn = warp & 1;
        const int g = lane >> 2, tg = lane & 3;
        int* s_src = (int*)(sm + L::O_SRC);
        int* s_arow = (int*)(sm + L::O_AROW);

        int m, nvalid, base, sp = 0;
        TC_TILE_OR_RETURN(P, BN, m, nvalid, base, sp);
        const int r0 = blockIdx.y * OUTR;
        const int acol = P.grouped ? m * P.C : 0;
        if (tid < BN) {
            const int b = tid < nvalid ? tid : 0;
            const int src = P.list ? __ldg(P.list + base + b) : base + b;
            s_src[tid] = src;
            s_arow[tid] = src / P.kdiv;
        }
        __syncthreads();

        const int CB = (T == W_F16) ? 2 * P.C : P.C;
        const int kb0 = sp * P.kspl;
        const int nk = min((CB + 255) / 256, kb0 + P.kspl) - kb0;
        constexpr int NS = L::NS;

        float facc[2][NT][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < NT; ni++)
#pragma unroll
                for (int q = 0; q < 4; q++) facc[mi][ni][q] = 0.f;
        const int magic4[4] = {MAGIC_I, MAGIC_I, MAGIC_I, MAGIC_I};

#pragma unroll 1
        for (int s = 0; s < NS - 1; s++) {
            if (s < nk) issue(P, sm, kb0 + s, s, m, r0, CB, acol);
            cp_commit();
        }
#pragma unroll 1
        for (int ki = 0; ki < nk; ki++) {
            const int kb = kb0 + ki;
            cp_wait<NS - 2>();
            __syncthreads();
            if (ki + NS - 1 < nk) issue(P, sm, kb + NS - 1, (ki + NS - 1) % NS, m, r0, CB, acol);
            cp_commit();
            const int buf = ki % NS;
            const u8* st = sm + L::O_ST + buf * L::STAGE;
            const u8* As = st + L::S_A;
            const u8* Bs = st + L::S_B;
            const int steps = min(8, (CB - kb * 256) / 32);
#pragma unroll
            for (int s = 0; s < 8; s++) {
                if (s < steps) {
                    u32 a[2][4];
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
                        ldsm4(a[mi], As + swz(32 * wm + 16 * mi + (lane & 15), 2 * s + (lane >> 4)));
                    u32 b[NT][2];
                    u32 bl[NT][2];
#pragma unroll
                    for (int p = 0; p < NT / 2; p++) {
                        const int q = lane >> 3;
                        const int off = swz(WTN * wn + 16 * p + 8 * (q >> 1) + (lane & 7), 2 * s + (q & 1));
                        u32 r[4];
                        ldsm4(r, Bs + off);
                        b[2 * p][0] = r[0];
                        b[2 * p][1] = r[1];
                        b[2 * p + 1][0] = r[2];
                        b[2 * p + 1][1] = r[3];
                        if (T == W_F16) {
                            ldsm4(r, Bs + BN * 256 + off);
                            bl[2 * p][0] = r[0];
                            bl[2 * p][1] = r[1];
                            bl[2 * p + 1][0] = r[2];
                            bl[2 * p + 1][1] = r[3];
                        }
                    }
                    if (T == W_Q8_0) {
                        float wd[2][2], xd[NT][2];
#pragma unroll
                        for (int mi = 0; mi < 2; mi++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                const int row = 32 * wm + 16 * mi + g + 8 * h;
                                wd[mi][h] = h2f(*(const u16*)(st + L::S_AM + row * 16 + 2 * s));
                            }
#pragma unroll
                        for (int ni = 0; ni < NT; ni++)
#pragma unroll
                            for (int c = 0; c < 2; c++) {
                                const int col = WTN * wn + 8 * ni + 2 * tg + c;
                                xd[ni][c] = *(const float*)(st + L::S_BM + col * 32 + 4 * s);
                            }
#pragma unroll
                        for (int mi = 0; mi < 2; mi++)
#pragma unroll
                            for (int ni = 0; ni < NT; ni++) {
                                int d[4];
                                mma_s8(d, a[mi], b[ni][0], b[ni][1], magic4);
#pragma unroll
                                for (int q = 0; q < 4; q++) {
                                    const float pw = __fmul_rn(wd[mi][q >> 1], xd[ni][q & 1]);
                                    const float fi = __fsub_rn(__int_as_float(d[q]), MAGIC_F);
                                    facc[mi][ni][q] = __fmaf_rn(pw, fi, facc[mi][ni][q]);
                                }
                            }
                    } else {  // F16
#pragma unroll
                        for (int mi = 0; mi < 2; mi++)
#pragma unroll
                            for (int ni = 0; ni < NT; ni++) {
                                mma_f16(facc[mi][ni], a[mi], b[ni][0], b[ni][1]);
                                mma_f16(facc[mi][ni], a[mi], bl[ni][0], bl[ni][1]);
                            }
                    }
                }
            }
        }

        // ---- epilogue
#pragma unroll
        for (int ni = 0; ni < NT; ni++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int col = WTN * wn + 8 * ni + 2 * tg + c;
                if (col >= nvalid) continue;
                const int src = s_src[col];
                float cs = 1.0f;
                if (T == W_F16) cs = __ldg(P.ascale + s_arow[col]);
                tc_store_col<MODE, NT>(P, facc, ni, c, src, cs, m, sp, r0, wm, g);
            }
    }
};
}  // namespace d0

// ------------------------------------------------------------------------------------------
// The dequantising kernels (IQ2_XXS, Q2_K, Q4_K: ds4_tc_iq2_xxs_*, ds4_tc_q2_k_*,
// ds4_tc_q4_k_*), as rewritten in session 4 for the routed MoE experts (see the file header and
// bench/results/h200/tc-prefill.md, "Session 4"). Q8_0 and F16 use namespace d0 above.

// Shared-memory layout of one kernel variant: s_src / s_arow, the per-row address tables, the
// IQ2_XXS grid, the dequantised int8 tile and its per-row metadata, then the NS-stage ring.
template <int T, int BN>
struct Lay {
    // Pipeline depth and CTAs per SM: two CTAs of 2 stages where registers and shared memory
    // allow it (IQ2_XXS, Q2_K at BN ≤ 64), one CTA of 3 stages for Q4_K and for the 128-pair
    // MoE tiles (BN = 128: 64 f32 + 64 s32 accumulators per thread need ptxas's 255 registers,
    // one CTA per SM; the dequantised weight tile then serves twice the pairs, but with no
    // second CTA to overlap the dequantisation and the mmas it measured slower than BN = 64 on
    // an H100: opt-in, bench/results/h100/moe-bn128-s7.md).
    static constexpr int NS = (T == W_Q4K || BN >= 128) ? 3 : 2;
    static constexpr int MINB = (NS == 2) ? 2 : 1;
    // Staged bytes of one 256-weight block of a row (rounded up to 16): IQ2_XXS qs 64 + the
    // aligned 4-byte word holding d; Q2_K qs 64 + scales 16 + d, dmin 4; Q4_K the whole block.
    static constexpr int RAWB = T == W_IQ2 ? 80 : T == W_Q2K ? 96 : 144;
    static constexpr int A_ST = TC_BM * RAWB;  // raw weight blocks
    static constexpr int B_ST = BN * 256;      // int8 activations
    static constexpr int BM_ST = BN * 4;       // f32 activation scale (one per 256)
    static constexpr int S_A = 0;
    static constexpr int S_B = al128(A_ST);
    static constexpr int S_BM = S_B + al128(B_ST);
    static constexpr int STAGE = S_BM + al128(BM_ST);
    static constexpr int O_SRC = 0;
    static constexpr int O_AROW = BN * 4;
    // Per-row source addresses, formed once per CTA (issue() only adds the K offset):
    // A rows: region 0, 1, 2 base of the row; B rows: activation qs / scales of the row.
    static constexpr int O_PA = al128(2 * BN * 4);
    static constexpr int O_PB = O_PA + 3 * TC_BM * 8;
    static constexpr int O_TAB = al128(O_PB + 2 * BN * 8);
    // IQ2_XXS tables: grid magnitude codes (u32 [256], nibble k = code of byte k: 0x08 → 0,
    // 0x19 → 1, 0x2b → 2) and sign spread (u32 [128]: 7 stored sign bits + parity, bit k →
    // bit 4k+2); code | sign is the byte_perm selector of ±grid (see dequant). Each entry is
    // stored TCOPY times side by side and lane l reads copy l % TCOPY, so the random gathers
    // of a warp meet fewer bank conflicts: ncu at 512 tokens found the 32-pair kernel bound by
    // L1/shared wavefronts (84 %), a quarter of them conflicts of these gathers. 16 copies
    // (24 KB) for the 32-pair tiles: conflicts −43 %, gate+up −3..5 % at 128..1024 tokens
    // (bench/README.md, session 15). The 64-pair tiles keep one copy: 2 CTAs per SM fit 8
    // copies at most, which measured 3-5 % slower there (more spills, MMA-heavier stages).
    static constexpr int TCOPY = (T == W_IQ2 && BN <= 32) ? 16 : 1;
    static constexpr int TCOPY_LOG = TCOPY == 16 ? 4 : 0;
    static constexpr int TABB = (T == W_IQ2) ? (256 * 4 + 128 * 4) * TCOPY : 0;
    static constexpr int O_TILE = O_TAB + TABB;
    static constexpr int TILEB = TC_BM * 256;
    static constexpr int O_MD = O_TILE + TILEB;       // f32 [BM] d
    static constexpr int O_MDM = O_MD + TC_BM * 4;    // f32 [BM] dmin
    static constexpr int O_MSC = O_MDM + TC_BM * 4;   // u8 [BM][8] ls / sc
    static constexpr int O_MMN = O_MSC + TC_BM * 8;   // u8 [BM][16] mins
    static constexpr int O_BS = O_MMN + TC_BM * 16;   // Q2_K: s8 [2][BN][16] bsum hi, lo
    static constexpr int O_ST = al128(O_BS + (T == W_Q2K ? 2 * BN * 16 : 0));
    static constexpr int TOTAL = O_ST + NS * STAGE;
};

template <int T, int BN, int MODE>
struct Tc {
    typedef Lay<T, BN> L;
    static constexpr int NT = BN / 16;  // n8 tiles per warp (warp tile BN/2 tokens)
    static constexpr int OUTR = (MODE == M_SWIGLU) ? TC_BM / 2 : TC_BM;

    // Copy K stage `kb` into ring slot `buf` (cp.async). The per-row source addresses come
    // from the tables run() forms once (O_PA / O_PB).
    __device__ static void issue(u8* sm, int kb, int buf, int CB) {
        const int tid = threadIdx.x;
        u8* st = sm + L::O_ST + buf * L::STAGE;
        const u64* pa = (const u64*)(sm + L::O_PA);
        const u64* pb = (const u64*)(sm + L::O_PB);
        const int kbyte = kb * 256;
        const int ch = tid & 15;
        // ---- A (raw blocks; the rows have odd strides, hence the address tables)
        if (T == W_IQ2 || T == W_Q2K) {
            // The 64 qs bytes of each row as 4 × 16 B (warp w: rows 8w..8w+7 + 64·i, one cp16 per
            // lane, no predication), then the per-row tails: warps 0-3 the d word (IQ2_XXS) / 16
            // scale bytes (Q2_K) of row tid, warps 4-7 (Q2_K) d, dmin of row tid - 128. Fewer
            // issue slots than the former c / 5, c % 5 chunk walk with both copy kinds predicated
            // (ncu, bench/results/h100/moe-stalls-s8.md); same bytes, same places.
#pragma unroll
            for (int i = 0; i < TC_BM * 4 / TC_THREADS; i++) {
                const int c = tid + TC_THREADS * i;
                const int j = c >> 2, q = c & 3;
                cp16(st + L::S_A + j * L::RAWB + 16 * q, (const u8*)pa[j] + 64 * kb + 16 * q);
            }
            static_assert(TC_THREADS == 2 * TC_BM, "tail split assumes 2 threads per row");
            if (tid < TC_BM) {
                u8* dst = st + L::S_A + tid * L::RAWB + 64;
                if (T == W_IQ2) cp4(dst, (const u8*)((pa[TC_BM + tid] + 2 * kb) & ~3ull));  // the aligned pair holding d
                else cp16(dst, (const u8*)pa[TC_BM + tid] + 16 * kb);
            } else if (T == W_Q2K) {
                const int j = tid - TC_BM;
                cp4(st + L::S_A + j * L::RAWB + 80, (const u8*)pa[2 * TC_BM + j] + 4 * kb);
            }
        }
        // Q4_K: the whole 144-byte block of each row as 9 × 16 B.
        constexpr int NCH = 9;
#pragma unroll
        for (int i = 0; (T == W_Q4K) && i < (TC_BM * NCH + TC_THREADS - 1) / TC_THREADS; i++) {
            const int c = tid + TC_THREADS * i;
            if (c < TC_BM * NCH) {
                const int j = c / NCH, q = c % NCH;
                cp16(st + L::S_A + j * L::RAWB + 16 * q, (const u8*)pa[j] + 144 * kb + 16 * q);
            }
        }
        // ---- B (activation rows of this tile)
        if (kbyte + 16 * ch < CB) {
#pragma unroll
            for (int i = 0; i < BN * 16 / TC_THREADS; i++) {
                const int b = (tid >> 4) + 16 * i;
                cp16(st + L::S_B + swz(b, ch), (const u8*)pb[b] + kbyte + 16 * ch);
            }
        }
        if (tid < BN) cp4(st + L::S_BM + 4 * tid, (const u8*)pb[BN + tid] + 4 * kb);
    }

    // Raw weight blocks of stage `buf` → int8 tile + per-row metadata.
    __device__ static void dequant(u8* sm, int kb, int buf) {
        const int tid = threadIdx.x;
        const u8* raw = sm + L::O_ST + buf * L::STAGE + L::S_A;
        u8* tile = sm + L::O_TILE;
        float* md = (float*)(sm + L::O_MD);
        float* mdm = (float*)(sm + L::O_MDM);
        u8* msc = sm + L::O_MSC;
        u8* mmn = sm + L::O_MMN;
        if (T == W_IQ2) {
            // Sub-block s = tid & 7 of rows j = tid / 8 + 32·it. Weight k of a group of 8 (grid
            // byte k): selector nibble k = grid code | sign << 2 picks byte k of the ±grid
            // palette (bytes 0..2: +8, +25, +43; 4..6: −8, −25, −43), exactly the old
            // (grid ^ mask) + lsb result. Lanes s >= 4 compute groups 2, 3 (chunk 2s+1) first
            // and store that chunk first (bank-conflict-free stores, as below).
            // Lane l's copies of the tables (see Lay::TCOPY): entry i at byte 4·TCOPY·i.
            constexpr int CS = 2 + L::TCOPY_LOG;  // log2 of an entry's stride in bytes
            const u32* ctab = (const u32*)(sm + L::O_TAB) + ((tid & 31) & (L::TCOPY - 1));
            const u32* stab = ctab + 256 * L::TCOPY;
            const u32 pp = 0x002b1908u, pn = 0x00d5e7f8u;
            const int s = tid & 7, j0 = tid >> 3;
            const int io = (s >= 4) ? 2 : 0;
            const int c0 = swz(j0, 2 * s + (io >> 1)), c1 = swz(j0, 2 * s + 1 - (io >> 1));
            // Per-lane shifts of group i (the order swap makes them lane-dependent).
            int shx[4], shy[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                shx[i] = 8 * (i ^ io);
                shy[i] = 7 * (i ^ io);
            }
            const u8* ct = (const u8*)ctab;
            const u8* stb = (const u8*)stab;
#pragma unroll
            for (int it = 0; it < TC_BM * 8 / TC_THREADS; it++) {
                const int j = j0 + 32 * it;
                const u8* rw = raw + j * L::RAWB;
                const uint2 aux = *(const uint2*)(rw + 8 * s);
                // Table byte offsets: index << CS taken from the words shifted left by CS (as
                // (32 + CS)-bit values: a funnel shift keeps their top bits for group 3).
                // (One copy: the sign bits of aux.y end at bit 27, a plain shift serves.)
                const u32 axs = aux.x << CS, axh = aux.x >> (32 - CS);
                const u32 ays = aux.y << CS, ayh = aux.y >> (32 - CS);
                u32 o[8];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 so = L::TCOPY == 1 ? ((ays >> shy[i]) & 0x1fcu)
                                                 : (__funnelshift_r(ays, ayh, shy[i]) & (0x7fu << CS));
                    const u32 sel = *(const u32*)(ct + (__funnelshift_r(axs, axh, shx[i]) & (0xffu << CS))) |
                                    *(const u32*)(stb + so);
                    o[2 * i] = prmt(pp, pn, sel);
                    o[2 * i + 1] = prmt(pp, pn, sel >> 16);
                }
                msc[j * 8 + s] = (u8)(2 * (aux.y >> 28) + 1);
                if (s == 0) {
                    const u64 pd = ((const u64*)(sm + L::O_PA))[TC_BM + j] + 2 * kb;  // address of d
                    const u32 dw = *(const u32*)(rw + 64);
                    md[j] = h2f((pd & 2) ? (dw >> 16) : (dw & 0xffffu));
                }
                const int ro = it * 32 * 256;
                *(uint4*)(tile + ro + c0) = make_uint4(o[0], o[1], o[2], o[3]);
                *(uint4*)(tile + ro + c1) = make_uint4(o[4], o[5], o[6], o[7]);
            }
        }
        // Q2_K, Q4_K
#pragma unroll
        for (int it = 0; (T != W_IQ2) && it < TC_BM * 8 / TC_THREADS; it++) {
            const int u = tid + TC_THREADS * it;
            const int j = u >> 3, s = u & 7;
            const u8* rw = raw + j * L::RAWB;
            u32 o[8];
            if (T == W_Q2K) {
                const int n = s >> 2, sh = 2 * (s & 3);
                const u32* q = (const u32*)(rw + 32 * n);
                const u32 sc0 = rw[64 + 2 * s], sc1 = rw[64 + 2 * s + 1];
#pragma unroll
                for (int i = 0; i < 8; i++) o[i] = ((q[i] >> sh) & 0x03030303u) * ((i < 4 ? sc0 : sc1) & 15u);
                mmn[j * 16 + 2 * s] = (u8)(sc0 >> 4);
                mmn[j * 16 + 2 * s + 1] = (u8)(sc1 >> 4);
                if (s == 0) {
                    const u32 dm = *(const u32*)(rw + 80);
                    md[j] = h2f(dm & 0xffffu);
                    mdm[j] = h2f(dm >> 16);
                }
            } else {  // Q4_K
                const int p = s >> 1;
                const u32* q = (const u32*)(rw + 16 + 32 * p);
#pragma unroll
                for (int i = 0; i < 8; i++) o[i] = (s & 1) ? ((q[i] >> 4) & 0x0F0F0F0Fu) : (q[i] & 0x0F0F0F0Fu);
                int sc, mn;
                q4k_scale_min(s, rw + 4, sc, mn);
                msc[j * 8 + s] = (u8)sc;
                mmn[j * 16 + s] = (u8)mn;
                if (s == 0) {
                    const u32 dm = *(const u32*)rw;
                    md[j] = h2f(dm & 0xffffu);
                    mdm[j] = h2f(dm >> 16);
                }
            }
            // The 8 lanes of a row store chunks {2s} then {2s+1}, except s >= 4 in the
            // opposite order: each store instruction then hits 8 distinct bank groups.
            const bool sw = s >= 4;
            const uint4 v0 = make_uint4(o[0], o[1], o[2], o[3]);
            const uint4 v1 = make_uint4(o[4], o[5], o[6], o[7]);
            *(uint4*)(tile + swz(j, 2 * s + (sw ? 1 : 0))) = sw ? v1 : v0;
            *(uint4*)(tile + swz(j, 2 * s + (sw ? 0 : 1))) = sw ? v0 : v1;
        }
        if (T == W_Q2K) {
            // Sums of the activations over each 16-wide sub-block (chunk j of a B row), split
            // as 128·hi + lo with lo in [0, 127] so both are int8 mma operands.
            const u8* bt = sm + L::O_ST + buf * L::STAGE + L::S_B;
            i8* bs = (i8*)(sm + L::O_BS);
            for (int u = tid; u < BN * 16; u += TC_THREADS) {
                const int b = u >> 4, j = u & 15;
                const uint4 v = *(const uint4*)(bt + swz(b, j));
                int sum = __dp4a((int)v.x, 0x01010101, 0);
                sum = __dp4a((int)v.y, 0x01010101, sum);
                sum = __dp4a((int)v.z, 0x01010101, sum);
                sum = __dp4a((int)v.w, 0x01010101, sum);
                bs[b * 16 + j] = (i8)(sum >> 7);
                bs[BN * 16 + b * 16 + j] = (i8)(sum & 127);
            }
        }
    }

    // The tile's mmas for the NV valid n8 tiles of this warp (NV warp-uniform: no predicated
    // mma, hence no WARPSYNC per mma). LS = 0: iacc += A·B over the 8 K steps (Q2_K: scale in
    // the weights). LS = 1 (IQ2_XXS): iacc += ls·(A·B) per 32-wide sub-block, ls the 8-bit
    // scales of the thread's rows (lsv: byte s = step s).
    template <int NV, int LS>
    __device__ static __forceinline__ void mma_tile(const u8* As, const u8* Bs, const int (&aoff)[2],
                                                    const int (&boff)[NT / 2], const u64 (&lsv)[2][2],
                                                    int (&iacc)[2][NT][4]) {
        constexpr int NP = (NV + 1) / 2;
        const int zero4[4] = {0, 0, 0, 0};
        // Unrolled by 2 (LS) / 4, not 8: fully unrolled, ptxas prefetches fragments further ahead
        // and spills (128-register limit of two CTAs per SM; the factors are the spill-free ones).
#pragma unroll (LS ? 2 : 4)
        for (int s = 0; s < 8; s++) {
            u32 a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) ldsm4(a[mi], As + (aoff[mi] ^ (s << 5)));
            u32 b[2 * NP][2];
#pragma unroll
            for (int p = 0; p < NP; p++) {
                u32 r[4];
                ldsm4(r, Bs + (boff[p] ^ (s << 5)));
                b[2 * p][0] = r[0];
                b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2];
                b[2 * p + 1][1] = r[3];
            }
            if (LS) {
                int ls[2][2];
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int h = 0; h < 2; h++) ls[mi][h] = (int)((lsv[mi][h] >> (8 * s)) & 255u);
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int ni = 0; ni < NV; ni++) {
                        int d[4];
                        mma_s8(d, a[mi], b[ni][0], b[ni][1], zero4);
#pragma unroll
                        for (int q = 0; q < 4; q++) iacc[mi][ni][q] += ls[mi][q >> 1] * d[q];
                    }
            } else {
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int ni = 0; ni < NV; ni++) mma_s8(iacc[mi][ni], a[mi], b[ni][0], b[ni][1], iacc[mi][ni]);
            }
        }
    }
    template <int NV, int LS>
    __device__ static __forceinline__ void mma_dispatch(int nvw, const u8* As, const u8* Bs, const int (&aoff)[2],
                                                        const int (&boff)[NT / 2], const u64 (&lsv)[2][2],
                                                        int (&iacc)[2][NT][4]) {
        if (nvw >= NV) mma_tile<NV, LS>(As, Bs, aoff, boff, lsv, iacc);
        else if (NV > 1) mma_dispatch<(NV > 1 ? NV - 1 : 1), LS>(nvw, As, Bs, aoff, boff, lsv, iacc);
    }

    __device__ static void run(const TcArgs& P) {
        extern __shared__ __align__(128) u8 sm[];
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wm = warp >> 1, wn = warp & 1;
        const int g = lane >> 2, tg = lane & 3;
        int* s_src = (int*)(sm + L::O_SRC);
        int* s_arow = (int*)(sm + L::O_AROW);

        int m, nvalid, base, sp = 0;
        TC_TILE_OR_RETURN(P, BN, m, nvalid, base, sp);
        const int r0 = blockIdx.y * OUTR;
        const int acol = P.grouped ? m * P.C : 0;
        const int CB = P.C;
        if (tid < BN) {
            const int b = tid < nvalid ? tid : 0;
            const int src = P.list ? __ldg(P.list + base + b) : base + b;
            const int arow = src / P.kdiv;
            s_src[tid] = src;
            s_arow[tid] = arow;  // not read here (only F16 did); kept: removing it changes the SASS
            const i64 e0 = (i64)arow * P.Cx + acol;
            u64* pb = (u64*)(sm + L::O_PB);
            pb[tid] = (u64)(P.aq + e0);
            pb[BN + tid] = (u64)(P.ad + 4 * (e0 / 256));
        }
        if (tid < TC_BM) {
            int mat;
            const int r = min(tc_out_row<MODE>(r0, tid, mat), P.R - 1);
            const i64 rr = (i64)m * P.R + r;
            const i64 rb = rr * P.nb;
            u64* pa = (u64*)(sm + L::O_PA);
            const u8* p0 = mat ? P.wb0 : P.wa0;
            const u8* p1 = mat ? P.wb1 : P.wa1;
            const u8* p2 = mat ? P.wb2 : P.wa2;
            if (T == W_IQ2) {
                pa[tid] = (u64)(p0 + 64 * rb);
                pa[TC_BM + tid] = (u64)(p1 + 2 * rb);
            } else if (T == W_Q2K) {
                pa[tid] = (u64)(p0 + 64 * rb);
                pa[TC_BM + tid] = (u64)(p1 + 16 * rb);
                pa[2 * TC_BM + tid] = (u64)(p2 + 4 * rb);
            } else {
                pa[tid] = (u64)(p0 + 144 * rb);
            }
        }
        if (T == W_IQ2) {
            // Entry i's TCOPY copies at ctab[TCOPY·i ..] (16-byte stores of 4 copies).
            u32* ctab = (u32*)(sm + L::O_TAB);
            auto put = [&](int i, u32 v) {
                if (L::TCOPY == 1) {
                    ctab[i] = v;
                } else {
#pragma unroll
                    for (int c = 0; c < L::TCOPY; c += 4) *(uint4*)(ctab + i * L::TCOPY + c) = make_uint4(v, v, v, v);
                }
            };
            for (int i = tid; i < 256; i += TC_THREADS) {
                const u64 gv = ds4_iq2xxs_grid[i];
                u32 c = 0;
#pragma unroll
                for (int k = 0; k < 8; k++) c |= ((u32)(gv >> (8 * k + 4)) & 3u) << (4 * k);
                put(i, c);
            }
            if (tid < 128) {
                const u32 s8 = (u32)tid | ((u32)(__popc(tid) & 1) << 7);
                u32 sp = 0;
#pragma unroll
                for (int k = 0; k < 8; k++) sp |= ((s8 >> k) & 1u) << (4 * k + 2);
                put(256 + tid, sp);
            }
        }
        __syncthreads();

        const int kb0 = sp * P.kspl;
        const int nk = min((CB + 255) / 256, kb0 + P.kspl) - kb0;
        constexpr int NS = L::NS;

        float facc[2][NT][4];
        int iacc[2][NT][4];
        int macc[2][NT][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < NT; ni++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    facc[mi][ni][q] = 0.f;
                    iacc[mi][ni][q] = 0;
                    macc[mi][ni][q] = 0;
                }
        const int zero4[4] = {0, 0, 0, 0};

        // ldmatrix row addresses (relative to the tile) of K step 0; step s reads chunk
        // 2s + c, i.e. the step-0 offset XOR (s << 5) (swz only XORs the chunk bits 4..7).
        int aoff[2], boff[NT / 2];
#pragma unroll
        for (int mi = 0; mi < 2; mi++) aoff[mi] = swz(32 * wm + 16 * mi + (lane & 15), lane >> 4);
#pragma unroll
        for (int p = 0; p < NT / 2; p++) {
            const int q = lane >> 3;
            boff[p] = swz(8 * (4 * p + 2 * (q >> 1) + wn) + (lane & 7), q & 1);
        }

        // Valid n8 tiles of this warp (tiles ni < nvw hold pairs < nvalid; warp-uniform).
        const int nvw = min(NT, (nvalid - 8 * wn + 15) / 16);
#pragma unroll 1
        for (int s = 0; s < NS - 1; s++) {
            if (s < nk) issue(sm, kb0 + s, s, CB);
            cp_commit();
        }
#pragma unroll 1
        for (int ki = 0; ki < nk; ki++) {
            const int kb = kb0 + ki;
            const int buf = ki % NS;
            const u8* st = sm + L::O_ST + buf * L::STAGE;
            const u8* As = sm + L::O_TILE;
            const u8* Bs = st + L::S_B;
            {
            cp_wait<NS - 2>();
            __syncthreads();
            if (ki + NS - 1 < nk) issue(sm, kb + NS - 1, (ki + NS - 1) % NS, CB);
            cp_commit();
            dequant(sm, kb, buf);
            __syncthreads();
            // IQ2_XXS: the 8 sub-block scales of each of this thread's rows, one load per stage.
            u64 lsv[2][2] = {{0, 0}, {0, 0}};
            if (T == W_IQ2) {
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        lsv[mi][h] = *(const u64*)(sm + L::O_MSC + (32 * wm + 16 * mi + g + 8 * h) * 8);
            }
            if (T == W_Q2K || T == W_IQ2) {
                // K-quant super-blocks are whole stages: always 8 steps.
                mma_dispatch<NT, (T == W_IQ2) ? 1 : 0>(nvw, As, Bs, aoff, boff, lsv, iacc);
            } else {
            const int steps = min(8, (CB - kb * 256) / 32);
            auto step = [&](const int s) {
                // Unused, but captured as when this lambda also served Q8_0 (it read the Q8_0
                // scales from st): without the capture LLVM orders one address computation of
                // dequant() differently and the q2_k_32 kernels' SASS changes.
                (void)st;
                u32 a[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
                    ldsm4(a[mi], As + (aoff[mi] ^ (s << 5)));
                u32 b[NT][2];
#pragma unroll
                for (int p = 0; p < NT / 2; p++) {
                    const int off = boff[p] ^ (s << 5);
                    u32 r[4] = {0u, 0u, 0u, 0u};
                    if (8 * (4 * p + wn) < nvalid) ldsm4(r, Bs + off);
                    b[2 * p][0] = r[0];
                    b[2 * p][1] = r[1];
                    b[2 * p + 1][0] = r[2];
                    b[2 * p + 1][1] = r[3];
                }
                if (T == W_IQ2) {
                    int ls[2][2];
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
#pragma unroll
                        for (int h = 0; h < 2; h++) ls[mi][h] = (int)((lsv[mi][h] >> (8 * s)) & 255u);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
#pragma unroll
                        for (int ni = 0; ni < NT; ni++) if (8 * (2 * ni + wn) < nvalid) {
                            int d[4];
                            mma_s8(d, a[mi], b[ni][0], b[ni][1], zero4);
#pragma unroll
                            for (int q = 0; q < 4; q++) iacc[mi][ni][q] += ls[mi][q >> 1] * d[q];
                        }
                } else if (T == W_Q2K) {
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
#pragma unroll
                        for (int ni = 0; ni < NT; ni++)
                            if (8 * (2 * ni + wn) < nvalid) mma_s8(iacc[mi][ni], a[mi], b[ni][0], b[ni][1], iacc[mi][ni]);
                } else {  // Q4_K
                    const u8* msc = sm + L::O_MSC;
                    const u8* mmn = sm + L::O_MMN;
                    int sc[2][2];
                    u32 am[2][4];
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        const int ra = 32 * wm + 16 * mi + g, rb = ra + 8;
                        sc[mi][0] = msc[ra * 8 + s];
                        sc[mi][1] = msc[rb * 8 + s];
                        am[mi][0] = am[mi][2] = (u32)mmn[ra * 16 + s] * 0x01010101u;
                        am[mi][1] = am[mi][3] = (u32)mmn[rb * 16 + s] * 0x01010101u;
                    }
#pragma unroll
                    for (int mi = 0; mi < 2; mi++)
#pragma unroll
                        for (int ni = 0; ni < NT; ni++) if (8 * (2 * ni + wn) < nvalid) {
                            int d[4];
                            mma_s8(d, a[mi], b[ni][0], b[ni][1], zero4);
#pragma unroll
                            for (int q = 0; q < 4; q++) iacc[mi][ni][q] += sc[mi][q >> 1] * d[q];
                            mma_s8(macc[mi][ni], am[mi], b[ni][0], b[ni][1], macc[mi][ni]);
                        }
                }
            };
#pragma unroll
            for (int s = 0; s < 8; s++) if (s < steps) step(s);
            }
            }
            // K-quants: the super-block's float term, exactly as the CPU forms it.
            if (T == W_IQ2 || T == W_Q2K || T == W_Q4K) {
                const float* md = (const float*)(sm + L::O_MD);
                const float* mdm = (const float*)(sm + L::O_MDM);
                const u8* mmn = sm + L::O_MMN;
                const u8* bs = sm + L::O_BS;
#pragma unroll
                for (int ni = 0; ni < NT; ni++) {
                    if (8 * (2 * ni + wn) >= nvalid) continue;
                    const int col = 8 * (2 * ni + wn) + 2 * tg;
                    const float yd0 = *(const float*)(st + L::S_BM + 4 * col);
                    const float yd1 = *(const float*)(st + L::S_BM + 4 * col + 4);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        const int ra = 32 * wm + 16 * mi + g;
                        int summ[4];
                        if (T == W_Q2K) {
                            // summ[row][tok] = Σ_j min[row][j]·bsum[tok][j] over the 16
                            // sub-blocks, bsum = 128·hi + lo (both int8): two m16n8k16 mmas.
                            const u32 a0 = *(const u32*)(mmn + ra * 16 + 4 * tg);
                            const u32 a1 = *(const u32*)(mmn + (ra + 8) * 16 + 4 * tg);
                            const int tok = 8 * (2 * ni + wn) + g;
                            const u32 bh = *(const u32*)(bs + tok * 16 + 4 * tg);
                            const u32 bl = *(const u32*)(bs + BN * 16 + tok * 16 + 4 * tg);
                            int dh[4], dl[4];
                            mma_s8k16(dh, a0, a1, bh, zero4);
                            mma_s8k16(dl, a0, a1, bl, zero4);
#pragma unroll
                            for (int q = 0; q < 4; q++) summ[q] = 128 * dh[q] + dl[q];
                        } else {
#pragma unroll
                            for (int q = 0; q < 4; q++) summ[q] = macc[mi][ni][q];
                        }
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const float dw = md[ra + 8 * h];
                            const float dmw = (T == W_IQ2) ? 0.f : mdm[ra + 8 * h];
#pragma unroll
                            for (int c = 0; c < 2; c++) {
                                const int q = 2 * h + c;
                                const float ydc = c ? yd1 : yd0;
                                float term;
                                if (T == W_IQ2) {
                                    term = __fmul_rn(__fmul_rn(dw, ydc), __int2float_rn(iacc[mi][ni][q]));
                                } else {
                                    const float dall = __fmul_rn(ydc, dw);
                                    const float dmin = __fmul_rn(ydc, dmw);
                                    term = __fsub_rn(__fmul_rn(dall, __int2float_rn(iacc[mi][ni][q])),
                                                     __fmul_rn(dmin, __int2float_rn(summ[q])));
                                }
                                facc[mi][ni][q] = __fadd_rn(facc[mi][ni][q], term);
                                iacc[mi][ni][q] = 0;
                                macc[mi][ni][q] = 0;
                            }
                        }
                    }
                }
            }
        }

        // ---- epilogue
        const float scale = (T == W_IQ2) ? 0.125f : 1.0f;
#pragma unroll
        for (int ni = 0; ni < NT; ni++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int col = 8 * (2 * ni + wn) + 2 * tg + c;
                if (col >= nvalid) continue;
                const int src = s_src[col];
                const float cs = scale;
                tc_store_col<MODE, NT>(P, facc, ni, c, src, cs, m, sp, r0, wm, g);
            }
    }
};

// ------------------------------------------------------------------------------------------
// wg: dense Q8_0 with wgmma (sm_90a; ds4_tc_q8_0_wg64_*, the default for chunks of more than 32
// tokens; ds4_tc_q8_0_wg64m_*: the same with the magic-number conversion; src/tc.rs `WgVar`).
// A CTA of two warpgroups computes 128 weight rows × 64 tokens; warpgroup i takes rows
// 64i..64i+63 with one wgmma m64n64k32 s8·s8→s32 per Q8_0 block, so each block's integer dot
// is exact as in d0. Operands come from shared memory through matrix descriptors (K-major,
// 128-byte swizzle: row r's 16-byte chunk c at r·128 + ((c ^ (r & 7)) << 4), 8-row groups 1024
// bytes apart); K advances in stages of 128 bytes (4 blocks, one swizzle-atom row) through a
// 4-stage cp.async ring, loads 3 stages ahead (fence.proxy.async before the barrier that
// publishes a stage to the tensor cores).
// The block term is d0's: fi = float(isum) exactly, pw = d_w·d_x rounded, acc = fma(pw, fi,
// acc); only the f32 order of the sum over blocks is the route's own. The exact conversion is
// one I2FP here (isum = wgmma's D; d0's magic number rides on mma.sync's C operand, which wgmma
// does not have, and IADD + FADD cost one more issue slot per output per block: the wg64m
// kernels keep that form, same values: __int_as_float(d + 0x4B400000) − 12582912 == (float)d
// for |d| < 2^22, |isum| ≤ 32·128·127).
// Measured (H100, bench/results/h100/dense-wgmma-s6.md): 1.5× the d0 kernel at 2048-8192
// tokens; a second accumulator set (block b+1's wgmma under block b's epilogue) was slower
// (spills at 2 CTAs/SM) and 128-token tiles no faster, so neither is kept. The kernel is
// issue-bound (ncu: 69% issue slots busy) on the per-output epilogue (I2FP, FMUL, FFMA).
__device__ __forceinline__ void wgmma_s8_n64(int* d, u64 da, u64 db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
        : "l"(da), "l"(db));
#else
    __trap();
#endif
}

namespace wg {
constexpr int BN = 64;   // tokens per CTA (wgmma N)
constexpr int NS = 4;    // ring stages (loads run NS - 1 ahead)
constexpr int KS = 128;  // K bytes of a stage (4 Q8_0 blocks)

struct Lay {
    static constexpr int A_ST = TC_BM * KS;  // int8 weights, 128 B a row, swizzled
    static constexpr int B_ST = BN * KS;     // int8 activations, 128 B a row, swizzled
    static constexpr int AM_ST = TC_BM * 8;  // f16 d of the 4 blocks of a row
    static constexpr int BM_ST = BN * 16;    // f32 activation scales, [4][BN]
    static constexpr int S_A = 0;
    static constexpr int S_B = A_ST;
    static constexpr int S_AM = S_B + B_ST;
    static constexpr int S_BM = S_AM + AM_ST;
    static constexpr int STAGE = (S_BM + BM_ST + 1023) / 1024 * 1024;
    static constexpr int O_SRC = 0;
    static constexpr int O_AROW = BN * 4;
    static constexpr int O_ST = 1024;                       // 1024-aligned stages (the swizzle
    static constexpr int TOTAL = O_ST + NS * STAGE + 1024;  // uses address bits 4..9) + slack
    static constexpr int MINB = 2;                          // to align the base
};

// Matrix descriptor of a K-major, 128-byte-swizzled tile at shared address `a`: rows of 128
// bytes, 8-row groups 1024 bytes apart (SBO); LBO unused for this layout.
__device__ __forceinline__ u64 gdesc(u32 a) {
    return (u64)((a & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
// Byte offset of 16-byte chunk ch (0..7) of row r in a 128-byte-row, 128B-swizzled tile.
__device__ __forceinline__ int swz128(int r, int ch) { return r * 128 + ((ch ^ (r & 7)) << 4); }

__device__ __forceinline__ void wg_arrive() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void fence_regs(int (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(d[i])::"memory");
}
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The wgmma kernels' B rows: s_src[j] / s_arow[j] = the source row and activation row of tile
// column j (columns past nvalid repeat column 0), then a barrier.
__device__ __forceinline__ void wg_rows(const TcArgs& P, int* s_src, int* s_arow, int nvalid, int base) {
    const int tid = threadIdx.x;
    if (tid < BN) {
        const int b = tid < nvalid ? tid : 0;
        const int src = P.list ? __ldg(P.list + base + b) : base + b;
        s_src[tid] = src;
        s_arow[tid] = src / P.kdiv;
    }
    __syncthreads();
}
// The 128-byte K stages [kb0, kb0 + nk) of split sp for rows of CB bytes (the host counts K in
// stages of 256 bytes, two of ours).
__device__ __forceinline__ void wg_kspan(const TcArgs& P, int sp, int CB, int& kb0, int& nk) {
    kb0 = 2 * sp * P.kspl;
    const int kend = min((CB + KS - 1) / KS, (int)min((i64)2 * ((i64)sp * P.kspl + P.kspl), (i64)1 << 30));
    nk = kend - kb0;
}

template <int MODE, bool I2F>
struct Tc {
    typedef Lay L;
    static constexpr int NA = BN / 2;  // accumulators per thread
    static constexpr int OUTR = (MODE == M_SWIGLU) ? TC_BM / 2 : TC_BM;

    // A row j of the tile → output row and weight tensor. SWIGLU: rows 16i..16i+7 are gate
    // rows r0+8i.., rows 16i+8..16i+15 the same rows of up (a thread holds both).
    __device__ static __forceinline__ int out_row(int r0, int j, int& mat) {
        if (MODE == M_SWIGLU) {
            mat = (j >> 3) & 1;
            return r0 + 8 * (j >> 4) + (j & 7);
        }
        mat = 0;
        return r0 + j;
    }

    // Global source addresses of this thread's copies (K stage 0), formed once per CTA:
    // A rows (tid >> 3) + 32i at chunk tid & 7, the A scales of row tid >> 1, B rows likewise,
    // the B scales of block tid & 3 of row tid >> 2.
    static constexpr int NAC = TC_BM * 8 / TC_THREADS;
    static constexpr int NBC = BN * 8 / TC_THREADS;
    struct Src {
        const u8* a[NAC];
        const u8* am;
        const u8* b[NBC];
        const u8* bm;
    };

    __device__ static __forceinline__ void src_init(Src& S, const TcArgs& P, const int* s_arow, int m, int r0,
                                                    int acol) {
        const int tid = threadIdx.x, ch = tid & 7;
#pragma unroll
        for (int i = 0; i < NAC; i++) {
            int mat;
            const int r = min(out_row(r0, (tid >> 3) + 32 * i, mat), P.R - 1);
            const i64 rr = (i64)m * P.R + r;
            S.a[i] = (mat ? P.wb0 : P.wa0) + rr * P.C + 16 * ch;
        }
        {
            int mat;
            const int r = min(out_row(r0, tid >> 1, mat), P.R - 1);
            const i64 rr = (i64)m * P.R + r;
            S.am = (mat ? P.wb1 : P.wa1) + 2 * (rr * P.nb + 2 * (tid & 1));
        }
#pragma unroll
        for (int i = 0; i < NBC; i++)
            S.b[i] = P.aq + (i64)s_arow[(tid >> 3) + 32 * i] * P.Cx + acol + 16 * ch;
        const i64 e0 = (i64)s_arow[tid >> 2] * P.Cx + acol;
        S.bm = P.ad + 4 * (e0 / 32 + (tid & 3));
    }

    // Copy K stage kb (128 bytes a row) into the stage tile st (cp.async).
    __device__ static __forceinline__ void issue(const Src& S, u8* st, int kb, int CB, int nb) {
        const int tid = threadIdx.x, ch = tid & 7;
        const int kbyte = kb * KS;
        if (kbyte + 16 * ch < CB) {
#pragma unroll
            for (int i = 0; i < NAC; i++) cp16(st + L::S_A + swz128((tid >> 3) + 32 * i, ch), S.a[i] + kbyte);
#pragma unroll
            for (int i = 0; i < NBC; i++) cp16(st + L::S_B + swz128((tid >> 3) + 32 * i, ch), S.b[i] + kbyte);
        }
        if (4 * kb + 2 * (tid & 1) < nb) cp4(st + L::S_AM + (tid >> 1) * 8 + 4 * (tid & 1), S.am + 8 * kb);
        if (4 * kb + (tid & 3) < nb) cp4(st + L::S_BM + 4 * ((tid & 3) * BN + (tid >> 2)), S.bm + 16 * kb);
    }

    // The scales of block `blk` of stage tile `st` for this thread's rows and columns.
    struct Scl {
        float wd0, wd1;
        float2 x[BN / 8];
    };
    __device__ static __forceinline__ void scales(Scl& c, const u8* st, int blk, int jr, int tg) {
        c.wd0 = h2f(*(const u16*)(st + L::S_AM + jr * 8 + 2 * blk));
        c.wd1 = h2f(*(const u16*)(st + L::S_AM + (jr + 8) * 8 + 2 * blk));
        const float* xs = (const float*)(st + L::S_BM) + blk * BN + 2 * tg;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) c.x[j] = *(const float2*)(xs + 8 * j);
    }
    // acc += (d_w·d_x)·isum (the d0 form; isum → float exactly). Accumulator d[4j + q] is row
    // jr + 8·(q >> 1), token 8j + 2·tg + (q & 1) (the wgmma m64nNk32 D fragment).
    __device__ static __forceinline__ void epi(float (&facc)[NA], const int (&d)[NA], const Scl& c) {
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const float pw = __fmul_rn((q >> 1) ? c.wd1 : c.wd0, (q & 1) ? c.x[j].y : c.x[j].x);
                const float fi = I2F ? __int2float_rn(d[4 * j + q])
                                     : __fsub_rn(__int_as_float(d[4 * j + q] + MAGIC_I), MAGIC_F);
                facc[4 * j + q] = __fmaf_rn(pw, fi, facc[4 * j + q]);
            }
        }
    }

    // The S blocks of one stage: wgmma (D = A·B), the block's scales read under it, wait,
    // epilogue. Straight-line with nothing in flight across stages, so ptxas tracks the wgmma
    // groups without serialising them.
    template <int S>
    __device__ static __forceinline__ void stage(float (&facc)[NA], int (&acc)[NA], const u8* st, u64 da, u64 db,
                                                 int jr, int tg) {
        Scl c;
#pragma unroll
        for (int s = 0; s < S; s++) {
            fence_regs(acc);
            wg_arrive();
            wgmma_s8_n64(acc, da + 2 * s, db + 2 * s);  // + 32 bytes of K a block
            wg_commit();
            scales(c, st, s, jr, tg);
            wg_wait0();
            fence_regs(acc);
            epi(facc, acc, c);
        }
    }

    __device__ static void run(const TcArgs& P) {
        extern __shared__ __align__(1024) u8 sm_raw[];
        u8* sm = sm_raw + ((1024 - (smem_u32(sm_raw) & 1023)) & 1023);
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wgi = warp >> 2, w4 = warp & 3;
        const int g = lane >> 2, tg = lane & 3;
        int* s_src = (int*)(sm + L::O_SRC);
        int* s_arow = (int*)(sm + L::O_AROW);

        int m, nvalid, base, sp = 0;
        TC_TILE_OR_RETURN(P, BN, m, nvalid, base, sp);
        const int r0 = blockIdx.y * OUTR;
        const int acol = P.grouped ? m * P.C : 0;
        wg_rows(P, s_src, s_arow, nvalid, base);

        const int CB = P.C;
        int kb0, nk;
        wg_kspan(P, sp, CB, kb0, nk);
        const int jr = 64 * wgi + 16 * w4 + g;  // this thread's A rows: jr, jr + 8
        const u32 st0 = smem_u32(sm + L::O_ST);
        const u64 da0 = gdesc(st0 + L::S_A + 64 * KS * wgi);
        const u64 db0 = gdesc(st0 + L::S_B);

        float facc[NA];
        int acc[NA];
#pragma unroll
        for (int i = 0; i < NA; i++) {
            facc[i] = 0.f;
            acc[i] = 0;
        }

        Src S;
        src_init(S, P, s_arow, m, r0, acol);
#pragma unroll 1
        for (int s = 0; s < NS - 1; s++) {
            if (s < nk) issue(S, sm + L::O_ST + s * L::STAGE, kb0 + s, CB, P.nb);
            cp_commit();
        }
#pragma unroll 1
        for (int ki = 0; ki < nk; ki++) {
            const int kb = kb0 + ki;
            cp_wait<NS - 2>();
            fence_async_smem();
            __syncthreads();
            if (ki + NS - 1 < nk) issue(S, sm + L::O_ST + ((ki + NS - 1) % NS) * L::STAGE, kb + NS - 1, CB, P.nb);
            cp_commit();
            const int buf = ki % NS;
            const u8* st = sm + L::O_ST + buf * L::STAGE;
            const u64 doff = (u64)((buf * L::STAGE) >> 4);
            // Only the last stage can be short (C is a multiple of 64: 2 blocks).
            if (CB - kb * KS >= KS) stage<4>(facc, acc, st, da0 + doff, db0 + doff, jr, tg);
            else stage<2>(facc, acc, st, da0 + doff, db0 + doff, jr, tg);
        }

        // ---- store
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int col = 8 * j + 2 * tg + c;
                if (col >= nvalid) continue;
                const int src = s_src[col];
                if (MODE == M_STORE) {
                    float* yrow = P.y + (i64)sp * P.ysplit + (i64)src * P.ldy + (P.grouped ? (i64)m * P.R : 0);
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int r = r0 + jr + 8 * h;
                        if (r < P.R) yrow[r] = facc[4 * j + 2 * h + c];
                    }
                } else {
                    const int r = r0 + 32 * wgi + 8 * w4 + g;
                    if (r >= P.R) continue;
                    const double wt = P.wts ? (double)__ldg(P.wts + src) : 1.0;
                    float* yrow = P.y + (i64)src * P.ldy;
                    float gv = facc[4 * j + c];
                    float uv = facc[4 * j + 2 + c];
                    if (P.clamp > 1e-6f) {
                        gv = fminf(gv, P.clamp);
                        uv = fminf(fmaxf(uv, -P.clamp), P.clamp);
                    }
                    const double gd = (double)gv;
                    const double silu = gd / (1.0 + exp(-gd));
                    yrow[r] = (float)(silu * (double)uv * wt);
                }
            }
    }
};

// ------------------------------------------------------------------------------------------
// F16 weights on wgmma (ds4_tc_f16_wg64_s; the default for F16 matrices of more than 32 rows
// and chunks of more than 32 tokens; src/tc.rs `f16wg`, DS4_CUDA_TC_F16_WG=0 selects d0's
// ds4_tc_f16_64_s). The same numbers as d0's F16 kernel: y = (W·hi + W·lo)·2^-e with f32
// accumulation, where per 16 columns the hi product and then the lo product are added to the
// accumulator, in column order. A CTA of two warpgroups computes 128 weight rows × 64 tokens:
// warpgroup i takes rows 64i..64i+63 with wgmma m64n64k16 f16·f16→f32, A (the weights) and B
// (the hi and lo activation tiles) from shared memory through the same descriptors as the
// Q8_0 kernels above (K-major, 128-byte swizzle; a K stage is 128 bytes = 64 columns, four
// k16 steps 32 bytes apart). No per-block epilogue: the wgmmas of a stage (eight) run as one
// group, waited for before the stage's buffer is refilled; the ring has 3 stages (2 ahead) so
// two CTAs fit an SM.
__device__ __forceinline__ void wgmma_f16_n64(float* d, u64 da, u64 db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db));
#else
    __trap();
#endif
}

template <int N>
__device__ __forceinline__ void fence_fregs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

struct LayF16 {
    static constexpr int NS = 3;
    static constexpr int A_ST = TC_BM * KS;  // f16 weights, 128 B (64 columns) a row, swizzled
    static constexpr int B_ST = BN * KS;     // f16 activations (hi; lo follows), likewise
    static constexpr int S_A = 0;
    static constexpr int S_BH = A_ST;
    static constexpr int S_BL = S_BH + B_ST;
    static constexpr int STAGE = (S_BL + B_ST + 1023) / 1024 * 1024;
    static constexpr int O_SRC = 0;
    static constexpr int O_AROW = BN * 4;
    static constexpr int O_ST = 1024;
    static constexpr int TOTAL = O_ST + NS * STAGE + 1024;
    static constexpr int MINB = 2;
};

struct TcF16 {
    typedef LayF16 L;
    static constexpr int NA = BN / 2;
    static constexpr int NAC = TC_BM * 8 / TC_THREADS;
    static constexpr int NBC = BN * 8 / TC_THREADS;
    struct Src {
        const u8* a[NAC];
        const u8* bh[NBC];
        const u8* bl[NBC];
    };

    // The S k16 steps of one stage (S < 4: the last, short stage): hi then lo product per
    // step, all in one wgmma group, waited for before the stage's buffer is refilled.
    template <int S>
    __device__ static __forceinline__ void stage(float (&facc)[NA], u64 da, u64 dh, u64 dl) {
        fence_fregs(facc);
        wg_arrive();
#pragma unroll
        for (int s = 0; s < S; s++) {
            wgmma_f16_n64(facc, da + 2 * s, dh + 2 * s);  // + 32 bytes a k16 step
            wgmma_f16_n64(facc, da + 2 * s, dl + 2 * s);
        }
        wg_commit();
        wg_wait0();
        fence_fregs(facc);
    }

    __device__ static void run(const TcArgs& P) {
        extern __shared__ __align__(1024) u8 sm_raw[];
        u8* sm = sm_raw + ((1024 - (smem_u32(sm_raw) & 1023)) & 1023);
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int wgi = warp >> 2, w4 = warp & 3;
        const int g = lane >> 2, tg = lane & 3;
        int* s_src = (int*)(sm + L::O_SRC);
        int* s_arow = (int*)(sm + L::O_AROW);

        int m, nvalid, base, sp = 0;
        TC_TILE_OR_RETURN(P, BN, m, nvalid, base, sp);
        const int r0 = blockIdx.y * TC_BM;
        const int acol = P.grouped ? m * P.C : 0;
        wg_rows(P, s_src, s_arow, nvalid, base);

        const int CB = 2 * P.C;  // bytes of a weight row
        int kb0, nk;
        wg_kspan(P, sp, CB, kb0, nk);
        const int ch = tid & 7;
        Src S;
#pragma unroll
        for (int i = 0; i < NAC; i++) {
            const int r = min(r0 + (tid >> 3) + 32 * i, P.R - 1);
            S.a[i] = P.wa0 + ((i64)m * P.R + r) * CB + 16 * ch;
        }
#pragma unroll
        for (int i = 0; i < NBC; i++) {
            const i64 o = ((i64)s_arow[(tid >> 3) + 32 * i] * P.Cx + acol) * 2 + 16 * ch;
            S.bh[i] = P.aq + o;
            S.bl[i] = P.ad + o;
        }
        auto issue = [&](int kb, int buf) {
            u8* st = sm + L::O_ST + buf * L::STAGE;
            const int kbyte = kb * KS;
            if (kbyte + 16 * ch < CB) {
#pragma unroll
                for (int i = 0; i < NAC; i++) cp16(st + L::S_A + swz128((tid >> 3) + 32 * i, ch), S.a[i] + kbyte);
#pragma unroll
                for (int i = 0; i < NBC; i++) {
                    cp16(st + L::S_BH + swz128((tid >> 3) + 32 * i, ch), S.bh[i] + kbyte);
                    cp16(st + L::S_BL + swz128((tid >> 3) + 32 * i, ch), S.bl[i] + kbyte);
                }
            }
        };

        const u32 st0 = smem_u32(sm + L::O_ST);
        const u64 da0 = gdesc(st0 + L::S_A + 64 * KS * wgi);
        const u64 dh0 = gdesc(st0 + L::S_BH);
        const u64 dl0 = gdesc(st0 + L::S_BL);
        float facc[NA];
#pragma unroll
        for (int i = 0; i < NA; i++) facc[i] = 0.f;

#pragma unroll 1
        for (int s = 0; s < L::NS - 1; s++) {
            if (s < nk) issue(kb0 + s, s);
            cp_commit();
        }
#pragma unroll 1
        for (int ki = 0; ki < nk; ki++) {
            const int kb = kb0 + ki;
            cp_wait<L::NS - 2>();
            fence_async_smem();
            __syncthreads();
            if (ki + L::NS - 1 < nk) issue(kb + L::NS - 1, (ki + L::NS - 1) % L::NS);
            cp_commit();
            const u64 doff = (u64)(((ki % L::NS) * L::STAGE) >> 4);
            // Only the last stage can be short (C is a multiple of 16: one k16 step).
            const int steps = min(4, (CB - kb * KS) / 32);
            const u64 da = da0 + doff, dh = dh0 + doff, dl = dl0 + doff;
            if (steps == 4) stage<4>(facc, da, dh, dl);
            else if (steps == 3) stage<3>(facc, da, dh, dl);
            else if (steps == 2) stage<2>(facc, da, dh, dl);
            else stage<1>(facc, da, dh, dl);
        }

        // ---- store: accumulator d[4j + q] is row jr + 8·(q >> 1), token 8j + 2·tg + (q & 1).
        const int jr = 64 * wgi + 16 * w4 + g;
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int col = 8 * j + 2 * tg + c;
                if (col >= nvalid) continue;
                const int src = s_src[col];
                const float cs = __ldg(P.ascale + s_arow[col]);
                float* yrow = P.y + (i64)sp * P.ysplit + (i64)src * P.ldy + (P.grouped ? (i64)m * P.R : 0);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int r = r0 + jr + 8 * h;
                    if (r < P.R) yrow[r] = __fmul_rn(cs, facc[4 * j + 2 * h + c]);
                }
            }
    }
};
}  // namespace wg

#define TC_INST_WG(name, MODE, I2F)                                                             \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, (wg::Lay::MINB))                    \
        ds4_tc_##name(const TcArgs P) { PDL_ENTRY();                                             \
        wg::Tc<MODE, I2F>::run(P);                                                               \
    }
TC_INST_WG(q8_0_wg64_s, M_STORE, true)
TC_INST_WG(q8_0_wg64_g, M_SWIGLU, true)
TC_INST_WG(q8_0_wg64m_s, M_STORE, false)
TC_INST_WG(q8_0_wg64m_g, M_SWIGLU, false)
extern "C" __global__ void __launch_bounds__(TC_THREADS, (wg::LayF16::MINB)) ds4_tc_f16_wg64_s(const TcArgs P) {
    PDL_ENTRY();
    wg::TcF16::run(P);
}


#define TC_INST(name, T, BN, MODE)                                                              \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, (Lay<T, BN>::MINB))                 \
        ds4_tc_##name(const TcArgs P) { PDL_ENTRY();                                                          \
        Tc<T, BN, MODE>::run(P);                                                                 \
    }
#define TC_INST_D0(name, T, BN, MODE)                                                           \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, (d0::Lay<T, BN>::MINB))             \
        ds4_tc_##name(const TcArgs P) { PDL_ENTRY();                                                          \
        d0::Tc<T, BN, MODE>::run(P);                                                             \
    }
TC_INST_D0(q8_0_32_s, W_Q8_0, 32, M_STORE)
TC_INST_D0(q8_0_64_s, W_Q8_0, 64, M_STORE)
TC_INST_D0(q8_0_32_g, W_Q8_0, 32, M_SWIGLU)
TC_INST_D0(q8_0_64_g, W_Q8_0, 64, M_SWIGLU)
TC_INST(iq2_xxs_32_s, W_IQ2, 32, M_STORE)
TC_INST(iq2_xxs_64_s, W_IQ2, 64, M_STORE)
TC_INST(iq2_xxs_32_g, W_IQ2, 32, M_SWIGLU)
TC_INST(iq2_xxs_64_g, W_IQ2, 64, M_SWIGLU)
TC_INST(q2_k_32_s, W_Q2K, 32, M_STORE)
TC_INST(q2_k_64_s, W_Q2K, 64, M_STORE)
TC_INST(q2_k_32_g, W_Q2K, 32, M_SWIGLU)
TC_INST(q2_k_64_g, W_Q2K, 64, M_SWIGLU)
TC_INST(q4_k_32_s, W_Q4K, 32, M_STORE)
TC_INST(q4_k_64_s, W_Q4K, 64, M_STORE)
TC_INST(q4_k_32_g, W_Q4K, 32, M_SWIGLU)
TC_INST(q4_k_64_g, W_Q4K, 64, M_SWIGLU)
TC_INST_D0(f16_64_s, W_F16, 64, M_STORE)
// 128-pair tiles of the routed MoE GEMMs (IQ2_XXS gate+up, Q2_K down; opt-in, src/tc.rs `moe_bn`).
TC_INST(iq2_xxs_128_g, W_IQ2, 128, M_SWIGLU)
TC_INST(q2_k_128_s, W_Q2K, 128, M_STORE)

// Dynamic shared memory of each variant, in the order of TC_INST above (read once at start-up).
extern "C" __global__ void ds4_tc_smem_sizes(int* out) {
    PDL_ENTRY();
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    out[0] = d0::Lay<W_Q8_0, 32>::TOTAL;
    out[1] = d0::Lay<W_Q8_0, 64>::TOTAL;
    out[2] = Lay<W_IQ2, 32>::TOTAL;
    out[3] = Lay<W_IQ2, 64>::TOTAL;
    out[4] = Lay<W_Q2K, 32>::TOTAL;
    out[5] = Lay<W_Q2K, 64>::TOTAL;
    out[6] = Lay<W_Q4K, 32>::TOTAL;
    out[7] = Lay<W_Q4K, 64>::TOTAL;
    out[8] = d0::Lay<W_F16, 64>::TOTAL;
    out[9] = (int)sizeof(TcArgs);
    out[10] = d0::Lay<W_Q8_0, 64>::MINB;
    out[11] = Lay<W_IQ2, 64>::MINB;
    out[12] = Lay<W_Q2K, 64>::MINB;
    out[13] = Lay<W_Q4K, 64>::MINB;
    out[14] = d0::Lay<W_F16, 64>::MINB;
    out[15] = wg::Lay::TOTAL;  // ds4_tc_q8_0_wg64_*, wg64m_*
    out[16] = wg::Lay::MINB;
    out[17] = Lay<W_IQ2, 128>::TOTAL;  // ds4_tc_iq2_xxs_128_g
    out[18] = Lay<W_IQ2, 128>::MINB;
    out[19] = Lay<W_Q2K, 128>::TOTAL;  // ds4_tc_q2_k_128_s
    out[20] = Lay<W_Q2K, 128>::MINB;
    out[21] = wg::LayF16::TOTAL;  // ds4_tc_f16_wg64_s
    out[22] = wg::LayF16::MINB;
}

// Split-K reduction: y[i] = Σ_s part[s·total + i], splits in order (deterministic).
extern "C" __global__ void ds4_tc_splitk_sum(const float* __restrict__ part, int nspl, i64 total,
                                             float* __restrict__ y) {
    PDL_ENTRY();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        float s = part[i];
        for (int k = 1; k < nspl; k++) s = __fadd_rn(s, part[(i64)k * total + i]);
        y[i] = s;
    }
}

// ------------------------------------------------------------------------------------------
// F16 route activations: per row t, e = 15 − exponent(max|x|) (clamped to ±100), x·2^e split
// into f16 hi + lo, ascale[t] = 2^-e. One block per row (blockDim ≤ 256, whole warps). Rows of
// cols % 4 == 0 and ≤ blockDim·4·PREP_U columns (16-byte aligned) are read once into registers
// (float4, every load in flight together); others are read twice.
#define PREP_U 16
extern "C" __global__ void __launch_bounds__(256) ds4_tc_f16_prep(const float* __restrict__ x, int cols,
                                                                  u16* __restrict__ hi, u16* __restrict__ lo,
                                                                  float* __restrict__ ascale) {
    PDL_ENTRY();
    __shared__ float s_red[8];
    const i64 t = blockIdx.x;
    const float* xr = x + t * cols;
    const int T = blockDim.x;
    const int c4 = cols >> 2;
    const bool vec = (cols & 3) == 0 && c4 <= T * PREP_U && ((u64)x & 15) == 0 &&
                     ((u64)hi & 15) == 0 && ((u64)lo & 15) == 0;
    float4 v[PREP_U];
    float am = 0.f;
    if (vec) {
#pragma unroll
        for (int u = 0; u < PREP_U; u++) {
            const int c = threadIdx.x + u * T;
            v[u] = c < c4 ? ((const float4*)xr)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < PREP_U; u++)
            am = fmaxf(am, fmaxf(fmaxf(fabsf(v[u].x), fabsf(v[u].y)), fmaxf(fabsf(v[u].z), fabsf(v[u].w))));
    } else {
        for (int i = threadIdx.x; i < cols; i += T) am = fmaxf(am, fabsf(xr[i]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(FULL_MASK, am, o));
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = am;
    __syncthreads();
    am = s_red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) am = fmaxf(am, s_red[w]);
    int e = 0;
    if (am > 0.f && am <= 3.4e38f) {
        int ex;
        frexpf(am, &ex);
        e = min(100, max(-100, 15 - ex));
    }
    if (vec) {
#pragma unroll
        for (int u = 0; u < PREP_U; u++) {
            const int c = threadIdx.x + u * T;
            if (c < c4) {
                const float a[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
                u16 h[4], l[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float s = ldexpf(a[k], e);
                    h[k] = f2h(s);
                    l[k] = f2h(__fsub_rn(s, h2f(h[k])));
                }
                ((uint2*)(hi + t * cols))[c] = make_uint2(h[0] | ((u32)h[1] << 16), h[2] | ((u32)h[3] << 16));
                ((uint2*)(lo + t * cols))[c] = make_uint2(l[0] | ((u32)l[1] << 16), l[2] | ((u32)l[3] << 16));
            }
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += T) {
            const float s = ldexpf(xr[i], e);
            const u16 h = f2h(s);
            hi[t * cols + i] = h;
            lo[t * cols + i] = f2h(__fsub_rn(s, h2f(h)));
        }
    }
    if (threadIdx.x == 0) ascale[t] = ldexpf(1.0f, -e);
}

// ------------------------------------------------------------------------------------------
// MoE bucketing (one block of 1024 threads, n_exp ≤ 1024): counts per expert, pair offsets,
// tile offsets (tiles of `bn` pairs), and the permutation grouping pairs by expert. Pairs with
// an id outside [0, n_exp) are left out (ds4_tc_moe_sum turns their token into NaN).
extern "C" __global__ void __launch_bounds__(1024) ds4_tc_moe_bucket(const int* __restrict__ ids, int npairs,
                                                                     int n_exp, int bn, int* __restrict__ cnt,
                                                                     int* __restrict__ off, int* __restrict__ toff,
                                                                     int* __restrict__ perm) {
    PDL_ENTRY();
    __shared__ int s_cnt[1024];
    __shared__ int s_cur[1024];
    __shared__ int s_off[1024];
    __shared__ int s_w[2][32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    s_cnt[tid] = 0;
    s_cur[tid] = 0;
    __syncthreads();
    for (int p = tid; p < npairs; p += 1024) {
        const int e = ids[p];
        if (e >= 0 && e < n_exp) atomicAdd(&s_cnt[e], 1);
    }
    __syncthreads();
    const int c = tid < n_exp ? s_cnt[tid] : 0;
    const int tl = (c + bn - 1) / bn;
    int ic = c, it = tl;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int vc = __shfl_up_sync(FULL_MASK, ic, o);
        const int vt = __shfl_up_sync(FULL_MASK, it, o);
        if (lane >= o) {
            ic += vc;
            it += vt;
        }
    }
    if (lane == 31) {
        s_w[0][warp] = ic;
        s_w[1][warp] = it;
    }
    __syncthreads();
    if (warp == 0) {
        int wc = s_w[0][lane], wt = s_w[1][lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int vc = __shfl_up_sync(FULL_MASK, wc, o);
            const int vt = __shfl_up_sync(FULL_MASK, wt, o);
            if (lane >= o) {
                wc += vc;
                wt += vt;
            }
        }
        s_w[0][lane] = wc;  // inclusive prefix over warps
        s_w[1][lane] = wt;
    }
    __syncthreads();
    const int pc = warp ? s_w[0][warp - 1] : 0;
    const int pt = warp ? s_w[1][warp - 1] : 0;
    const int incl_c = ic + pc, incl_t = it + pt;
    if (tid < n_exp) {
        cnt[tid] = c;
        off[tid] = incl_c - c;
        toff[tid] = incl_t - tl;
        s_off[tid] = incl_c - c;
    }
    if (tid == n_exp - 1) toff[n_exp] = incl_t;
    __syncthreads();
    for (int p = tid; p < npairs; p += 1024) {
        const int e = ids[p];
        if (e >= 0 && e < n_exp) perm[s_off[e] + atomicAdd(&s_cur[e], 1)] = p;
    }
}

// Routed-expert sum: out[t][r] = (float) Σ_j (double) part[t·k + j][r] in slot order (as the CPU
// and gemv's moe_down); NaN when an id of token t is outside [0, n_exp).
extern "C" __global__ void ds4_tc_moe_sum(const float* __restrict__ part, const int* __restrict__ ids, int n,
                                          int k, int n_exp, int E, float* __restrict__ out) {
    PDL_ENTRY();
    if ((E & 3) == 0 && k <= 8 && ((unsigned long long)part & 15) == 0 && ((unsigned long long)out & 15) == 0) {
        // Four columns per thread (16-byte loads), the k rows requested before the sum; same
        // slot order, so the same values as the scalar loop below.
        const int E4 = E >> 2;
        const i64 total4 = (i64)n * E4;
        for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < total4; u += (i64)gridDim.x * blockDim.x) {
            const i64 t = u / E4;
            const int r4 = (int)(u % E4);
            float4 v[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (j < k) v[j] = __ldg((const float4*)(part + (t * k + j) * E) + r4);
            bool bad = false;
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                if (j < k) {
                    const int e = __ldg(ids + t * k + j);
                    if (e < 0 || e >= n_exp) bad = true;
                    s0 += (double)v[j].x;
                    s1 += (double)v[j].y;
                    s2 += (double)v[j].z;
                    s3 += (double)v[j].w;
                }
            }
            const float nan = __int_as_float(0x7fc00000);
            ((float4*)out)[u] = bad ? make_float4(nan, nan, nan, nan)
                                    : make_float4((float)s0, (float)s1, (float)s2, (float)s3);
        }
        return;
    }
    const i64 total = (i64)n * E;
    for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += (i64)gridDim.x * blockDim.x) {
        const i64 t = u / E;
        const int r = (int)(u % E);
        bool bad = false;
        double s = 0.0;
        for (int j = 0; j < k; j++) {
            const int e = __ldg(ids + t * k + j);
            if (e < 0 || e >= n_exp) bad = true;
            s += (double)__ldg(part + (t * k + j) * E + r);
        }
        out[u] = bad ? __int_as_float(0x7fc00000) : (float)s;
    }
}
