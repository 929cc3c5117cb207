"""``nova_fast.distributed``: one NOVA generation spread over several processes with torch.distributed.

Three kinds of parallelism, composed as a product of degrees (world size = cfg x dp x ulysses):

* **CFG-parallel** (``cfg=2``): classifier-free guidance stacks a conditional and an unconditional
  pass on the batch axis (``nova_fast.reference.guidance``); here cfg-rank 0 computes the
  conditional rows of every encoder and head call and cfg-rank 1 the unconditional ones. The two
  ranks exchange the diffusion head's outputs once per denoising step (an all-gather), so both
  apply the same guidance combine and scheduler step. Below the guidance-truncation threshold
  only the conditional pass exists: cfg-rank 0 computes it and broadcasts it.
* **data-parallel** (``dp=N``): the batch is split into N equal slices, one per dp-rank. No
  communication until the end, where the finished latents are all-gathered.
* **Ulysses sequence parallelism** (``ulysses=N``) in the temporal and spatial encoders: each
  rank runs every block on a contiguous slice of the sequence ([prefix, tokens]); around the
  attention core one all-to-all turns (tokens / N, all heads) of q, k, v into (all tokens,
  heads / N), and one all-to-all turns the attention output back. The temporal KV cache holds all
  tokens of the rank's heads. Each encoder segment (the temporal encoder; the spatial encoder's
  first and second half) ends with an all-gather of the sequence, so code between segments
  sees whole sequences. N must divide both encoders' head counts.

Exactness: the diffusion head, guidance combine, scheduler and all random draws are not
split. Every rank runs the reference generation loop on the whole batch, drawing the same
noise from a generator seeded the same (the reference RNG order, NOVA_SPEC.md section 3); only
the encoder and head calls are computed on the rank's own rows (and sequence slice). Rows a rank
does not own hold NaN, so any use of them would poison the result instead of passing silently.
The output equals one process's up to the summation order of the split matrix products.

How it hooks in: instance attributes on the modules of a ``nova_fast.reference.NOVAModel``
(``video_encoder.forward``, ``image_encoder.forward`` / ``encode_known`` / ``encode_all``,
``image_decoder.forward`` and every encoder block's ``attn.forward``); ``restore()`` deletes them.
A model patched by ``nova_fast.accelerate`` is refused (its fused paths bypass these hooks).
Only generation is supported: training passes (the temporal encoder's attention mask) are refused.

Launch one process per rank with ``torchrun`` (``nova-fast generate --cfg-parallel 2 ...``) after
``torch.distributed.init_process_group``; every rank must hold the same weights, the same
full-batch inputs and a generator seeded the same: all three are checked. Collectives use the
process group's timeout, so a rank that fails or hangs makes the others raise
``DistributedGenerationError`` instead of waiting for ever.
"""
from __future__ import annotations

import datetime
import inspect
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from nova_fast.reference.guidance import Guidance
from nova_fast.reference.layers import apply_rope

DEFAULT_TIMEOUT_S = 300.0
PATCHED = "_nova_fast_parallel"   # model attribute: the ParallelGeneration that patched it
GUIDANCE_ARGS = ("guidance_scale", "guidance_trunc", "guidance_renorm", "image_guidance_scale",
                 "spatiotemporal_guidance_scale")


class DistributedGenerationError(RuntimeError):
    """A collective failed or timed out: another rank raised, exited or is stuck (its own error says why)."""


# ------------------------------------------------------------------------------------------------
# Degrees and the rank grid
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism. Rank layout: ``rank = (dp_index * cfg + cfg_index) * ulysses + ulysses_index``,
    so a Ulysses group is consecutive ranks (put it inside one node: it communicates the most)."""
    cfg: int = 1
    dp: int = 1
    ulysses: int = 1

    def __post_init__(self):
        for name in ("cfg", "dp", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} degree must be an integer >= 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg (CFG-parallel degree) must be 1 or 2 (one rank per guidance pass, "
                             f"conditional and unconditional), got {self.cfg}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.dp * self.ulysses

    def describe(self) -> str:
        return f"cfg {self.cfg} x dp {self.dp} x ulysses {self.ulysses}"

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"world size {world_size} does not equal the product of the degrees "
                             f"({self.describe()} = {self.world_size}): launch {self.world_size} processes "
                             f"(torchrun --nproc-per-node {self.world_size} ...) or change the degrees")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (dp_index, cfg_index, ulysses_index)."""
        return rank // (self.ulysses * self.cfg), (rank // self.ulysses) % self.cfg, rank % self.ulysses

    def rank_of(self, dp_index: int, cfg_index: int, ulysses_index: int) -> int:
        return (dp_index * self.cfg + cfg_index) * self.ulysses + ulysses_index

    def group_ranks(self, kind: str) -> list[list[int]]:
        """Every group of one kind ("cfg", "dp", "ulysses"), each a list of ranks in index order."""
        axes = {"dp": self.dp, "cfg": self.cfg, "ulysses": self.ulysses}
        others = [k for k in ("dp", "cfg", "ulysses") if k != kind]
        groups = []
        for a in range(axes[others[0]]):
            for b in range(axes[others[1]]):
                ranks = []
                for i in range(axes[kind]):
                    idx = {kind: i, others[0]: a, others[1]: b}
                    ranks.append(self.rank_of(idx["dp"], idx["cfg"], idx["ulysses"]))
                groups.append(ranks)
        return groups


def check_model(model, parallel: ParallelConfig) -> None:
    """Refuse what this module cannot run exactly, naming the reason."""
    for name in ("video_encoder", "image_encoder", "image_decoder", "generate_video"):
        if getattr(model, name, None) is None:
            raise TypeError(f"nova_fast.distributed needs a nova_fast.reference NOVAModel; the model has no {name!r}")
    if getattr(model, "_nova_fast_acceleration", None) is not None:
        raise NotImplementedError("nova_fast.distributed runs the reference model only: this model is patched by "
                                  "nova_fast.accelerate (its fused paths bypass the parallel hooks); call "
                                  "nova_fast.restore(model) first")
    if getattr(model, PATCHED, None) is not None:
        raise ValueError("this model is already parallelized; call .restore() on its ParallelGeneration first")
    if parallel.ulysses > 1:
        heads = {"temporal": model.video_encoder.num_heads, "spatial": model.image_encoder.num_heads}
        bad = {k: h for k, h in heads.items() if h % parallel.ulysses}
        if bad:
            raise ValueError(f"ulysses degree {parallel.ulysses} must divide the attention head count of both "
                             f"encoders (temporal {heads['temporal']} heads, spatial {heads['spatial']} heads)")


def check_generation(parallel: ParallelConfig, batch: int, guidance: Guidance) -> None:
    """Refuse a generation the degrees cannot split exactly."""
    if batch % parallel.dp:
        raise ValueError(f"batch {batch} is not divisible by the data-parallel degree dp={parallel.dp}")
    if parallel.cfg == 2:
        if guidance.passes == 1:
            raise ValueError(f"cfg=2 splits the conditional and unconditional guidance passes, but this generation "
                             f"has one pass (guidance_scale={guidance.guidance_scale} <= 1): use cfg=1")
        if guidance.passes == 3:
            raise NotImplementedError(f"cfg=2 splits two guidance passes; {guidance.third_pass} guidance adds a third "
                                      f"pass, which CFG-parallel does not place: use cfg=1 (dp / ulysses still apply)")


def guidance_from_kwargs(model, kwargs: dict) -> Guidance:
    """The Guidance the model's generate_video would build from these keyword arguments (its own
    defaults); the guidance arguments are removed from kwargs."""
    params = inspect.signature(model.generate_video).parameters
    values = []
    for name in GUIDANCE_ARGS:
        default = params[name].default if name in params else inspect.Parameter.empty
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif default is inspect.Parameter.empty:
            raise TypeError(f"cannot find the default of {name!r} in {type(model).__name__}.generate_video")
        else:
            values.append(default)
    return Guidance(*values)


def batch_size(text_states, labels) -> int:
    if labels is not None:
        return int(torch.as_tensor(labels).reshape(-1).shape[0])
    if text_states is None:
        raise ValueError("generate_video needs text_states (or labels for a class-conditional model)")
    return len(text_states) if isinstance(text_states, (list, tuple)) else int(text_states.shape[0])


def seq_split(length: int, parts: int) -> list[int]:
    """Contiguous slice sizes of a sequence over ``parts`` ranks (the first ones one longer)."""
    return [length // parts + (1 if i < length % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------------------------------------
# Communication accounting
# ------------------------------------------------------------------------------------------------
class CommStats:
    """Bytes this rank sends, per kind of parallelism: an all-gather counts its own part once per
    peer, an all-to-all the slices addressed to the other ranks, a broadcast its payload once per
    receiver at the source. Checks of the inputs are counted under "checks"."""
    KINDS = ("cfg", "dp", "ulysses", "checks")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes = dict.fromkeys(self.KINDS, 0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def as_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


# ------------------------------------------------------------------------------------------------
# Process groups
# ------------------------------------------------------------------------------------------------
def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, device: Optional[torch.device] = None) -> torch.device:
    """``init_process_group`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL
    when CUDA is available (device cuda:LOCAL_RANK), gloo otherwise. Returns the rank's device."""
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no torchrun environment (RANK / WORLD_SIZE unset): launch with "
                           "torchrun --nproc-per-node N ...")
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def default_group_timeout() -> datetime.timedelta:
    """The default process group's collective timeout (subgroups do not inherit it: torch gives them
    its own default of 10 or 30 minutes, so they are created with this one)."""
    try:
        group = dist.distributed_c10d._get_default_group()
        for device in group._device_types:
            timeout = group._get_backend(device).options._timeout
            if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
                return timeout
    except Exception:  # noqa: BLE001 -- private API: fall back to the stated default
        pass
    return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)


class _Group:
    def __init__(self, kind: str, ranks: list[int], handle, index: int):
        self.kind, self.ranks, self.handle, self.index = kind, ranks, handle, index

    @property
    def size(self) -> int:
        return len(self.ranks)


# ------------------------------------------------------------------------------------------------
# The parallel generation
# ------------------------------------------------------------------------------------------------
class ParallelGeneration:
    """Patches ``model`` (in place) so that ``generate_video`` runs split over the default process
    group by ``parallel``; every rank calls it with the same arguments and gets the whole result.

    >>> pg = ParallelGeneration(model, ParallelConfig(cfg=2, ulysses=2))   # 4 ranks
    >>> latents = pg.generate_video(text_states, num_latent_frames=9, generator=gen)
    >>> pg.restore()
    """

    def __init__(self, model, parallel: ParallelConfig, *, timeout_s: Optional[float] = None):
        """``timeout_s``: the collectives' timeout in the groups created here (default: the default
        process group's timeout, as given to ``init_process_group``)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("nova_fast.distributed needs torch.distributed initialized "
                               "(init_process_group, or nova_fast.distributed.init_from_env under torchrun)")
        parallel.check_world_size(dist.get_world_size())
        check_model(model, parallel)
        self.model, self.parallel = model, parallel
        self.rank = dist.get_rank()
        self.dp_index, self.cfg_index, self.sp_index = parallel.coords(self.rank)
        self.stats = CommStats()
        self.device = model.device
        timeout = default_group_timeout() if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.timeout = timeout
        self.groups: dict[str, Optional[_Group]] = {}
        for kind in ("ulysses", "cfg", "dp"):   # every rank creates every group, in the same order
            self.groups[kind] = None
            for ranks in parallel.group_ranks(kind):
                if len(ranks) == 1:
                    continue
                handle = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.groups[kind] = _Group(kind, ranks, handle, ranks.index(self.rank))
        self._layout: Optional[tuple[int, int]] = None   # (guidance passes, batch) while generating
        self._seq_sizes: Optional[list[int]] = None       # the current Ulysses sequence split
        self._patched: list[tuple[object, str]] = []
        self._check_same("weights", self._weights_fingerprint())
        self._patch()
        setattr(model, PATCHED, self)

    # ---- collectives ------------------------------------------------------------------------------
    def _collective(self, what: str, fn: Callable):
        try:
            return fn()
        except DistributedGenerationError:
            raise
        except Exception as exc:  # noqa: BLE001 -- every transport error becomes one clear error
            raise DistributedGenerationError(
                f"rank {self.rank}: {what} failed ({type(exc).__name__}: {exc}); another rank probably raised, "
                f"exited or is stuck past the process-group timeout -- its own error says why") from exc

    def _all_gather(self, group: _Group, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(group.size)]
        self.stats.add(group.kind, tensor.numel() * tensor.element_size() * (group.size - 1))
        self._collective(f"{what} (ranks {group.ranks})", lambda: dist.all_gather(parts, tensor, group=group.handle))
        return parts

    def _check_same(self, what: str, fingerprint: torch.Tensor) -> None:
        """Every rank must hold the same ``fingerprint`` (float64 vector); the same error on all ranks."""
        local = fingerprint.to(torch.float64).reshape(-1).cpu()
        if self.device.type == "cuda":
            local = local.to(self.device)
        world = dist.get_world_size()
        parts = [torch.empty_like(local) for _ in range(world)]
        self.stats.add("checks", local.numel() * local.element_size() * (world - 1))
        self._collective(f"the check of the {what}", lambda: dist.all_gather(parts, local))
        differ = [r for r in range(world) if not torch.equal(parts[r], parts[0])]
        if differ:
            raise ValueError(f"ranks {differ} hold other {what} than rank 0: every rank must pass the same weights, "
                             f"the same full-batch inputs and a generator seeded the same")

    def _weights_fingerprint(self) -> torch.Tensor:
        sums = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(2)]
        for i, t in enumerate(list(self.model.parameters()) + list(self.model.buffers())):
            if t.is_floating_point():
                v = t.detach().double()
                sums[0] += v.sum() * (i + 1)
                sums[1] += v.square().sum()
        return torch.stack(sums)

    @staticmethod
    def _inputs_fingerprint(text_states, labels, generator, batch: int, passes: int) -> torch.Tensor:
        values = [float(batch), float(passes)]
        state = generator.get_state().to(torch.float64)
        values.append(float((state * torch.arange(1, state.numel() + 1, dtype=torch.float64)).sum()))
        for t in ([text_states] if torch.is_tensor(text_states) else list(text_states or [])) + (
                [torch.as_tensor(labels)] if labels is not None else []):
            v = t.detach().double().cpu().reshape(-1)
            values += [float(v.numel()), float(v.sum()), float((v * torch.arange(v.numel(), dtype=torch.float64)).sum())]
        return torch.tensor(values, dtype=torch.float64)

    # ---- rows: which guidance passes and batch slice this rank computes -----------------------------
    def _local_rows(self, rows: int) -> tuple[list[int], int]:
        """(indices of this rank's rows among ``rows`` stacked pass-major rows, passes present)."""
        if self._layout is None:
            raise RuntimeError("this model is parallelized by nova_fast.distributed: generate through "
                               "ParallelGeneration.generate_video (or restore() it first)")
        passes, batch = self._layout
        if rows == passes * batch:
            present = passes
        elif rows == batch:
            present = 1   # below the guidance-truncation threshold: the conditional pass only
        else:
            raise RuntimeError(f"nova_fast.distributed: a module got {rows} rows, expected {passes} guidance "
                               f"passes x batch {batch} (or the batch alone)")
        mine = range(present) if self.parallel.cfg == 1 else ([self.cfg_index] if self.cfg_index < present else [])
        per = batch // self.parallel.dp
        first = self.dp_index * per
        return [p * batch + b for p in mine for b in range(first, first + per)], present

    @staticmethod
    def _take(t, idx: list[int], rows: int):
        if t is None or len(idx) == rows:
            return t
        return t[idx]

    def _rope_rows(self, rope, idx, rows):
        """RoPE tables (cos, sin), (rows or 1, 1, N, d/2): this rank's rows (a broadcast row stays)."""
        if rope is None:
            return None
        return tuple(t if t.shape[0] == 1 and rows > 1 else self._take(t, idx, rows) for t in rope)

    @staticmethod
    def _scatter_rows(local: torch.Tensor, idx: list[int], rows: int) -> torch.Tensor:
        """(len(idx), ...) -> (rows, ...) with NaN in the rows this rank does not compute."""
        if len(idx) == rows:
            return local
        full = local.new_full((rows, *local.shape[1:]), float("nan"))
        full[idx] = local
        return full

    # ---- Ulysses -------------------------------------------------------------------------------------
    def _seq_parallel(self, fn: Callable, h: torch.Tensor, rope) -> torch.Tensor:
        """Run ``fn(h_slice, rope_slice)`` (token-wise except for attention) on this rank's sequence
        slice and all-gather the outputs into the whole sequence."""
        group = self.groups["ulysses"]
        sizes = seq_split(h.shape[1], group.size)
        start = sum(sizes[: group.index])
        n = sizes[group.index]
        rope_slice = None if rope is None else tuple(t[:, :, start:start + n] for t in rope)
        outer, self._seq_sizes = self._seq_sizes, sizes
        try:
            out = fn(h[:, start:start + n], rope_slice)
        finally:
            self._seq_sizes = outer
        longest = max(sizes)
        if n < longest:   # all_gather needs equal shapes: pad, then trim each part
            out = torch.cat([out, out.new_zeros(out.shape[0], longest - n, *out.shape[2:])], dim=1)
        parts = self._all_gather(group, out, "the Ulysses all-gather of an encoder's sequence")
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)

    def _all_to_all(self, send: torch.Tensor, in_splits: list[int], out_splits: list[int], what: str) -> torch.Tensor:
        group = self.groups["ulysses"]
        recv = send.new_empty(sum(out_splits))
        self.stats.add("ulysses", (sum(in_splits) - in_splits[group.index]) * send.element_size())
        self._collective(f"{what} (ranks {group.ranks})",
                         lambda: dist.all_to_all_single(recv, send, out_splits, in_splits, group=group.handle))
        return recv

    def _seq_to_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """(3, B, H, n_local, d) -> (3, B, H / u, N, d): all tokens of this rank's heads."""
        u, sizes = self.groups["ulysses"].size, self._seq_sizes
        three, B, H, n, d = qkv.shape
        hs = H // u
        send = qkv.reshape(three, B, u, hs, n, d).permute(2, 0, 1, 3, 4, 5).contiguous().reshape(-1)
        out_splits = [three * B * hs * s * d for s in sizes]
        recv = self._all_to_all(send, [three * B * hs * n * d] * u, out_splits, "the Ulysses all-to-all of q, k, v")
        parts = [chunk.view(three, B, hs, s, d) for chunk, s in zip(recv.split(out_splits), sizes)]
        return torch.cat(parts, dim=3)

    def _heads_to_seq(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H / u, N, d) -> (B, H, n_local, d): this rank's tokens, every head."""
        group, sizes = self.groups["ulysses"], self._seq_sizes
        B, hs, N, d = o.shape
        n = sizes[group.index]
        send = torch.cat([c.contiguous().reshape(-1) for c in o.split(sizes, dim=2)])
        recv = self._all_to_all(send, [B * hs * s * d for s in sizes], [B * hs * n * d] * group.size,
                                "the Ulysses all-to-all of the attention output")
        return recv.view(group.size, B, hs, n, d).permute(1, 0, 2, 3, 4).reshape(B, group.size * hs, n, d)

    def _ulysses_attention(self, attn) -> Callable:
        def forward(x, attn_mask=None, kv_cache=None, rope=None):
            if attn_mask is not None:
                raise NotImplementedError("nova_fast.distributed (Ulysses) runs generation only: an attention mask "
                                          "(training) is not supported")
            if self._seq_sizes is None:
                raise RuntimeError("Ulysses attention called outside an encoder segment of the parallel generation")
            B, n, D = x.shape
            qkv = attn.qkv(x).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            if rope is not None:
                qkv = torch.stack([apply_rope(qkv[0], rope), apply_rope(qkv[1], rope), qkv[2]])
            q, k, v = self._seq_to_heads(qkv).unbind(0)
            if kv_cache is not None:   # earlier tokens' keys/values first, all tokens of this rank's heads
                k, v = kv_cache.append(k, v)
            o = attn.attend(q, k, v, None)
            return attn.proj(self._heads_to_seq(o).transpose(1, 2).reshape(B, n, D))
        return forward

    # ---- the patched module entry points ----------------------------------------------------------
    def _temporal_forward(self, original: Callable) -> Callable:
        def forward(tokens, prefix=None, attn_mask=None, kv_caches=None, rope=None):
            if attn_mask is not None:
                raise NotImplementedError("nova_fast.distributed runs generation only: the temporal encoder's "
                                          "training mask (attn_mask) is not supported")
            rows = tokens.shape[0]
            idx, _ = self._local_rows(rows)
            t_l, p_l = self._take(tokens, idx, rows), self._take(prefix, idx, rows)
            rope_l = self._rope_rows(rope, idx, rows)
            if self.groups["ulysses"] is None:
                out = original(t_l, p_l, kv_caches=kv_caches, rope=rope_l)
            else:
                h = t_l if p_l is None else torch.cat([p_l, t_l], dim=1)
                out = self._seq_parallel(lambda hs, rs: original(hs, None, kv_caches=kv_caches, rope=rs), h, rope_l)
                out = out[:, h.shape[1] - t_l.shape[1]:]   # the final norm is per token: drop the prefix after it
            return self._scatter_rows(out, idx, rows)
        return forward

    def _spatial_forward(self, original: Callable) -> Callable:
        def forward(tokens, prefix=None, known_ids=None, rope_pos=None, read_ids=None):
            rows = tokens.shape[0]
            idx, _ = self._local_rows(rows)
            out = original(self._take(tokens, idx, rows), self._take(prefix, idx, rows),
                           self._take(known_ids, idx, rows), self._take(rope_pos, idx, rows),
                           self._take(read_ids, idx, rows))
            return self._scatter_rows(out, idx, rows)
        return forward

    def _spatial_encode_known(self, original: Callable) -> Callable:
        def encode_known(prefix, known, rope=None):
            h = known if prefix is None else torch.cat([prefix, known], dim=1)
            return self._seq_parallel(lambda hs, rs: original(None, hs, rs), h, rope)
        return encode_known

    def _spatial_encode_all(self, original: Callable) -> Callable:
        def encode_all(h, rope=None):
            return self._seq_parallel(lambda hs, rs: original(hs, rs), h, rope)
        return encode_all

    def _head_forward(self, original: Callable, head) -> Callable:
        def forward(x, timestep, z, pred_ids=None):
            rows = x.shape[0]
            idx, present = self._local_rows(rows)
            local = None
            if idx:
                local = original(self._take(x, idx, rows), self._take(timestep, idx, rows),
                                 self._take(z, idx, rows), self._take(pred_ids, idx, rows))
            group = self.groups["cfg"]
            if group is None:
                return self._scatter_rows(local, idx, rows)
            _, batch = self._layout
            per = batch // self.parallel.dp
            first = self.dp_index * per
            if present == 2:   # each cfg rank computed one pass: exchange them
                parts = self._all_gather(group, local, "the CFG-parallel exchange of the head outputs")
                idx = [p * batch + b for p in range(2) for b in range(first, first + per)]
                return self._scatter_rows(torch.cat(parts), idx, rows)
            # guidance truncated: the conditional pass only, computed by cfg-rank 0
            if local is None:
                n = pred_ids.shape[1] if pred_ids is not None else \
                    (x.shape[-2] // head.patch) * (x.shape[-1] // head.patch)
                local = x.new_empty(per, n, head.token_dim, dtype=head.head.weight.dtype)
            else:
                local = local.contiguous()
                self.stats.add("cfg", local.numel() * local.element_size() * (group.size - 1))
            self._collective(f"the CFG-parallel broadcast of the conditional head outputs (ranks {group.ranks})",
                             lambda: dist.broadcast(local, src=group.ranks[0], group=group.handle))
            return self._scatter_rows(local, list(range(first, first + per)), rows)
        return forward

    def _set(self, obj, name: str, value) -> None:
        object.__setattr__(obj, name, value)
        self._patched.append((obj, name))

    def _patch(self) -> None:
        m = self.model
        self._set(m.video_encoder, "forward", self._temporal_forward(m.video_encoder.forward))
        self._set(m.image_encoder, "forward", self._spatial_forward(m.image_encoder.forward))
        self._set(m.image_decoder, "forward", self._head_forward(m.image_decoder.forward, m.image_decoder))
        if self.groups["ulysses"] is not None:
            self._set(m.image_encoder, "encode_known", self._spatial_encode_known(m.image_encoder.encode_known))
            self._set(m.image_encoder, "encode_all", self._spatial_encode_all(m.image_encoder.encode_all))
            for encoder in (m.video_encoder, m.image_encoder):
                for block in encoder.blocks:
                    self._set(block.attn, "forward", self._ulysses_attention(block.attn))

    def restore(self) -> None:
        """Delete every patched attribute: the model is the plain reference model again."""
        for obj, name in reversed(self._patched):
            if name in vars(obj):
                delattr(obj, name)
        self._patched.clear()
        if getattr(self.model, PATCHED, None) is self:
            delattr(self.model, PATCHED)

    # ---- generation ---------------------------------------------------------------------------------
    def generate_video(self, text_states=None, *, labels=None, generator: Optional[torch.Generator] = None,
                       guidance: Optional[Guidance] = None, **kwargs) -> torch.Tensor:
        """``model.generate_video`` split over the ranks; every rank passes the same arguments (the whole
        batch, a generator seeded the same) and returns the whole (B, C, T, H, W) latents."""
        if not self._patched:
            raise RuntimeError("this ParallelGeneration was restored; build a new one")
        if generator is None:
            raise ValueError("generator= is required: a torch.Generator seeded the same on every rank (without it "
                             "each rank would draw its noise from its own global RNG)")
        if guidance is None:
            guidance = guidance_from_kwargs(self.model, kwargs)
        elif any(name in kwargs for name in GUIDANCE_ARGS):
            raise TypeError("pass either guidance= or the guidance arguments, not both")
        batch = batch_size(text_states, labels)
        check_generation(self.parallel, batch, guidance)
        self._check_same("inputs (text states / labels / generator state)",
                         self._inputs_fingerprint(text_states, labels, generator, batch, guidance.passes))
        self._layout = (guidance.passes, batch)
        try:
            latents = self.model.generate_video(text_states, labels=labels, generator=generator, guidance=guidance,
                                                **kwargs)
        finally:
            self._layout = None
        group = self.groups["dp"]
        if group is None:
            return latents
        per = batch // self.parallel.dp
        mine = latents[self.dp_index * per:(self.dp_index + 1) * per]
        return torch.cat(self._all_gather(group, mine, "the data-parallel all-gather of the latents"))

    def generate_image(self, text_states=None, **kwargs) -> torch.Tensor:
        kwargs.pop("num_latent_frames", None)
        return self.generate_video(text_states, num_latent_frames=1, **kwargs)[:, :, 0]


def parallelize(model, cfg: int = 1, dp: int = 1, ulysses: int = 1, *, timeout_s: Optional[float] = None
                ) -> ParallelGeneration:
    """``ParallelGeneration(model, ParallelConfig(cfg, dp, ulysses))``."""
    return ParallelGeneration(model, ParallelConfig(cfg=cfg, dp=dp, ulysses=ulysses), timeout_s=timeout_s)



# ------------------------------------------------------------------------------------------------
# `nova-fast generate`
# ------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ar_steps_executed(config, num_latent_frames: int, num_ar_steps: int, first_latent_given: bool = False) -> int:
    """AR steps one video runs with this NOVAConfig (the per-step communication figures divide by this)."""
    from nova_fast.reference.model import ar_schedule

    frames = num_latent_frames - (1 if first_latent_given else 0)
    return frames * len(ar_schedule(config.spatial_tokens, num_ar_steps))


def cli_generate(args) -> int:
    """``nova-fast generate``: one generation, split over the torchrun ranks by the given degrees.
    Random weights of a preset (seeded, the same on every rank) or ``--weights`` (a released
    checkpoint folder); random text states from ``--seed`` or ``--text-states`` (a saved tensor).
    Rank 0 prints the time and the bytes sent per AR step and saves the latents."""
    import os
    import sys
    import time

    from nova_fast.reference import build_model, load_pretrained, random_text_states

    parallel = ParallelConfig(cfg=args.cfg_parallel, dp=args.dp, ulysses=args.ulysses)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not launched and parallel.world_size > 1:
        print(f"nova-fast generate: {parallel.describe()} needs {parallel.world_size} processes: "
              f"torchrun --nproc-per-node {parallel.world_size} -m nova_fast.cli generate ...", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if launched:
        device = init_from_env(args.timeout)
        parallel.check_world_size(dist.get_world_size())
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = dist.get_rank() if launched else 0
    try:
        if args.weights:
            model = load_pretrained(args.weights, dtype=dtype, device=device)
        else:
            torch.manual_seed(args.weight_seed)
            model = build_model(args.config, device=device, dtype=dtype)
        model.eval()
        if args.text_states:
            text = torch.load(args.text_states, map_location="cpu")
        else:
            text = random_text_states(model.config, args.batch, torch.Generator().manual_seed(args.seed + 1))
        text = text.to(device=device, dtype=dtype)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        kwargs = dict(num_latent_frames=args.latent_frames, num_ar_steps=args.ar_steps,
                      num_diffusion_steps=args.diffusion_steps, guidance_scale=args.guidance_scale)
        runner = ParallelGeneration(model, parallel) if launched else None
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if runner is not None:
            latents = runner.generate_video(text, generator=generator, **kwargs)
        else:
            latents = model.generate_video(text, generator=generator, **kwargs)
        sync()
        seconds = time.perf_counter() - t0
        steps = ar_steps_executed(model.config, args.latent_frames, args.ar_steps)
        stats = runner.stats.as_dict() if runner is not None else CommStats().as_dict()
        if rank == 0:
            sent = {k: v / steps for k, v in stats["bytes"].items() if k != "checks"}
            print(f"nova-fast generate: {args.weights or args.config}, batch {text.shape[0]}, {args.latent_frames} latent "
                  f"frames x {args.ar_steps} AR steps x {args.diffusion_steps} denoising steps, {device.type} "
                  f"{args.dtype}, {parallel.describe()}: {seconds:.3f} s; rank 0 sent per AR step: "
                  + ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in sent.items()))
            if args.out:
                torch.save({"latents": latents.cpu(), "parallel": asdict(parallel),
                            "seconds": seconds, "comm": stats, "ar_steps_executed": steps}, args.out)
                print(f"wrote {args.out}")
        return 0
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["ParallelConfig", "ParallelGeneration", "DistributedGenerationError", "CommStats", "parallelize",
           "cli_generate", "init_from_env", "check_model", "check_generation", "seq_split", "DEFAULT_TIMEOUT_S"]
