"""``nova-fast aot-report``: per kernel, what a GPU would see, read without one.

For every Triton kernel configuration (each ``kernels/*.py`` module's ``AOT_SPECS``) and every CUDA
kernel (``csrc/*.cu``), for sm_80 and sm_90: registers, spills (local memory), shared memory,
threads per CTA, resident CTAs per SM (from registers, shared memory and threads against each
architecture's limits, with the limiting resource), tensor-core instructions in the SASS (HMMA,
HGMMA) and a PROJECTED fraction of peak from the model stated in ``MODEL`` below; Triton kernels
with the venv's triton and, where .ci/env.sh installed it, the GPU machine's triton 3.6. Beside it,
the measured parity status on this machine: the kernels' CPU tests (Triton interpreter, CUDA
through the host SIMT harness) run with pytest, counts per kernel file.

The result goes to ``bench/results/aot-<date>-<time>.{json,md}`` with the bench's JSON envelope
(schema, created, device, environment, options, cases, total_s); one case per kernel
configuration, its per-architecture figures under ``metrics``. Nothing in it is a GPU timing.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nova_fast.testing import cuda_host, triton_aot

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_MODULES = ("toolchain_probe", "adaln", "denoise_step", "group_causal_attention")
CUDA_SOURCES = ("adaln", "denoise_step")

# Per-SM limits (CUDA programming guide, compute capability 8.0 and 9.0).
ARCH_LIMITS = {
    80: dict(gpu="A100", regs_per_sm=65536, reg_alloc_unit=256, max_warps_per_sm=64, max_threads_per_sm=2048,
             max_ctas_per_sm=32, smem_per_sm=167936, smem_per_cta_max=166912, smem_reserved_per_cta=1024,
             sms=108, hbm_bytes_per_s=2.0e12, tensor_flops=312e12),
    90: dict(gpu="H100 SXM", regs_per_sm=65536, reg_alloc_unit=256, max_warps_per_sm=64, max_threads_per_sm=2048,
             max_ctas_per_sm=32, smem_per_sm=233472, smem_per_cta_max=232448, smem_reserved_per_cta=1024,
             sms=132, hbm_bytes_per_s=3.35e12, tensor_flops=990e12),
}

# The stated model behind "projected fraction of peak" (a projection, not a measurement):
MODEL = {
    "label": "PROJECTED fraction of peak (a model, not a measurement)",
    "tensor_core_kernels": "fraction of the bf16 tensor peak = path ceiling x occupancy factor x spill factor; "
                           "path ceiling on sm_90: HGMMA (wgmma) with TMA loads (UTMALDG) and warp specialization "
                           "(USETMAXREG) 0.75 (what FlashAttention-3 reaches), HGMMA without them 0.50 (software-"
                           "pipelined wgmma, Triton's own attention on H100), HMMA (mma.sync) only 0.35 "
                           "(FlashAttention-2 on H100); on sm_80: HMMA 0.70 (FlashAttention-2 on A100); no "
                           "tensor-core instruction 0.05; occupancy factor min(1, resident warps per SM / 8) (two "
                           "warpgroups keep the tensor cores fed)",
    "memory_bound_kernels": "fraction of HBM bandwidth = min(1, resident CTAs x threads x 32 B in flight / "
                            "(bandwidth x 600 ns / SMs)) x spill factor (Little's law: two 16-byte loads "
                            "outstanding per thread; A100 2.0 TB/s, 108 SMs; H100 3.35 TB/s, 132 SMs)",
    "spill_factor": "0.8 when the kernel uses local memory (spills), else 1",
    "not_modelled": "mask sparsity, tile quantization, load imbalance, L2 reuse, launch overhead",
}
LATENCY_S = 600e-9
BYTES_IN_FLIGHT_PER_THREAD = 32
TC_CEILING = {(90, "hgmma+tma+ws"): 0.75, (90, "hgmma"): 0.50, (90, "hmma"): 0.35, (80, "hmma"): 0.70}
NO_TC_CEILING = 0.05
SPILL_FACTOR = 0.8

# CUDA kernels without __launch_bounds__: threads per CTA as their launcher in csrc/ sets them
# (guided_step_kernel<T, GUIDE, WARP_PER_GROUP>: 4 warps when one warp per group, else 256 threads)
LAUNCHER_THREADS = ((re.compile(r"guided_step_kernel.*Lb1E"), 128), (re.compile(r"guided_step_kernel.*Lb0E"), 256))

# kernel file -> (test files, marker) whose CPU runs check its parity against the reference
PARITY_TESTS = {
    "nova_fast.kernels.toolchain_probe": (("tests/test_toolchain.py",), "triton"),
    "nova_fast.kernels.adaln": (("tests/test_modulate.py", "tests/test_residual_norm.py"), "triton"),
    "nova_fast.kernels.denoise_step": (("tests/test_denoise_step.py", "tests/test_denoise_tokens.py"), "triton"),
    "nova_fast.kernels.group_causal_attention": (("tests/test_group_causal_attention.py",), "triton"),
    "csrc/adaln.cu": (("tests/test_modulate.py", "tests/test_residual_norm.py"), "host_cuda"),
    "csrc/denoise_step.cu": (("tests/test_denoise_step.py",), "host_cuda"),
}


def ctas_per_sm(registers: int, shared_bytes: int, threads: int, arch: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them ('registers', 'shared memory',
    'threads', 'CTA slots'); 0 with 'shared memory' when one CTA's shared memory does not fit."""
    lim = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // warps      # the warp cap is the threads limit
    if shared_bytes > lim["smem_per_cta_max"]:
        return 0, "shared memory"
    by_smem = lim["smem_per_sm"] // (shared_bytes + lim["smem_reserved_per_cta"])
    by_threads = lim["max_threads_per_sm"] // (warps * 32)
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
              "CTA slots": lim["max_ctas_per_sm"]}
    name = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    return limits[name], name


def projected_fraction(arch: int, ctas: int, threads: int, tensor_cores: bool, hmma: int, hgmma: int,
                       spills: bool, tma: int = 0, setmaxnreg: int = 0) -> tuple[float, str]:
    """(fraction, of what) from MODEL."""
    spill = SPILL_FACTOR if spills else 1.0
    warps = ctas * math.ceil(threads / 32)
    if tensor_cores:
        path = ("hgmma+tma+ws" if tma and setmaxnreg else "hgmma") if hgmma else ("hmma" if hmma else None)
        ceiling = TC_CEILING.get((arch, path), NO_TC_CEILING) if path else NO_TC_CEILING
        return ceiling * min(1.0, warps / 8) * spill, "bf16 tensor peak"
    lim = ARCH_LIMITS[arch]
    needed = lim["hbm_bytes_per_s"] * LATENCY_S / lim["sms"]
    return min(1.0, ctas * threads * BYTES_IN_FLIGHT_PER_THREAD / needed) * spill, "HBM bandwidth"


def _figures(arch, registers, local, shared, threads, tensor_cores, hmma, hgmma, error=None, tma=0,
             setmaxnreg=0) -> dict:
    if error:
        return {"error": error}
    ctas, limiter = ctas_per_sm(registers, shared, threads, arch)
    frac, of = projected_fraction(arch, ctas, threads, tensor_cores, hmma, hgmma, local > 0, tma, setmaxnreg)
    return {"registers": registers, "spill_bytes": local, "shared_bytes": shared, "threads": threads,
            "ctas_per_sm": ctas, "cta_limit": limiter, "hmma": hmma, "hgmma": hgmma, "tma": tma,
            "setmaxnreg": setmaxnreg,
            "projected_fraction_of_peak": round(frac, 3), "projected_of": of}


# ---- Triton ------------------------------------------------------------------------------------
def triton_cases(modules=TRITON_MODULES, archs=(80, 90), compat: bool = True, one_dtype: bool = False,
                 log=print) -> list[dict]:
    cases: dict[str, dict] = {}
    runs = [("current", None)]
    compat_path = triton_aot.compat_triton_path() if compat else None
    if compat_path is not None:
        runs.append(("compat", compat_path))
    for module in modules:
        name = f"nova_fast.kernels.{module}"
        specs = importlib.import_module(name).AOT_SPECS
        specs = triton_aot.one_dtype_per_config(specs) if one_dtype else specs
        by_label = {s.name(): s for s in specs}
        for which, path in runs:
            log(f"aot-report: {name} with the {which} triton ...")
            results = triton_aot.compile_in_subprocess(name, targets=archs, triton_path=path, one_dtype=one_dtype)
            for r in results:
                spec = by_label[r.spec]
                case = cases.setdefault(f"{name}:{r.spec}", {
                    "id": f"aot/triton/{module}:{r.spec}", "op": module, "name": r.spec, "kind": "triton",
                    "source": f"kernels/{module}.py", "kernel": spec.kernel,
                    "sizes": {**spec.constexprs, "num_warps": spec.num_warps, "num_stages": spec.num_stages},
                    "tensor_cores": spec.tensor_cores, "metrics": {}})
                key = f"sm_{r.arch}" if which == "current" else f"sm_{r.arch} triton {r.triton_version}"
                case["metrics"][key] = {"triton": r.triton_version, **_figures(
                    r.arch, r.registers, r.local_bytes, r.shared_bytes, r.threads, spec.tensor_cores,
                    r.hmma, r.hgmma, r.error, r.tma, r.setmaxnreg)}
    return list(cases.values())


# ---- CUDA --------------------------------------------------------------------------------------
def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _threads(mangled: str, maxntid: dict) -> tuple[int | None, str]:
    if mangled in maxntid:
        return maxntid[mangled], "__launch_bounds__"
    for pattern, threads in LAUNCHER_THREADS:
        if pattern.search(mangled):
            return threads, "launcher"
    return None, "unknown"


def cuda_cases(sources=CUDA_SOURCES, archs=(80, 90), log=print) -> list[dict]:
    cases: dict[str, dict] = {}
    for source in sources:
        # a name in csrc/ ('adaln'), or a path to any .cu file
        path = Path(source) if str(source).endswith(".cu") else cuda_host.csrc_path(source)
        source = path.stem
        for arch in archs:
            log(f"aot-report: csrc/{source}.cu for sm_{arch} ...")
            resources, sass, maxntid = cuda_host.nvcc_cubin(path, f"sm_{arch}")
            per_fn = cuda_host.sass_functions(sass)
            pretty = _demangle([k.name for k in resources])
            for k in resources:
                threads, where = _threads(k.name, maxntid)
                fn_sass = per_fn.get(k.name, "")
                hmma, hgmma = len(re.findall(r"\bHMMA\b", fn_sass)), len(re.findall(r"\bHGMMA\b", fn_sass))
                tma, setmaxnreg = len(re.findall(r"\bUTMALDG\b", fn_sass)), len(re.findall(r"\bUSETMAXREG\b", fn_sass))
                case = cases.setdefault(k.name, {
                    "id": f"aot/cuda/{source}:{pretty[k.name]}", "op": source, "name": pretty[k.name], "kind": "cuda",
                    "source": f"csrc/{source}.cu", "kernel": k.name, "sizes": {"threads_from": where},
                    "tensor_cores": False, "metrics": {}})
                if threads is None:
                    case["metrics"][f"sm_{arch}"] = {"error": "threads per CTA unknown (no __launch_bounds__, "
                                                              "not in LAUNCHER_THREADS)",
                                                     "registers": k.registers, "shared_bytes": k.shared_bytes}
                    continue
                case["metrics"][f"sm_{arch}"] = {"nvcc": "sass", **_figures(
                    arch, k.registers, k.spill_stores + k.spill_loads, k.shared_bytes, threads, False, hmma, hgmma,
                    None, tma, setmaxnreg),
                    "stack_bytes": k.stack_bytes}
    return list(cases.values())


# ---- parity (measured here, on the CPU) ----------------------------------------------------------
def parity_status(files=None, python: str = sys.executable, timeout: float = 1800, log=print) -> dict:
    """Run each kernel file's CPU parity tests (PARITY_TESTS) and count outcomes from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out = {}
    for kernel_file, (tests, marker) in PARITY_TESTS.items():
        if files is not None and kernel_file not in files:
            continue
        log(f"aot-report: parity tests of {kernel_file} (-m {marker}) ...")
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            t0 = time.perf_counter()
            proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *tests,
                                   "--junitxml", str(junit)], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            entry = {"tests": list(tests), "marker": marker, "seconds": round(time.perf_counter() - t0, 1),
                     "runs_on": "Triton interpreter (CPU)" if marker == "triton" else "host SIMT harness (CPU)"}
            if junit.exists():
                root = ET.parse(junit).getroot()
                suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
                tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
                entry.update(passed=tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
                             failed=tot["failures"] + tot["errors"], skipped=tot["skipped"])
            else:
                entry.update(error=f"pytest exit {proc.returncode}: {proc.stdout[-500:]}")
        out[kernel_file] = entry
    return out


def _git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


def build_report(*, modules=TRITON_MODULES, sources=CUDA_SOURCES, archs=(80, 90), compat=True, one_dtype=False,
                 parity=True, log=print) -> dict:
    from nova_fast.bench import runner

    t0 = time.perf_counter()
    cases = triton_cases(modules, archs, compat, one_dtype, log) + cuda_cases(sources, archs, log)
    files = {f"nova_fast.kernels.{m}" for m in modules} | {f"csrc/{s}.cu" for s in sources}
    return {"schema": 1, "kind": "aot-report", "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": "aot", "environment": {**runner.environment(), "commit": _git_commit()},
            "options": {"modules": list(modules), "cuda_sources": list(sources), "archs": list(archs),
                        "compat_triton": compat and triton_aot.compat_triton_path() is not None,
                        "one_dtype": one_dtype, "parity": parity},
            "model": {**MODEL, "arch_limits": ARCH_LIMITS, "tc_ceiling": {f"sm_{a}/{p}": v for (a, p), v in
                                                                          TC_CEILING.items()}},
            "cases": cases, "parity": parity_status(files, log=log) if parity else {},
            "total_s": round(time.perf_counter() - t0, 1)}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# nova_fast AOT report ({report['created']}, commit {env.get('commit')})", "",
             f"No GPU: Triton kernels compiled ahead of time (triton {env.get('triton')}"
             + (f" and {triton_aot.COMPAT_TRITON}" if report["options"].get("compat_triton") else "")
             + "), CUDA kernels with nvcc -Xptxas -v; SASS read with cuobjdump. CTAs per SM from registers, "
               "shared memory and threads against each architecture's limits.", "",
             f"**{report['model']['label']}.** Tensor-core kernels: {report['model']['tensor_core_kernels']}. "
             f"Memory-bound kernels: {report['model']['memory_bound_kernels']}. Spills: "
             f"{report['model']['spill_factor']}. Not modelled: {report['model']['not_modelled']}.", "",
             "| kernel | arch | regs | spill B | smem B | threads | CTAs/SM (limit) | HMMA | HGMMA | TMA / SETMAXNREG | projected % of peak | parity (CPU, measured) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    parity = report.get("parity", {})
    for case in report["cases"]:
        file_key = f"nova_fast.kernels.{case['op']}" if case["kind"] == "triton" else case["source"]
        p = parity.get(file_key)
        par = "-" if not p else (p.get("error") or f"{p['passed']} passed, {p['failed']} failed ({p['runs_on']})")
        for key, m in case["metrics"].items():
            name = case["name"] if len(case["name"]) < 80 else case["name"][:77] + "..."
            if "error" in m:
                lines.append(f"| {case['kind']} {name} | {key} | ERROR: {m['error'][:120]} | | | | | | | | | {par} |")
                continue
            lines.append(f"| {case['kind']} {name} | {key} | {m['registers']} | {m['spill_bytes']} | "
                         f"{m['shared_bytes']} | {m['threads']} | {m['ctas_per_sm']} ({m['cta_limit']}) | {m['hmma']} | "
                         f"{m['hgmma']} | {m['tma']} / {m['setmaxnreg']} | "
                         f"{100 * m['projected_fraction_of_peak']:.0f}% of {m['projected_of']} | {par} |")
    if parity:
        lines += ["", "## Parity on this machine (measured, CPU)", "",
                  "| kernel file | tests | runs on | passed | failed | skipped | seconds |", "|---|---|---|---|---|---|---|"]
        for f, p in parity.items():
            if "error" in p:
                lines.append(f"| {f} | {', '.join(p['tests'])} -m {p['marker']} | {p['runs_on']} | ERROR {p['error'][:100]} | | | |")
            else:
                lines.append(f"| {f} | {', '.join(p['tests'])} -m {p['marker']} | {p['runs_on']} | {p['passed']} | "
                             f"{p['failed']} | {p['skipped']} | {p['seconds']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path | str | None = None, stem: str | None = None) -> dict[str, Path]:
    from nova_fast.bench import runner

    out_dir = Path(out_dir) if out_dir is not None else runner.DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"aot-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(runner._jsonable(report), indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    return paths
