// bindings.cpp: the module definition of nova_fast._C. Each op's torch glue lives in
// csrc/<op>_binding.cpp and defines `void bind_<op>(pybind11::module_&)`; list the op in NOVA_OPS.
// Kernels stay in csrc/<op>.cu, free of torch headers, so they also build for the host harness.
#include <torch/extension.h>

#define NOVA_OPS(X) X(adaln) X(denoise_step)

#define NOVA_DECLARE(op) void bind_##op(pybind11::module_& m);
NOVA_OPS(NOVA_DECLARE)
#undef NOVA_DECLARE

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nova_fast CUDA C++ kernels (see csrc/*.cu)";
#define NOVA_CALL(op) bind_##op(m);
  NOVA_OPS(NOVA_CALL)
#undef NOVA_CALL
}
