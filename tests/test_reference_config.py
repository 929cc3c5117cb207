"""NOVAConfig presets and parsing; released configs on the meta device: exact names and shapes
(docs/nova.md section 6) and parameter counts computed independently from those names' dimensions."""
import json
import math

import pytest
import torch

from nova_fast.reference import NOVAConfig, build_model
from nova_fast.reference.config import default_heads, parse_arch

RELEASED = ["osp480", "sd512", "sdxl1024-w768", "sdxl1024-w1024", "sdxl1024-w1536"]


def expected_shapes(cfg: NOVAConfig) -> dict:
    """Every state-dict key and shape from the spec's description, written out independently of the
    model code: LayerNorm/Linear/Conv have weight and bias; ``lora`` is bias-free."""
    D = cfg.width
    W = cfg.head_width
    C = cfg.image_dim
    p, pv = cfg.image_patch, 2 * cfg.image_patch
    shapes = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[name + ".weight"] = (n_out, n_in)
        if bias:
            shapes[name + ".bias"] = (n_out,)

    def norm(name, dim):
        shapes[name + ".weight"], shapes[name + ".bias"] = (dim,), (dim,)

    def conv(name, c_in, c_out, k):
        shapes[name + ".weight"], shapes[name + ".bias"] = (c_out, c_in, k, k), (c_out,)

    def vit(prefix, depth, patch):
        conv(f"{prefix}.patch_embed.proj", C, D, patch)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            norm(b + ".norm1", D)
            linear(b + ".attn.qkv", D, 3 * D)
            linear(b + ".attn.proj", D, D)
            norm(b + ".norm2", D)
            linear(b + ".mlp.fc1", D, 4 * D)
            linear(b + ".mlp.fc2", 4 * D, D)
        norm(f"{prefix}.norm", D)

    t_depth = int(cfg.arch[0].split("_d")[1].split("w")[0])
    s_depth = int(cfg.arch[1].split("_d")[1].split("w")[0])
    h_depth = int(cfg.arch[2].split("_d")[1].split("w")[0])
    vit("video_encoder", t_depth, pv)
    vit("image_encoder", s_depth, p)
    if cfg.video_mixer_rank:
        if cfg.video_mixer_rank > 0:
            linear("video_encoder.mixer.lora", D, cfg.video_mixer_rank, bias=False)
            linear("video_encoder.mixer.proj", cfg.video_mixer_rank, 2 * D)
        else:
            linear("video_encoder.mixer.proj", D, 2 * D)
    conv("image_decoder.patch_embed.proj", C, W, p)
    linear("image_decoder.time_cond_embed.timestep_proj.fc1", 256, W)
    linear("image_decoder.time_cond_embed.timestep_proj.fc2", W, W)
    linear("image_decoder.time_cond_embed.condition_proj.fc1", D, W)
    linear("image_decoder.time_cond_embed.condition_proj.fc2", W, W)
    for i in range(h_depth):
        b = f"image_decoder.blocks.{i}"
        linear(b + ".norm1.proj", W, 3 * W)
        linear(b + ".proj.fc1", W, W)
        linear(b + ".proj.fc2", W, W)
        norm(b + ".norm2", W)
    linear("image_decoder.norm.proj", W, 2 * W)
    linear("image_decoder.head", W, p * p * C)
    shapes["mask_embed.bos_token"] = (1, D)
    shapes["mask_embed.mask_token"] = (1, D)
    shapes["text_embed.weight"] = (512, cfg.text_token_dim)
    linear("text_embed.proj", cfg.text_token_dim, D)
    norm("text_embed.norm", D)
    norm("video_pos_embed.norm", D)
    linear("video_pos_embed.time_proj.0", 256, D)
    linear("video_pos_embed.time_proj.2", D, D)
    if cfg.video_base_size[0] > 1:
        for k in ("flow_proj", "fps_proj"):
            linear(f"motion_embed.{k}.0", 256, D)
            linear(f"motion_embed.{k}.2", D, D)
    return shapes


@pytest.mark.parametrize("name", RELEASED)
def test_released_config_names_and_shapes_on_meta(name):
    cfg = NOVAConfig.preset(name)
    model = build_model(cfg, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_shapes(cfg)
    assert sorted(set(want) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(want)) == [], "unexpected keys"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "wrong shapes"
    assert all(t.is_meta for t in model.state_dict().values())
    # text_embed.weight is a persistent buffer, not a parameter
    assert "text_embed.weight" in dict(model.named_buffers()) and "text_embed.weight" not in dict(model.named_parameters())


@pytest.mark.parametrize("name,approx_millions", [("osp480", 644.2), ("sdxl1024-w768", 363.9),
                                                   ("sdxl1024-w1024", 645.7), ("sdxl1024-w1536", 1449.8)])
def test_parameter_counts(name, approx_millions):
    cfg = NOVAConfig.preset(name)
    independent = sum(math.prod(s) for k, s in expected_shapes(cfg).items() if k != "text_embed.weight")
    model = build_model(cfg, device="meta")
    counted = sum(p.numel() for p in model.parameters())
    print(f"{name}: {independent:,} parameters ({independent / 1e6:.1f} M)")
    assert counted == independent
    assert abs(independent / 1e6 - approx_millions) < 0.1  # the paper's 0.3B / 0.6B / 1.4B sizes


def test_derived_sizes_osp480_and_sdxl():
    c = NOVAConfig.preset("osp480")
    assert c.latent_size == (60, 96) and c.image_patch == 2 and c.video_patch == 4
    assert c.spatial_tokens == 1440 and c.temporal_tokens == 360
    assert c.video_heads == c.image_heads == 16 and c.image_head_dim == 64
    assert c.condition_len == 258 and c.is_video and c.video_mixer_rank == 24
    assert c.scheduler_kind == "ddpm"
    x = NOVAConfig.preset("sdxl1024-w768")
    assert x.spatial_tokens == 4096 and x.temporal_tokens == 1024 and x.image_heads == 12
    assert x.condition_len == 256 and not x.is_video and x.scheduler_kind == "flow"
    assert NOVAConfig.preset("sdxl1024-w1536").image_heads == 16


def test_tiny_and_mid_presets():
    t = NOVAConfig.preset("tiny")
    assert t.latent_size == (8, 12) and t.spatial_tokens == 24 and t.temporal_tokens == 6
    assert t.width == 128 and t.video_heads == t.image_heads == 2 and t.image_head_dim == 64
    assert t.is_video and t.has_mixer and t.scheduler_kind == "ddpm"
    m = NOVAConfig.preset("mid")
    assert m.width == 256 and m.image_heads == 4 and m.image_head_dim == 64
    assert (m.temporal_depth, m.spatial_depth, m.head_depth, m.head_width) == (4, 8, 2, 256)


def test_arch_parsing_and_heads_rule():
    assert parse_arch("vit_d16w1024", "vit") == (16, 1024)
    assert parse_arch("mlp_d3w1280", "mlp") == (3, 1280)
    with pytest.raises(ValueError):
        parse_arch("vit_d16", "vit")
    with pytest.raises(ValueError):
        parse_arch("mlp_d3w1280", "vit")
    assert [default_heads(w) for w in (768, 1024, 1536, 512, 128, 32)] == [12, 16, 16, 8, 2, 1]
    c = NOVAConfig.preset("tiny").replace(image_num_heads=1, video_num_heads=1)
    assert c.image_heads == 1 and c.image_head_dim == 128


def test_from_json(tmp_path):
    fields = {"_class_name": "NOVATransformer3DModel", "_diffusers_version": "0.31.0", "image_dim": 4,
              "image_size": [480, 768], "image_stride": 8, "text_token_dim": 2560, "text_token_len": 256,
              "video_base_size": [16, 15, 24], "image_base_size": [30, 48], "video_mixer_rank": 24,
              "rotary_pos_embed": False, "arch": ["vit_d16w1024", "vit_d32w1024", "mlp_d3w1280"]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    c = NOVAConfig.from_json(path)
    assert c.arch == ("vit_d16w1024", "vit_d32w1024", "mlp_d3w1280") and c.image_size == (480, 768)
    assert c.scheduler_kind == "ddpm"  # video model without a scheduler file
    c2 = NOVAConfig.from_json(path, scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert c2.scheduler_kind == "flow" and c2.scheduler["shift"] == 3.0
    assert build_model(c, device="meta").video_encoder.mixer.lora.out_features == 24


def test_bad_configs_fail_loudly():
    with pytest.raises(ValueError, match="widths"):
        NOVAConfig.preset("tiny").replace(arch=("vit_d2w128", "vit_d2w256", "mlp_d2w128"))
    with pytest.raises(ValueError, match="image_base_size"):
        NOVAConfig.preset("tiny").replace(image_base_size=(8, 8))
    with pytest.raises(ValueError, match="unknown preset"):
        NOVAConfig.preset("nope")


def test_tiny_builds_with_dtype():
    m = build_model(NOVAConfig.preset("tiny"), dtype=torch.bfloat16)
    assert {t.dtype for t in m.state_dict().values()} == {torch.bfloat16}
