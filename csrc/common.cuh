// common.cuh: what every kernel source in csrc/ includes instead of the CUDA headers.
//
// With nvcc it pulls in the CUDA runtime and 16-bit float types; with -DNOVA_SIMT_HOST (g++) it
// pulls in host/simt.h so the very same kernels run on the CPU in tests. Kernel files use only
// what this header and simt.h both provide, and never include torch headers.
#pragma once

#ifdef NOVA_SIMT_HOST
#include "host/simt.h"
#define NOVA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  simt::launch((grid), (block), (smem), (kernel), __VA_ARGS__)
#define NOVA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(simt::dynamic_shared())
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#define NOVA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((kernel)<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__), cudaGetLastError())
#define NOVA_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char nova_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(nova_dynamic_smem)
#endif

// The C launchers take element types as these codes (nova_fast.testing.cuda_host.DTYPE_CODES).
#include "launchers.h"

namespace nova {

// Load/store one element as float whatever its storage type; statistics are always fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// 16-byte vector of T: 4 floats or 8 halves; one global transaction per thread.
template <class T> struct Vec16 {
  static constexpr int size = 16 / sizeof(T);
  union { uint4 raw; T elem[16 / sizeof(T)]; };
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` is 32 floats of shared memory; the trailing barrier lets callers reuse it at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < warps ? scratch[lane] : 0.0f;
  total = warp_sum(total);
  __syncthreads();
  return total;
}

}  // namespace nova
