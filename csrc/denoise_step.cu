// denoise_step.cu: fused guidance + scheduler step of the diffusion-head loop (CUDA C++ twin of
// kernels/denoise_step.py; the math is stated there and in nova_fast/ops/denoise_step.py).
//
// out holds the head's m passes stacked on the batch axis (pass j at j * pass_stride, with
// pass_stride = num_groups * group_stride); x, noise and new_x hold num_groups * group_stride
// elements. A renorm group is the first group_len of every group_stride elements (one token or one
// sample; the rest are padding tokens of a bucket, never read or written). Short groups get one
// warp each (warp_sum for the renorm norms); long groups get one block each (block_sum).
// coef is the (K, 8) fp32 table of scheduler coefficients, scales = {s, s2, renorm_min} (device).
#include "common.cuh"

namespace {

// guidance modes: the values of nova_fast/guidance_modes.py (tests/test_guidance_modes.py checks them)
constexpr int kGuideNone = 0, kGuideCfg = 1, kGuideImage = 2, kGuideStg = 3;
constexpr int kWarpGroupMax = 256;  // groups up to this length get one warp each

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

template <class T, int GUIDE, bool WARP_PER_GROUP>
__global__ void guided_step_kernel(const T* __restrict__ out, const T* x, const T* __restrict__ noise, T* new_x,
                                   const float* __restrict__ coef, const float* __restrict__ scales, int step,
                                   int num_groups, int group_len, int group_stride, int renorm) {
  __shared__ float scratch[32];
  const int lane = WARP_PER_GROUP ? threadIdx.x % 32 : threadIdx.x;
  const int width = WARP_PER_GROUP ? 32 : blockDim.x;
  const int group = WARP_PER_GROUP ? blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32 : blockIdx.x;
  if (group >= num_groups) return;  // a whole warp (warp mode) or never (block mode: grid = groups)
  const long long pass_stride = static_cast<long long>(num_groups) * group_stride;
  const long long base = static_cast<long long>(group) * group_stride;
  const float s = scales[0], s2 = scales[1];
  const float* c = coef + step * 8;
  const float c_x0_x = c[0], c_x0_g = c[1], c_x0_div = c[2], c_x0 = c[3], c_x = c[4], c_noise = c[5];

  float factor = 1.0f;
  if (renorm) {
    float cond_sq = 0.0f, guided_sq = 0.0f;
    for (int k = lane; k < group_len; k += width) {
      float o0, g1;
      first_stage<T, GUIDE>(out, base + k, pass_stride, s, o0, g1);
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
    factor = fminf(fmaxf(sqrtf(cond_sq) / sqrtf(guided_sq), scales[2]), 1.0f);
  }

  for (int k = lane; k < group_len; k += width) {
    const long long i = base + k;
    float o0, g;
    first_stage<T, GUIDE>(out, i, pass_stride, s, o0, g);
    g *= factor;
    if (GUIDE == kGuideImage) {
      g += (nova::to_float(out[2 * pass_stride + i]) - nova::to_float(out[pass_stride + i])) * s2;
    }
    if (GUIDE == kGuideStg) g += (o0 - nova::to_float(out[2 * pass_stride + i])) * s2;
    const float xv = nova::to_float(x[i]);
    const float x0 = (xv * c_x0_x + g * c_x0_g) / c_x0_div;
    float next = x0 * c_x0 + xv * c_x;
    if (noise != nullptr) next += nova::to_float(noise[i]) * c_noise;
    new_x[i] = nova::from_float<T>(next);
  }
}

struct StepArgs {
  const void* out;
  const void* x;
  const void* noise;
  void* new_x;
  const float* coef;
  const float* scales;
  int step, num_groups, group_len, group_stride, renorm;
};

template <class T, int GUIDE>
int launch_guide(const StepArgs& a, void* stream) {
  const T* out = static_cast<const T*>(a.out);
  const T* x = static_cast<const T*>(a.x);
  const T* noise = static_cast<const T*>(a.noise);
  T* new_x = static_cast<T*>(a.new_x);
  if (a.group_len <= kWarpGroupMax) {
    constexpr int kWarps = 4;
    auto kernel = guided_step_kernel<T, GUIDE, true>;
    return NOVA_LAUNCH(kernel, dim3((a.num_groups + kWarps - 1) / kWarps), dim3(32 * kWarps), 0, stream, out, x,
                       noise, new_x, a.coef, a.scales, a.step, a.num_groups, a.group_len, a.group_stride, a.renorm);
  }
  auto kernel = guided_step_kernel<T, GUIDE, false>;
  return NOVA_LAUNCH(kernel, dim3(a.num_groups), dim3(256), 0, stream, out, x, noise, new_x, a.coef, a.scales, a.step,
                     a.num_groups, a.group_len, a.group_stride, a.renorm);
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

extern "C" int denoise_guided_step(const void* out, const void* x, const void* noise, void* new_x, const float* coef,
                                   const float* scales, int step, int num_groups, int group_len, int group_stride,
                                   int guide, int renorm, int dtype, void* stream) {
  if (num_groups <= 0 || group_len <= 0) return 0;
  if (group_stride < group_len) return 1;  // cudaErrorInvalidValue
  const StepArgs a{out, x, noise, new_x, coef, scales, step, num_groups, group_len, group_stride, renorm};
  switch (dtype) {
    case NOVA_F32: return launch_dtype<float>(guide, a, stream);
    case NOVA_F16: return launch_dtype<__half>(guide, a, stream);
    case NOVA_BF16: return launch_dtype<__nv_bfloat16>(guide, a, stream);
    default: return 1;
  }
}
