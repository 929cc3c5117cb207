"""The CPU kernels of the torch backend: ``csrc/cpu/*.cpp``, built on first use.

On CPU tensors the torch backend runs the inference forwards of ``modulate``, ``residual_norm`` and
the denoising step (``denoise_tokens``) as hand-written one-pass loops: each row read once into
cache, its statistics taken there, the output written once; one ATen op per call instead of the 2-8
of the eager composition. The fp32 forward of ``group_causal_attention`` (inference and training)
is a flash-attention loop with its mask from the group ids (group_causal_attention.cpp). They are
registered as the ATen ops ``torch.ops.nova_fast_cpu.*`` (so the
dispatcher, profilers and op counters see them like any other kernel).

Nothing is compiled at ``import nova_fast``: the first call that wants a CPU kernel builds the
library with torch's C++ extension builder (ninja, about 10-20 s, cached under ``NOVA_FAST_CACHE``,
default ``.nova_fast_cache/`` in the checkout, keyed by the sources' content and the ISA flags).
``NOVA_FAST_CPU_KERNELS=0`` turns them off: the torch backend then runs ATen / ``torch.compile``
as before. A failed build is not silent: :func:`status` and ``nova_fast.backend_info()`` say why,
and the torch backend runs its ATen path.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("adaln.cpp", "denoise_step.cpp", "group_causal_attention.cpp")
HEADERS = ("rows.h",)

_lock = threading.Lock()
_loaded = False
_error: str | None = None


def source_dir() -> Path:
    return REPO_ROOT / "csrc" / "cpu"


def enabled() -> bool:
    return os.environ.get("NOVA_FAST_CPU_KERNELS", "1") != "0"


def _isa_flags() -> list[str]:
    """AVX2 + FMA where the CPU has them (8-wide fp32 loops), else the compiler's baseline."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def _build():
    import torch.utils.cpp_extension as cpp_extension

    src = source_dir()
    paths = [src / name for name in SOURCES + HEADERS]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"CPU kernel sources not found ({', '.join(missing)}): they build from a "
                                "source checkout")
    # -fopenmp: at::parallel_for is an inline OpenMP region; its runtime is the one torch loaded
    cflags = ["-O3", "-std=c++17", "-fopenmp", *_isa_flags()]
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    digest.update(" ".join(cflags).encode())
    name = f"nova_fast_cpu_{digest.hexdigest()[:12]}"
    cache = Path(os.environ.get("NOVA_FAST_CACHE", REPO_ROOT / ".nova_fast_cache")) / "cpu" / name
    cache.mkdir(parents=True, exist_ok=True)
    # the builder runs `ninja` from PATH: the one pip installed beside this interpreter counts too
    bin_dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        bin_dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(bin_dirs + [os.environ.get("PATH", "")])
    cpp_extension.load(name=name, sources=[str(src / s) for s in SOURCES], extra_cflags=cflags,
                       extra_include_paths=[str(src)], build_directory=str(cache), is_python_module=False,
                       verbose=False)


def load() -> bool:
    """Build (first call) and register the CPU kernels; True when ``torch.ops.nova_fast_cpu`` is usable."""
    global _loaded, _error
    if _loaded or _error is not None or not enabled():
        return _loaded
    with _lock:
        if not (_loaded or _error is not None):
            try:
                _build()
                _loaded = True
            except Exception as exc:  # noqa: BLE001 -- kept as the reason; status() and backend_info report it
                _error = f"CPU kernels could not be built: {type(exc).__name__}: {str(exc)[:400]}"
    return _loaded


def status() -> tuple[bool, str]:
    """(usable, why) without building anything."""
    if not enabled():
        return False, "CPU kernels off (NOVA_FAST_CPU_KERNELS=0)"
    if _loaded:
        return True, "CPU kernels built (csrc/cpu)"
    return False, _error or "CPU kernels not built yet (they build on the first CPU call)"


def available_for(*tensors) -> bool:
    """Whether a CPU kernel can run this inference call: every tensor on CPU and the library built."""
    if not enabled():
        return False
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    return load()
