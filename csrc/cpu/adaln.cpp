// adaln.cpp: the adaLN forwards on CPU, one pass per row (the torch backend's inference path on CPU
// tensors; csrc/adaln.cu is the GPU twin, nova_fast/ops/modulate.py and residual_norm.py state the
// math and the shapes, and check every argument before these run).
//
//   modulate:       out = LN(x) * (1 + scale) + shift     (normalize; LN without affine)
//                   out = x * (1 + scale) + shift          (no normalize: the video mixer)
//   residual_norm:  out = x + gate * (LN(y) * weight + bias)   (gate absent: gate = 1)
//   residual_norm_: the same written into x
//
// Eager PyTorch runs each as 2-5 kernels with a full-size temporary between them; here every row is
// read once into cache, its statistics taken there, and the output written once.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "rows.h"

namespace nova_cpu {
namespace {

template <class T>
void modulate_rows(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, at::Tensor& out,
                   double eps, bool normalize) {
  const int64_t B = batch_of(x), L = tokens_of(x), D = x.size(-1);
  const Rows<const T> xs(x, false), sc(scale, per_sample(scale)), sh(shift, per_sample(shift));
  T* o = static_cast<T*>(out.data_ptr());
  at::parallel_for(0, B * L, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, l = r % L;
      const T* xr = xs.row(b, l);
      const T* s = sc.row(b, l);
      const T* h = sh.row(b, l);
      float mean = 0.f, rstd = 1.f;
      if (normalize) row_stats(xr, D, static_cast<float>(eps), mean, rstd);
      write_row(o + r * D, D, [&](int64_t d) {
        const float v = (static_cast<float>(xr[d]) - mean) * rstd;
        return v * (1.f + static_cast<float>(s[d])) + static_cast<float>(h[d]);
      });
    }
  });
}

template <class T>
void residual_norm_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                        const c10::optional<at::Tensor>& gate, at::Tensor& out, double eps) {
  const int64_t B = batch_of(y), L = tokens_of(y), D = y.size(-1);
  const Rows<const T> xs(x, false), ys(y, false);
  const bool gated = gate.has_value();
  const Rows<const T> gs(gated ? *gate : y, gated && per_sample(*gate));
  const T* w = static_cast<const T*>(weight.data_ptr());
  const T* bi = static_cast<const T*>(bias.data_ptr());
  const Rows<T> os(out, false);
  at::parallel_for(0, B * L, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, l = r % L;
      const T* yr = ys.row(b, l);
      const T* xr = xs.row(b, l);
      const T* g = gated ? gs.row(b, l) : nullptr;
      float mean, rstd;
      row_stats(yr, D, static_cast<float>(eps), mean, rstd);
      auto branch = [&](int64_t d) {
        return (static_cast<float>(yr[d]) - mean) * rstd * static_cast<float>(w[d]) + static_cast<float>(bi[d]);
      };
      if (gated) {
        write_row(os.row(b, l), D, [&](int64_t d) {
          return static_cast<float>(xr[d]) + static_cast<float>(g[d]) * branch(d);
        });
      } else {
        write_row(os.row(b, l), D, [&](int64_t d) { return static_cast<float>(xr[d]) + branch(d); });
      }
    }
  });
}

// The Python wrappers validate shapes, dtypes and devices; these checks only guard the memory
// layout the loops assume, so a wrong call fails with a message instead of reading out of bounds.
void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "nova_fast_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "nova_fast_cpu: ", name, " must be (B, L, D) or (N, D), got ", t.dim(),
              "-D");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "nova_fast_cpu: ", name, " needs unit stride along D");
}

at::Tensor modulate(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, double eps,
                    bool normalize) {
  check_layout(x, "x");
  check_layout(scale, "scale");
  check_layout(shift, "shift");
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nova_fast_cpu::modulate",
                                  [&] { modulate_rows<scalar_t>(x, scale, shift, out, eps, normalize); });
  return out;
}

void check_residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                    const c10::optional<at::Tensor>& gate) {
  check_layout(x, "x");
  check_layout(y, "y");
  if (gate.has_value()) check_layout(*gate, "gate");
  TORCH_CHECK(weight.is_contiguous() && bias.is_contiguous(), "nova_fast_cpu: weight and bias must be contiguous");
}

at::Tensor residual_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                         const c10::optional<at::Tensor>& gate, double eps) {
  check_residual(x, y, weight, bias, gate);
  auto out = at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "nova_fast_cpu::residual_norm",
                                  [&] { residual_norm_rows<scalar_t>(x, y, weight, bias, gate, out, eps); });
  return out;
}

// In place: every element of x is read before it is written, by the same iteration.
at::Tensor& residual_norm_(at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                           const c10::optional<at::Tensor>& gate, double eps) {
  check_residual(x, y, weight, bias, gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "nova_fast_cpu::residual_norm_",
                                  [&] { residual_norm_rows<scalar_t>(x, y, weight, bias, gate, x, eps); });
  return x;
}

}  // namespace
}  // namespace nova_cpu

TORCH_LIBRARY_FRAGMENT(nova_fast_cpu, m) {
  m.def("modulate(Tensor x, Tensor scale, Tensor shift, float eps, bool normalize) -> Tensor");
  m.def("residual_norm(Tensor x, Tensor y, Tensor weight, Tensor bias, Tensor? gate, float eps) -> Tensor");
  m.def("residual_norm_(Tensor(a!) x, Tensor y, Tensor weight, Tensor bias, Tensor? gate, float eps) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(nova_fast_cpu, CPU, m) {
  m.impl("modulate", &nova_cpu::modulate);
  m.impl("residual_norm", &nova_cpu::residual_norm);
  m.impl("residual_norm_", &nova_cpu::residual_norm_);
}
