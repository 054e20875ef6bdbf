// Pipeline self-test: proves a cubin built on the CPU box loads and runs on the device.
extern "C" __global__ void ds4_selftest_axpy(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
