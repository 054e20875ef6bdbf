// Shared by every kernel file: the programmatic-dependent-launch prologue and the small PTX
// helpers (cp.async, ldmatrix, f16 conversion) the tensor-core kernels use. build.rs splices
// local headers into the source it hands to NVRTC, so the kernel files stay NVRTC-compilable.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

// Programmatic dependent launch (src/rt.rs launch_raw): wait until the previous kernel of
// the stream has completed (its writes visible), then let the next kernel be scheduled.
// A no-op for kernels launched without the PDL attribute. Every kernel starts with it
// (tests/pdl_entry.rs).
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")

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
