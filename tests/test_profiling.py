"""nova_fast.profiling: ranges and stage timers attached from outside, gone when off."""
import pytest
import torch
from torch import nn

from nova_fast import profiling


class _Encoder(nn.Module):
    def __init__(self, depth=3, width=8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _StageModel(nn.Module):
    """Only the released attribute names matter to the profiler; this stands in for NOVA here."""

    def __init__(self):
        super().__init__()
        self.video_encoder = _Encoder(2)
        self.image_encoder = _Encoder(4)
        self.image_decoder = _Encoder(1)

    def forward(self, x, steps=3, k=2):
        x = self.video_encoder(x)
        for _ in range(steps):
            y = self.image_encoder(x)
            for _ in range(k):
                y = self.image_decoder(y)
        return y


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_stage_calls_and_times_are_recorded():
    model = _StageModel()
    with profiling.profiled(model) as prof:
        model(torch.randn(2, 8))
    assert prof.stage_calls() == {"temporal": 1, "spatial": 3, "head": 6}
    seconds = prof.stage_seconds()
    assert set(seconds) == {"temporal", "spatial", "head"} and all(v > 0 for v in seconds.values())


def test_no_hooks_when_off_and_model_untouched():
    model = _StageModel()
    keys = list(model.state_dict())
    assert _hook_count(model) == 0
    prof = profiling.enable(model, per_layer=True)
    assert profiling.is_enabled(model) and _hook_count(model) == 2 * (3 + 2 + 4 + 1)
    assert profiling.enable(model, per_layer=True) is prof          # idempotent
    model(torch.randn(1, 8))
    assert profiling.disable(model) is prof
    assert _hook_count(model) == 0 and not profiling.is_enabled(model)
    assert list(model.state_dict()) == keys
    before = prof.totals()
    model(torch.randn(1, 8))                                          # off: nothing accumulates
    assert prof.totals() == before


def test_per_layer_ranges_and_table():
    model = _StageModel()
    with profiling.profiled(model, per_layer=True, record_function=True) as prof:
        model(torch.randn(1, 8), steps=2, k=1)
    totals = prof.totals()
    assert totals["nova.spatial.block03"]["calls"] == 2
    assert totals["nova.temporal.block01"]["calls"] == 1
    table = prof.table()
    assert "| nova.head.block00 | 2 |" in table


def test_missing_stage_is_reported_not_hidden():
    model = nn.Module()
    model.image_encoder = _Encoder(1)
    with profiling.profiled(model) as prof:
        model.image_encoder(torch.randn(1, 8))
    assert prof.missing == ["video_encoder", "image_decoder"]
    assert "not timed" in prof.table()


def test_ranges_close_when_forward_raises():
    model = _StageModel()
    with profiling.profiled(model) as prof:
        with pytest.raises(RuntimeError):
            model.image_encoder(torch.randn(1, 5))    # wrong width
        model.image_encoder(torch.randn(1, 8))
    assert prof.stage_calls()["spatial"] == 2
    assert all(not stack for stack in prof._open.values())


def test_cpu_context_managers_are_no_ops():
    with profiling.nvtx_range("x"), profiling.cuda_profiler_capture():
        pass


def test_reference_model_stages_found():
    reference = pytest.importorskip("nova_fast.reference")
    config = reference.NOVAConfig.preset("tiny")
    model = reference.build_model(config)
    prof = profiling.StageProfiler(model, per_layer=True)
    names = [name for name, _ in prof.targets()]
    assert prof.missing == []
    assert {"nova.temporal", "nova.spatial", "nova.head", "nova.spatial.block00"} <= set(names)
