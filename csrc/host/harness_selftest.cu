// A kernel that exercises every feature of the host SIMT harness, checked against torch in
// tests/test_toolchain.py and compiled by nvcc for sm_80/sm_90 in the same test, so the harness is
// proven on code that is also valid CUDA.
//
// For each row r of x (rows x cols, fp32): out[r] = sum of the row (block_sum: shuffles + shared
// memory + barriers); prefix[r, :32] = inclusive prefix sum over the first 32 elements (shfl_up);
// maxes[r] = max over the row (shfl_down); ballot[r] = bit mask of positive lanes among the first 32
// (ballot); dyn[r, c] = row reversed through dynamic shared memory; *grand += row sum (atomicAdd).
#include "common.cuh"

__global__ void harness_selftest_kernel(const float* x, int cols, float* sums, float* prefix, float* maxes,
                                        unsigned* ballots, float* reversed, float* grand) {
  __shared__ float scratch[32];
  __shared__ float warp_max[32];
  NOVA_DYNAMIC_SHARED(float, row_copy);
  const int row = blockIdx.x;
  const float* xr = x + static_cast<long long>(row) * cols;
  float acc = 0.0f, mx = -INFINITY;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = xr[c];
    acc += v;
    mx = fmaxf(mx, v);
    row_copy[c] = v;
  }
  const float total = nova::block_sum(acc, scratch);
  for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_down_sync(0xffffffffu, mx, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = mx;  // lane 0 holds its warp's max
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < (blockDim.x + 31) / 32; ++w) mx = fmaxf(mx, warp_max[w]);
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float v = lane < cols ? xr[lane] : 0.0f;
    const unsigned positive = __ballot_sync(0xffffffffu, v > 0.0f);
    for (int d = 1; d < 32; d <<= 1) {
      const float up = __shfl_up_sync(0xffffffffu, v, d);
      if (lane >= d) v += up;
    }
    if (lane < cols) prefix[row * 32 + lane] = v;
    if (lane == 0) { ballots[row] = positive; maxes[row] = mx; }
  }
  __syncthreads();  // row_copy complete before reading it reversed
  for (int c = threadIdx.x; c < cols; c += blockDim.x) reversed[static_cast<long long>(row) * cols + c] = row_copy[cols - 1 - c];
  if (threadIdx.x == 0) { sums[row] = total; atomicAdd(grand, total); }
}

extern "C" int harness_selftest(const float* x, int rows, int cols, int threads, float* sums, float* prefix,
                                float* maxes, unsigned* ballots, float* reversed, float* grand, void* stream) {
  auto kernel = harness_selftest_kernel;
  return NOVA_LAUNCH(kernel, dim3(rows), dim3(threads), cols * sizeof(float), stream, x, cols, sums, prefix,
                     maxes, ballots, reversed, grand);
}
