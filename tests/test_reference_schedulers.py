"""Schedulers against small cases computed by hand (plain Python floats) from the formulas of
docs/nova.md, field by field as the official NOVA schedulers treat them, and their step tables
against their own ``step``."""
import math
import warnings

import pytest
import torch

from nova_fast.reference import DDPMScheduler, FlowMatchEulerScheduler, scheduler_from_config
from nova_fast.reference.schedulers import STEP_TABLE_COLUMNS


def _linear_ddpm(**kw):
    # 10 training steps, betas 0.1 .. 0.2: small enough to write every number out
    return DDPMScheduler(num_train_timesteps=10, beta_start=0.1, beta_end=0.2, beta_schedule="linear", **kw)


def _alpha_bar(t):
    betas = [0.1 + i * (0.1 / 9) for i in range(10)]
    return math.prod(1 - b for b in betas[: t + 1])


def test_ddpm_tables():
    s = _linear_ddpm()
    assert s.betas.dtype == s.alphas.dtype == s.alphas_cumprod.dtype == torch.float32
    assert s.alphas_cumprod[3].item() == pytest.approx(0.9 * (1 - 0.1 - 0.1 / 9) * (1 - 0.1 - 0.2 / 9) * (1 - 0.1 - 0.3 / 9),
                                                      rel=1e-6)
    cos = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.betas[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-5)
    assert cos.betas[-1].item() == pytest.approx(0.999)  # capped
    sl = DDPMScheduler(num_train_timesteps=4, beta_start=0.01, beta_end=0.04, beta_schedule="scaled_linear")
    assert sl.betas[-1].item() == pytest.approx(0.04) and sl.betas[1].item() == pytest.approx((0.1 + 0.1 / 3) ** 2)


@pytest.mark.parametrize("spacing,offset,want", [("leading", 0, [8, 6, 4, 2, 0]), ("leading", 1, [9, 7, 5, 3, 1]),
                                                 ("trailing", 0, [9, 7, 5, 3, 1])])
def test_ddpm_timesteps_k5(spacing, offset, want):
    s = _linear_ddpm(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(5)
    assert s.timesteps.tolist() == want


def test_ddpm_timesteps_k3():
    s = _linear_ddpm(timestep_spacing="trailing")
    s.set_timesteps(3)
    assert s.timesteps.tolist() == [9, 6, 2]  # round(10, 6.67, 3.33) - 1
    s = _linear_ddpm(timestep_spacing="linspace")
    s.set_timesteps(3)
    assert s.timesteps.tolist() == [9, 4, 0]  # round(9, 4.5 -> 4 half-to-even, 0)
    s = DDPMScheduler()
    s.set_timesteps(25)
    assert s.timesteps[:3].tolist() == [960, 920, 880] and s.timesteps[-1].item() == 0


def _hand_step(pred_type, variance_type, out, x, t, prev, noise):
    a_t = _alpha_bar(t)
    a_p = _alpha_bar(prev) if prev >= 0 else 1.0
    beta = 1 - a_t / a_p
    if pred_type == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    elif pred_type == "v_prediction":
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
    else:
        x0 = out
    mean = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * x
    if t == 0:
        return mean
    var = max((1 - a_p) / (1 - a_t) * beta, 1e-20) if variance_type == "fixed_small" else beta
    return mean + math.sqrt(var) * noise


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_by_hand(pred_type, variance_type):
    s = _linear_ddpm(prediction_type=pred_type, variance_type=variance_type)
    s.set_timesteps(5)  # 8, 6, 4, 2, 0
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    out = torch.tensor([[0.1, 0.3], [-0.7, 1.5]])
    for i, t in enumerate([8, 6, 4, 2, 0]):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if t > 0 else torch.zeros_like(x)
        got = s.step(out, i, x, generator=torch.Generator().manual_seed(i))
        want = [[_hand_step(pred_type, variance_type, o, xx, t, t - 2, n) for o, xx, n in zip(ro, rx, rn)]
                for ro, rx, rn in zip(out.tolist(), x.tolist(), noise.tolist())]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_ddpm_draws_noise_only_for_t_positive():
    s = _linear_ddpm()
    s.set_timesteps(5)
    x = torch.ones(2, 3)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    s.step(torch.zeros_like(x), 4, x, generator=g)  # t = 0: no draw
    assert torch.equal(g.get_state(), before)
    s.step(torch.zeros_like(x), 3, x, generator=g)  # t = 2: one canvas-shaped draw
    ref = torch.Generator().manual_seed(0)
    torch.randn(x.shape, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_flow_sigmas_by_hand():
    shift_fn = lambda s, sh: sh * s / (1 + (sh - 1) * s)  # noqa: E731
    s = FlowMatchEulerScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(3)
    hi, lo = shift_fn(1.0, 3.0), shift_fn(1 / 1000, 3.0)
    want = [shift_fn(v, 3.0) for v in (hi, (hi + lo) / 2, lo)] + [0.0]
    torch.testing.assert_close(s.sigmas, torch.tensor(want), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.timesteps, torch.tensor(want[:3]) * 1000, rtol=1e-6, atol=1e-4)
    # the caller's shift changes the second shift only; the ends keep the configured shift
    s.set_shift(2.0)
    s.set_timesteps(3)
    want2 = [shift_fn(v, 2.0) for v in (hi, (hi + lo) / 2, lo)] + [0.0]
    torch.testing.assert_close(s.sigmas, torch.tensor(want2), rtol=1e-6, atol=1e-7)


def test_flow_step_by_hand():
    s = FlowMatchEulerScheduler(shift=1.0)
    s.set_timesteps(4)  # sigmas 1, 0.667, 0.334, 0.001, 0
    x, v = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    sig = s.sigmas.tolist()
    for i in range(4):
        want = [xx + (sig[i + 1] - sig[i]) * vv for xx, vv in zip(x.tolist(), v.tolist())]
        torch.testing.assert_close(s.step(v, i, x), torch.tensor(want))
    assert s.step(v.to(torch.bfloat16), 0, x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_from_config():
    f = scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 2.5})
    assert isinstance(f, FlowMatchEulerScheduler) and f.shift == 2.5
    d = scheduler_from_config({"_class_name": "DDPMScheduler", "beta_schedule": "linear",
                               "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 1})
    assert isinstance(d, DDPMScheduler) and d.prediction_type == "v_prediction" and d.beta_schedule == "linear"
    assert d.timestep_spacing == "trailing" and d.steps_offset == 1 and d.variance_type == "fixed_small"
    # a field the config leaves out gets the official class default
    dflt = scheduler_from_config({"_class_name": "DDPMScheduler", "_diffusers_version": "0.31.0"})
    assert dflt.beta_schedule == "linear" and dflt.clip_sample is True and not dflt.rescale_betas_zero_snr
    with pytest.raises(ValueError, match="variance_type 'learned'"):
        scheduler_from_config({"_class_name": "DDPMScheduler", "variance_type": "learned"})


# ---------------------------------------------------------------- every field of the official configs
def test_clip_sample_and_thresholding_change_nothing_as_in_the_official_step():
    """The official DDPM step never clips or thresholds the predicted x0 (clip_sample defaults to
    True there, so a config without the field has it on): outputs far outside the clip range must
    pass through unclipped."""
    plain = _linear_ddpm(clip_sample=False)
    clipped = _linear_ddpm(clip_sample=True, clip_sample_range=0.5, thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=0.5)
    x, out = torch.tensor([[3.0, -4.0], [0.2, 9.0]]), torch.tensor([[-5.0, 2.0], [7.0, -8.0]])
    for s in (plain, clipped):
        s.set_timesteps(5)
    for i, t in enumerate([8, 6, 4, 2, 0]):
        want = [[_hand_step("epsilon", "fixed_small", o, xx, t, t - 2, 0.0) for o, xx in zip(ro, rx)]
                for ro, rx in zip(out.tolist(), x.tolist())]
        got = clipped.step(out, i, x, generator=torch.Generator().manual_seed(i))
        assert torch.equal(got, plain.step(out, i, x, generator=torch.Generator().manual_seed(i)))
        if t == 0:  # no noise: the unclipped mean by hand (its x0 is far outside [-0.5, 0.5])
            torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert clipped.clip_sample and clipped.thresholding  # kept, readable, without effect


def test_fixed_small_log_is_the_square_root_through_log():
    small, log = _linear_ddpm(), _linear_ddpm(variance_type="fixed_small_log")
    for s in (small, log):
        s.set_timesteps(5)
    a_t, a_p = _alpha_bar(6), _alpha_bar(4)
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert log.coefficients()["noise_std"][1].item() == pytest.approx(math.exp(0.5 * math.log(var)), rel=1e-6)
    torch.testing.assert_close(log.coefficients()["noise_std"], small.coefficients()["noise_std"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("variance_type,why", [("fixed_large_log", "NaN"), ("learned", "no variance"),
                                                ("learned_range", "no variance"), ("other", "unknown")])
def test_refused_variance_types_name_the_field(variance_type, why):
    with pytest.raises(ValueError, match=f"variance_type '{variance_type}'.*{why}|{why} variance_type"):
        DDPMScheduler(variance_type=variance_type)


@pytest.mark.parametrize("field,value", [("prediction_type", "flow"), ("timestep_spacing", "karras"),
                                         ("beta_schedule", "cosine")])
def test_unknown_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DDPMScheduler(**{field: value})


def test_sigmoid_betas_by_hand():
    s = DDPMScheduler(num_train_timesteps=5, beta_start=0.1, beta_end=0.3, beta_schedule="sigmoid")
    want = [1 / (1 + math.exp(-v)) * 0.2 + 0.1 for v in (-6, -3, 0, 3, 6)]
    torch.testing.assert_close(s.betas, torch.tensor(want), rtol=1e-6, atol=1e-7)


def test_trained_betas_replace_the_schedule():
    betas = [0.05, 0.1, 0.2, 0.3]
    s = DDPMScheduler(num_train_timesteps=4, trained_betas=betas, beta_schedule="squaredcos_cap_v2")
    assert s.betas.tolist() == pytest.approx(betas)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.95 * 0.9 * 0.8 * 0.7, rel=1e-6)
    with pytest.raises(ValueError, match="trained_betas"):
        DDPMScheduler(num_train_timesteps=5, trained_betas=betas)


def test_rescale_betas_zero_snr_by_hand():
    s = _linear_ddpm(rescale_betas_zero_snr=True)
    roots = [math.sqrt(_alpha_bar(t)) for t in range(10)]
    first, last = roots[0], roots[-1]
    want = [((r - last) * first / (first - last)) ** 2 for r in roots]
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(want), rtol=1e-5, atol=1e-7)
    assert s.alphas_cumprod[-1].item() == 0.0  # zero terminal SNR


def test_flow_use_dynamic_shifting_is_refused_by_name():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    assert scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                  "use_dynamic_shifting": False}).shift == 1.0


def test_flow_schedule_rounds_like_the_official_fp32_arithmetic():
    """The official schedule rounds linspace(sigma_max N, sigma_min N) to fp32, divides by N and
    shifts in fp32; a float64 schedule differs in the last bits."""
    import numpy as np

    s = FlowMatchEulerScheduler(shift=3.0)
    s.set_shift(2.0)
    s.set_timesteps(7)
    t = np.linspace(s.sigma_max * 1000, s.sigma_min * 1000, 7, dtype="float32") / np.float32(1000)
    want = np.float32(2.0) * t / (np.float32(1.0) + np.float32(1.0) * t)
    assert s.sigmas[:-1].numpy().tobytes() == want.astype(np.float32).tobytes()


def test_unexpected_config_fields_are_named_in_a_warning():
    with pytest.warns(UserWarning, match="base_shift"):
        scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "base_shift": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler_from_config({"_class_name": "DDPMScheduler", "_diffusers_version": "0.31.0"})


# ---------------------------------------------------------------- step tables
DDPM_OPTIONS = [
    dict(),
    dict(prediction_type="v_prediction", variance_type="fixed_large"),
    dict(prediction_type="sample", variance_type="fixed_small_log"),
    dict(timestep_spacing="linspace"), dict(timestep_spacing="trailing"), dict(steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="scaled_linear"), dict(beta_schedule="sigmoid"),
    dict(rescale_betas_zero_snr=True), dict(clip_sample=True, thresholding=True),
]


def _apply_row(row, out, x, noise):
    """One row of a step table in float64, as a fused kernel applies it."""
    c = row.double()
    x0 = (c[0] * x.double() + c[1] * out.double()) / c[2]
    new = c[3] * x0 + c[4] * x.double()
    return new if noise is None else new + c[5] * noise.double()


@pytest.mark.parametrize("options", DDPM_OPTIONS + ["flow", "flow-shifted"], ids=str)
def test_step_table_reproduces_step(options):
    if options == "flow":
        s = FlowMatchEulerScheduler()
    elif options == "flow-shifted":
        s = FlowMatchEulerScheduler(shift=3.0)
        s.set_shift(5.0)
    else:
        s = DDPMScheduler(**options)
    s.set_timesteps(10)
    table = s.step_table("cpu")
    assert table.coef.shape == (10, STEP_TABLE_COLUMNS) and table.coef.dtype == torch.float32
    assert torch.equal(table.timesteps, torch.as_tensor(s.timesteps).float())
    assert list(table.draws) == [s.kind == "ddpm" and int(t) > 0 for t in s.timesteps]
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    for i in range(10):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if table.draws[i] else None
        want = s.step(out, i, x, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(_apply_row(table.coef[i], out, x, noise).float(), want, rtol=2e-5, atol=2e-5)
        folded = table.coef[i, 6] * x.double() + table.coef[i, 7] * out.double()  # the linear form
        if noise is not None:
            folded = folded + table.coef[i, 5] * noise.double()
        torch.testing.assert_close(folded.float(), want, rtol=1e-4, atol=1e-4)


def test_step_table_is_rebuilt_when_the_schedule_changes():
    s = FlowMatchEulerScheduler(shift=1.0)
    s.set_timesteps(6)
    first = s.step_table("cpu")
    assert s.step_table("cpu") is first  # cached
    s.set_shift(3.0)
    s.set_timesteps(6)
    second = s.step_table("cpu")
    assert torch.equal(second.coef[:, 3], (s.sigmas[1:] - s.sigmas[:-1]))
    assert not torch.equal(first.coef, second.coef)
    d = DDPMScheduler()
    d.set_timesteps(5)
    a = d.step_table("cpu")
    d.timesteps = torch.tensor([900, 700, 500, 300, 100])  # assigned directly: a new table
    assert d.step_table("cpu").timesteps.tolist() == [900, 700, 500, 300, 100] and a.timesteps[0] == 800
