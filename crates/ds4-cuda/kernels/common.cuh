// Shared by every kernel file: the programmatic-dependent-launch prologue and the small PTX
// helpers (cp.async, ldmatrix, f16 conversion) the tensor-core kernels use. build.rs splices
// local headers into the source it hands to NVRTC, so the kernel files stay NVRTC-compilable.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

// Programmatic dependent launch (src/rt.rs launch_raw): wait until the previous kernel of
// the stream has completed (its writes visible), then let the next kernel be scheduled.
// A no-op for kernels launched without the PDL attribute. Every kernel starts with it or with
// PDL_DEFERRED() below (tests/pdl_entry.rs).
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
// PDL_DEFERRED() (weight prologue): the kernel first reads data that no kernel writes after
// load (decode weights: the first tile's loads, lookup tables; Gemv::upload_device synchronizes
// its stream after writing them) and then calls pdl_wait() before it reads anything else, so
// that its weight stream starts while the previous kernel still runs. Only for the kernels
// listed in PDL_DEFERRED_KERNELS (src/lib.rs) (see gemv.cu dense_body). ptxas may schedule the wait (SASS
// ACQBULK) above loads of the same basic block, so the prologue's loads sit in a branch of
// their own; src/device.rs's unit test checks the order in the built cubins.
#define PDL_DEFERRED() ((void)0)
__device__ __forceinline__ void pdl_wait() { PDL_ENTRY(); }

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// ds4's int8 activation rounding (Q8_0 and the other per-block quantizations): v·id rounded
// once, to nearest even, NaN → 0, clamped to [-128, 127] (the CPU's `quantize_row_q8_0`).
__device__ __forceinline__ int q8_round(float v, float id) {
    const float p = __fmul_rn(v, id);
    const int q = (p == p) ? __float2int_rn(p) : 0;
    return max(-128, min(127, q));
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float f4_get(const float4& v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}
__device__ __forceinline__ void f4_set(float4& v, int k, float x) {
    if (k == 0) v.x = x;
    else if (k == 1) v.y = x;
    else if (k == 2) v.z = x;
    else v.w = x;
}

// The RoPE and Q-norm helpers below spell their f64 arithmetic with _rn intrinsics: fwd.cu is
// built with -fmad=false, attn_tc.cu is not, and both must produce the same bits (a plain
// a·b + c could be contracted into an fma in the latter).

// cos/sin of RoPE pair k at position pos: angle in f64, rounded to f32 (RopeParams::cos_sin).
__device__ __forceinline__ void rope_cs(const double* inv_freq, int k, long long pos, float* c, float* s) {
    const double th = __dmul_rn((double)pos, inv_freq[k]);
    *c = (float)cos(th);
    *s = (float)sin(th);
}

// ops::rope_tail on one pair.
__device__ __forceinline__ void rope_pair(float* x0, float* x1, float c, float s, bool inverse) {
    const double cc = (double)c;
    const double ss = inverse ? -(double)s : (double)s;
    const double a = (double)*x0, b = (double)*x1;
    *x0 = (float)__dsub_rn(__dmul_rn(a, cc), __dmul_rn(b, ss));
    *x1 = (float)__dadd_rn(__dmul_rn(a, ss), __dmul_rn(b, cc));
}

// Q heads' no-weight RMSNorm, warp form (fwd.cu ds4_head_norm_rope_fast, and the tensor-core
// attention's Q load, attn_tc.cu, which must produce the same bits): a warp holds one head row
// of hd <= 512 floats (hd % 4 == 0, 16-byte aligned), lane l the float4 columns l, l+32, l+64,
// l+96 (zero past the row or for an invalid head).
__device__ __forceinline__ void head_row_load(const float* row, int hd, bool valid, float4 v[4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const int c = lane + 32 * u;
        v[u] = (valid && c < (hd >> 2)) ? reinterpret_cast<const float4*>(row)[c] : make_float4(0, 0, 0, 0);
    }
}
// The row's norm factor 1 / sqrt(Σx² / hd + eps) (f64; each lane sums its columns in order,
// then warp_sum_d), the same value in every lane.
__device__ __forceinline__ double head_rms_scale(const float4 v[4], int hd, float eps) {
    double ss = 0.0;
#pragma unroll
    for (int u = 0; u < 4; u++)
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const double d = (double)f4_get(v[u], k);
            ss = __dadd_rn(ss, __dmul_rn(d, d));
        }
    ss = warp_sum_d(ss);
    return 1.0 / sqrt(__dadd_rn(ss / (double)hd, (double)eps));
}
// One normalized element: x·s rounded once to f32.
__device__ __forceinline__ float head_norm(float x, double s) { return (float)__dmul_rn((double)x, s); }
