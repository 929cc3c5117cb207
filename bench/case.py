"""One benchmark case format for every op, shared by the pytest-benchmark suites and `nova-fast bench`.

Each suite ``bench/test_<op>_bench.py`` defines ``CASES: list[BenchCase]``; its pytest-benchmark
tests parametrize over them, and the CLI runner imports the same lists, so a number in a report and
a number in ``--benchmark-compare`` come from the same code.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class BenchCase:
    op: str                                        # group: "modulate", "group_causal_attention", ...
    name: str                                      # short label with the sizes, e.g. "4096x1280 fp32"
    setup: Callable[[], dict[str, Callable[[], Any]]]  # builds inputs once; implementation label -> call
    baseline: str                                  # label whose time the ratios divide by
    sizes: dict = field(default_factory=dict)      # stated sizes (B, L, D, dtype, ...)
    metrics: Callable[[], dict] | None = None      # extra figures: bytes moved, tiles visited, ...
    quick: bool = True                             # part of the short default run of `nova-fast bench`

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"


def median_time(fn: Callable[[], Any], *, min_runs: int = 5, max_runs: int = 50, budget_s: float = 1.0,
                warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` (seconds), synchronizing CUDA around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs": len(times), "min_s": min(times)}


def count_dispatched_ops(fn: Callable[[], Any]) -> int:
    """Number of ATen ops ``fn()`` dispatches (see ``count_ops_by_stage``)."""
    return count_ops_by_stage(fn, None, {})["total"]


def _pop_stage(running: list):
    def hook(*_):
        running.pop()  # returns None: a forward hook's return value would replace the output
    return hook


def count_ops_by_stage(fn: Callable[[], Any], model, stages: dict[str, str]) -> dict[str, int]:
    """ATen ops ``fn()`` dispatches, split by the stage of ``model`` that was running
    ({stage: attribute name}, e.g. {"head": "image_decoder"}, found as ``nova_fast.profiling`` finds
    it; the outermost one counts when they nest) and "other" for the rest; "total" sums them. View
    ops count too (on a GPU those launch nothing; every other op is a kernel launch or more)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nova_fast.profiling import hook_stage, stage_target

    running: list[str] = []
    counts = dict.fromkeys([*stages, "other"], 0)
    handles = []
    for stage, attr in stages.items():
        target = None if model is None else stage_target(model, stage, attr)  # as the profiler sees it
        if target is not None:
            handles += hook_stage(target, lambda *_, s=stage: running.append(s), _pop_stage(running))

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[running[0] if running else "other"] += 1
            return func(*args, **(kwargs or {}))

    try:
        with _Counter():
            fn()
    finally:
        for h in handles:
            h.remove()
    counts["total"] = sum(counts.values())
    return counts


def traffic_metrics(eager_bytes: int, fused_bytes: int, eager_passes: int, first_call_s: float | None = None) -> dict:
    """The memory-bound argument of a fused elementwise op in the suites' one format: bytes one call
    moves in the eager composition and in the fused op, their ratio, the passes, and the torch
    backend's first-call (build / compile) time when it was measured."""
    out = {"bytes_eager": eager_bytes, "bytes_fused": fused_bytes, "bytes_ratio": round(eager_bytes / fused_bytes, 2),
           "eager_passes": eager_passes, "fused_passes": 1}
    if first_call_s is not None:
        out["torch_first_call_s"] = round(first_call_s, 3)
    return out


def bench_device():
    """Where the suites run: the GPU when one is visible, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def with_backend(op: str, backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` as a zero-argument callable that runs with ``op`` pinned to ``backend``."""
    def call():
        import nova_fast

        with nova_fast.use_backend(backend, op=op):
            return fn()
    return call


def backend_impls(op: str, fn: Callable[[], Any], device, candidates=("torch", "triton", "cuda")) -> dict:
    """{backend: fn pinned to it} for the op's backends that time meaningfully on ``device``: torch
    always, the kernel backends only on a GPU (the Triton interpreter is a correctness tool)."""
    from nova_fast import backends

    return {b: with_backend(op, b, fn) for b in candidates
            if b == "torch" or (device.type == "cuda" and backends.can_run(b, device)[0])}


def first_call_seconds(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn``'s first call without autograd (compiles, or loads the inductor cache),
    reported apart from the timed calls."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def format_seconds(seconds) -> str:
    """A duration for tables and logs: s, ms or us with 3-4 significant digits; '-' when unknown."""
    import math

    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"
