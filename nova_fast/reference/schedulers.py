"""Samplers of the diffusion head: flow matching with Euler steps, and DDPM (NOVA_SPEC.md section 3).

Both follow diffusers' arithmetic (fp32 tables, fp32 step math, result in the sample's dtype) and are
built from a diffusers-style ``scheduler_config.json`` dict with ``from_config``. ``timesteps`` is what
the head is fed; ``step(model_output, step_index, sample, generator)`` returns the previous sample.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch

from nova_fast.reference.config import scheduler_kind


def _shift(sigma, s: float):
    """Timestep shift: s * sigma / (1 + (s - 1) * sigma)."""
    return s * sigma / (1 + (s - 1) * sigma)


class FlowMatchEulerScheduler:
    """x_t = (1 - sigma) x0 + sigma * noise; the head predicts v = noise - x0.

    ``set_timesteps(K)``: sigmas = shift_s(linspace(sigma_max, sigma_min, K)) + [0], where the ends
    are the images of 1 and 1/N under the configured shift and s is the current shift (the config's,
    or the caller's ``flow_shift`` via ``set_shift``). Step: x + (sigma_{i+1} - sigma_i) * v.
    Timesteps fed to the head: sigma_i * N. No randomness."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = int(num_train_timesteps)
        self.config_shift = float(shift)
        self.shift = float(shift)
        # training sigmas t/N for t = N..1 in fp32, shifted by the configured shift: their ends
        train = torch.arange(self.num_train_timesteps, 0, -1, dtype=torch.float32, device="cpu") / self.num_train_timesteps
        train = _shift(train, self.config_shift)
        self.sigma_max, self.sigma_min = float(train[0]), float(train[-1])
        self.sigmas = torch.zeros(0, device="cpu")
        self.timesteps = torch.zeros(0, device="cpu")

    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchEulerScheduler":
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("shift", 1.0))

    def set_shift(self, shift: float) -> None:
        self.shift = float(shift)

    def set_timesteps(self, num_steps: int) -> None:
        N = self.num_train_timesteps
        base = np.linspace(self.sigma_max * N, self.sigma_min * N, num_steps) / N  # float64, as diffusers
        sig = torch.from_numpy(_shift(base, self.shift)).to(torch.float32)
        self.sigmas = torch.cat([sig, torch.zeros(1, device="cpu")])
        self.timesteps = sig * N

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (sample.float() + dt.to(sample.device) * model_output.float()).to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (1 - sigma) * x0 + sigma * noise

    def clone(self) -> "FlowMatchEulerScheduler":
        return copy.deepcopy(self)


def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32, device="cpu")
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32, device="cpu") ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32, device="cpu")
    raise ValueError(f"unknown beta_schedule {schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")


class DDPMScheduler:
    """DDPM ancestral sampling (Ho et al. eq. 7), as diffusers' DDPMScheduler without clipping.

    Step at t with prev = t - N // K: predicted x0 from the head's output (epsilon, sample or
    v_prediction); mean = c0 * x0 + ct * x_t with c0 = sqrt(a_prev) beta_t / (1 - a_t),
    ct = sqrt(alpha_t) (1 - a_prev) / (1 - a_t); for t > 0 add sqrt(var) * randn(sample shape) from
    the caller's generator, var = (1 - a_prev) / (1 - a_t) * beta_t clamped at 1e-20 (fixed_small)
    or beta_t (fixed_large). a = alphas_cumprod, a_prev = 1 when prev < 0."""

    kind = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", timestep_spacing: str = "leading", steps_offset: int = 0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unsupported variance_type {variance_type!r} (fixed_small, fixed_large)")
        if timestep_spacing not in ("leading", "linspace", "trailing"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type, self.variance_type = prediction_type, variance_type
        self.timestep_spacing, self.steps_offset = timestep_spacing, int(steps_offset)
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self.betas = _betas(beta_schedule, self.num_train_timesteps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self.timesteps = torch.zeros(0, dtype=torch.int64, device="cpu")

    @classmethod
    def from_config(cls, config: dict) -> "DDPMScheduler":
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "variance_type",
                "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range")
        return cls(**{k: config[k] for k in keys if k in config and config[k] is not None})

    def set_timesteps(self, num_steps: int) -> None:
        N, K = self.num_train_timesteps, int(num_steps)
        if K > N:
            raise ValueError(f"{K} inference steps exceed the {N} training steps")
        if self.timestep_spacing == "leading":
            t = (np.arange(0, K) * (N // K)).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "linspace":
            t = np.linspace(0, N - 1, K).round()[::-1].astype(np.int64)
        else:  # trailing
            t = np.round(np.arange(N, 0, -N / K)).astype(np.int64) - 1
        self.num_inference_steps = K
        self.timesteps = torch.from_numpy(t.copy())

    def previous_timestep(self, t: int) -> int:
        return int(t) - self.num_train_timesteps // self.num_inference_steps

    def coefficients(self, step_index: int) -> dict:
        """The fp32 scalars of step ``step_index``: a_t, a_prev, beta_t (current), c0, ct, variance."""
        t = int(self.timesteps[step_index])
        prev = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0, device="cpu")
        beta_t = 1 - a_t / a_prev
        c0 = a_prev.sqrt() * beta_t / (1 - a_t)
        ct = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
        if self.variance_type == "fixed_small":
            variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        else:
            variance = beta_t
        return {"t": t, "a_t": a_t, "a_prev": a_prev, "beta_t": beta_t, "c0": c0, "ct": ct, "variance": variance}

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        if self.prediction_type == "v_prediction":
            return a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        return model_output

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        c = self.coefficients(step_index)
        dev = sample.device
        x = sample.float()
        x0 = self.predict_x0(model_output.float(), x, c["a_t"].to(dev))
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        prev = c["c0"].to(dev) * x0 + c["ct"].to(dev) * x
        if c["t"] > 0:  # one canvas-shaped draw from the caller's generator, in the sample's dtype
            noise = torch.randn(sample.shape, generator=generator, device=dev, dtype=sample.dtype)
            prev = prev + c["variance"].to(dev).sqrt() * noise.float()
        return prev.to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t.long()]
        while a.dim() < x0.dim():
            a = a.unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def clone(self) -> "DDPMScheduler":
        return copy.deepcopy(self)


def scheduler_from_config(config: dict):
    """A FlowMatchEulerScheduler or DDPMScheduler from a diffusers-style scheduler_config dict
    (``_class_name`` decides; without one, a ``shift`` entry means flow matching)."""
    if scheduler_kind(config) == "flow":
        return FlowMatchEulerScheduler.from_config(config)
    return DDPMScheduler.from_config(config)


# ---- training: the forward process of the official training loss --------------------------------
def flow_training_sigmas(scheduler: FlowMatchEulerScheduler) -> torch.Tensor:
    """(N,) fp32 noise levels a flow training index selects: entry i is (N - i) / N under the
    configured shift (unshifted with dynamic shifting), as the official scheduler tabulates them."""
    N = scheduler.num_train_timesteps
    sigmas = torch.arange(N, 0, -1, dtype=torch.float32, device="cpu") / N
    if getattr(scheduler, "use_dynamic_shifting", False):
        return sigmas
    return _shift(sigmas, scheduler.config_shift)


def training_noise(scheduler, x0: torch.Tensor, generator: Optional[torch.Generator] = None):
    """Noise one training batch as the official training loss does, following the scheduler's kind.

    x0: (..., P) clean token values (the leading dims index tokens). Draws, in this order, from
    ``generator``: ``noise`` of x0's shape and dtype, then one per-token draw:
      flow: n ~ normal (fp32); index = int(N * sigmoid(n)) (a floor on the 1/N grid, kept below N);
            sigma = flow_training_sigmas[index] (so sigma = 1 - index / N with shift 1);
            x_t = sigma * noise + (1 - sigma) * x0; head timestep sigma * N; target noise - x0.
      ddpm: t ~ uniform integers in [0, N); a = alphas_cumprod[t] in x0's dtype;
            x_t = sqrt(a) * x0 + sqrt(1 - a) * noise; head timestep the integer t; target noise
            (epsilon prediction only: the official loss trains every other prediction type on
            noise - x0, which its DDPM sampler does not read that way, so those are refused).
    Returns (x_t, head_timestep, target), x_t and target in x0's dtype, head_timestep of x0.shape[:-1]."""
    N = scheduler.num_train_timesteps
    dev = x0.device
    if scheduler.kind == "ddpm" and scheduler.prediction_type != "epsilon":
        raise ValueError(f"training with a DDPM scheduler of prediction_type={scheduler.prediction_type!r} is not "
                         f"supported: the official training loss uses the target noise - x0 for every prediction "
                         f"type but 'epsilon', which the DDPM sampler does not read as {scheduler.prediction_type!r}; "
                         f"use prediction_type='epsilon' or a flow-matching scheduler")
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    if scheduler.kind == "flow":
        n = torch.randn(x0.shape[:-1], generator=generator, device=dev, dtype=torch.float32)
        index = (torch.sigmoid(n) * N).to(torch.int64).clamp_(max=N - 1)
        sigmas = flow_training_sigmas(scheduler).to(dev)
        sigma = sigmas.to(x0.dtype)[index].unsqueeze(-1)
        return sigma * noise + (1 - sigma) * x0, (sigmas * N)[index], noise - x0
    t = torch.randint(0, N, x0.shape[:-1], generator=generator, device=dev)
    a = scheduler.alphas_cumprod.to(device=dev, dtype=x0.dtype)[t].unsqueeze(-1)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise, t, noise
