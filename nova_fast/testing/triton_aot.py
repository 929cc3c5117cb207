"""Compile Triton kernels ahead of time for sm_80 / sm_90 without a GPU, and read their resources.

Each ``nova_fast.kernels.<op>`` module lists ``AOT_SPECS``: a list of :class:`AotSpec`, one per
signature worth checking (dtype, head dim, block sizes). ``compile_module(name)`` compiles all of
them for each target and reports registers, local memory (spills), shared memory and the count of
tensor-core instructions (HMMA on sm_80, HGMMA = wgmma on sm_90) in the SASS, read with the
cuobjdump shipped inside the triton wheel.

The Triton interpreter swaps ``@triton.jit`` functions at import time, so tests (which run with
TRITON_INTERPRET=1) call :func:`compile_in_subprocess`, which compiles in a clean interpreter-off
process. ``python -m nova_fast.testing.triton_aot nova_fast.kernels.modulate`` prints a table.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = (80, 90)
# the triton the lent GPU machine has: .ci/env.sh installs it beside the venv's own (a --target folder
# put first on PYTHONPATH), so the kernels are AOT-compiled with both (compile_in_subprocess(triton_path=))
COMPAT_TRITON = "3.6.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


def compat_triton_path(version: str = COMPAT_TRITON) -> Path | None:
    """The folder holding triton ``version`` for PYTHONPATH (made by .ci/env.sh), or None if absent."""
    path = Path(os.environ.get("NOVA_FAST_COMPAT_TRITON", REPO_ROOT / ".venv" / f"triton-{version}"))
    return path if (path / "triton" / "__init__.py").exists() else None


@dataclass
class AotSpec:
    kernel: str                      # attribute name of the @triton.jit function in the module
    signature: dict                  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    tensor_cores: bool = False       # the kernel calls tl.dot: expect HMMA (sm_80) / HGMMA (sm_90)
    label: str = ""
    archs: tuple | None = None       # the targets this kernel is for (None: every target), e.g. (90,) for TMA

    def name(self) -> str:
        return self.label or f"{self.kernel}[{','.join(f'{k}={v}' for k, v in self.constexprs.items())}]"


@dataclass
class AotResult:
    module: str
    spec: str
    arch: int
    registers: int
    local_bytes: int      # local memory per thread: > 0 means register spills (or local arrays)
    shared_bytes: int     # Triton's dynamic shared memory
    hmma: int             # HMMA instructions (mma.sync, sm_80 style tensor cores)
    hgmma: int            # HGMMA instructions (wgmma, sm_90 tensor cores)
    tensor_cores: bool
    error: str | None = None
    triton_version: str | None = None
    tma: int = 0          # TMA loads (UTMALDG, sm_90)
    setmaxnreg: int = 0   # register reallocation between warpgroups (USETMAXREG: warp specialization)
    threads: int = 0      # threads per CTA the compiled kernel launches with (launch_threads)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{name} not found in the triton wheel at {path}")
    return str(path)


def _resources(cubin: bytes) -> tuple[int, int, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"could not read cuobjdump -res-usage output:\n{res}")
    return int(m.group(1)), int(m.group(4)) + int(m.group(2)), sass


def launch_threads(compiled) -> int:
    """Threads per CTA a compiled kernel launches with: 32 x its metadata's num_warps, which triton sets
    to the total after warp specialisation (the requested warps plus the producer's and the extra
    consumers' warp groups), so not always 32 x the num_warps asked for."""
    return 32 * compiled.metadata.num_warps


def sass_count(sass: str, opcode: str) -> int:
    """How many ``opcode`` instructions (e.g. HGMMA, UTMALDG, USETMAXREG) the SASS holds."""
    return len(re.findall(rf"\b{opcode}\b", sass))


def compile_spec(fn, spec: AotSpec, arch: int):
    """Compile one kernel for one target; returns (compiled kernel, registers, local bytes, sass)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    regs, local, sass = _resources(compiled.asm["cubin"])
    return compiled, regs, local, sass


def one_dtype_per_config(specs: list[AotSpec]) -> list[AotSpec]:
    """One spec per (kernel, constexprs, warps, stages): the dtype axis dropped, bf16 kept where there
    is one (what a GPU runs). Every constexpr branch is still compiled, for a third of the time."""
    chosen: dict = {}
    for spec in specs:
        key = (spec.kernel, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages)
        is_bf16 = any(str(t) == "*bf16" for t in spec.signature.values())
        if key not in chosen or (is_bf16 and not chosen[key][0]):
            chosen[key] = (is_bf16, spec)
    return [spec for _, spec in chosen.values()]


def compile_module(module_name: str, targets=TARGETS, one_dtype: bool = False,
                   specs_attr: str = "AOT_SPECS") -> list[AotResult]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset; use compile_in_subprocess()")
    import triton

    module = importlib.import_module(module_name)
    specs = getattr(module, specs_attr)
    specs = one_dtype_per_config(specs) if one_dtype else specs
    results = []
    for spec in specs:
        for arch in targets:
            if spec.archs is not None and arch not in spec.archs:
                continue
            try:
                compiled, regs, local, sass = compile_spec(getattr(module, spec.kernel), spec, arch)
                results.append(AotResult(module_name, spec.name(), arch, regs, local, compiled.metadata.shared,
                                         sass_count(sass, "HMMA"), sass_count(sass, "HGMMA"),
                                         spec.tensor_cores, triton_version=triton.__version__,
                                         tma=sass_count(sass, "UTMALDG"), setmaxnreg=sass_count(sass, "USETMAXREG"),
                                         threads=launch_threads(compiled)))
            except Exception as exc:  # reported per spec so one failure does not hide the others
                results.append(AotResult(module_name, spec.name(), arch, 0, 0, 0, 0, 0, spec.tensor_cores,
                                         error=f"{exc.__class__.__name__}: {str(exc)[:2000]}",
                                         triton_version=triton.__version__))
    return results


def run_interpreter_off(module: str, args: list[str], timeout: float = 900, *,
                        triton_path: str | Path | None = None) -> str:
    """``python -m module *args`` in a fresh process with the interpreter off (safe to call from tests);
    ``triton_path``: a folder holding another triton, put first on PYTHONPATH (see COMPAT_TRITON).
    Returns the last line of its stdout (the JSON the module's ``--json`` prints)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_path), *filter(None, [env.get("PYTHONPATH")])])
        # its own compile cache: kernels cached by one triton are not read back by the other
        env["TRITON_CACHE_DIR"] = str(Path(triton_path) / ".cache")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)[:200]} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


def compile_in_subprocess(module_name: str, targets=TARGETS, timeout: float = 900, *,
                          triton_path: str | Path | None = None, one_dtype: bool = False,
                          specs_attr: str = "AOT_SPECS") -> list[AotResult]:
    """compile_module in a fresh process with the interpreter off (safe to call from tests);
    ``triton_path``: a folder holding another triton, put first on PYTHONPATH (see COMPAT_TRITON)."""
    args = [module_name, "--json", "--targets", ",".join(map(str, targets)), "--specs", specs_attr,
            *(["--one-dtype"] if one_dtype else [])]
    out = run_interpreter_off("nova_fast.testing.triton_aot", args, timeout, triton_path=triton_path)
    return [AotResult(**r) for r in json.loads(out)]


def problems(results: list[AotResult]) -> list[str]:
    """What is wrong in a set of results: compile errors, spills, tensor-core kernels without MMA."""
    out = []
    for r in results:
        where = f"{r.module}:{r.spec} sm_{r.arch}"
        if r.error:
            out.append(f"{where} does not compile: {r.error}")
            continue
        if r.local_bytes:
            out.append(f"{where} spills: {r.local_bytes} B local memory per thread ({r.registers} registers)")
        if r.tensor_cores and r.arch >= 90 and r.hgmma == 0:
            out.append(f"{where} has no HGMMA in its SASS (expected wgmma tensor cores on sm_90)")
        if r.tensor_cores and r.arch == 80 and r.hmma == 0:
            out.append(f"{where} has no HMMA in its SASS (expected tensor cores on sm_80)")
    return out


def format_table(results: list[AotResult]) -> str:
    rows = [f"{'kernel':58} {'arch':>5} {'regs':>5} {'local':>6} {'smem':>7} {'HMMA':>5} {'HGMMA':>6}"]
    for r in results:
        if r.error:
            rows.append(f"{r.spec:58} sm_{r.arch:<2} ERROR {r.error[:60]}")
        else:
            rows.append(f"{r.spec:58} sm_{r.arch:<2} {r.registers:5d} {r.local_bytes:6d} {r.shared_bytes:7d} "
                        f"{r.hmma:5d} {r.hgmma:6d}")
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="AOT-compile a kernels module for sm_80/sm_90 and report resources")
    p.add_argument("module")
    p.add_argument("--json", action="store_true")
    p.add_argument("--targets", default=",".join(map(str, TARGETS)))
    p.add_argument("--specs", default="AOT_SPECS", help="the module's list of AotSpec to compile")
    p.add_argument("--one-dtype", action="store_true", help="one spec per kernel configuration (bf16 where there is one)")
    a = p.parse_args(argv)
    results = compile_module(a.module, tuple(int(t) for t in a.targets.split(",")), one_dtype=a.one_dtype,
                             specs_attr=a.specs)
    if a.json:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
    else:
        print(format_table(results))
        for line in problems(results):
            print("PROBLEM:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
