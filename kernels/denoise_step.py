"""Fused guidance + scheduler step of the diffusion-head loop (one launch per denoising step).

For every predicted token the head returns ``m`` passes stacked on the batch axis (cond,
uncond[, third]); this kernel combines them (classifier-free guidance, optional renorm, optional
third pass) and applies the scheduler update to the token sample in the same pass over memory:

    g1    = o1 + s * (o0 - o_k)            k = 1 (cfg, stg) or 2 (image guidance)
    g1   *= clamp(|o0| / |g1|, renorm_min, 1)   norms over one renorm group (RENORM only)
    g     = g1 + s2 * (o2 - o1)  (image)  |  g1 + s2 * (o0 - o2)  (stg)  |  g1
    x0    = (c[0] * x + c[1] * g) / c[2]
    x_new = c[3] * x0 + c[4] * x + c[5] * noise

``c = coef[step]`` is one row of a (K, 8) fp32 table prepared on the device before the loop, so
flow Euler (x0 := v, x_new = dt * v + x) and DDPM (epsilon, v or sample prediction, posterior
mean plus ``std * noise``) are the same code. Guidance scales are read from a small device tensor
``scales = [s, s2, renorm_min]`` so a captured CUDA graph replays with new values.

A renorm group is ``group_len`` contiguous elements: one token (P = p*p*C) or one sample (n*P);
groups start every ``group_stride`` elements, and the elements in between (padding tokens of a
bucket) are neither read nor written.
Groups up to SPLIT_CHUNK elements: each program handles GROUPS groups as a [GROUPS, BLOCK] tile (512
elements), looping over the group when it is longer than BLOCK; with RENORM the guided values are
recomputed in a second sweep instead of being stored. Longer groups (per-sample renorm over n * P
elements) are split across programs, one per SPLIT_CHUNK chunk: with RENORM a first kernel writes
each chunk's two partial sums, and every program of the group adds them up in the same order.
"""
import torch
import triton
import triton.language as tl

from nova_fast.guidance_modes import GuideMode
from nova_fast.testing.triton_aot import AotSpec

# the guidance modes (values from nova_fast.guidance_modes) as compile-time constants of the kernels
GUIDE_NONE, GUIDE_CFG, GUIDE_IMAGE, GUIDE_STG = (tl.constexpr(mode.value) for mode in GuideMode)


@triton.jit
def _first_stage(out_ptr, offs, mask, pass_stride, s, GUIDE: tl.constexpr):
    # Returns (o0, g1): the conditional pass and the guided value before renorm. Pass j starts at
    # out_ptr + j * pass_stride: reached by adding pass_stride to the pointer j times, never by an
    # i32 product that overflows once 2 * pass_stride >= 2^31.
    o0 = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDE == GUIDE_NONE:
        g1 = o0
    else:
        out1_ptr = out_ptr + pass_stride
        o1 = tl.load(out1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDE == GUIDE_IMAGE:
            o2 = tl.load(out1_ptr + pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
            g1 = o1 + (o0 - o2) * s
        else:
            g1 = o1 + (o0 - o1) * s
    return o0, g1


@triton.jit
def _renorm_factor(cond_sq, guided_sq, renorm_min):
    # clamp(|o0| / |g1|, renorm_min, 1) as torch.clamp does it: a NaN ratio (both norms 0) stays
    # NaN, as in the reference; min/max would turn it into a bound.
    ratio = tl.sqrt(cond_sq) / tl.sqrt(guided_sq)
    return tl.where(ratio < renorm_min, renorm_min, tl.where(ratio > 1.0, 1.0, ratio))


@triton.jit
def _apply_tile(out_ptr, x_ptr, noise_ptr, new_x_ptr, offs, mask, pass_stride, s, s2, factor, coef,
                GUIDE: tl.constexpr, RENORM: tl.constexpr, HAS_NOISE: tl.constexpr):
    # The guided value of one tile (renorm factor applied, third-pass term added) and the scheduler
    # update, stored into new_x.
    o0, g = _first_stage(out_ptr, offs, mask, pass_stride, s, GUIDE)
    if RENORM:
        g = g * factor
    if GUIDE == GUIDE_IMAGE:
        out1_ptr = out_ptr + pass_stride
        o1 = tl.load(out1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o2 = tl.load(out1_ptr + pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
        g = g + (o2 - o1) * s2
    if GUIDE == GUIDE_STG:
        o2 = tl.load(out_ptr + pass_stride + pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
        g = g + (o0 - o2) * s2
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c_x0_x, c_x0_g, c_x0_div = tl.load(coef), tl.load(coef + 1), tl.load(coef + 2)
    c_x0, c_x, c_noise = tl.load(coef + 3), tl.load(coef + 4), tl.load(coef + 5)
    x0 = (x * c_x0_x + g * c_x0_g) / c_x0_div
    new_x = x0 * c_x0 + x * c_x
    if HAS_NOISE:
        new_x = new_x + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c_noise
    tl.store(new_x_ptr + offs, new_x.to(new_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def guided_step_kernel(out_ptr, x_ptr, noise_ptr, new_x_ptr, coef_ptr, scales_ptr, step, num_groups, group_len,
                       group_stride, pass_stride, GUIDE: tl.constexpr, RENORM: tl.constexpr, HAS_NOISE: tl.constexpr,
                       GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    # Groups up to SPLIT_CHUNK elements: GROUPS whole groups per program, as a [GROUPS, BLOCK] tile.
    pid = tl.program_id(0)
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    group_ok = groups < num_groups
    base = groups.to(tl.int64)[:, None] * group_stride
    cols = tl.arange(0, BLOCK)[None, :]
    s = tl.load(scales_ptr)
    s2 = tl.load(scales_ptr + 1)
    coef = coef_ptr + step * 8

    factor = tl.full([GROUPS, 1], 1.0, tl.float32)
    if RENORM:
        cond_sq = tl.zeros([GROUPS, BLOCK], tl.float32)
        guided_sq = tl.zeros([GROUPS, BLOCK], tl.float32)
        for start in range(0, group_len, BLOCK):
            mask = group_ok[:, None] & (start + cols < group_len)
            o0, g1 = _first_stage(out_ptr, base + start + cols, mask, pass_stride, s, GUIDE)
            cond_sq += o0 * o0
            guided_sq += g1 * g1
        guided = tl.where(group_ok, tl.sum(guided_sq, axis=1), 1.0)  # no 0/0 in idle rows
        factor = _renorm_factor(tl.sum(cond_sq, axis=1), guided, tl.load(scales_ptr + 2))[:, None]

    for start in range(0, group_len, BLOCK):
        mask = group_ok[:, None] & (start + cols < group_len)
        _apply_tile(out_ptr, x_ptr, noise_ptr, new_x_ptr, base + start + cols, mask, pass_stride, s, s2, factor,
                    coef, GUIDE, RENORM, HAS_NOISE)


@triton.jit
def _split_chunk(chunks, group_stride, CHUNK: tl.constexpr):
    # Long groups: program (group, chunk) -> (program id, group, the chunk's first element in its
    # group, the group's offset as int64).
    pid = tl.program_id(0)
    group = pid // chunks
    return pid, group, (pid - group * chunks) * CHUNK, group.to(tl.int64) * group_stride


@triton.jit
def renorm_partials_kernel(out_ptr, scales_ptr, partial_ptr, group_len, group_stride, pass_stride, chunks,
                           GUIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # Long groups, first pass: program (group, chunk) writes the chunk's sums of o0^2 and g1^2 to
    # partial[group * chunks + chunk] (fp32 pairs).
    pid, group, first, base = _split_chunk(chunks, group_stride, CHUNK)
    cols = tl.arange(0, BLOCK)
    s = tl.load(scales_ptr)
    cond_sq = tl.zeros([BLOCK], tl.float32)
    guided_sq = tl.zeros([BLOCK], tl.float32)
    for start in range(0, CHUNK, BLOCK):
        k = first + start + cols
        o0, g1 = _first_stage(out_ptr, base + k, k < group_len, pass_stride, s, GUIDE)
        cond_sq += o0 * o0
        guided_sq += g1 * g1
    tl.store(partial_ptr + pid.to(tl.int64) * 2, tl.sum(cond_sq, axis=0))
    tl.store(partial_ptr + pid.to(tl.int64) * 2 + 1, tl.sum(guided_sq, axis=0))


@triton.jit
def guided_step_split_kernel(out_ptr, x_ptr, noise_ptr, new_x_ptr, coef_ptr, scales_ptr, partial_ptr, step,
                             group_len, group_stride, pass_stride, chunks, GUIDE: tl.constexpr,
                             RENORM: tl.constexpr, HAS_NOISE: tl.constexpr, CHUNK: tl.constexpr,
                             BLOCK: tl.constexpr, PARTS: tl.constexpr):
    # Long groups, second pass: program (group, chunk) steps one CHUNK of its group. With renorm,
    # every program of a group adds the group's partial sums in the same order: one factor per group.
    pid, group, first, base = _split_chunk(chunks, group_stride, CHUNK)
    cols = tl.arange(0, BLOCK)
    s = tl.load(scales_ptr)
    s2 = tl.load(scales_ptr + 1)
    coef = coef_ptr + step * 8
    factor = 1.0
    if RENORM:
        parts = partial_ptr + group.to(tl.int64) * chunks * 2
        cond_sq = tl.zeros([PARTS], tl.float32)
        guided_sq = tl.zeros([PARTS], tl.float32)
        for p in range(0, chunks, PARTS):
            idx = p + tl.arange(0, PARTS)
            cond_sq += tl.load(parts + idx * 2, mask=idx < chunks, other=0.0)
            guided_sq += tl.load(parts + idx * 2 + 1, mask=idx < chunks, other=0.0)
        factor = _renorm_factor(tl.sum(cond_sq, axis=0), tl.sum(guided_sq, axis=0), tl.load(scales_ptr + 2))
    for start in range(0, CHUNK, BLOCK):
        k = first + start + cols
        _apply_tile(out_ptr, x_ptr, noise_ptr, new_x_ptr, base + k, k < group_len, pass_stride, s, s2, factor,
                    coef, GUIDE, RENORM, HAS_NOISE)


TILE = 512  # elements per program and sweep: 4 per thread at 4 warps keeps the renorm sweep spill-free
# Groups longer than this are split across programs: CHUNK elements each (8 sweeps of TILE), the
# renorm norms summed from per-chunk partials (one program per sample would leave a GPU idle: a
# per-sample group is n * P elements for B samples).
SPLIT_CHUNK = 4096
PARTS = 64  # partial sums read per sweep in the split kernel


def tile_shape(group_len: int) -> tuple[int, int]:
    """(GROUPS, BLOCK): TILE-element tiles, whole short groups per row of the tile."""
    block = min(triton.next_power_of_2(max(group_len, 1)), TILE)
    return max(1, TILE // block), block


def split_chunks(group_len: int) -> int:
    """Programs per group: 0 (whole groups per program) up to SPLIT_CHUNK elements, else the chunk count."""
    return 0 if group_len <= SPLIT_CHUNK else triton.cdiv(group_len, SPLIT_CHUNK)


def launch_grids(num_groups: int, group_len: int, renorm: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The kernels one step launches and their grids, in order (computed without launching)."""
    chunks = split_chunks(group_len)
    if not chunks:
        return [("guided_step_kernel", (triton.cdiv(num_groups, tile_shape(group_len)[0]),))]
    grid = (num_groups * chunks,)
    return ([("renorm_partials_kernel", grid)] if renorm else []) + [("guided_step_split_kernel", grid)]


def workspace_floats(num_groups: int, group_len: int, renorm: bool) -> int:
    """fp32 elements of the partial-sum workspace one step needs (0: none)."""
    chunks = split_chunks(group_len)
    return 2 * num_groups * chunks if renorm and chunks else 0


def _check_contiguous(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"denoise step: {name} must be contiguous (flat passes / groups), got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")


def guided_step(out, x, noise, new_x, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                group_stride: int | None = None, workspace=None):
    """Launch one fused step: ``out`` (m*G*group_stride), ``x``/``noise``/``new_x`` (G*group_stride).

    Only the first ``group_len`` elements of every ``group_stride`` are read, normed and written
    (the rest are padding tokens of a bucket). Groups longer than SPLIT_CHUNK take two launches with
    renorm (partial sums, then the step) and a small fp32 workspace: ``workspace`` (at least
    ``workspace_floats(...)`` fp32 elements, e.g. allocated once before a captured loop) or, when None,
    one allocated here per call.
    """
    _check_contiguous(out=out, x=x, noise=noise, new_x=new_x, coef=coef, scales=scales)
    group_stride = group_len if group_stride is None else group_stride
    num_groups = x.numel() // group_stride
    if num_groups == 0 or group_len == 0:
        return new_x
    noise_arg = noise if noise is not None else x
    chunks = split_chunks(group_len)
    if not chunks:
        groups, block = tile_shape(group_len)
        grid = (triton.cdiv(num_groups, groups),)
        guided_step_kernel[grid](out, x, noise_arg, new_x, coef, scales, step, num_groups, group_len, group_stride,
                                 x.numel(), GUIDE=guide, RENORM=renorm, HAS_NOISE=noise is not None, GROUPS=groups,
                                 BLOCK=block, num_warps=4)
        return new_x
    grid = (num_groups * chunks,)
    # without renorm the split kernel reads no partial sums (scales stands in for the pointer)
    partial = scales
    if renorm:
        need = workspace_floats(num_groups, group_len, renorm)
        if workspace is None:
            partial = torch.empty((need,), device=x.device, dtype=torch.float32)
        elif (workspace.dtype != torch.float32 or workspace.device != x.device or workspace.numel() < need
              or not workspace.is_contiguous()):
            raise ValueError(f"denoise step: workspace must be a contiguous fp32 tensor of at least {need} elements "
                             f"on {x.device}, got {workspace.dtype} {tuple(workspace.shape)} on {workspace.device}")
        else:
            partial = workspace
    if renorm:
        renorm_partials_kernel[grid](out, scales, partial, group_len, group_stride, x.numel(), chunks, GUIDE=guide,
                                     CHUNK=SPLIT_CHUNK, BLOCK=TILE, num_warps=4)
    guided_step_split_kernel[grid](out, x, noise_arg, new_x, coef, scales, partial, step, group_len, group_stride,
                                   x.numel(), chunks, GUIDE=guide, RENORM=renorm, HAS_NOISE=noise is not None,
                                   CHUNK=SPLIT_CHUNK, BLOCK=TILE, PARTS=PARTS, num_warps=4)
    return new_x


def _spec(dtype: str, guide: int, renorm: bool, noise: bool, groups: int, block: int) -> AotSpec:
    sig = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "new_x_ptr": f"*{dtype}",
           "coef_ptr": "*fp32", "scales_ptr": "*fp32", "step": "i32", "num_groups": "i32", "group_len": "i32",
           "group_stride": "i32", "pass_stride": "i32", "GUIDE": "constexpr", "RENORM": "constexpr",
           "HAS_NOISE": "constexpr", "GROUPS": "constexpr", "BLOCK": "constexpr"}
    consts = {"GUIDE": int(guide), "RENORM": renorm, "HAS_NOISE": noise, "GROUPS": groups, "BLOCK": block}
    return AotSpec("guided_step_kernel", sig, consts,
                   label=f"guided_step {dtype} guide={int(guide)} renorm={int(renorm)} noise={int(noise)} {groups}x{block}")


def _split_spec(dtype: str, guide: int, renorm: bool, noise: bool) -> AotSpec:
    sig = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "new_x_ptr": f"*{dtype}",
           "coef_ptr": "*fp32", "scales_ptr": "*fp32", "partial_ptr": "*fp32", "step": "i32", "group_len": "i32",
           "group_stride": "i32", "pass_stride": "i32", "chunks": "i32", "GUIDE": "constexpr", "RENORM": "constexpr",
           "HAS_NOISE": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr", "PARTS": "constexpr"}
    consts = {"GUIDE": int(guide), "RENORM": renorm, "HAS_NOISE": noise, "CHUNK": SPLIT_CHUNK, "BLOCK": TILE,
              "PARTS": PARTS}
    return AotSpec("guided_step_split_kernel", sig, consts,
                   label=f"guided_step_split {dtype} guide={int(guide)} renorm={int(renorm)} noise={int(noise)}")


def _partials_spec(dtype: str, guide: int) -> AotSpec:
    sig = {"out_ptr": f"*{dtype}", "scales_ptr": "*fp32", "partial_ptr": "*fp32", "group_len": "i32",
           "group_stride": "i32", "pass_stride": "i32", "chunks": "i32", "GUIDE": "constexpr", "CHUNK": "constexpr",
           "BLOCK": "constexpr"}
    return AotSpec("renorm_partials_kernel", sig, {"GUIDE": int(guide), "CHUNK": SPLIT_CHUNK, "BLOCK": TILE},
                   label=f"renorm_partials {dtype} guide={int(guide)}")


AOT_SPECS = [
    # per-token groups of P = 64 (osp480) for each dtype, plain cfg + DDPM noise and cfg + renorm
    *(_spec(dt, GuideMode.CFG, False, True, 8, 64) for dt in ("fp32", "fp16", "bf16")),
    *(_spec(dt, GuideMode.CFG, True, False, 8, 64) for dt in ("fp32", "fp16", "bf16")),
    # third pass (image / spatiotemporal guidance) with renorm and noise, fp16
    _spec("fp16", GuideMode.IMAGE, True, True, 8, 64),
    _spec("fp16", GuideMode.STG, True, True, 8, 64),
    # no guidance (or after truncation), flow
    _spec("fp32", GuideMode.NONE, False, False, 8, 64),
    # per-sample renorm groups up to SPLIT_CHUNK: one group per program, looped in 512-element tiles
    _spec("fp32", GuideMode.CFG, True, True, 1, 512),
    _spec("bf16", GuideMode.STG, True, True, 1, 512),
    # per-sample groups (n * P) longer than SPLIT_CHUNK: chunked over programs, for each dtype
    *(_split_spec(dt, GuideMode.CFG, True, True) for dt in ("fp32", "fp16", "bf16")),
    *(_split_spec(dt, GuideMode.CFG, False, True) for dt in ("fp32", "fp16", "bf16")),
    _split_spec("fp16", GuideMode.IMAGE, True, True),
    _split_spec("bf16", GuideMode.STG, True, False),
    _split_spec("fp32", GuideMode.NONE, False, False),
    *(_partials_spec(dt, GuideMode.CFG) for dt in ("fp32", "fp16", "bf16")),
    _partials_spec("fp16", GuideMode.IMAGE),
    _partials_spec("bf16", GuideMode.STG),
]
