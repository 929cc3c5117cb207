"""accelerate() on the official NOVA code's model (package diffnext) is refused with a message that
names what differs; nova_fast's own released layout is still accepted.

CI cannot install diffnext, so the stand-ins below follow the official classes' forward signatures,
norms and KV-cache protocol as docs/official_layout.md describes them (their bodies are cut down to
what these tests need). When diffnext is importable, the last test checks the stand-ins against the
real classes and runs the refusal on a real NOVATransformer3DModel."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nova_fast
from nova_fast.accelerator import LayoutMismatch, OfficialModelUnsupported, is_accelerated, \
    official_layout_differences
from nova_fast.reference import NOVAConfig, build_model

WIDTH, HEADS, CHANNELS, PATCH = 64, 1, 4, 2


# ---------------------------------------------------------------- stand-ins of the official classes
class StandInAttention(nn.Module):
    """Official attention: forward(x) only; RoPE, mask and KV cache are attributes set from outside.
    cache_kv: None/False off; True: the next call stores its [k, v]; a list: keys and values of the
    call are appended to it along the token axis and attention runs over the whole list."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_mask = self.cache_kv = self.pe_func = None

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.pe_func is not None:
            q, k = self.pe_func(q), self.pe_func(k)
        if self.cache_kv:
            if isinstance(self.cache_kv, list):
                k = torch.cat([self.cache_kv[0], k], dim=2)
                v = torch.cat([self.cache_kv[1], v], dim=2)
            self.cache_kv = [k, v]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class StandInMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class StandInBlock(nn.Module):
    """Official encoder block: forward(x, pe_func); the branch output is normalized, then added."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), StandInAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), StandInMLP(dim)

    def forward(self, x, pe_func=None):
        self.attn.pe_func = pe_func
        x = self.norm1(self.attn(x)) + x
        return self.norm2(self.mlp(x)) + x


class StandInPatchEmbed(nn.Module):
    def __init__(self, channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class StandInAdaLayerNormZero(nn.Module):
    """Official AdaLN-Zero: eps lives in the .norm submodule (LayerNorm without affine; Identity
    when eps is None); forward(x, z) -> (norm(x) * (1 + scale) + shift, remaining stats)."""

    def __init__(self, dim, rank=None, num_stats=2, eps=1e-6):
        super().__init__()
        self.lora = nn.Linear(dim, rank, bias=False) if rank else nn.Identity()
        self.proj = nn.Linear(rank or dim, num_stats * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False) if eps else nn.Identity()
        self.activation, self.num_stats = nn.SiLU(), num_stats

    def forward(self, x, z):
        stats = self.proj(self.lora(self.activation(z))).chunk(self.num_stats, dim=-1)
        return self.norm(x) * (1 + stats[0]) + stats[1], stats[2:]


class StandInAdaLayerNorm(StandInAdaLayerNormZero):
    """The official video mixer: AdaLN with eps=None (no normalization), first output only."""

    def forward(self, x, z):
        return super().forward(x, z)[0]


class StandInVisionTransformer(nn.Module):
    """Official encoder: forward(x, c=None, prev_ids=None, pos=None); enable_kvcache(mode) switches
    every block's attention cache; mixer is nn.Identity unless the video model has one."""

    def __init__(self, depth, dim, num_heads, patch):
        super().__init__()
        self.patch_embed = StandInPatchEmbed(CHANNELS, dim, patch)
        self.blocks = nn.ModuleList(StandInBlock(dim, num_heads) for _ in range(depth))
        self.norm, self.mixer = nn.LayerNorm(dim), nn.Identity()
        self.encoder_depth = depth // 2

    def enable_kvcache(self, mode=True):
        for blk in self.blocks:
            blk.attn.cache_kv = mode

    def forward(self, x, c=None, prev_ids=None, pos=None):
        h = x if c is None else torch.cat([c, x], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h if c is None else h[:, c.shape[1]:])


class StandInProjector(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)


class StandInTimeCondEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.timestep_proj, self.condition_proj = StandInProjector(256, dim), StandInProjector(dim, dim)


class StandInDiffusionBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = StandInAdaLayerNormZero(dim, num_stats=3, eps=1e-6)
        self.proj, self.norm2 = StandInProjector(dim, dim), nn.LayerNorm(dim)

    def forward(self, x, z):
        raise NotImplementedError("stand-in: layout and signature only")


class StandInDiffusionMLP(nn.Module):
    def __init__(self, depth, dim):
        super().__init__()
        self.patch_embed = StandInPatchEmbed(CHANNELS, dim, PATCH)
        self.time_cond_embed = StandInTimeCondEmbed(dim)
        self.blocks = nn.ModuleList(StandInDiffusionBlock(dim) for _ in range(depth))
        self.norm = StandInAdaLayerNormZero(dim, num_stats=2, eps=1e-6)
        self.head = nn.Linear(dim, PATCH * PATCH * CHANNELS)

    def forward(self, x, timestep, z, pred_ids=None):
        raise NotImplementedError("stand-in: layout and signature only")


class StandInMaskEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.bos_token, self.mask_token = nn.Parameter(torch.zeros(1, dim)), nn.Parameter(torch.zeros(1, dim))


class StandInNOVATransformer3D(nn.Module):
    """Official model: generation and training take dicts (generate_frame(states, inputs),
    generate_video(inputs), train_video(inputs)); the module names are the released ones."""

    def __init__(self, video=True):
        super().__init__()
        self.video_encoder = StandInVisionTransformer(2, WIDTH, HEADS, 2 * PATCH)
        self.image_encoder = StandInVisionTransformer(2, WIDTH, HEADS, PATCH)
        self.image_decoder = StandInDiffusionMLP(1, WIDTH)
        self.mask_embed = StandInMaskEmbed(WIDTH)
        if video:
            self.video_encoder.mixer = StandInAdaLayerNorm(WIDTH, 8, eps=None)

    def generate_frame(self, states, inputs):
        raise NotImplementedError("stand-in: signature only")

    def generate_video(self, inputs):
        raise NotImplementedError("stand-in: signature only")

    def train_video(self, inputs):
        raise NotImplementedError("stand-in: signature only")


# ---------------------------------------------------------------- the refusal
def _untouched(model):
    return not is_accelerated(model) and not any(
        "forward" in m.__dict__ or "attend" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("video", [True, False])
def test_official_model_is_refused_naming_every_difference(video):
    model = StandInNOVATransformer3D(video=video)
    with pytest.raises(OfficialModelUnsupported) as err:
        nova_fast.accelerate(model)
    assert isinstance(err.value, LayoutMismatch)
    msg = str(err.value)
    for expected in ("image_encoder.forward('x', 'c', 'prev_ids', 'pos') takes pos=",
                     "video_encoder.enable_kvcache()",
                     "video_encoder.blocks 0, 1: attn.cache_kv kept on the module",
                     "later frames would lose the text prefix",
                     "image_encoder.blocks 0, 1: forward takes pe_func",
                     "image_decoder.norm, image_decoder.blocks.0.norm1: eps kept inside the submodule .norm",
                     "StandInNOVATransformer3D.generate_frame('states', 'inputs') differs",
                     "StandInNOVATransformer3D.generate_video('inputs',) differs",
                     "nova_fast.reference.load_pretrained(path)"):
        assert expected in msg, (expected, msg)
    assert ("image_encoder.mixer is nn.Identity" in msg) and (("video_encoder.mixer is nn.Identity" in msg) != video)
    assert _untouched(model)


class _Released(nn.Module):
    """nova_fast's released module layout without the NOVAModel methods (module-level patches)."""

    def __init__(self, src):
        super().__init__()
        for name in ("video_encoder", "image_encoder", "image_decoder", "mask_embed"):
            setattr(self, name, copy.deepcopy(getattr(src, name)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(NOVAConfig.preset("tiny")).eval()


def _retype(module, name, **methods):
    module.__class__ = type(name, (type(module),), methods)


def _graft_pos(m):
    _retype(m.image_encoder, "PosEncoder", forward=lambda self, x, c=None, prev_ids=None, pos=None: x)


def _graft_pe_func(m):
    _retype(m.video_encoder.blocks[1], "PeFuncBlock", forward=lambda self, x, pe_func=None: x)


def _graft_cache_attr(m):
    m.video_encoder.blocks[0].attn.cache_kv = None


def _graft_mask_attr(m):
    m.image_encoder.blocks[0].attn.attn_mask = None


def _graft_cache_switch(m):
    _retype(m.video_encoder, "CachingEncoder", enable_kvcache=lambda self, mode=True: None)


def _graft_norm_eps(m):
    m.image_decoder.norm = StandInAdaLayerNormZero(m.image_decoder.head.in_features, num_stats=2)


def _graft_identity_mixer(m):
    m.video_encoder.mixer = nn.Identity()


def _graft_diffnext_class(m):
    m.mask_embed.__class__ = type("MaskEmbed", (type(m.mask_embed),), {"__module__": "diffnext.models.embeddings"})


def _graft_signature(m):
    m.__class__ = type("OfficialLike", (type(m),), {"generate_frame": lambda self, states, inputs: None})


GRAFTS = {
    "pos": (_graft_pos, "image_encoder.forward('x', 'c', 'prev_ids', 'pos') takes pos="),
    "pe_func": (_graft_pe_func, "video_encoder.blocks 1: forward takes pe_func"),
    "cache attribute": (_graft_cache_attr, "video_encoder.blocks 0: attn.cache_kv kept on the module"),
    "mask attribute": (_graft_mask_attr, "image_encoder.blocks 0: attn.attn_mask kept on the module"),
    "cache switch": (_graft_cache_switch, "video_encoder.enable_kvcache()"),
    "norm-owned eps": (_graft_norm_eps, "image_decoder.norm: eps kept inside the submodule .norm"),
    "identity mixer": (_graft_identity_mixer, "video_encoder.mixer is nn.Identity"),
    "diffnext class": (_graft_diffnext_class, "classes of the official package diffnext: "
                                              "diffnext.models.embeddings.MaskEmbed"),
    "method signature": (_graft_signature, "OfficialLike.generate_frame('states', 'inputs') differs"),
}


@pytest.mark.parametrize("trait", list(GRAFTS))
def test_each_official_trait_alone_is_refused(tiny, trait):
    """nova_fast's own layout with one official trait grafted on: refused, and only that trait named."""
    graft, expected = GRAFTS[trait]
    model = _Released(tiny)
    graft(model)
    found = official_layout_differences(model)
    assert len(found) == 1 and expected in found[0], found
    with pytest.raises(OfficialModelUnsupported, match=r"follows the official NOVA code"):
        nova_fast.accelerate(model)
    assert _untouched(model)


def test_signature_trait_on_a_nova_model_subclass(tiny):
    model = copy.deepcopy(tiny)
    _graft_signature(model)
    with pytest.raises(OfficialModelUnsupported, match=r"generate_frame\('states', 'inputs'\) differs"):
        nova_fast.accelerate(model)


@pytest.mark.parametrize("which", ["video model", "image model", "released layout only"])
def test_own_released_layout_is_still_accepted(tiny, which):
    if which == "image model":
        torch.manual_seed(0)
        model = build_model(NOVAConfig.preset("tiny").replace(video_base_size=(1, 2, 3), video_mixer_rank=None))
    else:
        model = copy.deepcopy(tiny) if which == "video model" else _Released(tiny)
    assert official_layout_differences(model) == []
    nova_fast.accelerate(model)
    assert is_accelerated(model)
    x = torch.randn(2, 5, model.image_encoder.blocks[0].norm1.normalized_shape[0])
    with torch.no_grad():
        got = model.image_encoder.blocks[1](x)
        nova_fast.restore(model)
        want = model.image_encoder.blocks[1](x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stand_in_cache_protocol_is_the_documented_one():
    """The stand-in's cache: on, the first call stores its keys; each later call appends to them and
    attends over all, so frame t sees the text prefix and frames < t without being given them."""
    torch.manual_seed(0)
    enc = StandInVisionTransformer(1, WIDTH, HEADS, PATCH)
    prefix, f0, f1 = torch.randn(1, 3, WIDTH), torch.randn(1, 4, WIDTH), torch.randn(1, 4, WIDTH)
    enc.enable_kvcache(True)
    enc(f0, prefix)
    assert enc.blocks[0].attn.cache_kv[0].shape[2] == 7
    cached = enc(f1)
    assert enc.blocks[0].attn.cache_kv[0].shape[2] == 11
    enc.enable_kvcache(False)
    whole = torch.cat([prefix, f0, f1], 1)
    group = torch.tensor([0] * 7 + [1] * 4)  # prefix and frame 0 form group 0
    enc.blocks[0].attn.attn_mask = group[None, :] <= group[:, None]
    torch.testing.assert_close(cached, enc(whole)[:, 7:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the real official package, when present
def _official():
    try:
        from diffnext.models.transformers.transformer_nova import NOVATransformer3DModel
    except ImportError as exc:  # diffnext needs diffusers, scipy and tqdm as well
        pytest.skip(f"the official NOVA package diffnext is not importable here ({exc}); CI cannot download it. "
                    f"The stand-ins above follow docs/official_layout.md instead")
    return NOVATransformer3DModel


def test_against_the_official_package():
    """Runs only where diffnext imports: a small official model (on the meta device, the smallest
    registered arch) is refused naming the official classes and traits, and the stand-ins' signatures
    and attributes equal the official classes'."""
    official_cls = _official()
    from diffnext.models import diffusion_mlp, normalization, vision_transformer

    with torch.device("meta"):
        model = official_cls(image_dim=4, image_size=64, image_stride=8, text_token_dim=32, text_token_len=8,
                             image_base_size=(4, 4), video_base_size=(16, 2, 2), video_mixer_rank=8,
                             arch=("vit_d16w768", "vit_d32w768", "mlp_d3w1280"))
    with pytest.raises(OfficialModelUnsupported) as err:
        nova_fast.accelerate(model)
    msg = str(err.value)
    for expected in ("classes of the official package diffnext: diffnext.", "image_encoder.forward(", "pos=",
                     "enable_kvcache()", "attn.cache_kv kept on the module", "forward takes pe_func",
                     "eps kept inside the submodule .norm", "generate_frame('states', 'inputs') differs",
                     "generate_video('inputs',) differs"):
        assert expected in msg, (expected, msg)
    assert _untouched(model)

    def names(fn):
        return list(inspect.signature(fn).parameters)

    pairs = [(vision_transformer.VisionTransformer.forward, StandInVisionTransformer.forward),
             (vision_transformer.VisionTransformer.enable_kvcache, StandInVisionTransformer.enable_kvcache),
             (vision_transformer.Block.forward, StandInBlock.forward),
             (vision_transformer.Attention.forward, StandInAttention.forward),
             (normalization.AdaLayerNormZero.__init__, StandInAdaLayerNormZero.__init__),
             (normalization.AdaLayerNormZero.forward, StandInAdaLayerNormZero.forward),
             (diffusion_mlp.DiffusionMLP.forward, StandInDiffusionMLP.forward),
             (official_cls.generate_frame, StandInNOVATransformer3D.generate_frame),
             (official_cls.generate_video, StandInNOVATransformer3D.generate_video),
             (official_cls.train_video, StandInNOVATransformer3D.train_video)]
    for real, stand_in in pairs:
        assert names(real) == names(stand_in), (real.__qualname__, names(real), names(stand_in))
    attn = model.video_encoder.blocks[0].attn
    assert {"cache_kv", "attn_mask", "pe_func"} <= set(vars(attn)) and attn.cache_kv is None
    assert not hasattr(model.image_decoder.norm, "eps") and model.image_decoder.norm.norm.eps == 1e-6
    assert isinstance(model.image_encoder.mixer, nn.Identity)
    # the official cache protocol, run on a real official attention (CPU, tiny width)
    real_attn = vision_transformer.Attention(WIDTH, 2)
    mine = StandInAttention(WIDTH, 2)
    mine.load_state_dict(real_attn.state_dict())
    real_attn.cache_kv = mine.cache_kv = True
    for x in (torch.randn(1, 3, WIDTH), torch.randn(1, 4, WIDTH)):
        torch.testing.assert_close(mine(x), real_attn(x))
    assert real_attn.cache_kv[0].shape == mine.cache_kv[0].shape == (1, 2, 7, WIDTH // 2)


def test_the_suggested_way_loads_an_official_folder(tmp_path):
    """Runs only where diffnext imports: what the refusal suggests works. A folder written by the
    official code (diffusers save_pretrained / save_config) loads with load_pretrained to the same
    weights, and that model accelerates."""
    _official()
    from diffnext.schedulers.scheduling_ddpm import DDPMScheduler
    from test_reference_training import _official_tiny

    from nova_fast.reference import load_pretrained

    torch.manual_seed(0)
    official = _official_tiny(NOVAConfig.preset("tiny"))
    official.save_pretrained(str(tmp_path / "transformer"))
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_config(str(tmp_path / "scheduler"))
    with pytest.raises(OfficialModelUnsupported):
        nova_fast.accelerate(official)
    loaded = load_pretrained(tmp_path, require_scheduler=True)
    assert loaded.scheduler_source == f"DDPMScheduler from {tmp_path / 'scheduler' / 'scheduler_config.json'}"
    want = official.state_dict()
    assert set(loaded.state_dict()) == set(want)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key
    nova_fast.accelerate(loaded)
    assert is_accelerated(loaded)
