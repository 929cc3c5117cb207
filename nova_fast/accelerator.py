"""``nova_fast.accelerate(model)``: swap a NOVA model's hot paths for nova_fast's fused ops, in place.

The model is found by the released module names (docs/nova.md, "Weight names"), not by class:
``PATCHES`` below lists every replacement, one line each: the feature flag it belongs to, where
it goes (released module path), which method it replaces and with what. Each becomes an instance
attribute computing the same math through an op; ``restore(model)`` deletes them again.
Parameters, buffers and the state dict are never touched. What changes:

| feature           | where (released names)                   | reference                        | accelerated |
|-------------------|------------------------------------------|----------------------------------|-------------|
| ``residual_norm`` | ``{video,image}_encoder.blocks.N``       | ``x + LN(f(x))``, 3 passes each  | ``residual_norm`` |
| ``attention``     | ``*.blocks.N.attn`` with the training mask | SDPA over a dense N x N mask   | ``group_causal_attention`` on the frame ids |
| ``attention``     | ``*.blocks.N.attn`` unmasked / KV cache  | SDPA                             | dense path of ``group_causal_attention`` (flash-attn on a GPU where installed) |
| ``modulate``      | ``video_encoder.mixer``                  | ``x0 * (1 + scale) + shift``     | ``modulate(normalize=False)`` on the projection's chunks |
| ``modulate`` / ``residual_norm`` | ``AdaLNZero.modulate``, ``DiffusionBlock.residual`` of the head | AdaLN-Zero, gated residual | ``modulate``, ``residual_norm(gate=)`` |
| ``denoise_tokens``| per AR step, the K-step head loop        | head on the whole canvas, K x    | ``denoise_tokens`` on the predicted tokens (CUDA graphs on a GPU) |
| ``spatial_read``  | ``image_encoder.forward(..., read_ids)`` | every token, then gathered       | the last block's queries, MLP and final norm only at ``read_ids`` |
| ``pos_embed_table`` | ``image_encoder.add_pos_embed``        | sin-cos table built per call     | the table built once per (width, grid, device, dtype) |
| ``token_canvas``  | the frame being generated                | latent image rebuilt per AR step | kept as tokens, predicted tokens written in place |

The frame loop itself is the reference's ``NOVAModel.generate_frame``; the accelerated model
changes it only through its hook points (``new_frame_canvas``, ``denoise_step_tokens``, the spatial
encoder's forward with its public ``read_ids``, and ``temporal_attention_mask`` for training).
Every replacement keeps the public signature of what it replaces: no private arguments. A model with only the
released module layout gets the module-level patches and the report names the missing hooks.

Backend: ``backend="auto"`` leaves each op's choice to ``nova_fast.backends`` (auto / set_backend /
NOVA_FAST_BACKEND). An explicit backend runs every op that implements it on it, while the model
runs (``group_causal_attention`` has no ``cuda`` kernel: with ``backend="cuda"`` it stays on auto,
which is Triton on a GPU; ``accelerated_report(model)`` lists the mapping). A backend that cannot run
on the model's device raises ``BackendUnavailable`` at once.

Two paths keep the reference computation on purpose, and each records why in
``nova_fast.backend_info()["last_used"]`` when it runs: a temporal training mask with a head
dimension the attention kernels do not support (64 and 128 are), which becomes the dense mask,
and guidance renorm over the whole canvas (``guidance_renorm < 1`` with
``Guidance.renorm_scope == "canvas"``, the released behaviour), whose norms include the tokens not
being predicted, which ``denoise_tokens`` never touches; that AR step runs the reference loop.
"""
from __future__ import annotations

import contextvars
import functools
import types
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nova_fast import backends
from nova_fast.ops.denoise_tokens import batch_rows, denoise_tokens, patch_embed_matrix, tensor_version
from nova_fast.ops.group_causal_attention import (HEAD_DIMS, SUPPORTED as ATTENTION_BACKENDS, group_causal_attention,
                                                  mark_if_in_token_order)
from nova_fast.ops.modulate import modulate
from nova_fast.ops.residual_norm import residual_norm
from nova_fast.reference.layers import apply_rope, gather_tokens, sincos_2d, unpatchify

# the backends each op the accelerator calls implements (the other three implement all of them)
OPS = {"group_causal_attention": ATTENTION_BACKENDS, "modulate": backends.BACKENDS,
       "residual_norm": backends.BACKENDS, "denoise_tokens": backends.BACKENDS}
STATE = "_nova_fast_acceleration"   # instance attribute holding what was patched (not a module, not saved)

# The released layout, checked before anything is patched; "[]" marks a list of blocks.
ENCODER_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
HEAD_BLOCK = ("norm1.proj", "proj.fc1", "proj.fc2", "norm2")
LAYOUT = (
    ("video_encoder.blocks[]", ENCODER_BLOCK), ("video_encoder.norm", ()),
    ("image_encoder.blocks[]", ENCODER_BLOCK), ("image_encoder.norm", ()),
    ("image_decoder.patch_embed.proj", ()), ("image_decoder.time_cond_embed.timestep_proj.fc1", ()),
    ("image_decoder.time_cond_embed.condition_proj.fc1", ()), ("image_decoder.blocks[]", HEAD_BLOCK),
    ("image_decoder.norm.proj", ()), ("image_decoder.head", ()), ("mask_embed", ()),
)


class LayoutMismatch(ValueError):
    """The model does not have the released NOVA module layout; the message names the first miss."""


class OfficialModelUnsupported(LayoutMismatch):
    """The model is the official NOVA code's (package ``diffnext``) or follows its forward
    signatures, norms or KV-cache protocol, which the patches do not implement (docs/official_layout.md)."""


def _model_methods_relied_on() -> tuple:
    """Methods of nova_fast.reference.NOVAModel the acceleration depends on: the model-level entries
    of PATCHES, and generate_frame, the reference frame loop that calls those hooks."""
    return ("generate_frame", *(p.method for p in PATCHES if p.where == ""))


def _param_names(fn) -> list:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]


def _indices(ids: list) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)) else \
        ", ".join(map(str, ids))


def official_layout_differences(model: torch.nn.Module) -> list:
    """What makes ``model`` the official NOVA code's rather than nova_fast's layout, one line each:
    classes from the ``diffnext`` package; encoders whose forward takes ``pos=``; encoder blocks that
    take the RoPE as ``pe_func``; attention that keeps its own KV cache (``attn.cache_kv``,
    ``enable_kvcache``) or reads a mask set on the module; AdaLN-Zero norms that keep eps in a
    ``.norm`` submodule; an ``nn.Identity`` mixer; model methods accelerate() would replace whose
    signatures differ from nova_fast.reference.NOVAModel's. Empty for nova_fast's own layout."""
    found = []
    official = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
                       if type(m).__module__.split(".")[0] == "diffnext"})
    if official:
        shown = ", ".join(official[:4]) + (f" and {len(official) - 4} more" if len(official) > 4 else "")
        found.append(f"classes of the official package diffnext: {shown}")
    for enc in ("video_encoder", "image_encoder"):
        module = getattr(model, enc, None)
        if module is None:
            continue
        if "pos" in _param_names(type(module).forward):
            found.append(f"{enc}.forward{tuple(_param_names(type(module).forward))} takes pos= (official "
                         f"signature); the patch takes (tokens, prefix, known_ids, rope_pos, read_ids)")
        if callable(getattr(module, "enable_kvcache", None)):
            found.append(f"{enc}.enable_kvcache(): the official KV-cache switch; the patched blocks take an "
                         f"explicit kv_cache and would skip the attention's own cache")
        pe_func, kept = [], {}
        for i, blk in enumerate(getattr(module, "blocks", [])):
            if "pe_func" in _param_names(type(blk).forward):
                pe_func.append(i)
            attn = getattr(blk, "attn", None)
            for attr in ("cache_kv", "attn_mask"):
                if attn is not None and hasattr(attn, attr):
                    kept.setdefault(attr, []).append(i)
        if pe_func:
            found.append(f"{enc}.blocks {_indices(pe_func)}: forward takes pe_func (the official RoPE callable); "
                         f"the patch takes (x, attn_mask, kv_cache, rope)")
        for attr, where in kept.items():
            found.append(f"{enc}.blocks {_indices(where)}: attn.{attr} kept on the module (the official "
                         f"{'KV-cache' if attr == 'cache_kv' else 'training-mask'} protocol); the patched blocks "
                         f"never read it" + (": later frames would lose the text prefix and the earlier frames"
                                              if attr == "cache_kv" and enc == "video_encoder" else ""))
        if isinstance(getattr(module, "mixer", None), torch.nn.Identity):
            found.append(f"{enc}.mixer is nn.Identity (the official 'no mixer'); nova_fast's layout has None")
    head = getattr(model, "image_decoder", None)
    norms = [("image_decoder.norm", getattr(head, "norm", None))]
    norms += [(f"image_decoder.blocks.{i}.norm1", getattr(b, "norm1", None)) for i, b in
              enumerate(getattr(head, "blocks", []))]
    norm_owned = [name for name, norm in norms if norm is not None and not hasattr(norm, "eps")
                  and isinstance(getattr(norm, "norm", None), torch.nn.Module)]
    if norm_owned:
        found.append(f"{', '.join(norm_owned)}: eps kept inside the submodule .norm (official AdaLayerNormZero); "
                     f"the patch reads .eps on the AdaLN module itself")
    from nova_fast.reference.model import NOVAModel

    for name in _model_methods_relied_on():
        mine, ref = getattr(type(model), name, None), getattr(NOVAModel, name)
        if callable(mine) and mine is not ref:
            have, want = _param_names(mine), _param_names(ref)
            if [p for p in want if p not in have]:
                found.append(f"{type(model).__name__}.{name}{tuple(have)} differs from nova_fast's "
                             f"{name}{tuple(want)}, which the accelerated model relies on")
    return found


def refuse_official_layout(model: torch.nn.Module) -> None:
    """Raise OfficialModelUnsupported, naming every difference, for a model of the official NOVA code."""
    if not isinstance(model, torch.nn.Module):
        return
    found = official_layout_differences(model)
    if found:
        raise OfficialModelUnsupported(
            "accelerate: this model follows the official NOVA code (package diffnext), whose forward signatures, "
            "norms and KV cache the patches do not implement; patching it would fail or compute something else:\n"
            + "\n".join(f"  - {line}" for line in found)
            + "\nLoad the same checkpoint folder with nova_fast.reference.load_pretrained(path) (the same weights "
              "and names) and accelerate that model; see docs/official_layout.md.")


class GroupMask:
    """Stands in for the dense block-causal training mask: the per-token frame-group ids (N,) from
    which the attention derives "query i sees key j iff group[j] <= group[i]" on the fly."""

    def __init__(self, group_ids: torch.Tensor):
        self.group_ids = group_ids

    def dense(self) -> torch.Tensor:
        g = self.group_ids
        return g.unsqueeze(0) <= g.unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# Layout discovery
# ------------------------------------------------------------------------------------------------
def _get(obj, path: str, root: str):
    walked = root
    for name in path.split("."):
        walked += name
        if getattr(obj, name, None) is None:
            raise LayoutMismatch(f"accelerate: the model has no {walked!r}: not the released NOVA layout "
                                 f"(expected the module names of docs/nova.md section 6)")
        obj = getattr(obj, name)
        walked += "."
    return obj


def check_layout(model: torch.nn.Module) -> None:
    """Raise LayoutMismatch naming the first released attribute the model lacks."""
    for path, children in LAYOUT:
        if path.endswith("[]"):
            blocks = _get(model, path[:-2], "")
            if len(blocks) == 0:
                raise LayoutMismatch(f"accelerate: {path[:-2]!r} is empty")
            for i, block in enumerate(blocks):
                for child in children:
                    _get(block, child, f"{path[:-2]}.{i}.")
                if children is ENCODER_BLOCK:
                    _get(block, "attn.num_heads", f"{path[:-2]}.{i}.")
        else:
            _get(model, path, "")
    mixer = getattr(model.video_encoder, "mixer", None)
    if mixer is not None:
        _get(mixer, "proj", "video_encoder.mixer.")


# ------------------------------------------------------------------------------------------------
# Backend scope: the accelerated model's ops run on its backend while any patched method runs
# ------------------------------------------------------------------------------------------------
_active_choice: contextvars.ContextVar = contextvars.ContextVar("nova_fast_accelerated_backends", default=None)


def _scoped(fn):
    """Run ``fn(self, ...)`` under the model's per-op backend choices, which live on the patched
    objects (``STATE + "_backends"``) and are entered once per call tree, for this thread or task
    only (``backends.use_backends``): two accelerated models on two threads keep their own."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        per_op = self.__dict__.get(STATE + "_backends")
        if not per_op or _active_choice.get() is per_op:
            return fn(self, *args, **kwargs)
        token = _active_choice.set(per_op)
        try:
            with backends.use_backends(per_op):
                return fn(self, *args, **kwargs)
        finally:
            _active_choice.reset(token)
    return run


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------
def dense_attention(q, k, v):
    """Unmasked attention: the dense path of group_causal_attention (flash-attn or SDPA); SDPA for
    head dims the op does not take."""
    if q.shape[-1] in HEAD_DIMS:
        return group_causal_attention(q, k, v)
    backends.record("group_causal_attention", "torch", f"accelerate: head dim {q.shape[-1]} not in {HEAD_DIMS}: SDPA")
    return F.scaled_dot_product_attention(q, k, v)


@_scoped
def attend(self, q, k, v, attn_mask=None):
    """Attention core: the frame-group rule without a mask, or dense attention."""
    if attn_mask is None:
        return dense_attention(q, k, v)
    if isinstance(attn_mask, GroupMask):
        n = attn_mask.group_ids.shape[0]
        if q.shape[-1] in HEAD_DIMS and q.shape[2] == k.shape[2] == n:
            return group_causal_attention(q, k, v, attn_mask.group_ids)
        why = (f"head dim {q.shape[-1]} not in {HEAD_DIMS}" if q.shape[-1] not in HEAD_DIMS
               else f"{q.shape[2]} queries / {k.shape[2]} keys for {n} group ids")
        backends.record("group_causal_attention", "torch", f"accelerate: {why}: dense mask + SDPA (reference)")
        attn_mask = attn_mask.dense()
    return type(self).attend(self, q, k, v, attn_mask)


def _norm_args(norm):
    return norm.weight, norm.bias, norm.eps


@_scoped
def encoder_block(self, x, attn_mask=None, kv_cache=None, rope=None):
    """Block.forward: x + LN1(Attn(x)); x + LN2(MLP(x)) with both residuals fused."""
    return encoder_block_rows(self, x, attn_mask, kv_cache, rope)


def encoder_block_rows(self, x, attn_mask=None, kv_cache=None, rope=None, read_rows=None):
    """The fused block on 2-D rows (B*N, D), so that each Linear is one GEMM with no reshapes around
    it. ``read_rows`` (B, n): only those rows' output (keys and values still from every row): the
    spatial encoder's last block read at ``read_ids``."""
    attn, mlp = self.attn, self.mlp
    B, N, D = x.shape
    w1, b1, e1 = _norm_args(self.norm1)
    w2, b2, e2 = _norm_args(self.norm2)
    rows = x.reshape(B * N, D)
    if read_rows is None:
        q, k, v = F.linear(rows, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, attn.num_heads, -1).permute(
            2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:  # earlier tokens' keys/values first, in time order
            k, v = kv_cache.append(k, v)
        base = rows
    else:
        if attn_mask is not None or kv_cache is not None:
            raise ValueError("read_rows computes unmasked, uncached attention only")
        q, k, v, base = queries_at_rows(attn, x, read_rows, rope)
        base = base.reshape(-1, D)
    o = attn.attend(q, k, v, attn_mask)  # (B, H, n, d)
    h = residual_norm(base, F.linear(o.transpose(1, 2).reshape(base.shape), attn.proj.weight, attn.proj.bias),
                      w1, b1, eps=e1)
    y = F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    inference = not (torch.is_grad_enabled() and h.requires_grad)
    h = residual_norm(h, y, w2, b2, eps=e2, inplace=inference)  # h is this block's own tensor
    return h.view(B, -1, D)


_qkv_views: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _param_key(t):
    return None if t is None else (id(t), t.data_ptr(), tensor_version(t), t.dtype, t.device)


def _split_qkv(weight, bias, D: int) -> tuple:
    return weight[:D], None if bias is None else bias[:D], weight[D:], None if bias is None else bias[D:]


def qkv_split(qkv, D: int) -> tuple:
    """(q weight, q bias, kv weight, kv bias): views of the fused qkv Linear's parameters. Outside
    autograd they are kept per (parameter, storage, version), so every AR step does not slice them
    again; under autograd they are sliced per call (a view made without grad would cut the
    parameter's gradient)."""
    weight, bias = qkv.weight, qkv.bias
    if torch.is_grad_enabled():
        return _split_qkv(weight, bias, D)
    key = (_param_key(weight), _param_key(bias))
    entry = _qkv_views.get(qkv)
    if entry is None or entry[0] != key:
        # the views keep their parameters alive, so the ids in the key stay theirs
        entry = _qkv_views[qkv] = (key, _split_qkv(weight, bias, D))
    return entry[1]


def queries_at_rows(attn, x, rows, rope=None):
    """q at ``rows`` (B, n) of x (B, N, D), k and v at every row, all (B, H, *, d): the qkv weights
    sliced, so the queries of the other rows are never computed. Also returns x at those rows
    (B, n, D), the block's residual input there."""
    B, N, D = x.shape
    H, n = attn.num_heads, rows.shape[1]
    q_weight, q_bias, kv_weight, kv_bias = qkv_split(attn.qkv, D)
    x_rows = gather_tokens(x, rows)
    q = F.linear(x_rows, q_weight, q_bias)
    k, v = F.linear(x, kv_weight, kv_bias).view(B, N, 2, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = q.view(B, n, H, -1).transpose(1, 2)
    if rope is not None:
        cos, sin = rope  # (B, 1, N, d/2)
        index = rows[:, None, :, None].expand(B, 1, n, cos.shape[-1])
        q = apply_rope(q, (cos.gather(2, index), sin.gather(2, index)))
        k = apply_rope(k, rope)
    return q, k, v, x_rows


@_scoped
def spatial_encoder(self, tokens, prefix=None, known_ids=None, rope_pos=None, read_ids=None):
    """SpatialEncoder.forward; with ``read_ids`` (B, n) its output at those tokens only (B, n, D),
    the last block computing queries, MLP and final norm at those rows alone (the reference
    encodes every token and gathers)."""
    if read_ids is None:
        return type(self).forward(self, tokens, prefix, known_ids, rope_pos)
    P = 0 if prefix is None else prefix.shape[1]
    h, rope = self.prepare(tokens, prefix, known_ids, rope_pos)
    blocks = self.blocks[self.encoder_depth:]
    for blk in blocks[:-1]:
        h = blk(h, rope=rope)
    h = encoder_block_rows(blocks[-1], h, rope=rope, read_rows=read_ids + P)
    return self.norm(h)


_pos_tables: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def add_pos_embed(self, tokens):
    """The spatial encoder's 2-D sin-cos position embedding, added to every token: the table depends
    only on (width, base grid, device, dtype), so it is built once per encoder, not on every AR step
    (about 20 ops each time in the reference)."""
    if self.base_size is None:
        return tokens
    tables = _pos_tables.setdefault(self, {})
    key = (self.dim, self.base_size, tokens.device, tokens.dtype)
    table = tables.get(key)
    if table is None:
        # a normal tensor even when first built under inference mode: training reuses it
        with torch.inference_mode(False), torch.no_grad():
            table = tables[key] = sincos_2d(self.dim, *self.base_size, device=tokens.device).to(tokens.dtype)
    return tokens + table


@_scoped
def temporal_attention_mask(self, group_ids):
    # the reference's frame ids are in token order by construction, but only a read can tell; on
    # sm_90 one read per training forward lets every temporal layer take the TMA forward
    return GroupMask(mark_if_in_token_order(group_ids))


@_scoped
def video_mixer(self, x0, z):
    """x0 * (1 + scale) + shift, (scale, shift) = proj(lora(SiLU(z))), read as chunks in place."""
    h = F.silu(z)
    if getattr(self, "lora", None) is not None:
        h = self.lora(h)
    stats = self.proj(h)
    D = x0.shape[-1]
    shape = torch.broadcast_shapes(x0.shape, stats.shape[:-1] + (D,))
    rows = shape[-2]
    x3 = x0.expand(shape).reshape(-1, rows, D)
    out = modulate(x3, stats[..., :D].expand(shape).reshape(-1, rows, D),
                   stats[..., D:].expand(shape).reshape(-1, rows, D), normalize=False)
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Diffusion head
# ------------------------------------------------------------------------------------------------
def unit_stride_rows(x):
    """The fused ops read rows with unit stride; the head's patch embedding hands over a transposed
    view (Conv2d output, (B, W, L) -> (B, L, W)) that is copied once here."""
    return x if x.stride(-1) == 1 else x.contiguous()


@_scoped
def adaln_modulate(self, x, scale, shift):
    """AdaLNZero.modulate: LN(x) * (1 + scale) + shift in one pass."""
    return modulate(unit_stride_rows(x), scale, shift, eps=self.eps)


@_scoped
def head_residual(self, x, y, gate):
    """DiffusionBlock.residual: x + gate * LN(y) in one pass."""
    w, b, eps = _norm_args(self.norm2)
    return residual_norm(unit_stride_rows(x), y, w, b, gate=gate, eps=eps)


def canvas_renorm(guidance) -> bool:
    """Guidance renorm over the whole canvas (the released scope): its norms include the tokens not
    being predicted, which ``denoise_tokens`` never touches, so the reference loop runs."""
    return (guidance is not None and guidance.active and guidance.guidance_renorm < 1
            and guidance.renorm_scope == "canvas")


@_scoped
def denoise_step_tokens(self, z, noise, pred_ids, scheduler, guidance, generator=None):
    """NOVAModel.denoise_step_tokens through denoise_tokens: the denoised predicted tokens (B, n, P)."""
    if canvas_renorm(guidance):
        backends.record("denoise_tokens", "torch", "accelerate: renorm over the whole canvas is not token-local: "
                        "reference loop")
        return type(self).denoise_step_tokens(self, z, noise, pred_ids, scheduler, guidance, generator)
    return denoise_tokens(self.image_decoder, z, noise, pred_ids=pred_ids, scheduler=scheduler, guidance=guidance,
                          generator=generator, cuda_graphs=self.__dict__[STATE]["cuda_graphs"])


class TokenCanvas:
    """Stands in for ``nova_fast.reference.model.ImageCanvas`` (same three methods): the frame kept
    as tokens (B, L, p*p*C), so the patch embedding is one GEMM on the tokens, each AR step writes
    its predicted tokens and the known mask in place (the reference rebuilds canvas-sized tensors
    around every step), and one unpatchify happens at the end."""

    def __init__(self, model, batch: int):
        c = model.config
        dev, dtype = model.device, model.dtype
        self.patch, self.shape = model.patch, (batch, c.image_dim, *c.latent_size)
        self.tokens = torch.zeros(batch, c.spatial_tokens, model.patch * model.patch * c.image_dim, device=dev,
                                  dtype=dtype)
        self.known = torch.zeros(batch, c.spatial_tokens, 1, dtype=torch.bool, device=dev)
        conv = model.image_encoder.patch_embed.proj
        self.embed_w, self.embed_b = patch_embed_matrix(conv), conv.bias
        self.mask_token = model.mask_embed.mask_token.to(dtype)
        self.rows, self.written = batch_rows(batch, dev), torch.ones((), dtype=torch.bool, device=dev)

    def encoder_tokens(self) -> torch.Tensor:
        return torch.where(self.known, F.linear(self.tokens, self.embed_w, self.embed_b), self.mask_token)

    def write(self, pred_ids, tokens) -> None:
        # each token is predicted once, so it lands on zeros: writing equals the reference's sum
        self.tokens.index_put_((self.rows, pred_ids), tokens)
        self.known.index_put_((self.rows, pred_ids), self.written)

    def image(self) -> torch.Tensor:
        return unpatchify(self.tokens, self.patch, self.shape)


@_scoped
def new_frame_canvas(self, batch):
    return TokenCanvas(self, batch)


@_scoped
def generate_video(self, *args, **kwargs):
    return type(self).generate_video(self, *args, **kwargs)


@_scoped
def training_losses(self, *args, **kwargs):
    return type(self).training_losses(self, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# accelerate / restore
# ------------------------------------------------------------------------------------------------
def _backend_map(backend: str, device) -> dict:
    if backend == "auto":
        return {}
    ok, why = backends.can_run(backend, device)
    if not ok:
        raise backends.BackendUnavailable(f"accelerate: backend {backend!r} cannot run on {device}: {why}")
    return {op: (backend if backend in supported else "auto") for op, supported in OPS.items()}


def _model_device(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class Patch:
    """One replacement: on every module at ``where`` (released names; ``[]`` = each block of that
    list; ``""`` = the model itself), the method ``method`` becomes ``replacement`` (an instance
    attribute, deleted again by ``restore``), when ``feature`` is on. ``optional``: a target that
    is absent is skipped (and reported) instead of being a layout error."""

    feature: str
    where: str
    method: str
    replacement: Callable
    optional: bool = False


def _has_pos_table(encoder) -> bool:
    return callable(getattr(encoder, "add_pos_embed", None)) and hasattr(encoder, "base_size")


# What accelerate() replaces, where: one line per kernel. Model-level hooks are the methods of
# nova_fast.reference.NOVAModel (a model without them keeps its own code there; the report says so).
PATCHES = (
    Patch("residual_norm", "video_encoder.blocks[]", "forward", encoder_block),
    Patch("residual_norm", "image_encoder.blocks[]", "forward", encoder_block),
    Patch("attention", "video_encoder.blocks[].attn", "attend", attend),
    Patch("attention", "image_encoder.blocks[].attn", "attend", attend),
    Patch("attention", "", "temporal_attention_mask", temporal_attention_mask, optional=True),
    Patch("spatial_read", "image_encoder", "forward", spatial_encoder),
    Patch("pos_embed_table", "image_encoder", "add_pos_embed", add_pos_embed, optional=True),
    Patch("modulate", "video_encoder.mixer", "forward", video_mixer, optional=True),
    Patch("modulate", "image_decoder.blocks[].norm1", "modulate", adaln_modulate),
    Patch("modulate", "image_decoder.norm", "modulate", adaln_modulate),
    Patch("residual_norm", "image_decoder.blocks[]", "residual", head_residual),
    Patch("denoise_tokens", "", "denoise_step_tokens", denoise_step_tokens, optional=True),
    Patch("token_canvas", "", "new_frame_canvas", new_frame_canvas, optional=True),
    # no kernel: one backend scope for the whole call instead of one per patched method
    Patch("backend_scope", "", "generate_video", generate_video, optional=True),
    Patch("backend_scope", "", "training_losses", training_losses, optional=True),
)
FEATURES = tuple(dict.fromkeys(p.feature for p in PATCHES))


def _targets(model, where: str) -> list[tuple[object, str]]:
    """(object, its name) for every module at ``where``; absent parts give an empty list."""
    found = [(model, "")]
    for part in where.split(".") if where else []:
        many = part.endswith("[]")
        name = part[:-2] if many else part
        nxt = []
        for obj, path in found:
            child = getattr(obj, name, None)
            if child is None:
                continue
            base = f"{path}.{name}" if path else name
            nxt += [(blk, f"{base}.{i}") for i, blk in enumerate(child)] if many else [(child, base)]
        found = nxt
    return found


def _applies(model, patch: Patch, obj) -> str | None:
    """None when the patch applies to ``obj``, else why it is skipped."""
    if patch.where == "" and not callable(getattr(type(model), patch.method, None)):
        return f"{type(model).__name__} has no {patch.method}() (not a nova_fast.reference model)"
    if not callable(getattr(type(obj), patch.method, None)):  # only methods the class has are replaced
        return f"{type(obj).__name__} has no {patch.method}() (not a nova_fast.reference module)"
    if patch.replacement is add_pos_embed and not _has_pos_table(obj):
        return "the spatial encoder has no add_pos_embed / base_size"
    return None


def accelerate(model: torch.nn.Module, *, backend: str = "auto", cuda_graphs: bool = True,
               **features: bool) -> torch.nn.Module:
    """Patch ``model`` (a NOVA model with the released module layout) in place and return it.

    backend: "auto", "torch", "triton" or "cuda" (see the module docstring); cuda_graphs: replay the
    per-AR-step denoising loop from CUDA graphs on a GPU. ``features``: switch parts of ``PATCHES``
    off by name (all on by default), e.g. ``accelerate(model, attention=False)``; names: FEATURES.
    Calling it again re-applies it (e.g. with another backend); ``restore(model)`` undoes it.
    Raises LayoutMismatch (naming the first missing attribute), ValueError for an unknown backend
    or feature, BackendUnavailable for a backend that cannot run here.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_official_layout(model)
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ValueError(f"accelerate: unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    backends._check_name(backend)
    check_layout(model)
    per_op = _backend_map(backend, _model_device(model))
    restore(model)

    patched: list[tuple[object, str]] = []
    skipped: dict[str, str] = {}
    for patch in PATCHES:
        if not features.get(patch.feature, True):
            skipped[f"{patch.where or '<model>'}.{patch.method}"] = f"feature {patch.feature!r} switched off"
            continue
        targets = _targets(model, patch.where)
        if not targets and not patch.optional:
            raise LayoutMismatch(f"accelerate: the model has no {patch.where!r}")
        for obj, path in targets:
            why = _applies(model, patch, obj)
            if why is not None:
                skipped[patch.method if patch.where == "" else f"{path}.{patch.method}"] = why
                continue
            setattr(obj, patch.method, types.MethodType(patch.replacement, obj))
            setattr(obj, STATE + "_backends", per_op)  # every patched object knows its backends
            patched.append((obj, patch.method))
    setattr(model, STATE, {"backend": backend, "per_op": dict(per_op), "cuda_graphs": bool(cuda_graphs),
                           "features": {f: features.get(f, True) for f in FEATURES},
                           "patched": patched, "skipped": skipped})
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``accelerate``: every patched method is deleted, so the class's own (reference) runs again."""
    state = model.__dict__.get(STATE)
    if state is None:
        return model
    for obj, name in state["patched"]:
        obj.__dict__.pop(name, None)
        obj.__dict__.pop(STATE + "_backends", None)
    model.__dict__.pop(STATE, None)
    return model


def is_accelerated(model: torch.nn.Module) -> bool:
    return STATE in model.__dict__


def accelerated_report(model: torch.nn.Module) -> dict:
    """What ``accelerate`` did to this model: backend, per-op choices, patched methods, skipped hooks."""
    state = model.__dict__.get(STATE)
    if state is None:
        return {"accelerated": False}
    names = {id(m): n for n, m in model.named_modules()}
    return {"accelerated": True, "backend": state["backend"], "per_op": state["per_op"] or "auto for every op",
            "cuda_graphs": state["cuda_graphs"],
            "patched": [f"{names.get(id(obj), '?') or '<model>'}.{name}" for obj, name in state["patched"]],
            "skipped": state["skipped"]}

