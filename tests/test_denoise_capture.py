"""What a CUDA graph of the denoising loop relies on, checked on the CPU.

1. The captured body never synchronises with the host: it is run eagerly here under patches that
   record every host-synchronising call (``Tensor.item`` / ``tolist`` / ``cpu`` / ``numpy`` / bool /
   int / float conversions, tensors built from Python data, factory calls without a device, which
   would allocate on the host) made from non-library code. A capture would fail or bake stale
   values in on such a call.
2. A capture is keyed on something that cannot be recycled: a head whose loop weights were rebuilt
   must never replay a graph captured for the previous (freed) weights, even when the new weights
   object happens to get the old one's ``id``.
"""
import sys
from pathlib import Path

import pytest
import torch

from nova_fast import cpu_kernels
from nova_fast.ops import cuda_graph_cache as graphs
from nova_fast.ops import denoise_tokens as op
from nova_fast.reference import DDPMScheduler, DiffusionMLP, FlowMatchEulerScheduler

LIBRARIES = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, pytest))
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
BUILDERS = ("tensor", "as_tensor", "from_numpy")
FACTORIES = ("empty", "zeros", "ones", "full", "arange", "rand", "randn", "linspace")
SCRATCH_FACTORIES = ("empty", "zeros", "ones", "full")  # buffers made to be filled: scratch space


def _ours(frame) -> bool:
    return not str(Path(frame.f_code.co_filename).resolve()).startswith(LIBRARIES)


class HostSyncGuard:
    """Records the host-synchronising calls made from non-library code while active."""

    def __init__(self, monkeypatch, allocations: bool = False):
        """``allocations``: also record empty / zeros / ones / full calls that name a device (a
        buffer allocated inside the captured region, such as a kernel's scratch space per call)."""
        self.calls, self.monkeypatch, self.active, self.allocations = [], monkeypatch, False, allocations

    def _record(self, what):
        frame = sys._getframe(2)
        if self.active and _ours(frame):
            self.calls.append(f"{what} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")

    def install(self):
        for name in SYNCING_METHODS:
            original = getattr(torch.Tensor, name)

            def method(t, *args, _original=original, _name=name, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(t, *args, **kwargs)
            self.monkeypatch.setattr(torch.Tensor, name, method)
        for name in BUILDERS:
            original = getattr(torch, name)

            def build(*args, _original=original, _name=name, **kwargs):
                self._record(f"torch.{_name}")
                return _original(*args, **kwargs)
            self.monkeypatch.setattr(torch, name, build)
        for name in FACTORIES:
            original = getattr(torch, name)

            def factory(*args, _original=original, _name=name, **kwargs):
                if kwargs.get("device") is None:
                    self._record(f"torch.{_name} without device=")
                elif self.allocations and _name in SCRATCH_FACTORIES:
                    self._record(f"torch.{_name} (an allocation)")
                return _original(*args, **kwargs)
            self.monkeypatch.setattr(torch, name, factory)
        return self

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


def _loop_inputs(kind, guide, renorm, trunc_step, n=5, n_pad=8, B=2, K=5, depth=2):
    torch.manual_seed(0)
    head = DiffusionMLP(depth=depth, width=32, cond_dim=24).eval()
    w = op.head_weights(head)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2") if kind == "ddpm" else FlowMatchEulerScheduler()
    scheduler.set_timesteps(K)
    table = scheduler.step_table("cpu")
    P, passes = w.token_dim, op.PASSES[guide]
    plan = op.LoopPlan(K, guide, renorm, trunc_step, n * P, n_pad * P)
    x = torch.randn(1, B * n_pad, P)
    z_rows = torch.randn(passes * B, n_pad, 24)
    step_noise = [torch.randn(1, B * n_pad, P) if d else None for d in table.draws]
    scales = op.guidance_scales([4.0, 1.5, 0.5], "cpu")
    return head, w, plan, (x, z_rows, table.timesteps, table.coef, scales, step_noise)


CASES = [("ddpm", op.GUIDE_CFG, True, 3), ("flow", op.GUIDE_NONE, False, None), ("ddpm", op.GUIDE_IMAGE, True, None),
         ("flow", op.GUIDE_STG, False, 2), ("flow", op.GUIDE_CFG, False, None)]


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu-kernel", "aten"])
@pytest.mark.parametrize("kind,guide,renorm,trunc_step", CASES)
def test_captured_body_never_syncs_with_the_host(monkeypatch, kind, guide, renorm, trunc_step, cpu_kernel):
    if cpu_kernel and not cpu_kernels.available_for(torch.zeros(1)):
        pytest.skip(f"the CPU kernels are not built here: {cpu_kernels.status()[1]}")
    if not cpu_kernel:
        monkeypatch.setattr(cpu_kernels, "available_for", lambda *tensors: False)
    head, w, plan, inputs = _loop_inputs(kind, guide, renorm, trunc_step)
    body = op.loop_body(head, w, plan, "torch", inputs[0])
    with torch.no_grad():
        body(*inputs)  # first call outside the guard (lazy imports, kernel loading), as the warm-up is
    guard = HostSyncGuard(monkeypatch).install()
    with guard, torch.no_grad():
        out = body(*inputs)
    assert out.shape == inputs[0].shape and torch.isfinite(out).all()
    assert guard.calls == [], guard.calls


def test_the_guard_sees_a_sync_inside_the_body(monkeypatch):
    """The guard can fail: an .item() slipped into the loop (here through the head's time embedding)
    is reported."""
    head, w, plan, inputs = _loop_inputs("flow", op.GUIDE_CFG, False, None)
    original = op.time_embedding

    def syncing_time_embedding(head_, timesteps):
        float(timesteps[0].item())
        return original(head_, timesteps)

    monkeypatch.setattr(op, "time_embedding", syncing_time_embedding)
    guard = HostSyncGuard(monkeypatch).install()
    with guard, torch.no_grad():
        op.loop_body(head, w, plan, "torch", inputs[0])(*inputs)
    assert any("Tensor.item" in c for c in guard.calls), guard.calls


LONG_GROUP_TOKENS = 260  # 260 tokens x 16 values > the step kernel's split chunk: renorm needs a workspace


def _long_group_body(monkeypatch, split_chunk=None):
    """The Triton backend's loop body (interpreted here) on renorm groups longer than one chunk, the
    case whose step kernel needs a scratch workspace; ``split_chunk`` shrinks the chunk instead."""
    kernel = pytest.importorskip("nova_fast.kernels.denoise_step")
    if split_chunk is not None:
        monkeypatch.setattr(kernel, "SPLIT_CHUNK", split_chunk)
    n = LONG_GROUP_TOKENS
    head, w, plan, inputs = _loop_inputs("ddpm", op.GUIDE_CFG, True, None, n=n, n_pad=n, B=1, K=2, depth=1)
    assert kernel.workspace_floats(1, plan.group_len, True) > 0, "this case must need the workspace"
    return head, w, plan, inputs


def test_captured_body_allocates_no_step_workspace(monkeypatch):
    """The long-group renorm step reads partial sums from a workspace: the body must receive it
    (allocated once per loop, outside the captured region) instead of allocating one per step."""
    head, w, plan, inputs = _long_group_body(monkeypatch)
    body = op.loop_body(head, w, plan, "triton", inputs[0])
    with torch.no_grad():
        want = body(*inputs)
    guard = HostSyncGuard(monkeypatch, allocations=True).install()
    with guard, torch.no_grad():
        out = body(*inputs)
    assert guard.calls == [], guard.calls
    assert torch.isfinite(out).all() and torch.allclose(out, want)
    eager = op.denoise_loop  # the same loop without the workspace: the kernel allocates per step
    with torch.no_grad():
        temb = op.time_embedding(head, inputs[2]).unsqueeze(1)
        cond = op.condition_projection(head, inputs[1]).reshape(1, plan.passes * inputs[0].shape[1], w.width)
        ref = eager(w, plan, inputs[0].clone(), cond, temb, inputs[5], inputs[3], inputs[4], backend="torch")
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_the_guard_sees_a_workspace_allocated_inside_the_body(monkeypatch):
    """The allocation check can fail: without the loop's workspace the kernel makes one per step."""
    head, w, plan, inputs = _long_group_body(monkeypatch)
    monkeypatch.setattr(op.LoopPlan, "workspace", lambda self, backend, x: None)
    body = op.loop_body(head, w, plan, "triton", inputs[0])
    with torch.no_grad():
        body(*inputs)
    guard = HostSyncGuard(monkeypatch, allocations=True).install()
    with guard, torch.no_grad():
        body(*inputs)
    assert any("torch.empty (an allocation) at denoise_step.py" in c for c in guard.calls), guard.calls


# ---------------------------------------------------------------- graph keys
def test_rebuilt_weights_never_replay_an_old_capture(monkeypatch):
    """A HeadWeights object dies when the head's parameters change (it is rebuilt), and CPython
    readily gives the next one the same id(): the capture key must still differ."""
    captured = []

    class FakeLoop:  # keeps nothing alive, so the weights object can die
        def __init__(self, body, inputs, keep_alive=None):
            captured.append(id(keep_alive[1]))

        def replay(self, inputs):
            return inputs[0]

    monkeypatch.setattr(graphs, "CapturedLoop", FakeLoop)
    graphs.clear()
    head = DiffusionMLP(depth=1, width=16, cond_dim=8)
    plan = op.LoopPlan(4, op.GUIDE_CFG, False, None, 16, 16)
    x, z_rows, noise = torch.zeros(1, 8, 16), torch.zeros(2, 8, 8), [None] * 4

    def run(w):
        graphs.run_captured(op.graph_key(w, plan, x, z_rows, noise, "cuda"), None, (x, z_rows), keep_alive=(head, w))

    w = op.HeadWeights(head)
    run(w)
    old_id = id(w)
    recycled = False
    captured.clear()
    for _ in range(200):
        del w  # its last reference: freed at once
        w = op.HeadWeights(head)
        if id(w) == old_id:
            recycled = True
            break
    assert recycled, "CPython did not recycle the id in 200 tries: this check needs another way to force it"
    run(w)
    assert len(captured) == 1, "a new weights object with a recycled id replayed the old capture"
    graphs.clear()


def test_captures_keep_what_they_read_alive(monkeypatch):
    kept = []

    class FakeLoop:
        def __init__(self, body, inputs, keep_alive=None):
            kept.append(keep_alive)

        def replay(self, inputs):
            return inputs[0]

    monkeypatch.setattr(graphs, "CapturedLoop", FakeLoop)
    graphs.clear()
    head, w, plan, inputs = _loop_inputs("flow", op.GUIDE_NONE, False, None)
    x = inputs[0]
    graphs.run_captured(op.graph_key(w, plan, x, inputs[1], inputs[5], "cuda"), op.loop_body(head, w, plan, "cuda", x),
                        inputs, keep_alive=(head, w))
    assert kept and kept[0][1] is w
    graphs.clear()
