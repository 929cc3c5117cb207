"""Whole-model generation on the tiny config: determinism, seeds, image-to-video, guidance variants,
the AR schedule, the RNG order of docs/nova.md section 3, and the diffusion head's token gather."""
import pytest
import torch

from nova_fast.reference import Guidance, NOVAConfig, ar_schedule, build_model, random_text_states
from nova_fast.reference.config import FLOW_IMAGE_SCHEDULER
from nova_fast.reference.layers import gather_tokens

SMALL = dict(num_latent_frames=2, num_ar_steps=4, num_diffusion_steps=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny")
    model = build_model(cfg).eval()
    text = random_text_states(cfg, 2, torch.Generator().manual_seed(0))
    return model, text


def _gen(model, text, seed, **kw):
    args = {**SMALL, **kw}
    return model.generate_video(text, generator=torch.Generator().manual_seed(seed), **args)


def test_ar_schedule_by_hand():
    # len_j = round(4 cos(pi/8 j)) = 4, 3.70->4, 2.83->3, 1.53->2, 0  => n = 0, 1, 1, 2 -> zero skipped
    assert ar_schedule(4, 4) == [1, 1, 2]
    assert ar_schedule(24, 1) == [24]
    assert sum(ar_schedule(1440, 64)) == 1440 and len(ar_schedule(1440, 64)) == 63  # one step predicts 0


def test_shapes_and_determinism(tiny):
    model, text = tiny
    a, b = _gen(model, text, 7), _gen(model, text, 7)
    assert a.shape == (2, 4, 2, 8, 12) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = _gen(model, text, 8)
    assert not torch.allclose(a, c)
    # both frames are generated and distinct; the batch rows differ (different prompts, same order)
    assert not torch.allclose(a[:, :, 0], a[:, :, 1]) and not torch.allclose(a[0], a[1])


def test_image_to_video(tiny):
    model, text = tiny
    first = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    a = _gen(model, text, 1, num_latent_frames=3, first_latent=first)
    b = _gen(model, text, 1, num_latent_frames=3, first_latent=first)
    assert a.shape == (2, 4, 3, 8, 12) and torch.equal(a[:, :, 0], first)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _gen(model, text, 2, num_latent_frames=3, first_latent=first))
    assert not torch.allclose(a[:, :, 1:], _gen(model, text, 1, num_latent_frames=3, first_latent=first + 1)[:, :, 1:])


GUIDANCE_VARIANTS = {
    "none": dict(guidance_scale=1.0),
    "cfg": dict(guidance_scale=5.0),
    "renorm": dict(guidance_scale=5.0, guidance_renorm=0.5),
    "trunc": dict(guidance_scale=5.0, guidance_trunc=500.0),
    "image": dict(guidance_scale=5.0, image_guidance_scale=1.5),
    "stg": dict(guidance_scale=5.0, spatiotemporal_guidance_scale=1.5),
    "ramp": dict(guidance_scale=5.0, min_guidance_scale=2.0),
}


def test_guidance_variants_are_deterministic_and_distinct(tiny):
    model, text = tiny
    out = {}
    for name, kw in GUIDANCE_VARIANTS.items():
        out[name] = _gen(model, text, 4, **kw)
        assert torch.isfinite(out[name]).all(), name
        assert torch.equal(out[name], _gen(model, text, 4, **kw)), name
    for name in ("none", "renorm", "trunc", "image", "ramp"):
        assert not torch.allclose(out[name], out["cfg"]), name
    # the released STG third pass sees exactly the conditional inputs: (c - p) vanishes
    torch.testing.assert_close(out["stg"], out["cfg"], rtol=1e-4, atol=1e-4)


def test_renorm_scope_tokens_matches_canvas_without_renorm(tiny):
    model, text = tiny
    g = torch.Generator().manual_seed(0)
    a = model.generate_video(text, guidance=Guidance(5.0), generator=g, **SMALL)
    g = torch.Generator().manual_seed(0)
    b = model.generate_video(text, guidance=Guidance(5.0, renorm_scope="tokens"), generator=g, **SMALL)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = model.generate_video(text, guidance=Guidance(5.0, guidance_renorm=0.3, renorm_scope="tokens"),
                             generator=torch.Generator().manual_seed(0), **SMALL)
    assert torch.isfinite(c).all()


def _expected_rng_state(seed, B, L, canvas, frames, schedule, draws_per_step):
    ref = torch.Generator().manual_seed(seed)
    torch.empty(B, L, 1).uniform_(generator=ref)
    for _ in range(frames):
        for _ in schedule:
            torch.empty(canvas).normal_(generator=ref)
            for _ in range(draws_per_step):
                torch.randn(canvas, generator=ref)
    return ref.get_state()


def test_rng_order_ddpm(tiny):
    model, text = tiny
    cfg = model.config
    g = torch.Generator().manual_seed(11)
    model.generate_video(text, generator=g, guidance_scale=5.0, **SMALL)
    schedule = ar_schedule(cfg.spatial_tokens, SMALL["num_ar_steps"])
    canvas = (2, cfg.image_dim, *cfg.latent_size)
    # leading spacing, K = 3: t = 666, 333, 0 -> two in-loop draws per AR step (not guidance-expanded)
    want = _expected_rng_state(11, 2, cfg.spatial_tokens, canvas, 2, schedule, draws_per_step=2)
    assert torch.equal(g.get_state(), want)


def test_rng_order_flow_image_to_video(tiny):
    _, text = tiny
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny").replace(scheduler=dict(FLOW_IMAGE_SCHEDULER, shift=3.0))
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    first = torch.zeros(2, 4, 8, 12)
    model.generate_video(text, generator=g, first_latent=first, **{**SMALL, "num_latent_frames": 3})
    schedule = ar_schedule(cfg.spatial_tokens, SMALL["num_ar_steps"])
    # frame 0 is given: the order is drawn at the first step of frame 1; flow draws nothing in the loop
    want = _expected_rng_state(5, 2, cfg.spatial_tokens, (2, 4, 8, 12), 2, schedule, draws_per_step=0)
    assert torch.equal(g.get_state(), want)


def test_image_models_flow_and_labels():
    torch.manual_seed(0)
    base = NOVAConfig.preset("tiny").replace(video_base_size=(1, 2, 3), video_mixer_rank=None,
                                             scheduler=dict(FLOW_IMAGE_SCHEDULER, shift=3.0))
    model = build_model(base).eval()
    text = random_text_states(base, 1, torch.Generator().manual_seed(0))
    kw = dict(num_ar_steps=4, num_diffusion_steps=3)
    a = model.generate_image(text, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (1, 4, 8, 12)
    assert torch.equal(a, model.generate_image(text, generator=torch.Generator().manual_seed(0), **kw))
    assert not torch.allclose(a, model.generate_image(text, generator=torch.Generator().manual_seed(0), flow_shift=1.5,
                                                      **kw))
    c2i = build_model(base.replace(num_classes=10, text_token_dim=None)).eval()
    labels = torch.tensor([1, 7])
    b = c2i.generate_image(labels=labels, generator=torch.Generator().manual_seed(0), **kw)
    assert b.shape == (2, 4, 8, 12) and not torch.allclose(b[0], b[1])
    assert torch.equal(b, c2i.generate_image(labels=labels, generator=torch.Generator().manual_seed(0), **kw))


def test_rotary_variant_generates():
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny").replace(rotary_pos_embed=True)
    model = build_model(cfg).eval()
    assert not any("pos_embed" in k for k in model.state_dict())
    text = random_text_states(cfg, 1, torch.Generator().manual_seed(0))
    a = _gen(model, text, 0)
    assert torch.isfinite(a).all() and torch.equal(a, _gen(model, text, 0))


def test_head_gather_equals_head_on_all_tokens(tiny):
    model, _ = tiny
    head, cfg = model.image_decoder, model.config
    g = torch.Generator().manual_seed(0)
    B, L = 2, cfg.spatial_tokens
    x = torch.randn(B, cfg.image_dim, *cfg.latent_size, generator=g)
    z = torch.randn(B, L, cfg.width, generator=g)
    t = torch.tensor([500.0, 20.0])
    ids = torch.stack([torch.randperm(L, generator=g)[:5] for _ in range(B)])
    with torch.no_grad():
        full = head(x, t, z)
        part = head(x, t, gather_tokens(z, ids), ids)
    assert full.shape == (B, L, 16) and part.shape == (B, 5, 16)
    torch.testing.assert_close(part, gather_tokens(full, ids), rtol=1e-5, atol=1e-5)


def test_bfloat16_generation_runs(tiny):
    _, text = tiny
    torch.manual_seed(0)
    model = build_model(NOVAConfig.preset("tiny"), dtype=torch.bfloat16).eval()
    out = _gen(model, text, 0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
