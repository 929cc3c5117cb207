"""training_losses: finite scalars, gradients reach every trained part, determinism with a generator;
the head's noising follows the model's scheduler as the official training code does, checked against
a computation written here from the formulas (DDPM forward process at integer timesteps with the
epsilon target; flow matching with sigma on the 1/1000 grid of the same normal draw)."""
import math
import types

import pytest
import torch

from nova_fast.reference import NOVAConfig, build_model, random_text_states
from nova_fast.reference.config import DDPM_VIDEO_SCHEDULER, FLOW_IMAGE_SCHEDULER, parse_arch, scheduler_kind
from nova_fast.reference.model import truncated_normal


def test_video_losses_and_gradients():
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny")
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    text = random_text_states(cfg, 2, g)
    latents = torch.randn(2, 4, 3, 8, 12, generator=g)
    losses = model.training_losses(latents, text, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"loss", "loss_t2i", "loss_i2i"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    torch.testing.assert_close(losses["loss"], losses["loss_t2i"] + losses["loss_i2i"])
    again = model.training_losses(latents, text, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["loss"], losses["loss"])
    losses["loss"].backward()
    for name in ("video_encoder.blocks.0.attn.qkv.weight", "video_encoder.mixer.lora.weight",
                 "image_encoder.blocks.1.mlp.fc2.weight", "image_decoder.blocks.0.norm1.proj.weight",
                 "image_decoder.head.weight", "text_embed.proj.weight", "mask_embed.mask_token",
                 "mask_embed.bos_token", "motion_embed.flow_proj.0.weight", "video_pos_embed.time_proj.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_image_losses_target_follows_the_scheduler():
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny").replace(video_base_size=(1, 2, 3), video_mixer_rank=None,
                                            scheduler=dict(FLOW_IMAGE_SCHEDULER))
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    text = random_text_states(cfg, 2, g)
    for target in (None, "flow"):
        losses = model.training_losses(torch.randn(2, 4, 8, 12, generator=g), text, generator=g,
                                       prediction_type=target)
        assert set(losses) == {"loss"} and torch.isfinite(losses["loss"]) and losses["loss"] > 0
        losses["loss"].backward()
    assert model.image_decoder.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prediction_type='epsilon' differs from the model's flow scheduler"):
        model.training_losses(torch.randn(2, 4, 8, 12, generator=g), text, generator=g, prediction_type="epsilon")


def test_mask_ratio_is_truncated_normal():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal(1.0, 0.25, 0.7, 1.0, generator=g) for _ in range(2000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    assert 0.85 < draws.mean() < 0.9  # mean of N(1, 0.25) truncated to [0.7, 1] is about 0.873


# ---------------------------------------------------------------- the head's noising, from the formulas
def _cosine_alphas_cumprod(n: int) -> torch.Tensor:
    """Glide's cosine schedule: beta_i = min(1 - f((i+1)/n) / f(i/n), 0.999), f(t) = cos((t+0.008)/1.008 pi/2)^2."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _expected_noising(kind, x0, g, shift=1.0):
    """Replays the generator after the spatial draws: noise, then the per-token draw. float64."""
    noise = torch.randn(x0.shape, generator=g).double()
    if kind == "ddpm":
        t = torch.randint(0, 1000, x0.shape[:2], generator=g)
        abar = _cosine_alphas_cumprod(1000)[t].unsqueeze(-1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t.double(), noise
    n = torch.randn(x0.shape[:2], generator=g)
    s = 1 - torch.floor(1000 * torch.sigmoid(n)).double() / 1000  # the official 1/1000 grid
    sigma = (shift * s / (1 + (shift - 1) * s)).unsqueeze(-1)
    return sigma * noise + (1 - sigma) * x0, sigma.squeeze(-1) * 1000, noise - x0


def _loss_from_formulas(model, latents, text, seed, kind, shift=1.0):
    """The model's losses, and losses computed here: the spatial-encoder output z is taken from the
    model's head call; noise, timesteps, target, masking and frame weights are recomputed from the
    formulas and the head is run on them."""
    from nova_fast.reference.layers import patchify, unpatchify

    seen = {}

    def grab(module, args):
        seen["x"], seen["t"], seen["z"] = args[0].detach(), args[1].detach(), args[2]

    handle = model.image_decoder.register_forward_pre_hook(grab)
    try:
        losses = model.training_losses(latents, text, generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    B, C, T, H, W = latents.shape
    L, p = model.config.spatial_tokens, model.patch
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(B * T, L, generator=g).argsort(1)      # the per-frame token order
    ratio = truncated_normal(1.0, 0.25, 0.7, 1.0, generator=g)  # the batch's mask ratio
    masked = torch.ones(B * T, L, dtype=torch.float64).scatter_(1, order[:, : int(round((1 - ratio) * L))], 0.0)
    x0 = patchify(latents.transpose(1, 2).reshape(B * T, C, H, W), p).repeat(4, 1, 1).double()
    x_t, timestep, target = _expected_noising(kind, x0, g, shift)
    pred = model.image_decoder(unpatchify(x_t.float(), p, (C, H, W)), timestep.float(), seen["z"])
    per_token = (pred.double() - target).pow(2).mean(-1) * masked.repeat(4, 1)
    per_token = per_token / (masked.sum() * 4 + 1e-5)
    if T == 1:
        own = {"loss": per_token.sum()}
    else:
        per_frame = per_token.reshape(4, B, T, L).sum((0, 1, 3))
        own = {"loss_t2i": per_frame[0] * T, "loss_i2i": per_frame[1:].sum() * T / (T - 1)}
        own["loss"] = own["loss_t2i"] + own["loss_i2i"]
    return losses, seen, own, unpatchify(x_t, p, (C, H, W)), timestep


def _check_against_formulas(model, latents, text, seed, kind, shift=1.0):
    losses, seen, own, x_t, timestep = _loss_from_formulas(model, latents, text, seed, kind, shift)
    torch.testing.assert_close(seen["x"].double(), x_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["t"].double(), timestep, rtol=0, atol=1e-3 if kind == "flow" else 0)
    if kind == "ddpm":
        assert seen["t"].dtype == torch.int64  # the integer timestep is what the head is fed
    assert set(losses) == set(own)
    for k in own:
        torch.testing.assert_close(losses[k].double(), own[k], rtol=1e-5, atol=1e-7, msg=k)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    want = torch.autograd.grad(own["loss"], params, retain_graph=True, allow_unused=True)
    got = torch.autograd.grad(losses["loss"], params, allow_unused=True)
    compared = 0
    for (name, _), w, g_ in zip(named, want, got):
        if w is None and g_ is None:
            continue
        torch.testing.assert_close(g_.double(), w.double(), rtol=1e-4, atol=1e-6, msg=f"grad {name}")
        compared += 1
    assert compared > 40  # encoders and head alike


def test_ddpm_training_follows_the_forward_process():
    """The tiny preset is a DDPM / epsilon video model, as the released video checkpoint."""
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny")
    assert cfg.scheduler["_class_name"] == "DDPMScheduler" and cfg.scheduler["prediction_type"] == "epsilon"
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    text = random_text_states(cfg, 2, g)
    _check_against_formulas(model, torch.randn(2, 4, 2, 8, 12, generator=g), text, 5, "ddpm")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_sigma_on_the_official_grid(shift):
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny").replace(video_base_size=(1, 2, 3), video_mixer_rank=None,
                                            scheduler=dict(FLOW_IMAGE_SCHEDULER, shift=shift))
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    text = random_text_states(cfg, 2, g)
    _check_against_formulas(model, torch.randn(2, 4, 1, 8, 12, generator=g), text, 7, "flow", shift)


def test_flow_sigma_grid_differs_from_the_plain_sigmoid():
    """The grid matters per draw: the same normal draw gives 1 - floor(1000 s)/1000, not 1 - s."""
    from nova_fast.reference.schedulers import FlowMatchEulerScheduler, training_noise

    x0 = torch.zeros(64, 3, 2)
    _, timestep, _ = training_noise(FlowMatchEulerScheduler(), x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(torch.randn(x0.shape[:2], generator=g))
    torch.testing.assert_close(timestep, 1000 - torch.floor(1000 * s), rtol=0, atol=1e-3)
    assert (timestep - 1000 * (1 - s)).abs().max() > 0.1


def test_ddpm_training_refuses_a_target_the_official_loss_gets_wrong():
    base = NOVAConfig.preset("tiny")
    model = build_model(base.replace(scheduler=dict(base.scheduler, prediction_type="v_prediction"))).train()
    with pytest.raises(ValueError, match="prediction_type='v_prediction' is not supported"):
        model.training_losses(torch.randn(1, 4, 2, 8, 12), random_text_states(base, 1))


def _official_schedulers():
    try:
        from diffnext.schedulers.scheduling_cfm import FlowMatchEulerDiscreteScheduler
        from diffnext.schedulers.scheduling_ddpm import DDPMScheduler
    except ImportError as exc:
        pytest.skip(f"the official NOVA package diffnext is not importable here ({exc}); CI cannot download it. "
                    f"The formula tests above cover the same rules")
    return {"ddpm": DDPMScheduler, "flow": FlowMatchEulerDiscreteScheduler}


@pytest.mark.parametrize("config", [dict(DDPM_VIDEO_SCHEDULER), dict(FLOW_IMAGE_SCHEDULER),
                                    dict(FLOW_IMAGE_SCHEDULER, shift=3.0)], ids=["ddpm", "flow", "flow-shift3"])
def test_training_noise_equals_the_official_schedulers(config):
    """Runs only where diffnext imports: with the global RNG seeded alike (training_noise without a
    generator draws from it, as the official loss does), noised tokens, head timesteps and targets
    equal the official scheduler's sample_timesteps / add_noise and the official target rule."""
    from nova_fast.reference.schedulers import scheduler_from_config, training_noise

    official_cls = _official_schedulers()[scheduler_kind(config)]
    official = official_cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    x0 = torch.randn(8, 24, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    noise = torch.randn(x0.shape, dtype=x0.dtype)
    timestep = official.sample_timesteps(x0.shape[:2])
    want_x_t = official.add_noise(x0, noise, timestep)
    want_t = getattr(official, "timestep", timestep)
    want_target = noise if getattr(official.config, "prediction_type", "flow") == "epsilon" else noise - x0
    torch.manual_seed(11)
    x_t, t, target = training_noise(scheduler_from_config(config), x0)
    torch.testing.assert_close(x_t, want_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t, want_t, rtol=0, atol=0)
    torch.testing.assert_close(target, want_target, rtol=0, atol=0)


def _official_tiny(cfg):
    """The official NOVATransformer3DModel for ``cfg``, with the tiny arch names registered in its
    registries (the official ones list the released sizes only)."""
    try:
        from diffnext.models.transformers import transformer_nova as official
    except ImportError as exc:
        pytest.skip(f"the official NOVA package diffnext is not importable here ({exc}); CI cannot download it. "
                    f"The formula tests above cover the same rules")
    for registry, build, arch in ((official.VIDEO_ENCODERS, official.video_encoder, cfg.arch[0]),
                                  (official.IMAGE_ENCODERS, official.image_encoder, cfg.arch[1]),
                                  (official.IMAGE_DECODERS, official.image_decoder, cfg.arch[2])):
        if not registry.has(arch):
            kind = "mlp" if registry is official.IMAGE_DECODERS else "vit"
            depth, width = parse_arch(arch, kind)
            extra = {} if kind == "mlp" else {"num_heads": width // 64}
            registry.register(arch, func=build, depth=depth, embed_dim=width, **extra)
    fields = {k: v for k, v in cfg.to_json_dict().items() if not k.startswith("_")}
    return official.NOVATransformer3DModel(**fields)


@pytest.mark.parametrize("which", ["ddpm video", "flow image"])
def test_training_losses_equal_the_official_model(monkeypatch, which):
    """Runs only where diffnext imports: the official model on the same weights, latents, text and
    global-RNG seed gives the same losses and gradients. The mask ratio is the one draw the two take
    from different generators (numpy via scipy there, ``generator`` here), so it is fixed in both."""
    schedulers = _official_schedulers()  # skips without diffnext
    from diffnext.models import embeddings as official_embeddings
    import nova_fast.reference.model as reference_model

    cfg, T = NOVAConfig.preset("tiny"), 3
    if which == "flow image":
        cfg, T = cfg.replace(video_base_size=(1, 2, 3), video_mixer_rank=None, scheduler=dict(FLOW_IMAGE_SCHEDULER)), 1
    torch.manual_seed(0)
    mine = build_model(cfg).train()
    official = _official_tiny(cfg).train()
    official.load_state_dict(mine.state_dict())
    official.noise_scheduler = schedulers[cfg.scheduler_kind].from_config({k: v for k, v in cfg.scheduler.items() if k != "_class_name"})
    ratio = 0.83
    fixed = types.SimpleNamespace(rvs=lambda n: [ratio])
    monkeypatch.setattr(official_embeddings, "stats", types.SimpleNamespace(truncnorm=lambda *a, **k: fixed))
    monkeypatch.setattr(reference_model, "truncated_normal", lambda *a, **k: ratio)
    g = torch.Generator().manual_seed(1)
    text = random_text_states(cfg, 2, g)
    latents = torch.randn(2, 4, T, 8, 12, generator=g)

    torch.manual_seed(5)
    got = mine.training_losses(latents, text)  # no generator: the global RNG, as the official loss
    cond = official.text_embed(text)
    if official.motion_embed:
        cond = torch.cat([cond, official.motion_embed(cond, [5.0] * 2, None)], 1)
    torch.manual_seed(5)
    want = official.train_video({"x": latents.clone(), "c": cond})
    if T > 1:
        want["loss"] = want["loss_t2i"] + want["loss_i2i"]
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0, msg=k)
    mine_grads = dict(zip([n for n, _ in mine.named_parameters()],
                          torch.autograd.grad(got["loss"], list(mine.parameters()), allow_unused=True)))
    official_grads = torch.autograd.grad(want["loss"], list(official.parameters()), allow_unused=True)
    compared = 0
    for name, grad in zip([n for n, _ in official.named_parameters()], official_grads):
        if mine_grads[name] is None:  # the official code runs the video patch embedding on zero frames
            assert grad is None or not grad.any(), name
            continue
        torch.testing.assert_close(mine_grads[name], grad, rtol=1e-5, atol=1e-7, msg=f"grad {name}")
        compared += 1
    assert compared > 40
