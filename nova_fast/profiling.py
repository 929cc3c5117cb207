"""Named ranges and stage timers around a NOVA model's three stages, attached from outside.

NOVA's generation time splits into the temporal encoder (one pass per latent frame), the spatial
encoder (one pass per autoregressive step) and the diffusion head (K calls per step). This module
finds those stages by their released attribute names (``video_encoder``, ``image_encoder``,
``image_decoder``) and hangs forward pre/post hooks on them, so the model's code is never edited.
Where the model has the reference's per-AR-step hook point for the head (``denoise_step_tokens``,
the K-step loop), the head stage is timed around that method instead, one call per AR step: an
accelerated model runs that loop fused and never calls the head module (``STAGE_METHODS``).

* on a GPU each stage call (and, with ``per_layer=True``, each block) is an NVTX range, so
  ``nsys`` and ``ncu --nvtx`` see ``nova.temporal``, ``nova.spatial.block07``, ``nova.head``;
* every call's time is accumulated per range name: CUDA events on a GPU (read once at the end,
  so timing adds no synchronization inside the run), wall clock on a CPU;
* optionally each range is also a ``torch.profiler.record_function`` so CPU traces show it.

When profiling is off there are no hooks at all, hence no cost::

    with nova_fast.profiling.profiled(model) as prof:
        model.generate_video(...)
    prof.stage_seconds()     # {"temporal": ..., "spatial": ..., "head": ...}
"""
from __future__ import annotations

import contextlib
import functools
import time
import types
import weakref
from dataclasses import dataclass, field

import torch

# stage label -> attribute of the NOVA model (the released checkpoint names)
STAGES = {"temporal": "video_encoder", "spatial": "image_encoder", "head": "image_decoder"}
# stage label -> the model method that runs the whole stage of one step, where the model's class has
# it: timed around that call instead of the module's forward (see the module docstring)
STAGE_METHODS = {"head": "denoise_step_tokens"}
RANGE_PREFIX = "nova"   # ranges: nova.temporal, nova.spatial, nova.head, nova.spatial.block07 (no "/":
                        # ncu's --nvtx-include uses "/" to separate nested push/pop ranges)


def range_name(stage: str, block: int | None = None) -> str:
    return f"{RANGE_PREFIX}.{stage}" + ("" if block is None else f".block{block:02d}")

_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, StageProfiler]" = weakref.WeakKeyDictionary()


class MethodHook:
    """Calls ``before(model, args)`` and ``after(model, args, output)`` around each call of the model
    method ``name``, through an instance attribute wrapping the implementation in place when it was
    installed (the class's, or an accelerator's replacement: attach after ``accelerate``).
    ``remove()`` puts back what was there, unless something replaced the wrapper meanwhile. A deep
    copy of the model taken meanwhile runs its own implementation, unobserved."""

    def __init__(self, model: torch.nn.Module, name: str, before, after):
        self.model, self.name = model, name
        self.previous = model.__dict__.get(name)  # None: the class's method

        def observed(owner, *args, **kwargs):
            inner = self._implementation(owner)
            if owner is not model:
                return inner(*args, **kwargs)
            before(model, args)
            output = None
            try:
                output = inner(*args, **kwargs)
            finally:
                after(model, args, output)
            return output

        # a bound method: deepcopy rebinds it to the copy (as it does the accelerator's replacements)
        self.wrapper = types.MethodType(functools.wraps(getattr(type(model), name))(observed), model)
        model.__dict__[name] = self.wrapper

    def _implementation(self, owner):
        if self.previous is None:
            return getattr(type(owner), self.name).__get__(owner)
        if isinstance(self.previous, types.MethodType) and self.previous.__self__ is self.model:
            return types.MethodType(self.previous.__func__, owner)
        return self.previous

    def remove(self) -> None:
        if self.model.__dict__.get(self.name) is not self.wrapper:
            return
        if self.previous is None:
            del self.model.__dict__[self.name]
        else:
            self.model.__dict__[self.name] = self.previous


def stage_target(model: torch.nn.Module, stage: str, attr: str | None = None):
    """What a stage is observed on: ("method", model, method name) where the model's class has the
    stage's ``STAGE_METHODS`` entry, else ("module", module, attr) for the module ``model.<attr>``
    (``attr`` defaults to ``STAGES[stage]``), or None when the model has neither."""
    method = STAGE_METHODS.get(stage)
    if method is not None and callable(getattr(type(model), method, None)):
        return "method", model, method
    attr = STAGES.get(stage) if attr is None else attr
    module = getattr(model, attr, None) if attr else None
    return ("module", module, attr) if isinstance(module, torch.nn.Module) else None


def hook_stage(target, before, after) -> list:
    """Hooks calling ``before(obj, args)`` / ``after(obj, args, output)`` around every call of a
    ``stage_target`` (also when the call raises); each handle has ``remove()``."""
    kind, obj, name = target
    if kind == "method":
        return [MethodHook(obj, name, before, after)]
    return [obj.register_forward_pre_hook(before), obj.register_forward_hook(after, always_call=True)]


@dataclass
class RangeStats:
    calls: int = 0
    seconds: float = 0.0
    pending: list = field(default_factory=list)   # (start_event, end_event) pairs not yet read


class StageProfiler:
    """Hooks on one model's stages (and optionally their blocks); see the module docstring.

    ``timing``: "auto" (CUDA events when the stage's parameters are on a GPU, else wall clock),
    "events", "wall", "sync" (wall clock after ``torch.cuda.synchronize``) or "off" (ranges only).
    """

    def __init__(self, model: torch.nn.Module, *, per_layer: bool = False, nvtx: bool | None = None,
                 record_function: bool = False, timing: str = "auto"):
        if timing not in ("auto", "events", "wall", "sync", "off"):
            raise ValueError(f"timing must be auto, events, wall, sync or off, got {timing!r}")
        self.model = model
        self.per_layer = per_layer
        self.nvtx = torch.cuda.is_available() if nvtx is None else nvtx
        self.record_function = record_function
        self.timing = timing
        self.stats: dict[str, RangeStats] = {}
        self.missing: list[str] = []     # stage attributes the model does not have (said, not hidden)
        self._handles = []
        self._open: dict[str, list] = {}  # range name -> stack of open (start, record_function ctx)

    # ---- attach / detach -------------------------------------------------------------------
    def targets(self) -> list[tuple[str, tuple]]:
        """(range name, ``stage_target``) for every stage the model has, plus blocks when per_layer."""
        found = []
        self.missing = []
        for stage, attr in STAGES.items():
            target = stage_target(self.model, stage)
            if target is None:
                self.missing.append(attr)
                continue
            found.append((range_name(stage), target))
            blocks = getattr(getattr(self.model, attr, None), "blocks", None)
            if self.per_layer and isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential, list)):
                for i, block in enumerate(blocks):
                    found.append((range_name(stage, i), ("module", block, f"{attr}.blocks.{i}")))
        return found

    def attach(self) -> "StageProfiler":
        if self._handles:
            return self
        for name, target in self.targets():
            self.stats.setdefault(name, RangeStats())
            # target[1]: the module, or the model for a method stage (its parameters' device sets the clock)
            self._handles += hook_stage(target, self._pre_hook(name, target[1]), self._post_hook(name))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._open = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "StageProfiler":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- hooks -----------------------------------------------------------------------------
    def _mode_for(self, module: torch.nn.Module) -> str:
        if self.timing != "auto":
            return self.timing
        param = next(module.parameters(), None)
        return "events" if param is not None and param.is_cuda else "wall"

    def _pre_hook(self, name: str, module: torch.nn.Module):
        mode = self._mode_for(module)

        def hook(_module, _args):
            if self.nvtx:
                torch.cuda.nvtx.range_push(name)
            ctx = None
            if self.record_function:
                ctx = torch.profiler.record_function(name)
                ctx.__enter__()
            if mode == "events":
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            elif mode == "sync":
                torch.cuda.synchronize()
                start = time.perf_counter()
            elif mode == "wall":
                start = time.perf_counter()
            else:
                start = None
            self._open.setdefault(name, []).append((mode, start, ctx))

        return hook

    def _post_hook(self, name: str):
        def hook(_module, _args, _output):
            stack = self._open.get(name)
            if not stack:   # attached in the middle of a call: nothing to close
                return
            mode, start, ctx = stack.pop()
            stats = self.stats[name]
            stats.calls += 1
            if mode == "events":
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                stats.pending.append((start, end))
            elif mode == "sync":
                torch.cuda.synchronize()
                stats.seconds += time.perf_counter() - start
            elif mode == "wall":
                stats.seconds += time.perf_counter() - start
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if self.nvtx:
                torch.cuda.nvtx.range_pop()

        return hook

    # ---- results ---------------------------------------------------------------------------
    def _settle(self) -> None:
        """Read pending CUDA events (one synchronize for the whole run)."""
        if any(s.pending for s in self.stats.values()):
            torch.cuda.synchronize()
            for s in self.stats.values():
                s.seconds += sum(a.elapsed_time(b) for a, b in s.pending) / 1e3
                s.pending = []

    def reset(self) -> None:
        self._settle()
        self.stats = {name: RangeStats() for name in self.stats}

    def totals(self) -> dict[str, dict]:
        """Range name -> {"calls", "seconds"} accumulated since attach / reset."""
        self._settle()
        return {name: {"calls": s.calls, "seconds": s.seconds} for name, s in self.stats.items()}

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage ("temporal", "spatial", "head"); absent stages are left out."""
        totals = self.totals()
        return {stage: totals[range_name(stage)]["seconds"] for stage in STAGES if range_name(stage) in totals}

    def stage_calls(self) -> dict[str, int]:
        totals = self.totals()
        return {stage: totals[range_name(stage)]["calls"] for stage in STAGES if range_name(stage) in totals}

    def table(self, total_seconds: float | None = None) -> str:
        """Markdown table of every range: calls, total ms, ms per call, share of the total."""
        totals = self.totals()
        if total_seconds is None:
            total_seconds = sum(v["seconds"] for k, v in totals.items() if k.count(".") == 1) or 1.0
        lines = ["| range | calls | total ms | ms / call | % of run |", "|---|---:|---:|---:|---:|"]
        for name, v in totals.items():
            per_call = v["seconds"] / v["calls"] * 1e3 if v["calls"] else 0.0
            lines.append(f"| {name} | {v['calls']} | {v['seconds'] * 1e3:.2f} | {per_call:.3f} | "
                         f"{100 * v['seconds'] / total_seconds:.1f} |")
        if self.missing:
            lines.append(f"\nmodel has no {', '.join(self.missing)}: not timed")
        return "\n".join(lines)


# ---- module-level switches ------------------------------------------------------------------
def enable(model: torch.nn.Module, per_layer: bool = False, **options) -> StageProfiler:
    """Attach ranges and timers to ``model`` (idempotent: a second call returns the same one)."""
    profiler = _ACTIVE.get(model)
    if profiler is None or profiler.per_layer != per_layer:
        if profiler is not None:
            profiler.detach()
        profiler = StageProfiler(model, per_layer=per_layer, **options)
        _ACTIVE[model] = profiler
    return profiler.attach()


def disable(model: torch.nn.Module) -> StageProfiler | None:
    """Remove every hook ``enable`` attached; returns the profiler (its numbers stay readable)."""
    profiler = _ACTIVE.pop(model, None)
    if profiler is not None:
        profiler.detach()
    return profiler


def is_enabled(model: torch.nn.Module) -> bool:
    profiler = _ACTIVE.get(model)
    return profiler is not None and profiler.attached


@contextlib.contextmanager
def profiled(model: torch.nn.Module, per_layer: bool = False, **options):
    """``with profiled(model) as prof:`` ranges and timers on inside the block only."""
    profiler = enable(model, per_layer=per_layer, **options)
    try:
        yield profiler
    finally:
        disable(model)


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range on a GPU; nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


@contextlib.contextmanager
def cuda_profiler_capture():
    """cudaProfilerStart/Stop around the block, for ``nsys profile --capture-range=cudaProfilerApi``
    and ``ncu --profile-from-start off``. Nothing on a CPU."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


# ---- our kernels, for ncu's --kernel-name filter ----------------------------------------------
_TRITON_DEF = r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def\s+(\w+)"
_CUDA_GLOBAL = r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)"
_NOT_MODEL_KERNELS = {"toolchain_probe"}   # kernels/ files that never run in a generation


def kernel_names() -> list[str]:
    """Names of nova_fast's own kernels: ``@triton.jit`` functions in kernels/*.py and ``__global__``
    functions in csrc/*.cu (read from the sources, so the list follows the code)."""
    import re
    from pathlib import Path

    names: set[str] = set()
    try:
        import nova_fast.kernels as kernels_pkg

        kernel_dirs = [Path(p) for p in kernels_pkg.__path__]
    except ImportError:
        kernel_dirs = []
    for folder in kernel_dirs:
        for path in folder.glob("*.py"):
            if path.stem not in _NOT_MODEL_KERNELS:
                names.update(re.findall(_TRITON_DEF, path.read_text()))
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    for path in csrc.glob("*.cu"):
        names.update(re.findall(_CUDA_GLOBAL, path.read_text()))
    return sorted(names)


def ncu_kernel_regex() -> str:
    """``regex:`` value for ``ncu --kernel-name-base function --kernel-name`` matching only our kernels."""
    names = kernel_names()
    return "^(" + "|".join(names) + ")" if names else "^nova_"
