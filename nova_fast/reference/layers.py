"""Building blocks shared by the encoders: attention, MLP, transformer block, patch embedding,
position embeddings (2-D sin-cos, 3-D RoPE) and patchify helpers.

Everything is plain PyTorch; the hot spots are single methods (``Attention.attend``,
``Block.forward``) so an accelerator can swap them by attribute.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------
# Patchify: a token's vector is its (ph, pw, c) block, c fastest; tokens in row-major (h, w) order.
# ------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), L = (H/p)*(W/p), in (h, w, ph, pw, c) order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, ph, pw, C)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: torch.Tensor, patch: int, shape) -> torch.Tensor:
    """Inverse of ``patchify``: (B, L, p*p*C) -> (B, C, H, W) with ``shape`` = (B, C, H, W) or (C, H, W)."""
    C, H, W = shape[-3:]
    B = tokens.shape[0]
    x = tokens.reshape(B, H // patch, W // patch, patch, patch, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, ph, w, pw)
    return x.reshape(B, C, H, W)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, F) at ids (B, n) -> (B, n, F)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of x (B, L, F) with rows ids (B, n) replaced by values (B, n, F)."""
    return x.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(x.dtype))


# ------------------------------------------------------------------------------------------------
# Sin-cos position embeddings (absolute)
# ------------------------------------------------------------------------------------------------
def sincos_1d(positions: torch.Tensor, num_freqs: int = 128) -> torch.Tensor:
    """(N,) positions -> (N, 2*num_freqs) = [sin(p f), cos(p f)], f_i = 1 / 10000^(i / num_freqs). fp32."""
    freqs = 1.0 / (10000 ** (torch.arange(num_freqs, dtype=torch.float32, device=positions.device) / num_freqs))
    angles = positions.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, dim) fp32: quarters [sin(w f), cos(w f), sin(h f), cos(h f)], f_i = 1/10000^(i/(dim/4)),
    tokens in row-major (h, w) order."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # h index per token
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)             # w index per token
    fw, fh = cols[:, None] * freqs, rows[:, None] * freqs
    return torch.cat([fw.sin(), fw.cos(), fh.sin(), fh.cos()], dim=-1)


# ------------------------------------------------------------------------------------------------
# 3-D rotary position embedding
# ------------------------------------------------------------------------------------------------
class RotaryEmbed3D(nn.Module):
    """3-D RoPE over (t, h, w) positions for one head of width ``dim``.

    The head's channel pairs (2i, 2i+1) are split: dim//8 channels rotate with t, and
    (dim - dim//8)//2 each with h and w; an axis with r channels uses frequencies
    theta^(-2j/r), j < r/2. No buffers: the tables are recomputed from positions (nothing is saved).
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.axis_dims = [dim // 8, (dim - dim // 8) // 2, (dim - dim // 8) // 2]
        if sum(self.axis_dims) != dim or any(d % 2 for d in self.axis_dims):
            raise ValueError(f"RoPE head dim {dim} does not split into even (t, h, w) parts")

    def tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, N, 3) -> (cos, sin), each (B, 1, N, dim/2) fp32, for ``apply_rope``."""
        angles = []
        for axis, rdim in enumerate(self.axis_dims):
            inv = self.theta ** (-torch.arange(0, rdim, 2, dtype=torch.float32, device=pos.device) / rdim)
            angles.append(pos[..., axis:axis + 1].float() * inv)
        angles = torch.cat(angles, dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()

    @staticmethod
    def grid(t: int, h: int, w: int, device=None, t_offset: int = 0) -> torch.Tensor:
        """(t*h*w, 3) positions (t, h, w) in row-major order."""
        tt, hh, ww = torch.meshgrid(torch.arange(t, device=device) + t_offset, torch.arange(h, device=device),
                                    torch.arange(w, device=device), indexing="ij")
        return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, d) by the angles in rope = (cos, sin)."""
    cos, sin = rope
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Transformer pieces
# ------------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of the tokens seen so far by one attention layer, (B, H, N, d) each.
    Temporal generation appends one frame (plus the condition prefix at t = 0) per step."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class MLP(nn.Module):
    """Linear D->4D, exact (erf) GELU, Linear 4D->D."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv Linear (bias), optional RoPE on q and k, softmax scale
    1/sqrt(head_dim), output Linear. ``attend`` is the core an accelerator replaces."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, rope=None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d) each
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:  # earlier tokens' keys/values come first, in time order
            k, v = kv_cache.append(k, v)
        o = self.attend(q, k, v, attn_mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))

    def attend(self, q, k, v, attn_mask=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v. q (B, H, Nq, d), k/v (B, H, Nk, d); attn_mask None, a
        boolean (True = may attend) or an additive float mask broadcastable to (B, H, Nq, Nk)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Block(nn.Module):
    """Post-norm-before-residual transformer block: x += LN1(Attn(x)); x += LN2(MLP(x))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, attn_mask=None, kv_cache: Optional[KVCache] = None, rope=None) -> torch.Tensor:
        x = x + self.norm1(self.attn(x, attn_mask=attn_mask, kv_cache=kv_cache, rope=rope))
        return x + self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch: (B, C, H, W) -> (B, L, D) tokens in row-major order."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

