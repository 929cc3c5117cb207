// denoise_step.cpp: the fused guidance + scheduler step of the diffusion-head loop on CPU (the torch
// backend's step on CPU tensors; csrc/denoise_step.cu is the GPU twin and
// nova_fast/ops/denoise_step.py states the math and validates the arguments).
//
// out holds the head's m passes stacked (pass j at j * num_groups * group_stride); x, noise and the
// result hold num_groups * group_stride elements. A renorm group is the first group_len elements of
// each group_stride (the rest: bucket padding, left as it is). The step is written into x in place:
// each element is read before it is written, by the same iteration. coef is the (K, 8) fp32 table,
// row `step` read here (no host round trip, no per-coefficient select op); scales = {s, s2,
// renorm_min}.
//   g  = o0 (none) | o1 + s (o0 - o1) (cfg, stg) | o1 + s (o0 - o2) (image)
//   g *= clamp(|o0| / |g|, renorm_min, 1) over the group (renorm)
//   g += s2 (o2 - o1) (image) | s2 (o0 - o2) (stg)
//   x' = c3 (c0 x + c1 g) / c2 + c4 x + c5 noise
#include <torch/library.h>

#include "rows.h"

namespace nova_cpu {
namespace {

// guidance modes: the values of nova_fast/guidance_modes.py (tests/test_guidance_modes.py checks them)
constexpr int64_t kGuideNone = 0, kGuideCfg = 1, kGuideImage = 2, kGuideStg = 3;

template <class T>
void guided_step_groups(const T* out, T* x, const T* noise, const float* c, const float* scales,
                        int64_t guide, bool renorm, int64_t num_groups, int64_t group_len, int64_t group_stride) {
  const int64_t pass = num_groups * group_stride;
  const float s = scales[0], s2 = scales[1], renorm_min = scales[2];
  const float c5 = c[5];
  // the first stage of the guidance combine at element i
  auto combine = [&](int64_t i) {
    const float o0 = static_cast<float>(out[i]);
    if (guide == kGuideNone) return o0;
    const float o1 = static_cast<float>(out[pass + i]);
    const float other = guide == kGuideImage ? static_cast<float>(out[2 * pass + i]) : o1;
    return o1 + (o0 - other) * s;
  };
  const bool linear = !renorm && (guide == kGuideNone || guide == kGuideCfg);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(group_len, 1));
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t base = grp * group_stride;
      if (linear) {  // the folded coefficients: x' = c6 x + c7 g + c5 noise
        const float c6 = c[6], c7 = c[7];
#pragma omp simd
        for (int64_t i = base; i < base + group_len; ++i) {
          float v = c6 * static_cast<float>(x[i]) + c7 * combine(i);
          if (noise) v += c5 * static_cast<float>(noise[i]);
          x[i] = static_cast<T>(v);
        }
      } else {
        float ratio = 1.f;
        if (renorm) {
          float n0 = 0.f, ng = 0.f;
          for (int64_t i = base; i < base + group_len; ++i) {
            const float o0 = static_cast<float>(out[i]), g = combine(i);
            n0 += o0 * o0;
            ng += g * g;
          }
          ratio = std::sqrt(n0) / std::sqrt(ng);
          ratio = std::min(std::max(ratio, renorm_min), 1.f);
        }
        for (int64_t i = base; i < base + group_len; ++i) {
          float g = combine(i) * ratio;
          if (guide == kGuideImage) {
            g += (static_cast<float>(out[2 * pass + i]) - static_cast<float>(out[pass + i])) * s2;
          } else if (guide == kGuideStg) {
            g += (static_cast<float>(out[i]) - static_cast<float>(out[2 * pass + i])) * s2;
          }
          const float xf = static_cast<float>(x[i]);
          float v = (xf * c[0] + g * c[1]) / c[2] * c[3] + xf * c[4];
          if (noise) v += static_cast<float>(noise[i]) * c5;
          x[i] = static_cast<T>(v);
        }
      }
    }
  });
}

at::Tensor& guided_step_(const at::Tensor& out, at::Tensor& x, const c10::optional<at::Tensor>& noise,
                         const at::Tensor& coef, const at::Tensor& scales, int64_t step, int64_t guide, bool renorm,
                         int64_t group_len, int64_t group_stride) {
  static const int64_t passes[] = {1, 2, 3, 3};
  TORCH_CHECK(guide >= 0 && guide <= 3, "nova_fast_cpu::guided_step_: guide must be 0..3, got ", guide);
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "nova_fast_cpu::guided_step_: x and out must be contiguous");
  TORCH_CHECK(!noise.has_value() || (noise->is_contiguous() && noise->numel() == x.numel()),
              "nova_fast_cpu::guided_step_: noise must be contiguous and shaped like x");
  TORCH_CHECK(group_stride > 0 && group_len <= group_stride && x.numel() % group_stride == 0,
              "nova_fast_cpu::guided_step_: group_len/group_stride do not tile x");
  TORCH_CHECK(out.numel() == passes[guide] * x.numel(), "nova_fast_cpu::guided_step_: out must hold ",
              passes[guide], " passes of x");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.is_contiguous() && coef.dim() == 2 && coef.size(1) == 8 &&
                  step >= 0 && step < coef.size(0),
              "nova_fast_cpu::guided_step_: coef must be a contiguous (K, 8) fp32 table and 0 <= step < K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == 3,
              "nova_fast_cpu::guided_step_: scales must be 3 fp32");
  const float* c = coef.data_ptr<float>() + step * 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nova_fast_cpu::guided_step_", [&] {
    guided_step_groups<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                 noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr, c,
                                 scales.data_ptr<float>(), guide, renorm, x.numel() / group_stride, group_len,
                                 group_stride);
  });
  return x;
}

}  // namespace
}  // namespace nova_cpu

TORCH_LIBRARY_FRAGMENT(nova_fast_cpu, m) {
  m.def("guided_step_(Tensor out, Tensor(a!) x, Tensor? noise, Tensor coef, Tensor scales, int step, int guide, "
        "bool renorm, int group_len, int group_stride) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(nova_fast_cpu, CPU, m) { m.impl("guided_step_", &nova_cpu::guided_step_); }
