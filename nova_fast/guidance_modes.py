"""The guidance modes of the fused denoising step, defined once.

The Python op (``nova_fast.ops.denoise_step``), the Triton kernel (kernels/denoise_step.py), the
CUDA kernel (csrc/denoise_step.cu) and the CPU kernel (csrc/cpu/denoise_step.cpp) all take the mode
as this integer; tests/test_guidance_modes.py checks that the C++ sources spell the same values.
"""
from __future__ import annotations

from enum import IntEnum


class GuideMode(IntEnum):
    """How the stacked head passes combine (see ``nova_fast.reference.guidance``)."""

    NONE = 0   # one pass: g = c
    CFG = 1    # (cond, uncond): g = u + s (c - u)
    IMAGE = 2  # (cond, uncond, image-cond): g = u + s (c - i) + s2 (i - u)
    STG = 3    # (cond, uncond, spatiotemporal): g = u + s (c - u) + s2 (c - p)


# head passes stacked on the batch axis per mode
PASSES = {GuideMode.NONE: 1, GuideMode.CFG: 2, GuideMode.IMAGE: 3, GuideMode.STG: 3}
