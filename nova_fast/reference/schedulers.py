"""Samplers of the diffusion head: flow matching with Euler steps, and DDPM (docs/nova.md, "Schedulers").

Both are built from a diffusers-style ``scheduler_config.json`` dict with ``from_config`` and follow
the official NOVA schedulers field by field: every field either has the official effect or is
refused with a ``ValueError`` naming it. ``timesteps`` is what the head is fed;
``step(model_output, step_index, sample, generator)`` returns the previous sample (fp32 step math,
result in the sample's dtype).

Each scheduler owns its **step table** (``step_table(device)``): one fp32 row per denoising step,
built from the same per-step coefficients ``step`` uses, in the layout below, so a fused loop
(``nova_fast.denoise_tokens``) reads the scheduler's own numbers instead of re-deriving them:

    x0    = (c0 * x + c1 * g) / c2         g: the (guided) head output, x: the current sample
    x_new = c3 * x0 + c4 * x + c5 * noise  noise: this step's draw (only where ``draws[i]``)
    c6, c7 = c0 c3 / c2 + c4, c1 c3 / c2   the step folded: x_new = c6 x + c7 g + c5 noise
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from nova_fast.reference.config import scheduler_kind

STEP_TABLE_COLUMNS = 8


@dataclass(frozen=True)
class StepTable:
    """A scheduler's K steps in table form (see the module docstring for the columns).

    coef: (K, 8) fp32; timesteps: (K,) fp32, what the head is fed; both on one device.
    draws: per step, whether it adds noise (one canvas-shaped normal from the caller's generator);
    host_timesteps: the timesteps as Python floats (for host-side decisions such as truncation)."""

    coef: torch.Tensor
    timesteps: torch.Tensor
    draws: tuple
    host_timesteps: tuple


def fold_step_columns(coef: torch.Tensor) -> torch.Tensor:
    """Fill columns 6 and 7 of a (K, 8) step table from columns 0-5, in place; returns coef."""
    coef[:, 6] = coef[:, 0] * coef[:, 3] / coef[:, 2] + coef[:, 4]
    coef[:, 7] = coef[:, 1] * coef[:, 3] / coef[:, 2]
    return coef


class _TableCache:
    """Step tables per (device, dtype) for one schedule; a scheduler drops it whenever its schedule
    changes (``set_timesteps``, ``set_shift``). It also remembers the timesteps object it was built
    for (kept alive by the cache, so the identity check cannot be fooled by a recycled id), so a
    caller who assigns ``timesteps`` directly gets a fresh table."""

    def __init__(self, timesteps):
        self.timesteps, self.version = timesteps, _version(timesteps)
        self.tables: dict = {}
        self.coefficients = None

    def valid_for(self, timesteps) -> bool:
        return self.timesteps is timesteps and self.version == _version(timesteps)


def _version(t):
    return t._version if torch.is_tensor(t) and not t.is_inference() else None


class _Scheduler:
    kind = ""

    def _host_table(self) -> tuple[torch.Tensor, list[bool]]:
        raise NotImplementedError

    def step_table(self, device=None, dtype: torch.dtype = torch.float32) -> StepTable:
        """The K steps of the current schedule as a ``StepTable`` on ``device`` (computed once per
        schedule and device, then reused: building it is the only host work of a fused loop)."""
        if dtype != torch.float32:
            raise ValueError(f"step_table: dtype {dtype} is not supported (the table is fp32 by design)")
        if self.timesteps is None or len(self.timesteps) == 0:
            raise ValueError(f"{type(self).__name__} has no timesteps: call set_timesteps(K) first")
        cache = self._cache()
        device = torch.device("cpu" if device is None else device)
        table = cache.tables.get(device)
        if table is None:
            coef, draws = self._host_table()
            head_t = torch.as_tensor(self.timesteps).detach().float().cpu()
            table = cache.tables[device] = StepTable(fold_step_columns(coef).to(device), head_t.to(device),
                                                     tuple(draws), tuple(head_t.tolist()))
        return table

    def _cache(self) -> _TableCache:
        cache = self.__dict__.get("_tables")
        if cache is None or not cache.valid_for(self.timesteps):
            cache = self._tables = _TableCache(self.timesteps)
        return cache

    def _schedule_changed(self) -> None:
        self.__dict__.pop("_tables", None)

    def clone(self):
        return copy.deepcopy(self)


def _refuse_unknown(cls_name: str, config: dict, known: tuple) -> dict:
    """The config's known fields; fields starting with "_" are metadata. Others are ignored by the
    official classes too (diffusers drops unexpected config keys), so they are ignored here with a
    warning naming them."""
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{cls_name}: config fields {unknown} are not read by the official scheduler either; ignored",
                      stacklevel=3)
    return {k: config[k] for k in known if k in config and config[k] is not None}


def _shift(sigma, s: float):
    """Timestep shift: s * sigma / (1 + (s - 1) * sigma)."""
    return s * sigma / (1 + (s - 1) * sigma)


class FlowMatchEulerScheduler(_Scheduler):
    """x_t = (1 - sigma) x0 + sigma * noise; the head predicts v = noise - x0.

    ``set_timesteps(K)``: sigmas = shift_s(linspace(sigma_max, sigma_min, K)) + [0], where the ends
    are the images of 1 and 1/N under the configured shift and s is the current shift (the config's,
    or the caller's ``flow_shift`` via ``set_shift``); fp32 arithmetic as the official scheduler
    (the linspace is rounded to fp32 before the division by N and the shift). Step:
    x + (sigma_{i+1} - sigma_i) * v. Timesteps fed to the head: sigma_i * N. No randomness.

    ``use_dynamic_shifting=True`` is refused: the official scheduler then needs a ``mu`` per
    ``set_timesteps`` call, which NOVA's generation never passes (it fails there)."""

    kind = "flow"
    CONFIG_FIELDS = ("num_train_timesteps", "shift", "use_dynamic_shifting")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False):
        if use_dynamic_shifting:
            raise ValueError("FlowMatchEulerScheduler: use_dynamic_shifting=True is not supported (the official "
                             "scheduler then needs mu= in set_timesteps, which NOVA's generation never passes)")
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
        return cls(**_refuse_unknown(cls.__name__, config, cls.CONFIG_FIELDS))

    def set_shift(self, shift: float) -> None:
        self.shift = float(shift)
        self._schedule_changed()

    def set_timesteps(self, num_steps: int) -> None:
        N = self.num_train_timesteps
        base = np.linspace(self.sigma_max * N, self.sigma_min * N, num_steps).astype(np.float32)
        sig = _shift(torch.from_numpy(base) / N, self.shift)  # fp32
        self.sigmas = torch.cat([sig, torch.zeros(1, device="cpu")])
        self.timesteps = sig * N
        self._schedule_changed()

    def step_sizes(self) -> torch.Tensor:
        """(K,) fp32: sigma_{i+1} - sigma_i, the Euler step of each denoising step."""
        return self.sigmas[1:] - self.sigmas[:-1]

    def _host_table(self):
        dt = self.step_sizes()
        coef = torch.zeros(len(dt), STEP_TABLE_COLUMNS, dtype=torch.float32)
        coef[:, 1] = coef[:, 2] = coef[:, 4] = 1.0  # x0 := v
        coef[:, 3] = dt                             # x_new = dt * v + x
        return coef, [False] * len(dt)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dt = self.step_sizes()[step_index]
        return (sample.float() + dt.to(sample.device) * model_output.float()).to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (1 - sigma) * x0 + sigma * noise


def _alpha_bar_betas(n: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32, device="cpu")


def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32, device="cpu")
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32, device="cpu") ** 2
    if schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, device="cpu")) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta_schedule {schedule!r} (linear, scaled_linear, squaredcos_cap_v2, sigmoid)")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha_bar is exactly 0 (Lin et al. 2023): sqrt(alpha_bar) shifted so its last
    value is 0 and scaled so its first value is unchanged."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# variance_type -> how the step's noise scale comes from the clamped posterior variance and beta_t
_NOISE_SCALES = {
    "fixed_small": lambda var, beta: var.sqrt(),
    "fixed_small_log": lambda var, beta: torch.exp(0.5 * var.log()),
    "fixed_large": lambda var, beta: beta.sqrt(),
}
_REFUSED_VARIANCES = {
    "fixed_large_log": "the official step takes the square root of log(beta_t) < 0, which is NaN",
    "learned": "the diffusion head predicts no variance channels",
    "learned_range": "the diffusion head predicts no variance channels",
}


class DDPMScheduler(_Scheduler):
    """DDPM ancestral sampling (Ho et al. eq. 7), as the official NOVA DDPMScheduler's ``step``.

    Step at t with prev = t - N // K: predicted x0 from the head's output (epsilon, sample or
    v_prediction); mean = c0 * x0 + ct * x_t with c0 = sqrt(a_prev) beta_t / (1 - a_t),
    ct = sqrt(alpha_t) (1 - a_prev) / (1 - a_t); for t > 0 add std * randn(sample shape) from the
    caller's generator, std from var = (1 - a_prev) / (1 - a_t) * beta_t clamped at 1e-20:
    sqrt(var) (fixed_small), exp(log(var) / 2) (fixed_small_log), sqrt(beta_t) (fixed_large).
    a = alphas_cumprod, a_prev = 1 when prev < 0.

    Fields as in the official class (defaults included: ``beta_schedule="linear"``,
    ``clip_sample=True``). The official ``step`` never clips or thresholds the predicted x0, so
    ``clip_sample``, ``clip_sample_range``, ``thresholding``, ``dynamic_thresholding_ratio`` and
    ``sample_max_value`` are kept (readable) but change nothing, exactly as there. Refused:
    ``variance_type`` fixed_large_log / learned / learned_range (see ``_REFUSED_VARIANCES``)."""

    kind = "ddpm"
    CONFIG_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "variance_type", "clip_sample", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                     "clip_sample_range", "sample_max_value", "timestep_spacing", "steps_offset",
                     "rescale_betas_zero_snr")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon, sample, v_prediction)")
        if variance_type in _REFUSED_VARIANCES:
            raise ValueError(f"unsupported variance_type {variance_type!r}: {_REFUSED_VARIANCES[variance_type]}")
        if variance_type not in _NOISE_SCALES:
            raise ValueError(f"unknown variance_type {variance_type!r} ({', '.join(_NOISE_SCALES)})")
        if timestep_spacing not in ("leading", "linspace", "trailing"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r} (leading, linspace, trailing)")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type, self.variance_type = prediction_type, variance_type
        self.timestep_spacing, self.steps_offset = timestep_spacing, int(steps_offset)
        # read by nothing, as in the official step (see the class docstring)
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self.thresholding, self.dynamic_thresholding_ratio = bool(thresholding), float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        if trained_betas is not None:
            self.betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32, device="cpu").reshape(-1)
            if len(self.betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.betas)} entries but num_train_timesteps is "
                                 f"{self.num_train_timesteps}")
        else:
            self.betas = _betas(beta_schedule, self.num_train_timesteps, beta_start, beta_end)
        if self.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self.timesteps = torch.zeros(0, dtype=torch.int64, device="cpu")

    @classmethod
    def from_config(cls, config: dict) -> "DDPMScheduler":
        return cls(**_refuse_unknown(cls.__name__, config, cls.CONFIG_FIELDS))

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
        self._schedule_changed()

    def previous_timestep(self, t: int) -> int:
        return int(t) - self.num_train_timesteps // self.num_inference_steps

    def coefficients(self) -> dict:
        """Every step's fp32 scalars at once, each a (K,) tensor: t, a_t, a_prev, beta_t (current),
        x0 = (x0_x * x + x0_out * out) / x0_div, c0, ct, noise_std (0 where t = 0: no draw).
        Computed once per schedule (``step`` reads one entry per call)."""
        cache = self._cache()
        if cache.coefficients is None:
            cache.coefficients = self._compute_coefficients()
        return cache.coefficients

    def _compute_coefficients(self) -> dict:
        t = self.timesteps.long()
        prev = t - self.num_train_timesteps // self.num_inference_steps
        ac = self.alphas_cumprod
        a_t = ac[t]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones((), dtype=ac.dtype))
        beta_t = 1 - a_t / a_prev
        one, zero = torch.ones_like(a_t), torch.zeros_like(a_t)
        x0_x, x0_out, x0_div = {
            "epsilon": (one, -(1 - a_t).sqrt(), a_t.sqrt()),
            "v_prediction": (a_t.sqrt(), -(1 - a_t).sqrt(), one),
            "sample": (zero, one, one),
        }[self.prediction_type]
        variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        std = _NOISE_SCALES[self.variance_type](variance, beta_t)
        return {"t": t, "a_t": a_t, "a_prev": a_prev, "beta_t": beta_t, "x0_x": x0_x, "x0_out": x0_out,
                "x0_div": x0_div, "c0": a_prev.sqrt() * beta_t / (1 - a_t),
                "ct": (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t), "noise_std": torch.where(t > 0, std, zero)}

    def _host_table(self):
        c = self.coefficients()
        columns = ("x0_x", "x0_out", "x0_div", "c0", "ct", "noise_std")
        coef = torch.zeros(len(c["t"]), STEP_TABLE_COLUMNS, dtype=torch.float32)
        coef[:, :6] = torch.stack([c[k] for k in columns], dim=1)
        return coef, (c["t"] > 0).tolist()

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        c = {k: v[step_index] for k, v in self.coefficients().items()}  # the step table's row, named
        dev = sample.device
        x = sample.float()
        x0 = (c["x0_x"].to(dev) * x + c["x0_out"].to(dev) * model_output.float()) / c["x0_div"].to(dev)
        prev = c["c0"].to(dev) * x0 + c["ct"].to(dev) * x
        if c["t"] > 0:  # one canvas-shaped draw from the caller's generator, in the sample's dtype
            noise = torch.randn(sample.shape, generator=generator, device=dev, dtype=sample.dtype)
            prev = prev + c["noise_std"].to(dev) * noise.float()
        return prev.to(sample.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t.long()]
        while a.dim() < x0.dim():
            a = a.unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


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
