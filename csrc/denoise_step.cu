// denoise_step.cu: fused guidance + scheduler step of the diffusion-head loop (CUDA C++ twin of
// kernels/denoise_step.py; the math is stated there and in nova_fast/ops/denoise_step.py).
//
// out holds the head's m passes stacked on the batch axis (pass j at j * pass_stride, with
// pass_stride = num_groups * group_stride); x, noise and new_x hold num_groups * group_stride
// elements. A renorm group is the first group_len of every group_stride elements (one token or one
// sample; the rest are padding tokens of a bucket, never read or written). Short groups get one
// warp each (warp_sum for the renorm norms); groups up to kSplitChunk one block each (block_sum);
// longer groups are split over blocks of kSplitChunk elements, with renorm in two launches: per-chunk
// partial sums into an fp32 workspace (2 per chunk), then the step, every block of a group adding
// its partials in the same order. Without a workspace (denoise_guided_step) long renorm groups
// take one block each.
// coef is the (K, 8) fp32 table of scheduler coefficients, scales = {s, s2, renorm_min} (device).
#include "common.cuh"

namespace {

// guidance modes: the values of nova_fast/guidance_modes.py (tests/test_guidance_modes.py checks them)
constexpr int kGuideNone = 0, kGuideCfg = 1, kGuideImage = 2, kGuideStg = 3;
constexpr int kWarpGroupMax = 256;  // groups up to this length get one warp each
constexpr int kBlockThreads = 256;
// Groups longer than this are split over blocks of kSplitChunk elements (32 per thread): one block
// per sample (n * P elements, B samples) would leave most of a GPU idle.
constexpr int kSplitChunk = 8192;

template <class T, int GUIDE>
__device__ __forceinline__ void first_stage(const T* out, long long i, long long pass_stride, float s, float& o0,
                                            float& g1) {
  o0 = nova::to_float(out[i]);
  if (GUIDE == kGuideNone) {
    g1 = o0;
  } else {
    const float o1 = nova::to_float(out[pass_stride + i]);
    const float other = GUIDE == kGuideImage ? nova::to_float(out[2 * pass_stride + i]) : o1;
    g1 = o1 + (o0 - other) * s;
  }
}

// clamp(|o0| / |g1|, renorm_min, 1) as torch.clamp does it: a NaN ratio (both norms 0) stays NaN, as
// in the reference (fminf / fmaxf would turn it into a bound).
__device__ __forceinline__ float renorm_factor(float cond_sq, float guided_sq, float renorm_min) {
  const float ratio = sqrtf(cond_sq) / sqrtf(guided_sq);
  return ratio < renorm_min ? renorm_min : (ratio > 1.0f ? 1.0f : ratio);
}

struct Coefs {
  float x0_x, x0_g, x0_div, x0, x, noise, s, s2;
};

__device__ __forceinline__ Coefs load_coefs(const float* coef, const float* scales, int step) {
  const float* c = coef + step * 8;
  return Coefs{c[0], c[1], c[2], c[3], c[4], c[5], scales[0], scales[1]};
}

// The guided value at element i (renorm factor applied, third-pass term added) and the scheduler update.
template <class T, int GUIDE>
__device__ __forceinline__ void step_element(const T* out, const T* x, const T* noise, T* new_x, long long i,
                                             long long pass_stride, const Coefs& c, float factor) {
  float o0, g;
  first_stage<T, GUIDE>(out, i, pass_stride, c.s, o0, g);
  g *= factor;
  if (GUIDE == kGuideImage) {
    g += (nova::to_float(out[2 * pass_stride + i]) - nova::to_float(out[pass_stride + i])) * c.s2;
  }
  if (GUIDE == kGuideStg) g += (o0 - nova::to_float(out[2 * pass_stride + i])) * c.s2;
  const float xv = nova::to_float(x[i]);
  const float x0 = (xv * c.x0_x + g * c.x0_g) / c.x0_div;
  float next = x0 * c.x0 + xv * c.x;
  if (noise != nullptr) next += nova::to_float(noise[i]) * c.noise;
  new_x[i] = nova::from_float<T>(next);
}

// Groups up to kSplitChunk: one warp (short groups) or one block per group.
template <class T, int GUIDE, bool WARP_PER_GROUP>
__global__ void guided_step_kernel(const T* __restrict__ out, const T* x, const T* __restrict__ noise, T* new_x,
                                   const float* __restrict__ coef, const float* __restrict__ scales, int step,
                                   int num_groups, int group_len, int group_stride, int renorm) {
  __shared__ float scratch[32];
  const int lane = WARP_PER_GROUP ? threadIdx.x % 32 : threadIdx.x;
  const int width = WARP_PER_GROUP ? 32 : blockDim.x;
  const long long group =
      WARP_PER_GROUP ? static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32 : blockIdx.x;
  if (group >= num_groups) return;  // a whole warp (warp mode) or never (block mode: grid = groups)
  const long long pass_stride = static_cast<long long>(num_groups) * group_stride;
  const long long base = group * group_stride;
  const Coefs c = load_coefs(coef, scales, step);

  float factor = 1.0f;
  if (renorm) {
    float cond_sq = 0.0f, guided_sq = 0.0f;
    for (int k = lane; k < group_len; k += width) {
      float o0, g1;
      first_stage<T, GUIDE>(out, base + k, pass_stride, c.s, o0, g1);
      cond_sq += o0 * o0;
      guided_sq += g1 * g1;
    }
    if (WARP_PER_GROUP) {
      cond_sq = nova::warp_sum(cond_sq);
      guided_sq = nova::warp_sum(guided_sq);
    } else {
      cond_sq = nova::block_sum(cond_sq, scratch);
      guided_sq = nova::block_sum(guided_sq, scratch);
    }
    factor = renorm_factor(cond_sq, guided_sq, scales[2]);
  }
  for (int k = lane; k < group_len; k += width)
    step_element<T, GUIDE>(out, x, noise, new_x, base + k, pass_stride, c, factor);
}

// Long groups: where block (group, chunk) = blockIdx.x works, elements [first, last) of its group.
struct SplitChunk {
  long long group, base, pass_stride;
  int first, last;
};

__device__ __forceinline__ SplitChunk split_chunk(int num_groups, int group_len, int group_stride, int chunks) {
  SplitChunk at;
  at.group = blockIdx.x / chunks;
  at.first = static_cast<int>(blockIdx.x - at.group * chunks) * kSplitChunk;
  at.last = group_len - at.first < kSplitChunk ? group_len : at.first + kSplitChunk;
  at.pass_stride = static_cast<long long>(num_groups) * group_stride;
  at.base = at.group * group_stride;
  return at;
}

// Long groups, first pass: block (group, chunk) = blockIdx.x writes its chunk's sums of o0^2 and g1^2
// to partial[2 * blockIdx.x + {0, 1}].
template <class T, int GUIDE>
__global__ void __launch_bounds__(kBlockThreads)
renorm_partials_kernel(const T* __restrict__ out, const float* __restrict__ scales, float* __restrict__ partial,
                       int num_groups, int group_len, int group_stride, int chunks) {
  __shared__ float scratch[32];
  const auto [group, base, pass_stride, first, last] = split_chunk(num_groups, group_len, group_stride, chunks);
  const float s = scales[0];
  float cond_sq = 0.0f, guided_sq = 0.0f;
  for (int k = first + static_cast<int>(threadIdx.x); k < last; k += kBlockThreads) {
    float o0, g1;
    first_stage<T, GUIDE>(out, base + k, pass_stride, s, o0, g1);
    cond_sq += o0 * o0;
    guided_sq += g1 * g1;
  }
  cond_sq = nova::block_sum(cond_sq, scratch);
  guided_sq = nova::block_sum(guided_sq, scratch);
  if (threadIdx.x == 0) {
    partial[2 * static_cast<long long>(blockIdx.x)] = cond_sq;
    partial[2 * static_cast<long long>(blockIdx.x) + 1] = guided_sq;
  }
}

// Long groups, second pass: block (group, chunk) steps its chunk. With renorm, every block of a group
// adds the group's partials in the same order (same factor in every chunk).
template <class T, int GUIDE>
__global__ void __launch_bounds__(kBlockThreads)
guided_step_split_kernel(const T* __restrict__ out, const T* x, const T* __restrict__ noise, T* new_x,
                         const float* __restrict__ coef, const float* __restrict__ scales,
                         const float* __restrict__ partial, int step, int num_groups, int group_len,
                         int group_stride, int chunks, int renorm) {
  __shared__ float scratch[32];
  const auto [group, base, pass_stride, first, last] = split_chunk(num_groups, group_len, group_stride, chunks);
  const Coefs c = load_coefs(coef, scales, step);
  float factor = 1.0f;
  if (renorm) {
    const float* parts = partial + 2 * group * chunks;
    float cond_sq = 0.0f, guided_sq = 0.0f;
    for (int p = threadIdx.x; p < chunks; p += kBlockThreads) {
      cond_sq += parts[2 * p];
      guided_sq += parts[2 * p + 1];
    }
    cond_sq = nova::block_sum(cond_sq, scratch);
    guided_sq = nova::block_sum(guided_sq, scratch);
    factor = renorm_factor(cond_sq, guided_sq, scales[2]);
  }
  for (int k = first + static_cast<int>(threadIdx.x); k < last; k += kBlockThreads)
    step_element<T, GUIDE>(out, x, noise, new_x, base + k, pass_stride, c, factor);
}

struct StepArgs {
  const void* out;
  const void* x;
  const void* noise;
  void* new_x;
  const float* coef;
  const float* scales;
  float* workspace;  // null: no split renorm (long groups then take one block each)
  int step, num_groups, group_len, group_stride, renorm;
};

enum LaunchKind { kWarpPerGroup = 0, kBlockPerGroup = 1, kRenormPartials = 2, kSplitStep = 3 };

int split_chunks(int group_len) { return group_len > kSplitChunk ? (group_len + kSplitChunk - 1) / kSplitChunk : 0; }

// The launches of one step (kind, grid, threads), in order; returns their number. Grids use x only:
// the largest is num_groups * chunks <= x.numel() / kSplitChunk + num_groups < 2^31.
int plan_launches(int num_groups, int group_len, int renorm, bool has_workspace, int (&kind)[2], long long (&grid)[2],
                  int (&threads)[2]) {
  const int chunks = split_chunks(group_len);
  if (chunks > 0 && (!renorm || has_workspace)) {
    int n = 0;
    if (renorm) {
      kind[n] = kRenormPartials, grid[n] = static_cast<long long>(num_groups) * chunks, threads[n++] = kBlockThreads;
    }
    kind[n] = kSplitStep, grid[n] = static_cast<long long>(num_groups) * chunks, threads[n++] = kBlockThreads;
    return n;
  }
  if (group_len <= kWarpGroupMax) {
    constexpr int kWarps = 4;
    kind[0] = kWarpPerGroup, grid[0] = (num_groups + kWarps - 1) / kWarps, threads[0] = 32 * kWarps;
  } else {
    kind[0] = kBlockPerGroup, grid[0] = num_groups, threads[0] = kBlockThreads;
  }
  return 1;
}

template <class T, int GUIDE>
int launch_guide(const StepArgs& a, void* stream) {
  const T* out = static_cast<const T*>(a.out);
  const T* x = static_cast<const T*>(a.x);
  const T* noise = static_cast<const T*>(a.noise);
  T* new_x = static_cast<T*>(a.new_x);
  int kind[2], threads[2];
  long long grid[2];
  const int n = plan_launches(a.num_groups, a.group_len, a.renorm, a.workspace != nullptr, kind, grid, threads);
  const int chunks = split_chunks(a.group_len);
  for (int i = 0; i < n; ++i) {
    if (grid[i] > 0x7fffffffLL) return 9;  // cudaErrorInvalidConfiguration
    const dim3 g(static_cast<unsigned>(grid[i])), b(threads[i]);
    int err = 0;
    switch (kind[i]) {
      case kWarpPerGroup: {
        auto k = guided_step_kernel<T, GUIDE, true>;
        err = NOVA_LAUNCH(k, g, b, 0, stream, out, x, noise, new_x, a.coef, a.scales, a.step, a.num_groups,
                          a.group_len, a.group_stride, a.renorm);
        break;
      }
      case kBlockPerGroup: {
        auto k = guided_step_kernel<T, GUIDE, false>;
        err = NOVA_LAUNCH(k, g, b, 0, stream, out, x, noise, new_x, a.coef, a.scales, a.step, a.num_groups,
                          a.group_len, a.group_stride, a.renorm);
        break;
      }
      case kRenormPartials: {
        auto k = renorm_partials_kernel<T, GUIDE>;
        err = NOVA_LAUNCH(k, g, b, 0, stream, out, a.scales, a.workspace, a.num_groups, a.group_len, a.group_stride,
                          chunks);
        break;
      }
      default: {
        auto k = guided_step_split_kernel<T, GUIDE>;
        err = NOVA_LAUNCH(k, g, b, 0, stream, out, x, noise, new_x, a.coef, a.scales, a.workspace, a.step,
                          a.num_groups, a.group_len, a.group_stride, chunks, a.renorm);
      }
    }
    if (err != 0) return err;
  }
  return 0;
}

template <class T>
int launch_dtype(int guide, const StepArgs& a, void* stream) {
  switch (guide) {
    case kGuideNone: return launch_guide<T, kGuideNone>(a, stream);
    case kGuideCfg: return launch_guide<T, kGuideCfg>(a, stream);
    case kGuideImage: return launch_guide<T, kGuideImage>(a, stream);
    case kGuideStg: return launch_guide<T, kGuideStg>(a, stream);
    default: return 1;  // cudaErrorInvalidValue
  }
}

}  // namespace

extern "C" int denoise_step_workspace_floats(int num_groups, int group_len, int renorm) {
  const int chunks = split_chunks(group_len);
  return renorm && chunks > 0 && num_groups > 0 ? 2 * num_groups * chunks : 0;
}

extern "C" int denoise_step_launch_plan(int num_groups, int group_len, int renorm, int has_workspace, int* kind,
                                        long long* grid, int* threads) {
  int k[2], t[2];
  long long g[2];
  const int n = plan_launches(num_groups, group_len, renorm, has_workspace != 0, k, g, t);
  for (int i = 0; i < n; ++i) kind[i] = k[i], grid[i] = g[i], threads[i] = t[i];
  return n;
}

extern "C" int denoise_guided_step_ws(const void* out, const void* x, const void* noise, void* new_x,
                                      const float* coef, const float* scales, float* workspace, int step,
                                      int num_groups, int group_len, int group_stride, int guide, int renorm,
                                      int dtype, void* stream) {
  if (num_groups <= 0 || group_len <= 0) return 0;
  if (group_stride < group_len) return 1;  // cudaErrorInvalidValue
  const StepArgs a{out, x, noise, new_x, coef, scales, workspace, step, num_groups, group_len, group_stride, renorm};
  switch (dtype) {
    case NOVA_F32: return launch_dtype<float>(guide, a, stream);
    case NOVA_F16: return launch_dtype<__half>(guide, a, stream);
    case NOVA_BF16: return launch_dtype<__nv_bfloat16>(guide, a, stream);
    default: return 1;
  }
}

extern "C" int denoise_guided_step(const void* out, const void* x, const void* noise, void* new_x, const float* coef,
                                   const float* scales, int step, int num_groups, int group_len, int group_stride,
                                   int guide, int renorm, int dtype, void* stream) {
  return denoise_guided_step_ws(out, x, noise, new_x, coef, scales, nullptr, step, num_groups, group_len,
                                group_stride, guide, renorm, dtype, stream);
}
