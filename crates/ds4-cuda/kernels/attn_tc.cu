// Tensor-core chunk attention: the "attn" prefill route (see src/attn_tc.rs for the API, the
// switches and the numerics). Local headers only (common.cuh), which build.rs splices in for
// NVRTC.
//
// The exact kernel (fwd.cu ds4_attention) runs one warp per (token, head) in f64. DeepSeek V4
// attention is MQA-like: the 64 heads of a token attend to the same rows (raw window from the
// ring + compressed rows, all of them or the indexer's top-k), and a row is both key and value.
// So per token it is two small GEMMs, S = Q·Rᵀ (heads × rows, K = head_dim) and O = P·R, done
// here FlashAttention-style with mma.sync m16n8k16 (f16 operands, f32 accumulation) and an
// online softmax in f32 registers:
//
//   * an "item" = one token × 32 heads; persistent CTAs (grid: at most one per SM) run items
//     blockIdx.x, + gridDim.x, ... with their row tiles as one stream (the next item's first
//     tile and indexer picks are gathered under the current item's last tile; each m-group
//     finishes an item on its own, so one item's epilogue and the next one's Q load overlap the
//     other m-group's mmas). 16 warps in two "m-groups" of 8 (m-group 0: warps 0-3 and 8-11,
//     m-group 1: warps 4-7 and 12-15, so every scheduler holds two of each); an m-group owns 16
//     heads, each of its warps an eighth of the dims (hd/8) for S's K range and for O's output
//     columns. Q's hi fragments stay in registers for the item, its lo part in shared memory
//     (ldmatrix);
//   * the rows are gathered 32 at a time (a "tile") into shared memory with cp.async (2-stage
//     ring, XOR-swizzled 16-byte chunks, read with ldmatrix); rows past the token's count are
//     replaced by a valid row and masked to -inf. The token's indexer picks are staged in
//     shared memory (so forming a gather's source rows never waits for a global load).
//     m-group 1 gathers; the two m-groups run decoupled ("ping-pong", so that one's softmax
//     overlaps the other's mmas), the ring being handed over by named barriers (see the loop);
//   * S: each warp multiplies its 16 heads by the tile over its eighth of the dims; the eight
//     partial sums meet in shared memory and each warp of the m-group adds them, in a fixed
//     order, for the 2 heads × 32 rows it owns;
//   * softmax (by the owner, once per head): running max / sum per head (f32, expf); P carried
//     as p·2^14 (exact power of two, undone at the end) so that its low part stays out of f16
//     subnormals, written to shared memory as f16 hi / lo with the per-head rescale factor;
//   * O: each warp rescales its O, then multiplies P (16 heads × 32 rows, ldmatrix) by its
//     eighth of the tile (ldmatrix.trans);
//   * finish as ds4_attention: the sink joins the softmax denominator (f64, once per head),
//     inverse RoPE on the tail (cos / sin in f64 once per item), f32 output; the output scale
//     and the RoPE rotation in f32 with error terms (within ~1 ulp of the f64 forms, without
//     f64 conversions per output).
//
// Precision (template SPLIT): with SPLIT every operand is carried as two f16 (x ≈ hi + lo,
// hi = f16(x), lo = f16(x - hi): 22 bits) and each product takes three mmas (hi·hi + hi·lo +
// lo·hi; the lo·lo term is below 2^-22): near-f32 attention (the default). Without SPLIT the
// operands are plain f16 (11 bits, one mma per product): ~3× less tensor work, ~1e-3 relative
// error (opt-in).
//
// The rows are f32 in the KV state; ds4_attn_tc_prep first writes them as [row][hi hd | lo hd]
// f16 into a scratch (ring: every slot; compressed rows: those visible to the chunk), with a
// flag word per row (bit e: the lo part of eighth e of the dims is all ±0). A warp whose eighth
// is flagged in every row of a tile skips the hi·lo products (Q hi · row lo in S, P hi · row
// lo in O): they add exactly zero, and the other products keep their order, so the sums are
// the same bits. Model rows qualify on their nope dims (FP8 round trip: 4 significant bits).
// For head dim 512 the prep also writes compact rows [hi | lo of eighth 7]; a launch whose every
// readable row is flagged in eighths 0-6 gathers those (1152 instead of 2048 bytes a row).

#include "common.cuh"

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define AT_THREADS 512
#define AT_WARPS 16
#define AT_XS 40  // sX row stride (floats): conflict-free float2 stores of mma fragments
#define AT_PS 80  // sP row stride (bytes): conflict-free ldmatrix
#define AT_HPC 32  // heads per CTA
#define AT_BN 32   // rows per tile
#define AT_PSCALE 16384.0f
#define AT_SELMAX 512  // indexer picks staged in shared memory (more: read from global memory)

__device__ __forceinline__ void ldsm4t(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}
// d += a·b (f16 × f16 → f32, m16n8k16)
__device__ __forceinline__ void mma16(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void bar_named(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// x ≈ hi + lo (x clamped to the f16 range first).
__device__ __forceinline__ void split_h(float x, u16* hi, u16* lo) {
    x = fminf(fmaxf(x, -65504.0f), 65504.0f);
    *hi = f2h(x);
    *lo = f2h(x - h2f(*hi));
}
__device__ __forceinline__ u32 pack2(u16 lo_k, u16 hi_k) { return (u32)lo_k | ((u32)hi_k << 16); }
// 4-byte cp.async (the indexer picks into shared memory).
__device__ __forceinline__ void at_cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
// a·b + c·d in f32 with the rounding error of c·d added back (two-product): within ~1 ulp.
__device__ __forceinline__ float at_dot2(float a, float b, float c, float d) {
    const float p = c * d;
    const float e = fmaf(c, d, -p);
    return fmaf(a, b, p) + e;
}

// The exact kernel's inverse RoPE (common.cuh rope_pair, f64) in f32 with two-product error
// terms: within ~1 ulp of the f64 form.
__device__ __forceinline__ void at_rope_inv(float* x0, float* x1, float c, float s) {
    const float a = *x0, b = *x1;
    *x0 = at_dot2(a, c, b, s);
    *x1 = at_dot2(b, c, -a, s);
}

// f32 rows → [row][hi hd | lo hd] f16. `rows` rows, or with ratio > 0 only the compressed rows
// visible to a chunk of n tokens at *pos0p: min(rows, (pos0 + n) / ratio). One warp per row,
// lane l the dims [l·hd/32, (l+1)·hd/32), so that the 4 lanes 4s..4s+3 hold eighth s of the dims
// (the kernel's warp slice e = s). With `flags`: flags[r] bit s set when every lo of eighth s of
// row r is ±0, i.e. that part of the row is exact in f16 (the FP8 KV round trip of the nope dims
// makes it so for model rows): the kernel then skips the hi·lo products of that eighth, which
// add exactly nothing. With `dstc` (hd 512) the rows are also written compact,
// [row][hi hd | lo of eighth 7 (hd / 8)], for launches whose rows are all exact in eighths 0-6.
// hd % 128 == 0.
extern "C" __global__ void __launch_bounds__(256)
    ds4_attn_tc_prep(const float* __restrict__ src, int rows, const int* __restrict__ pos0p, int n,
                     int ratio, int hd, u16* __restrict__ dst, unsigned* __restrict__ flags,
                     u16* __restrict__ dstc) {
    PDL_ENTRY();
    i64 nr = rows;
    if (ratio > 0) {
        const i64 v = ((i64)*pos0p + n) / ratio;
        nr = v < nr ? v : nr;
    }
    const int lane = threadIdx.x & 31, per = hd / 32;
    const i64 nw = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < nr; r += nw) {
        u32 lo_bits = 0;
        for (int k = 0; k < per; k += 4) {
            const int d = lane * per + k;
            const float4 v = *reinterpret_cast<const float4*>(src + r * hd + d);
            u16 h[4], l[4];
            split_h(v.x, &h[0], &l[0]);
            split_h(v.y, &h[1], &l[1]);
            split_h(v.z, &h[2], &l[2]);
            split_h(v.w, &h[3], &l[3]);
            lo_bits |= (u32)(l[0] | l[1] | l[2] | l[3]) & 0x7fffu;
            u16* o = dst + r * 2 * hd + d;
            *reinterpret_cast<uint2*>(o) = make_uint2(pack2(h[0], h[1]), pack2(h[2], h[3]));
            *reinterpret_cast<uint2*>(o + hd) = make_uint2(pack2(l[0], l[1]), pack2(l[2], l[3]));
            if (dstc) {
                u16* oc = dstc + r * (hd + hd / 8);
                *reinterpret_cast<uint2*>(oc + d) = make_uint2(pack2(h[0], h[1]), pack2(h[2], h[3]));
                if (d >= 7 * (hd / 8))
                    *reinterpret_cast<uint2*>(oc + hd + d - 7 * (hd / 8)) =
                        make_uint2(pack2(l[0], l[1]), pack2(l[2], l[3]));
            }
        }
        const u32 nz = __ballot_sync(0xffffffffu, lo_bits != 0);
        if (flags && lane == 0) {
            u32 f = 0;
#pragma unroll
            for (int s = 0; s < 8; s++) f |= (((nz >> (4 * s)) & 15u) == 0 ? 1u : 0u) << s;
            flags[r] = f;
        }
    }
}

// A compile-time bool as a value (for the generic lambdas that unswitch the tile loops).
template <bool B>
struct AtBool {
    static constexpr bool value = B;
};

// Shared-memory layout (bytes) of one variant.
template <int HD, bool SPLIT>
struct AtLay {
    static constexpr int CH = HD / 8;                 // 16-byte chunks per f16 half-row
    static constexpr int KCH = SPLIT ? 2 * CH : CH;  // chunks per tile row (hi | lo)
    static constexpr int K_STAGE = AT_BN * KCH * 16;
    static constexpr int X_BYTES = AT_WARPS * 16 * AT_XS * 4;  // S partials: per warp 16 heads × 32 rows
    static constexpr int P_BYTES = 2 * 2 * 16 * AT_PS;         // P: per m-group hi, lo: 16 heads × 32 rows f16
    static constexpr int F_BYTES = AT_HPC * 4 + AT_HPC * 8;    // per head: correction, final factor (f64)
    static constexpr int RC_BYTES = 4 * (HD / 2) * 8;          // RoPE (cos, sin) per pair: [m-group][item parity]
    static constexpr int X_OFF = 2 * K_STAGE;
    static constexpr int P_OFF = X_OFF + X_BYTES;
    static constexpr int F_OFF = P_OFF + P_BYTES;
    static constexpr int RC_OFF = F_OFF + F_BYTES;
    static constexpr int QL_OFF = RC_OFF + RC_BYTES;
    static constexpr int QL_BYTES = SPLIT ? AT_HPC * CH * 16 : 0;  // Q lo: 32 heads × HD f16
    static constexpr int SEL_OFF = QL_OFF + QL_BYTES;              // the token's indexer picks
    static constexpr int QS_OFF = SEL_OFF + 2 * AT_SELMAX * 4;     // per head: Q norm factor (f64)
    static constexpr int FL_OFF = QS_OFF + AT_HPC * 8;             // [stage][row] lo flags (prep)
    static constexpr int TOTAL = FL_OFF + 2 * AT_BN * 4;
};

// Byte offset of chunk `ch` of row `r` in a tile of `nch` chunks per row (XOR swizzle: the 8
// rows one ldmatrix reads hit 8 different bank groups).
__device__ __forceinline__ int at_swz(int r, int ch, int nch) { return (r * nch + (ch ^ (r & 7))) << 4; }

template <int HD, bool SPLIT>
__device__ __forceinline__ void attn_tc_body(
    const float* __restrict__ q, const u16* __restrict__ ring16, int raw_cap, int window,
    const u16* __restrict__ comp16, int ratio, int has_indexer, const int* __restrict__ isel, int topk,
    const float* __restrict__ sinks, float scale, int nh, int n_rot, const double* __restrict__ inv_freq,
    const int* __restrict__ pos0p, float* __restrict__ heads, signed char* __restrict__ q8s,
    float* __restrict__ q8d, int n_tok, int qnorm, float eps, const unsigned* __restrict__ flags,
    const u16* __restrict__ rowc, unsigned* __restrict__ rep) {
    typedef AtLay<HD, SPLIT> L;
    constexpr int CH = L::CH;
    constexpr int KCH = L::KCH;
    constexpr int DQ = HD / 8;      // output dims per warp (and QK K-range per warp)
    constexpr int KS = DQ / 16;     // QK k-steps per warp
    constexpr int NBO = DQ / 8;     // O n-blocks per warp
    constexpr int NBS = AT_BN / 8;  // S n-blocks
    static_assert(KS >= 1 && NBO % 2 == 0 && KCH >= 8, "tile shape");
    // Compact rows (hi | lo of eighth 7): for Split with whole 8-chunk groups (head dim 512).
    constexpr int CCH = CH + CH / 8;
    constexpr bool CPT = SPLIT && CCH % 8 == 0;
    extern __shared__ __align__(128) unsigned char at_smem[];
    unsigned char* sK = at_smem;
    float* sX = reinterpret_cast<float*>(at_smem + L::X_OFF);
    unsigned char* sP = at_smem + L::P_OFF;
    float* sC = reinterpret_cast<float*>(at_smem + L::F_OFF);  // [32] per-tile correction
    double* sF = reinterpret_cast<double*>(sC + AT_HPC);       // [32] final output factor
    float2* sRC = reinterpret_cast<float2*>(at_smem + L::RC_OFF);  // [m-group][item parity][HD / 2]
    unsigned char* sQL = at_smem + L::QL_OFF;                  // Q lo rows (swizzled like a tile)
    int* sSel = reinterpret_cast<int*>(at_smem + L::SEL_OFF);  // [item parity][AT_SELMAX] picks
    double* sQS = reinterpret_cast<double*>(at_smem + L::QS_OFF);  // [32] Q norm factors (qnorm)
    unsigned* sFl = reinterpret_cast<unsigned*>(at_smem + L::FL_OFF);  // [stage][32] row lo flags

    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;
    // m-group (16 heads) and eighth of the dims: warps 0-3, 8-11 are m-group 0, warps 4-7,
    // 12-15 m-group 1, so that every scheduler holds two warps of each. m-group 1's eighths are
    // rotated by two schedulers, so that the two warps of eighth 7 (the RoPE dims: the only
    // ones whose model rows keep a lo part, so the most mmas) sit on different schedulers.
    const int mg = (w >> 2) & 1, e = ((w + 2 * mg) & 3) | ((w >> 3) << 2);
    const int li = e * 32 + lane;  // index of the thread within its m-group
    const int nhb = (nh + AT_HPC - 1) / AT_HPC;
    const int n_items = nhb * n_tok;  // item = token * nhb + head block
    const i64 pos0 = (i64)*pos0p;
    const int n_nope = HD - n_rot;
    // Compact mode: every row this launch can read (all ring slots, the visible compressed
    // rows) is exact in f16 over eighths 0-6, so those warps always skip their hi·lo products
    // and the rows are gathered compact (hi | lo of eighth 7: 44 % fewer bytes).
    bool compact = false;
    if (CPT && rowc && flags) {
        const int nr = raw_cap + (ratio ? (int)((pos0 + n_tok) / ratio) : 0);
        int ok = 1;
        for (int i = tid; i < nr; i += AT_THREADS) ok &= (__ldg(flags + i) & 0x7fu) == 0x7fu;
        compact = __syncthreads_and(ok) != 0;
        if (rep && blockIdx.x == 0 && tid == 0) *rep = compact ? 1u : 0u;
    }
    const int kch = compact ? CCH : KCH;       // chunks per tile row
    const int lo_off = compact ? CH / 8 : CH;  // hi chunk → its lo chunk (compact: eighth 7 only)

    // One (token, head block) item: its rows are the raw window (ring slots from lo_slot) then
    // the compressed rows (all visible ones, or the indexer's picks).
    struct Item {
        int t, hb, n_raw, lo_slot, R, ntiles;
        bool use_sel;
    };
    // (32-bit unsigned arithmetic: positions are below 2^32.)
    auto item_of = [&](int it) -> Item {
        Item I;
        I.t = it / nhb;
        I.hb = it - I.t * nhb;
        const u32 p1 = (u32)(pos0 + I.t) + 1u;  // p + 1
        const u32 n_raw = p1 < (u32)window ? p1 : (u32)window;
        const u32 nv = ratio ? p1 / (u32)ratio : 0u;
        I.use_sel = has_indexer && nv > (u32)topk;
        const u32 n_c = I.use_sel ? (u32)topk : nv;
        I.n_raw = (int)n_raw;
        I.lo_slot = (int)((p1 - n_raw) % (u32)raw_cap);  // ring slot of window row 0 (n_raw <= raw_cap)
        I.R = (int)(n_raw + n_c);
        I.ntiles = (I.R + AT_BN - 1) / AT_BN;
        return I;
    };
    // Source row of this thread's row (li / 8; m-group 1 gathers) of tile j of item I: ring slot
    // s as s, compressed row c as -1 - c. Formed one tile ahead of its gather; `buf` >= 0: I's
    // picks are staged in sSel buffer `buf` (from tile 2 of the item on), else they are read
    // from global memory.
    auto src_of = [&](const Item& I, int j, int buf) -> int {
        int r = j * AT_BN + (li >> 3);
        if (r >= I.R) r = 0;
        if (r < I.n_raw) {
            const int slot = I.lo_slot + r;
            return slot >= raw_cap ? slot - raw_cap : slot;
        }
        const int c = r - I.n_raw;
        if (!I.use_sel) return -1 - c;
        return -1 - (buf >= 0 ? sSel[buf * AT_SELMAX + c] : __ldg(isel + (i64)I.t * topk + c));
    };
    // Stage the picks of token t into sSel buffer `buf` (m-group 1; committed with the gather
    // that follows).
    auto stage_sel = [&](int t, int buf) {
        if (topk <= AT_SELMAX) {
            const int* sel = isel + (i64)t * topk;
            for (int i = li; i < topk; i += 8 * 32) at_cp4(sSel + buf * AT_SELMAX + i, sel + i);
        }
    };
    // Gather a tile into stage st (m-group 1): thread → row li/8, chunks li%8, +8, ... (the
    // swizzle keeps chunk k + 8i at the row's swizzled chunk k plus 8i).
    auto issue = [&](int src_row, int st) {
        const int row = li >> 3, sub = li & 7;
        const u16* src = (src_row >= 0 ? ring16 + (i64)src_row * (2 * HD) : comp16 + (i64)(-1 - src_row) * (2 * HD)) + sub * 8;
        if (CPT && compact)
            src = rowc + (i64)(src_row >= 0 ? src_row : raw_cap + (-1 - src_row)) * (CCH * 8) + sub * 8;
        unsigned char* dst = sK + st * L::K_STAGE + at_swz(row, sub, kch);
#pragma unroll
        for (int i = 0; i < KCH / 8; i++)
            if (!CPT || i < kch / 8) cp16(dst + i * 128, src + i * 64);
        if (SPLIT && flags && !compact && sub == 0)
            at_cp4(sFl + st * AT_BN + row, flags + (src_row >= 0 ? src_row : raw_cap + (-1 - src_row)));
        cp_commit();
    };

    // Persistent CTAs: the CTA runs items blockIdx.x, + gridDim.x, ... (the grid is at most one
    // CTA per SM) and their tiles as one stream: gt counts the CTA's tiles, the ring stage of
    // tile gt is gt & 1, and m-group 1 gathers the tile after the current one also when it is
    // the next item's first (an item's first tile is not waited for; the epilogue of one item
    // overlaps the other m-group's work).
    //
    // The two m-groups run decoupled (ping-pong: one's softmax overlaps the other's mmas),
    // synchronised through named barriers on the 2-stage ring; m-group 1 gathers:
    //   F_gt (id 6): tile gt landed — m-group 1 arrives (after its own wait + barrier G, id 7),
    //                m-group 0 waits at the top of tile gt;
    //   E_gt (id 5): m-group 0 is done with tile gt - 1 — it arrives after F_gt, m-group 1
    //                waits before gathering tile gt + 1 into that stage.
    // Arrivals of one phase cannot mix with the next: each side passes the other's barrier of
    // tile gt before it can arrive at its own barrier of tile gt + 1. Both m-groups agree on
    // whether a tile follows (`more`). Per m-group state (Q lo rows, RoPE table, sF, sC, P) is
    // ordered by the m-group's own barriers (ids 1 + mg, 3 + mg); the RoPE table and the picks
    // are double-buffered by item parity.
    int item = blockIdx.x;
    if (item >= n_items) return;
    Item cur = item_of(item);
    // Producer (m-group 1): nx_* = the next tile to gather (source row; whether it is an
    // item's first tile, and then that item's token and sSel buffer); pc* = the tile after it.
    int nx_src = 0, nx_first = 0, nx_t = 0, nx_buf = 0;
    bool nx_sel = false;
    Item pc = cur;
    int pc_it = item, pc_j = 1, pc_k = 0;
    auto pc_take = [&]() {  // nx ← pc, then pc → the following tile of the stream
        if (pc_j >= pc.ntiles) {
            pc_it += gridDim.x;
            pc_j = 0;
            pc_k++;
            if (pc_it < n_items) pc = item_of(pc_it);
        }
        if (pc_it < n_items) {
            nx_src = src_of(pc, pc_j, (pc_j >= 2 && topk <= AT_SELMAX) ? (pc_k & 1) : -1);
            nx_first = pc_j == 0;
            nx_t = pc.t;
            nx_sel = pc.use_sel;
            nx_buf = pc_k & 1;
        }
        pc_j++;
    };
    if (mg == 1) {
        if (cur.use_sel) stage_sel(cur.t, 0);
        issue(src_of(cur, 0, -1), 0);  // commits the picks too
    }

    int gt = 0;  // the CTA's tile counter
    for (int kit = 0;; kit++) {  // kit: the CTA's item count
        const int t = cur.t, hb = cur.hb;
        const i64 p = pos0 + t;
        float2* rc = sRC + (mg * 2 + (kit & 1)) * (HD / 2);

        // L2 prefetch of the next item's Q rows (128-byte lines), so that its load at the next
        // item's start hits L2.
        if (item + (int)gridDim.x < n_items) {
            const int nit = item + (int)gridDim.x;
            const int nt = nit / nhb, nhb0 = (nit - nt * nhb) * AT_HPC;
            constexpr int LPH = HD / 32;  // lines per head
            for (int i = tid; i < AT_HPC * LPH; i += AT_THREADS) {
                const int h = nhb0 + i / LPH;
                if (h < nh) {
                    const float* a = q + ((i64)nt * nh + h) * HD + (i % LPH) * 32;
                    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a));
                }
            }
        }

        // Q (f32) of this warp's A fragments (heads 16·mg + g, +8; dims of its eighth; heads
        // past nh are zero), requested before the RoPE table is formed.
        float2 qv[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int hg = hb * AT_HPC + mg * 16 + g + 8 * (r & 1);
                const int d = e * DQ + ks * 16 + 8 * (r >> 1) + 2 * c4;
                qv[ks][r] = hg < nh ? *reinterpret_cast<const float2*>(q + ((i64)t * nh + hg) * HD + d)
                                    : make_float2(0.f, 0.f);
            }
        }
        // With qnorm, q holds the q_b product before ds4_head_norm_rope_fast, which is done
        // here on the load with the same numerics (common.cuh): each warp finds the norm
        // factors of 2 of the m-group's 16 heads (a warp per head row, as that kernel; the rows
        // requested with the fragments above), then the fragments are normalized and the RoPE
        // tail rotated (the item's table).
        if (qnorm) {
            float4 hrow[2][4];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int hg = hb * AT_HPC + mg * 16 + 2 * e + r;
                head_row_load(q + ((i64)t * nh + hg) * HD, HD, hg < nh, hrow[r]);
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const double s = head_rms_scale(hrow[r], HD, eps);
                if (lane == 0) sQS[mg * 16 + 2 * e + r] = s;
            }
        }
        // RoPE (cos, sin) of the token's position, one pair per thread of the m-group (as
        // fwd.cu, f64).
        for (int i = li; i < n_rot / 2; i += 8 * 32) {
            float c, sn;
            rope_cs(inv_freq, i, p, &c, &sn);
            rc[i] = make_float2(c, sn);
        }
        if (qnorm) bar_named(1 + mg, 8 * 32);  // sQS and the RoPE table of the m-group

        // → A fragments: hi in registers for the item, lo in shared memory (read back with
        // ldmatrix by the same warp only).
        u32 qh[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int hg = hb * AT_HPC + mg * 16 + g + 8 * (r & 1);
                const int d = e * DQ + ks * 16 + 8 * (r >> 1) + 2 * c4;
                float2 v = qv[ks][r];
                if (qnorm && hg < nh) {
                    const double s = sQS[hg - hb * AT_HPC];
                    v.x = head_norm(v.x, s);
                    v.y = head_norm(v.y, s);
                    if (d >= n_nope) {
                        const float2 cs = rc[(d - n_nope) >> 1];
                        rope_pair(&v.x, &v.y, cs.x, cs.y, false);
                    }
                }
                u16 h0, h1, l0, l1;
                split_h(v.x, &h0, &l0);
                split_h(v.y, &h1, &l1);
                qh[ks][r] = pack2(h0, h1);
                if (SPLIT) {
                    const int hl = mg * 16 + g + 8 * (r & 1);
                    *reinterpret_cast<u32*>(sQL + at_swz(hl, d >> 3, CH) + (d & 7) * 2) = pack2(l0, l1);
                }
            }
        }
        __syncwarp();
        if (kit == 0 && mg == 1) {  // publish tile 0 (F_0)
            cp_wait<0>();
            bar_named(7, 8 * 32);
            bar_arrive(6, 16 * 32);
            pc_take();
        }

        float O[NBO][4];
#pragma unroll
        for (int i = 0; i < NBO; i++) O[i][0] = O[i][1] = O[i][2] = O[i][3] = 0.f;
        // Softmax state of the head this lane owns (m-group head 2e + lane/16, rows 2·(lane%16), +1
        // of each tile): running max, running partial sum (summed over the 16 lanes at the end).
        const int hown = 2 * e + (lane >> 4);
        const int rown = 2 * (lane & 15);
        float m_run = -INFINITY, l_run = 0.f;
        float* xw = sX + w * (16 * AT_XS);
        auto wid = [&](int kk) { return ((kk - 2 * mg) & 3) + 4 * mg + 8 * (kk >> 2); };  // warp of eighth kk
        unsigned char* pH = sP + mg * (2 * 16 * AT_PS);
        unsigned char* pL = pH + 16 * AT_PS;
        const bool next_item = item + (int)gridDim.x < n_items;

        for (int j = 0; j < cur.ntiles; j++, gt++) {
            const bool more = j + 1 < cur.ntiles || next_item;
            if (mg == 0) {
                bar_named(6, 16 * 32);                // F_gt
                if (more) bar_arrive(5, 16 * 32);     // E_gt
            } else if (more) {
                bar_named(5, 16 * 32);                // E_gt
                if (nx_first && nx_sel) stage_sel(nx_t, nx_buf);
                issue(nx_src, (gt + 1) & 1);
                pc_take();
            }
            const unsigned char* kt = sK + (gt & 1) * L::K_STAGE;

            // Whether every row of the tile has a zero lo part in this warp's eighth (prep
            // flags): then its hi·lo products (S: Q hi · row lo, O: P hi · row lo) are exactly
            // zero and are skipped; the other products keep their order, so the sums are the
            // same bits. Warp-uniform.
            const bool rlo = compact ? e == 7
                                     : !SPLIT || !flags || !__all_sync(0xffffffffu, (sFl[(gt & 1) * AT_BN + lane] >> e) & 1u);

            // Partial S over this warp's eighth of the dims.
            float S[NBS][4];
#pragma unroll
            for (int i = 0; i < NBS; i++) S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
            auto s_tile = [&](auto lo_t) {
                constexpr bool LO = decltype(lo_t)::value;
#pragma unroll
                for (int ks = 0; ks < KS; ks++) {
                    const int kc = (e * DQ + ks * 16) >> 3;
                    u32 ql[4];
                    if (SPLIT) {
                        const int ar = mg * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                        ldsm4(ql, sQL + at_swz(ar, kc + (lane >> 4), CH));
                    }
#pragma unroll
                    for (int np = 0; np < NBS / 2; np++) {
                        const int br = np * 16 + (lane & 7) + (lane >> 4) * 8;
                        const int bc = kc + ((lane >> 3) & 1);
                        u32 bh[4];
                        ldsm4(bh, kt + at_swz(br, bc, kch));
                        mma16(S[2 * np], qh[ks], bh[0], bh[1]);
                        mma16(S[2 * np + 1], qh[ks], bh[2], bh[3]);
                        if (SPLIT) {
                            if (LO) {
                                u32 bl[4];
                                ldsm4(bl, kt + at_swz(br, bc + lo_off, kch));
                                mma16(S[2 * np], qh[ks], bl[0], bl[1]);
                                mma16(S[2 * np + 1], qh[ks], bl[2], bl[3]);
                            }
                            mma16(S[2 * np], ql, bh[0], bh[1]);
                            mma16(S[2 * np + 1], ql, bh[2], bh[3]);
                        }
                    }
                }
            };
            if (rlo) s_tile(AtBool<true>{});
            else s_tile(AtBool<false>{});
            // Partials → sX as [head][row]; the 8 warps of the m-group then each sum (fixed order)
            // and soft-max the 2 heads × 32 rows they own.
#pragma unroll
            for (int nb = 0; nb < NBS; nb++) {
                *reinterpret_cast<float2*>(xw + g * AT_XS + nb * 8 + 2 * c4) = make_float2(S[nb][0], S[nb][1]);
                *reinterpret_cast<float2*>(xw + (g + 8) * AT_XS + nb * 8 + 2 * c4) = make_float2(S[nb][2], S[nb][3]);
            }
            bar_named(1 + mg, 8 * 32);  // the 8 warps of the m-group
            float2 xs[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                xs[k] = *reinterpret_cast<const float2*>(sX + wid(k) * (16 * AT_XS) + hown * AT_XS + rown);
            float s0 = ((xs[0].x + xs[1].x) + (xs[2].x + xs[3].x)) + ((xs[4].x + xs[5].x) + (xs[6].x + xs[7].x));
            float s1 = ((xs[0].y + xs[1].y) + (xs[2].y + xs[3].y)) + ((xs[4].y + xs[5].y) + (xs[6].y + xs[7].y));

            // Online softmax (f32) of the owned head.
            const int rb = j * AT_BN;
            s0 = rb + rown < cur.R ? s0 * scale : -INFINITY;
            s1 = rb + rown + 1 < cur.R ? s1 * scale : -INFINITY;
            float tm = fmaxf(s0, s1);
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 4));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 8));
            const float nm = fmaxf(m_run, tm);  // finite: row rb < R is valid
            const float cf = expf(m_run - nm);
            m_run = nm;
            const float p0 = expf(s0 - nm), p1 = expf(s1 - nm);
            l_run = l_run * cf + (p0 + p1);
            {
                u16 h0, h1, q0, q1;
                split_h(p0 * AT_PSCALE, &h0, &q0);
                split_h(p1 * AT_PSCALE, &h1, &q1);
                *reinterpret_cast<u32*>(pH + hown * AT_PS + rown * 2) = pack2(h0, h1);
                if (SPLIT) *reinterpret_cast<u32*>(pL + hown * AT_PS + rown * 2) = pack2(q0, q1);
            }
            if ((lane & 15) == 0) sC[mg * 16 + hown] = cf;
            bar_named(3 + mg, 8 * 32);
            if (mg == 1 && more) {  // publish the next tile (F_{gt+1})
                cp_wait<0>();
                bar_named(7, 8 * 32);
                bar_arrive(6, 16 * 32);
            }

            // O = O·c + P·V over this warp's eighth of the dims.
            const float c0 = sC[mg * 16 + g], c1 = sC[mg * 16 + g + 8];
#pragma unroll
            for (int i = 0; i < NBO; i++) {
                O[i][0] *= c0;
                O[i][1] *= c0;
                O[i][2] *= c1;
                O[i][3] *= c1;
            }
            auto o_tile = [&](auto lo_t) {
                constexpr bool LO = decltype(lo_t)::value;
#pragma unroll
                for (int kk = 0; kk < AT_BN / 16; kk++) {
                    const int pr = (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int pc = (kk * 16 + (lane >> 4) * 8) * 2;
                    u32 ph[4], pl[4];
                    ldsm4(ph, pH + pr * AT_PS + pc);
                    if (SPLIT) ldsm4(pl, pL + pr * AT_PS + pc);
                    const int vr = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                    for (int nbp = 0; nbp < NBO / 2; nbp++) {
                        const int vc = ((e * DQ) >> 3) + 2 * nbp + (lane >> 4);
                        u32 vh[4];
                        ldsm4t(vh, kt + at_swz(vr, vc, kch));
                        mma16(O[2 * nbp], ph, vh[0], vh[1]);
                        mma16(O[2 * nbp + 1], ph, vh[2], vh[3]);
                        if (SPLIT) {
                            if (LO) {
                                u32 vl[4];
                                ldsm4t(vl, kt + at_swz(vr, vc + lo_off, kch));
                                mma16(O[2 * nbp], ph, vl[0], vl[1]);
                                mma16(O[2 * nbp + 1], ph, vl[2], vl[3]);
                            }
                            mma16(O[2 * nbp], pl, vh[0], vh[1]);
                            mma16(O[2 * nbp + 1], pl, vh[2], vh[3]);
                        }
                    }
                }
            };
            if (rlo) o_tile(AtBool<true>{});
            else o_tile(AtBool<false>{});
        }

        // Finish: the owned heads' sums over their 16 lanes, then per (head, dims): the sink,
        // inverse RoPE on the tail, f32 out (per m-group: the other one may be a tile ahead).
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 4);
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 8);
        {
            const int hg = hb * AT_HPC + mg * 16 + hown;
            if ((lane & 15) == 0 && hg < nh) {
                const double m = (double)m_run, l = (double)l_run;
                const double sk = (double)sinks[hg];
                const double M = fmax(sk, m);
                const double corr = exp(m - M);
                sF[mg * 16 + hown] = corr / (exp(sk - M) + l * corr) / (double)AT_PSCALE;
            }
        }
        bar_named(1 + mg, 8 * 32);  // sF and the RoPE table of the m-group
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int hl = mg * 16 + g + 8 * half;
            const int hg = hb * AT_HPC + hl;
            // Heads past nh compute on (the Q8_0 shuffles below need the whole warp) but store
            // nothing; a head's 4 lanes (one g) agree on it.
            const bool hv = hg < nh;
            // f as an f32 pair (f ≈ fh + fl): o·fh + o·fl is o·f rounded once (as the f64 form was).
            const double f = sF[hl];
            const float fh = (float)f, fl = (float)(f - (double)fh);
            const i64 row = ((i64)t * nh + hg) * HD;
            float v[NBO][2];
#pragma unroll
            for (int nb = 0; nb < NBO; nb++) {
                const int d = e * DQ + nb * 8 + 2 * c4;
                const float o0 = O[nb][2 * half], o1 = O[nb][2 * half + 1];
                float v0 = fmaf(o0, fh, o0 * fl);
                float v1 = fmaf(o1, fh, o1 * fl);
                if (d >= n_nope) {
                    const float2 cs = rc[(d - n_nope) >> 1];
                    at_rope_inv(&v0, &v1, cs.x, cs.y);
                }
                v[nb][0] = v0;
                v[nb][1] = v1;
                if (hv && heads) *reinterpret_cast<float2*>(heads + row + d) = make_float2(v0, v1);
            }
            // Q8_0 activation quantization of the output row for out_a (ds4_quant_q8_0's
            // numerics and layout: qs[t·cols + i], d[(t·cols + i) / 32]): a 32-dim block is 4
            // n-blocks × the 4 lanes of one g (DQ % 32 == 0 only; the launcher passes q8s = 0
            // otherwise).
            if constexpr (DQ % 32 == 0) {
                if (q8s) {
#pragma unroll
                    for (int b0 = 0; b0 < NBO; b0 += 4) {
                        float am = 0.f;
#pragma unroll
                        for (int nb = b0; nb < b0 + 4; nb++)
#pragma unroll
                            for (int k = 0; k < 2; k++) {
                                const float a = fabsf(v[nb][k]);
                                if (a > am) am = a;  // NaN never wins (CPU: `a > amax` is false)
                            }
                        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
                        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
                        const float dd = am / 127.0f;
                        const float id = dd != 0.f ? 1.0f / dd : 0.f;
#pragma unroll
                        for (int nb = b0; nb < b0 + 4; nb++) {
                            const int d = e * DQ + nb * 8 + 2 * c4;
                            u32 word = 0;
#pragma unroll
                            for (int k = 0; k < 2; k++) {
                                word |= (u32)(q8_round(v[nb][k], id) & 255) << (8 * k);
                            }
                            if (hv) *reinterpret_cast<unsigned short*>(q8s + row + d) = (unsigned short)word;
                        }
                        if (hv && c4 == 0) q8d[(row + e * DQ + b0 * 8) >> 5] = dd;
                    }
                }
            }
        }
        if (!next_item) break;
        item += gridDim.x;
        cur = item_of(item);
    }
}

#define AT_ARGS                                                                                    \
    const float *__restrict__ q, const u16 *__restrict__ ring16, int raw_cap, int window,          \
        const u16 *__restrict__ comp16, int ratio, int has_indexer, const int *__restrict__ isel,  \
        int topk, const float *__restrict__ sinks, float scale, int nh, int n_rot,                 \
        const double *__restrict__ inv_freq, const int *__restrict__ pos0p, float *__restrict__ heads,         \
        signed char *__restrict__ q8s, float *__restrict__ q8d, int n_tok, int qnorm, float eps,  \
        const unsigned *__restrict__ flags, const u16 *__restrict__ rowc, unsigned *__restrict__ rep
#define AT_PASS q, ring16, raw_cap, window, comp16, ratio, has_indexer, isel, topk, sinks, scale, nh, n_rot, inv_freq, pos0p, heads, q8s, q8d, n_tok, qnorm, eps, flags, rowc, rep

#define AT_KERNEL(hd, split, name)                                                                 \
    extern "C" __global__ void __launch_bounds__(AT_THREADS, 1) name(AT_ARGS) { PDL_ENTRY();                  \
        attn_tc_body<hd, split>(AT_PASS);                                                          \
    }
AT_KERNEL(512, true, ds4_attn_tc_512_x)
AT_KERNEL(512, false, ds4_attn_tc_512_h)
AT_KERNEL(128, true, ds4_attn_tc_128_x)
AT_KERNEL(128, false, ds4_attn_tc_128_h)

// Dynamic shared memory of each variant, in the order above.
extern "C" __global__ void ds4_attn_tc_smem(int* out) {
    PDL_ENTRY();
    if (threadIdx.x == 0) {
        out[0] = AtLay<512, true>::TOTAL;
        out[1] = AtLay<512, false>::TOTAL;
        out[2] = AtLay<128, true>::TOTAL;
        out[3] = AtLay<128, false>::TOTAL;
    }
}
