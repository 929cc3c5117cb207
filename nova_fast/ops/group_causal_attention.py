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

Every backend works on the problem sorted by group: a stable sort by group (per batch row for
(B, N) groups) orders the queries (and keys), and in the sorted problem the keys a query sees are a
prefix of the keys (the first ``searchsorted(k_groups, its group)``). A :class:`MaskPlan` holds the
sort orders, those prefix lengths and the kernels' tile plans, built on the groups' device with no
host synchronisation; it is built once per mask (cached on the group tensors, or built by the caller
and passed in place of ``q_groups``) and shared by every layer and by the backward. The kernels
read q, k, v and write the outputs in the caller's token order through the orders:

- ``torch`` on fp32 CPU tensors: the CPU kernel ``csrc/cpu/group_causal_attention.cpp``
  (``torch.ops.nova_fast_cpu.group_causal_attention_out``, built on first use like the other CPU
  kernels): a flash-attention loop over blocks of 64 sorted queries and 512-key tiles, each block
  over the keys its last row sees, the tiles past its first row's prefix clipped per row. The sort
  is fused into its loads and stores (it reads q, k, v and writes the output in the caller's token
  order), the mask comes from the prefix lengths, and it returns the log-sum-exp the backward takes.
- ``torch`` otherwise (fp16 / bf16 on CPU, the CPU kernels off or not built, other devices):
  q, k, v gathered into sorted order, then queries of consecutive groups in chunks of at least
  ``CHUNK_QUERIES``, each over the keys all its rows see (a prefix view, no mask) and its own key
  range (a small chunk x range mask), merged through their log-sum-exps; the results scattered back.
  On CPU each call is ATen's flash-attention kernel for CPU
  (``_scaled_dot_product_flash_attention_for_cpu``: its forward returns the log-sum-exp and its
  backward takes it); elsewhere explicit fp32 math. The chunk plan is read on the host, so this
  fallback synchronises on a GPU (the Triton backend, auto's choice there, does not). The backward
  always takes this path. ``backend_info()["last_used"]["group_causal_attention"]["path"]`` says
  which ran and why. Either way memory is O(N) beyond the inputs.
- ``triton``: ``nova_fast.kernels.group_causal_attention``: FlashAttention-2 forward and backward
  that gather rows through the plan's orders, run the key tiles every row of a query tile sees
  without mask arithmetic and mask only the partial tiles, skip the rest, and take the heaviest
  tiles first. :func:`attention_work` reports the tiles it visits. On sm_90, fp16/bf16 with groups
  known to be in token order (``MaskPlan.sorted_tokens``: built by :func:`frame_groups`, no device
  read; or tagged by :func:`mark_if_in_token_order`, one read where it pays off) the forward loads
  and stores tiles by TMA instead; the path says which forward ran. The
  backward is deterministic by default (a dk/dv and a dq kernel, 7 tile GEMMs, no atomics);
  ``deterministic=False`` takes FlashAttention-2's 5 (dq added by atomics in the dk/dv kernel);
  ``backend_info()``'s ``backward_path`` says which ran (the torch backend has one backward,
  deterministic, run either way). Tile sizes per architecture come from the kernels' generated table
  (the atomic backward on its own entries, so its own key-tile plan).

Autograd: ``torch.library`` custom ops ``nova_fast::group_causal_attention`` (takes the plan's
tensors, returns out and the fp32 log-sum-exp in token order, +inf for rows that see no key) and
``nova_fast::group_causal_attention_backward``, with fake kernels, so the op works under
``torch.compile`` (``fullgraph=True``: nothing in the call breaks the graph).
"""
from __future__ import annotations

import itertools
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
    return _mark_sorted(torch.cat([torch.zeros(prefix_len, dtype=torch.int32, device=device), frames]))


def _mark_sorted(groups: Tensor) -> Tensor:
    """Tag groups built non-decreasing, so a plan knows its sort is the identity without reading
    them (a device read would synchronise); an in-place change (new version) drops the tag."""
    try:
        groups._nova_fast_sorted_version = groups._version
    except RuntimeError:  # inference tensors have no version counter: no tag, the plan assumes unsorted
        pass
    return groups


def _known_sorted(groups: Tensor) -> bool:
    """True if ``groups`` is known non-decreasing without reading it (on any device: a read on a GPU
    would synchronise): built by :func:`frame_groups` and not changed in place since."""
    if torch.compiler.is_compiling():
        return False
    try:
        return getattr(groups, "_nova_fast_sorted_version", None) == groups._version
    except RuntimeError:  # inference tensors: no version counter
        return False


def _token_order_pays_off(device: torch.device) -> bool:
    """Knowing that groups are in token order changes the kernel on ``device``: the TMA forward runs
    there (not while a CUDA graph is being captured: no host read is allowed then)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return False
    from nova_fast.kernels.group_causal_attention import tma_device

    return tma_device(device)[0]


def mark_if_in_token_order(groups: Tensor) -> Tensor:
    """``groups``, tagged as :func:`frame_groups` tags its result if they are non-decreasing and the
    tag can pay off, so that plans built from them may take the TMA forward.

    For callers handed a layout they did not build (``accelerate``'s training forward gets the
    reference's frame ids): deciding needs a read of the groups, one device-to-host copy that
    synchronises on a GPU, so it happens once per mask (not per layer) and only where the TMA
    forward runs (sm_90, see ``kernels.group_causal_attention.tma_device``). Elsewhere, under
    torch.compile and during CUDA-graph capture (where a read is not allowed) the groups come back
    as they are, unread: plans then take the gather forward, which is correct for any order."""
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups must be a torch.Tensor of group ids, got {type(groups).__name__}")
    if torch.compiler.is_compiling() or _known_sorted(groups) or not _token_order_pays_off(groups.device):
        return groups
    if groups.numel() < 2 or bool((groups[..., 1:] >= groups[..., :-1]).all()):  # the one host read
        return _mark_sorted(groups)
    return groups


def random_set_groups(num_tokens: int, set_sizes, generator: torch.Generator | None = None, *,
                      prefix_len: int = 0, device=None) -> Tensor:
    """Groups of NOVA's spatial sets: a random permutation of ``num_tokens`` tokens (drawn with
    ``generator``) split into consecutive sets; a token's group is the index of its set (0..S-1),
    so a token sees every set up to its own.

    ``set_sizes``: a sequence of sizes summing to ``num_tokens``, or an int S (S sets, sizes as equal
    as possible). ``prefix_len`` tokens placed first (e.g. the temporal encoder's output) get group
    0, shared with the first set: every token sees them. Returns int32 (prefix_len + num_tokens,),
    in token order (not sorted), on ``device`` (default: the generator's device, else CPU), built
    there: the permutation is drawn on the generator's device (torch's CPU and CUDA generators give
    different permutations for one seed).
    """
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    if not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be an int >= 0, got {prefix_len!r}")
    if isinstance(set_sizes, int):
        if not 1 <= set_sizes <= num_tokens:
            raise ValueError(f"set_sizes = {set_sizes} sets must be in 1..num_tokens ({num_tokens})")
        sizes = None
    else:
        sizes = [int(s) for s in set_sizes]
        if not sizes or min(sizes) < 1 or sum(sizes) != num_tokens:
            raise ValueError(f"set_sizes must be positive and sum to num_tokens ({num_tokens}), got {sizes}")
    # drawn and built where the groups live (the generator's device when one is given): no host
    # tensor is made and copied over
    where = torch.device(device) if device is not None else (generator.device if generator is not None
                                                              else torch.device("cpu"))
    draw_on = generator.device if generator is not None else where
    rank = torch.arange(num_tokens, dtype=torch.int32, device=where)
    if sizes is None:  # S sets, sizes as equal as possible: the first `extra` sets hold one more
        base, extra = divmod(num_tokens, set_sizes)
        big = extra * (base + 1)
        set_of_rank = torch.where(rank < big, rank // (base + 1), extra + (rank - big) // base)
    else:
        set_of_rank = torch.zeros(num_tokens, dtype=torch.int32, device=where)
        for end in itertools.accumulate(sizes[:-1]):
            set_of_rank[end:] += 1
    order = torch.randperm(num_tokens, generator=generator, device=draw_on).to(where)
    groups = torch.empty(num_tokens, dtype=torch.int32, device=where)
    groups[order] = set_of_rank  # the token at rank r of the random order joins the set holding rank r
    return torch.cat([torch.zeros(prefix_len, dtype=torch.int32, device=where), groups])


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


def _forward_cpu_kernel(q, k, v, plan_args, scale):
    """(out, lse) by the CPU kernel, in the caller's token order: it reads q, k, v through the orders."""
    q_order, k_order, k_visible = _cpu_index(plan_args)
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    backends.record_path(OP, CPU_KERNEL_PATH)
    torch.ops.nova_fast_cpu.group_causal_attention_out(q, k, v, q_order, k_order, k_visible, scale, out, lse)
    return out, lse


def _host_order(order: Tensor) -> Tensor | None:
    """None for an identity order (groups already sorted) of CPU tensors, where checking costs no
    device wait; the order itself otherwise (on a device it is never read on the host)."""
    if order.device.type == "cpu" and (order.shape[1] < 2 or bool((order[:, 1:] > order[:, :-1]).all())):
        return None
    return order


def _cpu_index(plan_args):
    """The CPU kernel's int64 (q_order, k_order, k_visible), an identity order passed as None."""
    q_order, k_order, _, _, k_visible = plan_args
    q_order, k_order = _host_order(q_order), _host_order(k_order)
    return (None if q_order is None else q_order.long().contiguous(),
            None if k_order is None else k_order.long().contiguous(), k_visible.long().contiguous())


def _forward_torch(q, k, v, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale, sorted_tokens=False):
    """(out, lse) in token order; the plan arguments as :class:`MaskPlan` holds them."""
    plan_args = (q_order, k_order, q_groups, k_groups, k_visible)
    if _cpu_kernel_ready(q):
        return _forward_cpu_kernel(q, k, v, plan_args, scale)
    backends.record_path(OP, _chunk_path(q))
    q_order, k_order = _host_order(q_order), _host_order(k_order)
    out, lse = _forward_chunks(_permute(q, q_order), _permute(k, k_order), _permute(v, k_order),
                               q_groups, k_groups, scale)
    return _unpermute(out, q_order), _unpermute(lse, q_order)


TORCH_BACKWARD_PATH = "torch chunked backward (ATen flash attention per query chunk): deterministic"


def _backward_torch(dout, q, k, v, out, lse, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale,
                    deterministic=True):
    # one deterministic backward only (no atomics anywhere): deterministic=False, a permission to run
    # a non-deterministic backward, is satisfied by it, and backend_info's backward_path says so
    backends.record_path(OP, TORCH_BACKWARD_PATH + ("" if deterministic else
                                                    " (deterministic=False: this backend has no atomic-dq variant)"),
                         field="backward_path")
    q_order, k_order = _host_order(q_order), _host_order(k_order)
    qo = lambda t: _permute(t, q_order)  # noqa: E731
    dq, dk, dv = _backward_chunks(qo(dout), qo(q), _permute(k, k_order), _permute(v, k_order), qo(out), qo(lse),
                                  q_groups, k_groups, scale)
    return _unpermute(dq, q_order), _unpermute(dk, k_order), _unpermute(dv, k_order)


def _forward_chunks(q, k, v, q_groups, k_groups, scale):
    """(out, lse) of the chunked path for q, k, v and (G, N) groups all in sorted order."""
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


def _backward_chunks(dout, q, k, v, out, lse, q_groups, k_groups, scale):
    """(dq, dk, dv) of the chunked path, every argument in sorted order."""
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
def _forward_triton(q, k, v, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale, sorted_tokens=False):
    from nova_fast.kernels import group_causal_attention as kernels

    path, why = kernels.forward_path(q, sorted_tokens)
    backends.record_path(OP, f"triton {path} forward: {why}")
    return kernels.forward(q, k, v, q_order, k_order, k_visible, scale, sorted_tokens)


TRITON_BACKWARD_PATHS = {
    True: "triton deterministic backward: dk/dv kernel then dq kernel, 7 tile GEMMs, no atomics",
    False: "triton atomic backward (deterministic=False): dq by atomic adds in the dk/dv kernel, 5 tile GEMMs, "
           "dq summation order varies between runs",
}


def _backward_triton(dout, q, k, v, out, lse, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale,
                     deterministic=True):
    from nova_fast.kernels import group_causal_attention as kernels

    backends.record_path(OP, TRITON_BACKWARD_PATHS[deterministic], field="backward_path")
    return kernels.backward(dout, q, k, v, out, lse, q_order, k_order, k_visible, key_tiles, scale, deterministic)


FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------- torch.library registration
# The plan arguments (see MaskPlan): q_order / k_order (G, N) int32 sorted position -> token,
# q_groups / k_groups (G, N) int32 sorted, k_visible (G, Nq) int32, key_tiles (G, 2, key tiles) int32
# or None (the Triton backward's dk/dv plan). q, k, v, out, lse and the gradients are in token order.
@torch.library.custom_op("nova_fast::group_causal_attention", mutates_args=())
def group_causal_attention_op(q: Tensor, k: Tensor, v: Tensor, q_order: Tensor, k_order: Tensor, q_groups: Tensor,
                              k_groups: Tensor, k_visible: Tensor, key_tiles: Tensor | None,
                              scale: float, sorted_tokens: bool = False, deterministic: bool = True
                              ) -> tuple[Tensor, Tensor]:
    """(out, fp32 lse) in token order. ``sorted_tokens``: both orders are the identity (MaskPlan.sorted_tokens).
    ``deterministic``: only kept for the backward (the forward is deterministic on every backend)."""
    backend = backends.resolve(OP, q.device, SUPPORTED)
    return FORWARD[backend](q, k, v, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale, sorted_tokens)


@group_causal_attention_op.register_fake
def _(q, k, v, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale, sorted_tokens=False,
      deterministic=True):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nova_fast::group_causal_attention_backward", mutates_args=())
def group_causal_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                       q_order: Tensor, k_order: Tensor, q_groups: Tensor, k_groups: Tensor,
                                       k_visible: Tensor, key_tiles: Tensor | None, scale: float,
                                       deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    backend = backends.resolve(OP, q.device, SUPPORTED)
    return BACKWARD[backend](dout, q, k, v, out, lse, q_order, k_order, q_groups, k_groups, k_visible, key_tiles,
                             scale, deterministic)


@group_causal_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, q_order, k_order, q_groups, k_groups, k_visible, key_tiles, scale, deterministic=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *plan, scale, _sorted_tokens, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *plan[:-1])
    ctx.key_tiles = plan[-1]  # optional: save_for_backward takes tensors only
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *plan = ctx.saved_tensors
    dq, dk, dv = group_causal_attention_backward_op(dout, q, k, v, out, lse, *plan, ctx.key_tiles, ctx.scale,
                                                    ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


group_causal_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- permutations (torch backend)
def _permute(x: Tensor, order: Tensor | None) -> Tensor:
    """x (B, H, N, ...) with its tokens (dim 2) in ``order`` ((1, N) shared, or (B, N) per batch row;
    None: already in order)."""
    if order is None:
        return x
    order = order.long()
    if order.shape[0] == 1:
        return x.index_select(2, order[0])
    index = order[:, None, :].reshape(order.shape[0], 1, order.shape[1], *([1] * (x.dim() - 3)))
    return torch.gather(x, 2, index.expand(x.shape[0], x.shape[1], *x.shape[2:]))


def _unpermute(x: Tensor, order: Tensor | None) -> Tensor:
    """The inverse of :func:`_permute`: x in sorted order back to token order."""
    if order is None:
        return x
    order = order.long()
    out = torch.empty_like(x)
    if order.shape[0] == 1:
        return out.index_copy_(2, order[0], x)
    index = order[:, None, :].reshape(order.shape[0], 1, order.shape[1], *([1] * (x.dim() - 3)))
    return out.scatter_(2, index.expand(x.shape[0], x.shape[1], *x.shape[2:]), x)


# ---------------------------------------------------------------- mask plan
class MaskPlan:
    """Everything the kernels need to know about one mask, built once on the groups' device with no
    host synchronisation, and reused by every call that shares the mask (layers, steps, backward).

    ``MaskPlan(q_groups, k_groups=None, batch=None)``: groups as :func:`group_causal_attention` takes
    them; ``batch`` is needed only when one side is per batch row and the other shared. Holds (G,
    N) int32 tensors, G in {1, B}: ``q_order`` / ``k_order`` (sorted position -> token: the stable
    sort by group), ``q_sorted`` / ``k_sorted`` (the groups in that order) and ``k_visible``
    (keys the query at sorted position i sees: the first k_visible[i] sorted keys); plus each
    kernel's tile plan, built on first use per block size and cached (:meth:`key_tiles`,
    :meth:`query_tiles`). Pass it as ``q_groups`` to :func:`group_causal_attention`. Plain group
    tensors get one cached on them too (keyed on their in-place version), except inference tensors
    (no version counter), calls in inference mode and under torch.compile: there a caller that
    wants the reuse builds the plan once and passes it.
    """

    def __init__(self, q_groups: Tensor, k_groups: Tensor | None = None, *, batch: int | None = None):
        def rows(name, g, length=None):
            if not isinstance(g, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of group ids, got {type(g).__name__}")
            return _check_groups(name, g, g.shape[0] if g.dim() == 2 else 1, g.shape[-1] if length is None
                                 else length, q_groups.device)

        qg = rows("q_groups", q_groups)
        kg = qg if k_groups is None else rows("k_groups", k_groups)
        if qg.shape[0] != kg.shape[0]:
            if min(qg.shape[0], kg.shape[0]) != 1:
                raise ValueError(f"q_groups and k_groups have different batch sizes: {qg.shape[0]} and {kg.shape[0]}")
            rows_b = max(qg.shape[0], kg.shape[0])
            if batch is not None and batch != rows_b:
                raise ValueError(f"batch = {batch} but the per-batch groups have {rows_b} rows")
            qg, kg = qg.expand(rows_b, -1).contiguous(), kg.expand(rows_b, -1).contiguous()
        self.device = qg.device
        self.batch_rows = qg.shape[0]
        self.Nq, self.Nk = qg.shape[1], kg.shape[1]
        q_sorted, q_order = torch.sort(qg, dim=1, stable=True)
        self.q_sorted, self.q_order = q_sorted.contiguous(), q_order.to(torch.int32).contiguous()
        if k_groups is None:
            self.k_sorted, self.k_order = self.q_sorted, self.q_order
        else:
            k_sorted, k_order = torch.sort(kg, dim=1, stable=True)
            self.k_sorted, self.k_order = k_sorted.contiguous(), k_order.to(torch.int32).contiguous()
        self.k_visible = torch.searchsorted(self.k_sorted, self.q_sorted, right=True, out_int32=True).contiguous()
        # both sorts are the identity, known without a device read: the Triton forward may load tiles by TMA
        self.sorted_tokens = _known_sorted(q_groups) and (k_groups is None or _known_sorted(k_groups))
        self._key_tiles: dict[tuple[int, int], Tensor] = {}
        self._query_tiles: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def check(self, B: int, Nq: int, Nk: int, device) -> None:
        """Refuse a plan that does not describe this call's shapes."""
        if self.device != device:
            raise ValueError(f"the mask plan is on {self.device} but q is on {device}")
        if (self.Nq, self.Nk) != (Nq, Nk):
            raise ValueError(f"the mask plan is for Nq = {self.Nq}, Nk = {self.Nk} tokens but q has {Nq}, k has {Nk}")
        if self.batch_rows not in (1, B):
            raise ValueError(f"the mask plan has {self.batch_rows} batch rows but q has batch {B}")

    def args(self, key_tiles: Tensor | None = None) -> tuple:
        return (self.q_order, self.k_order, self.q_sorted, self.k_sorted, self.k_visible, key_tiles)

    def key_tiles(self, block_m: int, block_n: int) -> Tensor:
        """The plan of a kernel looping over key tiles (the dk/dv or atomic-dq backward) for (block_m,
        block_n) tiles (cached per size: the two backwards' tiles differ)."""
        if (block_m, block_n) not in self._key_tiles:
            from nova_fast.kernels.group_causal_attention import key_tile_plan

            self._key_tiles[block_m, block_n] = key_tile_plan(self.k_visible, self.Nk, block_m, block_n)
        return self._key_tiles[block_m, block_n]

    def query_tiles(self, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
        """(n_full, n_end) per query tile: the forward's and dq's full and partial key-tile ranges (cached)."""
        if (block_m, block_n) not in self._query_tiles:
            from nova_fast.kernels.group_causal_attention import query_tile_plan

            self._query_tiles[block_m, block_n] = query_tile_plan(self.k_visible, block_m, block_n)
        return self._query_tiles[block_m, block_n]


def _plan_for(q_groups: Tensor, k_groups: Tensor | None, B: int, Nq: int, Nk: int, device) -> MaskPlan:
    """The plan of these groups, cached on the q_groups tensor (rebuilt if either tensor changes)."""
    qg = _check_groups("q_groups", q_groups, B, Nq, device)
    if k_groups is None:
        if Nk != Nq:
            raise ValueError(f"k_groups is required when k has a different length than q (Nk = {Nk}, Nq = {Nq})")
    else:
        _check_groups("k_groups", k_groups, B, Nk, device)
    # not cached: under torch.compile (traced inline), for inference tensors (no version counter),
    # and in inference mode (its plan tensors could not be saved for a later training backward)
    cacheable = not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or q_groups.is_inference()
                     or (k_groups is not None and k_groups.is_inference()))
    if not cacheable:
        return MaskPlan(qg, k_groups, batch=B)
    key = (q_groups._version, None if k_groups is None else (id(k_groups), k_groups._version), B)
    cached = getattr(q_groups, "_nova_fast_mask_plan", None)
    # the entry holds k_groups itself, so its id cannot be reused by another tensor while cached
    if cached is not None and cached[0] == key and cached[1] is k_groups:
        return cached[2]
    plan = MaskPlan(qg, k_groups, batch=B)
    q_groups._nova_fast_mask_plan = (key, k_groups, plan)
    return plan


# ---------------------------------------------------------------- public API
_flash_attn: list = []  # [flash_attn_func or None] once looked up: an import is tried once per process


def _flash_attn_func():
    """flash-attn's ``flash_attn_func``, or None when it is not installed (looked up once, the failure too)."""
    if not _flash_attn:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        _flash_attn.append(flash_attn_func)
    return _flash_attn[0]


def _dense(q, k, v, scale):
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        flash_attn_func = _flash_attn_func()
        if flash_attn_func is not None:
            backends.record(OP, "torch", "no groups: dense attention (flash-attn)")
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
            return out.transpose(1, 2)
    backends.record(OP, "torch", "no groups: dense attention (F.scaled_dot_product_attention)")
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _key_tiles_for(plan: MaskPlan, q: Tensor, deterministic: bool) -> Tensor | None:
    """The Triton backward's key-tile plan from the (cached) mask plan when the Triton backend will run
    the backward: for the blocks of the kernel that backward runs (the dk/dv kernel's, or with
    ``deterministic`` False the atomic-dq kernel's own); None otherwise (the torch backend ignores
    it; the kernels build one if missing)."""
    wanted, _ = backends.requested_backend(OP)
    if not (wanted == "triton" or (wanted == "auto" and q.device.type == "cuda")):
        return None
    try:
        from nova_fast.kernels.group_causal_attention import backward_kind, config
    except ImportError:
        return None
    cfg = config(backward_kind(deterministic), q.shape[-1], q.dtype, q.device)
    return plan.key_tiles(cfg["BLOCK_M"], cfg["BLOCK_N"])


def group_causal_attention(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor | MaskPlan | None = None,
                           k_groups: Tensor | None = None, *, scale: float | None = None,
                           deterministic: bool = True) -> Tensor:
    """Attention where query i sees key j iff ``k_groups[j] <= q_groups[i]``.

    q (B, H, Nq, D), k and v (B, H, Nk, D), D in (64, 128), fp32/fp16/bf16. q_groups: integer
    (Nq,) or (B, Nq), or a :class:`MaskPlan` built once for the mask (then no k_groups); k_groups:
    (Nk,) or (B, Nk), default q_groups (requires Nk == Nq). Without groups: plain bidirectional
    attention. Rows that see no key return 0. Returns (B, H, Nq, D). Differentiable in q, k and v.
    The Triton backend (auto's choice on CUDA) makes no host synchronisation: the call can be
    captured in a CUDA graph.

    ``deterministic`` (default True): the Triton backward runs a dk/dv kernel and a dq kernel
    without atomics (7 tile GEMMs per visited tile pair; bitwise reproducible). False allows
    FlashAttention-2's backward: dq added by atomics inside the dk/dv kernel (5 tile GEMMs; dq's
    summation order, so its last bits, vary between runs). The torch backend has one backward,
    deterministic, and runs it either way. ``backend_info()["last_used"]["group_causal_attention"]
    ["backward_path"]`` says which ran. The forward is the same either way.
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool (True or False), got {deterministic!r}")
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
    if isinstance(q_groups, MaskPlan):
        if k_groups is not None:
            raise ValueError("k_groups given with a MaskPlan: the plan already holds both sides")
        plan = q_groups
        plan.check(B, Nq, Nk, q.device)
    else:
        plan = _plan_for(q_groups, k_groups, B, Nq, Nk, q.device)

    if needs_autograd(q, k, v) or torch.compiler.is_compiling():
        key_tiles = None if torch.compiler.is_compiling() else _key_tiles_for(plan, q, deterministic)
        return group_causal_attention_op(q, k, v, *plan.args(key_tiles), scale, plan.sorted_tokens, deterministic)[0]
    backend = backends.resolve(OP, q.device, SUPPORTED)  # inference: no autograd bookkeeping
    return FORWARD[backend](q, k, v, *plan.args(), scale, plan.sorted_tokens)[0]


def attention_work(q_groups: Tensor | MaskPlan, k_groups: Tensor | None = None, *, block_m: int | None = None,
                   block_n: int | None = None, head_dim: int = 64, dtype: torch.dtype = torch.float16) -> dict:
    """Work of one call for these groups (after the op's sort), next to the dense problem.

    ``tiles_visited / tiles_total``: (query tile, key tile) pairs the Triton forward visits, by its
    own plan (:meth:`MaskPlan.query_tiles`), with the forward's block sizes for ``head_dim`` and
    ``dtype`` unless block_m/block_n are given; ``tiles_full`` of them need no mask arithmetic,
    ``tiles_partial`` do. ``pairs_visible / pairs_total``: (query, key) pairs the rule lets
    through, which is exactly what the torch backend computes; ``useful_fraction``: visible pairs
    over the pairs of the visited tiles (the rest is work done on masked or padded entries).
    Groups (N,) or (B, N) or a MaskPlan; fractions are averaged over the batch.
    """
    from nova_fast.kernels.group_causal_attention import config

    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim = {head_dim} is not supported: expected one of {HEAD_DIMS}")
    plan = q_groups if isinstance(q_groups, MaskPlan) else MaskPlan(q_groups, k_groups)
    cfg = config("fwd", head_dim, dtype)
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    n_full, n_end = plan.query_tiles(bm, bn)
    rows, Nq, Nk = plan.batch_rows, plan.Nq, plan.Nk
    visited, full = int(n_end.sum()), int(n_full.sum())
    total = rows * n_end.shape[1] * -(-Nk // bn)
    pairs = int(plan.k_visible.sum())
    return {"block_m": bm, "block_n": bn, "tiles_visited": visited, "tiles_full": full,
            "tiles_partial": visited - full, "tiles_total": total, "tile_fraction": visited / total,
            "pairs_visible": pairs, "pairs_total": rows * Nq * Nk, "pair_fraction": pairs / (rows * Nq * Nk),
            "useful_fraction": pairs / (visited * bm * bn) if visited else 1.0}
