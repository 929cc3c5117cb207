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
Each program handles GROUPS groups as a [GROUPS, BLOCK] tile (512 elements), looping over the group when it is
longer than BLOCK; with RENORM the guided values are recomputed in a second sweep instead of
being stored.
"""
import triton
import triton.language as tl

from nova_fast.guidance_modes import GuideMode
from nova_fast.testing.triton_aot import AotSpec

# the guidance modes (values from nova_fast.guidance_modes) as compile-time constants of the kernels
GUIDE_NONE, GUIDE_CFG, GUIDE_IMAGE, GUIDE_STG = (tl.constexpr(mode.value) for mode in GuideMode)


@triton.jit
def _first_stage(out_ptr, offs, mask, pass_stride, s, GUIDE: tl.constexpr):
    # Returns (o0, g1): the conditional pass and the guided value before renorm.
    o0 = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDE == GUIDE_NONE:
        g1 = o0
    else:
        o1 = tl.load(out_ptr + pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDE == GUIDE_IMAGE:
            o2 = tl.load(out_ptr + 2 * pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
            g1 = o1 + (o0 - o2) * s
        else:
            g1 = o1 + (o0 - o1) * s
    return o0, g1


@triton.jit
def guided_step_kernel(out_ptr, x_ptr, noise_ptr, new_x_ptr, coef_ptr, scales_ptr, step, num_groups, group_len,
                       group_stride, pass_stride, GUIDE: tl.constexpr, RENORM: tl.constexpr, HAS_NOISE: tl.constexpr,
                       GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    group_ok = groups < num_groups
    base = groups.to(tl.int64)[:, None] * group_stride
    cols = tl.arange(0, BLOCK)[None, :]
    s = tl.load(scales_ptr)
    s2 = tl.load(scales_ptr + 1)
    c = coef_ptr + step * 8
    c_x0_x, c_x0_g, c_x0_div = tl.load(c), tl.load(c + 1), tl.load(c + 2)
    c_x0, c_x, c_noise = tl.load(c + 3), tl.load(c + 4), tl.load(c + 5)

    factor = tl.full([GROUPS], 1.0, tl.float32)
    if RENORM:
        cond_sq = tl.zeros([GROUPS, BLOCK], tl.float32)
        guided_sq = tl.zeros([GROUPS, BLOCK], tl.float32)
        for start in range(0, group_len, BLOCK):
            mask = group_ok[:, None] & (start + cols < group_len)
            o0, g1 = _first_stage(out_ptr, base + start + cols, mask, pass_stride, s, GUIDE)
            cond_sq += o0 * o0
            guided_sq += g1 * g1
        guided_norm = tl.where(group_ok, tl.sqrt(tl.sum(guided_sq, axis=1)), 1.0)  # no 0/0 in idle rows
        ratio = tl.sqrt(tl.sum(cond_sq, axis=1)) / guided_norm
        factor = tl.minimum(tl.maximum(ratio, tl.load(scales_ptr + 2)), 1.0)

    for start in range(0, group_len, BLOCK):
        mask = group_ok[:, None] & (start + cols < group_len)
        offs = base + start + cols
        o0, g = _first_stage(out_ptr, offs, mask, pass_stride, s, GUIDE)
        if RENORM:
            g = g * factor[:, None]
        if GUIDE == GUIDE_IMAGE:
            o1 = tl.load(out_ptr + pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
            o2 = tl.load(out_ptr + 2 * pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
            g = g + (o2 - o1) * s2
        if GUIDE == GUIDE_STG:
            o2 = tl.load(out_ptr + 2 * pass_stride + offs, mask=mask, other=0.0).to(tl.float32)
            g = g + (o0 - o2) * s2
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = (x * c_x0_x + g * c_x0_g) / c_x0_div
        new_x = x0 * c_x0 + x * c_x
        if HAS_NOISE:
            new_x = new_x + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c_noise
        tl.store(new_x_ptr + offs, new_x.to(new_x_ptr.dtype.element_ty), mask=mask)


TILE = 512  # elements per program and sweep: 4 per thread at 4 warps keeps the renorm sweep spill-free


def tile_shape(group_len: int) -> tuple[int, int]:
    """(GROUPS, BLOCK): TILE-element tiles, whole short groups per row of the tile."""
    block = min(triton.next_power_of_2(max(group_len, 1)), TILE)
    return max(1, TILE // block), block


def guided_step(out, x, noise, new_x, coef, scales, step: int, *, guide: int, renorm: bool, group_len: int,
                group_stride: int | None = None):
    """Launch one fused step: ``out`` (m*G*group_stride), ``x``/``noise``/``new_x`` (G*group_stride).

    Only the first ``group_len`` elements of every ``group_stride`` are read, normed and written
    (the rest are padding tokens of a bucket).
    """
    group_stride = group_len if group_stride is None else group_stride
    num_groups = x.numel() // group_stride
    groups, block = tile_shape(group_len)
    grid = (triton.cdiv(num_groups, groups),)
    guided_step_kernel[grid](out, x, noise if noise is not None else x, new_x, coef, scales, step, num_groups,
                             group_len, group_stride, x.numel(), GUIDE=guide, RENORM=renorm,
                             HAS_NOISE=noise is not None, GROUPS=groups, BLOCK=block, num_warps=4)
    return new_x


def _spec(dtype: str, guide: int, renorm: bool, noise: bool, groups: int, block: int) -> AotSpec:
    sig = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "new_x_ptr": f"*{dtype}",
           "coef_ptr": "*fp32", "scales_ptr": "*fp32", "step": "i32", "num_groups": "i32", "group_len": "i32",
           "group_stride": "i32", "pass_stride": "i32", "GUIDE": "constexpr", "RENORM": "constexpr",
           "HAS_NOISE": "constexpr", "GROUPS": "constexpr", "BLOCK": "constexpr"}
    consts = {"GUIDE": int(guide), "RENORM": renorm, "HAS_NOISE": noise, "GROUPS": groups, "BLOCK": block}
    return AotSpec("guided_step_kernel", sig, consts,
                   label=f"guided_step {dtype} guide={int(guide)} renorm={int(renorm)} noise={int(noise)} {groups}x{block}")


AOT_SPECS = [
    # per-token groups of P = 64 (osp480) for each dtype, plain cfg + DDPM noise and cfg + renorm
    *(_spec(dt, GuideMode.CFG, False, True, 8, 64) for dt in ("fp32", "fp16", "bf16")),
    *(_spec(dt, GuideMode.CFG, True, False, 8, 64) for dt in ("fp32", "fp16", "bf16")),
    # third pass (image / spatiotemporal guidance) with renorm and noise, fp16
    _spec("fp16", GuideMode.IMAGE, True, True, 8, 64),
    _spec("fp16", GuideMode.STG, True, True, 8, 64),
    # no guidance (or after truncation), flow
    _spec("fp32", GuideMode.NONE, False, False, 8, 64),
    # per-sample renorm groups: one long group looped in 512-element tiles
    _spec("fp32", GuideMode.CFG, True, True, 1, 512),
    _spec("bf16", GuideMode.STG, True, True, 1, 512),
]
