"""NOVAConfig: the fields of a released ``transformer/config.json`` plus what follows from them.

The released checkpoints describe a model with a handful of fields (docs/nova.md section 1);
everything else (patch sizes, token counts, head widths) is derived here, in one place, so the
modules never recompute it their own way.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

_ARCH = re.compile(r"(vit|mlp)_d(\d+)w(\d+)")

# Scheduler descriptions in diffusers' scheduler_config.json form (the "_class_name" picks the kind).
DDPM_VIDEO_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "clip_sample": False,
}
FLOW_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}


def parse_arch(name: str, kind: str) -> tuple[int, int]:
    """'vit_d16w1024' -> (16, 1024). ``kind`` is 'vit' or 'mlp'."""
    m = _ARCH.fullmatch(str(name))
    if not m or m.group(1) != kind:
        raise ValueError(f"cannot read arch entry {name!r}: expected {kind}_d<depth>w<width>")
    return int(m.group(2)), int(m.group(3))


def default_heads(width: int) -> int:
    """Heads of a released encoder width: 12 for 768, 16 for 1024 and 1536, else width // 64."""
    if width == 768:
        return 12
    if width in (1024, 1536):
        return 16
    return max(1, width // 64)


@dataclass
class NOVAConfig:
    # ---- the released config.json fields --------------------------------------------------
    image_dim: int = 4                      # latent channels
    image_size: tuple = (480, 768)          # pixels (H, W)
    image_stride: int = 8                   # VAE spatial downsampling
    text_token_dim: Optional[int] = 2560    # text encoder width (None: class-conditional only)
    text_token_len: int = 256               # text tokens after padding
    video_base_size: tuple = (16, 15, 24)   # (T, H, W) in video patches
    image_base_size: tuple = (30, 48)       # (H, W) in image patches
    video_mixer_rank: Optional[int] = None  # None/0: no mixer; < 0: full rank (no LoRA)
    rotary_pos_embed: bool = False          # 3-D RoPE instead of absolute sin-cos
    arch: tuple = ("vit_d16w1024", "vit_d32w1024", "mlp_d3w1280")
    video_num_heads: Optional[int] = None   # override of the heads rule
    image_num_heads: Optional[int] = None
    num_classes: Optional[int] = None       # class-conditional variants: label embedding
    # ---- not in config.json: how samples are drawn (scheduler_config.json) -----------------
    scheduler: dict = field(default_factory=lambda: dict(DDPM_VIDEO_SCHEDULER))
    name: str = ""

    def __post_init__(self):
        self.image_size = _pair(self.image_size)
        self.video_base_size = tuple(int(v) for v in self.video_base_size)
        self.image_base_size = _pair(self.image_base_size)
        self.arch = tuple(self.arch)
        if len(self.arch) != 3:
            raise ValueError(f"arch must have 3 entries (temporal, spatial, head), got {self.arch!r}")
        t_depth, t_width = parse_arch(self.arch[0], "vit")
        s_depth, s_width = parse_arch(self.arch[1], "vit")
        parse_arch(self.arch[2], "mlp")
        if t_width != s_width:
            raise ValueError(f"temporal and spatial widths must be equal (text and motion tokens are shared), "
                             f"got {t_width} and {s_width}")
        for what, heads, width in (("video", self.video_heads, t_width), ("image", self.image_heads, s_width)):
            if width % heads:
                raise ValueError(f"{what} encoder width {width} is not divisible by {heads} heads")
        h, w = self.latent_size
        if h % self.video_patch or w % self.video_patch:
            raise ValueError(f"latent grid {h}x{w} is not divisible by the video patch {self.video_patch}")
        if not self.rotary_pos_embed:
            # the absolute sin-cos embedding is built over the base grid and added token by token
            if tuple(self.image_base_size) != self.spatial_grid:
                raise ValueError(f"image_base_size {self.image_base_size} must equal the spatial token grid "
                                 f"{self.spatial_grid} with absolute position embeddings")
            if tuple(self.video_base_size[1:]) != self.temporal_grid:
                raise ValueError(f"video_base_size[1:] {self.video_base_size[1:]} must equal the temporal token grid "
                                 f"{self.temporal_grid} with absolute position embeddings")
        if self.text_token_dim is None and self.num_classes is None:
            raise ValueError("a model needs text_token_dim (text-conditional) or num_classes (class-conditional)")

    # ---- derived sizes --------------------------------------------------------------------------
    @property
    def latent_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.image_stride, self.image_size[1] // self.image_stride

    @property
    def image_patch(self) -> int:
        return 15 // self.image_stride + 1

    @property
    def video_patch(self) -> int:
        return 2 * self.image_patch

    @property
    def spatial_grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // self.image_patch, w // self.image_patch

    @property
    def temporal_grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // self.video_patch, w // self.video_patch

    @property
    def spatial_tokens(self) -> int:
        return self.spatial_grid[0] * self.spatial_grid[1]

    @property
    def temporal_tokens(self) -> int:
        return self.temporal_grid[0] * self.temporal_grid[1]

    @property
    def token_dim(self) -> int:
        """Values per latent token: patch * patch * channels."""
        return self.image_patch * self.image_patch * self.image_dim

    @property
    def is_video(self) -> bool:
        """Video models (base length > 1) append two motion tokens (flow, fps) to the text."""
        return self.video_base_size[0] > 1

    @property
    def width(self) -> int:
        return parse_arch(self.arch[1], "vit")[1]

    @property
    def temporal_depth(self) -> int:
        return parse_arch(self.arch[0], "vit")[0]

    @property
    def spatial_depth(self) -> int:
        return parse_arch(self.arch[1], "vit")[0]

    @property
    def head_depth(self) -> int:
        return parse_arch(self.arch[2], "mlp")[0]

    @property
    def head_width(self) -> int:
        return parse_arch(self.arch[2], "mlp")[1]

    @property
    def video_heads(self) -> int:
        return int(self.video_num_heads or default_heads(parse_arch(self.arch[0], "vit")[1]))

    @property
    def image_heads(self) -> int:
        return int(self.image_num_heads or default_heads(self.width))

    @property
    def video_head_dim(self) -> int:
        return self.width // self.video_heads

    @property
    def image_head_dim(self) -> int:
        return self.width // self.image_heads

    @property
    def num_heads(self) -> int:  # read by nova_fast.roofline
        return self.image_heads

    @property
    def condition_len(self) -> int:
        """Tokens of the condition prefix: text (or one label token), plus flow and fps for video."""
        base = self.text_token_len if self.num_classes is None else 1
        return base + (2 if self.is_video else 0)

    @property
    def has_mixer(self) -> bool:
        return bool(self.video_mixer_rank)

    @property
    def scheduler_kind(self) -> str:
        return scheduler_kind(self.scheduler)

    # ---- (de)serialization ------------------------------------------------------------------
    def _fields_dict(self) -> dict:
        d = asdict(self)
        d["image_size"], d["image_base_size"] = list(self.image_size), list(self.image_base_size)
        d["video_base_size"], d["arch"] = list(self.video_base_size), list(self.arch)
        return d

    def to_dict(self) -> dict:
        """The released config.json fields, scheduler and name, plus the derived ``num_heads``
        (read by nova_fast.roofline; ignored by ``from_dict``)."""
        return {**self._fields_dict(), "num_heads": self.image_heads}

    def to_json_dict(self) -> dict:
        """What ``save_pretrained`` writes to transformer/config.json (no scheduler, no name)."""
        d = self._fields_dict()
        d.pop("scheduler"), d.pop("name")
        for key in ("video_num_heads", "image_num_heads", "num_classes"):
            if d[key] is None:
                d.pop(key)
        return {"_class_name": "NOVATransformer3DModel", **d}

    @classmethod
    def from_dict(cls, d: dict, scheduler: Optional[dict] = None, name: str = "") -> "NOVAConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and not k.startswith("_")}
        if isinstance(kwargs.get("image_size"), int):
            kwargs["image_size"] = (kwargs["image_size"],) * 2
        if scheduler is not None:
            kwargs["scheduler"] = dict(scheduler)
        elif "scheduler" not in kwargs:
            base = kwargs.get("video_base_size", (1,))
            kwargs["scheduler"] = dict(DDPM_VIDEO_SCHEDULER if int(base[0]) > 1 else FLOW_IMAGE_SCHEDULER)
        kwargs.setdefault("name", name)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path, scheduler: Optional[dict] = None) -> "NOVAConfig":
        """Read a released ``transformer/config.json``. The scheduler comes from ``scheduler`` (a
        diffusers scheduler_config dict), else a "scheduler" entry in the file, else the default of
        the model kind (video: DDPM, image: flow matching)."""
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d, scheduler=scheduler, name=d.get("name", ""))

    @classmethod
    def preset(cls, name: str) -> "NOVAConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**copy.deepcopy(PRESETS[name]), name=name)

    def replace(self, **changes) -> "NOVAConfig":
        d = self._fields_dict()
        d.update(changes)
        return NOVAConfig(**d)


def scheduler_kind(scheduler_config: dict) -> str:
    """'flow' or 'ddpm' from a diffusers-style scheduler description."""
    cls_name = str(scheduler_config.get("_class_name", ""))
    if "Flow" in cls_name:
        return "flow"
    if "DDPM" in cls_name:
        return "ddpm"
    return "flow" if "shift" in scheduler_config else "ddpm"


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected (H, W), got {v}")
    return v


def _sdxl(width: int) -> dict:
    return dict(image_dim=4, image_size=(1024, 1024), image_stride=8, text_token_dim=2560, text_token_len=256,
                video_base_size=(1, 32, 32), image_base_size=(64, 64), video_mixer_rank=None,
                rotary_pos_embed=False, arch=(f"vit_d16w{width}", f"vit_d32w{width}", f"mlp_d6w{width}"),
                scheduler=dict(FLOW_IMAGE_SCHEDULER))


PRESETS: dict[str, dict] = {
    # CPU-sized video model with the full structure (mixer, motion tokens, DDPM): head_dim 64.
    "tiny": dict(image_dim=4, image_size=(64, 96), image_stride=8, text_token_dim=32, text_token_len=8,
                 video_base_size=(16, 2, 3), image_base_size=(4, 6), video_mixer_rank=8, rotary_pos_embed=False,
                 arch=("vit_d2w128", "vit_d2w128", "mlp_d2w128"), scheduler=dict(DDPM_VIDEO_SCHEDULER)),
    # Benchmark video model: width 256 (4 heads of 64), 64 spatial / 16 temporal tokens per frame.
    "mid": dict(image_dim=4, image_size=(128, 128), image_stride=8, text_token_dim=128, text_token_len=16,
                video_base_size=(16, 4, 4), image_base_size=(8, 8), video_mixer_rank=16, rotary_pos_embed=False,
                arch=("vit_d4w256", "vit_d8w256", "mlp_d2w256"), scheduler=dict(DDPM_VIDEO_SCHEDULER)),
    # Released text-to-video model (33 frames at 480x768 = 9 latent frames of 60x96).
    "osp480": dict(image_dim=4, image_size=(480, 768), image_stride=8, text_token_dim=2560, text_token_len=256,
                   video_base_size=(16, 15, 24), image_base_size=(30, 48), video_mixer_rank=24,
                   rotary_pos_embed=False, arch=("vit_d16w1024", "vit_d32w1024", "mlp_d3w1280"),
                   scheduler=dict(DDPM_VIDEO_SCHEDULER)),
    # 512^2 text-to-image model: same encoders and head as osp480, DDPM (spec: "likely").
    "sd512": dict(image_dim=4, image_size=(512, 512), image_stride=8, text_token_dim=2560, text_token_len=256,
                  video_base_size=(1, 16, 16), image_base_size=(32, 32), video_mixer_rank=None,
                  rotary_pos_embed=False, arch=("vit_d16w1024", "vit_d32w1024", "mlp_d3w1280"),
                  scheduler=dict(DDPM_VIDEO_SCHEDULER)),
    "sdxl1024-w768": _sdxl(768),
    "sdxl1024-w1024": _sdxl(1024),
    "sdxl1024-w1536": _sdxl(1536),
}
