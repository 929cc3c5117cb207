"""The two ViT encoders and the Scaling-and-Shift video mixer.

- ``TemporalEncoder`` (``video_encoder``): frame tokens (video patch) with the condition prefix,
  block-causal over frames: one dense pass with a mask in training, a KV cache in generation.
- ``SpatialEncoder`` (``image_encoder``): one frame's tokens (image patch) with the temporal output
  as prefix; the first half of its blocks sees only the known tokens, the second half all tokens;
  ``read_ids`` asks for its output at some tokens only (those the head will predict).
- ``VideoMixer`` (``video_encoder.mixer``): modulates the first frame's temporal output by the
  current frame's: x0 * (1 + scale) + shift.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nova_fast.reference.layers import (Block, KVCache, PatchEmbed, RotaryEmbed3D, gather_tokens, scatter_tokens,
                                        sincos_2d)


class VideoMixer(nn.Module):
    """Scaling-and-Shift layer: (scale, shift) = proj(lora(SiLU(z))); out = x0 * (1 + scale) + shift.
    ``lora`` is a bias-free Linear D->rank (absent for full rank). No normalization."""

    def __init__(self, dim: int, rank: Optional[int]):
        super().__init__()
        full = rank is None or rank <= 0
        self.lora = None if full else nn.Linear(dim, rank, bias=False)
        self.proj = nn.Linear(dim if full else rank, 2 * dim)

    def forward(self, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(z)
        if self.lora is not None:
            h = self.lora(h)
        scale, shift = self.proj(h).chunk(2, dim=-1)
        return x0 * (1 + scale) + shift


class TemporalEncoder(nn.Module):
    """ViT over frame tokens with an optional condition prefix. forward returns the final affine
    LayerNorm of the frame tokens only (the prefix is dropped before it)."""

    def __init__(self, depth: int, dim: int, num_heads: int, patch: int, channels: int,
                 mixer_rank: Optional[int] = None):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.patch_embed = PatchEmbed(channels, dim, patch)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.mixer = VideoMixer(dim, mixer_rank) if mixer_rank else None
        self.rope = RotaryEmbed3D(dim // num_heads)

    def forward(self, tokens: torch.Tensor, prefix: Optional[torch.Tensor] = None, attn_mask=None,
                kv_caches: Optional[Sequence[KVCache]] = None, rope=None) -> torch.Tensor:
        """tokens (B, N, D) frame tokens; prefix (B, P, D) or None; attn_mask over [prefix, tokens]
        queries x (cache + [prefix, tokens]) keys; kv_caches one per block (generation)."""
        h = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        for i, blk in enumerate(self.blocks):
            h = blk(h, attn_mask=attn_mask, kv_cache=None if kv_caches is None else kv_caches[i], rope=rope)
        if prefix is not None:
            h = h[:, prefix.shape[1]:]
        return self.norm(h)

    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]


class SpatialEncoder(nn.Module):
    """ViT over one frame's tokens, prefixed by that frame's temporal output.

    With known ids (generation and training): the first ``encoder_depth = depth // 2`` blocks run on
    [prefix, known tokens]; their outputs at the known tokens are scattered back over the full
    (masked) sequence, and the remaining blocks run on [prefix as left by the first half, all
    tokens]. The final affine LayerNorm is applied to the frame tokens only."""

    def __init__(self, depth: int, dim: int, num_heads: int, patch: int, channels: int,
                 base_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.patch_embed = PatchEmbed(channels, dim, patch)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.encoder_depth = depth // 2
        self.base_size = None if base_size is None else tuple(base_size)  # None: no absolute positions
        self.rope = RotaryEmbed3D(dim // num_heads)

    def add_pos_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """2-D sin-cos over the base grid, added to every token (mask tokens included)."""
        if self.base_size is None:
            return tokens
        return tokens + sincos_2d(self.dim, *self.base_size, device=tokens.device).to(tokens.dtype)

    def encode_known(self, prefix: Optional[torch.Tensor], known: torch.Tensor, rope=None) -> torch.Tensor:
        """First half: blocks[:encoder_depth] on [prefix, known tokens] -> same shape."""
        h = known if prefix is None else torch.cat([prefix, known], dim=1)
        for blk in self.blocks[: self.encoder_depth]:
            h = blk(h, rope=rope)
        return h

    def encode_all(self, h: torch.Tensor, rope=None) -> torch.Tensor:
        """Second half: blocks[encoder_depth:] on [prefix, all tokens] -> same shape."""
        for blk in self.blocks[self.encoder_depth:]:
            h = blk(h, rope=rope)
        return h

    def prepare(self, tokens: torch.Tensor, prefix: Optional[torch.Tensor] = None,
                known_ids: Optional[torch.Tensor] = None, rope_pos: Optional[torch.Tensor] = None):
        """Everything before the second half: position embedding, the first half on [prefix, known
        tokens] (all tokens when known_ids is None) and the scatter back over the masked sequence.
        Returns (h (B, P + L, D), RoPE tables of all tokens or None)."""
        P = 0 if prefix is None else prefix.shape[1]
        x = self.add_pos_embed(tokens)
        rope_all = rope_known = None
        if rope_pos is not None:  # the prefix sits at position (0, 0, 0)
            pad = rope_pos.new_zeros(rope_pos.shape[0], P, 3)
            rope_all = self.rope.tables(torch.cat([pad, rope_pos], 1))
            if known_ids is not None:
                rope_known = self.rope.tables(torch.cat([pad, gather_tokens(rope_pos, known_ids)], 1))
        if known_ids is None or self.encoder_depth == 0:
            return self.encode_known(prefix, x, rope_all), rope_all
        h = self.encode_known(prefix, gather_tokens(x, known_ids), rope_known)
        prefix_out, known_out = h[:, :P], h[:, P:]
        return torch.cat([prefix_out, scatter_tokens(x, known_ids, known_out)], dim=1), rope_all

    def forward(self, tokens: torch.Tensor, prefix: Optional[torch.Tensor] = None,
                known_ids: Optional[torch.Tensor] = None, rope_pos: Optional[torch.Tensor] = None,
                read_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, L, D): patch-embedded frame with unknown tokens already replaced by the mask
        token; prefix (B, P, D); known_ids (B, k) the known tokens (k may be 0), or None to run all
        blocks on all tokens; rope_pos (B, L, 3) token positions with RoPE. Returns (B, L, D), or
        with ``read_ids`` (B, n) the output at those tokens only, (B, n, D): here every token is
        encoded and those rows are gathered (a faster implementation may compute only those rows
        where the math allows: the last block's queries, MLP and norm are per token)."""
        P = 0 if prefix is None else prefix.shape[1]
        h, rope_all = self.prepare(tokens, prefix, known_ids, rope_pos)
        h = self.encode_all(h, rope_all)
        out = self.norm(h[:, P:])
        return out if read_ids is None else gather_tokens(out, read_ids)
