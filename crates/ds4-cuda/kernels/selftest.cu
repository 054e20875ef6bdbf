// Pipeline self-test (proves a cubin built on the CPU box loads and runs on the device) and
// diagnostics.
extern "C" __global__ void ds4_selftest_axpy(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

// Move every nonzero finite value one ulp away from zero (DS4_CUDA_PERTURB_ULP=1: the drift
// gate's chaos floor, see scripts/drift-gate.sh).
extern "C" __global__ void ds4_perturb_ulp(float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned int b = __float_as_uint(x[i]);
        if ((b & 0x7fffffffu) != 0 && (b & 0x7f800000u) != 0x7f800000u) x[i] = __uint_as_float(b + 1);
    }
}
