"""Classifier-free guidance as the released NOVA applies it to the diffusion head's outputs.

Passes are stacked on the batch axis, pass-major: (cond, uncond) or, with a third pass,
(cond, uncond, third). What each pass sees:

- cond: the prompt (text + motion tokens) and the real previous frames;
- uncond: the empty prompt (the learned text padding alone, same motion tokens); with image
  guidance its temporal-encoder input is also replaced by the raw ``bos_token`` (no image);
- third pass, image guidance: empty prompt but the real frames ("image-conditional");
- third pass, spatiotemporal guidance: the prompt again. The released code feeds this pass the
  same inputs as ``cond``; the perturbation of STG is not visible in the released encoders we read,
  so here the third pass is computed exactly like ``cond`` (documented, not invented).

Combination (``apply_guidance``), with s = guidance_scale:
- plain:  g = u + s (c - u)
- image:  g = u + s (c - i) , then + image_scale * (i - u)
- STG:    g = u + s (c - u) , then + st_scale * (c - p)
- renorm (guidance_renorm < 1), applied to g before the third-pass term:
  g *= clamp(||c|| / ||g||, guidance_renorm, 1), norms per sample over every non-batch element of
  what is passed in. The released head returns the whole canvas (B, L, P) with non-predicted tokens
  holding the current sample (same in every pass), so the released norms cover the whole canvas;
  ``NOVAModel.denoise_step_tokens`` passes exactly that (``Guidance.renorm_scope = "canvas"``) or only
  the predicted tokens (``"tokens"``).
- truncation (guidance_trunc > 0): from the first denoising step whose timestep is below the
  threshold to the end of that loop, only the conditional pass runs and g = c.
- guidance_scale <= 1: a single (conditional) pass, whatever the other fields say.
- ramp (min_guidance_scale, as the official guidance scaler): inside each frame the scale of AR
  step i of S executed steps is min + (guidance_scale - min) * (i + 1) / S, reaching
  guidance_scale at the last step (``Guidance.at_ar_step``); None or 0: no ramp.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class Guidance:
    guidance_scale: float = 5.0
    guidance_trunc: float = 0.0
    guidance_renorm: float = 1.0
    image_guidance_scale: float = 0.0
    spatiotemporal_guidance_scale: float = 0.0
    renorm_scope: str = "canvas"  # "canvas" (released) or "tokens" (predicted tokens only)
    min_guidance_scale: Optional[float] = None  # the scale ramps from here to guidance_scale per frame

    def __post_init__(self):
        if self.active and self.min_guidance_scale and self.min_guidance_scale <= 1:
            raise ValueError(f"min_guidance_scale must be > 1 with guidance on, got {self.min_guidance_scale} (a step "
                             "scale <= 1 would drop the guidance passes the prefix still carries; the official "
                             "generation fails there)")
        if self.active and self.image_guidance_scale and self.spatiotemporal_guidance_scale:
            raise ValueError("image and spatiotemporal guidance cannot be combined (one third pass only)")
        if self.renorm_scope not in ("canvas", "tokens"):
            raise ValueError(f"renorm_scope must be 'canvas' or 'tokens', got {self.renorm_scope!r}")

    # short aliases
    @property
    def scale(self) -> float:
        return self.guidance_scale

    @property
    def active(self) -> bool:
        return self.guidance_scale > 1

    @property
    def third_pass(self) -> str | None:
        if not self.active or self.image_guidance_scale + self.spatiotemporal_guidance_scale <= 0:
            return None
        return "image" if self.image_guidance_scale else "spatiotemporal"

    @property
    def passes(self) -> int:
        """Head/encoder passes stacked on the batch axis: 1, 2 or 3."""
        if not self.active:
            return 1
        return 3 if self.third_pass else 2

    def at_ar_step(self, step: int, num_steps: int) -> "Guidance":
        """The guidance of AR step ``step`` (0-based) of a frame with ``num_steps`` executed steps:
        itself without a ramp, else a copy whose scale is min + (scale - min) * (step + 1) / num_steps."""
        if not self.min_guidance_scale or not self.active:
            return self
        low = self.min_guidance_scale
        return replace(self, guidance_scale=(self.guidance_scale - low) * ((step + 1) / num_steps) + low,
                       min_guidance_scale=None)

    def truncated(self, timestep) -> bool:
        """True when this timestep is below the truncation threshold (guidance switched off)."""
        return self.active and bool(self.guidance_trunc) and float(timestep) < self.guidance_trunc


def renorm(g: torch.Tensor, cond: torch.Tensor, min_ratio: float) -> torch.Tensor:
    """g * clamp(||cond|| / ||g||, min_ratio, 1), norms per sample over all non-batch dims."""
    if min_ratio >= 1:
        return g
    dims = tuple(range(1, g.dim()))
    ratio = cond.norm(dim=dims, keepdim=True) / g.norm(dim=dims, keepdim=True)
    return g * ratio.clamp(min_ratio, 1.0)


def apply_guidance(pred: torch.Tensor, guidance: Guidance | None, truncated: bool = False) -> torch.Tensor:
    """Combine stacked head outputs (m * B, ...) into (B, ...), m = ``guidance.passes`` (or 1 when
    ``truncated``: the caller then ran the conditional pass only). Math in fp32, result in pred's dtype."""
    if guidance is None or not guidance.active or truncated:
        return pred
    m = guidance.passes
    if pred.shape[0] % m:
        raise ValueError(f"{pred.shape[0]} stacked rows are not a multiple of {m} guidance passes")
    parts = pred.float().chunk(m)
    c, u = parts[0], parts[1]
    s = guidance.guidance_scale
    if guidance.third_pass == "image":
        i = parts[2]
        g = renorm(u + s * (c - i), c, guidance.guidance_renorm)
        g = g + guidance.image_guidance_scale * (i - u)
    elif guidance.third_pass == "spatiotemporal":
        p = parts[2]
        g = renorm(u + s * (c - u), c, guidance.guidance_renorm)
        g = g + guidance.spatiotemporal_guidance_scale * (c - p)
    else:
        g = renorm(u + s * (c - u), c, guidance.guidance_renorm)
    return g.to(pred.dtype)
