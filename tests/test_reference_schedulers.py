"""Schedulers against small cases computed by hand (plain Python floats) from the spec's formulas."""
import math

import pytest
import torch

from nova_fast.reference import DDPMScheduler, FlowMatchEulerScheduler, scheduler_from_config


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
    assert scheduler_from_config({}).beta_schedule == "squaredcos_cap_v2"  # unknown: assume cosine
    with pytest.raises(ValueError):
        scheduler_from_config({"_class_name": "DDPMScheduler", "variance_type": "learned"})
