"""Condition and position embeddings: text, label, motion, mask/bos tokens, video positions."""
from __future__ import annotations

from typing import Sequence, Union

import math

import torch
from torch import nn

from nova_fast.reference.layers import sincos_1d, sincos_2d

TEXT_EMBED_ROWS = 512  # rows of the learned padding buffer in the released checkpoints


class TextEmbed(nn.Module):
    """Text-encoder hidden states -> condition tokens: pad to ``num_tokens`` with the learned
    buffer ``weight`` (row i pads position i), then Linear and affine LayerNorm. The unconditional
    prompt is the padding alone."""

    def __init__(self, token_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.token_dim, self.num_tokens = token_dim, num_tokens
        self.register_buffer("weight", torch.empty(max(TEXT_EMBED_ROWS, num_tokens), token_dim))  # persistent
        self.proj = nn.Linear(token_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=0.02)

    def pad(self, states: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """(B, n<=num_tokens, token_dim) states (or a list of (n_i, token_dim)) -> (B, num_tokens, token_dim)."""
        rows = list(states) if not torch.is_tensor(states) else list(states.unbind(0))
        out = self.weight[: self.num_tokens].unsqueeze(0).repeat(len(rows), 1, 1)
        for i, s in enumerate(rows):
            if s.dim() != 2 or s.shape[-1] != self.token_dim:
                raise ValueError(f"text states must be (n, {self.token_dim}) per prompt, got {tuple(s.shape)}")
            n = min(s.shape[0], self.num_tokens)
            out[i, :n] = s[:n].to(out.dtype)
        return out

    def null_states(self, batch: int) -> torch.Tensor:
        return self.weight[: self.num_tokens].unsqueeze(0).expand(batch, -1, -1)

    def forward(self, padded_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(padded_states.to(self.proj.weight.dtype)))


class LabelEmbed(nn.Module):
    """Class label -> one condition token: a learned row (index ``num_classes`` = unconditional),
    then affine LayerNorm."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes + 1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.weight[labels.long()]).unsqueeze(1)  # (B, 1, D)


def _projector(dim: int) -> nn.Sequential:
    """Linear(256, D), SiLU, Linear(D, D): parameters named .0 and .2 as released."""
    return nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


class MotionEmbed(nn.Module):
    """Two extra condition tokens of video models: motion flow and fps, each sin-cos(128) of the
    value followed by Linear-SiLU-Linear."""

    BASE_FLOW, BASE_FPS = 5.0, 12.0

    def __init__(self, dim: int):
        super().__init__()
        self.flow_proj = _projector(dim)
        self.fps_proj = _projector(dim)

    def forward(self, flow: torch.Tensor, fps: torch.Tensor, dtype=None) -> torch.Tensor:
        """flow, fps: (B,) values -> (B, 2, D)."""
        dtype = dtype or self.flow_proj[0].weight.dtype
        device = self.flow_proj[0].weight.device
        f = self.flow_proj(sincos_1d(flow.to(device)).to(dtype))
        s = self.fps_proj(sincos_1d(fps.to(device)).to(dtype))
        return torch.stack([f, s], dim=1)


class MaskEmbed(nn.Module):
    """``bos_token`` replaces every frame token at the first temporal step; ``mask_token`` replaces
    every not-yet-known token of the spatial encoder's input."""

    def __init__(self, dim: int):
        super().__init__()
        self.bos_token = nn.Parameter(torch.empty(1, dim))
        self.mask_token = nn.Parameter(torch.empty(1, dim))
        if not self.bos_token.is_meta:
            nn.init.normal_(self.bos_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)

    def apply_mask(self, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D), known (B, L) bool -> tokens where known, ``mask_token`` elsewhere."""
        return torch.where(known.unsqueeze(-1), tokens, self.mask_token.to(tokens.dtype))


class VideoPosEmbed(nn.Module):
    """Absolute positions of the temporal encoder's frame tokens: the 2-D sin-cos space term over
    the base grid plus a learned time term: sin-cos(128) of ``t / (T_total / base_t)`` -> Linear(256, D)
    -> SiLU -> Linear(D, D) -> affine LayerNorm."""

    def __init__(self, dim: int, base_size: Sequence[int]):
        super().__init__()
        self.dim = dim
        self.base_t, self.base_h, self.base_w = (int(v) for v in base_size)
        self.time_proj = _projector(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def time_embed(self, num_frames: int) -> torch.Tensor:
        """(num_frames, D): frame positions normalized to the base length."""
        w = self.time_proj[0].weight
        grid = torch.arange(num_frames, dtype=torch.float32, device=w.device) / (num_frames / self.base_t)
        return self.norm(self.time_proj(sincos_1d(grid).to(w.dtype)))

    def space_embed(self, device=None, dtype=None) -> torch.Tensor:
        """(base_h * base_w, D)."""
        return sincos_2d(self.dim, self.base_h, self.base_w, device=device).to(dtype)


def timestep_freq_embed(timestep: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Diffusion-head time features, fp32: [cos(t f), sin(t f)], f_i = exp(-ln(10000) * i / (dim/2))."""
    half = dim // 2
    freqs = torch.arange(half, dtype=torch.float32, device=timestep.device).mul(-math.log(10000.0) / half).exp()
    angles = timestep.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


__all__ = ["TextEmbed", "LabelEmbed", "MotionEmbed", "MaskEmbed", "VideoPosEmbed", "timestep_freq_embed"]
