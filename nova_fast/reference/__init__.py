"""nova_fast.reference: the plain PyTorch NOVA, the independent oracle.

Readable like the paper, one file per concern; it never imports ``nova_fast.ops``,
``nova_fast.kernels`` or Triton. Public API:

- ``NOVAConfig`` (``.preset(name)``, ``.from_json(path)``), ``build_model``, ``NOVAModel``
  (``generate_video``, ``generate_image``, ``training_losses``), ``random_text_states``;
- ``load_pretrained`` / ``save_pretrained`` (diffusers-style folders, strict checks);
- ``FlowMatchEulerScheduler``, ``DDPMScheduler``, ``scheduler_from_config``;
- ``Guidance``, ``apply_guidance``; ``patchify``, ``unpatchify``, ``ar_schedule``, ``frame_group_ids``.

Hot paths an accelerator may replace by attribute (each is one method with plain tensor arguments):
- ``layers.Attention.attend(q, k, v, attn_mask)``: the attention core, (B, H, N, d) tensors;
- ``NOVAModel.temporal_attention_mask(group_ids)``: the block-causal training mask (bool, True = attend);
- ``SpatialEncoder.forward(tokens, prefix, known_ids, rope_pos, read_ids)``: the spatial encoder, read
  at the predicted tokens when ``read_ids`` is given (``SpatialEncoder.prepare`` is everything before
  its second half); ``NOVAModel.spatial_features`` is the frame loop's call of it;
- ``NOVAModel.denoise_step_tokens(z, noise, pred_ids, scheduler, guidance, generator)``: the K-step
  denoising loop of one AR step (returns the predicted tokens (B, n, P));
- ``NOVAModel.new_frame_canvas(batch)``: how ``generate_frame`` holds the frame being generated
  (``model.ImageCanvas``: ``encoder_tokens()``, ``write(pred_ids, tokens)``, ``image()``);
- ``NOVAModel.mix(anchor, z)`` / ``encoders.VideoMixer.forward(x0, z)``: the Scaling-and-Shift layer;
- ``layers.Block.forward``, ``diffusion_head.AdaLNZero.forward``, ``diffusion_head.DiffusionBlock.forward``,
  ``diffusion_head.DiffusionMLP.forward``; the per-step math: ``guidance.apply_guidance`` and
  ``scheduler.step``.
"""
from nova_fast.reference.config import PRESETS, NOVAConfig
from nova_fast.reference.diffusion_head import AdaLNZero, DiffusionMLP
from nova_fast.reference.encoders import SpatialEncoder, TemporalEncoder, VideoMixer
from nova_fast.reference.guidance import Guidance, apply_guidance
from nova_fast.reference.layers import Attention, Block, KVCache, patchify, unpatchify
from nova_fast.reference.model import NOVAModel, ar_schedule, build_model, frame_group_ids, random_text_states
from nova_fast.reference.schedulers import DDPMScheduler, FlowMatchEulerScheduler, scheduler_from_config
from nova_fast.reference.weights import WeightMismatchError, load_pretrained, save_pretrained

__all__ = [
    "NOVAConfig", "PRESETS", "NOVAModel", "build_model", "random_text_states", "load_pretrained", "save_pretrained",
    "WeightMismatchError", "FlowMatchEulerScheduler", "DDPMScheduler", "scheduler_from_config", "Guidance",
    "apply_guidance", "patchify", "unpatchify", "ar_schedule", "frame_group_ids", "Attention", "Block", "KVCache",
    "AdaLNZero", "DiffusionMLP", "TemporalEncoder", "SpatialEncoder", "VideoMixer",
]
