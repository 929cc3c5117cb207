"""Group-causal attention: query i sees key j iff ``k_group[j] <= q_group[i]``, without an N x N mask.

One rule covers NOVA's two structured masks:

- time (block-causal): a token of frame f sees the text prefix and every token of frames <= f,
  bidirectionally inside a frame: ``frame_groups(num_frames, tokens_per_frame, prefix_len)``;
- space (random sets): tokens split into sets in a random order, a token sees every set up to its
  own: ``random_set_groups(num_tokens, set_sizes, generator)``.

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D) (Nk != Nq: e.g. the newest frame's queries over a
KV cache ``[cache..., current]``, groups given per side). Groups are integer tensors (int32; int64
is accepted and converted) of shape (N,) (shared by the batch) or (B, N); ``k_groups`` defaults to
``q_groups`` (then Nk must equal Nq). D is 64 or 128; fp32, fp16, bf16 (q, k, v alike). The output
is (B, H, Nq, D) in q's dtype. A query that sees no key at all returns zeros (its softmax is
empty), with zero gradients. ``scale`` defaults to 1/sqrt(D).

Without groups the call is plain bidirectional attention: flash-attn on CUDA where installed
(fp16/bf16), else ``F.scaled_dot_product_attention``: the lean path NOVA's generation uses.

Unsorted groups (random sets) are made contiguous first: a stable sort by group (per batch row for
(B, N) groups) orders the queries (and keys), the sorted problem is solved, and the output goes back
to the caller's token order. In the sorted problem the keys a query sees are a prefix of the keys
(the first ``searchsorted(k_groups, its group)``), which every backend uses:

- ``torch`` on fp32 CPU tensors: the CPU kernel ``csrc/cpu/group_causal_attention.cpp``
  (``torch.ops.nova_fast_cpu.group_causal_attention_out``, built on first use like the other CPU
  kernels): a flash-attention loop over blocks of 64 sorted queries and 512-key tiles, each block
  over the keys its last row sees, the tiles past its first row's prefix clipped per row. The sort
  is fused into its loads and stores (it reads q, k, v and writes the output in the caller's token
  order), the mask comes from the prefix lengths, and it returns the log-sum-exp the backward takes.
- ``torch`` otherwise (fp16 / bf16 on CPU, the CPU kernels off or not built, other devices):
  queries of consecutive groups in chunks of at least ``CHUNK_QUERIES``, each over the keys all its
  rows see (a prefix view, no mask) and its own key range (a small chunk x range mask), merged
  through their log-sum-exps. On CPU each call is ATen's flash-attention kernel for CPU
  (``_scaled_dot_product_flash_attention_for_cpu``: its forward returns the log-sum-exp and its
  backward takes it); elsewhere explicit fp32 math. The backward always takes this path.
  ``backend_info()["last_used"]["group_causal_attention"]["path"]`` says which ran and why.
  Either way memory is O(N) beyond the inputs.
- ``triton``: ``nova_fast.kernels.group_causal_attention``: FlashAttention-2 forward and backward
  that derive the mask from the group ids in registers and skip key tiles no query of the tile
  sees. :func:`attention_work` reports the tiles it visits.

Autograd: ``torch.library`` custom ops ``nova_fast::group_causal_attention`` (returns out and the
fp32 log-sum-exp, +inf for rows that see no key) and ``nova_fast::group_causal_attention_backward``,
with fake kernels, so the op works under ``torch.compile``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nova_fast import backends, cpu_kernels
from nova_fast.ops._checks import FLOAT_DTYPES, check_last_dim_unit_stride, check_tensor

OP = "group_causal_attention"
HEAD_DIMS = (64, 128)
SUPPORTED = ("torch", "triton")


# ---------------------------------------------------------------- group layouts
def frame_groups(num_frames: int, tokens_per_frame: int, prefix_len: int = 0, *, device=None) -> Tensor:
    """Block-causal groups of NOVA's temporal encoder: ``prefix_len`` text tokens then ``num_frames``
    frames of ``tokens_per_frame`` tokens. The prefix shares group 0 with the first frame (text and
    frame 0 see each other); frame f is group f. Returns int32 (prefix_len + num_frames * tokens_per_frame,).
    """
    for name, value, low in (("num_frames", num_frames, 1), ("tokens_per_frame", tokens_per_frame, 1),
                             ("prefix_len", prefix_len, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    frames = torch.arange(num_frames, dtype=torch.int32, device=device).repeat_interleave(tokens_per_frame)
    return torch.cat([torch.zeros(prefix_len, dtype=torch.int32, device=device), frames])


def random_set_groups(num_tokens: int, set_sizes, generator: torch.Generator | None = None, *,
                      prefix_len: int = 0, device=None) -> Tensor:
    """Groups of NOVA's spatial sets: a random permutation of ``num_tokens`` tokens (drawn with
    ``generator``) split into consecutive sets; a token's group is the index of its set (0..S-1),
    so a token sees every set up to its own.

    ``set_sizes``: a sequence of sizes summing to ``num_tokens``, or an int S (S sets, sizes as equal
    as possible). ``prefix_len`` tokens placed first (e.g. the temporal encoder's output) get group
    0, shared with the first set: every token sees them. Returns int32 (prefix_len + num_tokens,),
    in token order (not sorted).
    """
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    if not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be an int >= 0, got {prefix_len!r}")
    if isinstance(set_sizes, int):
        if not 1 <= set_sizes <= num_tokens:
            raise ValueError(f"set_sizes = {set_sizes} sets must be in 1..num_tokens ({num_tokens})")
        base, extra = divmod(num_tokens, set_sizes)
        sizes = [base + (1 if s < extra else 0) for s in range(set_sizes)]
    else:
        sizes = [int(s) for s in set_sizes]
        if not sizes or min(sizes) < 1 or sum(sizes) != num_tokens:
            raise ValueError(f"set_sizes must be positive and sum to num_tokens ({num_tokens}), got {sizes}")
    set_of_rank = torch.arange(len(sizes), dtype=torch.int32).repeat_interleave(torch.tensor(sizes))
    order = torch.randperm(num_tokens, generator=generator)
    groups = torch.empty(num_tokens, dtype=torch.int32)
    groups[order] = set_of_rank  # the token at rank r of the random order joins the set holding rank r
    groups = torch.cat([torch.zeros(prefix_len, dtype=torch.int32), groups])
    return groups.to(device) if device is not None else groups


# ---------------------------------------------------------------- argument checks
def _check_groups(name: str, g, batch: int, length: int, device) -> Tensor:
    """(G, length) int32 contiguous, G in {1, batch}."""
    if not isinstance(g, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of group ids, got {type(g).__name__}")
    if g.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold integer group ids (int32, or int64), got {str(g.dtype).replace('torch.', '')}")
    if g.device != device:
        raise ValueError(f"{name} is on {g.device} but q is on {device}")
    if g.dim() == 1:
        g = g.unsqueeze(0)
    elif g.dim() != 2 or g.shape[0] != batch:
        raise ValueError(f"{name} must have shape (N,) or (B, N) = (N,) or ({batch}, N), got {tuple(g.shape)}")
    if g.shape[1] != length:
        raise ValueError(f"{name} has length {g.shape[1]} but the sequence it labels has {length} tokens")
    return g.to(torch.int32).contiguous()


def _check_inputs(q, k, v):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"mixed dtypes: {name} is {str(t.dtype).replace('torch.', '')} but q is "
                            f"{str(q.dtype).replace('torch.', '')}; q, k, v must have the same dtype")
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected (B, H, Nk, D) = ({B}, {H}, Nk, {D}) to match q "
                         f"{tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D = {D} (last dimension of q) is not supported: expected one of {HEAD_DIMS}")
    if Nq < 1 or k.shape[2] < 1:
        raise ValueError(f"empty sequence: q has Nq = {Nq}, k has Nk = {k.shape[2]} tokens")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_unit_stride(name, t)


def needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------- torch backend
# Queries of consecutive small groups are batched into chunks of at least CHUNK_QUERIES rows: one
# call per tiny group (random sets of ~20 tokens) costs more in per-call overhead and poor blocking
# than it saves. A chunk of groups g_a..g_b attends (1) over the keys every one of its queries sees
# (group < g_a: a prefix, no mask) and (2) over its own key range (groups g_a..g_b) with a small
# (chunk x range) mask built from the group ids; the two are merged through their log-sum-exps.
CHUNK_QUERIES = 256


def _plan(qg: Tensor, kg: Tensor) -> list[tuple[int, int, int, int]]:
    """Work items (q_start, q_end, k_lo, k_hi) for sorted 1-D groups: queries [q_start, q_end) see
    all keys [0, k_lo) and, by the rule, some of [k_lo, k_hi) (k_lo == k_hi: a single group, whose
    visible keys are exactly the prefix [0, k_lo))."""
    values, counts = torch.unique_consecutive(qg, return_counts=True)
    k_end = torch.searchsorted(kg, values, right=True).tolist()
    k_start = torch.searchsorted(kg, values, right=False).tolist()
    counts = counts.tolist()
    items, start, i = [], 0, 0
    while i < len(counts):
        j, rows = i, counts[i]
        while rows < CHUNK_QUERIES and j + 1 < len(counts):
            j += 1
            rows += counts[j]
        if j == i:
            items.append((start, start + rows, k_end[i], k_end[i]))
        else:
            items.append((start, start + rows, k_start[i], k_end[j]))
        start += rows
        i = j + 1
    return items


def _batch_rows(q_groups: Tensor, k_groups: Tensor):
    """(batch slice, 1-D q groups, 1-D k groups, plan) per row of the (G, N) groups (G == 1: whole batch)."""
    if q_groups.shape[0] == 1:
        return [(slice(None), q_groups[0], k_groups[0], _plan(q_groups[0], k_groups[0]))]
    return [(slice(b, b + 1), q_groups[b], k_groups[b], _plan(q_groups[b], k_groups[b]))
            for b in range(q_groups.shape[0])]


def _chunk_mask(qg: Tensor, kg: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """Additive (1, 1, rows, keys) mask of the rule for one chunk, and the rows that see no key in it
    (their mask row is opened so the kernel stays finite; callers drop their contribution)."""
    visible = kg[None, :] <= qg[:, None]
    blind = ~visible.any(-1)
    visible |= blind[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=qg.device).masked_fill_(~visible, float("-inf"))
    return mask[None, None], blind


def _attend(q, k, v, scale, mask=None):
    """(out, natural-log lse fp32) of softmax(q k^T * scale + mask) v."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype), lse


def _attend_backward(do, q, k, v, out, lse, scale, mask=None):
    """(dq, dk, dv) of _attend for rows whose full-softmax out / lse are given (so any key subset is exact)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    p = torch.exp(s - lse.unsqueeze(-1))
    dp = torch.matmul(do.float(), v.float().transpose(-1, -2))
    ds = p * (dp - (do.float() * out.float()).sum(-1, keepdim=True))
    return (torch.matmul(ds, k.float()) * scale, torch.matmul(ds.transpose(-1, -2), q.float()) * scale,
            torch.matmul(p.transpose(-1, -2), do.float()))


# ---------------------------------------------------------------- torch backend: the CPU kernel
CPU_KERNEL_PATH = ("CPU kernel (csrc/cpu/group_causal_attention.cpp): fp32 on CPU, mask from the group ids, "
                   "the sort fused into its loads and stores")


def _cpu_kernel_ready(q: Tensor) -> bool:
    """The CPU kernel runs fp32 CPU tensors once built (cpu_kernels builds it on this first call)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and cpu_kernels.available_for(q)


def _chunk_path(q: Tensor) -> str:
    """What the torch backend runs when its CPU kernel does not, and why (reported by backend_info)."""
    if q.device.type != "cpu":
        return "explicit fp32 math per query chunk (not CPU tensors)"
    why = (f"{str(q.dtype).replace('torch.', '')}: the CPU kernel is fp32 only" if q.dtype != torch.float32
           else cpu_kernels.status()[1])
    return f"ATen flash attention for CPU per query chunk ({why})"


def _forward_cpu_kernel(q, k, v, q_order, k_order, qg, kg, scale):
    """(out, lse) by the CPU kernel. qg, kg: (G, N) groups in sorted order; q_order / k_order: the
    (G, N) int64 orders that sort the caller's tokens (None: already sorted). out and lse come back
    in the caller's token order."""
    # keys sorted by group: the keys a query sees are the first searchsorted(kg, its group) of them
    k_visible = torch.searchsorted(kg, qg, right=True)
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    backends.record_path(OP, CPU_KERNEL_PATH)
    torch.ops.nova_fast_cpu.group_causal_attention_out(q, k, v, q_order, k_order, k_visible, scale, out, lse)
    return out, lse


def _forward_torch(q, k, v, q_groups, k_groups, scale):
    if _cpu_kernel_ready(q):
        return _forward_cpu_kernel(q, k, v, None, None, q_groups, k_groups, scale)
    backends.record_path(OP, _chunk_path(q))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for bs, qg, kg, plan in _batch_rows(q_groups, k_groups):
        for qs, qe, k_lo, k_hi in plan:
            qq = q[bs, :, qs:qe]
            if k_lo == k_hi and k_lo == 0:  # sees no key: output 0, lse +inf (zero probabilities in backward)
                out[bs, :, qs:qe] = 0
                lse[bs, :, qs:qe] = float("inf")
                continue
            o, l = _attend(qq, k[bs, :, :k_lo], v[bs, :, :k_lo], scale) if k_lo else (None, None)
            if k_hi > k_lo:
                mask, blind = _chunk_mask(qg[qs:qe], kg[k_lo:k_hi], q.dtype)
                o2, l2 = _attend(qq, k[bs, :, k_lo:k_hi], v[bs, :, k_lo:k_hi], scale, mask)
                l2 = l2.masked_fill(blind, float("-inf"))
                if o is None:  # nothing before the chunk: rows blind here see no key at all
                    o, l = o2.masked_fill(blind[:, None], 0), l2.masked_fill(blind, float("inf"))
                else:
                    l_all = torch.logaddexp(l, l2)
                    o = (o * torch.exp(l - l_all).unsqueeze(-1) + o2 * torch.exp(l2 - l_all).unsqueeze(-1)).to(q.dtype)
                    l = l_all
            out[bs, :, qs:qe] = o
            lse[bs, :, qs:qe] = l
    return out, lse


def _backward_torch(dout, q, k, v, out, lse, q_groups, k_groups, scale):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # keys collect gradient from every group that sees them: accumulate in fp32
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dout = dout.contiguous()
    for bs, qg, kg, plan in _batch_rows(q_groups, k_groups):
        for qs, qe, k_lo, k_hi in plan:
            qq, do, o, l = q[bs, :, qs:qe], dout[bs, :, qs:qe], out[bs, :, qs:qe], lse[bs, :, qs:qe].contiguous()
            if k_lo:
                gq, gk, gv = _attend_backward(do, qq, k[bs, :, :k_lo], v[bs, :, :k_lo], o, l, scale)
                dq[bs, :, qs:qe] += gq
                dk[bs, :, :k_lo] += gk
                dv[bs, :, :k_lo] += gv
            if k_hi > k_lo:
                mask, blind = _chunk_mask(qg[qs:qe], kg[k_lo:k_hi], q.dtype)
                if blind.any():  # rows opened only to keep the kernel finite: no gradient through them
                    do = do.masked_fill(blind[:, None], 0)
                    l = l.masked_fill(blind, 0).contiguous()
                gq, gk, gv = _attend_backward(do, qq, k[bs, :, k_lo:k_hi], v[bs, :, k_lo:k_hi], o, l, scale, mask)
                dq[bs, :, qs:qe] += gq
                dk[bs, :, k_lo:k_hi] += gk
                dv[bs, :, k_lo:k_hi] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------- triton backend
def _forward_triton(q, k, v, q_groups, k_groups, scale):
    from nova_fast.kernels import group_causal_attention as kernels

    return kernels.forward(q, k, v, q_groups, k_groups, scale)


def _backward_triton(dout, q, k, v, out, lse, q_groups, k_groups, scale):
    from nova_fast.kernels import group_causal_attention as kernels

    return kernels.backward(dout, q, k, v, out, lse, q_groups, k_groups, scale)


FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------- torch.library registration
@torch.library.custom_op("nova_fast::group_causal_attention", mutates_args=())
def group_causal_attention_op(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, k_groups: Tensor,
                              scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) for groups already sorted along the sequence, (G, N) int32 with G in {1, B}."""
    backend = backends.resolve(OP, q.device, SUPPORTED)
    return FORWARD[backend](q, k, v, q_groups, k_groups, scale)


@group_causal_attention_op.register_fake
def _(q, k, v, q_groups, k_groups, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nova_fast::group_causal_attention_backward", mutates_args=())
def group_causal_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                       q_groups: Tensor, k_groups: Tensor, scale: float
                                       ) -> tuple[Tensor, Tensor, Tensor]:
    backend = backends.resolve(OP, q.device, SUPPORTED)
    return BACKWARD[backend](dout, q, k, v, out, lse, q_groups, k_groups, scale)


@group_causal_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, q_groups, k_groups, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_groups, k_groups, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_groups, k_groups)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, q_groups, k_groups = ctx.saved_tensors
    dq, dk, dv = group_causal_attention_backward_op(dout, q, k, v, out, lse, q_groups, k_groups, ctx.scale)
    return dq, dk, dv, None, None, None


group_causal_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- sorting (random sets)
def _is_sorted(g: Tensor) -> bool:
    return g.shape[1] < 2 or bool((g[:, 1:] >= g[:, :-1]).all())


def _sort_order(g: Tensor) -> Tensor:
    """Stable order that sorts each row of (G, N) groups (int64 indices)."""
    return torch.sort(g, dim=1, stable=True).indices


def _permute(x: Tensor, order: Tensor) -> Tensor:
    """x (B, H, N, D) with its tokens in ``order`` ((1, N) shared, or (B, N) per batch row)."""
    if order.shape[0] == 1:
        return x.index_select(2, order[0])
    index = order[:, None, :, None].expand(x.shape[0], x.shape[1], order.shape[1], x.shape[3])
    return torch.gather(x, 2, index)


def _inverse(order: Tensor) -> Tensor:
    inv = torch.empty_like(order)
    inv.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return inv


# ---------------------------------------------------------------- public API
def _dense(q, k, v, scale):
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            backends.record(OP, "torch", "no groups: dense attention (flash-attn)")
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
            return out.transpose(1, 2)
    backends.record(OP, "torch", "no groups: dense attention (F.scaled_dot_product_attention)")
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_causal_attention(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor | None = None,
                           k_groups: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """Attention where query i sees key j iff ``k_groups[j] <= q_groups[i]``.

    q (B, H, Nq, D), k and v (B, H, Nk, D), D in (64, 128), fp32/fp16/bf16. q_groups: integer
    (Nq,) or (B, Nq); k_groups: (Nk,) or (B, Nk), default q_groups (requires Nk == Nq). Without
    groups: plain bidirectional attention. Rows that see no key return 0. Returns (B, H, Nq, D).
    Differentiable in q, k and v.
    """
    _check_inputs(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q_groups is None:
        if k_groups is not None:
            raise ValueError("k_groups given without q_groups: pass q_groups too (or neither for dense attention)")
        wanted, _ = backends.requested_backend(OP)
        if wanted in ("auto", "torch"):
            return _dense(q, k, v, scale)
        backends.resolve(OP, q.device, SUPPORTED)  # explicit triton: the kernel with every token in group 0
        q_groups = torch.zeros(Nq, dtype=torch.int32, device=q.device)
        k_groups = torch.zeros(Nk, dtype=torch.int32, device=q.device)
    qg = _check_groups("q_groups", q_groups, B, Nq, q.device)
    if k_groups is None:
        if Nk != Nq:
            raise ValueError(f"k_groups is required when k has a different length than q (Nk = {Nk}, Nq = {Nq})")
        kg, shared = qg, True
    else:
        kg, shared = _check_groups("k_groups", k_groups, B, Nk, q.device), False
    if qg.shape[0] != kg.shape[0]:  # one side per batch row, the other shared: expand the shared one
        qg, kg = qg.expand(B, -1).contiguous(), kg.expand(B, -1).contiguous()

    q_order = None if _is_sorted(qg) else _sort_order(qg)
    if q_order is not None:
        qg = torch.gather(qg, 1, q_order)
    if shared:
        k_order, kg = q_order, qg
    else:
        k_order = None if _is_sorted(kg) else _sort_order(kg)
        if k_order is not None:
            kg = torch.gather(kg, 1, k_order)

    training = needs_autograd(q, k, v) or torch.compiler.is_compiling()
    if not training:  # inference: no autograd bookkeeping
        backend = backends.resolve(OP, q.device, SUPPORTED)
        if backend == "torch" and _cpu_kernel_ready(q):  # reads and writes the caller's token order
            return _forward_cpu_kernel(q, k, v, q_order, k_order, qg, kg, scale)[0]
    if q_order is not None:
        q = _permute(q, q_order)
    if k_order is not None:
        k, v = _permute(k, k_order), _permute(v, k_order)
    if training:
        out = group_causal_attention_op(q, k, v, qg, kg, scale)[0]
    else:
        out = FORWARD[backend](q, k, v, qg, kg, scale)[0]
    return out if q_order is None else _permute(out, _inverse(q_order))


def attention_work(q_groups: Tensor, k_groups: Tensor | None = None, *, block_m: int | None = None,
                   block_n: int | None = None, head_dim: int = 64) -> dict:
    """Work of one call for these groups (after the op's sort), next to the dense problem.

    ``tiles_visited / tiles_total``: (query tile, key tile) pairs the Triton forward visits, by the
    kernel's own rule (a key tile is skipped when its smallest group exceeds the query tile's largest),
    with the forward's block sizes for ``head_dim`` unless block_m/block_n are given.
    ``pairs_visible / pairs_total``: (query, key) pairs the rule lets through, which is exactly
    what the torch backend computes. Groups (N,) or (B, N); fractions are averaged over the batch.
    """
    from nova_fast.kernels.group_causal_attention import FWD_CONFIG, tile_plan

    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim = {head_dim} is not supported: expected one of {HEAD_DIMS}")
    def rows(name, g):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of group ids, got {type(g).__name__}")
        return _check_groups(name, g, g.shape[0] if g.dim() == 2 else 1, g.shape[-1], g.device)

    qg = rows("q_groups", q_groups)
    kg = qg if k_groups is None else rows("k_groups", k_groups).to(qg.device)
    if qg.shape[0] != kg.shape[0]:
        if min(qg.shape[0], kg.shape[0]) != 1:
            raise ValueError(f"q_groups and k_groups have different batch sizes: {qg.shape[0]} and {kg.shape[0]}")
        batch = max(qg.shape[0], kg.shape[0])
        qg, kg = qg.expand(batch, -1), kg.expand(batch, -1)
    # the op sorts unsorted layouts before attending: count the sorted problem
    qg = torch.sort(qg, dim=1, stable=True).values.contiguous()
    kg = torch.sort(kg, dim=1, stable=True).values.contiguous()
    cfg = FWD_CONFIG[head_dim]
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    kv_tiles, _ = tile_plan(qg, kg, bm, bn)
    rows = qg.shape[0]
    Nq, Nk = qg.shape[1], kg.shape[1]
    visited = int(kv_tiles.sum())
    total = rows * kv_tiles.shape[1] * -(-Nk // bn)
    pairs = int(torch.searchsorted(kg, qg, right=True).sum())
    return {"block_m": bm, "block_n": bn, "tiles_visited": visited, "tiles_total": total,
            "tile_fraction": visited / total, "pairs_visible": pairs, "pairs_total": rows * Nq * Nk,
            "pair_fraction": pairs / (rows * Nq * Nk)}
