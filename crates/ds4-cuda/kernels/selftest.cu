// Pipeline self-test (proves a cubin built on the CPU box loads and runs on the device) and
// diagnostics.

#include "common.cuh"
extern "C" __global__ void ds4_selftest_axpy(const float* x, float* y, float a, int n) {
    PDL_ENTRY();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

// Move every nonzero finite value one ulp (DS4_CUDA_PERTURB_ULP=<seed>: the drift gate's chaos
// floor, see scripts/drift-gate.sh). Seed 1: every value away from zero; any other seed: each
// value up or down by one ulp of its magnitude, the direction from a hash of (seed, index), so
// several seeds give independent samples of the model's sensitivity to 1-ulp changes.
extern "C" __global__ void ds4_perturb_ulp(float* x, long long n, unsigned int seed) {
    PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned int b = __float_as_uint(x[i]);
        if ((b & 0x7fffffffu) != 0 && (b & 0x7f800000u) != 0x7f800000u) {
            bool up = true;
            if (seed != 1u) {
                unsigned int h = (unsigned int)i * 0x9E3779B1u ^ seed * 0x85EBCA77u ^ (unsigned int)(i >> 32);
                h ^= h >> 15;
                h *= 0x2C1B3C6Du;
                h ^= h >> 12;
                h *= 0x297A2D39u;
                h ^= h >> 15;
                up = (h & 1u) != 0;
            }
            x[i] = __uint_as_float(up ? b + 1 : b - 1);
        }
    }
}
