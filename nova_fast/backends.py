"""Backend registry: which implementation runs each op, why, and what ran last.

Three backends exist: ``torch`` (pure PyTorch, runs everywhere), ``triton`` (Triton kernels, on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (the compiled ``nova_fast._C``
extension, on CUDA tensors). The choice per op is, in order:

1. a per-op choice scoped to the running thread or task by :func:`use_backends` (what an
   accelerated model runs under: two models on two threads keep their own choices),
   then a per-op or global choice from :func:`set_backend` / :func:`use_backend`,
2. the environment variable ``NOVA_FAST_BACKEND`` (``torch``, ``triton``, ``cuda`` or ``auto``),
3. ``auto``: ``cuda`` if the extension is built and the tensors are on a GPU, then ``triton`` on a
   GPU, else ``torch``. The Triton interpreter is a test vehicle, so auto never picks it on CPU.

An explicit choice that cannot run raises :class:`BackendUnavailable` saying why; nothing falls back
silently. Every dispatch is recorded, and :func:`backend_info` reports it.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import platform
import threading

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)

_lock = threading.Lock()
_global_choice: str | None = None
_op_choice: dict[str, str] = {}
_last_used: dict[str, tuple[str, str]] = {}
_scoped_choice: contextvars.ContextVar = contextvars.ContextVar("nova_fast_scoped_backends", default={})
_extension = None
_extension_error: str | None = None


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op here; the message says why."""


def _check_name(backend: str, argument: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"unknown {argument} {backend!r}: expected one of {', '.join(_CHOICES)}")
    return backend


def set_backend(backend: str | None, op: str | None = None) -> None:
    """Choose the backend for every op (``op=None``) or for one op; ``None`` clears the choice."""
    global _global_choice
    if backend is not None:
        _check_name(backend)
    with _lock:
        if op is None:
            _global_choice = backend
        elif backend is None:
            _op_choice.pop(op, None)
        else:
            _op_choice[op] = backend


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None):
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    _check_name(backend)
    with _lock:
        saved = (_global_choice, dict(_op_choice))
    set_backend(backend, op)
    try:
        yield
    finally:
        _restore(saved)


@contextlib.contextmanager
def use_backends(per_op: dict):
    """Per-op choices {op: backend} for the duration of a block, in the current thread (or asyncio
    task) only: what ``nova_fast.accelerate`` runs a model under. They beat ``set_backend`` and are
    invisible to other threads; the previous scoped choices come back on exit."""
    for op, backend in per_op.items():
        _check_name(backend, f"backend for {op}")
    token = _scoped_choice.set({**_scoped_choice.get(), **per_op})
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def scoped_backends() -> dict:
    """The per-op choices of the innermost :func:`use_backends` block of this thread or task."""
    return _scoped_choice.get()


def _restore(saved) -> None:
    global _global_choice
    with _lock:
        _global_choice = saved[0]
        _op_choice.clear()
        _op_choice.update(saved[1])


def requested_backend(op: str) -> tuple[str, str]:
    """The backend asked for ``op`` and where the request came from."""
    scoped = _scoped_choice.get()
    if op in scoped:
        return scoped[op], f"use_backends({{{op!r}: {scoped[op]!r}}}) (an accelerated model's backend)"
    with _lock:
        if op in _op_choice:
            return _op_choice[op], f"set_backend({_op_choice[op]!r}, op={op!r})"
        if _global_choice is not None:
            return _global_choice, f"set_backend({_global_choice!r})"
    env = os.environ.get("NOVA_FAST_BACKEND")
    if env:
        return _check_name(env, "NOVA_FAST_BACKEND"), f"NOVA_FAST_BACKEND={env}"
    return "auto", "default"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return True, "triton importable"


def load_extension():
    """Import ``nova_fast._C`` on first use (never at ``import nova_fast``); None if not built."""
    global _extension, _extension_error
    if _extension is None and _extension_error is None:
        try:
            _extension = importlib.import_module("nova_fast._C")
        except ImportError as exc:
            _extension_error = f"nova_fast._C is not built ({exc}); reinstall with a CUDA toolkit"
    return _extension


def extension_status() -> tuple[bool, str]:
    ext = load_extension()
    return (ext is not None), ("nova_fast._C loaded" if ext is not None else _extension_error)


def can_run(backend: str, device) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device`` here, and why (not)."""
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    if backend == "torch":
        return True, "pure PyTorch runs on every device"
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            return False, why
        if on_gpu:
            return True, "CUDA tensors"
        if triton_interpreting():
            return True, "CPU tensors under TRITON_INTERPRET=1"
        return False, (f"triton needs CUDA tensors (got {device}) or the interpreter "
                       "(TRITON_INTERPRET=1 is off)")
    if backend == "cuda":
        if not on_gpu:
            return False, f"the cuda backend needs CUDA tensors (got {device}; no GPU in use)"
        ok, why = extension_status()
        return ok, why
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def resolve(op: str, device, supported=BACKENDS) -> str:
    """Pick the backend for one call of ``op`` on ``device``, record it and return its name.

    ``supported`` lists the backends this op implements. Raises BackendUnavailable if the requested
    backend cannot run here or the op has no implementation for it.
    """
    wanted, source = requested_backend(op)
    if wanted == "auto":
        for candidate in ("cuda", "triton"):
            if candidate in supported and getattr(device, "type", str(device)) == "cuda":
                ok, _ = can_run(candidate, device)
                if ok:
                    record(op, candidate, f"auto: {candidate} on CUDA tensors")
                    return candidate
        record(op, "torch", f"auto: {'no GPU tensors' if str(device) == 'cpu' else 'no faster backend'}")
        return "torch"
    if wanted not in supported:
        raise BackendUnavailable(f"{op}: backend {wanted!r} ({source}) is not implemented for this op; "
                                 f"available: {', '.join(supported)}")
    ok, why = can_run(wanted, device)
    if not ok:
        raise BackendUnavailable(f"{op}: backend {wanted!r} requested by {source} cannot run: {why}")
    record(op, wanted, f"{source} ({why})")
    return wanted


def record(op: str, backend: str, reason: str) -> None:
    with _lock:
        _last_used[op] = (backend, reason)


_last_path: dict[tuple[str, str], str] = {}
PATH_FIELDS = ("path", "backward_path")


def record_path(op: str, path: str, field: str = "path") -> None:
    """Which implementation inside a backend ran ``op`` last (e.g. the torch backend's CPU kernel or
    its ATen composition), with why; reported by :func:`backend_info` beside the backend, under
    ``field``: "path" (the op, or its forward) or "backward_path" (an op whose backward has a choice
    of its own, kept apart so a backward does not overwrite what the forward reported)."""
    if field not in PATH_FIELDS:
        raise ValueError(f"unknown path field {field!r}: expected one of {PATH_FIELDS}")
    _last_path[op, field] = path


def last_used() -> dict[str, tuple[str, str]]:
    with _lock:
        return dict(_last_used)


def _last_used_report() -> dict:
    """{op: {backend, why[, path][, backward_path]}}; an op run with an explicit backend argument (no resolution
    recorded) still reports its path."""
    used, paths = last_used(), dict(_last_path)
    report = {op: {"backend": b, "why": why} for op, (b, why) in used.items()}
    for (op, field), path in paths.items():
        report.setdefault(op, {"backend": None, "why": "backend passed by the caller"})[field] = path
    return report


def _cpu_kernel_status() -> str:
    from nova_fast import cpu_kernels

    return cpu_kernels.status()[1]


def backend_info() -> dict:
    """Versions, devices, extension status and the backend each op used last (with the reason)."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "triton": None,
        "triton_interpret": triton_interpreting(),
        "flash_attn": None,
        "extension_built": extension_status()[0],
        "extension": extension_status()[1],
        "requested": {"global": _global_choice, "per_op": dict(_op_choice),
                      "env": os.environ.get("NOVA_FAST_BACKEND")},
        "cpu_kernels": _cpu_kernel_status(),
        "last_used": _last_used_report(),
    }
    for name in ("triton", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            try:
                info[name] = importlib.import_module(name).__version__
            except Exception as exc:  # a broken optional install is reported, not fatal
                info[name] = f"unusable ({exc.__class__.__name__})"
    return info
