"""Temporal encoder: KV-cache generation equals one block-causal pass; causality. Spatial encoder:
the known-token split equals its definition; known tokens do not see what lies under the mask."""
import pytest
import torch

from nova_fast.reference import NOVAConfig, build_model, frame_group_ids
from nova_fast.reference.layers import RotaryEmbed3D, apply_rope, gather_tokens, scatter_tokens


def _model(rotary=False, seed=0):
    torch.manual_seed(seed)
    cfg = NOVAConfig.preset("tiny").replace(rotary_pos_embed=rotary)
    return build_model(cfg).eval()


def test_attention_mask_rule_by_hand():
    model = _model()
    groups = frame_group_ids(2, 2, 3)  # text(2) | frame0(2) | frame1(2) | frame2(2)
    assert groups.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    mask = model.temporal_attention_mask(groups)
    want = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]] * 4 + [[1, 1, 1, 1, 1, 1, 0, 0]] * 2 + [[1] * 8] * 2).bool()
    assert torch.equal(mask, want)


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_equals_block_causal_pass(rotary):
    model = _model(rotary)
    enc = model.video_encoder
    B, T, P, N, D = 2, 4, 5, model.config.temporal_tokens, model.config.width
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(B, P, D, generator=g)
    frames = torch.randn(B, T, N, D, generator=g)
    with torch.no_grad():
        mask = model.temporal_attention_mask(frame_group_ids(P, N, T))
        full = enc(frames.reshape(B, T * N, D), prefix, attn_mask=mask, rope=model.temporal_rope(range(T), B, P))
        full = full.reshape(B, T, N, D)
        caches = enc.new_kv_caches()
        for t in range(T):
            rope = model.temporal_rope([t], B, P if t == 0 else 0)
            step = enc(frames[:, t], prefix if t == 0 else None, kv_caches=caches, rope=rope)
            torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)
        assert len(caches[0]) == P + T * N


def test_later_frame_never_changes_earlier_outputs():
    model = _model()
    enc = model.video_encoder
    B, T, P, N, D = 1, 3, 4, model.config.temporal_tokens, model.config.width
    g = torch.Generator().manual_seed(5)
    prefix, frames = torch.randn(B, P, D, generator=g), torch.randn(B, T, N, D, generator=g)
    mask = model.temporal_attention_mask(frame_group_ids(P, N, T))
    with torch.no_grad():
        a = enc(frames.reshape(B, -1, D), prefix, attn_mask=mask).reshape(B, T, N, D)
        changed = frames.clone()
        changed[:, 2] += 10 * torch.randn(B, N, D, generator=g)
        b = enc(changed.reshape(B, -1, D), prefix, attn_mask=mask).reshape(B, T, N, D)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=0, atol=1e-6)
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3


def _spatial_inputs(model, B=2, k=7, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    L, D = cfg.spatial_tokens, cfg.width
    tokens = torch.randn(B, L, D, generator=g)
    prefix = torch.randn(B, cfg.temporal_tokens, D, generator=g)
    known_ids = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(B)])
    return tokens, prefix, known_ids


def test_spatial_split_equals_definition():
    model = _model()
    enc = model.image_encoder
    tokens, prefix, known_ids = _spatial_inputs(model)
    P, d = prefix.shape[1], enc.encoder_depth
    assert d == len(enc.blocks) // 2
    with torch.no_grad():
        out = enc(tokens, prefix, known_ids)
        # the definition, step by step
        x = tokens + enc.add_pos_embed(torch.zeros_like(tokens))
        h = torch.cat([prefix, gather_tokens(x, known_ids)], 1)
        for blk in enc.blocks[:d]:
            h = blk(h)
        h = torch.cat([h[:, :P], scatter_tokens(x, known_ids, h[:, P:])], 1)
        for blk in enc.blocks[d:]:
            h = blk(h)
        want = enc.norm(h[:, P:])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_spatial_split_with_every_token_known_equals_unsplit():
    """All tokens known, in any order: the first half sees the same set (attention is permutation
    equivariant once positions are added), so the split changes nothing."""
    model = _model()
    enc = model.image_encoder
    tokens, prefix, _ = _spatial_inputs(model)
    L = tokens.shape[1]
    perm = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens, prefix, perm), enc(tokens, prefix, None), rtol=1e-5, atol=1e-5)


def test_known_tokens_do_not_see_the_mask():
    model = _model()
    enc, cfg = model.image_encoder, model.config
    B, L = 2, cfg.spatial_tokens
    g = torch.Generator().manual_seed(1)
    canvas = torch.randn(B, cfg.image_dim, *cfg.latent_size, generator=g)
    _, prefix, known_ids = _spatial_inputs(model)
    known = torch.zeros(B, L, dtype=torch.bool).scatter_(1, known_ids, True)
    with torch.no_grad():
        z = enc(model.mask_embed.apply_mask(enc.patch_embed(canvas), known), prefix, known_ids)
        # 1) what lies under the mask (canvas values at unknown tokens) changes nothing at all
        other = canvas + 5 * torch.randn(canvas.shape, generator=g)
        keep = torch.zeros(B, L, 1).scatter_(1, known_ids.unsqueeze(-1), 1.0)
        keep = model.image_decoder.unpatchify(keep.expand(-1, -1, model.image_decoder.token_dim), canvas.shape)
        other = torch.where(keep.bool(), canvas, other)
        z2 = enc(model.mask_embed.apply_mask(enc.patch_embed(other), known), prefix, known_ids)
        torch.testing.assert_close(z, z2, rtol=0, atol=0)
        # 2) after the first half, the known tokens do not depend on the mask token's value
        x = enc.add_pos_embed(model.mask_embed.apply_mask(enc.patch_embed(canvas), known))
        h1 = enc.encode_known(prefix, gather_tokens(x, known_ids))
        model.mask_embed.mask_token.add_(3.0)
        x2 = enc.add_pos_embed(model.mask_embed.apply_mask(enc.patch_embed(canvas), known))
        h2 = enc.encode_known(prefix, gather_tokens(x2, known_ids))
        assert not torch.equal(x, x2)
        torch.testing.assert_close(h1, h2, rtol=0, atol=0)


def test_rope_rotation_by_hand():
    rope = RotaryEmbed3D(64)
    assert rope.axis_dims == [8, 28, 28]
    pos = torch.tensor([[[2.0, 3.0, 5.0]]])
    cos, sin = rope.tables(pos)
    assert cos.shape == (1, 1, 1, 32)
    # pair 0 rotates with t at frequency 1, pair 4 (first h pair) with h at frequency 1
    x = torch.zeros(1, 1, 1, 64)
    x[..., 0], x[..., 8] = 1.0, 1.0
    y = apply_rope(x, (cos, sin))
    torch.testing.assert_close(y[0, 0, 0, :2], torch.tensor([torch.cos(torch.tensor(2.0)), torch.sin(torch.tensor(2.0))]))
    torch.testing.assert_close(y[0, 0, 0, 8:10], torch.tensor([torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))]))
    # second t pair: frequency 10000^(-2/8)
    f = 10000 ** (-2 / 8)
    x = torch.zeros(1, 1, 1, 64)
    x[..., 3] = 1.0
    y = apply_rope(x, (cos, sin))
    torch.testing.assert_close(y[0, 0, 0, 2:4], torch.tensor([-torch.sin(torch.tensor(2 * f)), torch.cos(torch.tensor(2 * f))]))


def test_mixer_formula():
    model = _model()
    mixer = model.video_encoder.mixer
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 6, 128, generator=g), torch.randn(2, 6, 128, generator=g)
    with torch.no_grad():
        stats = torch.nn.functional.silu(z) @ mixer.lora.weight.T @ mixer.proj.weight.T + mixer.proj.bias
        want = x0 * (1 + stats[..., :128]) + stats[..., 128:]
        torch.testing.assert_close(mixer(x0, z), want, rtol=1e-5, atol=1e-5)
