"""Fused adaLN modulation: ``LN(x) * (1 + scale) + shift`` (AdaLN-Zero) or ``x * (1 + scale) + shift``
(the Scaling-and-Shift video mixer), one pass over memory.

Shapes: x (B, L, D), or (N, D) read as one sample (1, N, D). scale and shift have x's number of
dimensions and broadcast per sample (B, 1, D) [(1, D) for 2-D x] or per token (B, L, D) [(N, D)].
They may be strided views with unit stride along D (e.g. ``stats.chunk(3, -1)`` of a (B, L, 3D)
projection): they are read in place, never copied. D <= 4096. dtypes fp32, fp16, bf16 (all inputs
the same); statistics in fp32; the output has x's dtype and shape and is contiguous.

Backends (``nova_fast.backends``):
- ``torch``: inference on CPU tensors runs the one-pass kernel ``torch.ops.nova_fast_cpu.modulate``
  (csrc/cpu/adaln.cpp, built on first use by ``nova_fast.cpu_kernels``). Otherwise (training, the
  kernels off with ``NOVA_FAST_CPU_KERNELS=0`` or not buildable) on CPU the math compiled once per
  dtype/layout by ``torch.compile`` (inductor's C++ codegen, one OpenMP loop over rows);
  ``NOVA_FAST_TORCH_COMPILE=0`` runs the same math eagerly; inference calls under 1M elements use
  ATen's layer_norm kernel and one addcmul (``NATIVE_MAX_ELEMENTS``: the compiled call's fixed cost
  dominates there). On other devices the math runs eagerly. ``backend_info()`` names the path.
  Backward: eager torch formulas (``_backward_torch``).
- ``triton``: ``nova_fast.kernels.adaln`` (forward: several rows per program for D <= 1024, one above;
  backward: chunked rows, several at a time).
- ``cuda``: ``nova_fast._C`` (csrc/adaln.cu: 16, 64 or 256 threads per row, so a block holds 16, 4 or
  1 rows; 16-byte loads when aligned).

Autograd: the forward and backward are ``torch.library`` custom ops (``nova_fast::modulate``,
``nova_fast::modulate_backward``) with fake kernels, so the op works under ``torch.compile``.
Without autograd (inference) the public function calls the backend directly.
"""
from __future__ import annotations

import os
import types

import torch
from torch import Tensor

from nova_fast import backends, cpu_kernels
from nova_fast.ops._checks import FLOAT_DTYPES

MAX_D = 4096
OP = "modulate"


# ---------------------------------------------------------------- argument checks
def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_rows(name: str, t, ref: Tensor, *, allow_broadcast: bool) -> None:
    """``t`` matches the row layout of ``ref`` (x): same ndim, dtype, device; (B, 1|L, D) or (1|N, D);
    unit stride along D. Raises with the argument's name."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"mixed dtypes: {name} is {_dtype_name(t.dtype)} but x is {_dtype_name(ref.dtype)}; "
                        "all inputs must have the same dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")
    shape, want = tuple(t.shape), tuple(ref.shape)
    ok = len(shape) == len(want) and shape[-1] == want[-1]
    if ok and len(want) == 3:
        ok = shape[0] == want[0] and (shape[1] == want[1] or (allow_broadcast and shape[1] == 1))
    elif ok:
        ok = shape[0] == want[0] or (allow_broadcast and shape[0] == 1)
    if not ok:
        forms = (f"(B, 1, D) or (B, L, D) = {(want[0], 1, want[-1])} or {want}" if len(want) == 3
                 else f"(1, D) or (N, D) = {(1, want[-1])} or {want}") if allow_broadcast else f"{want}"
        raise ValueError(f"{name} has shape {shape}; expected {forms} to match x {want}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride along D (a strided row view is fine), got strides "
                         f"{t.stride()}")


def check_x(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (B, L, D) or (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype in (float32, float16, bfloat16), got {_dtype_name(x.dtype)}")
    if x.shape[-1] > MAX_D or x.shape[-1] < 1:
        raise ValueError(f"{name}: row length D = {x.shape[-1]} is outside 1..{MAX_D} (the kernels hold a row "
                         "in registers)")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride along D, got strides {x.stride()}")


def as_3d(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- torch backend
_compiled: dict = {}


def compiled(fn, key):
    """``torch.compile(fn)`` for one variant key (dtype, layout flags).

    Each key gets its own copy of ``fn``'s code object: Dynamo keeps its graph cache and recompile
    limit per code object, so the variants never evict each other or fall back to eager. Shapes are
    dynamic: one graph per key serves every (B, L, D).
    """
    f = _compiled.get(key)
    if f is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_v{len(_compiled)}")
        fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        f = _compiled[key] = torch.compile(fresh, dynamic=True, fullgraph=True)
    return f


def use_compile(device) -> bool:
    return device.type == "cpu" and os.environ.get("NOVA_FAST_TORCH_COMPILE", "1") != "0"


# Below this many elements an inference call on CPU runs ATen's own layer_norm kernel and one
# addcmul (2-3 kernels, ~10-100 us) instead of the compiled fused kernel: that kernel is one pass,
# but calling it through torch.compile costs ~80 us of guard and wrapper work, which dominates
# until the rows stop fitting in cache. Measured here (2 cores, fp32, medians): at 64K elements
# native 35-98 us vs compiled 127-155 us; at 1M, 489-1629 us vs 638-1480 us; at 2M the compiled
# kernel wins (modulate 11.5 ms vs 3.1 ms).
NATIVE_MAX_ELEMENTS = 1 << 20


CPU_KERNEL_PATH = "CPU kernel (csrc/cpu): inference on CPU tensors"


def aten_path(t: Tensor, store_stats: bool) -> str:
    """What the torch backend runs when its CPU kernel does not (reported by backend_info)."""
    why = ("training (statistics kept for backward)" if store_stats else
           "not CPU tensors" if t.device.type != "cpu" else cpu_kernels.status()[1])
    if use_native(t, store_stats):
        return f"ATen layer_norm + addcmul ({why})"
    return f"{'torch.compile' if use_compile(t.device) else 'eager'} composition ({why})"


def use_native(t: Tensor, store_stats: bool) -> bool:
    return not store_stats and t.device.type == "cpu" and t.numel() < NATIVE_MAX_ELEMENTS


def _modulate_math(x: Tensor, scale: Tensor, shift: Tensor, eps: float, normalize: bool, store_stats: bool):
    # store_stats=False returns only the output: with mean/rstd as graph outputs inductor splits the
    # row loop into separate passes (x re-read from memory); without them it is one fused loop.
    xf = x.float()
    if normalize:
        # two-pass statistics on the row (in cache): cheaper than Welford and as accurate here
        mean = xf.mean(-1)
        xc = xf - mean.unsqueeze(-1)
        rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
        xf = xc * rstd.unsqueeze(-1)
    else:
        mean, rstd = xf.new_empty(0), xf.new_empty(0)
    out = (xf * (1.0 + scale.float()) + shift.float()).to(x.dtype)
    return (out, mean, rstd) if store_stats else (out,)


def _forward_torch(x, scale, shift, normalize, eps, store_stats):
    # the CPU kernel, where it applies, is called by ``modulate`` itself (on 2-D or 3-D inputs)
    backends.record_path(OP, aten_path(x, store_stats))
    if use_native(x, store_stats):  # small inference call: see NATIVE_MAX_ELEMENTS
        base = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) if normalize else x
        return (torch.addcmul(base + shift, base, scale),)
    if use_compile(x.device):
        key = (OP, x.dtype, normalize, store_stats, x.shape[0] == 1, x.shape[1] == 1, scale.shape[1] == 1,
               shift.shape[1] == 1, x.is_contiguous(), scale.is_contiguous(), shift.is_contiguous())
        with torch.no_grad():
            return compiled(_modulate_math, key)(x, scale, shift, eps, normalize, store_stats)
    return _modulate_math(x, scale, shift, eps, normalize, store_stats)


def _backward_torch(dout, x, scale, mean, rstd, normalize):
    g = dout.float()
    xhat = x.float()
    if normalize:
        xhat = (xhat - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dxhat = g * (1.0 + scale.float())
    if normalize:
        dx = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True) - dxhat.mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    else:
        dx = dxhat
    dscale = g * xhat
    if scale.shape[1] == x.shape[1]:
        return dx.to(x.dtype), dscale.to(x.dtype), None
    return dx.to(x.dtype), dscale.sum(1, keepdim=True).to(x.dtype), g.sum(1, keepdim=True).to(x.dtype)


# ---------------------------------------------------------------- dispatch
def _forward_triton(x, scale, shift, normalize, eps, store_stats):
    from nova_fast.kernels import adaln

    return adaln.modulate_fwd(x, scale, shift, normalize, eps, store_stats)


def _backward_triton(dout, x, scale, mean, rstd, normalize):
    from nova_fast.kernels import adaln

    return adaln.modulate_bwd(dout, x, scale, mean, rstd, normalize)


def _forward_cuda(x, scale, shift, normalize, eps, store_stats):
    return tuple(backends.load_extension().modulate_fwd(x, scale, shift, normalize, eps, store_stats))


def _backward_cuda(dout, x, scale, mean, rstd, normalize):
    dx, dscale, dshift = backends.load_extension().modulate_bwd(dout.contiguous(), x, scale, mean, rstd, normalize)
    return dx, dscale, (dshift if dshift.numel() else None)


FORWARD = {"torch": _forward_torch, "triton": _forward_triton, "cuda": _forward_cuda}
BACKWARD = {"torch": _backward_torch, "triton": _backward_triton, "cuda": _backward_cuda}


# ---------------------------------------------------------------- torch.library registration
@torch.library.custom_op("nova_fast::modulate", mutates_args=())
def modulate_op(x: Tensor, scale: Tensor, shift: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd) for 3-D inputs; mean/rstd fp32 (B, L), empty without normalization."""
    backend = backends.resolve(OP, x.device)
    return FORWARD[backend](x, scale, shift, normalize, eps, True)


@modulate_op.register_fake
def _(x, scale, shift, normalize, eps):
    B, L, D = x.shape
    stats = (B, L) if normalize else (0,)
    return (x.new_empty((B, L, D)), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("nova_fast::modulate_backward", mutates_args=())
def modulate_backward_op(dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                         normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dshift); dshift is empty for per-token statistics (it equals dout)."""
    backend = backends.resolve(OP, x.device)
    dx, dscale, dshift = BACKWARD[backend](dout, x, scale, mean, rstd, normalize)
    return dx, dscale, (x.new_empty(0) if dshift is None else dshift)


@modulate_backward_op.register_fake
def _(dout, x, scale, mean, rstd, normalize):
    per_token = scale.shape[1] == x.shape[1]
    return (x.new_empty(x.shape), x.new_empty(scale.shape),
            x.new_empty(0) if per_token else x.new_empty(scale.shape))


def _setup_context(ctx, inputs, output):
    x, scale, shift, normalize, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift = modulate_backward_op(dout, x, scale, mean, rstd, ctx.normalize)
    if scale.shape[1] == x.shape[1]:
        dshift = dout  # per-token shift: its gradient is the incoming gradient itself
    return dx, dscale, dshift, None, None


modulate_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public op
def modulate(x: Tensor, scale: Tensor, shift: Tensor, *, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """``LN(x) * (1 + scale) + shift`` (normalize=True; LayerNorm without affine, eps) or
    ``x * (1 + scale) + shift`` (normalize=False), fused into one pass.

    x: (B, L, D) or (N, D); scale, shift: (B, 1, D) / (B, L, D) [(1, D) / (N, D) for 2-D x], unit
    stride along D (other strides are read as they are). Same dtype for all (fp32/fp16/bf16); D <= 4096.
    Returns a contiguous tensor shaped and typed like x. Differentiable in x, scale and shift.
    """
    check_x("x", x)
    check_rows("scale", scale, x, allow_broadcast=True)
    check_rows("shift", shift, x, allow_broadcast=True)
    if needs_autograd(x, scale, shift) or torch.compiler.is_compiling():
        out = modulate_op(as_3d(x), as_3d(scale), as_3d(shift), bool(normalize), float(eps))[0]
        return out if x.dim() == 3 else out.squeeze(0)
    # inference: no autograd bookkeeping, no statistics kept
    backend = backends.resolve(OP, x.device)
    if backend == "torch" and cpu_kernels.available_for(x):  # one ATen op, 2-D or 3-D as given
        backends.record_path(OP, CPU_KERNEL_PATH)
        return torch.ops.nova_fast_cpu.modulate(x, scale, shift, float(eps), bool(normalize))
    out = FORWARD[backend](as_3d(x), as_3d(scale), as_3d(shift), bool(normalize), float(eps), False)[0]
    return out if x.dim() == 3 else out.squeeze(0)
