"""Build nova_fast: pure Python everywhere, plus the CUDA extension `nova_fast._C` where it can be built.

The extension is built with ninja (torch.utils.cpp_extension) only when a CUDA build of torch and a
CUDA toolkit are both present, or when NOVA_FAST_BUILD_CUDA=1 forces it. Otherwise the pure-Python
parts install and one line says why the extension was skipped.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")


def _cuda_extension():
    forced = os.environ.get("NOVA_FAST_BUILD_CUDA") == "1"
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
        return [], {}
    # Kernel sources live in csrc/*.cu (pure CUDA, no torch headers); the torch glue is csrc/*.cpp.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
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
