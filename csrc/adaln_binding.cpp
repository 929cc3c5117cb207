// adaln_binding.cpp: torch glue for csrc/adaln.cu (modulate and residual_norm, forward and backward).
// Inputs are 3-D (B, L, D) with unit stride along D (checked by nova_fast.ops); row strides of
// broadcast dimensions (size 1) are passed as 0. Outputs are allocated here, contiguous.
#include "binding_utils.h"

namespace {

using at::Tensor;

// (stride per sample, stride per token) of a (B, L|1, D) tensor; 0 where the dimension broadcasts.
std::pair<long long, long long> row_strides(const Tensor& t) {
  return {t.size(0) > 1 ? t.stride(0) : 0, t.size(1) > 1 ? t.stride(1) : 0};
}

void check_rows(const Tensor& t, const char* name) {
  nova_binding::check_cuda(t, name);
  TORCH_CHECK(t.dim() == 3, "nova_fast._C adaln: ", name, " must be 3-D (B, L, D)");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "nova_fast._C adaln: ", name, " needs unit stride along D");
}

// The C launchers take B, L and D as int and rows (B * L) as 64-bit.
void check_sizes(int64_t B, int64_t L) {
  TORCH_CHECK(B < (int64_t(1) << 31) && L < (int64_t(1) << 31), "nova_fast._C adaln: B = ", B, " and L = ", L,
              " must each be below 2^31");
}

int backward_chunks(int64_t B, int64_t L) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (4 * sms + B - 1) / std::max<int64_t>(B, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(L, want)));
}

std::vector<Tensor> modulate_fwd(const Tensor& x, const Tensor& scale, const Tensor& shift, bool normalize,
                                 double eps, bool store_stats) {
  check_rows(x, "x");
  check_rows(scale, "scale");
  check_rows(shift, "shift");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  check_sizes(B, L);
  auto out = at::empty({B, L, D}, x.options());
  const bool stats = store_stats && normalize;
  auto mean = at::empty(stats ? std::vector<int64_t>{B, L} : std::vector<int64_t>{0}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  auto [x_sb, x_sl] = row_strides(x);
  auto [sc_sb, sc_sl] = row_strides(scale);
  auto [sh_sb, sh_sl] = row_strides(shift);
  nova_binding::check_launch(
      nova_modulate_fwd(x.data_ptr(), x_sb, x_sl, scale.data_ptr(), sc_sb, sc_sl, shift.data_ptr(), sh_sb, sh_sl,
                        out.data_ptr(), stats ? mean.data_ptr<float>() : nullptr,
                        stats ? rstd.data_ptr<float>() : nullptr, B, L, D, normalize, static_cast<float>(eps),
                        nova_binding::dtype_code(x), nova_binding::current_stream()),
      "nova_modulate_fwd");
  return {out, mean, rstd};
}

// Returns (dx, dscale, dshift); dshift is empty for per-token statistics (it equals dout).
std::vector<Tensor> modulate_bwd(const Tensor& dout, const Tensor& x, const Tensor& scale, const Tensor& mean,
                                 const Tensor& rstd, bool normalize) {
  check_rows(x, "x");
  check_rows(scale, "scale");
  TORCH_CHECK(dout.is_contiguous(), "nova_fast._C adaln: dout must be contiguous");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  check_sizes(B, L);
  const bool per_token = scale.size(1) == L;
  auto dx = at::empty({B, L, D}, x.options());
  auto dscale = at::empty({B, per_token ? L : 1, D}, x.options());
  auto dshift = per_token ? at::empty({0}, x.options()) : at::empty({B, 1, D}, x.options());
  const int chunks = backward_chunks(B, L);
  auto workspace = at::empty({per_token ? 0 : B * chunks * 2 * D}, x.options().dtype(at::kFloat));
  if (B * L == 0) {
    dscale.zero_();
    dshift.zero_();
    return {dx, dscale, dshift};
  }
  auto [x_sb, x_sl] = row_strides(x);
  auto [sc_sb, sc_sl] = row_strides(scale);
  nova_binding::check_launch(
      nova_modulate_bwd(dout.data_ptr(), x.data_ptr(), x_sb, x_sl, scale.data_ptr(), sc_sb, sc_sl,
                        normalize ? mean.data_ptr<float>() : nullptr, normalize ? rstd.data_ptr<float>() : nullptr,
                        dx.data_ptr(), dscale.data_ptr(), per_token ? nullptr : dshift.data_ptr(),
                        per_token ? nullptr : workspace.data_ptr<float>(), chunks, B, L, D, normalize, per_token,
                        nova_binding::dtype_code(x), nova_binding::current_stream()),
      "nova_modulate_bwd");
  return {dx, dscale, dshift};
}

std::vector<Tensor> residual_norm_fwd(const Tensor& x, const Tensor& y, const Tensor& weight, const Tensor& bias,
                                      const c10::optional<Tensor>& gate, double eps, bool store_stats,
                                      const c10::optional<Tensor>& out_opt) {
  check_rows(x, "x");
  check_rows(y, "y");
  if (gate) check_rows(*gate, "gate");
  TORCH_CHECK(weight.is_contiguous() && bias.is_contiguous(), "nova_fast._C adaln: weight and bias must be contiguous");
  const int64_t B = y.size(0), L = y.size(1), D = y.size(2);
  check_sizes(B, L);
  Tensor out = out_opt ? *out_opt : at::empty({B, L, D}, y.options());
  auto mean = at::empty(store_stats ? std::vector<int64_t>{B, L} : std::vector<int64_t>{0}, y.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  auto [x_sb, x_sl] = row_strides(x);
  auto [y_sb, y_sl] = row_strides(y);
  auto [o_sb, o_sl] = row_strides(out);
  long long g_sb = 0, g_sl = 0;
  if (gate) std::tie(g_sb, g_sl) = row_strides(*gate);
  nova_binding::check_launch(
      nova_residual_norm_fwd(x.data_ptr(), x_sb, x_sl, y.data_ptr(), y_sb, y_sl, weight.data_ptr(), bias.data_ptr(),
                             gate ? gate->data_ptr() : nullptr, g_sb, g_sl, out.data_ptr(), o_sb, o_sl,
                             store_stats ? mean.data_ptr<float>() : nullptr,
                             store_stats ? rstd.data_ptr<float>() : nullptr, B, L, D, static_cast<float>(eps),
                             nova_binding::dtype_code(y), nova_binding::current_stream()),
      "nova_residual_norm_fwd");
  return {out, mean, rstd};
}

// Returns (dy, dweight, dbias, dgate or None).
std::vector<c10::optional<Tensor>> residual_norm_bwd(const Tensor& dout, const Tensor& y, const Tensor& weight,
                                                     const Tensor& bias, const c10::optional<Tensor>& gate,
                                                     const Tensor& mean, const Tensor& rstd) {
  check_rows(y, "y");
  if (gate) check_rows(*gate, "gate");
  TORCH_CHECK(dout.is_contiguous(), "nova_fast._C adaln: dout must be contiguous");
  const int64_t B = y.size(0), L = y.size(1), D = y.size(2);
  check_sizes(B, L);
  const bool gate_per_token = gate && gate->size(1) == L;
  auto dy = at::empty({B, L, D}, y.options());
  // the kernels write every element of the gradients (the partial sums cover every column); only
  // an empty batch leaves them to be zero-filled here
  const bool empty = B * L == 0;
  auto dweight = empty ? at::zeros({D}, weight.options()) : at::empty({D}, weight.options());
  auto dbias = empty ? at::zeros({D}, bias.options()) : at::empty({D}, bias.options());
  c10::optional<Tensor> dgate;
  if (gate) {
    const std::vector<int64_t> shape{B, gate_per_token ? L : 1, D};
    dgate = empty ? at::zeros(shape, y.options()) : at::empty(shape, y.options());
  }
  if (empty) return {dy, dweight, dbias, dgate};
  const int chunks = backward_chunks(B, L);
  auto workspace = at::empty({B * chunks * 3 * D}, y.options().dtype(at::kFloat));
  auto [y_sb, y_sl] = row_strides(y);
  long long g_sb = 0, g_sl = 0;
  if (gate) std::tie(g_sb, g_sl) = row_strides(*gate);
  nova_binding::check_launch(
      nova_residual_norm_bwd(dout.data_ptr(), y.data_ptr(), y_sb, y_sl, weight.data_ptr(), bias.data_ptr(),
                             gate ? gate->data_ptr() : nullptr, g_sb, g_sl, mean.data_ptr<float>(),
                             rstd.data_ptr<float>(), dy.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                             dgate ? dgate->data_ptr() : nullptr, workspace.data_ptr<float>(), chunks, B, L, D,
                             gate_per_token, nova_binding::dtype_code(y), nova_binding::current_stream()),
      "nova_residual_norm_bwd");
  return {dy, dweight, dbias, dgate};
}

}  // namespace

void bind_adaln(pybind11::module_& m) {
  m.def("modulate_fwd", &modulate_fwd, "adaLN modulate forward -> (out, mean, rstd)");
  m.def("modulate_bwd", &modulate_bwd, "adaLN modulate backward -> (dx, dscale, dshift or empty)");
  m.def("residual_norm_fwd", &residual_norm_fwd, "x + gate * (LN(y) * w + b) -> (out, mean, rstd); out=x in place");
  m.def("residual_norm_bwd", &residual_norm_bwd, "residual_norm backward -> (dy, dweight, dbias, dgate or None)");
}
