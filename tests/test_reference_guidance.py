"""Guidance combine, renorm, truncation and third passes against numbers written out by hand."""
import math

import pytest
import torch

from nova_fast.reference import Guidance, apply_guidance


def _stack(*rows):
    return torch.tensor([[list(r)] for r in rows])  # each pass: B = 1 sample of shape (1, len)


def test_passes():
    assert Guidance(1.0, image_guidance_scale=2.0).passes == 1  # no guidance at all when scale <= 1
    assert Guidance(5.0).passes == 2
    assert Guidance(5.0, image_guidance_scale=1.5).passes == 3
    assert Guidance(5.0, spatiotemporal_guidance_scale=1.5).third_pass == "spatiotemporal"
    with pytest.raises(ValueError):
        Guidance(5.0, image_guidance_scale=1.0, spatiotemporal_guidance_scale=1.0)


def test_plain_cfg_by_hand():
    pred = _stack((1.0, 2.0), (0.5, -1.0))  # cond, uncond
    got = apply_guidance(pred, Guidance(3.0))
    # u + 3 (c - u) = (0.5 + 1.5, -1 + 9)
    torch.testing.assert_close(got, torch.tensor([[[2.0, 8.0]]]))
    assert torch.equal(apply_guidance(pred[:1], Guidance(1.0)), pred[:1])


def test_renorm_by_hand():
    pred = _stack((3.0, 4.0), (0.0, 0.0))  # ||c|| = 5, g = 2c = (6, 8), ||g|| = 10, ratio 0.5
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, guidance_renorm=0.8)), torch.tensor([[[4.8, 6.4]]]))
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, guidance_renorm=0.3)), torch.tensor([[[3.0, 4.0]]]))
    # g = u + 1.5 (c - u) = (1.5, 2) is shorter than c: the ratio 2 is clamped to 1
    pred = _stack((3.0, 4.0), (6.0, 8.0))
    torch.testing.assert_close(apply_guidance(pred, Guidance(1.5, guidance_renorm=0.5)), torch.tensor([[[1.5, 2.0]]]))


def test_renorm_is_per_sample_over_all_elements():
    c = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]])  # ||c_0|| = 5, ||c_1|| = 1
    u = torch.zeros_like(c)
    got = apply_guidance(torch.cat([c, u]), Guidance(4.0, guidance_renorm=0.1))  # g = 4c, ratio 1/4 each
    torch.testing.assert_close(got, c)


def test_image_guidance_by_hand():
    pred = _stack((1.0,), (0.0,), (0.5,))  # cond, uncond, image-cond
    # u + s (c - i) + si (i - u) = 0 + 2 * 0.5 + 3 * 0.5
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, image_guidance_scale=3.0)), torch.tensor([[[2.5]]]))
    # renorm applies before the image term: g = 1.0, ||c|| = 1 -> unchanged; then + 1.5
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, guidance_renorm=0.5, image_guidance_scale=3.0)),
                               torch.tensor([[[2.5]]]))
    pred = _stack((1.0,), (0.0,), (-1.0,))  # g = 2 * 2 = 4, ratio 1/4 -> clamp 0.5 -> 2; then + 3 * (-1)
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, guidance_renorm=0.5, image_guidance_scale=3.0)),
                               torch.tensor([[[-1.0]]]))


def test_spatiotemporal_guidance_by_hand():
    pred = _stack((1.0,), (0.0,), (0.25,))  # cond, uncond, perturbed
    # u + s (c - u) + st (c - p) = 2 + 4 * 0.75
    torch.testing.assert_close(apply_guidance(pred, Guidance(2.0, spatiotemporal_guidance_scale=4.0)),
                               torch.tensor([[[5.0]]]))


def test_truncation_rule():
    g = Guidance(5.0, guidance_trunc=500.0)
    assert not g.truncated(900.0) and not g.truncated(500.0) and g.truncated(499.9)
    assert not Guidance(5.0).truncated(0.0)
    assert not Guidance(1.0, guidance_trunc=500.0).truncated(10.0)
    pred = torch.tensor([[[1.0, 2.0]]])
    assert torch.equal(apply_guidance(pred, g, truncated=True), pred)


def test_math_in_fp32_result_in_input_dtype():
    pred = _stack((1.0, 2.0), (0.5, -1.0)).to(torch.bfloat16)
    out = apply_guidance(pred, Guidance(3.0, guidance_renorm=0.9))
    assert out.dtype == torch.bfloat16
    g = torch.tensor([2.0, 8.0])
    want = g * max(min(math.sqrt(5.0) / g.norm().item(), 1.0), 0.9)
    torch.testing.assert_close(out.float().flatten(), want, rtol=1e-2, atol=1e-2)


def test_scale_ramp_by_hand():
    """min_guidance_scale: the scale of AR step i of S rises linearly to guidance_scale at the last."""
    g = Guidance(5.0, min_guidance_scale=2.0)
    assert [g.at_ar_step(i, 4).guidance_scale for i in range(4)] == [2.75, 3.5, 4.25, 5.0]
    assert g.at_ar_step(0, 4).passes == g.passes == 2
    assert Guidance(5.0).at_ar_step(0, 4).guidance_scale == 5.0  # no ramp
    assert Guidance(5.0, min_guidance_scale=0).at_ar_step(0, 4).guidance_scale == 5.0  # 0: no ramp either
    with pytest.raises(ValueError, match="min_guidance_scale"):
        Guidance(5.0, min_guidance_scale=0.5)
