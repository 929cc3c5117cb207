"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before any
``@triton.jit`` function is decorated, so it is set here, at collection, before test modules import
kernels. On a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import nova_fast  # noqa: E402  (after the interpreter switch)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU, compiled on GPU)")
    config.addinivalue_line("markers", "aot: compiles kernels ahead of time for sm_80/sm_90 (no GPU needed)")
    config.addinivalue_line("markers", "host_cuda: runs CUDA C++ kernels through the host SIMT harness")
    config.addinivalue_line("markers", "slow: longer than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skips without one); bench/gpu_check.sh runs these")


@pytest.fixture
def triton_device():
    """Device for Triton kernel tests: CUDA when present, else CPU under the interpreter."""
    pytest.importorskip("triton")
    if HAS_GPU:
        return torch.device("cuda")
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must enable the Triton interpreter without a GPU"
    return torch.device("cpu")


@pytest.fixture
def torch_device():
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def _clean_backend_choice():
    """Every test starts from the default backend choice and leaves none behind."""
    nova_fast.set_backend(None)
    yield
    nova_fast.set_backend(None)
    from nova_fast import backends

    with backends._lock:
        backends._op_choice.clear()


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the comparison."""
    return torch.full_like(t, float("nan"))


def assert_close(actual, expected, dtype, what=""):
    """Tolerances that fit the dtype: fp32 ~1e-5 relative, fp16/bf16 ~1e-2."""
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (an element left unwritten?)"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def fresh_output_poisoned(like: torch.Tensor) -> None:
    """Best-effort poison for an output a kernel allocates itself: a NaN tensor of the same size is
    freed just before the call, so the allocator tends to hand its memory to the kernel's output
    (glibc reuses the freed block); an element the kernel forgets to write then reads NaN."""
    poison = torch.full_like(like, float("nan"), memory_format=torch.contiguous_format)
    del poison


@pytest.fixture
def cpu_kernels_built():
    """The torch backend's CPU kernels (csrc/cpu), built on first use; fails, not skips, if they cannot
    be built: g++, ninja and torch's headers are all part of the dev set-up."""
    from nova_fast import cpu_kernels

    if not cpu_kernels.enabled():
        pytest.skip("NOVA_FAST_CPU_KERNELS=0 in the environment")
    assert cpu_kernels.load(), cpu_kernels.status()[1]
    return cpu_kernels


@pytest.fixture
def cpu_kernel_failure(monkeypatch):
    """The CPU kernels as if their build had failed (the reason reported), restored afterwards."""
    from nova_fast import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_error", "CPU kernels could not be built: simulated failure")
    return cpu_kernels
