// denoise_step_binding.cpp: torch glue for csrc/denoise_step.cu (checks, then the C launcher).
#include "binding_utils.h"

namespace {

void guided_step_binding(const at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& noise,
                         const at::Tensor& new_x, const at::Tensor& coef, const at::Tensor& scales, int64_t step,
                         int64_t group_len, int64_t group_stride, int64_t guide, bool renorm,
                         const c10::optional<at::Tensor>& workspace_opt) {
  using nova_binding::check_cuda;
  check_cuda(out, "out");
  check_cuda(x, "x");
  check_cuda(new_x, "new_x");
  check_cuda(coef, "coef");
  check_cuda(scales, "scales");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{out, "out"}, {x, "x"}, {new_x, "new_x"}}) {
    TORCH_CHECK(t.is_contiguous(), "denoise_guided_step: ", name,
                " must be contiguous (flat passes / groups), got strides ", t.strides());
  }
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && new_x.scalar_type() == x.scalar_type(),
              "denoise_guided_step: out, x and new_x must share one dtype");
  TORCH_CHECK(guide >= 0 && guide <= 3, "denoise_guided_step: guide must be 0..3, got ", guide);
  const int64_t passes = guide == 0 ? 1 : (guide == 1 ? 2 : 3);
  TORCH_CHECK(group_len > 0 && group_stride >= group_len && x.numel() % group_stride == 0,
              "denoise_guided_step: need 0 < group_len <= group_stride and group_stride dividing x.numel(); got ",
              group_len, ", ", group_stride, ", ", x.numel());
  TORCH_CHECK(out.numel() == passes * x.numel() && new_x.numel() == x.numel(),
              "denoise_guided_step: out must hold ", passes, " passes of x.numel() elements");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(1) == 8 && coef.is_contiguous(),
              "denoise_guided_step: coef must be a contiguous fp32 (K, 8) table");
  TORCH_CHECK(step >= 0 && step < coef.size(0), "denoise_guided_step: step ", step, " outside the coef table");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() >= 3 && scales.is_contiguous(),
              "denoise_guided_step: scales must be a contiguous fp32 tensor [s, s2, renorm_min]");
  const void* noise_ptr = nullptr;
  if (noise.has_value()) {
    check_cuda(*noise, "noise");
    TORCH_CHECK(noise->is_contiguous(), "denoise_guided_step: noise must be contiguous, got strides ",
                noise->strides());
    TORCH_CHECK(noise->numel() == x.numel() && noise->scalar_type() == x.scalar_type(),
                "denoise_guided_step: noise must be shaped and typed like x");
    noise_ptr = noise->data_ptr();
  }
  TORCH_CHECK(x.numel() < (int64_t(1) << 31), "denoise_guided_step: x is too large for 32-bit group indices");
  const int num_groups = static_cast<int>(x.numel() / group_stride);
  // long renorm groups are split over blocks: two fp32 partial sums per chunk (a few KB at most)
  const int64_t workspace_floats = denoise_step_workspace_floats(num_groups, static_cast<int>(group_len), renorm);
  at::Tensor workspace;
  if (workspace_floats > 0 && workspace_opt.has_value()) {  // the caller's (e.g. allocated before a captured loop)
    workspace = *workspace_opt;
    check_cuda(workspace, "workspace");
    TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() &&
                    workspace.numel() >= workspace_floats,
                "denoise_guided_step: workspace must be a contiguous fp32 tensor of at least ", workspace_floats,
                " elements");
  } else if (workspace_floats > 0) {
    workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
  }
  const int err = denoise_guided_step_ws(out.data_ptr(), x.data_ptr(), noise_ptr, new_x.data_ptr(),
                                         coef.data_ptr<float>(), scales.data_ptr<float>(),
                                         workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr,
                                         static_cast<int>(step), num_groups, static_cast<int>(group_len),
                                         static_cast<int>(group_stride), static_cast<int>(guide), renorm ? 1 : 0,
                                         nova_binding::dtype_code(x), nova_binding::current_stream());
  nova_binding::check_launch(err, "denoise_guided_step");
}

}  // namespace

void bind_denoise_step(pybind11::module_& m) {
  m.def("denoise_guided_step", &guided_step_binding, "fused guidance + scheduler step (in new_x)",
        pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("noise"), pybind11::arg("new_x"),
        pybind11::arg("coef"), pybind11::arg("scales"), pybind11::arg("step"), pybind11::arg("group_len"),
        pybind11::arg("group_stride"),
        pybind11::arg("guide"), pybind11::arg("renorm"), pybind11::arg("workspace") = pybind11::none());
  m.def("denoise_step_workspace_floats", &denoise_step_workspace_floats,
        "fp32 elements of the workspace denoise_guided_step needs (num_groups, group_len, renorm); 0: none");
}
