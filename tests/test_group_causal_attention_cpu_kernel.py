"""The torch backend's CPU kernel for group_causal_attention (csrc/cpu/group_causal_attention.cpp).

Parity with the float64 SDPA reference on the rule's dense mask (``reference`` of
test_group_causal_attention), fp32 (the kernel's dtype), fresh random inputs. Shapes are ragged
against the kernel's blocks (64 query rows, 512-key tiles): lengths that are not multiples of
either, key ranges crossing tile edges, per-batch groups, unsorted groups on both sides (the sort
fused into the kernel's loads and stores), KV-cache lengths and rows that see no key. The ATen op
is called on NaN-poisoned out / lse buffers, so an element it does not write fails.
"""
import pytest
import torch

import nova_fast
import nova_fast.ops.group_causal_attention as gca
from conftest import assert_close, poison_like
from nova_fast import backends
from nova_fast.ops.group_causal_attention import frame_groups, group_causal_attention, random_set_groups
from test_group_causal_attention import reference


def _inputs(B, H, Nq, Nk, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=gen) for n in (Nq, Nk, Nk)]


def _call_kernel(q, k, v, q_groups, k_groups, scale):
    """The ATen op on poisoned outputs, with the orders and k_visible the op computes."""
    plan = gca.MaskPlan(q_groups, k_groups)
    q_order, k_order, k_visible = plan.q_order.long(), plan.k_order.long(), plan.k_visible.long()
    out = poison_like(q)
    lse = torch.full(q.shape[:3], float("nan"))
    torch.ops.nova_fast_cpu.group_causal_attention_out(q, k, v, q_order, k_order, k_visible, scale, out, lse)
    return out, lse


CASES = {
    # name: (B, H, Nq, Nk, q_groups, k_groups)
    "random sets + prefix, 700 tokens": lambda g: (1, 2, 700, 700, random_set_groups(
        600, 37, g, prefix_len=100), None),
    "frames, 3 x 201 + 7": lambda g: (2, 1, 610, 610, frame_groups(3, 201, 7), None),
    "one group (dense), 577": lambda g: (1, 1, 577, 577, torch.zeros(577, dtype=torch.int32), None),
    "own group each (causal), 130": lambda g: (1, 2, 130, 130, torch.randperm(130, generator=g).int(), None),
    "kv cache 70 over 1100, unsorted, empty rows": lambda g: (
        1, 2, 70, 1100, torch.randint(-1, 4, (70,), generator=g).int(), torch.randint(0, 4, (1100,), generator=g).int()),
    # rows 0-99 see no key: the first 64-row block sees none at all, the second is half blind
    "whole blind block": lambda g: (1, 2, 130, 200, torch.cat([torch.full((100,), -1), torch.zeros(30)]).int()[
        torch.randperm(130, generator=g)], torch.zeros(200, dtype=torch.int32)),
    "per-batch groups": lambda g: (2, 2, 150, 150, torch.stack([random_set_groups(150, 9, g),
                                                                torch.randint(-1, 3, (150,), generator=g).int()]), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_parity_on_poisoned_outputs(cpu_kernels_built, name):
    B, H, Nq, Nk, qg, kg = CASES[name](torch.Generator().manual_seed(len(name)))
    kg = qg if kg is None else kg
    q, k, v = _inputs(B, H, Nq, Nk, 64, seed=Nq)
    scale = 64 ** -0.5
    out, lse = _call_kernel(q, k, v, qg, kg, scale)
    assert_close(out, reference(q, k, v, qg, kg, scale), torch.float32, f"{name}: out")
    # lse: natural-log log-sum-exp of the visible scaled scores; +inf where a row sees no key
    qgb, kgb = qg.expand(B, -1) if qg.dim() == 1 else qg, kg.expand(B, -1) if kg.dim() == 1 else kg
    visible = (kgb[:, None, :] <= qgb[:, :, None])[:, None]
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    expected = torch.logsumexp(scores, -1).float()
    blind = ~visible.any(-1).expand_as(expected)
    assert not torch.isnan(lse).any(), f"{name}: lse left unwritten"
    assert (lse[blind] == float("inf")).all()
    assert_close(lse[~blind], expected[~blind], torch.float32, f"{name}: lse")


@pytest.mark.parametrize("D", [64, 128])
def test_public_op_runs_the_kernel_on_strided_unsorted_inputs(cpu_kernels_built, D):
    """Inference through nova_fast.group_causal_attention: q, k, v are strided views of a fused
    (B, N, 3, H, D) projection and the groups are random sets, read in place (no permuted copies)."""
    gen = torch.Generator().manual_seed(D)
    qkv = torch.randn(2, 530, 3, 3, D, generator=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    g = random_set_groups(500, 23, gen, prefix_len=30)
    with torch.no_grad(), nova_fast.use_backend("torch", op="group_causal_attention"):
        out = group_causal_attention(q, k, v, g, scale=0.2)
    assert backends._last_used_report()["group_causal_attention"]["path"] == gca.CPU_KERNEL_PATH
    assert_close(out, reference(q, k, v, g, g, 0.2), torch.float32, "out")


def test_training_forward_uses_the_kernel_and_backward_its_lse(cpu_kernels_built):
    """With autograd the op sorts, runs the kernel's forward (out and lse) and the chunked ATen
    backward from that lse: gradients match the reference."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 300, 300, 64, seed=12))
    g = random_set_groups(300, 11, gen)
    out = group_causal_attention(q, k, v, g)
    assert backends._last_used_report()["group_causal_attention"]["path"] == gca.CPU_KERNEL_PATH
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(*ref_leaves, g, g).backward(grad.double())
    for name, leaf, ref_leaf in zip("qkv", (q, k, v), ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_the_kernel_the_chunked_aten_path_runs_and_says_why(cpu_kernel_failure, dtype):
    """A failed kernel build (fp32) or a dtype the kernel does not take (bf16) runs the chunked ATen
    flash path, same results, and backend_info says which path ran and why."""
    q, k, v = (t.to(dtype) for t in _inputs(1, 2, 200, 200, 64, seed=13))
    g = random_set_groups(200, 6, torch.Generator().manual_seed(14))
    with torch.no_grad():
        out = group_causal_attention(q, k, v, g)
    path = backends._last_used_report()["group_causal_attention"]["path"]
    assert path.startswith("ATen flash attention for CPU per query chunk")
    assert ("simulated failure" if dtype == torch.float32 else "fp32 only") in path
    assert_close(out, reference(q, k, v, g, g), dtype, "out")


@pytest.mark.parametrize("bad, match", [
    (dict(k_visible=torch.zeros(1, 40, dtype=torch.int32)), "k_visible must be a contiguous int64"),
    (dict(q_order=torch.zeros(1, 39, dtype=torch.int64)), r"q_order must be a contiguous int64 \(1, 40\)"),
    (dict(out=torch.empty(1, 2, 40, 64, dtype=torch.float64)), "out must be a contiguous fp32"),
    (dict(lse=torch.empty(1, 2, 41)), r"lse must be a contiguous fp32 \(B, H, Nq\)"),
    (dict(q=torch.randn(1, 2, 40, 64).half()), "q, k, v must be fp32"),
])
def test_kernel_rejects_bad_layouts_by_name(cpu_kernels_built, bad, match):
    q, k, v = _inputs(1, 2, 40, 40, 64, seed=15)
    args = dict(q=q, k=k, v=v, q_order=None, k_order=None, k_visible=torch.full((1, 40), 40, dtype=torch.int64),
                scale=0.125, out=torch.empty(1, 2, 40, 64), lse=torch.empty(1, 2, 40))
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nova_fast_cpu.group_causal_attention_out(*args.values())
