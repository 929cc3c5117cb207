"""Batched diffusion-head denoising of the predicted tokens: ``denoise_tokens``.

The reference runs, for every denoising step, the head on the whole latent canvas: patch-embeds
all L tokens to gather the n predicted ones, recomputes the condition projection, scatters back,
combines guidance and steps the scheduler over the full canvas. ``denoise_tokens`` does the same
math on the n tokens only:

- before the loop (on the device, no host round trip inside it): the scheduler's own step table
  (``scheduler.step_table(device)``), the guidance scales as a 3-vector, the time embeddings of all
  K timesteps in one batched call, the condition projection once, the DDPM noise of every step
  (drawn canvas-shaped from the caller's generator in the reference's order, then gathered);
- per step: one GEMM for the adaLN statistics of all blocks and the final norm (computed ahead
  for several steps at once where memory allows), the patch embedding of the n tokens, per block
  ``modulate`` -> Linear -> SiLU -> Linear -> ``residual_norm`` (gated, in place), the final
  modulate and Linear, then the fused guidance + scheduler step (``nova_fast.ops.denoise_step``);
- on CUDA tensors the K-step loop is captured once per (token bucket, batch, dtype, plan) into a
  CUDA graph and replayed (``cuda_graphs=True``, ``nova_fast.ops.cuda_graph_cache``); on CPU the
  same code runs eagerly.

The whole op is inference-only (no_grad). Hook point for ``nova_fast.accelerate``: the
reference's ``NOVAModel.denoise_step_tokens`` (see ``nova_fast.reference``).
"""
from __future__ import annotations

import itertools
import weakref

import torch

from nova_fast import backends
from nova_fast.ops import cuda_graph_cache
from nova_fast.ops._checks import check_tensor
from nova_fast.ops.denoise_step import (  # noqa: F401  (re-exported: the step is this op's kernel)
    COEF_COLUMNS, GUIDE_CFG, GUIDE_IMAGE, GUIDE_NONE, GUIDE_STG, OP, PASSES, fold_coefficients, guided_step,
    guided_step_op, guided_step_torch, step_workspace, steps_in_place)

# The adaLN statistics of several steps are computed in one GEMM, up to this many bytes at once.
PRECOMPUTE_BYTES = 256 << 20
SCHEDULER_KINDS = ("flow", "ddpm")


# ---------------------------------------------------------------------------------------------
# The head, arranged for the loop (weights prepared once per head and kept while unchanged)
# ---------------------------------------------------------------------------------------------
_serials = itertools.count()


class HeadWeights:
    """A DiffusionMLP's parameters in loop form. Rows are kept 3-D (1, R, F) so every Linear is one
    ``baddbmm(bias, x, W^T)`` and the adaLN ops take them without reshapes (no view ops in the
    loop); the patch-embedding Conv2d becomes a (P, W) matrix in patchify order (ph, pw, c); the
    adaLN projections of all blocks and of the final norm are concatenated into one (W, S) matrix,
    since they all read the same ``SiLU(cond)``: one GEMM per step instead of depth + 1.
    ``serial`` is unique for the process's lifetime (a CUDA-graph key; ``id()`` can be recycled)."""

    def __init__(self, head):
        conv = head.patch_embed.proj
        width, channels, patch, _ = conv.weight.shape
        self.serial = next(_serials)
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
    """``time_embedding`` of a step table's timesteps as (K, 1, W), kept on the head's loop
    weights: every AR step of a generation denoises over the same K timesteps (the table's tensor,
    cached on the scheduler), so it is computed once, not once per AR step. The weights object is
    rebuilt when a parameter changes, which drops it; the table is held, so its identity cannot be
    reused."""
    if w.temb_for is not timesteps:
        w.temb, w.temb_for = time_embedding(head, timesteps).unsqueeze(1), timesteps
    return w.temb


def condition_projection(head, z):
    """The head's condition projection of the spatial-encoder outputs, once for the whole loop."""
    return head.time_cond_embed.condition_proj(z)


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


# ---------------------------------------------------------------------------------------------
# One head evaluation and the K-step loop (eager; the CUDA graph path captures the same code)
# ---------------------------------------------------------------------------------------------
def head_forward_rows(w: HeadWeights, x_rows, act_rows, passes: int, ada_stats=None):
    """The head on token rows: x_rows (1, R, P) noisy tokens (identical for every guidance pass,
    so embedded once and repeated), act_rows (1, passes * R, W) = SiLU(condition projection + this
    step's time embedding), the input of every adaLN projection (or ``ada_stats``, their
    projections, when computed ahead). Returns (1, passes * R, P). Each AdaLNZero's statistics
    are its projection's chunks in the order (scale, shift[, gate])."""
    from nova_fast.ops.modulate import modulate
    from nova_fast.ops.residual_norm import residual_norm

    stats = (torch.baddbmm(w.ada_b, act_rows, w.ada_wt) if ada_stats is None else ada_stats).split(w.width, dim=2)
    h = torch.baddbmm(w.embed_b, x_rows, w.embed_wt)
    if passes > 1:
        h = h.repeat(1, passes, 1)
    for j, (fc1_wt, fc1_b, fc2_wt, fc2_b, norm_w, norm_b, norm_eps) in enumerate(w.blocks):
        scale, shift, gate = stats[3 * j: 3 * j + 3]
        y = torch.baddbmm(fc1_b, modulate(h, scale, shift, eps=w.ada_eps[j]), fc1_wt)
        y = torch.baddbmm(fc2_b, torch.nn.functional.silu(y, inplace=True), fc2_wt)
        h = residual_norm(h, y, norm_w, norm_b, gate=gate, eps=norm_eps, inplace=True)
    scale, shift = stats[3 * w.depth: 3 * w.depth + 2]
    return torch.baddbmm(w.head_b, modulate(h, scale, shift, eps=w.ada_eps[-1]), w.head_wt)


def denoise_loop(w: HeadWeights, plan: "LoopPlan", x, cond, temb, noises, coef, scales, *, backend: str,
                 workspace=None):
    """The K steps on token rows. x (1, B * n_stride, P) is the initial sample (updated in place
    by the kernels: see ``steps_in_place``); cond (1, passes * B * n_stride, W); temb (K, 1, W);
    noises: K entries, a (1, B * n_stride, P) tensor or None; workspace: ``plan.workspace(...)``,
    the step kernel's scratch space, allocated before the loop. Returns the final sample
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
                        group_stride=plan.group_stride, new_x=x if in_place else None, backend=backend,
                        workspace=workspace)
    return x


def loop_body(head, w: HeadWeights, plan: "LoopPlan", backend: str, x):
    """The function a CUDA graph captures: from the static inputs (x, z rows, head timesteps, step
    table, scales, per-step noise) to the final sample, all on the device. Its own copy of x is
    the loop's state (the kernels update it in place), so the input buffer survives a replay. The
    step kernel's workspace for samples like ``x`` is allocated here, once, outside the body (the
    capture keeps the body, hence the workspace, alive)."""
    workspace = plan.workspace(backend, x)

    def body(x, z_rows, head_t, coef, scales, step_noise):
        temb = time_embedding(head, head_t).unsqueeze(1)
        cond = condition_projection(head, z_rows).reshape(1, plan.passes * x.shape[1], w.width)
        return denoise_loop(w, plan, x.clone(), cond, temb, step_noise, coef, scales, backend=backend,
                            workspace=workspace)
    return body


# ---------------------------------------------------------------------------------------------
# Plans: step table, guidance, sizes (prepared before the loop, on the device)
# ---------------------------------------------------------------------------------------------
class LoopPlan:
    """Static description of one loop: step count, guidance mode, truncation step, renorm groups."""

    def __init__(self, steps, guide, renorm, trunc_step, group_len, group_stride):
        self.steps, self.guide, self.passes = steps, guide, PASSES[guide]
        self.renorm, self.trunc_step = renorm, trunc_step
        self.group_len, self.group_stride = group_len, group_stride

    def key(self):
        return (self.steps, self.guide, self.renorm, self.trunc_step, self.group_len, self.group_stride)

    def workspace(self, backend: str, x):
        """The step kernel's scratch space for the sample ``x`` (one renorm group per group_stride
        elements): one per loop, None when the kernel needs none (``denoise_step.step_workspace``)."""
        return step_workspace(backend, x.numel() // self.group_stride, self.group_len, self.renorm, x.device)


def step_table(scheduler, device):
    """The scheduler's own step table on ``device`` (``nova_fast.reference.schedulers``); refuses
    schedulers that do not describe their steps that way."""
    kind = getattr(scheduler, "kind", None)
    if kind not in SCHEDULER_KINDS or not callable(getattr(scheduler, "step_table", None)):
        raise TypeError(f"scheduler must be a nova_fast.reference FlowMatchEulerScheduler or DDPMScheduler (kind "
                        f"{' or '.join(SCHEDULER_KINDS)} with step_table()), got {type(scheduler).__name__}")
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        raise ValueError(f"scheduler ({type(scheduler).__name__}) has no timesteps: call "
                         "scheduler.set_timesteps(K) before denoise_tokens")
    table = scheduler.step_table(device)
    if kind == "flow" and any(table.draws):
        raise ValueError("a flow-matching step table cannot draw noise")
    return table


def guidance_plan(guidance, host_timesteps):
    """(guide mode, [s, s2, renorm_min], truncation step or None) from a guidance description."""
    if guidance is None:
        return GUIDE_NONE, [1.0, 0.0, 1.0], None
    scale = float(guidance.guidance_scale)
    image = float(getattr(guidance, "image_guidance_scale", 0) or 0)
    stg = float(getattr(guidance, "spatiotemporal_guidance_scale", 0) or 0)
    renorm_min = float(getattr(guidance, "guidance_renorm", 1) or 1)
    if scale <= 1:
        return GUIDE_NONE, [1.0, 0.0, 1.0], None
    if image and stg:
        raise ValueError("guidance: image_guidance_scale and spatiotemporal_guidance_scale cannot both be set "
                         "(one third pass only)")
    guide = GUIDE_IMAGE if image else (GUIDE_STG if stg else GUIDE_CFG)
    trunc = float(getattr(guidance, "guidance_trunc", 0) or 0)
    trunc_step = None
    if trunc:
        below = [i for i, t in enumerate(host_timesteps) if t < trunc]
        trunc_step = below[0] if below else None
    return guide, [scale, image if guide == GUIDE_IMAGE else stg, renorm_min], trunc_step


# ---------------------------------------------------------------------------------------------
# Token buckets (CUDA graphs): counts padded up so the AR steps of a frame reuse a few graphs
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


def graph_key(w: HeadWeights, plan: LoopPlan, x, z_rows, step_noise, backend):
    """What a captured loop is valid for: the head's loop weights (by serial, never recycled),
    the plan, the shapes, dtype and device, which steps draw noise, and the backend."""
    return (w.serial, plan.key(), tuple(x.shape), tuple(z_rows.shape), x.dtype, x.device,
            tuple(t is not None for t in step_noise), backend)


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
        scheduler: a ``nova_fast.reference`` FlowMatchEulerScheduler or DDPMScheduler after
            ``set_timesteps(K)``; its ``step_table`` gives every step's coefficients, so each of
            its accepted options runs here exactly as its ``step`` runs it.
        guidance: the reference's guidance description (scale, renorm, truncation, third pass) or
            None for no guidance. Renorm norms cover one sample's predicted tokens.
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
    table = step_table(scheduler, device)
    guide, scale_values, trunc_step = guidance_plan(guidance, table.host_timesteps)
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
    if any(table.draws):
        if ids is None or canvas_shape is None:
            raise ValueError("DDPM draws its noise canvas-shaped: pass pred_ids= and canvas_shape= (B, C, H, W) "
                             "(or noise as the canvas)")
        if tuple(canvas_shape[:1]) != (B,) or canvas_shape[1] * w.patch * w.patch != P:
            raise ValueError(f"canvas_shape {tuple(canvas_shape)} does not match B = {B} and P = {P}")
        drawn = draw_step_canvases(canvas_shape, table.draws, generator, noise.dtype, device)
        # one patchify and one gather for the initial noise and every step's draw
        gathered = gather_tokens(patchify(torch.stack([noise, *drawn] if noise_canvas else drawn), w.patch), ids)
        noise, noise_steps = (gathered[0], gathered[1:]) if noise_canvas else (noise, gathered)
    elif noise_canvas:
        noise = gather_tokens(patchify(noise, w.patch), ids)

    backend = backends.resolve(OP, device)
    use_graphs = bool(cuda_graphs) and device.type == "cuda" and not torch.compiler.is_compiling()
    n_pad = bucket_size(n) if (pad_to_bucket if pad_to_bucket is not None else use_graphs) else n
    renorm = guide != GUIDE_NONE and scale_values[2] < 1
    # a renorm group is one sample's predicted tokens (the padding after them is skipped)
    plan = LoopPlan(len(table.draws), guide, renorm, trunc_step, n * P, n_pad * P)
    scales = guidance_scales(scale_values, device)

    # x is the loop's state; a kernel updates it in place, so it must not be the caller's tensor
    own_x = noise_canvas or n_pad != n
    x = _pad_tokens(noise, n_pad).reshape(1, B * n_pad, P)
    z_rows = _pad_tokens(z, n_pad)
    step_noise = [None] * plan.steps
    if noise_steps is not None:
        padded = _pad_tokens(noise_steps.reshape(-1, n, P), n_pad).reshape(len(noise_steps), B * n_pad, P)
        rows = iter(padded.split(1))
        step_noise = [next(rows) if d else None for d in table.draws]
    if use_graphs:
        out = cuda_graph_cache.run_captured(graph_key(w, plan, x, z_rows, step_noise, backend),
                                            loop_body(head, w, plan, backend, x),
                                            (x, z_rows, table.timesteps, table.coef, scales, step_noise),
                                            keep_alive=(head, w))
    else:
        with torch.no_grad():
            temb = loop_time_embedding(head, w, table.timesteps)
            cond = condition_projection(head, z_rows).reshape(1, passes * B * n_pad, w.width)
            copy_first = steps_in_place(backend, x) and not own_x
            out = denoise_loop(w, plan, x.clone() if copy_first else x, cond, temb, step_noise, table.coef, scales,
                               backend=backend, workspace=plan.workspace(backend, x))
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


def clear_graph_cache() -> None:
    cuda_graph_cache.clear()
