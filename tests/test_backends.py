"""The backend registry: explicit choices, env override, auto rules, clear errors, backend_info."""
import pytest
import torch

import nova_fast
from nova_fast import backends
from conftest import HAS_GPU


def test_unknown_backend_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        nova_fast.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with nova_fast.use_backend("cudnn"):
            pass


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("NOVA_FAST_BACKEND", "fpga")
    with pytest.raises(ValueError, match="NOVA_FAST_BACKEND 'fpga'"):
        backends.resolve("probe", torch.device("cpu"))


def test_auto_on_cpu_picks_torch_and_records_why():
    assert backends.resolve("probe", torch.device("cpu")) == "torch"
    info = nova_fast.backend_info()
    assert info["last_used"]["probe"]["backend"] == "torch"
    assert "auto" in info["last_used"]["probe"]["why"]


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_cuda_backend_on_cpu_tensors_says_why():
    nova_fast.set_backend("cuda")
    with pytest.raises(nova_fast.BackendUnavailable, match="needs CUDA tensors"):
        backends.resolve("probe", torch.device("cpu"))


def test_triton_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with nova_fast.use_backend("triton"):
        with pytest.raises(nova_fast.BackendUnavailable, match="TRITON_INTERPRET=1 is off"):
            backends.resolve("probe", torch.device("cpu"))


def test_triton_under_interpreter_is_allowed_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with nova_fast.use_backend("triton", op="probe"):
        assert backends.resolve("probe", torch.device("cpu")) == "triton"
        assert "TRITON_INTERPRET=1" in nova_fast.backend_info()["last_used"]["probe"]["why"]
    # the per-op choice is gone after the context
    assert backends.requested_backend("probe")[0] == "auto"


def test_backend_not_implemented_by_op():
    with nova_fast.use_backend("cuda"):
        with pytest.raises(nova_fast.BackendUnavailable, match="not implemented for this op"):
            backends.resolve("probe", torch.device("cpu"), supported=("torch", "triton"))


def test_per_op_choice_beats_global_and_env(monkeypatch):
    monkeypatch.setenv("NOVA_FAST_BACKEND", "cuda")
    nova_fast.set_backend("triton")
    nova_fast.set_backend("torch", op="probe")
    assert backends.requested_backend("probe")[0] == "torch"
    assert backends.requested_backend("other")[0] == "triton"
    nova_fast.set_backend(None)
    assert backends.requested_backend("other")[0] == "cuda"


def test_extension_not_built_is_reported():
    info = nova_fast.backend_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["extension_built"], bool)
    if not info["extension_built"]:
        assert "not built" in info["extension"]


def test_import_is_light():
    """`import nova_fast` loads no kernels, no triton and not the extension."""
    import subprocess
    import sys

    code = ("import sys, nova_fast; bad = [m for m in ('triton', 'nova_fast._C', 'nova_fast.kernels', "
            "'nova_fast.ops.modulate') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
