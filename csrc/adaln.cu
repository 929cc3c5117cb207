// adaln.cu: the adaLN family in CUDA C++, forward and backward.
//
//   modulate:      out = LN(x) * (1 + scale) + shift      (normalize = 0: x * (1 + scale) + shift)
//   residual_norm: out = x + gate * (LN(y) * weight + bias)   (gate may be null: gate = 1)
//
// Rows are (B, L, D): row (b, l) of an input starts at b * stride_b + l * stride_l (elements) with
// unit stride along D, so per-sample statistics (stride_l = 0) and chunks of one projection output
// (row stride 2D or 3D) are read in place. Outputs and gradients are contiguous (B, L, D), except
// the residual output, which has its own strides (in place: the strides of x).
//
// Forward: one block of 256 threads per row; the row stays in registers (D <= 4096), each thread
// holding CHUNKS pieces of W elements: W = 16 bytes / sizeof(T) when the launcher found every
// pointer, row stride and D aligned to 16 bytes (one 16-byte load per piece), else W = 1. Mean and
// variance are fp32, two passes over the registers, reduced with nova::block_sum.
//
// Backward: block (b, chunk) walks rows_per_block consecutive rows of sample b. Per-row gradients
// are written directly; column sums (d scale / d shift of per-sample statistics, d weight, d bias,
// d gate per sample) accumulate in registers and leave one fp32 partial row per block in the
// caller's workspace, then sum_partials_kernel adds the partials up in the output dtype.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxD = 4096;

template <class T, int W>
__device__ __forceinline__ void load_piece(const T* p, float (&v)[W]) {
  if constexpr (W == 1) {
    v[0] = nova::to_float(p[0]);
  } else {
    nova::Vec16<T> u;
    u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = nova::to_float(u.elem[i]);
  }
}

template <class T, int W>
__device__ __forceinline__ void store_piece(T* p, const float (&v)[W]) {
  if constexpr (W == 1) {
    p[0] = nova::from_float<T>(v[0]);
  } else {
    nova::Vec16<T> u;
#pragma unroll
    for (int i = 0; i < W; ++i) u.elem[i] = nova::from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = u.raw;
  }
}

template <int W>
struct Layout {
  static constexpr int kChunks = (kMaxD + kThreads * W - 1) / (kThreads * W);
  // First column of piece k of this thread; the piece is in the row iff col < D (D % W == 0).
  static __device__ __forceinline__ int col(int k) { return (k * kThreads + static_cast<int>(threadIdx.x)) * W; }
};

// Loads one row into v (zeros past D) and returns its fp32 mean and rstd; v becomes (v - mean) * rstd.
template <class T, int W>
__device__ __forceinline__ void normalize_row(const T* row, int D, float eps, float (&v)[Layout<W>::kChunks][W],
                                              float* scratch, float& mean, float& rstd) {
  constexpr int C = Layout<W>::kChunks;
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = Layout<W>::col(k);
    if (c < D) {
      load_piece<T, W>(row + c, v[k]);
#pragma unroll
      for (int i = 0; i < W; ++i) sum += v[k][i];
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) v[k][i] = 0.0f;
    }
  }
  mean = nova::block_sum(sum, scratch) / D;
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    if (Layout<W>::col(k) < D) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float d = v[k][i] - mean;
        sq += d * d;
      }
    }
  }
  rstd = rsqrtf(nova::block_sum(sq, scratch) / D + eps);
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int i = 0; i < W; ++i) v[k][i] = Layout<W>::col(k) < D ? (v[k][i] - mean) * rstd : 0.0f;
}

// ------------------------------------------------------------------ modulate
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
modulate_fwd_kernel(const T* __restrict__ x, long long x_sb, long long x_sl, const T* __restrict__ scale,
                    long long sc_sb, long long sc_sl, const T* __restrict__ shift, long long sh_sb, long long sh_sl,
                    T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out, int L, int D,
                    int normalize, float eps) {
  constexpr int C = Layout<W>::kChunks;
  __shared__ float scratch[32];
  const long long row = blockIdx.x, b = row / L, l = row - b * L;
  float v[C][W];
  if (normalize) {
    float mean, rstd;
    normalize_row<T, W>(x + b * x_sb + l * x_sl, D, eps, v, scratch, mean, rstd);
    if (mean_out != nullptr && threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
  } else {
#pragma unroll
    for (int k = 0; k < C; ++k)
      if (Layout<W>::col(k) < D) load_piece<T, W>(x + b * x_sb + l * x_sl + Layout<W>::col(k), v[k]);
  }
  const T* sc = scale + b * sc_sb + l * sc_sl;
  const T* sh = shift + b * sh_sb + l * sh_sl;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = Layout<W>::col(k);
    if (c < D) {
      float s[W], h[W];
      load_piece<T, W>(sc + c, s);
      load_piece<T, W>(sh + c, h);
#pragma unroll
      for (int i = 0; i < W; ++i) v[k][i] = v[k][i] * (1.0f + s[i]) + h[i];
      store_piece<T, W>(out + row * D + c, v[k]);
    }
  }
}

// partial: fp32 (B, gridDim.y, 2, D) = per-block sums of d scale and d shift (per-sample statistics).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
modulate_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, long long x_sb, long long x_sl,
                    const T* __restrict__ scale, long long sc_sb, long long sc_sl, const float* __restrict__ mean,
                    const float* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dscale,
                    float* __restrict__ partial, int L, int D, int rows_per_block, int normalize, int per_token) {
  constexpr int C = Layout<W>::kChunks;
  __shared__ float scratch[32];
  const long long b = blockIdx.x;
  const int l0 = blockIdx.y * rows_per_block, l1 = l0 + rows_per_block < L ? l0 + rows_per_block : L;
  float acc_scale[C][W], acc_shift[C][W];
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int i = 0; i < W; ++i) acc_scale[k][i] = acc_shift[k][i] = 0.0f;
  for (int l = l0; l < l1; ++l) {
    const long long row = b * L + l;
    const T* xr = x + b * x_sb + l * x_sl;
    const T* sr = scale + b * sc_sb + l * sc_sl;
    const float mu = normalize ? mean[row] : 0.0f, rs = normalize ? rstd[row] : 1.0f;
    float xhat[C][W], g[C][W], dxhat[C][W];
    float dot = 0.0f, sum = 0.0f;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = Layout<W>::col(k);
      if (c < D) {
        float s[W];
        load_piece<T, W>(xr + c, xhat[k]);
        load_piece<T, W>(dout + row * D + c, g[k]);
        load_piece<T, W>(sr + c, s);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          xhat[k][i] = (xhat[k][i] - mu) * rs;
          dxhat[k][i] = g[k][i] * (1.0f + s[i]);
          dot += dxhat[k][i] * xhat[k][i];
          sum += dxhat[k][i];
        }
      }
    }
    float c_xhat = 0.0f, c_one = 0.0f;
    if (normalize) {
      c_xhat = nova::block_sum(dot, scratch) / D;
      c_one = nova::block_sum(sum, scratch) / D;
    }
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = Layout<W>::col(k);
      if (c < D) {
        float d[W], ds[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
          d[i] = normalize ? (dxhat[k][i] - xhat[k][i] * c_xhat - c_one) * rs : dxhat[k][i];
          ds[i] = g[k][i] * xhat[k][i];
          acc_scale[k][i] += ds[i];
          acc_shift[k][i] += g[k][i];
        }
        store_piece<T, W>(dx + row * D + c, d);
        if (per_token) store_piece<T, W>(dscale + row * D + c, ds);
      }
    }
  }
  if (!per_token) {
    float* base = partial + (b * gridDim.y + blockIdx.y) * 2 * static_cast<long long>(D);
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = Layout<W>::col(k);
      if (c < D)
#pragma unroll
        for (int i = 0; i < W; ++i) { base[c + i] = acc_scale[k][i]; base[D + c + i] = acc_shift[k][i]; }
    }
  }
}

// ------------------------------------------------------------------ residual_norm
// No __restrict__ on x / out: in place, out is x (each element is read and written by one thread).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
residual_norm_fwd_kernel(const T* x, long long x_sb, long long x_sl, const T* __restrict__ y, long long y_sb,
                         long long y_sl, const T* __restrict__ weight, const T* __restrict__ bias,
                         const T* __restrict__ gate, long long g_sb, long long g_sl, T* out, long long o_sb,
                         long long o_sl, float* __restrict__ mean_out, float* __restrict__ rstd_out, int L, int D,
                         float eps) {
  constexpr int C = Layout<W>::kChunks;
  __shared__ float scratch[32];
  const long long row = blockIdx.x, b = row / L, l = row - b * L;
  float v[C][W];
  float mean, rstd;
  normalize_row<T, W>(y + b * y_sb + l * y_sl, D, eps, v, scratch, mean, rstd);
  if (mean_out != nullptr && threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
  const T* xr = x + b * x_sb + l * x_sl;
  const T* gr = gate != nullptr ? gate + b * g_sb + l * g_sl : nullptr;
  T* orow = out + b * o_sb + l * o_sl;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = Layout<W>::col(k);
    if (c < D) {
      float w[W], bi[W], xv[W], gv[W];
      load_piece<T, W>(weight + c, w);
      load_piece<T, W>(bias + c, bi);
      load_piece<T, W>(xr + c, xv);
      if (gr != nullptr) {
        load_piece<T, W>(gr + c, gv);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) gv[i] = 1.0f;
      }
#pragma unroll
      for (int i = 0; i < W; ++i) v[k][i] = xv[i] + gv[i] * (v[k][i] * w[i] + bi[i]);
      store_piece<T, W>(orow + c, v[k]);
    }
  }
}

// partial: fp32 (B, gridDim.y, 3, D) = per-block sums of d weight, d bias, d gate (per-sample gate).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
residual_norm_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ y, long long y_sb, long long y_sl,
                         const T* __restrict__ weight, const T* __restrict__ bias, const T* __restrict__ gate,
                         long long g_sb, long long g_sl, const float* __restrict__ mean,
                         const float* __restrict__ rstd, T* __restrict__ dy, T* __restrict__ dgate,
                         float* __restrict__ partial, int L, int D, int rows_per_block, int gate_per_token) {
  constexpr int C = Layout<W>::kChunks;
  __shared__ float scratch[32];
  const long long b = blockIdx.x;
  const int l0 = blockIdx.y * rows_per_block, l1 = l0 + rows_per_block < L ? l0 + rows_per_block : L;
  float acc_w[C][W], acc_b[C][W], acc_g[C][W];
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int i = 0; i < W; ++i) acc_w[k][i] = acc_b[k][i] = acc_g[k][i] = 0.0f;
  for (int l = l0; l < l1; ++l) {
    const long long row = b * L + l;
    const T* yr = y + b * y_sb + l * y_sl;
    const T* gr = gate != nullptr ? gate + b * g_sb + l * g_sl : nullptr;
    const float mu = mean[row], rs = rstd[row];
    float yhat[C][W], dyhat[C][W];
    float dot = 0.0f, sum = 0.0f;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = Layout<W>::col(k);
      if (c < D) {
        float g[W], w[W];
        load_piece<T, W>(yr + c, yhat[k]);
        load_piece<T, W>(dout + row * D + c, g);
        load_piece<T, W>(weight + c, w);
        if (gr != nullptr) {
          float gv[W], bi[W], dg[W];
          load_piece<T, W>(gr + c, gv);
          load_piece<T, W>(bias + c, bi);
#pragma unroll
          for (int i = 0; i < W; ++i) {
            yhat[k][i] = (yhat[k][i] - mu) * rs;
            dg[i] = g[i] * (yhat[k][i] * w[i] + bi[i]);
            acc_g[k][i] += dg[i];
            g[i] *= gv[i];
          }
          if (gate_per_token) store_piece<T, W>(dgate + row * D + c, dg);
        } else {
#pragma unroll
          for (int i = 0; i < W; ++i) yhat[k][i] = (yhat[k][i] - mu) * rs;
        }
#pragma unroll
        for (int i = 0; i < W; ++i) {
          acc_w[k][i] += g[i] * yhat[k][i];
          acc_b[k][i] += g[i];
          dyhat[k][i] = g[i] * w[i];
          dot += dyhat[k][i] * yhat[k][i];
          sum += dyhat[k][i];
        }
      }
    }
    const float c_yhat = nova::block_sum(dot, scratch) / D;
    const float c_one = nova::block_sum(sum, scratch) / D;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = Layout<W>::col(k);
      if (c < D) {
        float d[W];
#pragma unroll
        for (int i = 0; i < W; ++i) d[i] = (dyhat[k][i] - yhat[k][i] * c_yhat - c_one) * rs;
        store_piece<T, W>(dy + row * D + c, d);
      }
    }
  }
  float* base = partial + (b * gridDim.y + blockIdx.y) * 3 * static_cast<long long>(D);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = Layout<W>::col(k);
    if (c < D)
#pragma unroll
      for (int i = 0; i < W; ++i) {
        base[c + i] = acc_w[k][i];
        base[D + c + i] = acc_b[k][i];
        base[2 * D + c + i] = acc_g[k][i];
      }
  }
}

// out[g, d] = sum over p < parts of partial[(g * parts + p), field, d]   (partial: (groups*parts, fields, D))
template <class T>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const float* __restrict__ partial, int parts, int fields, int field, int D, T* __restrict__ out) {
  const int d = blockIdx.x * kThreads + threadIdx.x;
  const long long g = blockIdx.y;
  if (d >= D) return;
  float s = 0.0f;
  for (int p = 0; p < parts; ++p) s += partial[((g * parts + p) * fields + field) * static_cast<long long>(D) + d];
  out[g * D + d] = nova::from_float<T>(s);
}

// ------------------------------------------------------------------ launch helpers
bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte pieces are legal when D, every row stride and every pointer are 16-byte aligned.
inline bool all_aligned() { return true; }
template <class... P>
bool all_aligned(const void* p, P... rest) { return aligned16(p) && all_aligned(rest...); }
template <int W>
bool strides_divisible() { return true; }
template <int W, class... S>
bool strides_divisible(long long s, S... rest) { return s % W == 0 && strides_divisible<W>(rest...); }
#define NOVA_VECTORIZABLE(T, D, PTRS, STRIDES) \
  ((D) % (16 / sizeof(T)) == 0 && all_aligned PTRS && strides_divisible<16 / sizeof(T)> STRIDES)

template <class T>
int sum_partials(const float* partial, int groups, int parts, int fields, int field, int D, void* out, void* stream) {
  auto k = sum_partials_kernel<T>;
  return NOVA_LAUNCH(k, dim3((D + kThreads - 1) / kThreads, groups), dim3(kThreads), 0, stream, partial, parts, fields,
                     field, D, static_cast<T*>(out));
}

template <class T>
int modulate_fwd(const void* x, long long x_sb, long long x_sl, const void* scale, long long sc_sb, long long sc_sl,
                 const void* shift, long long sh_sb, long long sh_sl, void* out, float* mean, float* rstd, int B,
                 int L, int D, int normalize, float eps, void* stream) {
  const dim3 grid(B * L), block(kThreads);
  if (NOVA_VECTORIZABLE(T, D, (x, scale, shift, out), (x_sb, x_sl, sc_sb, sc_sl, sh_sb, sh_sl))) {
    auto k = modulate_fwd_kernel<T, 16 / sizeof(T)>;
    return NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(x), x_sb, x_sl, static_cast<const T*>(scale),
                       sc_sb, sc_sl, static_cast<const T*>(shift), sh_sb, sh_sl, static_cast<T*>(out), mean, rstd, L,
                       D, normalize, eps);
  }
  auto k = modulate_fwd_kernel<T, 1>;
  return NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(x), x_sb, x_sl, static_cast<const T*>(scale),
                     sc_sb, sc_sl, static_cast<const T*>(shift), sh_sb, sh_sl, static_cast<T*>(out), mean, rstd, L, D,
                     normalize, eps);
}

template <class T>
int modulate_bwd(const void* dout, const void* x, long long x_sb, long long x_sl, const void* scale, long long sc_sb,
                 long long sc_sl, const float* mean, const float* rstd, void* dx, void* dscale, void* dshift,
                 float* workspace, int chunks, int B, int L, int D, int normalize, int per_token, void* stream) {
  const int rows = (L + chunks - 1) / chunks;
  const dim3 grid(B, chunks), block(kThreads);
  int err;
  if (NOVA_VECTORIZABLE(T, D, (dout, x, scale, dx, dscale), (x_sb, x_sl, sc_sb, sc_sl))) {
    auto k = modulate_bwd_kernel<T, 16 / sizeof(T)>;
    err = NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(dout), static_cast<const T*>(x), x_sb, x_sl,
                      static_cast<const T*>(scale), sc_sb, sc_sl, mean, rstd, static_cast<T*>(dx),
                      static_cast<T*>(dscale), workspace, L, D, rows, normalize, per_token);
  } else {
    auto k = modulate_bwd_kernel<T, 1>;
    err = NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(dout), static_cast<const T*>(x), x_sb, x_sl,
                      static_cast<const T*>(scale), sc_sb, sc_sl, mean, rstd, static_cast<T*>(dx),
                      static_cast<T*>(dscale), workspace, L, D, rows, normalize, per_token);
  }
  if (err != 0 || per_token) return err;
  err = sum_partials<T>(workspace, B, chunks, 2, 0, D, dscale, stream);
  return err != 0 ? err : sum_partials<T>(workspace, B, chunks, 2, 1, D, dshift, stream);
}

template <class T>
int residual_norm_fwd(const void* x, long long x_sb, long long x_sl, const void* y, long long y_sb, long long y_sl,
                      const void* weight, const void* bias, const void* gate, long long g_sb, long long g_sl,
                      void* out, long long o_sb, long long o_sl, float* mean, float* rstd, int B, int L, int D,
                      float eps, void* stream) {
  const dim3 grid(B * L), block(kThreads);
  if (NOVA_VECTORIZABLE(T, D, (x, y, weight, bias, gate, out), (x_sb, x_sl, y_sb, y_sl, g_sb, g_sl, o_sb, o_sl))) {
    auto k = residual_norm_fwd_kernel<T, 16 / sizeof(T)>;
    return NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(x), x_sb, x_sl, static_cast<const T*>(y), y_sb,
                       y_sl, static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<const T*>(gate),
                       g_sb, g_sl, static_cast<T*>(out), o_sb, o_sl, mean, rstd, L, D, eps);
  }
  auto k = residual_norm_fwd_kernel<T, 1>;
  return NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(x), x_sb, x_sl, static_cast<const T*>(y), y_sb,
                     y_sl, static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<const T*>(gate),
                     g_sb, g_sl, static_cast<T*>(out), o_sb, o_sl, mean, rstd, L, D, eps);
}

template <class T>
int residual_norm_bwd(const void* dout, const void* y, long long y_sb, long long y_sl, const void* weight,
                      const void* bias, const void* gate, long long g_sb, long long g_sl, const float* mean,
                      const float* rstd, void* dy, void* dweight, void* dbias, void* dgate, float* workspace,
                      int chunks, int B, int L, int D, int gate_per_token, void* stream) {
  const int rows = (L + chunks - 1) / chunks;
  const dim3 grid(B, chunks), block(kThreads);
  void* dgate_rows = gate_per_token ? dgate : nullptr;
  int err;
  if (NOVA_VECTORIZABLE(T, D, (dout, y, weight, bias, gate, dy, dgate_rows), (y_sb, y_sl, g_sb, g_sl))) {
    auto k = residual_norm_bwd_kernel<T, 16 / sizeof(T)>;
    err = NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(dout), static_cast<const T*>(y), y_sb, y_sl,
                      static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<const T*>(gate), g_sb,
                      g_sl, mean, rstd, static_cast<T*>(dy), static_cast<T*>(dgate_rows), workspace, L, D, rows,
                      gate_per_token);
  } else {
    auto k = residual_norm_bwd_kernel<T, 1>;
    err = NOVA_LAUNCH(k, grid, block, 0, stream, static_cast<const T*>(dout), static_cast<const T*>(y), y_sb, y_sl,
                      static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<const T*>(gate), g_sb,
                      g_sl, mean, rstd, static_cast<T*>(dy), static_cast<T*>(dgate_rows), workspace, L, D, rows,
                      gate_per_token);
  }
  if (err == 0) err = sum_partials<T>(workspace, 1, B * chunks, 3, 0, D, dweight, stream);
  if (err == 0) err = sum_partials<T>(workspace, 1, B * chunks, 3, 1, D, dbias, stream);
  if (err == 0 && gate != nullptr && !gate_per_token) err = sum_partials<T>(workspace, B, chunks, 3, 2, D, dgate, stream);
  return err;
}

bool bad_sizes(int B, int L, int D) { return B < 0 || L < 0 || D < 1 || D > kMaxD; }

}  // namespace

#define NOVA_ADALN_DISPATCH(fn, ...)                                  \
  switch (dtype) {                                                    \
    case NOVA_F32: return fn<float>(__VA_ARGS__);                     \
    case NOVA_F16: return fn<__half>(__VA_ARGS__);                    \
    case NOVA_BF16: return fn<__nv_bfloat16>(__VA_ARGS__);            \
    default: return cudaErrorInvalidConfiguration;                    \
  }

extern "C" int nova_modulate_fwd(const void* x, long long x_sb, long long x_sl, const void* scale, long long sc_sb,
                                 long long sc_sl, const void* shift, long long sh_sb, long long sh_sl, void* out,
                                 float* mean, float* rstd, int B, int L, int D, int normalize, float eps, int dtype,
                                 void* stream) {
  if (bad_sizes(B, L, D)) return cudaErrorInvalidConfiguration;
  if (B * L == 0) return cudaSuccess;
  NOVA_ADALN_DISPATCH(modulate_fwd, x, x_sb, x_sl, scale, sc_sb, sc_sl, shift, sh_sb, sh_sl, out, mean, rstd, B, L, D,
                      normalize, eps, stream)
}

extern "C" int nova_modulate_bwd(const void* dout, const void* x, long long x_sb, long long x_sl, const void* scale,
                                 long long sc_sb, long long sc_sl, const float* mean, const float* rstd, void* dx,
                                 void* dscale, void* dshift, float* workspace, int chunks, int B, int L, int D,
                                 int normalize, int per_token, int dtype, void* stream) {
  if (bad_sizes(B, L, D) || chunks < 1) return cudaErrorInvalidConfiguration;
  if (B * L == 0) return cudaSuccess;
  NOVA_ADALN_DISPATCH(modulate_bwd, dout, x, x_sb, x_sl, scale, sc_sb, sc_sl, mean, rstd, dx, dscale, dshift,
                      workspace, chunks, B, L, D, normalize, per_token, stream)
}

extern "C" int nova_residual_norm_fwd(const void* x, long long x_sb, long long x_sl, const void* y, long long y_sb,
                                      long long y_sl, const void* weight, const void* bias, const void* gate,
                                      long long g_sb, long long g_sl, void* out, long long o_sb, long long o_sl,
                                      float* mean, float* rstd, int B, int L, int D, float eps, int dtype,
                                      void* stream) {
  if (bad_sizes(B, L, D)) return cudaErrorInvalidConfiguration;
  if (B * L == 0) return cudaSuccess;
  NOVA_ADALN_DISPATCH(residual_norm_fwd, x, x_sb, x_sl, y, y_sb, y_sl, weight, bias, gate, g_sb, g_sl, out, o_sb, o_sl,
                      mean, rstd, B, L, D, eps, stream)
}

extern "C" int nova_residual_norm_bwd(const void* dout, const void* y, long long y_sb, long long y_sl,
                                      const void* weight, const void* bias, const void* gate, long long g_sb,
                                      long long g_sl, const float* mean, const float* rstd, void* dy, void* dweight,
                                      void* dbias, void* dgate, float* workspace, int chunks, int B, int L, int D,
                                      int gate_per_token, int dtype, void* stream) {
  if (bad_sizes(B, L, D) || chunks < 1) return cudaErrorInvalidConfiguration;
  if (B * L == 0) return cudaSuccess;  // the caller zero-fills d weight / d bias / d gate
  NOVA_ADALN_DISPATCH(residual_norm_bwd, dout, y, y_sb, y_sl, weight, bias, gate, g_sb, g_sl, mean, rstd, dy, dweight,
                      dbias, dgate, workspace, chunks, B, L, D, gate_per_token, stream)
}
