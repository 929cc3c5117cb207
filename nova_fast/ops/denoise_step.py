"""The fused guidance + scheduler step of the denoising loop: ``guided_step``.

One call combines the stacked head passes (classifier-free guidance, optional renorm, optional
third pass: ``nova_fast.guidance_modes``) and applies one row of a scheduler's step table
(``nova_fast.reference.schedulers``: x0 = (c0 x + c1 g) / c2; x_new = c3 x0 + c4 x + c5 noise).

Backends (``nova_fast.backends``, op name ``denoise_tokens``, since this step is that op's only
kernel): ``torch`` (on CPU tensors the one-pass kernel ``torch.ops.nova_fast_cpu.guided_step_`` of
csrc/cpu/denoise_step.cpp, in place; otherwise ``guided_step_torch``), ``triton``
(``nova_fast.kernels.denoise_step``), ``cuda`` (``nova_fast._C.denoise_guided_step``,
csrc/denoise_step.cu). It is also the ``torch.library`` op ``nova_fast::denoise_guided_step``
(fake kernel registered; inference only, no autograd formula).
"""
from __future__ import annotations

from typing import Optional

import torch

from nova_fast import backends, cpu_kernels
from nova_fast.guidance_modes import PASSES as _MODE_PASSES
from nova_fast.guidance_modes import GuideMode
from nova_fast.reference.schedulers import STEP_TABLE_COLUMNS, fold_step_columns

OP = "denoise_tokens"
GUIDE_NONE, GUIDE_CFG, GUIDE_IMAGE, GUIDE_STG = (int(m) for m in GuideMode)
PASSES = {int(mode): passes for mode, passes in _MODE_PASSES.items()}
COEF_COLUMNS = STEP_TABLE_COLUMNS
fold_coefficients = fold_step_columns


def guided_step_torch(out, x, noise, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                      group_stride: int | None = None):
    """The fused step's math in plain PyTorch (fp32 internally); returns the new sample in x.dtype.

    ``out`` (m * G * group_stride) holds the m head passes stacked on the batch axis; ``x`` and
    ``noise`` (G * group_stride) the current sample and the step's noise (or None); ``coef`` the
    (K, 8) step table; ``scales`` = [s, s2, renorm_min] as a device tensor. A renorm group is the
    first ``group_len`` elements of each ``group_stride`` (the rest: bucket padding, returned as is).
    """
    m = PASSES[guide]
    group_stride = group_len if group_stride is None else group_stride
    if guide in (GUIDE_NONE, GUIDE_CFG) and not renorm and x.dtype == torch.float32 and out.dtype == torch.float32:
        return _linear_step_fp32(out, x, noise, coef[step], scales, m)
    if group_stride != group_len:
        result = x.clone()
        view = result.reshape(-1, group_stride)[:, :group_len]
        view.copy_(guided_step_torch(out.reshape(m, -1, group_stride)[:, :, :group_len], view, None if noise is None
                                     else noise.reshape(-1, group_stride)[:, :group_len], coef, scales, step,
                                     guide=guide, renorm=renorm, group_len=group_len))
        return result
    o = out.reshape(m, -1, group_len).float()
    xf = x.reshape(-1, group_len).float()
    s, s2 = scales[0], scales[1]
    o0 = o[0]
    if guide == GUIDE_NONE:
        g = o0
    else:
        g = o[1] + (o0 - (o[2] if guide == GUIDE_IMAGE else o[1])) * s
    if renorm:
        ratio = o0.norm(dim=1, keepdim=True) / g.norm(dim=1, keepdim=True)
        g = g * torch.minimum(torch.maximum(ratio, scales[2]), ratio.new_ones(()))
    if guide == GUIDE_IMAGE:
        g = g + (o[2] - o[1]) * s2
    elif guide == GUIDE_STG:
        g = g + (o0 - o[2]) * s2
    c = coef[step].unbind(0)
    x0 = (xf * c[0] + g * c[1]) / c[2]
    new_x = x0 * c[3] + xf * c[4]
    if noise is not None:
        new_x = new_x + noise.reshape(-1, group_len).float() * c[5]
    return new_x.to(x.dtype).reshape(x.shape)


def _linear_step_fp32(out, x, noise, c, scales, passes: int):
    """No guidance or plain CFG without renorm, fp32: the step is linear in (x, c, u, noise), so
    new_x = c6 x + c7 (u + s (c - u)) + c5 noise with the table's folded columns: four ATen ops
    instead of about thirty (padding rows stay finite: they are never read)."""
    o = out.reshape(passes, *x.shape)
    g = o[0] if passes == 1 else torch.lerp(o[1], o[0], scales[0])
    new_x = torch.addcmul(x * c[6], g, c[7])
    return new_x if noise is None else new_x.addcmul_(noise.reshape(x.shape), c[5])


def steps_in_place(backend: str, x) -> bool:
    """Whether the step kernel updates the sample in place: the kernel backends, and the torch
    backend's CPU kernel (the ATen composition returns a new tensor)."""
    return backend != "torch" or cpu_kernels.available_for(x)


def workspace_floats(backend: str, num_groups: int, group_len: int, renorm: bool) -> int:
    """fp32 elements of the scratch space one step of the ``backend`` kernel needs (partial sums of
    long renorm groups); 0: none (always for ``torch``)."""
    if not renorm or backend == "torch":
        return 0
    if backend == "triton":
        from nova_fast.kernels import denoise_step as kernel

        return kernel.workspace_floats(num_groups, group_len, renorm)
    return int(backends.load_extension().denoise_step_workspace_floats(num_groups, group_len, renorm))


def step_workspace(backend: str, num_groups: int, group_len: int, renorm: bool, device) -> torch.Tensor | None:
    """The scratch space of ``workspace_floats``, allocated once for a whole loop (outside any CUDA
    graph capture, so the captured steps allocate nothing); None when the kernel needs none."""
    floats = workspace_floats(backend, num_groups, group_len, renorm)
    return torch.empty(floats, device=device, dtype=torch.float32) if floats else None


def guided_step(out, x, noise, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                group_stride: int | None = None, new_x=None, backend: str | None = None, workspace=None):
    """One fused guidance + scheduler step on the chosen backend (None: resolve for this call).

    Writes into ``new_x`` when given (kernels may alias it with ``x``: in place), else returns a new
    tensor. ``workspace``: ``step_workspace(...)`` for these sizes (the kernels allocate one per call
    without it). Under ``torch.compile`` it runs as the custom op ``nova_fast::denoise_guided_step``."""
    group_stride = group_len if group_stride is None else group_stride
    if torch.compiler.is_compiling():
        result = guided_step_op(out, x, noise, coef, scales, int(step), int(guide), bool(renorm), int(group_len),
                                int(group_stride))
        return result if new_x is None else new_x.copy_(result)
    if backend is None:
        backend = backends.resolve(OP, x.device)
    if backend == "torch" and cpu_kernels.available_for(out, x) and out.is_contiguous() and x.is_contiguous():
        # CPU tensors: guidance and scheduler step in one pass (csrc/cpu/denoise_step.cpp), in place
        backends.record_path(OP, "CPU kernel (csrc/cpu): fused step on CPU tensors")
        target = x.clone() if new_x is None else (new_x if new_x is x else new_x.copy_(x))
        return torch.ops.nova_fast_cpu.guided_step_(out, target, noise, coef, scales, int(step), int(guide),
                                                   bool(renorm), int(group_len), int(group_stride))
    if backend == "torch":
        backends.record_path(OP, f"ATen composition ({cpu_kernels.status()[1]})")
        result = guided_step_torch(out, x, noise, coef, scales, step, guide=guide, renorm=renorm,
                                   group_len=group_len, group_stride=group_stride)
        return result if new_x is None else new_x.copy_(result)
    new_x = torch.empty_like(x) if new_x is None else new_x
    if backend == "triton":
        from nova_fast.kernels import denoise_step as kernel

        kernel.guided_step(out, x, noise, new_x, coef, scales, step, guide=int(guide), renorm=renorm,
                           group_len=group_len, group_stride=group_stride, workspace=workspace)
    else:
        backends.load_extension().denoise_guided_step(out, x, noise, new_x, coef, scales, step, group_len,
                                                      group_stride, int(guide), renorm, workspace)
    return new_x


@torch.library.custom_op("nova_fast::denoise_guided_step", mutates_args=())
def guided_step_op(out: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor], coef: torch.Tensor,
                   scales: torch.Tensor, step: int, guide: int, renorm: bool, group_len: int,
                   group_stride: int) -> torch.Tensor:
    """The fused step as a torch.library op (inference only: no autograd formula is registered)."""
    return guided_step(out, x, noise, coef, scales, step, guide=guide, renorm=renorm, group_len=group_len,
                       group_stride=group_stride, new_x=torch.empty_like(x), backend=backends.resolve(OP, x.device))


@guided_step_op.register_fake
def _(out, x, noise, coef, scales, step, guide, renorm, group_len, group_stride):
    return torch.empty_like(x)
