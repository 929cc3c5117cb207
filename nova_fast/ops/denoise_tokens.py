"""Batched diffusion-head denoising of the predicted tokens (issue 7): ``denoise_tokens``.

The reference runs, for every denoising step, the head on the whole latent canvas: patch-embeds
all L tokens to gather the n predicted ones, recomputes the condition projection, scatters back,
combines guidance and steps the scheduler over the full canvas. ``denoise_tokens`` does the same
math on the n tokens only:

- before the loop (on the device, no host round trip inside it): the scheduler's per-step
  coefficients as a (K, 8) table, the guidance scales as a 3-vector, the time embeddings of all K
  timesteps in one batched call, the condition projection once, the DDPM noise of every step
  (drawn canvas-shaped from the caller's generator in the reference's order, then gathered);
- per step: one GEMM for the adaLN statistics of all blocks and the final norm (computed ahead
  for several steps at once where memory allows), the patch embedding of the n tokens, per block
  ``modulate`` -> Linear -> SiLU -> Linear -> ``residual_norm`` (gated, in place), the final
  modulate and Linear, then one fused kernel: guidance (plain, renorm, truncation, third pass)
  and the scheduler update (flow Euler or DDPM);
- on CUDA tensors the K-step loop is captured once per (token bucket, batch, dtype, plan) into a
  CUDA graph and replayed (``cuda_graphs=True``); on CPU the same code runs eagerly.

Backends for the fused step (``nova_fast.backends``, op name ``denoise_tokens``): ``torch`` (on
CPU tensors the one-pass kernel ``torch.ops.nova_fast_cpu.guided_step_`` of
csrc/cpu/denoise_step.cpp, in place; otherwise ``guided_step_torch``), ``triton``
(``nova_fast.kernels.denoise_step``), ``cuda`` (``nova_fast._C.denoise_guided_step``,
csrc/denoise_step.cu). The adaLN ops dispatch themselves.
The step is also the ``torch.library`` op ``nova_fast::denoise_guided_step`` (fake kernel
registered; inference only, no autograd formula). The whole op is inference-only (no_grad).

Hook point for ``nova_fast.accelerate``: the reference's per-AR-step denoise method holds the
spatial-encoder outputs at the predicted tokens (guidance-expanded: ``z``), the noise canvas
(``noise``, B x C x H x W), the guidance-expanded ``pred_ids``, the scheduler, the guidance object
and the generator; it returns the canvas tokens (B, L, P) of which the caller keeps the predicted
positions. A patched method calls ``denoise_tokens(head, z, noise, scheduler, guidance,
generator=generator, pred_ids=pred_ids)`` and scatters the (B, n, P) result at ``pred_ids[:B]``
into a zero (B, L, P) canvas (the caller masks every other position away).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from nova_fast import backends, cpu_kernels
from nova_fast.ops._checks import check_tensor

OP = "denoise_tokens"
GUIDE_NONE, GUIDE_CFG, GUIDE_IMAGE, GUIDE_STG = 0, 1, 2, 3
PASSES = {GUIDE_NONE: 1, GUIDE_CFG: 2, GUIDE_IMAGE: 3, GUIDE_STG: 3}
COEF_COLUMNS = 8
# Order of the AdaLNZero statistics in its projection's output chunks: (scale, shift, gate).
ADALN_ORDER = (0, 1, 2)
# The adaLN statistics of several steps are computed in one GEMM, up to this many bytes at once.
PRECOMPUTE_BYTES = 256 << 20
# Guidance renorm norms: over one sample's predicted tokens (False) or over each token (True).
RENORM_PER_TOKEN = False


def guided_step_torch(out, x, noise, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                      group_stride: int | None = None):
    """The fused step's math in plain PyTorch (fp32 internally); returns the new sample in x.dtype.

    ``out`` (m * G * group_stride) holds the m head passes stacked on the batch axis; ``x`` and
    ``noise`` (G * group_stride) the current sample and the step's noise (or None); ``coef`` the
    (K, 8) table; ``scales`` = [s, s2, renorm_min] as a device tensor. A renorm group is the first
    ``group_len`` elements of each ``group_stride`` (the rest: bucket padding, returned as is).
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
    new_x = A x + B (u + s (c - u)) + c5 noise with A, B folded into the table's columns 6 and 7:
    four ATen ops instead of about thirty (padding rows stay finite: they are never read). The table
    must carry those columns: ``fold_coefficients`` (``scheduler_table`` calls it)."""
    o = out.reshape(passes, *x.shape)
    g = o[0] if passes == 1 else torch.lerp(o[1], o[0], scales[0])
    new_x = torch.addcmul(x * c[6], g, c[7])
    return new_x if noise is None else new_x.addcmul_(noise.reshape(x.shape), c[5])


def steps_in_place(backend: str, x) -> bool:
    """Whether the loop's step kernel updates the sample in place: the kernel backends, and the
    torch backend's CPU kernel (the ATen composition returns a new tensor)."""
    return backend != "torch" or cpu_kernels.available_for(x)


def guided_step(out, x, noise, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                group_stride: int | None = None, new_x=None, backend: str | None = None):
    """One fused guidance + scheduler step on the chosen backend (None: resolve for this call).

    Writes into ``new_x`` when given (kernels may alias it with ``x``: in place), else returns a new
    tensor. Under ``torch.compile`` it runs as the custom op ``nova_fast::denoise_guided_step``."""
    if torch.compiler.is_compiling():
        result = guided_step_op(out, x, noise, coef, scales, int(step), int(guide), bool(renorm), int(group_len),
                                int(group_len if group_stride is None else group_stride))
        return result if new_x is None else new_x.copy_(result)
    if backend is None:
        backend = backends.resolve(OP, x.device)
    if backend == "torch" and cpu_kernels.available_for(out, x) and out.is_contiguous() and x.is_contiguous():
        # CPU tensors: guidance and scheduler step in one pass (csrc/cpu/denoise_step.cpp), in place
        backends.record_path(OP, "CPU kernel (csrc/cpu): fused step on CPU tensors")
        target = x.clone() if new_x is None else (new_x if new_x is x else new_x.copy_(x))
        return torch.ops.nova_fast_cpu.guided_step_(out, target, noise, coef, scales, int(step), int(guide),
                                                   bool(renorm), int(group_len),
                                                   int(group_len if group_stride is None else group_stride))
    if backend == "torch":
        backends.record_path(OP, f"ATen composition ({cpu_kernels.status()[1]})")
        result = guided_step_torch(out, x, noise, coef, scales, step, guide=guide, renorm=renorm,
                                   group_len=group_len, group_stride=group_stride)
        if new_x is None:
            return result
        return new_x.copy_(result)
    new_x = torch.empty_like(x) if new_x is None else new_x
    if backend == "triton":
        from nova_fast.kernels import denoise_step as kernel

        kernel.guided_step(out, x, noise, new_x, coef, scales, step, guide=guide, renorm=renorm, group_len=group_len,
                           group_stride=group_stride)
    else:
        backends.load_extension().denoise_guided_step(out, x, noise, new_x, coef, scales, step, group_len,
                                                      group_len if group_stride is None else group_stride, guide,
                                                      renorm)
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


# ---------------------------------------------------------------------------------------------
# The head, arranged for the loop (weights prepared once per head and kept while unchanged)
# ---------------------------------------------------------------------------------------------
class HeadWeights:
    """A DiffusionMLP's parameters in loop form. Rows are kept 3-D (1, R, F) so every Linear is one
    ``baddbmm(bias, x, W^T)`` and the adaLN ops take them without reshapes (no view ops in the
    loop); the patch-embedding Conv2d becomes a (P, W) matrix in patchify order (ph, pw, c); the
    adaLN projections of all blocks and of the final norm are concatenated into one (W, S) matrix,
    since they all read the same ``SiLU(cond)``: one GEMM per step instead of depth + 1."""

    def __init__(self, head):
        conv = head.patch_embed.proj
        width, channels, patch, _ = conv.weight.shape
        self.width, self.channels, self.patch = width, channels, patch
        self.token_dim = patch * patch * channels
        self.dtype, self.device = conv.weight.dtype, conv.weight.device
        self.cond_dim = head.time_cond_embed.condition_proj.fc1.in_features

        def linear(module):  # (W^T as a (1, in, out) view, bias)
            return module.weight.detach().t().unsqueeze(0), module.bias.detach()

        embed = patch_embed_matrix(conv).detach()
        self.embed_wt, self.embed_b = embed.t().unsqueeze(0), conv.bias.detach()
        adaln = [blk.norm1 for blk in head.blocks] + [head.norm]
        self.ada_wt = torch.cat([a.proj.weight.detach() for a in adaln], 0).t().contiguous().unsqueeze(0)
        self.ada_b = torch.cat([a.proj.bias.detach() for a in adaln], 0)
        self.ada_eps = [float(a.eps) for a in adaln]
        self.blocks = [(*linear(blk.proj.fc1), *linear(blk.proj.fc2), blk.norm2.weight.detach(),
                        blk.norm2.bias.detach(), float(blk.norm2.eps)) for blk in head.blocks]
        self.head_wt, self.head_b = linear(head.head)
        self.depth = len(self.blocks)
        self.version = _param_version(head)
        self.temb_for = self.temb = None  # the time embedding of one timestep tensor (see loop_time_embedding)
        self._ada_batches: dict = {}

    def ada_weight_batch(self, count: int) -> torch.Tensor:
        """The adaLN projection's (1, W, S) weight viewed as ``count`` batches (a stride-0 view),
        for the statistics of ``count`` steps in one batched GEMM; one view per count."""
        view = self._ada_batches.get(count)
        if view is None:
            view = self._ada_batches[count] = self.ada_wt.expand(count, -1, -1)
        return view


def patch_embed_matrix(conv) -> torch.Tensor:
    """A patch-embedding Conv2d (kernel = stride = patch) as the (D, p*p*C) matrix of a Linear on
    tokens in patchify order (ph, pw, c)."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)


def tensor_version(t: torch.Tensor):
    """The in-place version counter; inference tensors have none (they are not edited in place
    outside inference mode)."""
    return None if t.is_inference() else t._version


def _param_version(module) -> tuple:
    return tuple((p.data_ptr(), tensor_version(p), p.dtype) for p in module.parameters())


_head_cache: "weakref.WeakKeyDictionary[torch.nn.Module, HeadWeights]" = weakref.WeakKeyDictionary()


def head_weights(head) -> HeadWeights:
    """The cached loop form of ``head``, rebuilt when a parameter changed (load, cast, in-place edit)."""
    w = _head_cache.get(head)
    if w is None or w.version != _param_version(head):
        w = _head_cache[head] = HeadWeights(head)
    return w


def time_embedding(head, timesteps):
    """(K, W): the head's time embedding of all K timesteps in one batched call."""
    tce = head.time_cond_embed
    return tce.timestep_proj(tce.get_freq_embed(timesteps, tce.timestep_proj.fc1.weight.dtype))


def loop_time_embedding(head, w: HeadWeights, timesteps):
    """``time_embedding`` of a scheduler table's timesteps as (K, 1, W), kept on the head's loop
    weights: every AR step of a generation denoises over the same K timesteps (the table's tensor,
    cached on the scheduler), so it is computed once, not once per AR step. The weights object is
    rebuilt when a parameter changes, which drops it; the table is held, so its identity cannot be
    reused."""
    if w.temb_for is not timesteps:
        w.temb, w.temb_for = time_embedding(head, timesteps).unsqueeze(1), timesteps
    return w.temb


_constants: dict = {}


def _constant(key, build) -> torch.Tensor:
    """A small read-only tensor shared by every call with the same key, built once (as a normal
    tensor, usable in and out of inference mode); the cache is dropped when it reaches 256 keys."""
    t = _constants.get(key)
    if t is None:
        if len(_constants) >= 256:
            _constants.clear()
        with torch.inference_mode(False):
            t = _constants[key] = build()
    return t


def guidance_scales(values: list[float], device) -> torch.Tensor:
    """[s, s2, renorm_min] as a device tensor, one per distinct (values, device): read-only in the
    loop, so every AR step shares it instead of building and copying it again."""
    return _constant(("scales", tuple(values), str(device)),
                     lambda: torch.tensor(values, dtype=torch.float32).to(device))


def condition_projection(head, z):
    """The head's condition projection of the spatial-encoder outputs, once for the whole loop."""
    return head.time_cond_embed.condition_proj(z)


# ---------------------------------------------------------------------------------------------
# One head evaluation and the K-step loop (eager; the CUDA graph path captures the same code)
# ---------------------------------------------------------------------------------------------
def head_forward_rows(w: HeadWeights, x_rows, act_rows, passes: int, ada_stats=None):
    """The head on token rows: x_rows (1, R, P) noisy tokens (identical for every guidance pass,
    so embedded once and repeated), act_rows (1, passes * R, W) = SiLU(condition projection + this
    step's time embedding), the input of every adaLN projection (or ``ada_stats``, their
    projections, when computed ahead). Returns (1, passes * R, P)."""
    from nova_fast.ops.modulate import modulate
    from nova_fast.ops.residual_norm import residual_norm

    stats = (torch.baddbmm(w.ada_b, act_rows, w.ada_wt) if ada_stats is None else ada_stats).split(w.width, dim=2)
    h = torch.baddbmm(w.embed_b, x_rows, w.embed_wt)
    if passes > 1:
        h = h.repeat(1, passes, 1)
    for j, (fc1_wt, fc1_b, fc2_wt, fc2_b, norm_w, norm_b, norm_eps) in enumerate(w.blocks):
        scale, shift, gate = (stats[3 * j + k] for k in ADALN_ORDER)
        y = torch.baddbmm(fc1_b, modulate(h, scale, shift, eps=w.ada_eps[j]), fc1_wt)
        y = torch.baddbmm(fc2_b, torch.nn.functional.silu(y, inplace=True), fc2_wt)
        h = residual_norm(h, y, norm_w, norm_b, gate=gate, eps=norm_eps, inplace=True)
    scale, shift = (stats[3 * w.depth + k] for k in ADALN_ORDER[:2])
    return torch.baddbmm(w.head_b, modulate(h, scale, shift, eps=w.ada_eps[-1]), w.head_wt)


def denoise_loop(w: HeadWeights, plan: "LoopPlan", x, cond, temb, noises, coef, scales, *, backend: str):
    """The K steps on token rows. x (1, B * n_stride, P) is the initial sample (updated in place
    by the kernels: see ``steps_in_place``); cond (1, passes * B * n_stride, W); temb (K, 1, W);
    noises: K entries, a (1, B * n_stride, P) tensor or None. Returns the final sample
    (1, B * n_stride, P)."""
    rows = x.shape[1]
    in_place = steps_in_place(backend, x)
    silu = torch.nn.functional.silu
    # The adaLN statistics do not depend on the sample: they are computed ahead for a chunk of
    # steps at once (one large GEMM instead of one thin GEMM per step), as memory allows.
    stats_bytes = cond.numel() * w.ada_wt.shape[2] // w.width * cond.element_size()
    chunk = max(1, min(plan.steps, PRECOMPUTE_BYTES // max(stats_bytes, 1)))
    stats = [None] * plan.steps
    for i in range(plan.steps):
        truncated = plan.trunc_step is not None and i >= plan.trunc_step
        passes = 1 if truncated else plan.passes
        if i % chunk == 0:
            steps = temb if chunk >= plan.steps else temb[i: i + chunk]  # (c, 1, W)
            acts = silu(cond + steps, inplace=True)  # (c, passes * R, W): SiLU(cond + temb) per step
            stats[i: i + chunk] = torch.baddbmm(w.ada_b, acts, w.ada_weight_batch(len(acts))).split(1)
        step_stats = stats[i][:, :rows] if truncated else stats[i]  # the conditional pass only
        out = head_forward_rows(w, x, None, passes, ada_stats=step_stats)
        x = guided_step(out, x, noises[i], coef, scales, i, guide=GUIDE_NONE if truncated else plan.guide,
                        renorm=plan.renorm and not truncated, group_len=plan.group_len,
                        group_stride=plan.group_stride, new_x=x if in_place else None, backend=backend)
    return x


# ---------------------------------------------------------------------------------------------
# Plans: scheduler coefficients, guidance, sizes (prepared before the loop, on the device)
# ---------------------------------------------------------------------------------------------
class LoopPlan:
    """Static description of one loop: step count, guidance mode, truncation step, renorm groups."""

    def __init__(self, steps, guide, renorm, trunc_step, group_len, group_stride):
        self.steps, self.guide, self.passes = steps, guide, PASSES[guide]
        self.renorm, self.trunc_step = renorm, trunc_step
        self.group_len, self.group_stride = group_len, group_stride

    def key(self):
        return (self.steps, self.guide, self.renorm, self.trunc_step, self.group_len, self.group_stride)


def scheduler_table(scheduler, device) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[float]]:
    """(coef (K, 8) fp32 on ``device``, timesteps fed to the head (K,) fp32 on ``device``, which
    steps draw noise, the timesteps as host floats), computed once per (scheduler state, device)
    and cached on the scheduler, so a loop starts without a host-device round trip.

    Rows: x0 = (c0 * x + c1 * g) / c2; x_new = c3 * x0 + c4 * x + c5 * noise; columns 6 and 7 hold
    the folded (c0 c3 / c2 + c4, c1 c3 / c2) for the linear fp32 path. The values come from
    the scheduler's own fp32 tensors with the same arithmetic as its ``step``."""
    kind = _scheduler_kind(scheduler)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        raise ValueError(f"scheduler ({type(scheduler).__name__}) has no timesteps: call "
                         "scheduler.set_timesteps(K) before denoise_tokens")
    # the cache entry keeps the keyed tensors alive, so their ids cannot be reused by new tensors
    keyed = (timesteps, getattr(scheduler, "sigmas", None), getattr(scheduler, "alphas_cumprod", None))
    state = (kind, device, *map(_tensor_key, keyed), getattr(scheduler, "prediction_type", None),
             getattr(scheduler, "variance_type", None))
    cached = getattr(scheduler, "_nova_fast_table", None)
    if cached is not None and cached[0] == state:
        return cached[1]
    steps = len(timesteps)
    coef = torch.zeros(steps, COEF_COLUMNS, dtype=torch.float32)
    if kind == "flow":
        sigmas = scheduler.sigmas
        if len(sigmas) != steps + 1:
            raise ValueError(f"flow scheduler: expected {steps + 1} sigmas for {steps} timesteps, got {len(sigmas)}")
        coef[:, 1] = coef[:, 2] = coef[:, 4] = 1.0
        coef[:, 3] = (sigmas[1:] - sigmas[:-1]).float()  # x_new = dt * v + x
        draws = [False] * steps
    else:
        ac = scheduler.alphas_cumprod
        t = torch.as_tensor(timesteps).cpu().long()
        prev = t - scheduler.num_train_timesteps // steps
        one = torch.ones((), dtype=ac.dtype)
        a_t = ac[t]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], one)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_a = a_t / a_prev
        cur_b = 1 - cur_a
        pred = scheduler.prediction_type
        if pred == "epsilon":
            coef[:, 0], coef[:, 1], coef[:, 2] = 1.0, -(b_t ** 0.5), a_t ** 0.5
        elif pred == "v_prediction":
            coef[:, 0], coef[:, 1], coef[:, 2] = a_t ** 0.5, -(b_t ** 0.5), 1.0
        elif pred == "sample":
            coef[:, 1], coef[:, 2] = 1.0, 1.0
        else:
            raise ValueError(f"DDPM scheduler: unknown prediction_type {pred!r}")
        coef[:, 3] = (a_prev ** 0.5 * cur_b) / b_t
        coef[:, 4] = cur_a ** 0.5 * b_prev / b_t
        variance = (b_prev / b_t * cur_b).clamp(min=1e-20)
        if scheduler.variance_type == "fixed_large":
            variance = cur_b
        elif scheduler.variance_type != "fixed_small":
            raise ValueError(f"DDPM scheduler: unsupported variance_type {scheduler.variance_type!r}")
        draws = (t > 0).tolist()
        coef[:, 5] = torch.where(t > 0, variance ** 0.5, torch.zeros_like(variance))
    fold_coefficients(coef)
    head_t = torch.as_tensor(timesteps).detach().float()
    table = (coef.to(device), head_t.to(device), draws, head_t.tolist())
    try:
        scheduler._nova_fast_table = (state, table, keyed)
    except AttributeError:  # a slotted scheduler: recompute per call
        pass
    return table


def fold_coefficients(coef: torch.Tensor) -> torch.Tensor:
    """Fill columns 6 and 7 of a (K, 8) table from columns 0-5 (in place): the step folded for the
    linear cases, x_new = (c0 c3 / c2 + c4) x + (c1 c3 / c2) g + c5 noise. Returns coef."""
    coef[:, 6] = coef[:, 0] * coef[:, 3] / coef[:, 2] + coef[:, 4]
    coef[:, 7] = coef[:, 1] * coef[:, 3] / coef[:, 2]
    return coef


def _tensor_key(t):
    """Identity of a scheduler tensor: the object (kept alive by the cache entry) and its version;
    a plain sequence is keyed by its values."""
    if t is None:
        return None
    if not torch.is_tensor(t):
        return tuple(float(v) for v in t)
    return (id(t), tuple(t.shape), t.dtype, t.device, tensor_version(t))


def _scheduler_kind(scheduler) -> str:
    if hasattr(scheduler, "alphas_cumprod"):
        return "ddpm"
    if hasattr(scheduler, "sigmas"):
        return "flow"
    raise TypeError(f"scheduler must be a FlowMatchEulerScheduler or DDPMScheduler, got {type(scheduler).__name__}")


def guidance_plan(guidance, host_timesteps: list[float]):
    """(guide mode, [s, s2, renorm_min], truncation step or None) from a guidance description."""
    if guidance is None:
        return GUIDE_NONE, [1.0, 0.0, 1.0], None
    scale = float(guidance.guidance_scale)
    image = float(getattr(guidance, "image_guidance_scale", 0) or 0)
    stg = float(getattr(guidance, "spatiotemporal_guidance_scale", 0) or 0)
    renorm_min = float(getattr(guidance, "guidance_renorm", 1) or 1)
    if scale <= 1:
        return GUIDE_NONE, [1.0, 0.0, 1.0], None
    guide = GUIDE_IMAGE if image else (GUIDE_STG if stg else GUIDE_CFG)
    trunc = float(getattr(guidance, "guidance_trunc", 0) or 0)
    trunc_step = None
    if trunc:
        below = [i for i, t in enumerate(host_timesteps) if t < trunc]
        trunc_step = below[0] if below else None
    return guide, [scale, image if guide == GUIDE_IMAGE else stg, renorm_min], trunc_step


# ---------------------------------------------------------------------------------------------
# Token buckets (CUDA graphs): counts padded up so the 63 AR steps of a frame reuse a few graphs
# ---------------------------------------------------------------------------------------------
BUCKETS = (8, 16, 32, 64, 128, 256)


def bucket_size(n: int) -> int:
    """The padded token count for ``n`` predicted tokens: the next bucket, then multiples of 256."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def _pad_tokens(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(R, n, F) -> (R, n_pad, F) with zero rows appended (padding tokens: finite, ignored)."""
    if t.shape[1] == n_pad:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], n_pad - t.shape[1], t.shape[2])], 1)


def patchify(canvas: torch.Tensor, patch: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., L, p*p*C) in patchify order (h, w, ph, pw, c)."""
    *lead, C, H, W = canvas.shape
    t = canvas.reshape(-1, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(*lead, (H // patch) * (W // patch), patch * patch * C)


def batch_rows(B: int, device) -> torch.Tensor:
    """(B, 1) int64 [[0], [1], ...]: the batch index that pairs with (B, n) token ids; one per
    (B, device), read-only."""
    return _constant(("rows", B, str(device)), lambda: torch.arange(B, device=device).unsqueeze(1))


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (..., B, L, P) at ids (B, n) -> (..., B, n, P)."""
    return tokens[..., batch_rows(ids.shape[0], ids.device), ids, :]


# ---------------------------------------------------------------------------------------------
# The public op
# ---------------------------------------------------------------------------------------------

def denoise_tokens(head, z, noise, scheduler, guidance=None, *, generator=None, pred_ids=None, canvas_shape=None,
                   cuda_graphs: bool = True, pad_to_bucket: bool | None = None):
    """Run the diffusion head's K denoising steps on the predicted tokens only.

    Args:
        head: the DiffusionMLP (``nova_fast.reference``), read by its released parameter names.
        z: (m * B, n, D) spatial-encoder outputs at the predicted tokens, guidance passes stacked
            on the batch axis as the reference stacks them (cond, uncond[, third]); m = 1 without
            guidance. dtype = the head's dtype.
        noise: the initial sample at those tokens, (B, n, P) with P = p*p*C in patchify order
            (h, w, ph, pw, c), or the noise canvas (B, C, H, W) itself (gathered at ``pred_ids``).
        scheduler: a FlowMatchEulerScheduler or DDPMScheduler after ``set_timesteps(K)``.
        guidance: the reference's guidance description (scale, renorm, truncation, third pass) or
            None for no guidance.
        generator: DDPM only: the generator the reference draws its per-step noise from.
        pred_ids: (B, n) or (m * B, n) [trailing 1 allowed] token positions in the L-token canvas;
            required with DDPM (its noise is drawn canvas-shaped, then gathered) and with a canvas
            ``noise``.
        canvas_shape: (B, C, H, W), required with DDPM when ``noise`` is given as tokens.
        cuda_graphs: on CUDA tensors, capture the loop once per (bucket, batch, dtype, plan) and
            replay it. Ignored on CPU.
        pad_to_bucket: pad n up to a bucket (8, 16, 32, 64, 128, 256, then multiples of 256);
            default: only when CUDA graphs are used.

    Returns:
        (B, n, P) denoised tokens in ``noise``'s dtype: what the reference loop writes into the
        canvas at ``pred_ids``.

    RNG: with DDPM, one canvas-shaped draw per step with t > 0 from ``generator`` (same shape,
    dtype, device and order as the reference), all drawn before the loop.
    """
    w = head_weights(head)
    device = z.device
    check_tensor("z", z, ndim=3, device=None)
    check_tensor("noise", noise, ndim=(3, 4), device=device)
    if z.dtype != w.dtype:
        raise TypeError(f"z has dtype {str(z.dtype).replace('torch.', '')} but the head's parameters are "
                        f"{str(w.dtype).replace('torch.', '')}")
    if z.device != w.device:
        raise ValueError(f"z is on {z.device} but the head is on {w.device}")
    coef, head_t, draws, host_t = scheduler_table(scheduler, device)
    guide, scale_values, trunc_step = guidance_plan(guidance, host_t)
    passes = PASSES[guide]
    if z.shape[0] % passes:
        raise ValueError(f"z has {z.shape[0]} rows on its batch axis; guidance runs {passes} passes, so it must be a "
                         f"multiple of {passes} (m * B)")
    B, n = z.shape[0] // passes, z.shape[1]
    ids = _check_pred_ids(pred_ids, B, n, passes)
    P = w.token_dim
    noise_canvas = noise.dim() == 4
    if noise_canvas:
        if ids is None:
            raise ValueError("noise is a canvas (B, C, H, W): pass pred_ids to gather the predicted tokens")
        C, Hc, Wc = noise.shape[1:]
        if noise.shape[0] != B or C * w.patch * w.patch != P or Hc % w.patch or Wc % w.patch:
            raise ValueError(f"noise canvas has shape {tuple(noise.shape)}; expected (B, C, H, W) with B = {B}, "
                             f"p*p*C = P = {P} and H, W multiples of the patch {w.patch}")
        canvas_shape = tuple(noise.shape) if canvas_shape is None else tuple(canvas_shape)
    elif tuple(noise.shape) != (B, n, P):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (B, n, P) = {(B, n, P)} to match z "
                         f"{tuple(z.shape)} with {passes} guidance pass(es) and the head's P = p*p*C = {P}")
    if z.shape[2] != w.cond_dim:
        raise ValueError(f"z has width {z.shape[2]} but the head's condition projection takes {w.cond_dim}")
    if noise.dtype != z.dtype:
        raise TypeError(f"noise has dtype {noise.dtype} but z has {z.dtype}; they must match")
    noise_steps = None
    if any(draws):
        if ids is None or canvas_shape is None:
            raise ValueError("DDPM draws its noise canvas-shaped: pass pred_ids= and canvas_shape= (B, C, H, W) "
                             "(or noise as the canvas)")
        if tuple(canvas_shape[:1]) != (B,) or canvas_shape[1] * w.patch * w.patch != P:
            raise ValueError(f"canvas_shape {tuple(canvas_shape)} does not match B = {B} and P = {P}")
        drawn = draw_step_canvases(canvas_shape, draws, generator, noise.dtype, device)
        # one patchify and one gather for the initial noise and every step's draw
        gathered = gather_tokens(patchify(torch.stack([noise, *drawn] if noise_canvas else drawn), w.patch), ids)
        noise, noise_steps = (gathered[0], gathered[1:]) if noise_canvas else (noise, gathered)
    elif noise_canvas:
        noise = gather_tokens(patchify(noise, w.patch), ids)

    backend = backends.resolve(OP, device)
    use_graphs = bool(cuda_graphs) and device.type == "cuda" and not torch.compiler.is_compiling()
    n_pad = bucket_size(n) if (pad_to_bucket if pad_to_bucket is not None else use_graphs) else n
    renorm = guide != GUIDE_NONE and scale_values[2] < 1
    group_len, group_stride = (P, P) if RENORM_PER_TOKEN else (n * P, n_pad * P)
    plan = LoopPlan(len(host_t), guide, renorm, trunc_step, group_len, group_stride)
    scales = guidance_scales(scale_values, device)

    # x is the loop's state; a kernel updates it in place, so it must not be the caller's tensor
    own_x = noise_canvas or n_pad != n
    x = _pad_tokens(noise, n_pad).reshape(1, B * n_pad, P)
    z_rows = _pad_tokens(z, n_pad)
    step_noise = [None] * plan.steps
    if noise_steps is not None:
        padded = _pad_tokens(noise_steps.reshape(-1, n, P), n_pad).reshape(len(noise_steps), B * n_pad, P)
        rows = iter(padded.split(1))
        step_noise = [next(rows) if d else None for d in draws]
    if use_graphs:
        out = _graph_run(head, w, plan, x, z_rows, head_t, coef, scales, step_noise, backend)
    else:
        with torch.no_grad():
            temb = loop_time_embedding(head, w, head_t)
            cond = condition_projection(head, z_rows).reshape(1, passes * B * n_pad, w.width)
            copy_first = steps_in_place(backend, x) and not own_x
            out = denoise_loop(w, plan, x.clone() if copy_first else x, cond, temb, step_noise, coef, scales,
                               backend=backend)
    out = out.reshape(B, n_pad, P)
    return out if n_pad == n else out[:, :n]


def _check_pred_ids(pred_ids, B: int, n: int, passes: int):
    if pred_ids is None:
        return None
    check_tensor("pred_ids", pred_ids, dtypes=(torch.int64, torch.int32))
    ids = pred_ids.squeeze(-1) if pred_ids.dim() == 3 and pred_ids.shape[-1] == 1 else pred_ids
    if ids.dim() != 2 or ids.shape[1] != n or ids.shape[0] not in (B, passes * B):
        raise ValueError(f"pred_ids has shape {tuple(pred_ids.shape)}; expected (B, n) = {(B, n)} or (m * B, n) = "
                         f"{(passes * B, n)} (a trailing 1 is allowed) to match z")
    return ids[:B]


def draw_step_canvases(canvas_shape, draws, generator, dtype, device) -> list[torch.Tensor]:
    """The DDPM noise of every step that draws, canvas-shaped (B, C, H, W) as the reference draws
    it and in its order (the caller gathers the predicted tokens)."""
    return [torch.randn(tuple(canvas_shape), generator=generator, device=device, dtype=dtype) for d in draws if d]


# ---------------------------------------------------------------------------------------------
# CUDA graphs: the whole K-step loop captured once per (bucket, batch, dtype, plan), replayed
# ---------------------------------------------------------------------------------------------
GRAPH_CACHE_SIZE = 8


class _CapturedLoop:
    """Static input buffers, one captured graph of the loop, and its static output."""

    def __init__(self, head, w, plan, x, z_rows, head_t, coef, scales, step_noise, backend):
        self.x_in, self.z_in = x.clone(), z_rows.clone()
        self.t_in, self.coef_in, self.scales_in = head_t.clone(), coef.clone(), scales.clone()
        self.noise_in = [None if t is None else t.clone() for t in step_noise]
        self.x_work = x.clone()
        passes, rows = plan.passes, x.shape[1]

        def body():
            temb = time_embedding(head, self.t_in).unsqueeze(1)
            cond = condition_projection(head, self.z_in).reshape(1, passes * rows, w.width)
            self.x_work.copy_(self.x_in)
            return denoise_loop(w, plan, self.x_work, cond, temb, self.noise_in, self.coef_in, self.scales_in,
                                backend=backend)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            body()  # warm-up: compiles kernels, creates cuBLAS workspaces outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = body()

    def replay(self, x, z_rows, head_t, coef, scales, step_noise):
        self.x_in.copy_(x)
        self.z_in.copy_(z_rows)
        self.t_in.copy_(head_t)
        self.coef_in.copy_(coef)
        self.scales_in.copy_(scales)
        for dst, src in zip(self.noise_in, step_noise):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.out.clone()


_graphs: "dict" = {}


def _graph_key(w, plan, x, z_rows, step_noise, backend):
    return (id(w), plan.key(), tuple(x.shape), tuple(z_rows.shape), x.dtype, x.device,
            tuple(t is not None for t in step_noise), backend)


def _graph_run(head, w, plan, x, z_rows, head_t, coef, scales, step_noise, backend):
    """Replay the captured loop for this shape (capturing it on first use; LRU of GRAPH_CACHE_SIZE)."""
    key = _graph_key(w, plan, x, z_rows, step_noise, backend)
    loop = _graphs.pop(key, None)
    if loop is None:
        loop = _CapturedLoop(head, w, plan, x, z_rows, head_t, coef, scales, step_noise, backend)
        while len(_graphs) >= GRAPH_CACHE_SIZE:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = loop  # most recently used last
    return loop.replay(x, z_rows, head_t, coef, scales, step_noise)


def clear_graph_cache() -> None:
    _graphs.clear()
