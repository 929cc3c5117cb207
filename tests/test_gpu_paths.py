"""Paths only a GPU runs: the CUDA extension on CUDA tensors, the compiled Triton kernels at their
production tiles in bf16 (the interpreter's bf16 tl.dot is wrong with triton 3.9, so no CPU test
covers it), the flash-attn dense path where installed, and the accelerated generation with its
CUDA-graph captured denoising loop against the reference.

Every test here is marked ``gpu`` and skips without one; ``bench/gpu_check.sh`` runs them (with the
``triton`` tests, which run compiled on a GPU) on the first GPU machine lent.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import nova_fast
from conftest import HAS_GPU, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]


def _extension_or_fail():
    from nova_fast import backends

    ok, why = backends.extension_status()
    assert ok, f"nova_fast._C must be built on a GPU machine (bench/gpu_check.sh builds it): {why}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_adaln_ops_on_gpu_match_eager(backend, dtype):
    if backend == "cuda":
        _extension_or_fail()
    gen = torch.Generator("cuda").manual_seed(0)
    B, L, D = 2, 1800, 1024          # the osp480 spatial encoder's rows
    x = torch.randn(B, L, D, device="cuda", dtype=dtype, generator=gen)
    y = torch.randn(B, L, D, device="cuda", dtype=dtype, generator=gen)
    stats = 0.5 * torch.randn(B, 1, 3 * D, device="cuda", dtype=dtype, generator=gen)
    scale, shift, gate = stats.chunk(3, -1)    # strided chunks of one projection, as in NOVA
    weight = 1 + 0.5 * torch.randn(D, device="cuda", dtype=dtype, generator=gen)
    bias = 0.5 * torch.randn(D, device="cuda", dtype=dtype, generator=gen)
    xf, yf = x.float(), y.float()
    want_mod = F.layer_norm(xf, (D,), eps=1e-6) * (1 + scale.float()) + shift.float()
    want_res = xf + gate.float() * F.layer_norm(yf, (D,), weight.float(), bias.float(), 1e-5)
    with nova_fast.use_backend(backend), torch.no_grad():
        got_mod = nova_fast.modulate(x, scale, shift)
        got_res = nova_fast.residual_norm(x, y, weight, bias, gate=gate)
    used = nova_fast.backend_info()["last_used"]
    assert used["modulate"]["backend"] == backend and used["residual_norm"]["backend"] == backend
    assert_close(got_mod, want_mod, dtype, f"modulate {backend}")
    assert_close(got_res, want_res, dtype, f"residual_norm {backend}")


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_attention_production_tiles_forward_and_backward(dtype, deterministic):
    """The random-set spatial mask at the production tiles (no test tile override), bf16 included
    (the interpreter cannot run bf16 dots), with either Triton backward."""
    from nova_fast.ops.group_causal_attention import random_set_groups

    gen = torch.Generator("cuda").manual_seed(1)
    B, H, N, D = 2, 4, 520, 64          # 8 sets of 65: the last tiles are partial
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    groups = random_set_groups(N, [65] * 8, torch.Generator().manual_seed(2)).cuda()
    grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with nova_fast.use_backend(backend):
            out = nova_fast.group_causal_attention(*leaves, groups, deterministic=deterministic)
            grads = torch.autograd.grad(out, leaves, grad)
        used = nova_fast.backend_info()["last_used"]["group_causal_attention"]
        assert used["backend"] == backend
        if backend == "triton":
            assert used["backward_path"].startswith("triton deterministic" if deterministic else "triton atomic")
        results[backend] = (out, *grads)
    out, want_out = results["triton"][0], results["torch"][0]
    assert_close(out, want_out.float(), dtype, f"triton out {dtype}")
    for name, got, want in zip(("dq", "dk", "dv"), results["triton"][1:], results["torch"][1:]):
        # gradients sum over many keys / queries in 16-bit: compared relative to their largest entry
        assert torch.isfinite(got).all(), name
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert err < 2e-2, f"triton {name} {dtype}: max error {err:.2e} of the largest gradient"


def test_dense_attention_takes_flash_attn_where_installed():
    pytest.importorskip("flash_attn", reason="flash-attn is an optional GPU extra, not installed here")
    gen = torch.Generator("cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 16, 300, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = nova_fast.group_causal_attention(q, k, v, None)
    assert "flash-attn" in nova_fast.backend_info()["last_used"]["group_causal_attention"]["why"]
    assert_close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), torch.bfloat16, "flash")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_accelerated_generation_with_captured_loop_matches_reference(backend):
    """Whole generation on the GPU: every op on ``backend``, the denoising loop replayed from CUDA
    graphs; same seed, same result as the reference. fp32, but the Triton GEMMs round through TF32
    and the differences compound over the denoising steps: hence 1e-2, not the op tests' 1e-5."""
    from nova_fast.reference import NOVAConfig, build_model, random_text_states

    if backend == "cuda":
        _extension_or_fail()
    torch.manual_seed(0)
    model = build_model(NOVAConfig.preset("tiny")).eval().cuda()
    text = random_text_states(model.config, 1, torch.Generator().manual_seed(1)).cuda()

    def generate(m):
        with torch.inference_mode():
            return m.generate_video(text, num_latent_frames=2, num_ar_steps=3, num_diffusion_steps=4,
                                    generator=torch.Generator("cuda").manual_seed(4))

    want = generate(model)
    fast = nova_fast.accelerate(copy.deepcopy(model), backend=backend, cuda_graphs=True)
    got = generate(fast)
    again = generate(fast)                # the second run replays the captured loops
    for name, out in (("first", got), ("replay", again)):
        assert torch.isfinite(out).all(), name
        err = ((out.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err < 1e-2, f"{backend} {name}: max relative error {err:.2e}"
