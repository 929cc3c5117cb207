"""Build nova_fast: pure Python everywhere, plus the CUDA extension `nova_fast._C` where it can be built.

The extension is built with ninja (torch.utils.cpp_extension) only when a CUDA build of torch and a
CUDA toolkit are both present, or when NOVA_FAST_BUILD_CUDA=1 forces it (NOVA_FAST_BUILD_CUDA=0
never builds it). Otherwise the pure-Python parts install and one line says why the extension was
skipped.

Target GPUs: NOVA_FAST_CUDA_ARCHS, a comma-separated list of compute capabilities ("80,90", "90a")
or "native" (the GPUs visible at build time, as torch reports them); default sm_80 and sm_90.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")


def cuda_archs(spec: str | None = None) -> tuple[str, ...]:
    """The compute capabilities to build for, from NOVA_FAST_CUDA_ARCHS (see the module docstring)."""
    spec = (os.environ.get("NOVA_FAST_CUDA_ARCHS", "") if spec is None else spec).strip()
    if not spec:
        return CUDA_ARCHS
    if spec == "native":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("NOVA_FAST_CUDA_ARCHS=native: no GPU is visible to torch at build time")
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(sorted(f"{major}{minor}" for major, minor in caps))
    archs = tuple(a.strip().replace(".", "").removeprefix("sm_") for a in spec.split(",") if a.strip())
    bad = [a for a in archs if not (a[:-1] if a.endswith("a") else a).isdigit() or len(a.rstrip("a")) < 2]
    if bad or not archs:
        raise SystemExit(f"NOVA_FAST_CUDA_ARCHS={spec!r}: expected compute capabilities like '80,90', '90a' "
                         f"or 'native' (bad: {', '.join(bad) or 'empty'})")
    return archs


def _cuda_extension():
    forced = os.environ.get("NOVA_FAST_BUILD_CUDA") == "1"
    if os.environ.get("NOVA_FAST_CUDA_ARCHS", "native") != "native":
        cuda_archs()   # a bad target list fails every build, not only the ones that compile CUDA
    if os.environ.get("NOVA_FAST_BUILD_CUDA") == "0":
        print("nova_fast: building without nova_fast._C (NOVA_FAST_BUILD_CUDA=0)", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing at build time: nothing to bind against
        print(f"nova_fast: building without nova_fast._C (torch not importable: {exc})", file=sys.stderr)
        return [], {}
    have_cuda_torch = torch.version.cuda is not None
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if not forced and not (have_cuda_torch and have_nvcc):
        why = "torch is a CPU build" if not have_cuda_torch else "no CUDA toolkit (nvcc) found"
        print(f"nova_fast: building without nova_fast._C ({why}; set NOVA_FAST_BUILD_CUDA=1 to force)",
              file=sys.stderr)
        if os.environ.get("NOVA_FAST_CUDA_ARCHS", "native") != "native":
            print(f"nova_fast: NOVA_FAST_CUDA_ARCHS accepted: sm_{', sm_'.join(cuda_archs())}", file=sys.stderr)
        return [], {}
    # Kernel sources live in csrc/*.cu (pure CUDA, no torch headers); the torch glue is csrc/*.cpp.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    archs = cuda_archs()
    # one SASS per target plus the newest target's PTX, so a newer GPU can still JIT the kernels
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    print(f"nova_fast: building nova_fast._C for sm_{', sm_'.join(archs)}", file=sys.stderr)
    ext = CUDAExtension(
        name="nova_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="nova_fast",
    version="0.1.0",
    description="Fused kernels and drop-in acceleration for the NOVA autoregressive video model",
    python_requires=">=3.10",
    packages=find_packages(include=["nova_fast", "nova_fast.*"]) + ["nova_fast.kernels", "nova_fast.bench"],
    # Triton kernels live in top-level kernels/ but install as nova_fast.kernels, so no top-level
    # `kernels` import name is claimed; the bench CLI code lives in bench/ beside its suites.
    package_dir={"nova_fast.kernels": "kernels", "nova_fast.bench": "bench"},
    install_requires=["torch>=2.4", "numpy", "einops", "safetensors"],
    extras_require={
        "triton": ["triton>=3.2"],
        "dev": ["triton>=3.2", "pytest", "pytest-benchmark", "ninja", "matplotlib"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["nova-fast=nova_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
