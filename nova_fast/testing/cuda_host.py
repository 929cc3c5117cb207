"""Run and check the CUDA C++ kernels without a GPU.

``host_library(name)`` compiles ``csrc/<name>.cu`` with g++ against the SIMT harness
(``csrc/host/simt.h``) into a shared library and loads it with ctypes: the ``extern "C"`` launchers
are then callable with CPU tensor pointers, so parity tests execute the very kernel source that
nvcc builds for the GPU. ``nvcc_report(path, arch)`` compiles a source with ``-Xptxas -v`` and
returns registers, spills and shared memory per kernel. ``check_bindings(headers)`` compiles the
torch glue (``csrc/*.cpp``) against another torch's C++ headers, syntax only: the lent GPU machine's
torch 2.11, fetched by .ci/env.sh (``compat_torch_headers()``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = REPO_ROOT / "csrc"
CACHE = Path(os.environ.get("NOVA_FAST_CACHE", REPO_ROOT / ".nova_fast_cache"))
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_loaded: dict[str, ctypes.CDLL] = {}


def csrc_path(name: str) -> Path:
    """Path of a kernel source: ``name`` is 'adaln' (csrc/adaln.cu) or a path relative to csrc/."""
    path = CSRC / (name if name.endswith(".cu") else f"{name}.cu")
    if not path.exists():
        raise FileNotFoundError(f"no CUDA source {path} (the host harness runs from a source checkout)")
    return path


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def host_library(name: str, opt: str = "-O1") -> ctypes.CDLL:
    """Build (cached by content hash) and load csrc/<name>.cu for the host."""
    source = csrc_path(name)
    headers = list(CSRC.glob("*.cuh")) + list((CSRC / "host").glob("*.h"))
    key = f"{source.stem}-{_digest([source, *headers])}{opt}"
    if key in _loaded:
        return _loaded[key]
    CACHE.mkdir(parents=True, exist_ok=True)
    lib_path = CACHE / f"host_{key}.so"
    if not lib_path.exists():
        cxx = os.environ.get("CXX", "g++")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / lib_path.name
            cmd = [cxx, "-std=c++17", opt, "-g", "-shared", "-fPIC", "-DNOVA_SIMT_HOST", "-I", str(CSRC),
                   "-x", "c++", str(source), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"host build of {source.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
            shutil.move(str(out), lib_path)
    lib = ctypes.CDLL(str(lib_path))
    _loaded[key] = lib
    return lib


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """Raw data pointer of a CPU tensor (None -> NULL) for a C launcher argument."""
    if t is None:
        return ctypes.c_void_p(0)
    if t.device.type != "cpu":
        raise ValueError("the host harness runs on CPU tensors")
    return ctypes.c_void_p(t.data_ptr())


def call(lib: ctypes.CDLL, fn: str, *args) -> None:
    """Call an extern "C" launcher returning a cudaError_t; raise if it reports an error."""
    f = getattr(lib, fn)
    f.restype = ctypes.c_int
    conv = []
    for a in args:
        if isinstance(a, torch.Tensor) or a is None:
            conv.append(ptr(a))
        elif isinstance(a, bool):
            conv.append(ctypes.c_int(int(a)))
        elif isinstance(a, int):
            conv.append(ctypes.c_longlong(a) if abs(a) >= 2**31 else ctypes.c_int(a))
        elif isinstance(a, float):
            conv.append(ctypes.c_float(a))
        else:
            conv.append(a)
    err = f(*conv)
    if err != 0:
        raise RuntimeError(f"{fn} returned CUDA error code {err}")


@dataclass
class KernelResources:
    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int


_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def nvcc_report(source: str | Path, arch: str = "sm_90", extra=()) -> list[KernelResources]:
    """Compile one .cu with nvcc -Xptxas -v for ``arch``; return resources per kernel entry."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on the PATH")
    source = Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", str(CSRC), "-c",
               str(source), "-o", str(Path(tmp) / "k.o"), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} ({arch}):\n{proc.stderr}")
    return _parse_ptxas(proc.stderr, source)


def _parse_ptxas(stderr: str, source: Path) -> list[KernelResources]:
    kernels, current = [], None
    for line in stderr.splitlines():
        if m := _FUNC.search(line):
            current = {"name": m.group(1), "arch": m.group(2)}
        elif current and (m := _STACK.search(line)):
            current.update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
        elif current and (m := _REGS.search(line)):
            kernels.append(KernelResources(current["name"], current["arch"], int(m.group(1)),
                                           current.get("st", 0), current.get("ld", 0),
                                           int(m.group(2) or 0), current.get("stack", 0)))
            current = None
    if not kernels:
        raise RuntimeError(f"nvcc reported no kernel for {source.name}:\n{stderr}")
    return kernels


def nvcc_cubin(source: str | Path, arch: str = "sm_90") -> tuple[list[KernelResources], str, dict[str, int]]:
    """Compile one .cu to a cubin for ``arch``: (resources per kernel as nvcc_report gives them, the SASS
    as text (cuobjdump of the triton wheel), {kernel: threads per block} from ``__launch_bounds__``
    (the PTX ``.maxntid``; kernels without one are absent))."""
    from nova_fast.testing.triton_aot import _tool

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on the PATH")
    source = Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", str(CSRC), "-cubin", "--keep",
               "--keep-dir", tmp, str(source), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {source.name} ({arch}):\n{proc.stderr}")
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        threads = {}
        for ptx in Path(tmp).glob("*.ptx"):
            for m in re.finditer(r"\.entry\s+(\w+)\s*\((?:[^)]*)\)\s*((?:\.\w+[^\n{]*\n\s*)*)", ptx.read_text()):
                nt = re.search(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", m.group(2))
                if nt:
                    threads[m.group(1)] = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3))
    return _parse_ptxas(proc.stderr, source), sass, threads


def sass_functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass text split per kernel: {mangled name: its SASS}."""
    parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def assert_no_spills(source: str | Path, archs=("sm_80", "sm_90")) -> list[KernelResources]:
    """nvcc-compile ``source`` for each arch; raise AssertionError naming any kernel that spills."""
    reports = []
    for arch in archs:
        for k in nvcc_report(source, arch):
            if k.spill_stores or k.spill_loads:
                raise AssertionError(f"{k.name} spills on {arch}: {k.spill_stores} B stores, "
                                     f"{k.spill_loads} B loads ({k.registers} registers)")
            reports.append(k)
    return reports


# ---- the torch glue against the GPU machine's torch headers ---------------------------------------
COMPAT_TORCH = "2.11.0"


def compat_torch_headers(version: str = COMPAT_TORCH) -> Path | None:
    """The folder .ci/env.sh unpacks torch ``version``'s headers into (``torch/``: torch's include
    folder; ``cuda/``: the cuBLAS, cuSPARSE and cuSOLVER headers its ATen/cuda headers include), or None."""
    path = Path(os.environ.get("NOVA_FAST_COMPAT_TORCH_HEADERS", REPO_ROOT / ".venv" / f"torch-{version}-headers"))
    return path if (path / ".complete").exists() and (path / "torch" / "torch" / "extension.h").exists() else None


def cuda_toolkit_include() -> Path:
    """The CUDA toolkit's include folder (cuda_runtime_api.h), from CUDA_HOME / CUDA_PATH or where nvcc is."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in filter(None, candidates):
        if (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    raise RuntimeError(f"no CUDA toolkit include folder with cuda_runtime_api.h among {candidates}")


def binding_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def check_bindings(headers: Path, sources=None, cxx: str | None = None) -> str:
    """Compile ``sources`` (default every csrc/*.cpp) as ONE translation unit, syntax only, against the
    torch headers in ``headers`` (see compat_torch_headers) and the local CUDA toolkit; the torch
    headers are parsed once for all of them. Returns the command line; raises with the compiler's
    errors. A pass is cached by content (sources, their csrc headers, the header set)."""
    sources = list(sources or binding_sources())
    cxx = cxx or os.environ.get("CXX", "g++")
    python_include = __import__("sysconfig").get_paths()["include"]
    includes = [headers / "torch", headers / "torch" / "torch" / "csrc" / "api" / "include", headers / "cuda",
                cuda_toolkit_include(), Path(python_include), CSRC]
    flags = ["-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             *(f"-I{i}" for i in includes)]
    key = _digest([*sources, *CSRC.glob("*.h"), *CSRC.glob("*.cuh"), headers / ".complete"])
    stamp = CACHE / f"bindings-syntax-{key}-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:8]}.ok"
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "all_bindings.cpp"
        unit.write_text("".join(f'#include "{s}"\n' for s in sources))
        cmd = [cxx, *flags, str(unit)]
        if stamp.exists():
            return " ".join(cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the torch glue does not compile against {headers}:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(cmd) + "\n")
    return " ".join(cmd)
