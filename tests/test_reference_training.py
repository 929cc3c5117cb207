"""training_losses: finite scalars, gradients reach every trained part, determinism with a generator."""
import torch

from nova_fast.reference import NOVAConfig, build_model, random_text_states
from nova_fast.reference.config import FLOW_IMAGE_SCHEDULER
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


def test_image_losses_epsilon_target():
    torch.manual_seed(0)
    cfg = NOVAConfig.preset("tiny").replace(video_base_size=(1, 2, 3), video_mixer_rank=None,
                                            scheduler=dict(FLOW_IMAGE_SCHEDULER))
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    text = random_text_states(cfg, 2, g)
    for target in ("flow", "epsilon"):
        losses = model.training_losses(torch.randn(2, 4, 8, 12, generator=g), text, generator=g,
                                       prediction_type=target)
        assert set(losses) == {"loss"} and torch.isfinite(losses["loss"]) and losses["loss"] > 0
        losses["loss"].backward()
    assert model.image_decoder.head.weight.grad.abs().sum() > 0


def test_mask_ratio_is_truncated_normal():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal(1.0, 0.25, 0.7, 1.0, generator=g) for _ in range(2000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    assert 0.85 < draws.mean() < 0.9  # mean of N(1, 0.25) truncated to [0.7, 1] is about 0.873
