"""Fused post-norm residual: ``x + gate * (LN(y) * weight + bias)`` in one pass over memory.

The gated form is the residual after each diffusion-head block (gate = the third adaLN statistic);
without gate (gate = 1) it is the post-norm residual after every encoder sub-layer.

Shapes: x, y (B, L, D), or (N, D) read as one sample; gate (B, 1, D) or (B, L, D) [(1, D) or (N, D)
for 2-D inputs], possibly a strided view with unit stride along D (a chunk of the adaLN projection,
read in place); weight, bias (D,). D <= 4096. dtypes fp32, fp16, bf16, all the same; statistics in
fp32. The output has x's shape and dtype; contiguous, or x itself with ``inplace=True``.

In place: ``inplace=True`` writes the result into x and returns x. It is for inference: it raises
if autograd would need to record the op (grad mode on and any input requiring grad).

Backends: ``torch`` (inference on CPU tensors: the one-pass kernels
``torch.ops.nova_fast_cpu.residual_norm`` / ``residual_norm_`` of csrc/cpu/adaln.cpp; otherwise on
CPU the math compiled once per dtype/layout by ``torch.compile``, ``NOVA_FAST_TORCH_COMPILE=0`` for
eager, inference calls under 1M elements ATen's layer_norm and one add, see ``modulate``; other
devices: eager; backward: eager torch formulas),
``triton`` (``nova_fast.kernels.adaln``), ``cuda`` (``nova_fast._C``, csrc/adaln.cu). Autograd via the
``torch.library`` custom ops ``nova_fast::residual_norm`` / ``nova_fast::residual_norm_backward``; the
in-place form is ``nova_fast::residual_norm_`` (mutates x, no autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nova_fast import backends, cpu_kernels
from nova_fast.ops.modulate import (CPU_KERNEL_PATH, aten_path, as_3d, check_rows, check_x, compiled, needs_autograd,
                                    use_compile, use_native)

OP = "residual_norm"


def check_vector(name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"mixed dtypes: {name} is {str(t.dtype).replace('torch.', '')} but x is "
                        f"{str(x.dtype).replace('torch.', '')}; all inputs must have the same dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != (x.shape[-1],):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (D,) = ({x.shape[-1]},)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


# ---------------------------------------------------------------- torch backend
def _residual_norm_math(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gate: Optional[Tensor], eps: float,
                        store_stats: bool):
    # store_stats=False returns only the output, which inductor fuses into one loop (see modulate)
    yf = y.float()
    mean = yf.mean(-1)
    yc = yf - mean.unsqueeze(-1)
    rstd = torch.rsqrt((yc * yc).mean(-1) + eps)
    branch = yc * rstd.unsqueeze(-1) * weight.float() + bias.float()
    if gate is not None:
        branch = branch * gate.float()
    out = (x.float() + branch).to(x.dtype)
    return (out, mean, rstd) if store_stats else (out,)


def _residual_norm_inplace_math(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gate: Optional[Tensor],
                                eps: float):
    # compiled, the input mutation becomes the kernel's store into x: still one pass
    x.copy_(_residual_norm_math(x, y, weight, bias, gate, eps, False)[0])


def _forward_native(x, y, weight, bias, gate, eps, out=None):
    """Small inference calls on CPU: ATen's layer_norm kernel and one add (see NATIVE_MAX_ELEMENTS)."""
    branch = torch.nn.functional.layer_norm(y, y.shape[-1:], weight, bias, eps)
    if out is x:
        return (x.add_(branch) if gate is None else x.addcmul_(gate, branch)),
    result = x + branch if gate is None else torch.addcmul(x, gate, branch)
    return (result,) if out is None else (out.copy_(result),)


def _forward_cpu_kernel(x, y, weight, bias, gate, eps, inplace: bool):
    """The one-pass CPU kernel (csrc/cpu/adaln.cpp): one ATen op, 2-D or 3-D inputs as given."""
    backends.record_path(OP, CPU_KERNEL_PATH)
    kernel = torch.ops.nova_fast_cpu.residual_norm_ if inplace else torch.ops.nova_fast_cpu.residual_norm
    return kernel(x, y, weight, bias, gate, float(eps))


def _forward_torch(x, y, weight, bias, gate, eps, store_stats, out=None):
    if not store_stats and cpu_kernels.available_for(x, y):  # reached here from the compiled in-place op
        result = _forward_cpu_kernel(x, y, weight, bias, gate, eps, inplace=out is x)
        return (result,) if out is None or out is x else (out.copy_(result),)
    backends.record_path(OP, aten_path(y, store_stats))
    if use_native(y, store_stats):
        return _forward_native(x, y, weight, bias, gate, eps, out)
    if out is x and use_compile(y.device):
        key = (OP + "_", y.dtype, gate is None, y.shape[0] == 1, y.shape[1] == 1,
               gate is not None and gate.shape[1] == 1, x.is_contiguous(), y.is_contiguous(),
               gate is None or gate.is_contiguous())
        with torch.no_grad():
            compiled(_residual_norm_inplace_math, key)(x, y, weight, bias, gate, eps)
        return x, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)
    if use_compile(y.device):
        key = (OP, y.dtype, gate is None, store_stats, y.shape[0] == 1, y.shape[1] == 1, gate is not None and gate.shape[1] == 1,
               x.is_contiguous(), y.is_contiguous(), gate is None or gate.is_contiguous())
        with torch.no_grad():
            result = compiled(_residual_norm_math, key)(x, y, weight, bias, gate, eps, store_stats)
    else:
        result = _residual_norm_math(x, y, weight, bias, gate, eps, store_stats)
    if out is not None:
        out.copy_(result[0])
        return (out,) + tuple(result[1:])
    return result


def _backward_torch(dout, y, weight, bias, gate, mean, rstd):
    g = dout.float()
    yhat = (y.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dgate = None
    if gate is not None:
        dgate = g * (yhat * weight.float() + bias.float())
        dgate = (dgate if gate.shape[1] == y.shape[1] else dgate.sum(1, keepdim=True)).to(y.dtype)
        g = g * gate.float()
    dweight = (g * yhat).sum((0, 1)).to(weight.dtype)
    dbias = g.sum((0, 1)).to(bias.dtype)
    dyhat = g * weight.float()
    dy = (dyhat - yhat * (dyhat * yhat).mean(-1, keepdim=True) - dyhat.mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    return dy.to(y.dtype), dweight, dbias, dgate


# ---------------------------------------------------------------- dispatch
def _forward_triton(x, y, weight, bias, gate, eps, store_stats, out=None):
    from nova_fast.kernels import adaln

    return adaln.residual_norm_fwd(x, y, weight, bias, gate, eps, store_stats, out)


def _backward_triton(dout, y, weight, bias, gate, mean, rstd):
    from nova_fast.kernels import adaln

    return adaln.residual_norm_bwd(dout, y, weight, bias, gate, mean, rstd)


def _forward_cuda(x, y, weight, bias, gate, eps, store_stats, out=None):
    return tuple(backends.load_extension().residual_norm_fwd(x, y, weight, bias, gate, eps, store_stats, out))


def _backward_cuda(dout, y, weight, bias, gate, mean, rstd):
    return tuple(backends.load_extension().residual_norm_bwd(dout.contiguous(), y, weight, bias, gate, mean, rstd))


FORWARD = {"torch": _forward_torch, "triton": _forward_triton, "cuda": _forward_cuda}
BACKWARD = {"torch": _backward_torch, "triton": _backward_triton, "cuda": _backward_cuda}


# ---------------------------------------------------------------- torch.library registration
@torch.library.custom_op("nova_fast::residual_norm", mutates_args=())
def residual_norm_op(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gate: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd) for 3-D inputs; mean/rstd are fp32 (B, L) statistics of y."""
    backend = backends.resolve(OP, y.device)
    return FORWARD[backend](x, y, weight, bias, gate, eps, True)


@residual_norm_op.register_fake
def _(x, y, weight, bias, gate, eps):
    B, L, D = y.shape
    return (y.new_empty((B, L, D)), y.new_empty((B, L), dtype=torch.float32),
            y.new_empty((B, L), dtype=torch.float32))


@torch.library.custom_op("nova_fast::residual_norm_", mutates_args=("x",))
def residual_norm_inplace_op(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gate: Optional[Tensor],
                             eps: float) -> None:
    """x += gate * (LN(y) * weight + bias), in place (inference only)."""
    backend = backends.resolve(OP, y.device)
    FORWARD[backend](x, y, weight, bias, gate, eps, False, x)


@residual_norm_inplace_op.register_fake
def _(x, y, weight, bias, gate, eps):
    return None


@torch.library.custom_op("nova_fast::residual_norm_backward", mutates_args=())
def residual_norm_backward_op(dout: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gate: Optional[Tensor],
                              mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dy, dweight, dbias, dgate); dgate is empty without gate. d x is dout itself."""
    backend = backends.resolve(OP, y.device)
    dy, dweight, dbias, dgate = BACKWARD[backend](dout, y, weight, bias, gate, mean, rstd)
    return dy, dweight, dbias, (y.new_empty(0) if dgate is None else dgate)


@residual_norm_backward_op.register_fake
def _(dout, y, weight, bias, gate, mean, rstd):
    return (y.new_empty(y.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            y.new_empty(0) if gate is None else y.new_empty(gate.shape))


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, gate, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(y, weight, bias, gate, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    y, weight, bias, gate, mean, rstd = ctx.saved_tensors
    dy, dweight, dbias, dgate = residual_norm_backward_op(dout, y, weight, bias, gate, mean, rstd)
    return dout, dy, dweight, dbias, (dgate if gate is not None else None), None


residual_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public op
def residual_norm(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, *, gate: Optional[Tensor] = None,
                  eps: float = 1e-5, inplace: bool = False) -> Tensor:
    """``x + gate * (LN(y) * weight + bias)`` (gate=None: gate = 1), fused into one pass.

    x, y: (B, L, D) or (N, D), same shape; gate: (B, 1, D) / (B, L, D) [(1, D) / (N, D) for 2-D];
    weight, bias: (D,). Same dtype for all (fp32/fp16/bf16), D <= 4096, unit stride along D (row
    strides are read as they are). ``inplace=True`` writes into x and returns it (no autograd).
    Differentiable in x, y, weight, bias and gate otherwise.
    """
    check_x("x", x)
    check_rows("y", y, x, allow_broadcast=False)
    check_vector("weight", weight, x)
    check_vector("bias", bias, x)
    if gate is not None:
        check_rows("gate", gate, x, allow_broadcast=True)
    grad = needs_autograd(x, y, weight, bias, gate)
    compiling = torch.compiler.is_compiling()
    if inplace:
        if grad:
            raise RuntimeError("residual_norm(inplace=True) is for inference: an input requires grad; use "
                               "inplace=False under autograd (or torch.no_grad())")
        if any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
            raise ValueError(f"residual_norm(inplace=True): x is a broadcast view (strides {x.stride()}); "
                             "it cannot be written in place")
    # resolved once per call (the custom ops resolve for themselves under autograd / compile)
    backend = None if (grad or compiling) else backends.resolve(OP, x.device)
    if backend == "torch" and cpu_kernels.available_for(x, y):
        return _forward_cpu_kernel(x, y, weight, bias, gate, eps, inplace)  # no reshapes around it
    x3, y3, gate3 = as_3d(x), as_3d(y), (None if gate is None else as_3d(gate))
    if inplace:
        if compiling:
            residual_norm_inplace_op(x3, y3, weight, bias, gate3, float(eps))
        else:
            FORWARD[backend](x3, y3, weight, bias, gate3, float(eps), False, x3)
        return x
    if grad or compiling:
        out = residual_norm_op(x3, y3, weight, bias, gate3, float(eps))[0]
    else:  # inference: no autograd bookkeeping, no statistics kept
        out = FORWARD[backend](x3, y3, weight, bias, gate3, float(eps), False)[0]
    return out if x.dim() == 3 else out.squeeze(0)
