"""The per-token diffusion head (DiffusionMLP) and its adaptive LayerNorm.

The head denoises each predicted token independently: the noisy token (patch-embedded from the
canvas) is modulated by ``cond = time embedding + projection of the spatial encoder's output``
through N residual blocks of AdaLN-zero + MLP, then a final AdaLN and a Linear back to p*p*C.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nova_fast.reference.embeddings import timestep_freq_embed
from nova_fast.reference.layers import PatchEmbed, gather_tokens, patchify, unpatchify


class Projector(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class AdaLNZero(nn.Module):
    """stats = Linear(SiLU(cond)) split into ``num_stats`` chunks ordered (scale, shift, gate...);
    returns (LN(x) * (1 + scale) + shift, remaining stats). LN has no affine, eps 1e-6.
    Its two stages are separate methods (an accelerator replaces ``modulate``, the math)."""

    STATS = ("scale", "shift", "gate")  # the order of the projection's chunks

    def __init__(self, dim: int, num_stats: int, eps: float = 1e-6):
        super().__init__()
        self.num_stats, self.eps = num_stats, eps
        self.proj = nn.Linear(dim, num_stats * dim)

    def stats(self, cond: torch.Tensor) -> tuple:
        """The ``num_stats`` statistics of this condition, each shaped like ``cond``."""
        return self.proj(F.silu(cond)).chunk(self.num_stats, dim=-1)

    def modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift, LN without affine."""
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale) + shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        stats = self.stats(cond)
        return self.modulate(x, stats[0], stats[1]), stats[2:]


class DiffusionBlock(nn.Module):
    """h, gate = AdaLNZero(x, cond); x + gate * LN(MLP(h)), MLP = Linear-SiLU-Linear of width W.
    The gated residual is its own method (an accelerator replaces ``residual``, the math)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = AdaLNZero(dim, num_stats=3)
        self.proj = Projector(dim, dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + gate * LN(y), LN affine (norm2)."""
        return x + gate * self.norm2(y)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, (gate,) = self.norm1(x, cond)
        return self.residual(x, self.proj(h), gate)


class TimeCondEmbed(nn.Module):
    """cond = timestep_proj(freq(t)) + condition_proj(z)."""

    def __init__(self, cond_dim: int, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_proj = Projector(freq_dim, dim, dim)
        self.condition_proj = Projector(cond_dim, dim, dim)

    def get_freq_embed(self, timestep: torch.Tensor, dtype) -> torch.Tensor:
        """(...,) timesteps -> (..., freq_dim) in ``dtype`` (computed in fp32)."""
        return timestep_freq_embed(timestep, self.freq_dim).to(dtype)

    def forward(self, timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """timestep (B,) or (B, n); z (B, n, cond_dim) -> (B, n, W)."""
        temb = self.timestep_proj(self.get_freq_embed(timestep, self.timestep_proj.fc1.weight.dtype))
        if temb.dim() == 2:
            temb = temb.unsqueeze(1)
        return self.condition_proj(z) + temb


class DiffusionMLP(nn.Module):
    """forward(x, timestep, z, pred_ids=None) -> (B, n, p*p*C) predictions in patchify order.

    x: the full noisy canvas (B, C, H, W), patch-embedded over all L tokens, then gathered at
    ``pred_ids`` (B, n) (all L tokens when None); z: the spatial encoder's outputs at those tokens
    (B, n, cond_dim); timestep: (B,) (or (B, n) per token, used in training)."""

    def __init__(self, depth: int, width: int, cond_dim: int, patch: int = 2, channels: int = 4):
        super().__init__()
        self.patch, self.channels, self.width = patch, channels, width
        self.patch_embed = PatchEmbed(channels, width, patch)
        self.time_cond_embed = TimeCondEmbed(cond_dim, width)
        self.blocks = nn.ModuleList(DiffusionBlock(width) for _ in range(depth))
        self.norm = AdaLNZero(width, num_stats=2)
        self.head = nn.Linear(width, patch * patch * channels)

    @property
    def token_dim(self) -> int:
        return self.patch * self.patch * self.channels

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch)

    def unpatchify(self, tokens: torch.Tensor, shape) -> torch.Tensor:
        return unpatchify(tokens, self.patch, shape)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor,
                pred_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.patch_embed(x)  # (B, L, W)
        if pred_ids is not None:
            h = gather_tokens(h, pred_ids.reshape(pred_ids.shape[0], -1))
        cond = self.time_cond_embed(timestep, z)
        for blk in self.blocks:
            h = blk(h, cond)
        h, _ = self.norm(h, cond)
        return self.head(h)
