"""Kernel-level tests of the fused guidance + scheduler step (kernels/denoise_step.py, csrc/denoise_step.cu).

Each backend (Triton under the interpreter, CUDA C++ through the host SIMT harness) is compared
with an independent float64 evaluation of the formulas written out step by step below, and with
the op's torch backend; outputs are poisoned so unwritten elements fail.
"""
import shutil

import pytest
import torch

from conftest import assert_close, poison_like
from nova_fast.ops import denoise_tokens as op
from nova_fast.testing import cuda_host, triton_aot

GUIDES = {"none": op.GUIDE_NONE, "cfg": op.GUIDE_CFG, "image": op.GUIDE_IMAGE, "stg": op.GUIDE_STG}


def expected_step(out, x, noise, coef_row, s, s2, renorm_min, guide, renorm, group_len):
    """float64 oracle, written like a guidance scaler + scheduler would (not like the kernel)."""
    m = op.PASSES[guide]
    o = out.double().reshape(m, -1, group_len)
    xd = x.double().reshape(-1, group_len)
    cond = o[0]
    if guide == op.GUIDE_NONE:
        guided = cond
    elif guide == op.GUIDE_IMAGE:
        uncond, imgcond = o[1], o[2]
        guided = uncond + s * (cond - imgcond)
    else:
        uncond = o[1]
        guided = uncond + s * (cond - uncond)
    if renorm:
        guided = guided * (cond.norm(dim=1, keepdim=True) / guided.norm(dim=1, keepdim=True)).clamp(renorm_min, 1)
    if guide == op.GUIDE_IMAGE:
        guided = guided + s2 * (o[2] - o[1])
    elif guide == op.GUIDE_STG:
        guided = guided + s2 * (cond - o[2])
    c = coef_row.double()
    x0 = (c[0] * xd + c[1] * guided) / c[2]
    new = c[3] * x0 + c[4] * xd
    if noise is not None:
        new = new + c[5] * noise.double().reshape(-1, group_len)
    return new.reshape(x.shape)


def make_case(guide, groups, group_len, dtype, device, kind="ddpm", seed=0):
    g = torch.Generator().manual_seed(seed)
    m = op.PASSES[guide]
    out = torch.randn(m * groups * group_len, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(groups * group_len, generator=g).to(device=device, dtype=dtype)
    noise = torch.randn(groups * group_len, generator=g).to(device=device, dtype=dtype)
    K = 4
    coef = torch.zeros(K, op.COEF_COLUMNS)
    if kind == "ddpm":  # epsilon: x0 = (x - sqrt(1 - ab) * eps) / sqrt(ab); mean = c0 * x0 + ct * x
        ab = torch.tensor([0.05, 0.3, 0.7, 0.99])
        coef[:, 0], coef[:, 1], coef[:, 2] = 1.0, -(1 - ab).sqrt(), ab.sqrt()
        coef[:, 3] = torch.tensor([0.2, 0.4, 0.6, 0.9])
        coef[:, 4], coef[:, 5] = torch.tensor([0.9, 0.7, 0.4, 0.05]), 0.1
    else:  # flow Euler: x0 := v, x_new = dt * v + x
        coef[:, 1], coef[:, 2], coef[:, 3], coef[:, 4] = 1.0, 1.0, torch.tensor([-0.3, -0.25, -0.25, -0.2]), 1.0
    scales = torch.tensor([4.5, 1.7, 0.6])
    return out, x, noise, op.fold_coefficients(coef).to(device), scales.to(device)


CASES = [  # (guide, renorm, noise, groups, group_len, kind[, group_stride])
    ("cfg", False, True, 7, 64, "ddpm"),
    ("cfg", True, True, 22, 64, "ddpm"),
    ("none", False, False, 5, 64, "flow"),
    ("image", True, True, 3, 48, "ddpm"),
    ("stg", True, False, 4, 16, "flow"),
    ("cfg", True, False, 2, 7 * 64, "flow"),      # per-sample renorm groups (n * P)
    ("stg", False, True, 3, 1500, "ddpm"),        # long groups: tiles loop / block per group
    ("cfg", True, True, 1, 2100, "ddpm"),
    ("cfg", True, True, 3, 5 * 64, "ddpm", 8 * 64),  # per-sample groups of a padded bucket (n=5 of 8)
    ("image", True, False, 2, 600, "flow", 1024),
]


def _unpack(case):
    guide_name, renorm, with_noise, groups, group_len, kind = case[:6]
    stride = case[6] if len(case) > 6 else group_len
    return GUIDES[guide_name], renorm, with_noise, groups, group_len, kind, stride


def _expected_padded(out, x, noise, coef_row, guide, renorm, group_len, stride):
    """Oracle on the valid part of every group; padding elements keep their (poison) input."""
    m = op.PASSES[guide]
    valid = lambda t, k: t.reshape(k, -1, stride)[:, :, :group_len].reshape(-1)  # noqa: E731
    return expected_step(valid(out, m), valid(x, 1), None if noise is None else valid(noise, 1), coef_row,
                         4.5, 1.7, 0.6, guide, renorm, group_len)


def _valid(t, group_len, stride):
    return t.reshape(-1, stride)[:, :group_len].reshape(-1)


def _run_and_check(backend, device, dtype, case, step=2):
    guide, renorm, with_noise, groups, group_len, kind, stride = _unpack(case)
    out, x, noise, coef, scales = make_case(guide, groups, stride, dtype, device, kind)
    noise = noise if with_noise else None
    new_x = poison_like(x)
    op.guided_step(out, x, noise, coef, scales, step, guide=guide, renorm=renorm, group_len=group_len,
                   group_stride=stride, new_x=new_x, backend=backend)
    want = _expected_padded(out.cpu(), x.cpu(), None if noise is None else noise.cpu(), coef[step].cpu(), guide,
                            renorm, group_len, stride)
    assert_close(_valid(new_x, group_len, stride).cpu(), want, dtype, f"{backend} {case} {dtype}")
    if stride != group_len and backend != "torch":  # kernels leave padding alone (still NaN)
        assert new_x.reshape(-1, stride)[:, group_len:].isnan().all()
    torch_result = op.guided_step_torch(out, x, noise, coef, scales, step, guide=guide, renorm=renorm,
                                        group_len=group_len, group_stride=stride)
    assert_close(_valid(new_x, group_len, stride), _valid(torch_result, group_len, stride), dtype,
                 f"{backend} vs torch backend {case}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_step_matches_oracle(case):
    _run_and_check("torch", torch.device("cpu"), torch.float32, case)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_step_matches_oracle(triton_device, case, dtype):
    _run_and_check("triton", triton_device, dtype, case)


def _host_call(lib, out, x, noise, new_x, coef, scales, step, group_len, guide, renorm, stride=None):
    stride = stride or group_len
    cuda_host.call(lib, "denoise_guided_step", out, x, noise, new_x, coef, scales, step, x.numel() // stride,
                   group_len, stride, guide, int(renorm), cuda_host.DTYPE_CODES[x.dtype], None)


@pytest.mark.host_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_step_matches_oracle_on_host(case, dtype):
    lib = cuda_host.host_library("denoise_step")
    guide, renorm, with_noise, groups, group_len, kind, stride = _unpack(case)
    out, x, noise, coef, scales = make_case(guide, groups, stride, dtype, "cpu", kind)
    noise = noise if with_noise else None
    new_x = poison_like(x)
    _host_call(lib, out, x, noise, new_x, coef, scales, 1, group_len, guide, renorm, stride)
    want = _expected_padded(out, x, noise, coef[1], guide, renorm, group_len, stride)
    assert_close(_valid(new_x, group_len, stride), want, dtype, f"cuda(host) {case} {dtype}")
    if stride != group_len:
        assert new_x.reshape(-1, stride)[:, group_len:].isnan().all()


@pytest.mark.host_cuda
def test_cuda_step_in_place_and_bad_guide():
    lib = cuda_host.host_library("denoise_step")
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 6, 64, torch.float32, "cpu")
    want = expected_step(out, x, noise, coef[3], 4.5, 1.7, 0.6, op.GUIDE_CFG, True, 64)
    _host_call(lib, out, x, noise, x, coef, scales, 3, 64, op.GUIDE_CFG, True)  # new_x aliases x
    assert_close(x, want, torch.float32, "in place")
    with pytest.raises(RuntimeError, match="CUDA error code"):
        _host_call(lib, out, x, noise, x, coef, scales, 3, 64, 7, True)


@pytest.mark.triton
def test_triton_step_in_place(triton_device):
    out, x, noise, coef, scales = make_case(op.GUIDE_STG, 5, 64, torch.float32, triton_device)
    want = expected_step(out.cpu(), x.cpu(), noise.cpu(), coef[0].cpu(), 4.5, 1.7, 0.6, op.GUIDE_STG, True, 64)
    op.guided_step(out, x, noise, coef, scales, 0, guide=op.GUIDE_STG, renorm=True, group_len=64, new_x=x,
                   backend="triton")
    assert_close(x.cpu(), want, torch.float32, "triton in place")


@pytest.mark.aot
def test_triton_step_aot_compiles_without_spills():
    results = triton_aot.compile_in_subprocess("nova_fast.kernels.denoise_step")
    print("\n" + triton_aot.format_table(results))
    assert {r.arch for r in results} == {80, 90}
    assert triton_aot.problems(results) == []


@pytest.mark.aot
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_step_nvcc_no_spills():
    reports = cuda_host.assert_no_spills(cuda_host.csrc_path("denoise_step"))
    for r in reports:
        print(f"{r.arch} {r.name[:70]:70} regs={r.registers} smem={r.shared_bytes}")
    assert {r.arch for r in reports} == {"sm_80", "sm_90"}
    assert len(reports) == 2 * 3 * 4 * 2  # archs x dtypes x guidance modes x (warp | block per group)


# ---- torch backend on CPU tensors: the hand-written kernel (csrc/cpu/denoise_step.cpp) ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_step_matches_oracle(cpu_kernels_built, case, dtype):
    from nova_fast import backend_info

    guide, renorm, with_noise, groups, group_len, kind, stride = _unpack(case)
    out, x, noise, coef, scales = make_case(guide, groups, stride, dtype, "cpu", kind)
    noise = noise if with_noise else None
    want = _expected_padded(out, x, noise, coef[2], guide, renorm, group_len, stride)
    target = x.clone()
    target.reshape(-1, stride)[:, group_len:] = float("nan")  # padding: left alone, never read
    result = op.guided_step(out, target, noise, coef, scales, 2, guide=guide, renorm=renorm, group_len=group_len,
                            group_stride=stride, new_x=target, backend="torch")
    assert result is target  # in place, as the loop runs it
    assert backend_info()["last_used"]["denoise_tokens"]["path"].startswith("CPU kernel")
    assert_close(_valid(target, group_len, stride), want, dtype, f"cpu kernel {case} {dtype}")
    if stride != group_len:
        assert target.reshape(-1, stride)[:, group_len:].isnan().all()
    fresh = op.guided_step(out, x, noise, coef, scales, 2, guide=guide, renorm=renorm, group_len=group_len,
                           group_stride=stride, backend="torch")
    assert fresh is not x and torch.equal(_valid(fresh, group_len, stride), _valid(target, group_len, stride))


def test_cpu_kernel_step_rejects_bad_layout(cpu_kernels_built):
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 4, 64, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="guide must be 0..3"):
        torch.ops.nova_fast_cpu.guided_step_(out, x, noise, coef, scales, 0, 7, False, 64, 64)
    with pytest.raises(RuntimeError, match="out must hold 2 passes"):
        torch.ops.nova_fast_cpu.guided_step_(out[:64], x, noise, coef, scales, 0, op.GUIDE_CFG, False, 64, 64)
    with pytest.raises(RuntimeError, match="0 <= step < K"):
        torch.ops.nova_fast_cpu.guided_step_(out, x, noise, coef, scales, 4, op.GUIDE_CFG, False, 64, 64)
