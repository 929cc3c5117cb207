// binding_utils.h: helpers for the torch glue files csrc/*_binding.cpp (torch headers allowed here,
// never in .cu files).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "launchers.h"

namespace nova_binding {

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return NOVA_F32;
    case at::kHalf: return NOVA_F16;
    case at::kBFloat16: return NOVA_BF16;
    default: TORCH_CHECK(false, "nova_fast._C: unsupported dtype ", t.scalar_type());
  }
}

inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "nova_fast._C: ", what, " failed with CUDA error ", err);
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "nova_fast._C: ", name, " must be a CUDA tensor");
}

inline void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace nova_binding
