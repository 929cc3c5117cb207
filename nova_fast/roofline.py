"""Roofline PROJECTION of NOVA generation: FLOPs, bytes and launches per op, per frame, per video.

Nothing here is measured. From a model configuration and a workload (latent frames, AR steps,
denoising steps, classifier-free guidance) it counts, for every op of every pass the generation
makes, the floating-point work, the bytes an ideal kernel must move through HBM, and the number of
kernel launches an eager PyTorch implementation issues; then projects a time on stated ceilings:

    projected seconds per call = max(flops / peak_flops, bytes / hbm_bandwidth) + launches * per_launch

summed over all calls. Defaults are H100 SXM figures (dense bf16 tensor ~790 TFLOP/s, HBM ~3.0 TB/s,
4 us per launch). What the counts follow (docs/nova.md, section 3):

* temporal encoder: one pass per latent frame with a KV cache; frame 0 also carries the text prefix
  (256 text + 2 motion tokens); queries = the frame's tokens, keys = prefix + frames so far;
* spatial encoder, per executed AR step: first half of the blocks on [prefix, known tokens] (known
  grows as steps go by), second half on [prefix, all tokens];
* diffusion head: K calls per AR step on the predicted tokens only;
* guidance doubles the batch of every pass.

Launch model (eager, no CUDA graphs, bias fused into its GEMM): one launch per GEMM, per fused
attention, per LayerNorm, per elementwise op; the per-op launch counts are listed next to each op
below. Bytes: weights once per call plus activations in and out, no reuse across ops.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

# The paper's reported figures (arXiv 2412.14169, inference cost table), for comparison only.
PAPER = {"what": "NOVA paper, one 29x768x480 video", "video_s": 12.0, "spatial_s": 11.97, "temporal_s": 0.03}


@dataclass(frozen=True)
class Ceilings:
    peak_flops: float = 790e12        # dense bf16 tensor-core FLOP/s (H100 SXM)
    hbm_bytes_per_s: float = 3.0e12   # HBM3 bandwidth
    launch_s: float = 4e-6            # cost of one kernel launch in eager PyTorch
    name: str = "H100 (projected)"


@dataclass(frozen=True)
class ModelShape:
    """The sizes the counts need, derived from a NOVA configuration."""
    name: str
    width: int                 # encoder width D (temporal and spatial are equal)
    heads: int
    temporal_depth: int
    spatial_depth: int
    head_width: int
    head_depth: int
    spatial_tokens: int        # tokens per frame in the spatial encoder (1440 for osp480)
    temporal_tokens: int       # tokens per frame in the temporal encoder (360 for osp480)
    text_tokens: int = 256
    motion_tokens: int = 2     # video models: flow and fps tokens
    text_dim: int = 2560
    latent_channels: int = 4
    image_patch: int = 2
    video_patch: int = 4
    mixer_rank: int | None = None   # None: no Scaling-and-Shift layer; <0: full rank

    @property
    def prefix_tokens(self) -> int:
        return self.text_tokens + self.motion_tokens


@dataclass(frozen=True)
class Workload:
    latent_frames: int = 9
    ar_steps: int = 64
    diffusion_steps: int = 25
    guidance_batch: int = 2     # 2: classifier-free guidance doubles every pass
    batch: int = 1
    dtype_bytes: int = 2        # bf16


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    launches: float = 0.0
    calls: int = 0
    seconds: float = 0.0        # projected, summed per call

    def add(self, other: "Cost", times: int = 1) -> None:
        self.flops += other.flops * times
        self.bytes += other.bytes * times
        self.launches += other.launches * times
        self.calls += other.calls * times
        self.seconds += other.seconds * times


def projected_seconds(flops: float, nbytes: float, launches: float, ceilings: Ceilings) -> float:
    return max(flops / ceilings.peak_flops, nbytes / ceilings.hbm_bytes_per_s) + launches * ceilings.launch_s


def _cost(flops, nbytes, launches, ceilings) -> Cost:
    return Cost(flops, nbytes, launches, 1, projected_seconds(flops, nbytes, launches, ceilings))


# ---- primitive ops -----------------------------------------------------------------------------
def linear_cost(tokens: int, d_in: int, d_out: int, e: int, ceilings: Ceilings = Ceilings()) -> Cost:
    """A Linear on ``tokens`` rows: 2*tokens*d_in*d_out FLOPs; weight + input + output bytes; 1 launch."""
    return _cost(2.0 * tokens * d_in * d_out, e * (d_in * d_out + tokens * (d_in + d_out)), 1, ceilings)


def attention_cost(batch: int, queries: int, keys: int, width: int, e: int, ceilings: Ceilings = Ceilings()) -> Cost:
    """Fused attention (flash / SDPA): QK^T and PV, 2*q*k*width FLOPs each (softmax not counted);
    Q, K, V read and O written once; 1 launch."""
    flops = 4.0 * batch * queries * keys * width
    nbytes = e * batch * (2 * queries * width + 2 * keys * width)
    return _cost(flops, nbytes, 1, ceilings)


def elementwise_cost(elements: int, passes: int, launches: int, e: int, flops_per_element: float = 1.0,
                     ceilings: Ceilings = Ceilings()) -> Cost:
    """Memory-bound work: ``passes`` reads/writes of ``elements`` values over ``launches`` kernels."""
    return _cost(flops_per_element * elements, e * elements * passes, launches, ceilings)


def block_costs(batch: int, queries: int, keys: int, width: int, e: int = 2,
                ceilings: Ceilings = Ceilings(), kv_cache: bool = False) -> dict[str, Cost]:
    """One post-norm transformer block (fused qkv, attention, proj, LN + residual, MLP D->4D->D, GELU,
    LN + residual) for ``batch`` sequences of ``queries`` tokens attending to ``keys`` tokens."""
    rows = batch * queries
    d = width
    ops = {
        "qkv": linear_cost(rows, d, 3 * d, e, ceilings),
        "attention": attention_cost(batch, queries, keys, d, e, ceilings),
        "proj": linear_cost(rows, d, d, e, ceilings),
        "mlp.fc1": linear_cost(rows, d, 4 * d, e, ceilings),
        "mlp.gelu": elementwise_cost(rows * 4 * d, 2, 1, e, 8.0, ceilings),
        "mlp.fc2": linear_cost(rows, 4 * d, d, e, ceilings),
        # two (LayerNorm, add) pairs: LN reads and writes, add reads two and writes one -> 5 passes
        "norm+residual": elementwise_cost(rows * d, 10, 4, e, 10.0, ceilings),
    }
    if kv_cache:
        # eager cache append: cat of the past keys/values with the new ones (reads and writes all)
        ops["kv_cache"] = elementwise_cost(batch * keys * 2 * d, 2, 2, e, 0.0, ceilings)
    return ops


# ---- the generation ----------------------------------------------------------------------------
def ar_schedule(tokens: int, steps: int) -> list[tuple[int, int]]:
    """(known tokens before the step, tokens predicted) for every executed AR step (NOVA's cosine
    schedule: len_j = round(cos(pi/2 * j/S) * L); steps predicting nothing are skipped)."""
    lengths = [round(math.cos(math.pi / 2 * j / steps) * tokens) for j in range(steps + 1)]
    out = []
    for i in range(steps):
        predicted = lengths[i] - lengths[i + 1]
        if predicted > 0:
            out.append((tokens - lengths[i], predicted))
    return out


@dataclass
class Projection:
    shape: ModelShape
    workload: Workload
    ceilings: Ceilings
    ops: dict[tuple[str, str], Cost] = field(default_factory=dict)   # (stage, op) -> per-video cost
    executed_ar_steps: int = 0

    def _add(self, stage: str, costs: dict[str, Cost], times: int = 1, prefix: str = "") -> None:
        for op, cost in costs.items():
            self.ops.setdefault((stage, prefix + op), Cost()).add(cost, times)

    def stage_totals(self) -> dict[str, Cost]:
        out: dict[str, Cost] = {}
        for (stage, _), cost in self.ops.items():
            out.setdefault(stage, Cost()).add(cost)
        return out

    def total(self) -> Cost:
        out = Cost()
        for cost in self.ops.values():
            out.add(cost)
        return out

    def to_dict(self) -> dict:
        frames = self.workload.latent_frames
        return {
            "label": "PROJECTION (not measured)",
            "shape": asdict(self.shape), "workload": asdict(self.workload), "ceilings": asdict(self.ceilings),
            "executed_ar_steps_per_frame": self.executed_ar_steps,
            "ops": [{"stage": s, "op": o, **asdict(c)} for (s, o), c in self.ops.items()],
            "stages": {s: asdict(c) for s, c in self.stage_totals().items()},
            "per_frame_seconds": {s: c.seconds / frames for s, c in self.stage_totals().items()},
            "video": asdict(self.total()),
            "paper": PAPER,
        }


def project(shape: ModelShape, workload: Workload = Workload(), ceilings: Ceilings = Ceilings(), *,
            path: str = "eager", graphs: "GraphModel | None" = None) -> Projection:
    """Count every op of one generated video (see the module docstring for what is counted).

    ``path="accelerated"`` counts what ``nova_fast.accelerate`` runs instead (ACCELERATED_PATH):
    the same traversal with the fused ops' launches and bytes; ``graphs`` then prices the launches
    inside the captured denoising loop at the graph's per-kernel cost (None: no CUDA graphs)."""
    if path not in ("eager", "accelerated"):
        raise ValueError(f"path must be 'eager' or 'accelerated', not {path!r}")
    fast = path == "accelerated"
    block = accelerated_block_costs if fast else block_costs
    p = Projection(shape, workload, ceilings)
    e = workload.dtype_bytes
    b = workload.batch * workload.guidance_batch
    d = shape.width
    tt, ts, prefix = shape.temporal_tokens, shape.spatial_tokens, shape.prefix_tokens
    c = ceilings
    in_video = shape.video_patch ** 2 * shape.latent_channels
    in_image = shape.image_patch ** 2 * shape.latent_channels

    # temporal encoder: text prefix once, then one pass per latent frame over the frame's tokens
    p._add("temporal", {
        "text_embed": linear_cost(b * shape.text_tokens, shape.text_dim, d, e, c),
        "text_norm": elementwise_cost(b * shape.text_tokens * d, 2, 1, e, 8.0, c),
    })
    if shape.motion_tokens:
        # each motion token: sin-cos(128) -> Linear(256, D), SiLU, Linear(D, D): 3 launches + 2 for sin-cos
        motion = Cost()
        for _ in range(shape.motion_tokens):
            motion.add(linear_cost(b, 256, d, e, c))
            motion.add(linear_cost(b, d, d, e, c))
            motion.add(elementwise_cost(b * d, 2, 3, e, 4.0, c))
        motion.calls = 1
        p._add("temporal", {"motion_embed": motion})
    for t in range(workload.latent_frames):
        queries = tt + (prefix if t == 0 else 0)
        keys = prefix + tt * (t + 1)
        embed = Cost()
        embed.add(linear_cost(b * tt, in_video, d, e, c))                    # patch embed
        embed.add(elementwise_cost(b * tt * d, 3, 4, e, 2.0, c))              # bos/mask select, pos add
        embed.calls = 1
        p._add("temporal", {"embed": embed})
        for _ in range(shape.temporal_depth):
            p._add("temporal", block(b, queries, keys, d, e, c, kv_cache=True))
        p._add("temporal", {"final_norm": elementwise_cost(b * tt * d, 2, 1, e, 8.0, c)})
        if t > 0 and shape.mixer_rank is not None:
            rank = d if shape.mixer_rank < 0 else shape.mixer_rank
            mixer = Cost()
            mixer.add(elementwise_cost(b * tt * d, 2, 1, e, 4.0, c))          # SiLU
            if shape.mixer_rank >= 0:
                mixer.add(linear_cost(b * tt, d, rank, e, c))                   # LoRA down
            mixer.add(linear_cost(b * tt, rank, 2 * d, e, c))                   # scale, shift
            mixer.add(elementwise_cost(b * tt * d, 4, 1 if fast else 2, e, 2.0, c))  # x0 * (1 + scale) + shift
            mixer.calls = 1
            p._add("temporal", {"mixer": mixer})

    # spatial encoder and diffusion head: per frame, per executed AR step
    schedule = ar_schedule(ts, workload.ar_steps)
    p.executed_ar_steps = len(schedule)
    half = shape.spatial_depth // 2
    frames = workload.latent_frames
    for known, predicted in schedule:
        embed = Cost()
        embed.add(linear_cost(b * ts, in_image, d, e, c))                     # patch embed of the canvas
        embed.add(elementwise_cost(b * ts * d, 4, 4, e, 2.0, c))              # mask select, pos add, cat prefix
        embed.calls = 1
        p._add("spatial", {"embed": embed}, frames)
        # first half: gather [prefix, known] in, scatter its output back over the canvas
        p._add("spatial", {"gather/scatter": elementwise_cost(b * (tt + known + ts) * d, 2, 4, e, 0.0, c)}, frames)
        for _ in range(half):
            p._add("spatial", block(b, tt + known, tt + known, d, e, c), frames, prefix="half1.")
        for i in range(shape.spatial_depth - half):
            # accelerated: the last block computes queries, MLP and final norm only where the head reads
            last = fast and i == shape.spatial_depth - half - 1
            p._add("spatial", accelerated_block_costs(b, tt + ts, tt + ts, d, e, c, query_rows=predicted) if last
                   else block(b, tt + ts, tt + ts, d, e, c), frames, prefix="half2.")
        p._add("spatial", {"final_norm": elementwise_cost(b * (predicted if fast else ts) * d, 2, 1, e, 8.0, c)},
               frames)
        if fast:
            head_c = c if graphs is None else Ceilings(c.peak_flops, c.hbm_bytes_per_s, graphs.node_s, c.name)
            p._add("head", accelerated_head_call_costs(b * predicted, shape, e, head_c), frames * workload.diffusion_steps)
            p._add("head", accelerated_head_step_costs(b * predicted, shape, e, c, graphs), frames)
        else:
            p._add("head", head_call_costs(b * predicted, shape, e, c), frames * workload.diffusion_steps)
    return p


def head_call_costs(tokens: int, shape: ModelShape, e: int, ceilings: Ceilings = Ceilings()) -> dict[str, Cost]:
    """One diffusion-head call on ``tokens`` rows (guidance included), with the scheduler step after it."""
    c = ceilings
    w, d = shape.head_width, shape.width
    out_dim = shape.image_patch ** 2 * shape.latent_channels
    embed = Cost()
    embed.add(linear_cost(tokens, out_dim, w, e, c))                 # patch embed of the noisy tokens
    embed.add(elementwise_cost(tokens * 256, 1, 4, e, 4.0, c))       # timestep sin-cos
    embed.add(linear_cost(tokens, 256, w, e, c))                     # timestep_proj.fc1
    embed.add(linear_cost(tokens, w, w, e, c))                       # timestep_proj.fc2
    embed.add(linear_cost(tokens, d, w, e, c))                       # condition_proj.fc1
    embed.add(linear_cost(tokens, w, w, e, c))                       # condition_proj.fc2
    embed.add(elementwise_cost(tokens * w, 6, 3, e, 4.0, c))         # two SiLUs and the add
    adaln, mlp, gate = Cost(), Cost(), Cost()
    for _ in range(shape.head_depth):
        adaln.add(elementwise_cost(tokens * w, 2, 1, e, 4.0, c))     # SiLU(cond)
        adaln.add(linear_cost(tokens, w, 3 * w, e, c))               # scale, shift, gate
        adaln.add(elementwise_cost(tokens * w, 6, 3, e, 10.0, c))    # LN, * (1 + scale), + shift
        mlp.add(linear_cost(tokens, w, w, e, c))
        mlp.add(elementwise_cost(tokens * w, 2, 1, e, 4.0, c))       # SiLU
        mlp.add(linear_cost(tokens, w, w, e, c))
        gate.add(elementwise_cost(tokens * w, 7, 3, e, 10.0, c))     # LN, gate *, residual +
    final = Cost()
    final.add(elementwise_cost(tokens * w, 2, 1, e, 4.0, c))
    final.add(linear_cost(tokens, w, 2 * w, e, c))
    final.add(elementwise_cost(tokens * w, 6, 3, e, 10.0, c))
    final.add(linear_cost(tokens, w, out_dim, e, c))
    # guidance: duplicate the input, combine u + g (c - u); DDPM step: x0, posterior mean, noise
    step = elementwise_cost(tokens * out_dim, 12, 10, e, 10.0, c)
    for cost in (embed, final):
        cost.calls = 1
    for cost in (adaln, mlp, gate):
        cost.calls = shape.head_depth      # one call per head block
    return {"embed": embed, "adaln": adaln, "mlp": mlp, "norm+gate": gate, "final": final,
            "cfg+scheduler": step}


# ---- the accelerated path ------------------------------------------------------------------------
# What nova_fast.accelerate changes, as counted by project(path="accelerated") (README: Using it):
ACCELERATED_PATH = (
    "encoder post-norm residuals: residual_norm, one pass per (LayerNorm, add) pair: reads x and y, "
    "writes out (3 passes instead of 5, 1 launch instead of 2)",
    "temporal Scaling-and-Shift: x0 * (1 + scale) + shift in one modulate launch (instead of 2)",
    "spatial encoder, last block: keys and values for every token, but queries, projection, MLP, norms "
    "and the final norm only at the tokens the head reads",
    "diffusion head (denoise_tokens): time embeddings and condition projection once per AR step, not per "
    "denoising step; one GEMM per step for the adaLN statistics of every block and the final norm; "
    "modulate (1 launch, 4 passes) for LN * (1 + scale) + shift; residual_norm(gate=) in place (1 launch, "
    "4 passes); guidance + scheduler update in one kernel (1 launch, 4 passes instead of 10 launches, 12 passes)",
    "not changed: GEMMs (cuBLAS, bias fused, GELU / SiLU separate), attention (one fused kernel either "
    "way), the KV-cache append, embeddings",
)


@dataclass(frozen=True)
class GraphModel:
    """Launch cost inside a replayed CUDA graph (ASSUMED, not measured): a kernel node costs ``node_s``
    instead of a host launch, and each replay ``replay_s``. The accelerated path captures the head's
    K-step denoising loop, one graph replay per AR step."""
    node_s: float = 1e-6
    replay_s: float = 10e-6


def accelerated_block_costs(batch: int, queries: int, keys: int, width: int, e: int = 2,
                            ceilings: Ceilings = Ceilings(), kv_cache: bool = False,
                            query_rows: int | None = None) -> dict[str, Cost]:
    """``block_costs`` as the accelerated path runs it: the two (LayerNorm, residual) pairs fused into
    residual_norm; with ``query_rows``, queries / proj / MLP / norms only on that many rows per sequence
    (keys and values still for all ``queries`` tokens)."""
    ops = block_costs(batch, queries, keys, width, e, ceilings, kv_cache)
    d = width
    ops["norm+residual"] = elementwise_cost(batch * queries * d, 6, 2, e, 10.0, ceilings)
    if query_rows is not None:
        rows_q, rows_kv = batch * query_rows, batch * queries
        qkv = Cost()
        qkv.add(linear_cost(rows_kv, d, 2 * d, e, ceilings))      # keys, values: every token
        qkv.add(linear_cost(rows_q, d, d, e, ceilings))           # queries: the read tokens only
        qkv.calls = 1
        ops["qkv"] = qkv
        ops["attention"] = attention_cost(batch, query_rows, keys, d, e, ceilings)
        ops["proj"] = linear_cost(rows_q, d, d, e, ceilings)
        ops["mlp.fc1"] = linear_cost(rows_q, d, 4 * d, e, ceilings)
        ops["mlp.gelu"] = elementwise_cost(rows_q * 4 * d, 2, 1, e, 8.0, ceilings)
        ops["mlp.fc2"] = linear_cost(rows_q, 4 * d, d, e, ceilings)
        ops["norm+residual"] = elementwise_cost(rows_q * d, 6, 2, e, 10.0, ceilings)
    return ops


def accelerated_head_call_costs(tokens: int, shape: ModelShape, e: int,
                                ceilings: Ceilings = Ceilings()) -> dict[str, Cost]:
    """One denoising step of ``denoise_tokens`` on ``tokens`` rows (guidance included); the per-AR-step
    work hoisted out of the loop is ``accelerated_head_step_costs``."""
    c = ceilings
    w = shape.head_width
    out_dim = shape.image_patch ** 2 * shape.latent_channels
    embed = Cost()
    embed.add(linear_cost(tokens, out_dim, w, e, c))                  # patch embed of the noisy tokens
    embed.add(elementwise_cost(tokens * w, 3, 1, e, 4.0, c))          # SiLU(cond + t)
    adaln = Cost()
    adaln.add(linear_cost(tokens, w, (3 * shape.head_depth + 2) * w, e, c))   # every block's stats, one GEMM
    mlp, gate = Cost(), Cost()
    for _ in range(shape.head_depth):
        adaln.add(elementwise_cost(tokens * w, 4, 1, e, 10.0, c))     # modulate: x, scale, shift -> out
        mlp.add(linear_cost(tokens, w, w, e, c))
        mlp.add(elementwise_cost(tokens * w, 2, 1, e, 4.0, c))        # SiLU
        mlp.add(linear_cost(tokens, w, w, e, c))
        gate.add(elementwise_cost(tokens * w, 4, 1, e, 10.0, c))      # residual_norm(gate=), in place
    final = Cost()
    final.add(elementwise_cost(tokens * w, 4, 1, e, 10.0, c))         # modulate
    final.add(linear_cost(tokens, w, out_dim, e, c))
    step = elementwise_cost(tokens * out_dim, 4, 1, e, 10.0, c)      # guidance + scheduler, one kernel
    for cost in (embed, final):
        cost.calls = 1
    adaln.calls = 1
    for cost in (mlp, gate):
        cost.calls = shape.head_depth
    return {"embed": embed, "adaln": adaln, "mlp": mlp, "norm+gate": gate, "final": final, "cfg+scheduler": step}


def accelerated_head_step_costs(tokens: int, shape: ModelShape, e: int, ceilings: Ceilings = Ceilings(),
                                graphs: GraphModel | None = None) -> dict[str, Cost]:
    """Once per AR step: the condition projection of the ``tokens`` rows and, with CUDA graphs, the
    replay of the captured loop."""
    c = ceilings
    w, d = shape.head_width, shape.width
    setup = Cost()
    setup.add(linear_cost(tokens, d, w, e, c))                       # condition_proj.fc1
    setup.add(elementwise_cost(tokens * w, 2, 1, e, 4.0, c))         # SiLU
    setup.add(linear_cost(tokens, w, w, e, c))                       # condition_proj.fc2
    setup.calls = 1
    out = {"condition (once per AR step)": setup}
    if graphs is not None:
        out["graph replay"] = Cost(0.0, 0.0, 0.0, 1, graphs.replay_s)
    return out


# the bench's "other": what runs outside the encoder blocks and the head (embeddings, canvas gather/scatter)
OTHER_OPS = {("temporal", "text_embed"), ("temporal", "text_norm"), ("temporal", "motion_embed"),
             ("temporal", "embed"), ("spatial", "embed"), ("spatial", "gather/scatter")}
STAGES = ("temporal", "spatial", "head", "other")


def _by_stage(p: Projection) -> dict[str, Cost]:
    out = {s: Cost() for s in STAGES}
    for (stage, op), cost in p.ops.items():
        out["other" if (stage, op) in OTHER_OPS else stage].add(cost)
    return out


def _floor(p: Projection) -> dict[str, float]:
    """Per stage: the roofline floor, sum over ops of max(compute, memory), no launch cost at all."""
    out = {s: 0.0 for s in STAGES}
    for (stage, op), cost in p.ops.items():
        out["other" if (stage, op) in OTHER_OPS else stage] += max(cost.flops / p.ceilings.peak_flops,
                                                                   cost.bytes / p.ceilings.hbm_bytes_per_s)
    return out


def compare_paths(shape: ModelShape, workload: Workload = Workload(), ceilings: Ceilings = Ceilings(),
                  graphs: GraphModel = GraphModel()) -> dict:
    """Eager against accelerated, per stage (PROJECTED): what fusion removes (launches, bytes, seconds),
    what CUDA graphs remove, the accelerated total and its floor (no launch cost)."""
    eager = project(shape, workload, ceilings)
    fused = project(shape, workload, ceilings, path="accelerated", graphs=None)
    graphed = project(shape, workload, ceilings, path="accelerated", graphs=graphs)
    e_st, f_st, g_st, floor = _by_stage(eager), _by_stage(fused), _by_stage(graphed), _floor(graphed)
    rows = {}
    for s in STAGES:
        rows[s] = {
            "eager_s": e_st[s].seconds, "eager_launches": e_st[s].launches, "eager_bytes": e_st[s].bytes,
            "eager_flops": e_st[s].flops,
            "fusion_removes_launches": e_st[s].launches - f_st[s].launches,
            "fusion_removes_bytes": e_st[s].bytes - f_st[s].bytes,
            "fusion_removes_flops": e_st[s].flops - f_st[s].flops,
            "fusion_removes_s": e_st[s].seconds - f_st[s].seconds,
            "graphs_remove_s": f_st[s].seconds - g_st[s].seconds,
            "accelerated_s": g_st[s].seconds, "accelerated_launches": g_st[s].launches,
            "accelerated_bytes": g_st[s].bytes, "accelerated_flops": g_st[s].flops, "floor_s": floor[s],
        }
    return {"label": "PROJECTION (not measured)", "stages": rows, "graphs": asdict(graphs),
            "accelerated_path": list(ACCELERATED_PATH),
            "total": {k: sum(r[k] for r in rows.values()) for k in rows["spatial"]},
            "moonshot": moonshot(shape, ceilings, graphs)}


# The goal set for the accelerated path: one osp480 video of 33 frames (9 latent frames), 64 AR steps,
# 25 denoising steps, classifier-free guidance, on one H100, in 3 s.
MOONSHOT = dict(latent_frames=9, ar_steps=64, diffusion_steps=25, guidance_batch=2, target_s=3.0)


def moonshot(shape: ModelShape, ceilings: Ceilings = Ceilings(), graphs: GraphModel = GraphModel()) -> dict:
    """What the moonshot takes on the model's ceilings (PROJECTED): the accelerated path's time and
    floor, the sustained FLOP rate 3 s needs, and the levers the model can price."""
    m = MOONSHOT
    wl = Workload(latent_frames=m["latent_frames"], ar_steps=m["ar_steps"], diffusion_steps=m["diffusion_steps"],
                  guidance_batch=m["guidance_batch"])
    acc = project(shape, wl, ceilings, path="accelerated", graphs=graphs)
    total, floor = acc.total(), sum(_floor(acc).values())
    target = m["target_s"]
    spatial_half1 = sum(c.flops for (s, o), c in acc.ops.items() if s == "spatial" and o.startswith("half1."))
    cached_half1 = _half1_flops_with_cache(shape, wl)
    launches_s = total.seconds - floor     # what the launches add over the per-op floor (graph nodes included)
    levers = [
        f"sustain {total.flops / target / 1e12:.0f} TFLOP/s over the whole video: "
        f"{total.flops / target / ceilings.peak_flops:.0%} of the {ceilings.peak_flops / 1e12:.0f} TFLOP/s peak "
        f"(the GEMMs and attention at that efficiency on average)",
        f"launch overhead down to a small share: the accelerated path still issues {total.launches:,.0f} launches, "
        f"{launches_s:.2f} s over the floor; capturing the encoders' AR steps in CUDA graphs too would price "
        f"every launch at {graphs.node_s * 1e6:.0f} us ({total.launches * graphs.node_s:.2f} s)",
        f"the spatial encoder's first half re-encodes every known token at every AR step "
        f"({spatial_half1 / 1e12:.0f} TFLOP); its attention over them is bidirectional, so their keys and values "
        f"change as tokens become known and cannot be cached exactly. A model trained with a causal-over-sets "
        f"first half could cache them and encode only the newly known tokens: {cached_half1 / 1e12:.0f} TFLOP "
        f"(saves {(spatial_half1 - cached_half1) / ceilings.peak_flops:.2f} s at peak; a model change, not a kernel)",
        f"FP8 GEMMs (twice the bf16 tensor rate) would halve the compute floor to about "
        f"{total.flops / (2 * ceilings.peak_flops):.2f} s",
    ]
    return {"label": "PROJECTED", "workload": asdict(wl), "target_s": target, "accelerated_s": total.seconds,
            "floor_s": floor, "compute_floor_s": total.flops / ceilings.peak_flops,
            "memory_floor_s": total.bytes / ceilings.hbm_bytes_per_s, "launch_s": launches_s,
            "flops": total.flops, "required_tflops": total.flops / target / 1e12,
            "required_fraction_of_peak": total.flops / target / ceilings.peak_flops,
            "meets_target_at_the_floor": floor <= target, "levers": levers}


def _half1_flops_with_cache(shape: ModelShape, wl: Workload) -> float:
    """FLOPs of the spatial first half if each AR step encoded only the tokens that became known at the
    previous step (queries) against the prefix and every known token (keys) -- a KV cache over the sets."""
    b = wl.batch * wl.guidance_batch
    flops = 0.0
    schedule = ar_schedule(shape.spatial_tokens, wl.ar_steps)
    for i, (known, _) in enumerate(schedule):
        new = known - (schedule[i - 1][0] if i else 0) + (shape.temporal_tokens if i == 0 else 0)
        ops = block_costs(b, new, shape.temporal_tokens + known, shape.width, wl.dtype_bytes)
        flops += sum(c.flops for c in ops.values()) * (shape.spatial_depth // 2)
    return flops * wl.latent_frames


def format_comparison(data: dict) -> str:
    """The eager / accelerated table of compare_paths() and the moonshot lines."""
    g = data["graphs"]
    lines = ["", "ACCELERATED PATH -- PROJECTED, NOT MEASURED (same ceilings; CUDA graphs ASSUMED at "
             f"{g['node_s'] * 1e6:.1f} us per kernel node and {g['replay_s'] * 1e6:.0f} us per replay, "
             "the head's K-step loop captured once per AR step)",
             *[f"  - {what}" for what in data["accelerated_path"]], "",
             f"{'stage':<9} {'eager s':>8} {'launches':>10} {'GB':>8} | {'fusion: -launches':>17} {'-GB':>7} "
             f"{'-TFLOP':>7} {'-s':>7} | {'graphs -s':>9} | {'accel. s':>8} {'launches':>9} {'floor s':>8}"]
    rows = list(data["stages"].items()) + [("total", data["total"])]
    for stage, r in rows:
        lines.append(f"{stage:<9} {r['eager_s']:>8.3f} {r['eager_launches']:>10,.0f} {r['eager_bytes'] / 1e9:>8.1f} | "
                     f"{r['fusion_removes_launches']:>17,.0f} {r['fusion_removes_bytes'] / 1e9:>7.1f} "
                     f"{r['fusion_removes_flops'] / 1e12:>7.2f} {r['fusion_removes_s']:>7.3f} | "
                     f"{r['graphs_remove_s']:>9.3f} | {r['accelerated_s']:>8.3f} {r['accelerated_launches']:>9,.0f} "
                     f"{r['floor_s']:>8.3f}")
    m = data["moonshot"]
    wl = m["workload"]
    lines += ["", "(the eager counts already run the head on the predicted tokens only; the reference runs it on "
              "the whole canvas, so what the accelerated head saves against the reference is larger than shown)"]
    lines += ["", f"MOONSHOT (PROJECTED): {wl['latent_frames']} latent frames (33 frames) x {wl['ar_steps']} AR steps x "
              f"{wl['diffusion_steps']} denoising steps, guidance batch {wl['guidance_batch']}, one H100, "
              f"<= {m['target_s']:.0f} s",
              f"  accelerated path: {m['accelerated_s']:.2f} s projected; floor {m['floor_s']:.2f} s (compute "
              f"{m['compute_floor_s']:.2f} s, memory {m['memory_floor_s']:.2f} s), launches {m['launch_s']:.2f} s; "
              f"{m['flops'] / 1e12:.0f} TFLOP",
              f"  the floor is {'under' if m['meets_target_at_the_floor'] else 'OVER'} the target; what it would take:"]
    lines += [f"  - {lever}" for lever in m["levers"]]
    return "\n".join(lines)


# ---- configurations ----------------------------------------------------------------------------
_ARCH = re.compile(r"(vit|mlp)_d(\d+)w(\d+)")

# Facts from docs/nova.md section 1, used when nova_fast.reference is not importable.
SPEC_CONFIGS = {
    "osp480": dict(image_dim=4, image_size=(480, 768), image_stride=8, text_token_dim=2560, text_token_len=256,
                   video_base_size=(16, 15, 24), image_base_size=(30, 48), video_mixer_rank=24,
                   arch=("vit_d16w1024", "vit_d32w1024", "mlp_d3w1280")),
    **{f"sdxl1024-w{w}": dict(image_dim=4, image_size=(1024, 1024), image_stride=8, text_token_dim=2560,
                              text_token_len=256, video_base_size=(1, 32, 32), image_base_size=(64, 64),
                              video_mixer_rank=None, arch=(f"vit_d16w{w}", f"vit_d32w{w}", f"mlp_d6w{w}"))
       for w in (768, 1024, 1536)},
}


def _field(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _heads(width: int) -> int:
    return 12 if width == 768 else 16


def shape_from_config(config, name: str = "") -> ModelShape:
    """ModelShape from a NOVA configuration: a ``NOVAConfig`` or a dict with the released
    ``config.json`` fields (image_size, image_stride, image_dim, text_token_len, video_base_size,
    video_mixer_rank, arch)."""
    arch = _field(config, "arch")
    if arch is None:
        raise ValueError(f"configuration {name or config!r} has no 'arch' field")
    parsed = []
    for part in arch:
        m = _ARCH.fullmatch(str(part))
        if not m:
            raise ValueError(f"cannot read arch entry {part!r} (expected vit_dNwM / mlp_dNwM)")
        parsed.append((int(m.group(2)), int(m.group(3))))
    (t_depth, t_width), (s_depth, s_width), (h_depth, h_width) = parsed
    stride = int(_field(config, "image_stride", 8))
    height, width_px = _field(config, "image_size")
    patch = int(_field(config, "image_patch_size", None) or (15 // stride + 1))
    video_patch = int(_field(config, "video_patch_size", None) or 2 * patch)
    latent_h, latent_w = height // stride, width_px // stride
    video_base = _field(config, "video_base_size", (1, 0, 0))
    is_video = int(video_base[0]) > 1
    heads = _field(config, "num_heads", None) or _field(config, "heads", None) or _heads(s_width)
    return ModelShape(
        name=name or str(_field(config, "name", "")),
        width=s_width, heads=int(heads), temporal_depth=t_depth, spatial_depth=s_depth,
        head_width=h_width, head_depth=h_depth,
        spatial_tokens=(latent_h // patch) * (latent_w // patch),
        temporal_tokens=(latent_h // video_patch) * (latent_w // video_patch),
        text_tokens=int(_field(config, "text_token_len", 256)),
        motion_tokens=2 if is_video else 0,
        text_dim=int(_field(config, "text_token_dim", 2560)),
        latent_channels=int(_field(config, "image_dim", 4)),
        image_patch=patch, video_patch=video_patch,
        mixer_rank=_field(config, "video_mixer_rank", None) if is_video else None,
    )


def load_shape(name: str) -> tuple[ModelShape, str]:
    """(shape, where the configuration came from) for a preset name."""
    config = None
    try:
        from nova_fast.reference import NOVAConfig
    except ImportError:
        NOVAConfig = None
    if NOVAConfig is not None:
        try:
            config = NOVAConfig.preset(name)
        except Exception as exc:  # noqa: BLE001 -- any failure: say which name, keep the cause
            if name not in SPEC_CONFIGS:
                raise ValueError(f"unknown configuration {name!r}: {exc}") from exc
    if config is not None:
        try:
            return shape_from_config(_config_fields(config), name), "nova_fast.reference.NOVAConfig"
        except (TypeError, ValueError, KeyError):
            pass    # a config without the released fields: the spec's table below still knows the preset
    if name not in SPEC_CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; known here: {', '.join(SPEC_CONFIGS)}")
    return shape_from_config(SPEC_CONFIGS[name], name), "docs/nova.md section 1 (built-in table)"


def _config_fields(config):
    if isinstance(config, dict):
        return config
    for attr in ("to_dict", "asdict"):
        if callable(getattr(config, attr, None)):
            return getattr(config, attr)()
    try:
        return asdict(config)
    except TypeError:
        return vars(config)


# ---- report ------------------------------------------------------------------------------------
def format_projection(p: Projection, source: str = "") -> str:
    s, wl, c = p.shape, p.workload, p.ceilings
    frames = wl.latent_frames
    lines = [
        f"NOVA roofline -- PROJECTED, NOT MEASURED -- config {s.name}" + (f" (from {source})" if source else ""),
        f"model: temporal {s.temporal_depth}x{s.width}, spatial {s.spatial_depth}x{s.width} ({s.heads} heads), "
        f"head {s.head_depth}x{s.head_width}; tokens/frame spatial {s.spatial_tokens}, temporal {s.temporal_tokens}, "
        f"prefix {s.prefix_tokens} (text {s.text_tokens} + motion {s.motion_tokens})",
        f"workload: {frames} latent frames x {wl.ar_steps} AR steps ({p.executed_ar_steps} executed) x "
        f"{wl.diffusion_steps} denoising steps, guidance batch {wl.guidance_batch}, {8 * wl.dtype_bytes}-bit",
        f"ceilings ({c.name}): tensor {c.peak_flops / 1e12:.0f} TFLOP/s, HBM {c.hbm_bytes_per_s / 1e12:.1f} TB/s, "
        f"{c.launch_s * 1e6:.1f} us per launch; projected time per call = max(flops/peak, bytes/HBM) + launches*launch",
        "launch model: eager PyTorch, one launch per GEMM / fused attention / LayerNorm / elementwise op, no CUDA graphs",
        "",
        f"{'stage':<9} {'op':<22} {'calls/video':>11} {'GFLOP/video':>12} {'GB/video':>9} {'launches':>9} "
        f"{'projected s':>11} {'bound':>7}",
    ]
    for (stage, op), cost in sorted(p.ops.items(), key=lambda kv: (kv[0][0], -kv[1].seconds)):
        compute = cost.flops / c.peak_flops
        memory = cost.bytes / c.hbm_bytes_per_s
        launch = cost.launches * c.launch_s
        bound = "launch" if launch > max(compute, memory) else ("compute" if compute >= memory else "memory")
        lines.append(f"{stage:<9} {op:<22} {cost.calls:>11,d} {cost.flops / 1e9:>12,.1f} {cost.bytes / 1e9:>9,.2f} "
                     f"{int(cost.launches):>9,d} {cost.seconds:>11.4f} {bound:>7}")
    totals = p.stage_totals()
    total = p.total()
    lines += ["", f"{'stage':<9} {'TFLOP/video':>11} {'GB/video':>9} {'launches':>9} {'projected s/video':>17} "
              f"{'projected s/frame':>17} {'paper s/video':>13}"]
    # the paper's spatial figure (11.97 s) plus temporal (0.03 s) is its whole 12 s, so it must include the
    # diffusion head: it is compared with the spatial + head row, not the spatial encoder alone
    paper = {"temporal": PAPER["temporal_s"], "spatial": None, "head": None}
    for stage in ("temporal", "spatial", "head"):
        cost = totals.get(stage, Cost())
        ref = paper[stage]
        lines.append(f"{stage:<9} {cost.flops / 1e12:>11.2f} {cost.bytes / 1e9:>9.1f} {int(cost.launches):>9,d} "
                     f"{cost.seconds:>17.3f} {cost.seconds / frames:>17.4f} "
                     f"{(f'{ref:.2f}' if ref is not None else 'n/a'):>13}")
    both = Cost()
    both.add(totals.get("spatial", Cost()))
    both.add(totals.get("head", Cost()))
    lines.append(f"{'sp.+head':<9} {both.flops / 1e12:>11.2f} {both.bytes / 1e9:>9.1f} {int(both.launches):>9,d} "
                 f"{both.seconds:>17.3f} {both.seconds / frames:>17.4f} {PAPER['spatial_s']:>13.2f}")
    lines.append(f"{'video':<9} {total.flops / 1e12:>11.2f} {total.bytes / 1e9:>9.1f} {int(total.launches):>9,d} "
                 f"{total.seconds:>17.3f} {total.seconds / frames:>17.4f} {PAPER['video_s']:>13.2f}")
    lines += ["", f"projected: {total.seconds:.2f} s per video on the stated ceilings "
                  f"({total.launches * c.launch_s:.2f} s of it launch cost); "
                  f"paper ({PAPER['what']}): {PAPER['video_s']} s, spatial layers {PAPER['spatial_s']} s, "
                  f"temporal {PAPER['temporal_s']} s "
                  f"(its spatial figure includes the diffusion head: 11.97 + 0.03 = 12)"]
    return "\n".join(lines)


# ---- scale-out over several GPUs (nova_fast.distributed) -----------------------------------------
@dataclass(frozen=True)
class Link:
    """A GPU-to-GPU link as the scale-out projection models it: each collective costs
    ``latency_s + bytes this GPU sends / bytes_per_s``; no overlap with compute."""
    name: str
    what: str
    bytes_per_s: float     # per GPU, per direction
    latency_s: float       # per collective (NCCL small-message latency)


LINKS = (Link("NVLink", "NVLink 4, H100 SXM through NVSwitch", 450e9, 10e-6),
         Link("PCIe", "PCIe Gen5 x16, no NVLink", 50e9, 25e-6))
# the block ops whose tokens (Linear, norms, MLP) or heads (attention) Ulysses splits; Linear weights
# stay whole on every rank (bytes per call: dims in units of the width)
_ULYSSES_SPLIT = {"qkv": 3, "proj": 1, "mlp.fc1": 4, "mlp.fc2": 4, "attention": 0, "norm+residual": 0,
                  "mlp.gelu": 0, "kv_cache": 0}


def _scale_plans(gpus: int, heads: int, guidance: bool) -> list[tuple[int, int, int]]:
    """Every (cfg, dp, ulysses) with cfg * dp * ulysses = gpus, cfg in {1, 2} (2 only with guidance)
    and ulysses dividing the head count."""
    plans = []
    for cfg in ((1, 2) if guidance else (1,)):
        for u in range(1, gpus + 1):
            if gpus % (cfg * u) == 0 and heads % u == 0:
                plans.append((cfg, gpus // (cfg * u), u))
    return plans


def _ulysses_seconds(stage: str, op: str, cost: Cost, u: int, width: int, e: int, c: Ceilings) -> float:
    """One op's projected seconds on a rank of a Ulysses group of u: its work (FLOPs, activation bytes)
    divided by u, weights read whole, launches unchanged. Ops outside the encoder blocks are not split."""
    name = op.split(".", 1)[1] if op.startswith(("half1.", "half2.")) else op
    if u == 1 or stage not in ("temporal", "spatial") or name not in _ULYSSES_SPLIT:
        return cost.seconds
    weights = cost.calls * e * _ULYSSES_SPLIT[name] * width * width
    launch = cost.launches * c.launch_s
    whole = max(cost.flops / c.peak_flops, cost.bytes / c.hbm_bytes_per_s)
    split = max(cost.flops / u / c.peak_flops, ((cost.bytes - weights) / u + weights) / c.hbm_bytes_per_s)
    return launch + (cost.seconds - launch) * (split / whole if whole > 0 else 1.0)


def scale_out_communication(shape: ModelShape, workload: Workload, cfg: int, dp: int, ulysses: int) -> dict:
    """Bytes one GPU sends and collectives it joins per video, by kind (what nova_fast.distributed does):
    cfg: an all-gather of the head outputs (its pass, predicted tokens x patch values) per denoising step;
    ulysses: per encoder block two all-to-alls (q, k, v of its tokens, then the attention output), per
    encoder segment (temporal pass, each spatial half) one all-gather of the sequence;
    dp: one all-gather of the finished latents."""
    e, d = workload.dtype_bytes, shape.width
    rows = workload.batch * workload.guidance_batch // cfg
    tt, ts, prefix = shape.temporal_tokens, shape.spatial_tokens, shape.prefix_tokens
    out = {k: {"bytes": 0.0, "collectives": 0} for k in ("cfg", "ulysses", "dp")}
    schedule = ar_schedule(ts, workload.ar_steps)
    frames = workload.latent_frames
    if cfg > 1:
        token = shape.image_patch ** 2 * shape.latent_channels
        per_frame = sum(n for _, n in schedule) * token * e * workload.batch * (cfg - 1)
        out["cfg"]["bytes"] = per_frame * workload.diffusion_steps * frames
        out["cfg"]["collectives"] = len(schedule) * workload.diffusion_steps * frames
    if ulysses > 1:
        u = ulysses
        share = (u - 1) / u

        def segment(seq: int, blocks: int) -> tuple[float, int]:
            a2a = blocks * 4 * rows * seq * d * e * share / u       # q, k, v out; attention output back
            gather = rows * seq / u * d * e * (u - 1)
            return a2a + gather, 2 * blocks + 1
        segments = [segment(tt + (prefix if t == 0 else 0), shape.temporal_depth) for t in range(frames)]
        half = shape.spatial_depth // 2
        for known, _ in schedule:
            segments += [segment(tt + known, half), segment(tt + ts, shape.spatial_depth - half)] * frames
        out["ulysses"]["bytes"] = sum(b for b, _ in segments)
        out["ulysses"]["collectives"] = sum(n for _, n in segments)
    if dp > 1:
        latents = frames * shape.latent_channels * shape.spatial_tokens * shape.image_patch ** 2   # values per video
        out["dp"]["bytes"] = workload.batch * latents * e * (dp - 1)
        out["dp"]["collectives"] = 1
    return out


def project_scale_out(shape: ModelShape, workload: Workload = Workload(), ceilings: Ceilings = Ceilings(),
                      gpus: int = 2, links: tuple = LINKS) -> dict:
    """PROJECTED latency per video and throughput on ``gpus`` GPUs for every way nova_fast.distributed
    can split them: per-GPU compute = this module's roofline of the GPU's share (cfg: one guidance
    pass; ulysses: the encoder blocks' work / u, weights and launches whole; the head and everything
    outside the encoder blocks repeated on every GPU of a Ulysses group; dp: its own videos), plus the
    communication of ``scale_out_communication`` over each link, not overlapped. ``workload.batch``
    is the videos of one data-parallel group."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    single = project(shape, workload, ceilings).total().seconds
    rows = []
    for cfg, dp, u in _scale_plans(gpus, shape.heads, workload.guidance_batch == 2):
        per_gpu = project(shape, Workload(**{**asdict(workload), "guidance_batch": workload.guidance_batch // cfg}),
                          ceilings)
        compute = sum(_ulysses_seconds(stage, op, cost, u, shape.width, workload.dtype_bytes, ceilings)
                      for (stage, op), cost in per_gpu.ops.items())
        comm = scale_out_communication(shape, workload, cfg, dp, u)
        sent = sum(v["bytes"] for v in comm.values())
        count = sum(v["collectives"] for v in comm.values())
        per_link = {}
        for link in links:
            comm_s = count * link.latency_s + sent / link.bytes_per_s
            latency = compute + comm_s
            per_link[link.name] = {"comm_s": comm_s, "latency_s": latency, "speedup": single / latency,
                                   "videos_per_s": dp * workload.batch / latency}
        rows.append({"cfg": cfg, "dp": dp, "ulysses": u, "compute_s": compute, "comm": comm, "bytes_sent": sent,
                     "collectives": count, "links": per_link})
    return {"label": "PROJECTION (not measured)", "gpus": gpus, "shape": asdict(shape), "workload": asdict(workload),
            "ceilings": asdict(ceilings), "links": [asdict(link) for link in links], "single_gpu_s": single,
            "plans": rows}


def format_scale_out(result: dict, source: str = "") -> str:
    s, wl = result["shape"], result["workload"]
    links = result["links"]
    lines = [
        f"NOVA scale-out on {result['gpus']} GPUs -- PROJECTED, NOT MEASURED -- config {s['name']}"
        + (f" (from {source})" if source else ""),
        f"workload: {wl['latent_frames']} latent frames x {wl['ar_steps']} AR steps x {wl['diffusion_steps']} denoising "
        f"steps, guidance batch {wl['guidance_batch']}, {wl['batch']} video(s) per data-parallel group, "
        f"{8 * wl['dtype_bytes']}-bit",
        "model: per-GPU compute = the single-GPU roofline of its share (cfg=2: one guidance pass; ulysses=u: encoder "
        "blocks' FLOPs and activation bytes / u, weights and launches whole, the head repeated on each GPU of the "
        "group); communication = collectives x latency + bytes sent / link bandwidth, NOT overlapped with compute",
        "links: " + "; ".join(f"{l['name']} ({l['what']}) {l['bytes_per_s'] / 1e9:.0f} GB/s per direction, "
                              f"{l['latency_s'] * 1e6:.0f} us per collective" for l in links),
        f"1 GPU: {result['single_gpu_s']:.2f} s per video (projected)",
        "",
        f"{'cfg x dp x ulysses':<19} {'compute s':>9} {'GB sent/GPU':>11} {'collectives':>11}"
        + "".join(f" | {name + ' comm s':>13} {'s/video':>8} {'x 1 GPU':>7} {'videos/s':>8}"
                  for name in (l["name"] for l in links)),
    ]
    for row in result["plans"]:
        line = (f"{row['cfg']} x {row['dp']} x {row['ulysses']:<11} {row['compute_s']:>9.2f} "
                f"{row['bytes_sent'] / 1e9:>11,.3f} {row['collectives']:>11,d}")
        for l in links:
            v = row["links"][l["name"]]
            line += f" | {v['comm_s']:>13.2f} {v['latency_s']:>8.2f} {v['speedup']:>7.2f} {v['videos_per_s']:>8.3f}"
        lines.append(line)
    lines += ["", "cfg: one all-gather of the head outputs per denoising step; ulysses: per encoder block two "
                  "all-to-alls (q,k,v and the attention output), per encoder segment one all-gather; dp: one "
                  "all-gather of the latents per video (latency per video unchanged, videos/s x dp)"]
    return "\n".join(lines)
