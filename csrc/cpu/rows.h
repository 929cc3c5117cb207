// rows.h: shared pieces of the CPU kernels (csrc/cpu/*.cpp), which run the forward ops of the torch
// backend on CPU tensors as one pass per row. The CUDA kernels in csrc/*.cu are their GPU twins.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace nova_cpu {

// A (B, L|1, D) operand, or (L|1, D) read as one sample, read row by row with its own strides (unit
// stride along D): rows of a per-sample operand (L = 1) repeat for every token, strided views
// (chunks of a projection) are read in place.
template <class T>
struct Rows {
  T* base;
  int64_t stride_b, stride_l;

  Rows(const at::Tensor& t, bool broadcast_tokens)
      : base(static_cast<T*>(t.data_ptr())),
        stride_b(t.dim() == 3 ? t.stride(0) : 0),
        stride_l(broadcast_tokens ? 0 : t.stride(t.dim() - 2)) {}
  T* row(int64_t b, int64_t l) const { return base + b * stride_b + l * stride_l; }
};

// (B, L, D) of a 2-D or 3-D operand.
inline int64_t batch_of(const at::Tensor& t) { return t.dim() == 3 ? t.size(0) : 1; }
inline int64_t tokens_of(const at::Tensor& t) { return t.size(t.dim() - 2); }
inline bool per_sample(const at::Tensor& t) { return tokens_of(t) == 1; }

// Rows per parallel task: enough work per task (about 32K elements) to amortize the pool hand-off.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(D, 1)); }

// Sum of f(v[d]) over a row with 32 independent partial sums: one accumulator would serialize
// every add on its latency (about 4 cycles), which made the statistics, not memory, the bound.
template <class T, class F>
inline float row_sum(const T* v, int64_t D, F&& f) {
  constexpr int kLanes = 32;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) part[k] += f(static_cast<float>(v[d + k]));
  }
  float total = 0.f;
  for (; d < D; ++d) total += f(static_cast<float>(v[d]));
  for (int k = 0; k < kLanes; ++k) total += part[k];
  return total;
}

// Mean and 1/sqrt(var + eps) of a row, in fp32, two passes over the row (it sits in L1/L2): the
// same statistics as the GPU kernels and as accurate as Welford for D <= 4096.
template <class T>
inline void row_stats(const T* v, int64_t D, float eps, float& mean, float& rstd) {
  mean = row_sum(v, D, [](float a) { return a; }) / static_cast<float>(D);
  const float m = mean;
  const float var = row_sum(v, D, [m](float a) { return (a - m) * (a - m); }) / static_cast<float>(D);
  rstd = 1.f / std::sqrt(var + eps);
}

// dst[d] = value(d) for d < D, converted to T. Rows are written through the cache: non-temporal
// stores for outputs over 8 MiB were tried (fp32, rows staged in L1, then _mm256_stream_ps) and
// measured no faster out of place (2x1800x1024 post-norm 1.36 vs 1.35 ms) and 40% slower in place.
template <class T, class F>
inline void write_row(T* dst, int64_t D, F&& value) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(value(d));
}

}  // namespace nova_cpu
