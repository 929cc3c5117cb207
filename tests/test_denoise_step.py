"""Kernel-level tests of the fused guidance + scheduler step (kernels/denoise_step.py, csrc/denoise_step.cu).

Each backend (Triton under the interpreter, CUDA C++ through the host SIMT harness) is compared
with an independent float64 evaluation of the formulas written out step by step below, and with
the op's torch backend; outputs are poisoned so unwritten elements fail.
"""
import ctypes
import shutil

import pytest
import torch

from conftest import assert_close, poison_like
from nova_fast.ops import denoise_tokens as op
from nova_fast.testing import cuda_host, triton_aot

# Low enough that the renorm ratio (about 0.15 at s = 4.5 on random passes) is rarely clamped: the
# results then depend on both norms, so a wrong partial sum fails.
RENORM_MIN = 0.1
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
    scales = torch.tensor([4.5, 1.7, RENORM_MIN])
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
    # groups longer than the split chunk (Triton SPLIT_CHUNK 4096, CUDA 8192): several programs per group
    ("cfg", True, True, 2, 9000, "ddpm"),
    ("stg", False, True, 1, 8300, "flow"),
    ("image", True, False, 2, 8250, "flow", 8800),  # padded bucket, ragged last chunk
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
                         4.5, 1.7, RENORM_MIN, guide, renorm, group_len)


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


def _host_call(lib, out, x, noise, new_x, coef, scales, step, group_len, guide, renorm, stride=None,
               workspace=True):
    """The C launcher as the binding calls it: with a (NaN-poisoned) workspace of the size the launcher
    asks for; workspace=False: the workspace-less entry point."""
    stride = stride or group_len
    groups = x.numel() // stride
    if not workspace:
        cuda_host.call(lib, "denoise_guided_step", out, x, noise, new_x, coef, scales, step, groups,
                       group_len, stride, guide, int(renorm), cuda_host.DTYPE_CODES[x.dtype], None)
        return
    lib.denoise_step_workspace_floats.restype = ctypes.c_int
    floats = lib.denoise_step_workspace_floats(groups, group_len, int(renorm))
    ws = torch.full((floats,), float("nan")) if floats else None
    cuda_host.call(lib, "denoise_guided_step_ws", out, x, noise, new_x, coef, scales, ws, step, groups,
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
def test_cuda_step_long_renorm_group_without_workspace():
    """The workspace-less C entry point: long renorm groups take one block each, same result."""
    lib = cuda_host.host_library("denoise_step")
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 2, 9000, torch.float32, "cpu")
    new_x = poison_like(x)
    _host_call(lib, out, x, noise, new_x, coef, scales, 1, 9000, op.GUIDE_CFG, True, workspace=False)
    assert_close(new_x, expected_step(out, x, noise, coef[1], 4.5, 1.7, RENORM_MIN, op.GUIDE_CFG, True, 9000),
                 torch.float32, "no workspace")


@pytest.mark.host_cuda
def test_cuda_step_in_place_and_bad_guide():
    lib = cuda_host.host_library("denoise_step")
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 6, 64, torch.float32, "cpu")
    want = expected_step(out, x, noise, coef[3], 4.5, 1.7, RENORM_MIN, op.GUIDE_CFG, True, 64)
    _host_call(lib, out, x, noise, x, coef, scales, 3, 64, op.GUIDE_CFG, True)  # new_x aliases x
    assert_close(x, want, torch.float32, "in place")
    with pytest.raises(RuntimeError, match="CUDA error code"):
        _host_call(lib, out, x, noise, x, coef, scales, 3, 64, 7, True)


@pytest.mark.triton
def test_triton_step_in_place(triton_device):
    out, x, noise, coef, scales = make_case(op.GUIDE_STG, 5, 64, torch.float32, triton_device)
    want = expected_step(out.cpu(), x.cpu(), noise.cpu(), coef[0].cpu(), 4.5, 1.7, RENORM_MIN, op.GUIDE_STG, True, 64)
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
    # archs x dtypes x guidance modes x (warp | block per group | split partials | split step)
    assert len(reports) == 2 * 3 * 4 * 4


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


# ---- renorm with both norms zero: NaN, as the reference gives ----
def _zero_norm_case(groups, group_len, device="cpu"):
    """cfg + renorm where group 1 has o0 = o1 = 0 (both renorm norms 0); other groups random."""
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, groups, group_len, torch.float32, device)
    out.view(2, groups, group_len)[:, 1] = 0.0
    return out, x, noise, coef, scales


def _check_zero_norm_result(new_x, out, x, noise, coef_row, groups, group_len, what):
    from nova_fast.reference.guidance import renorm as reference_renorm

    cond = out.view(2, groups, group_len)[0, 1:2].cpu()
    assert reference_renorm(cond.clone(), cond, 0.6).isnan().all()  # the reference: 0 * (0 / 0) = NaN
    got = new_x.view(groups, group_len).cpu()
    assert got[1].isnan().all(), f"{what}: a group with both renorm norms 0 must give NaN, as the reference"
    want = expected_step(out.cpu(), x.cpu(), None if noise is None else noise.cpu(), coef_row.cpu(), 4.5, 1.7,
                         RENORM_MIN, op.GUIDE_CFG, True, group_len).view(groups, group_len)
    keep = [0] + list(range(2, groups))
    assert_close(got[keep], want[keep], torch.float32, f"{what}: other groups")


ZERO_NORM_SHAPES = [(3, 64), (3, 600), (3, 9000)]  # warp / block per group, split over programs / blocks


@pytest.mark.parametrize("groups,group_len", ZERO_NORM_SHAPES)
def test_zero_norm_group_gives_nan_torch_and_cpu_kernel(cpu_kernels_built, groups, group_len):
    out, x, noise, coef, scales = _zero_norm_case(groups, group_len)
    ref = op.guided_step_torch(out, x, noise, coef, scales, 1, guide=op.GUIDE_CFG, renorm=True, group_len=group_len)
    _check_zero_norm_result(ref, out, x, noise, coef[1], groups, group_len, "torch composition")
    target = x.clone()
    op.guided_step(out, target, noise, coef, scales, 1, guide=op.GUIDE_CFG, renorm=True, group_len=group_len,
                   new_x=target, backend="torch")
    _check_zero_norm_result(target, out, x, noise, coef[1], groups, group_len, "CPU kernel")


@pytest.mark.triton
@pytest.mark.parametrize("groups,group_len", ZERO_NORM_SHAPES)
def test_zero_norm_group_gives_nan_triton(triton_device, groups, group_len):
    out, x, noise, coef, scales = _zero_norm_case(groups, group_len, triton_device)
    new_x = torch.zeros_like(x)
    op.guided_step(out, x, noise, coef, scales, 1, guide=op.GUIDE_CFG, renorm=True, group_len=group_len,
                   new_x=new_x, backend="triton")
    _check_zero_norm_result(new_x, out, x, noise, coef[1], groups, group_len, "triton")


@pytest.mark.host_cuda
@pytest.mark.parametrize("workspace", [True, False])
@pytest.mark.parametrize("groups,group_len", ZERO_NORM_SHAPES)
def test_zero_norm_group_gives_nan_cuda_on_host(groups, group_len, workspace):
    lib = cuda_host.host_library("denoise_step")
    out, x, noise, coef, scales = _zero_norm_case(groups, group_len)
    new_x = torch.zeros_like(x)
    _host_call(lib, out, x, noise, new_x, coef, scales, 1, group_len, op.GUIDE_CFG, True, workspace=workspace)
    _check_zero_norm_result(new_x, out, x, noise, coef[1], groups, group_len, "cuda(host)")


# ---- offsets past 2^31 elements: the third pass of a 2^30-element sample ----
LARGE_PASS_SCRIPT = r"""
import sys
import torch
from nova_fast.ops import denoise_tokens as op
backend, P, stride = sys.argv[1], 64, 1 << 30  # one group; pass 2 starts at 2^31 elements
try:  # address space only: untouched pages are never backed
    out = torch.empty(3 * stride, dtype=torch.float16)
    x = torch.empty(stride, dtype=torch.float16)
except RuntimeError as e:
    print("NO-ADDRESS-SPACE", e)
    sys.exit(3)
g = torch.Generator().manual_seed(0)
for j in range(3):
    out[j * stride:j * stride + P] = torch.randn(P, generator=g).half()
x[:P] = torch.randn(P, generator=g).half()
x_before = x[:P].clone()
coef = op.fold_coefficients(torch.tensor([[1.0, -0.5, 0.8, 0.3, 0.6, 0.1, 0, 0]]))
scales = torch.tensor([4.5, 1.7, 0.6])
if backend == "triton":
    from nova_fast.kernels import denoise_step as kernel
    kernel.guided_step(out, x, None, x, coef, scales, 0, guide=op.GUIDE_IMAGE, renorm=True, group_len=P,
                       group_stride=stride)
else:
    from nova_fast.testing import cuda_host
    cuda_host.call(cuda_host.host_library("denoise_step"), "denoise_guided_step_ws", out, x, None, x, coef, scales,
                   None, 0, 1, P, stride, op.GUIDE_IMAGE, 1, cuda_host.DTYPE_CODES[torch.float16], None)
passes = torch.stack([out[j * stride:j * stride + P] for j in range(3)]).reshape(-1)
want = op.guided_step_torch(passes, x_before, None, coef, scales, 0, guide=op.GUIDE_IMAGE, renorm=True, group_len=P)
torch.testing.assert_close(x[:P].float(), want.float(), rtol=1e-2, atol=1e-2)
print("LARGE-PASS-OK")
"""


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton),
                                     pytest.param("cuda_host", marks=pytest.mark.host_cuda)])
def test_third_pass_beyond_2_31_elements(backend):
    """pass_stride = 2^30: the third pass starts at element 2^31 (an i32 2 * pass_stride wraps and
    reads outside the buffer). Runs in a subprocess (a wrong offset segfaults) on 8 GiB of address
    space of which a few pages are touched; the Triton kernel runs under the interpreter."""
    import os
    import subprocess
    import sys

    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter check (CPU tensors)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", LARGE_PASS_SCRIPT, backend], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cuda_host.REPO_ROOT)
    if proc.returncode == 3 and "NO-ADDRESS-SPACE" in proc.stdout:
        pytest.skip(f"this machine refuses 8 GiB of address space: {proc.stdout.strip()}")
    assert proc.returncode == 0 and "LARGE-PASS-OK" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


# ---- layouts the kernels refuse; launch grids at large sizes ----
@pytest.mark.triton
def test_triton_step_refuses_non_contiguous_naming_the_argument(triton_device):
    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 4, 64, torch.float32, triton_device)

    def strided(t):  # same values, every other element of a twice-as-long buffer
        s = torch.empty(2 * t.numel(), device=t.device, dtype=t.dtype)[::2]
        return s.copy_(t)

    from nova_fast.kernels import denoise_step as kernel

    args = dict(out=out, x=x, noise=noise, new_x=torch.empty_like(x))
    for name in args:
        bad = dict(args, **{name: strided(args[name])})
        with pytest.raises(ValueError, match=f"{name} must be contiguous"):
            kernel.guided_step(bad["out"], bad["x"], bad["noise"], bad["new_x"], coef, scales, 0, guide=op.GUIDE_CFG,
                               renorm=True, group_len=64)


GRID_X_MAX = 2**31 - 1


@pytest.mark.triton
@pytest.mark.parametrize("num_groups,group_len", [(10**6, 64), (2, 10**8), (4096, 400_000), (10**7, 200)])
def test_triton_step_grids_within_limits(num_groups, group_len):
    from nova_fast.kernels import denoise_step as kernel

    for renorm in (True, False):
        launches = kernel.launch_grids(num_groups, group_len, renorm)
        for name, grid in launches:
            assert len(grid) == 1 and 1 <= grid[0] <= GRID_X_MAX, (name, grid)
        # every element is covered: programs x elements per program >= the work
        if launches[-1][0] == "guided_step_split_kernel":
            assert launches[-1][1][0] * kernel.SPLIT_CHUNK >= num_groups * group_len
            assert launches[-1][1][0] >= num_groups  # no per-sample serialization


@pytest.mark.host_cuda
@pytest.mark.parametrize("num_groups,group_len", [(10**6, 64), (2, 10**8), (4096, 400_000), (10**7, 200)])
def test_cuda_step_launch_plan_within_limits(num_groups, group_len):
    """The launches the C launcher would make, computed without launching: 1-D grids within CUDA's
    limit, long groups split over blocks (more blocks than groups)."""
    lib = cuda_host.host_library("denoise_step")
    kind, grid, threads = (ctypes.c_int * 2)(), (ctypes.c_longlong * 2)(), (ctypes.c_int * 2)()
    for renorm in (1, 0):
        n = lib.denoise_step_launch_plan(num_groups, group_len, renorm, 1, kind, grid, threads)
        assert n == (2 if renorm and group_len > 8192 else 1)
        for i in range(n):
            assert 1 <= grid[i] <= GRID_X_MAX and threads[i] in (128, 256)
        if group_len > 8192:
            assert grid[n - 1] >= num_groups * (group_len // 8192)


@pytest.mark.triton
def test_triton_step_with_caller_workspace(triton_device):
    """A workspace allocated once by the caller (e.g. before a captured loop) gives the same step;
    a too-small one is refused by name."""
    from nova_fast.kernels import denoise_step as kernel

    out, x, noise, coef, scales = make_case(op.GUIDE_CFG, 2, 9000, torch.float32, triton_device)
    need = kernel.workspace_floats(2, 9000, True)
    assert need == 2 * 2 * kernel.split_chunks(9000) > 0 and kernel.workspace_floats(2, 9000, False) == 0
    ws = torch.full((need,), float("nan"), device=triton_device)
    got = kernel.guided_step(out, x, noise, poison_like(x), coef, scales, 1, guide=op.GUIDE_CFG, renorm=True,
                             group_len=9000, workspace=ws)
    want = expected_step(out.cpu(), x.cpu(), noise.cpu(), coef[1].cpu(), 4.5, 1.7, RENORM_MIN, op.GUIDE_CFG, True,
                         9000)
    assert_close(got.cpu(), want, torch.float32, "caller workspace")
    assert torch.isfinite(ws).all()  # the partial sums went there
    with pytest.raises(ValueError, match="workspace must be"):
        kernel.guided_step(out, x, noise, torch.empty_like(x), coef, scales, 1, guide=op.GUIDE_CFG, renorm=True,
                           group_len=9000, workspace=ws[:need - 1])
