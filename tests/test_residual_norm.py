"""nova_fast.residual_norm: x + gate * (LN(y) * weight + bias). Parity with the eager composition
(forward, every gradient) on the torch backend, Triton (interpreter on CPU) and the CUDA C++ kernels
(host SIMT harness); in place; argument errors; torch.compile. The adaLN AOT / nvcc resource checks
live in tests/test_modulate.py (one kernel module and one .cu serve both ops)."""
import ctypes

import pytest
import torch
import torch.nn.functional as F

import nova_fast
from conftest import assert_close, fresh_output_poisoned, poison_like
from nova_fast.testing import cuda_host
from test_modulate import TWO_ROW_CASES, host_threads_per_row, rows_for_width

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def eager_residual_norm(x, y, weight, bias, gate=None, eps=1e-5):
    branch = F.layer_norm(y, (y.shape[-1],), weight, bias, eps)
    return x + (branch if gate is None else gate * branch)


def make_inputs(B, L, D, dtype, device, gate):
    """gate: None, 'token' or 'sample'; a gate is the third chunk of a (B, L|1, 3D) projection."""
    x = torch.randn(B, L, D, device=device, dtype=dtype)
    y = torch.randn(B, L, D, device=device, dtype=dtype)
    weight = 1 + 0.5 * torch.randn(D, device=device, dtype=dtype)
    bias = 0.5 * torch.randn(D, device=device, dtype=dtype)
    g = None
    if gate is not None:
        g = torch.randn(B, L if gate == "token" else 1, 3 * D, device=device, dtype=dtype).chunk(3, -1)[2]
    return x, y, weight, bias, g


def reference(x, y, weight, bias, gate, grad_out):
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in (x, y, weight, bias, gate)]
    out = eager_residual_norm(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.float())
    return out.detach(), grads


def check_grads(grads, ref_grads, dtype, names=("dx", "dy", "dweight", "dbias", "dgate")):
    for name, g, ref in zip(names, grads, ref_grads):
        assert g.shape == ref.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), ref, rtol=GRAD_TOL[dtype],
                                   atol=GRAD_TOL[dtype] * max(1.0, ref.abs().max().item()), msg=lambda m: f"{name}: {m}")


def check_parity(backend, B, L, D, dtype, device, gate):
    x, y, weight, bias, g = make_inputs(B, L, D, dtype, device, gate)
    grad_out = torch.randn(B, L, D, device=device, dtype=dtype)
    ref_out, ref_grads = reference(x, y, weight, bias, g, grad_out)
    with nova_fast.use_backend(backend), torch.no_grad():
        assert_close(nova_fast.residual_norm(x, y, weight, bias, gate=g), ref_out, dtype, "no-grad forward")
        inplace = x.clone()
        assert nova_fast.residual_norm(inplace, y, weight, bias, gate=g, inplace=True) is inplace
        assert_close(inplace, ref_out, dtype, "in place")
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, y, weight, bias, g)]
    with nova_fast.use_backend(backend):
        out = nova_fast.residual_norm(*leaves[:4], gate=leaves[4])
        assert out.shape == x.shape and out.dtype == dtype
        assert_close(out, ref_out, dtype, "forward")
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    assert nova_fast.backend_info()["last_used"]["residual_norm"]["backend"] == backend
    check_grads(grads, ref_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("B,L,D", [(2, 7, 1000), (1, 5, 1280), (2, 3, 1536)])
def test_torch_backend_matches_eager(torch_device, dtype, gate, B, L, D):
    check_parity("torch", B, L, D, dtype, torch_device, gate)


def test_two_dim_input(torch_device):
    x, y, weight, bias, _ = make_inputs(1, 9, 40, torch.float32, torch_device, None)
    gate = torch.randn(9, 40, device=torch_device)
    out = nova_fast.residual_norm(x[0], y[0], weight, bias, gate=gate)
    assert out.shape == (9, 40)
    assert_close(out, eager_residual_norm(x[0], y[0], weight, bias, gate), torch.float32, "2-D")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("D", [40, 1000, 1280, 1536])
def test_triton_matches_eager(triton_device, dtype, gate, D):
    check_parity("triton", 2, 4, D, dtype, triton_device, gate)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["token", "sample"])
@pytest.mark.parametrize("D", [64, 96, 1024, 1280, 2048])
def test_triton_rows_per_program(triton_device, monkeypatch, dtype, gate, D):
    """Several rows per program for D <= 1024, ragged rows, 96 ragged against the block; every buffer
    kernels.adaln allocates is NaN-poisoned (see tests/test_modulate.py)."""
    from nova_fast.kernels import adaln
    from test_modulate import _PoisonedEmpty

    monkeypatch.setattr(adaln, "torch", _PoisonedEmpty())
    check_parity("triton", 2, 37 if D <= 96 else 11, D, dtype, triton_device, gate)


# ---- CUDA C++ through the host SIMT harness ----
def _rows(t):
    if t is None:
        return ctypes.c_longlong(0), ctypes.c_longlong(0)
    return (ctypes.c_longlong(t.stride(0) if t.shape[0] > 1 else 0),
            ctypes.c_longlong(t.stride(1) if t.shape[1] > 1 else 0))


def host_residual_norm(x, y, weight, bias, gate, grad_out, chunks=3, out=None):
    lib = cuda_host.host_library("adaln")
    B, L, D = y.shape
    code = cuda_host.DTYPE_CODES[y.dtype]
    out = poison_like(torch.empty(B, L, D, dtype=y.dtype)) if out is None else out
    mean, rstd = poison_like(torch.empty(B, L)), poison_like(torch.empty(B, L))
    cuda_host.call(lib, "nova_residual_norm_fwd", x, *_rows(x), y, *_rows(y), weight, bias, gate, *_rows(gate), out,
                   *_rows(out), mean, rstd, B, L, D, 1e-5, code, None)
    gate_per_token = gate is not None and gate.shape[1] == L
    dy = poison_like(torch.empty(B, L, D, dtype=y.dtype))
    dweight, dbias = poison_like(weight), poison_like(bias)
    dgate = None if gate is None else poison_like(torch.empty(gate.shape, dtype=y.dtype))
    workspace = poison_like(torch.empty(B * chunks * 3 * D))
    cuda_host.call(lib, "nova_residual_norm_bwd", grad_out, y, *_rows(y), weight, bias, gate, *_rows(gate), mean,
                   rstd, dy, dweight, dbias, dgate, workspace, chunks, B, L, D, int(gate_per_token), code, None)
    grads = [grad_out, dy, dweight, dbias] + ([] if gate is None else [dgate])
    return out, grads


@pytest.mark.host_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("B,L,D", [(2, 8, 64), (2, 5, 1000), (1, 4, 1280)])
def test_cuda_host_matches_eager(dtype, gate, B, L, D):
    x, y, weight, bias, g = make_inputs(B, L, D, dtype, "cpu", gate)
    grad_out = torch.randn(B, L, D, dtype=dtype)
    ref_out, ref_grads = reference(x, y, weight, bias, g, grad_out)
    out, grads = host_residual_norm(x, y, weight, bias, g, grad_out)
    assert_close(out, ref_out, dtype, "forward")
    check_grads(grads, ref_grads, dtype)


@pytest.mark.host_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("D", [64, 96, 1024, 1280, 2048])
def test_cuda_host_rows_per_block(dtype, gate, D):
    """Several rows per block (16, 64 or 128 threads per row): D across the widths, 96 ragged against
    the 16-byte pieces, rows ragged against the rows per block and per backward chunk; outputs poisoned."""
    B, L = rows_for_width(D)
    x, y, weight, bias, g = make_inputs(B, L, D, dtype, "cpu", gate)
    grad_out = torch.randn(B, L, D, dtype=dtype)
    ref_out, ref_grads = reference(x, y, weight, bias, g, grad_out)
    out, grads = host_residual_norm(x, y, weight, bias, g, grad_out, chunks=2)
    assert_close(out, ref_out, dtype, f"forward D={D}")
    check_grads(grads, ref_grads, dtype)


@pytest.mark.host_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("B,L,D,chunks", TWO_ROW_CASES)
def test_cuda_host_two_rows_per_block(dtype, gate, B, L, D, chunks):
    """1024 < D <= 2048: 128 threads per row, two rows per block (shapes: tests/test_modulate.py)."""
    x, y, weight, bias, g = make_inputs(B, L, D, dtype, "cpu", gate)
    assert all(t is None or t.data_ptr() % 16 == 0 for t in (x, y, weight, bias, g))  # 16-byte pieces
    assert host_threads_per_row(D) == 128
    grad_out = torch.randn(B, L, D, dtype=dtype)
    ref_out, ref_grads = reference(x, y, weight, bias, g, grad_out)
    out, grads = host_residual_norm(x, y, weight, bias, g, grad_out, chunks=chunks)  # outputs poisoned
    assert_close(out, ref_out, dtype, f"forward D={D}")
    check_grads(grads, ref_grads, dtype)


@pytest.mark.host_cuda
def test_cuda_host_in_place_and_unaligned():
    # y one element past a 16-byte boundary, odd D: scalar loads; the output is x itself.
    B, L, D = 2, 3, 77
    x, _, weight, bias, g = make_inputs(B, L, D, torch.float32, "cpu", "sample")
    y = torch.randn(B * L * D + 1)[1:].view(B, L, D)
    grad_out = torch.randn(B, L, D)
    ref_out, ref_grads = reference(x, y, weight, bias, g, grad_out)
    target = x.clone()
    out, grads = host_residual_norm(target, y, weight, bias, g, grad_out, chunks=2, out=target)
    assert out is target
    assert_close(target, ref_out, torch.float32, "in place")
    check_grads(grads, ref_grads, torch.float32)


# ---- in place, errors ----
def test_inplace_refuses_autograd_and_broadcast_views():
    x, y, weight, bias, _ = make_inputs(1, 3, 40, torch.float32, "cpu", None)
    with pytest.raises(RuntimeError, match="inplace=True.*requires grad"):
        nova_fast.residual_norm(x, y.requires_grad_(), weight, bias, inplace=True)
    with pytest.raises(ValueError, match="broadcast view"):
        nova_fast.residual_norm(torch.randn(1, 1, 40).expand(1, 3, 40), y.detach(), weight, bias, inplace=True)


def test_bad_inputs_raise_clear_errors():
    x, y, weight, bias, g = make_inputs(2, 4, 40, torch.float32, "cpu", "token")
    with pytest.raises(ValueError, match="y has shape"):
        nova_fast.residual_norm(x, y[:, :1], weight, bias)  # y never broadcasts
    with pytest.raises(ValueError, match="gate has shape"):
        nova_fast.residual_norm(x, y, weight, bias, gate=torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="weight has shape"):
        nova_fast.residual_norm(x, y, torch.randn(41), bias)
    with pytest.raises(TypeError, match="mixed dtypes: bias is bfloat16"):
        nova_fast.residual_norm(x, y, weight, bias.bfloat16())
    with pytest.raises(TypeError, match="mixed dtypes: gate is float16"):
        nova_fast.residual_norm(x, y, weight, bias, gate=g.half())
    with pytest.raises(ValueError, match="D = 4097"):
        big = torch.randn(1, 1, 4097)
        nova_fast.residual_norm(big, big, torch.randn(4097), torch.randn(4097))


def test_torch_compile_traces_custom_ops():
    x, y, weight, bias, g = make_inputs(2, 5, 64, torch.float32, "cpu", "sample")
    leaves = [t.detach().clone().requires_grad_() for t in (x, y, weight, bias, g)]
    fn = torch.compile(lambda *a: nova_fast.residual_norm(*a[:4], gate=a[4]), backend="aot_eager", fullgraph=True)
    out = fn(*leaves)
    out.sum().backward()
    ref_out, ref_grads = reference(x, y, weight, bias, g, torch.ones_like(x))
    assert_close(out, ref_out, torch.float32, "compiled forward")
    check_grads([t.grad for t in leaves], ref_grads, torch.float32)

    def step(a, b):  # in-place form under compile: the mutating custom op
        return nova_fast.residual_norm(a, b, weight, bias, inplace=True)

    target = x.clone()
    with torch.no_grad():
        torch.compile(step, backend="aot_eager", fullgraph=True)(target, y)
    assert_close(target, eager_residual_norm(x, y, weight, bias), torch.float32, "compiled in place")


# ---- torch backend on CPU tensors: the hand-written kernel (csrc/cpu/adaln.cpp) ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("B,L,D", [(2, 7, 1000), (1, 5, 1280), (3, 2, 1536), (1, 33, 40)])
def test_cpu_kernel_matches_eager(cpu_kernels_built, dtype, gate, B, L, D):
    x, y, weight, bias, g = make_inputs(B, L, D, dtype, "cpu", gate)  # gate: a strided chunk
    want = eager_residual_norm(*(None if t is None else t.float() for t in (x, y, weight, bias, g)))
    fresh_output_poisoned(x)
    with nova_fast.use_backend("torch"), torch.no_grad():
        out = nova_fast.residual_norm(x, y, weight, bias, gate=g)
        assert nova_fast.backend_info()["last_used"]["residual_norm"]["path"].startswith("CPU kernel")
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert_close(out, want, dtype, f"cpu kernel {dtype} gate={gate}")
        target = x.clone()
        assert nova_fast.residual_norm(target, y, weight, bias, gate=g, inplace=True) is target
        assert_close(target, want, dtype, "cpu kernel in place")
        rows = nova_fast.residual_norm(x.reshape(-1, D), y.reshape(-1, D), weight, bias,
                                       gate=None if g is None or B > 1 else g[0])
        if g is None or B == 1:
            assert_close(rows, want.reshape(-1, D), dtype, "cpu kernel 2-D rows")


def test_cpu_kernel_failure_runs_aten_and_says_why(cpu_kernel_failure):
    x, y, weight, bias, g = make_inputs(2, 5, 1000, torch.float32, "cpu", "token")
    with torch.no_grad():
        out = nova_fast.residual_norm(x, y, weight, bias, gate=g)
    assert_close(out, eager_residual_norm(x, y, weight, bias, g), torch.float32, "ATen path")
    assert "simulated failure" in nova_fast.backend_info()["last_used"]["residual_norm"]["path"]


def test_cpu_kernel_row_strided_x_and_empty(cpu_kernels_built):
    """x a row-strided view (unit stride along D): read and, in place, written through its strides,
    leaving the rest of the storage alone; zero rows return empty results."""
    big = torch.randn(2, 5, 3000)
    x = big[..., 100:1100]
    y, weight, bias = torch.randn(2, 5, 1000), torch.randn(1000), torch.randn(1000)
    want = eager_residual_norm(x, y, weight, bias)
    before = big.clone()
    with torch.no_grad():
        assert_close(nova_fast.residual_norm(x, y, weight, bias), want, torch.float32, "strided x")
        nova_fast.residual_norm(x, y, weight, bias, inplace=True)
        assert nova_fast.backend_info()["last_used"]["residual_norm"]["path"].startswith("CPU kernel")
    assert_close(x, want, torch.float32, "strided x in place")
    assert torch.equal(big[..., :100], before[..., :100]) and torch.equal(big[..., 1100:], before[..., 1100:])
    empty = torch.randn(0, 7, 64)
    with torch.no_grad():
        assert nova_fast.residual_norm(empty, empty.clone(), torch.ones(64), torch.zeros(64)).shape == (0, 7, 64)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_inference_call_resolves_the_backend_once(monkeypatch, inplace, cpu_kernel):
    """One backend resolution per inference call, in place or not, with or without the CPU kernel."""
    from nova_fast import backends, cpu_kernels

    calls = []
    real = backends.resolve

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "resolve", counting)
    if not cpu_kernel:
        monkeypatch.setattr(cpu_kernels, "available_for", lambda *t: False)
    x, y, weight, bias, g = make_inputs(1, 3, 40, torch.float32, "cpu", "sample")
    want = eager_residual_norm(x, y, weight, bias, g)
    with nova_fast.use_backend("torch"), torch.no_grad():
        out = nova_fast.residual_norm(x, y, weight, bias, gate=g, inplace=inplace)
    assert_close(out, want, torch.float32, "result")
    assert calls == ["residual_norm"]
