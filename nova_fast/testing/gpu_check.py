"""The prepared device check behind ``bench/gpu_check.sh``: every GPU-only step, each under its own budget.

A GPU may be lent for a few minutes, with no network. This runs, in order, each stage under its own
time limit and within one total budget (default 8 minutes):

    env        nvidia-smi, versions of python / torch / triton / nvcc / ncu
    install    nova_fast into the machine's own python: pip -e, no dependencies, no build isolation
    build      nova_fast._C for the local GPU (setup.py, NOVA_FAST_CUDA_ARCHS=native), then import it
    tests      the GPU tests: pytest -m "gpu or triton" (compiled Triton, the CUDA extension, CUDA-graph
               capture and replay, the flash-attn path where installed; GPU_TESTS among them)
    bench-ops  nova-fast bench --full, one run per op suite (osp480 shapes), each its own result files
    bench-gen  nova-fast bench on a shortened osp480 generation (--gen-sizes)
    ncu        Nsight Compute on nova_fast's own kernels inside the spatial encoder, short generation
    summary    summary.md and status.json (always written, whatever happened before)

Everything lands in one output folder: ``logs/<stage>.log`` (command lines, stdout and stderr),
``bench/*.{json,md,png}`` (the bench's own result format), ``tests/junit*.xml``, ``ncu/*``,
``status.json`` and ``summary.md``. A stage that fails or runs out of time is killed (its whole
process group) and recorded; the next stage still runs; what a stage wrote before it stopped stays.

``--dry-run`` (on any machine, CPU is fine) walks the same stages: it records every command it
would run, checks that every file, entry point and option they name exists, and runs the cheap
ones with tiny sizes (pytest collection instead of the tests, the tiny generation instead of
osp480, the CPU profile instead of ncu). Nothing in a dry run is a GPU measurement.

This file runs as a plain script (``python3 nova_fast/testing/gpu_check.py OUT``) before nova_fast
is installed, so it imports nothing from nova_fast at module level.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 480.0          # the 8 minutes the device check may take, start to summary
SUMMARY_RESERVE_S = 5.0         # kept back from the last stage so the summary is always written

BENCH_OPS = ("modulate", "residual_norm", "denoise_tokens", "group_causal_attention")
# the released osp480 run is 2 latent frames x 64 AR steps x 25 denoising steps; on the device
# the generation is shortened (frames x AR steps x denoising steps) to fit its budget
GEN_SIZES_GPU = "1x16x10"
GEN_SIZES_DRY = "1x1x1"
PYTEST_MARKERS = "gpu or triton"
# tests the selection must hold (each skips without a GPU): the extension loads, CUDA-graph replay,
# the compiled kernels and the accelerated generation on the GPU
GPU_TESTS = (
    "tests/test_toolchain.py::test_extension_loads_on_gpu_machines",
    "tests/test_denoise_tokens.py::test_cuda_graph_replay_matches_eager",
    "tests/test_gpu_paths.py::",
)
NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis")
NCU_METRICS = ("gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed", "launch__registers_per_thread",
               "sm__warps_active.avg.pct_of_peak_sustained_active")


@dataclass
class Command:
    """One command of a stage: argv (or a function giving it, evaluated just before it runs)."""
    argv: list[str] | Callable[[], list[str]]
    env: dict = field(default_factory=dict)
    stdout_to: str | None = None      # path relative to the output folder: stdout goes there, not to the log
    optional_tools: tuple = ()        # executables that may be missing (dry run: recorded, not a failure)

    def resolve(self) -> list[str]:
        return list(self.argv() if callable(self.argv) else self.argv)


@dataclass
class Stage:
    name: str
    budget_s: float
    what: str
    commands: list[Command]
    dry_commands: list[Command] = field(default_factory=list)
    checks: list[Callable[[], str | None]] = field(default_factory=list)   # dry run: None ok, else why not


@dataclass
class StageResult:
    name: str
    status: str = "not run"           # ok, failed, timeout, skipped, dry-ok, dry-failed
    seconds: float = 0.0
    budget_s: float = 0.0
    commands: list[str] = field(default_factory=list)      # what ran (or, in a dry run, would run)
    ran: list[str] = field(default_factory=list)           # dry run: what it executed to check
    returncodes: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: str = ""


# ---- running one command under a deadline ---------------------------------------------------------
def _run(argv: list[str], env: dict, timeout: float, log, stdout_path: Path | None) -> tuple[int | None, bool]:
    """Run argv in its own process group; kill the group at the deadline. (returncode, timed out)."""
    log.write(f"$ {shlex.join(argv)}\n")
    if env:
        log.write("  env: " + " ".join(f"{k}={v}" for k, v in env.items()) + "\n")
    log.flush()
    full_env = {**os.environ, **env}
    out = open(stdout_path, "w") if stdout_path else log
    try:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=log, env=full_env, cwd=REPO_ROOT, start_new_session=True)
        except OSError as exc:   # the program is missing or not executable
            log.write(f"  cannot start: {exc}\n")
            return 127, False
        try:
            return proc.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"  TIMEOUT after {timeout:.0f} s: process group killed\n")
            return None, True
    finally:
        if stdout_path:
            out.close()
        log.flush()


def run_stages(stages: list[Stage], out: Path, *, dry_run: bool = False, total_budget_s: float = TOTAL_BUDGET_S,
               header: dict | None = None) -> list[StageResult]:
    """Run every stage in order (a failure never stops the next one); write status.json and summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    results: list[StageResult] = []
    header = {"started": _dt.datetime.now().isoformat(timespec="seconds"), "dry_run": dry_run,
              "total_budget_s": total_budget_s, "host": platform.node(), **(header or {})}
    for stage in stages:
        res = StageResult(stage.name, budget_s=stage.budget_s, log=f"logs/{stage.name}.log")
        results.append(res)
        remaining = total_budget_s - (time.monotonic() - started) - SUMMARY_RESERVE_S
        budget = min(stage.budget_s, remaining)
        res.budget_s = round(budget, 1)
        if budget <= 1:
            res.commands = [shlex.join(_safe_resolve(c)) for c in stage.commands]
            res.status = "skipped"
            res.problems.append(f"no time left in the {total_budget_s:.0f} s total budget")
            _write_status(out, header, results, started)
            continue
        t0, wall0 = time.monotonic(), time.time()
        with open(out / res.log, "w") as log:
            log.write(f"# stage {stage.name}: {stage.what}\n# budget {budget:.0f} s"
                      + (" (DRY RUN)" if dry_run else "") + "\n")
            if dry_run:
                _dry_stage(stage, res, out, log, t0 + budget)
            else:
                _real_stage(stage, res, out, log, t0 + budget)
        res.seconds = round(time.monotonic() - t0, 1)
        if res.status == "timeout" or any(rc is None for rc in res.returncodes):
            res.notes += _clear_stale_locks(wall0)
        _write_status(out, header, results, started)   # after every stage: a killed run keeps what it had
    _write_status(out, header, results, started)
    write_summary(out, header, results)
    return results


def _clear_stale_locks(since: float) -> list[str]:
    """A build killed at its deadline (torch's extension builder) leaves its lock file behind, and every
    later build of the same extension would wait on it for ever: remove the locks made since ``since``
    (the killed stage's process group held them; nothing else of this check is running)."""
    notes = []
    cache = Path(os.environ.get("NOVA_FAST_CACHE", REPO_ROOT / ".nova_fast_cache"))
    for lock in cache.glob("**/lock"):
        try:
            if lock.stat().st_mtime >= since - 1:
                lock.unlink()
                notes.append(f"removed the stale build lock {lock} left by the killed stage")
        except OSError:
            continue
    return notes


def _safe_resolve(cmd: Command) -> list[str]:
    try:
        return cmd.resolve()
    except Exception as exc:  # noqa: BLE001 -- a command that cannot even be formed is a problem to show
        return [f"<cannot form command: {type(exc).__name__}: {exc}>"]


def _real_stage(stage: Stage, res: StageResult, out: Path, log, deadline: float) -> None:
    res.status = "ok"
    for cmd in stage.commands:
        left = deadline - time.monotonic()
        if left <= 0.5:
            res.status = "timeout"
            res.problems.append("stage budget spent before this command: " + shlex.join(_safe_resolve(cmd)))
            break
        try:
            argv = cmd.resolve()
        except Exception as exc:  # noqa: BLE001
            res.status = "failed"
            res.problems.append(f"cannot form command: {type(exc).__name__}: {exc}")
            continue
        res.commands.append(shlex.join(argv))
        rc, timed_out = _run_into(cmd, argv, res, out, log, left)
        if timed_out:
            res.status = "timeout"
            res.problems.append(f"timed out: {shlex.join(argv)}")
            break
        if rc != 0:
            res.status = "failed"
            res.problems.append(f"exit {rc}: {shlex.join(argv)}")


def _run_into(cmd, argv: list[str], res: StageResult, out: Path, log, timeout: float) -> tuple[int | None, bool]:
    """``_run`` a stage's command, its stdout into ``out / cmd.stdout_to`` when it names one; the
    return code is recorded in ``res``."""
    stdout_path = out / cmd.stdout_to if cmd.stdout_to else None
    if stdout_path:
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
    rc, timed_out = _run(argv, cmd.env, timeout, log, stdout_path)
    res.returncodes.append(rc)
    return rc, timed_out


def _dry_stage(stage: Stage, res: StageResult, out: Path, log, deadline: float) -> None:
    res.status = "dry-ok"
    # the cheap commands first: a later command may be formed from what they write
    for cmd in stage.dry_commands:
        left = deadline - time.monotonic()
        argv = _safe_resolve(cmd)
        res.ran.append(shlex.join(argv))
        rc, timed_out = _run_into(cmd, argv, res, out, log, left)
        if timed_out or rc != 0:
            res.problems.append(("timed out" if timed_out else f"exit {rc}") + f": {shlex.join(argv)}")
    for cmd in stage.commands:
        argv = _safe_resolve(cmd)
        res.commands.append(shlex.join(argv))
        log.write(f"would run: {shlex.join(argv)}\n")
        exe = argv[0]
        if exe.startswith("<cannot form command"):
            res.problems.append(exe)
        elif not (shutil.which(exe) or Path(exe).exists()):
            note = f"{exe} is not on this machine (needed on the GPU machine)"
            if exe in cmd.optional_tools:
                if note not in res.notes:
                    res.notes.append(note)
            else:
                res.problems.append(f"{exe} not found")
    for check in stage.checks:
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001
            problem = f"{getattr(check, '__name__', 'check')} raised {type(exc).__name__}: {exc}"
        if problem:
            res.problems.append(problem)
    if res.problems:
        res.status = "dry-failed"


def _write_status(out: Path, header: dict, results: list[StageResult], started: float) -> None:
    data = {**header, "elapsed_s": round(time.monotonic() - started, 1), "stages": [asdict(r) for r in results]}
    (out / "status.json").write_text(json.dumps(data, indent=1) + "\n")


# ---- the summary ----------------------------------------------------------------------------------
def _junit_counts(path: Path) -> str | None:
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return f"{path.name}: unreadable ({exc})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = (f"{path.name}: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, "
            f"{tot['skipped']} skipped")
    return text + "".join(f"\n  - FAILED {name}" for name in failed[:20])


def _bench_lines(out: Path) -> list[str]:
    lines = []
    for path in sorted((out / "bench").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            lines.append(f"- `{path.name}`: unreadable ({exc})")
            continue
        lines.append(f"- `bench/{path.name}` (device {data.get('device')}, {data.get('total_s')} s)")
        for case in data.get("cases", []):
            if case.get("error") and not case.get("impls"):
                lines.append(f"  - {case['id']}: ERROR {case['error'][:200]}")
                continue
            parts = []
            for label, entry in case.get("impls", {}).items():
                ratio = entry.get("speedup")
                parts.append(f"{label} {entry.get('median_s', 0) * 1e3:.3f} ms"
                             + (f" ({ratio:.2f}x)" if ratio is not None and label != case.get("baseline") else ""))
            parts += [f"{label} unavailable" for label in case.get("unavailable", {})]
            lines.append(f"  - {case['id']}: " + "; ".join(parts))
    return lines


def _ncu_lines(out: Path) -> list[str]:
    csv_path = out / "ncu" / "spatial-kernels.csv"
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return []
    import csv

    rows = list(csv.reader(csv_path.read_text().splitlines()))
    header_i = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if header_i is None:
        return [f"- `ncu/{csv_path.name}` has no kernel table"]
    head = rows[header_i]
    body = [r for r in rows[header_i + 1:] if len(r) == len(head) and r[head.index("Kernel Name")]]
    body = [r for r in body if not r[0].startswith("ID") or r[0].isdigit()]
    name_i = head.index("Kernel Name")
    wanted = [m for m in NCU_METRICS if m in head]
    per_kernel: dict[str, list[list[str]]] = {}
    for r in body:
        if r[0].isdigit():
            per_kernel.setdefault(r[name_i], []).append(r)
    lines = [f"- `ncu/{csv_path.name}`: {sum(map(len, per_kernel.values()))} kernel launches profiled"]
    for name, launches in per_kernel.items():
        vals = []
        for m in wanted:
            try:
                nums = [float(r[head.index(m)].replace(",", "")) for r in launches]
                vals.append(f"{m.split('.')[0]}={sum(nums) / len(nums):.4g}")
            except ValueError:
                continue
        lines.append(f"  - {name} x{len(launches)}: " + " ".join(vals))
    return lines


def write_summary(out: Path, header: dict, results: list[StageResult]) -> Path:
    dry = header.get("dry_run")
    lines = [f"# nova_fast device check{' (DRY RUN: nothing here is a GPU measurement)' if dry else ''}", "",
             f"started {header.get('started')} on {header.get('host')}; total budget "
             f"{header.get('total_budget_s'):.0f} s; output folder `{out}`", ""]
    for key in ("python", "gpu", "archs"):
        if header.get(key):
            lines.append(f"- {key}: {header[key]}")
    lines += ["", "| stage | status | seconds | budget s | log |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | `{r.log}` |")
    for r in results:
        if r.problems or r.notes:
            lines += ["", f"## {r.name}: {r.status}"]
            lines += [f"- problem: {p}" for p in r.problems]
            lines += [f"- note: {n}" for n in r.notes]
    tests = [t for t in (_junit_counts(p) for p in sorted((out / "tests").glob("junit*.xml"))) if t]
    if tests:
        lines += ["", "## tests", ""] + [f"- {t}" for t in tests]
    bench = _bench_lines(out)
    if bench:
        lines += ["", "## bench (medians; speed-up against each case's baseline in the same run)", ""] + bench
    ncu = _ncu_lines(out)
    if ncu:
        lines += ["", "## ncu (spatial encoder, nova_fast kernels; means over launches)", ""] + ncu
    lines += ["", "## commands", ""]
    for r in results:
        for c in r.commands:
            lines.append(f"- {r.name}: `{c}`")
        for c in r.ran:
            lines.append(f"- {r.name} (dry run executed): `{c}`")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the stages -----------------------------------------------------------------------------------
def _exists(*paths: str) -> Callable[[], str | None]:
    def check():
        missing = [p for p in paths if not (REPO_ROOT / p).exists()]
        return f"missing: {', '.join(missing)}" if missing else None
    check.__name__ = "exists"
    return check


def _ncu_argv(py: str, out: Path, sizes: dict) -> Callable[[], list[str]]:
    def argv() -> list[str]:
        regex_file = out / "ncu" / "kernel-regex.txt"
        regex = regex_file.read_text().strip() if regex_file.exists() else ""
        if not regex.startswith("^(") or not regex.endswith(")"):
            raise RuntimeError(f"{regex_file} does not hold `nova-fast profile --ncu-regex`'s ^(a|b|...): {regex!r}")
        # the CUDA kernels are templates in an anonymous namespace: match the bare name after any
        # namespace and before any template or parameter list, never a substring of another name
        regex = f"(^|::)({regex[2:-1]})(<|\\(|$)"
        return ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--nvtx",
                "--nvtx-include", "nova.spatial/", "--kernel-name-base", "function", "--kernel-name",
                f"regex:{regex}", "--launch-count", "30",
                *[a for s in NCU_SECTIONS for a in ("--section", s)],
                "-f", "-o", str(out / "ncu" / "spatial-kernels"),
                *_profile_argv(py, out, "osp480", sizes)]
    return argv


def _profile_argv(py: str, out: Path, config: str, sizes: dict, warmup: bool = True) -> list[str]:
    # the warm-up generation (kernel compiles, graph captures) runs before the profiler range opens
    return [py, "-m", "nova_fast.cli", "profile", "--config", config, "--latent-frames", str(sizes["frames"]),
            "--ar-steps", str(sizes["ar"]), "--diffusion-steps", str(sizes["dn"]), "--accelerate", "auto",
            "--out", str(out / "ncu" / "profile"), *([] if warmup else ["--no-warmup"])]


def _pytest_argv(py: str, out: Path) -> Callable[[], list[str]]:
    def argv() -> list[str]:
        # pytest-xdist where that python has it: the Triton compiles of the tests spread over the CPUs
        xdist = subprocess.run([py, "-c", "import xdist"], capture_output=True).returncode == 0
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-n", "4"] if xdist else []),
                "-m", PYTEST_MARKERS, "tests", "--junitxml", str(out / "tests" / "junit.xml")]
    return argv


def parse_gen_sizes(text: str) -> dict:
    """'1x16x10' -> {'frames': 1, 'ar': 16, 'dn': 10} (latent frames x AR steps x denoising steps)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"generation sizes {text!r}: expected FRAMESxARxSTEPS, e.g. 1x16x10")
    return dict(zip(("frames", "ar", "dn"), map(int, parts)))


def build_stages(out: Path, py: str, *, archs: str = "native", gen_sizes: str = GEN_SIZES_GPU,
                 budgets: dict | None = None) -> list[Stage]:
    """The device check's stages (commands for the GPU machine; dry-run commands for anywhere)."""
    b = {"env": 15, "install": 40, "build": 120, "tests": 100, "bench-ops": 80, "bench-gen": 70, "ncu": 90,
         **(budgets or {})}
    sizes = parse_gen_sizes(gen_sizes)
    dry_sizes = parse_gen_sizes(GEN_SIZES_DRY)
    cli = [py, "-m", "nova_fast.cli"]
    versions = [py, str(Path(__file__).resolve()), "versions"]
    stages = [
        Stage("env", b["env"], "the machine: GPU, driver, python, torch, triton, nvcc, ncu",
              [Command(["nvidia-smi"], optional_tools=("nvidia-smi",)),
               Command(versions),
               Command(["nvcc", "--version"]),
               Command(["ncu", "--version"], optional_tools=("ncu",))],
              dry_commands=[Command(versions)]),
        Stage("install", b["install"], "nova_fast into this python: editable, no dependencies, no build isolation, "
              "offline (the extension is built by the next stage)",
              [Command([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
                       env={"NOVA_FAST_BUILD_CUDA": "0"})],
              dry_commands=[Command([py, "-m", "pip", "--version"]),
                            Command([py, "setup.py", "--name"], env={"NOVA_FAST_BUILD_CUDA": "0"})],
              checks=[_exists("setup.py", "nova_fast/__init__.py", "kernels/__init__.py", "bench/runner.py")]),
        Stage("build", b["build"], "nova_fast._C for the local GPU (ninja), then import it",
              [Command([py, "setup.py", "build_ext", "--inplace"],
                       env={"NOVA_FAST_BUILD_CUDA": "1", "NOVA_FAST_CUDA_ARCHS": archs,
                            "MAX_JOBS": str(os.cpu_count() or 4)}),
               Command([py, "-c", "from nova_fast import backends; ok, why = backends.extension_status(); "
                                  "print(why); raise SystemExit(0 if ok else 1)"])],
              # forced extension set-up with an explicit target: setup.py must accept it and say so
              # setup.py accepts the target list (a CPU build of torch cannot set the extension up)
              dry_commands=[Command([py, "setup.py", "--name"],
                                    env={"NOVA_FAST_CUDA_ARCHS": "90" if archs == "native" else archs})],
              checks=[_exists("csrc/bindings.cpp", "csrc/adaln.cu", "csrc/denoise_step.cu")]),
        Stage("tests", b["tests"], f"GPU tests: pytest -m '{PYTEST_MARKERS}'",
              [Command(_pytest_argv(py, out))],
              dry_commands=[Command([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                                     "-m", PYTEST_MARKERS, "tests"], stdout_to="tests/collected.txt")],
              checks=[lambda: _check_collected(out)]),
        Stage("bench-ops", b["bench-ops"], "nova-fast bench --full on every op suite (osp480 shapes)",
              [Command([*cli, "bench", "--ops", op, "--full", "--budget", "0.25", "--min-runs", "5",
                        "--out", str(out / "bench"), "--name", f"ops-{op}", "--no-latest"]) for op in BENCH_OPS],
              # the suites import and hold osp480-sized cases; every option the real run passes is
              # accepted (an unknown op name selects no case, so nothing is timed)
              dry_commands=[Command([py, "-c", _BENCH_OPS_CHECK.format(
                  ops=list(BENCH_OPS), argv=["bench", "--ops", "no_such_suite", "--full", "--budget", "0.25",
                                             "--min-runs", "5", "--out", str(out / "bench"), "--name", "dry-ops",
                                             "--no-latest"])], env=_DRY_ENV)]),
        Stage("bench-gen", b["bench-gen"], f"nova-fast bench: osp480 generation shortened to {gen_sizes} "
              "(frames x AR steps x denoising steps), reference vs accelerate",
              [Command([*cli, "bench", "--ops", "generation", "--configs", "osp480", "--gen-sizes", gen_sizes,
                        "--no-compile", "--budget", "1", "--min-runs", "2", "--out", str(out / "bench"),
                        "--name", "generation-osp480", "--no-latest"])],
              dry_commands=[Command([*cli, "bench", "--ops", "generation", "--configs", "tiny", "--gen-sizes",
                                     GEN_SIZES_DRY, "--no-compile", "--budget", "0", "--min-runs", "1",
                                     "--no-ops-count", "--out", str(out / "bench"), "--name", "dry-generation-tiny",
                                     "--no-latest"], env=_DRY_ENV)]),
        Stage("ncu", b["ncu"], "Nsight Compute on nova_fast's kernels in the spatial encoder (short osp480 run)",
              [Command([*cli, "profile", "--ncu-regex"], stdout_to="ncu/kernel-regex.txt"),
               Command(_ncu_argv(py, out, dict(frames=1, ar=2, dn=2)), optional_tools=("ncu",)),
               Command(["ncu", "--import", str(out / "ncu" / "spatial-kernels.ncu-rep"), "--csv", "--page", "raw",
                        "--metrics", ",".join(NCU_METRICS)], stdout_to="ncu/spatial-kernels.csv",
                       optional_tools=("ncu",))],
              dry_commands=[Command([*cli, "profile", "--ncu-regex"], stdout_to="ncu/kernel-regex.txt"),
                            Command(_profile_argv(py, out, "tiny", dry_sizes, warmup=False), env=_DRY_ENV)]),
    ]
    return stages


# dry run, one process: the op suites import and hold cases (their full runs are the osp480 shapes),
# and `nova-fast bench` accepts every option the real run passes (an unknown op selects no case)
_BENCH_OPS_CHECK = ("from nova_fast.bench import runner\n"
                    "from nova_fast.cli import main\n"
                    "suites = runner.discover_suites({ops!r})\n"
                    "bad = [f'{{op}}: {{m}}' for op, m in suites.items() if isinstance(m, BaseException)]\n"
                    "bad += [f'{{op}}: no suite' for op in {ops!r} if op not in suites]\n"
                    "cases = runner.select_cases(suites, quick=False, configs=None)\n"
                    "bad += [f'{{op}}: no case' for op in {ops!r} if op not in {{c.op for c in cases}}]\n"
                    "for c in cases: print(c.id, c.sizes)\n"
                    "rc = main({argv!r})\n"
                    "raise SystemExit('\\n'.join(bad) if bad else rc)\n")
# dry run: plumbing and options are what is checked, not the CPU kernels (whose first build is slow)
_DRY_ENV = {"NOVA_FAST_CPU_KERNELS": "0"}


def _check_collected(out: Path) -> str | None:
    # after the dry run's collection: the selection holds tests, among them every one in GPU_TESTS
    path = out / "tests" / "collected.txt"
    if not path.exists():
        return None   # the collection's own failure is reported by its command
    text = path.read_text()
    missing = [n for n in GPU_TESTS if n not in text]
    if "::" not in text or missing:
        return f"pytest -m '{PYTEST_MARKERS}' does not select " + (", ".join(missing) or "any test")
    return None


def print_versions() -> int:
    import torch

    print("python", sys.version.split()[0], sys.executable)
    print("torch", torch.__version__, "cuda", torch.version.cuda)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"gpu {i}", props.name, f"sm_{props.major}{props.minor}", f"{props.multi_processor_count} SMs",
                  f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print("gpu none visible to torch")
    for name in ("triton", "flash_attn", "pytest", "pytest_benchmark", "matplotlib", "ninja"):
        try:
            module = __import__(name)
            print(name, getattr(module, "__version__", "installed"))
        except ImportError:
            print(name, "not installed")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["versions"]:
        return print_versions()
    p = argparse.ArgumentParser(description="nova_fast device check (see the module docstring)")
    p.add_argument("out", help="output folder (created; logs, results, status.json, summary.md)")
    p.add_argument("--dry-run", action="store_true", help="walk every stage on any machine, running only cheap checks")
    p.add_argument("--python", default=sys.executable, help="the python to install into and run (default: this one)")
    p.add_argument("--archs", default="native", help="NOVA_FAST_CUDA_ARCHS for the build (default native)")
    p.add_argument("--gen-sizes", default=GEN_SIZES_GPU, help=f"osp480 generation FRAMESxARxSTEPS (default {GEN_SIZES_GPU})")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run (default all)")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole check (default 480)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    stages = build_stages(out, a.python, archs=a.archs, gen_sizes=a.gen_sizes)
    if a.stages:
        wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
        unknown = set(wanted) - {s.name for s in stages}
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; known: {', '.join(s.name for s in stages)}")
        stages = [s for s in stages if s.name in wanted]
    header = {"python": a.python, "archs": a.archs, "gen_sizes": a.gen_sizes}
    results = run_stages(stages, out, dry_run=a.dry_run, total_budget_s=a.total_budget, header=header)
    print((out / "summary.md").read_text())
    bad = [r.name for r in results if r.status not in ("ok", "dry-ok")]
    print(f"device check {'dry run ' if a.dry_run else ''}finished: {len(results) - len(bad)}/{len(results)} stages ok"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f"; see {out / 'summary.md'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
