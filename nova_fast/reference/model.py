"""NOVAModel: generation (temporal AR over frames, set-by-set AR inside a frame, per-token
diffusion) and the training losses, in plain PyTorch (docs/nova.md sections 2-5).

Generation of one video, for each latent frame t:
  1. ``temporal_step``: embed the previous frame (bos tokens at t = 0), run the temporal encoder
     with a KV cache (t = 0 carries the condition prefix), mix with the first frame's output;
  2. ``generate_frame``: S autoregressive steps; each runs the spatial encoder on the canvas
     (known tokens = earlier steps' predictions), draws the step's noise canvas and calls
     ``denoise_step_tokens`` (K scheduler steps of the head), then writes the predicted tokens.
RNG (one generator, in this order): uniform (B, L, 1) for the token order at the first step of the
first generated frame; per executed AR step one normal canvas (B, C, H, W); with DDPM, one normal
canvas inside every denoising step whose t > 0. Nothing is guidance-expanded.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from nova_fast.reference.config import NOVAConfig
from nova_fast.reference.diffusion_head import DiffusionMLP
from nova_fast.reference.embeddings import LabelEmbed, MaskEmbed, MotionEmbed, TextEmbed, VideoPosEmbed
from nova_fast.reference.encoders import SpatialEncoder, TemporalEncoder
from nova_fast.reference.guidance import Guidance, apply_guidance
from nova_fast.reference.layers import RotaryEmbed3D, gather_tokens, patchify, scatter_tokens, unpatchify
from nova_fast.reference.schedulers import scheduler_from_config, training_noise

LOSS_REPEAT = 4               # the head sees each training token 4 times (different noise/timesteps)
MASK_RATIO_RANGE = (0.7, 1.0)  # training mask ratio: normal(1, 0.25) truncated to this range
MASK_RATIO_STD = 0.25


def ar_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens predicted by each executed AR step: n_i = len_i - len_{i+1},
    len_j = round(cos(pi/2 * j/S) * L) (half to even, as numpy), steps with n_i = 0 skipped."""
    lengths = np.round(np.cos(0.5 * np.pi * np.arange(num_steps + 1) / num_steps) * num_tokens).astype(np.int64)
    return [int(n) for n in lengths[:-1] - lengths[1:] if n > 0]


def frame_group_ids(prefix_len: int, tokens_per_frame: int, num_frames: int, device=None) -> torch.Tensor:
    """(prefix_len + num_frames * tokens_per_frame,) group ids: the prefix is group 0 together
    with frame 0; frame f is group f."""
    frames = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return torch.cat([torch.zeros(prefix_len, dtype=torch.long, device=device), frames])


class ImageCanvas:
    """One frame being generated, as the released model holds it: the latent image (B, C, H, W),
    zero where nothing is predicted yet, and the known-token mask (B, L).

    ``generate_frame`` talks to it through three methods, so a faster representation with the same
    three can stand in (``NOVAModel.new_frame_canvas`` is the hook):
    ``encoder_tokens()`` the spatial encoder's input (B, L, D): patch-embedded, unknown tokens
    replaced by the mask token; ``write(pred_ids, tokens)`` adds predicted tokens (B, n, P) at
    pred_ids (B, n), each token predicted once; ``image()`` the frame (B, C, H, W)."""

    def __init__(self, model: "NOVAModel", batch: int):
        c = model.config
        self.model, self.patch = model, model.patch
        self.canvas = torch.zeros(batch, c.image_dim, *c.latent_size, device=model.device, dtype=model.dtype)
        self.known = torch.zeros(batch, c.spatial_tokens, dtype=torch.bool, device=model.device)

    def encoder_tokens(self) -> torch.Tensor:
        return self.model.mask_embed.apply_mask(self.model.image_encoder.patch_embed(self.canvas), self.known)

    def write(self, pred_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        B, L = self.known.shape
        full = scatter_tokens(tokens.new_zeros(B, L, tokens.shape[-1]), pred_ids, tokens)
        self.canvas = self.canvas + unpatchify(full, self.patch, self.canvas.shape)
        self.known = self.known.scatter(1, pred_ids, True)

    def image(self) -> torch.Tensor:
        return self.canvas


class NOVAModel(nn.Module):
    """State-dict keys are the released transformer's (docs/nova.md section 6)."""

    def __init__(self, config: NOVAConfig):
        super().__init__()
        self.config = c = config
        D = c.width
        self.video_encoder = TemporalEncoder(c.temporal_depth, D, c.video_heads, c.video_patch, c.image_dim,
                                             mixer_rank=c.video_mixer_rank)
        self.image_encoder = SpatialEncoder(c.spatial_depth, D, c.image_heads, c.image_patch, c.image_dim,
                                            base_size=None if c.rotary_pos_embed else c.image_base_size)
        self.image_decoder = DiffusionMLP(c.head_depth, c.head_width, D, patch=c.image_patch, channels=c.image_dim)
        self.mask_embed = MaskEmbed(D)
        if c.num_classes is not None:
            self.label_embed = LabelEmbed(c.num_classes, D)
        else:
            self.text_embed = TextEmbed(c.text_token_dim, D, c.text_token_len)
        if not c.rotary_pos_embed:
            self.video_pos_embed = VideoPosEmbed(D, c.video_base_size)
        if c.is_video:
            self.motion_embed = MotionEmbed(D)
        self.scheduler = scheduler_from_config(c.scheduler)

    # ---- small helpers ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.mask_embed.mask_token.dtype

    @property
    def device(self) -> torch.device:
        return self.mask_embed.mask_token.device

    @property
    def patch(self) -> int:
        return self.config.image_patch

    def set_scheduler(self, scheduler_config: dict, source: str = "set_scheduler()") -> None:
        """Replace the scheduler; ``scheduler_source`` records where it came from."""
        self.config.scheduler = dict(scheduler_config)
        self.scheduler = scheduler_from_config(scheduler_config)
        self.scheduler_source = source

    # ---- conditions ------------------------------------------------------------------------------
    def encode_condition(self, text_states=None, labels=None, *, unconditional: bool = False, batch: int = None,
                         motion_flow=5.0, fps=None) -> torch.Tensor:
        """The condition prefix (B, P, D): text tokens (padded) or one label token, then the flow and
        fps tokens of video models. ``unconditional``: the empty prompt / the null class."""
        if self.config.num_classes is not None:
            if unconditional:
                labels = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=self.device)
            if labels is None:
                raise ValueError("this class-conditional model needs labels=")
            cond = self.label_embed(torch.as_tensor(labels, device=self.device).reshape(-1))
        else:
            if unconditional:
                padded = self.text_embed.null_states(batch)
            else:
                if text_states is None:
                    raise ValueError("this text-conditional model needs text_states (B, n, text_token_dim)")
                padded = self.text_embed.pad(text_states.to(self.device) if torch.is_tensor(text_states)
                                             else [s.to(self.device) for s in text_states])
            cond = self.text_embed(padded)
        if self.config.is_video:
            B = cond.shape[0]
            flow = torch.as_tensor(motion_flow, dtype=torch.float32).reshape(-1).expand(B)
            fps_v = torch.as_tensor(MotionEmbed.BASE_FPS if fps is None else fps, dtype=torch.float32)
            motion = self.motion_embed(flow, fps_v.reshape(-1).expand(B), dtype=cond.dtype)
            cond = torch.cat([cond, motion], dim=1)
        return cond

    def guidance_prefix(self, cond: torch.Tensor, uncond: Optional[torch.Tensor], guidance: Guidance) -> torch.Tensor:
        """Stack the prefix per pass: (cond, uncond[, uncond for image | cond for STG])."""
        if guidance.passes == 1:
            return cond
        third = {"image": [uncond], "spatiotemporal": [cond]}.get(guidance.third_pass, [])
        return torch.cat([cond, uncond, *third])

    @staticmethod
    def expand_passes(x: torch.Tensor, passes: int, uncond_replacement: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, ...) -> (passes * B, ...), pass-major; the uncond pass optionally replaced (image guidance)."""
        if passes == 1:
            return x
        parts = [x] * passes
        if uncond_replacement is not None:
            parts[1] = uncond_replacement.to(x.dtype).expand_as(x)
        return torch.cat(parts)

    # ---- temporal encoder ---------------------------------------------------------------------------
    def temporal_attention_mask(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Block-causal mask from per-token frame-group ids (N,): query i sees key j iff
        group[j] <= group[i]. Boolean (N, N), True = may attend (the dense training mask)."""
        return group_ids.unsqueeze(0) <= group_ids.unsqueeze(1)

    def embed_frames(self, frames: Optional[torch.Tensor], t_index: torch.Tensor, num_frames_total: int,
                     batch: int) -> torch.Tensor:
        """Temporal-encoder input tokens of frames at time indices ``t_index`` (F,): video patch
        embedding of frames (B, C, F, H, W) (None: ``bos_token`` everywhere), plus the time and space
        position terms (absolute embeddings). Returns (B, F, N, D)."""
        c = self.config
        N, D = c.temporal_tokens, c.width
        if frames is None:
            tokens = self.mask_embed.bos_token.reshape(1, 1, 1, D).expand(batch, len(t_index), N, D)
        else:
            B, C, F_, H, W = frames.shape
            flat = frames.transpose(1, 2).reshape(B * F_, C, H, W).to(self.dtype)
            tokens = self.video_encoder.patch_embed(flat).reshape(B, F_, N, D)
        if not c.rotary_pos_embed:
            pe = self.video_pos_embed
            time = pe.time_embed(num_frames_total)[t_index]  # (F, D)
            tokens = tokens + time[None, :, None, :] + pe.space_embed(tokens.device, tokens.dtype)
        return tokens

    def temporal_rope(self, t_index: Sequence[int], batch: int, prefix_len: int):
        """RoPE tables for [prefix (position 0), frames at t_index] (None without RoPE)."""
        c = self.config
        if not c.rotary_pos_embed:
            return None
        pos = torch.cat([RotaryEmbed3D.grid(1, *c.temporal_grid, device=self.device, t_offset=int(t))
                         for t in t_index])
        pos = torch.cat([pos.new_zeros(prefix_len, 3), pos]).unsqueeze(0).expand(batch, -1, -1)
        return self.video_encoder.rope.tables(pos)

    def temporal_step(self, prev_frame: Optional[torch.Tensor], t: int, num_frames: int, prefix: torch.Tensor,
                      kv_caches, guidance: Guidance, batch: int) -> torch.Tensor:
        """One KV-cached temporal pass for frame t: (passes * B, N, D), before the mixer."""
        frames = None if prev_frame is None else prev_frame.unsqueeze(2)
        tokens = self.embed_frames(frames, torch.tensor([t], device=self.device), num_frames, batch)[:, 0]
        bos = self.mask_embed.bos_token if guidance.third_pass == "image" else None
        tokens = self.expand_passes(tokens, guidance.passes, bos)
        P = prefix.shape[1] if t == 0 else 0
        rope = self.temporal_rope([t], tokens.shape[0], P)
        return self.video_encoder(tokens, prefix if t == 0 else None, kv_caches=kv_caches, rope=rope)

    def mix(self, anchor: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scaling-and-Shift of the first frame's temporal output by frame z's (identity without mixer)."""
        mixer = self.video_encoder.mixer
        return z if mixer is None else mixer(anchor, z)

    # ---- inside one frame ---------------------------------------------------------------------------
    def spatial_rope_pos(self, batch: int) -> Optional[torch.Tensor]:
        if not self.config.rotary_pos_embed:
            return None
        return RotaryEmbed3D.grid(1, *self.config.spatial_grid, device=self.device).unsqueeze(0).expand(batch, -1, -1)

    def spatial_features(self, tokens: torch.Tensor, prefix: torch.Tensor, known_ids: torch.Tensor,
                         rope_pos: Optional[torch.Tensor], read_ids: torch.Tensor) -> torch.Tensor:
        """The spatial encoder on the canvas tokens (m*B, L, D), read at the tokens the head will
        predict: read_ids (m*B, n) -> (m*B, n, D) (``SpatialEncoder.forward``'s ``read_ids``)."""
        return self.image_encoder(tokens, prefix, known_ids, rope_pos, read_ids)

    def denoise_step_tokens(self, z: torch.Tensor, noise: torch.Tensor, pred_ids: torch.Tensor, scheduler,
                            guidance: Optional[Guidance], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The K denoising steps of one AR step, on the whole canvas, as the released model does.

        z: (m*B, n, D) spatial-encoder outputs at the predicted tokens (guidance passes stacked);
        noise: (B, C, H, W) the step's initial sample; pred_ids: (m*B, n) token positions (the
        same ids in every pass). Each step: the head on the pass-expanded canvas; its n predictions
        per row written into the patchified current sample (non-predicted tokens keep the sample,
        equal in every pass); ``apply_guidance``; ``scheduler.step`` over the full canvas (DDPM draws
        canvas-shaped noise for t > 0). Returns the final sample at the predicted tokens (B, n, P)."""
        B = noise.shape[0]
        m = 1 if guidance is None else guidance.passes
        x = noise
        truncated = False
        for i, t in enumerate(scheduler.timesteps):
            truncated = truncated or (guidance is not None and guidance.truncated(t))
            rows = B if truncated else m * B
            timestep = torch.full((rows,), float(t), device=x.device, dtype=torch.float32)
            x_in = x if rows == B else x.repeat(rows // B, 1, 1, 1)
            out = self.image_decoder(x_in, timestep, z[:rows], pred_ids[:rows])  # (rows, n, P)
            pred = self.combine_predictions(out, x_in, pred_ids[:rows], guidance, truncated)
            x = scheduler.step(unpatchify(pred, self.patch, x.shape), i, x, generator=generator)
        return gather_tokens(patchify(x, self.patch), pred_ids[:B])

    def combine_predictions(self, out, x_in, pred_ids, guidance, truncated) -> torch.Tensor:
        """Head outputs (rows, n, P) -> guided canvas tokens (B, L, P)."""
        if guidance is not None and guidance.renorm_scope == "tokens" and not truncated:
            g = apply_guidance(out, guidance)  # (B, n, P): norms over the predicted tokens only
            return scatter_tokens(patchify(x_in[: g.shape[0]], self.patch), pred_ids[: g.shape[0]], g)
        canvas = scatter_tokens(patchify(x_in, self.patch), pred_ids, out)  # released: whole canvas
        return apply_guidance(canvas, guidance, truncated)

    def new_frame_canvas(self, batch: int) -> "ImageCanvas":
        """The empty frame one ``generate_frame`` fills in (see ``ImageCanvas``)."""
        return ImageCanvas(self, batch)

    def generate_frame(self, prefix: torch.Tensor, schedule: list[int], state: dict, scheduler,
                       guidance: Guidance, generator: Optional[torch.Generator]) -> torch.Tensor:
        """S autoregressive steps on one frame. prefix: (m*B, N, D) this frame's temporal output;
        state carries the per-video token order (drawn at the first call). Returns (B, C, H, W).
        Its stages are hook points: ``new_frame_canvas`` (how the frame is held), ``spatial_features``
        and ``denoise_step_tokens``."""
        c = self.config
        B, m = state["batch"], guidance.passes
        L = c.spatial_tokens
        canvas = self.new_frame_canvas(B)
        noise = torch.empty(B, c.image_dim, *c.latent_size, device=self.device, dtype=self.dtype)
        known_ids = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        rope_pos = self.spatial_rope_pos(m * B)
        pos = 0
        for i, n in enumerate(schedule):
            if state.get("order") is None:  # once per video, with the caller's generator
                u = torch.empty(B, L, 1, device=self.device, dtype=self.dtype).uniform_(generator=generator)
                state["order"] = u.argsort(dim=1).squeeze(-1)
            pred_ids = state["order"][:, pos:pos + n]
            pos += n
            ids_m = self.expand_passes(pred_ids, m)
            z = self.spatial_features(self.expand_passes(canvas.encoder_tokens(), m), prefix,
                                      self.expand_passes(known_ids, m), rope_pos, ids_m)
            noise.normal_(generator=generator)
            step_guidance = guidance.at_ar_step(i, len(schedule))  # the scale ramp, if any
            canvas.write(pred_ids, self.denoise_step_tokens(z, noise, ids_m, scheduler, step_guidance, generator))
            known_ids = torch.cat([known_ids, pred_ids], dim=1)
        return canvas.image()

    # ---- public generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_video(self, text_states=None, *, labels=None, num_latent_frames: int, num_ar_steps: int = 64,
                       num_diffusion_steps: int = 25, guidance_scale: float = 5.0, guidance_trunc: float = 0.0,
                       guidance_renorm: float = 1.0, image_guidance_scale: float = 0.0,
                       spatiotemporal_guidance_scale: float = 0.0, flow_shift: Optional[float] = None,
                       motion_flow: Union[float, Sequence[float]] = 5.0, first_latent: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, fps=None,
                       guidance: Optional[Guidance] = None, min_guidance_scale: Optional[float] = None) -> torch.Tensor:
        """Latents (B, C, T, H, W). ``first_latent`` (B, C, H, W): image-to-video, frame 0 is given
        (the temporal encoder still runs its step 0). ``guidance``: a ready Guidance object that
        replaces the six guidance arguments (``min_guidance_scale``: see ``Guidance``)."""
        c = self.config
        if guidance is None:
            guidance = Guidance(guidance_scale, guidance_trunc, guidance_renorm, image_guidance_scale,
                                spatiotemporal_guidance_scale, min_guidance_scale=min_guidance_scale)
        cond = self.encode_condition(text_states, labels, motion_flow=motion_flow, fps=fps)
        B = cond.shape[0]
        uncond = None
        if guidance.passes > 1:
            uncond = self.encode_condition(unconditional=True, batch=B, motion_flow=motion_flow, fps=fps)
        prefix = self.guidance_prefix(cond, uncond, guidance)

        scheduler = self.scheduler.clone()
        if flow_shift and scheduler.kind == "flow":
            scheduler.set_shift(flow_shift)
        scheduler.set_timesteps(num_diffusion_steps)
        schedule = ar_schedule(c.spatial_tokens, num_ar_steps)

        kv_caches = self.video_encoder.new_kv_caches() if num_latent_frames > 1 else None
        state = {"batch": B, "order": None}
        latents, prev, anchor = [], None, None
        for t in range(num_latent_frames):
            z = self.temporal_step(prev, t, num_latent_frames, prefix, kv_caches, guidance, B)
            if t == 0:
                anchor = z
            frame_prefix = z if t == 0 else self.mix(anchor, z)
            if t == 0 and first_latent is not None:
                frame = first_latent.to(device=self.device, dtype=self.dtype)
            else:
                frame = self.generate_frame(frame_prefix, schedule, state, scheduler, guidance, generator)
            latents.append(frame)
            prev = frame
        return torch.stack(latents, dim=2)

    @torch.no_grad()
    def generate_image(self, text_states=None, *, labels=None, **kwargs) -> torch.Tensor:
        """One frame: (B, C, H, W)."""
        kwargs.pop("num_latent_frames", None)
        return self.generate_video(text_states, labels=labels, num_latent_frames=1, **kwargs)[:, :, 0]

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(self, latents: torch.Tensor, text_states=None, *, labels=None,
                        generator: Optional[torch.Generator] = None, motion_flow=5.0, fps=None,
                        prediction_type: Optional[str] = None) -> dict:
        """Scalar losses of one batch of latents (B, C, T, H, W) or (B, C, H, W).

        Temporal: [prefix, bos frame, frames 0..T-2] in one pass with the block-causal mask;
        mixer on frames 1..; spatial: per frame, a random order and one mask ratio (normal(1, 0.25)
        truncated to [0.7, 1]) for the batch, known = the first round((1 - ratio) * L) tokens of
        the order; head: every token, batch repeated 4 times, noised by the model's scheduler as the
        official training does (``schedulers.training_noise``: flow matching on the 1/1000 sigma grid
        with target noise - x0, or the DDPM forward process at integer timesteps with target noise);
        per-token MSE, averaged over masked tokens only. ``prediction_type``: None follows the
        scheduler; a value that differs from the scheduler's ("flow", or the DDPM config's) raises.
        Returns {"loss"} for images; for video also "loss_t2i" (frame 0, weighted by T) and
        "loss_i2i" (later frames, weighted by T / (T - 1)) with loss = their sum."""
        c = self.config
        check_training_prediction_type(self.scheduler, prediction_type)
        x = latents if latents.dim() == 5 else latents.unsqueeze(2)
        x = x.to(device=self.device, dtype=self.dtype)
        B, C, T, H, W = x.shape
        N, L, D = c.temporal_tokens, c.spatial_tokens, c.width
        g = generator
        dev = self.device

        # 1. temporal autoregression: all frames at once, block-causal
        prefix = self.encode_condition(text_states, labels, motion_flow=motion_flow, fps=fps)
        P = prefix.shape[1]
        t_index = torch.arange(T, device=dev)
        bos = self.embed_frames(None, t_index[:1], T, B)
        tokens = bos if T == 1 else torch.cat([bos, self.embed_frames(x[:, :, : T - 1], t_index[1:], T, B)], 1)
        mask = self.temporal_attention_mask(frame_group_ids(P, N, T, device=dev))
        rope = self.temporal_rope(range(T), B, P)
        ctx = self.video_encoder(tokens.reshape(B, T * N, D), prefix, attn_mask=mask, rope=rope).reshape(B, T, N, D)
        if T > 1 and self.video_encoder.mixer is not None:
            ctx = torch.cat([ctx[:, :1], self.mix(ctx[:, :1], ctx[:, 1:])], dim=1)

        # 2. masked autoregression inside each frame
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        u = torch.rand(B * T, L, generator=g, device=dev)
        order = u.argsort(dim=1)
        ratio = truncated_normal(1.0, MASK_RATIO_STD, *MASK_RATIO_RANGE, generator=g)
        k = int(np.round((1 - ratio) * L))
        known_ids = order[:, :k]
        known = torch.zeros(B * T, L, dtype=torch.bool, device=dev).scatter_(1, known_ids, True)
        tokens = self.mask_embed.apply_mask(self.image_encoder.patch_embed(frames), known)
        z = self.image_encoder(tokens, ctx.reshape(B * T, N, D), known_ids, self.spatial_rope_pos(B * T))

        # 3. per-token diffusion on every token, loss on the masked ones
        z4 = z.repeat(LOSS_REPEAT, 1, 1)
        x0 = patchify(frames, self.patch).repeat(LOSS_REPEAT, 1, 1)
        x_t, timestep, target = training_noise(self.scheduler, x0, generator=g)
        pred = self.image_decoder(unpatchify(x_t, self.patch, (C, H, W)), timestep, z4)
        per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (4BT, L)
        weight = (~known).to(per_token.dtype).repeat(LOSS_REPEAT, 1)
        per_token = per_token * weight / (weight.sum() + 1e-5)
        if T == 1:
            return {"loss": per_token.sum()}
        per_frame = per_token.reshape(LOSS_REPEAT, B, T, L).sum(dim=(0, 1, 3))  # (T,)
        t2i = per_frame[0] * T
        i2i = per_frame[1:].sum() * (T / (T - 1))
        return {"loss": t2i + i2i, "loss_t2i": t2i, "loss_i2i": i2i}


def check_training_prediction_type(scheduler, prediction_type: Optional[str]) -> None:
    """The training target follows the scheduler; an explicit ``prediction_type`` must agree with it."""
    own = "flow" if scheduler.kind == "flow" else scheduler.prediction_type
    if prediction_type is not None and prediction_type != own:
        raise ValueError(f"prediction_type={prediction_type!r} differs from the model's {scheduler.kind} scheduler, "
                         f"which trains {own!r}; the training target follows the scheduler: pass "
                         f"prediction_type=None or change it with model.set_scheduler(...)")


def truncated_normal(mean: float, std: float, low: float, high: float, generator=None) -> float:
    """One draw of normal(mean, std) truncated to [low, high] by inverse CDF (one uniform)."""
    a = torch.special.ndtr(torch.tensor((low - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - mean) / std, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return float(mean + std * torch.special.ndtri(a + (b - a) * u))


def build_model(config: Union[NOVAConfig, str], device=None, dtype=None) -> NOVAModel:
    """A NOVAModel with freshly initialized weights (PyTorch defaults; bos/mask tokens and the text
    padding ~ N(0, 0.02)). ``device="meta"`` builds the structure without memory."""
    if isinstance(config, str):
        config = NOVAConfig.preset(config)
    with torch.device(device if device is not None else "cpu"):
        model = NOVAModel(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def random_text_states(config: NOVAConfig, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, text_token_len, text_token_dim) standard-normal stand-in for text-encoder hidden states."""
    if config.text_token_dim is None:
        raise ValueError("class-conditional config: pass labels instead of text states")
    device = generator.device if generator is not None else None
    return torch.randn(batch, config.text_token_len, config.text_token_dim, generator=generator, device=device)
