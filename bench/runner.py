"""The runner behind ``nova-fast bench``: every suite's CASES, timed side by side, one report.

It imports each ``bench/test_<op>_bench.py`` (as ``nova_fast.bench.test_<op>_bench``), takes its
``CASES``, and for every case builds the inputs once (``case.setup()``), then for every
implementation: the median time (``median_time``), the speed-up over the case's baseline
(baseline median / implementation median, so 2.0 means twice as fast), the ATen ops one call
dispatches (``count_dispatched_ops``; ``count_call`` says when compiled code makes that impossible, and
on a GPU adds the kernels one call launches) and the case's own metrics (tiles
visited, bytes moved, per-frame stage split). Progress goes to stderr, the table to stdout, and
JSON, Markdown and a PNG chart to the output folder.

Conventions a suite can use beyond ``BenchCase``:
* a value of ``setup()``'s dict that is an exception instance is an implementation that cannot run
  here; its message is the reason, reported as unavailable (never dropped);
* a callable with an ``extra_metrics()`` method adds that dict to its implementation's results;
* a callable with an ``ops_count_unsupported`` string is not op-counted (the string says why).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import pkgutil
import platform
import re
import sys
import time
from pathlib import Path

import torch

from nova_fast.bench.case import BenchCase, count_dispatched_ops, format_seconds, median_time

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"
SUITE_PATTERN = re.compile(r"test_(\w+)_bench$")


def _alias_bench_package() -> None:
    """Suites run by pytest from the repository may import ``bench.case``; make that name the installed
    ``nova_fast.bench.case`` (one module, one BenchCase) so they import the same way from the CLI."""
    import nova_fast.bench
    import nova_fast.bench.case

    sys.modules.setdefault("bench", nova_fast.bench)
    sys.modules.setdefault("bench.case", nova_fast.bench.case)


def discover_suites(ops: list[str] | None = None) -> dict[str, object]:
    """op name -> imported suite module, or the exception its import raised (reported, not hidden)."""
    _alias_bench_package()
    names = sorted(m.name for m in pkgutil.iter_modules([str(BENCH_DIR)]) if SUITE_PATTERN.fullmatch(m.name))
    suites: dict[str, object] = {}
    for module_name in names:
        op = SUITE_PATTERN.fullmatch(module_name).group(1)
        if ops and op not in ops:
            continue
        try:
            suites[op] = importlib.import_module(f"nova_fast.bench.{module_name}")
        except Exception as exc:  # noqa: BLE001 -- an unimportable suite is a row in the report
            suites[op] = exc
    return suites


def select_cases(suites: dict, *, quick: bool, configs: list[str] | None) -> list[BenchCase]:
    cases = []
    for module in suites.values():
        if isinstance(module, BaseException):
            continue
        for case in getattr(module, "CASES", []):
            if quick and not case.quick:
                continue
            config = case.sizes.get("config")
            if configs and config is not None and config not in configs:
                continue
            cases.append(case)
    return cases


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def run_case(case: BenchCase, *, budget_s: float, min_runs: int, count_ops: bool, log) -> dict:
    """Time every implementation of one case; never raises (errors are recorded)."""
    record = {"id": case.id, "op": case.op, "name": case.name, "sizes": _jsonable(case.sizes),
              "baseline": case.baseline, "quick": case.quick, "impls": {}, "unavailable": {}, "metrics": {},
              "error": None}
    t0 = time.perf_counter()
    try:
        impls = case.setup()
    except Exception as exc:  # noqa: BLE001
        record["error"] = f"setup failed: {type(exc).__name__}: {exc}"
        log(f"    setup failed: {record['error']}")
        return record
    record["setup_s"] = round(time.perf_counter() - t0, 3)
    if case.metrics is not None:
        try:
            record["metrics"] = _jsonable(case.metrics())
        except Exception as exc:  # noqa: BLE001
            record["metrics"] = {"error": f"{type(exc).__name__}: {exc}"}
    for label, fn in impls.items():
        if isinstance(fn, BaseException):
            record["unavailable"][label] = str(fn) or type(fn).__name__
            log(f"    {label:<22} unavailable: {record['unavailable'][label]}")
            continue
        log(f"    {label:<22} timing ...")
        entry: dict = {}
        try:
            timing = median_time(fn, min_runs=min_runs, max_runs=max(min_runs, 50), budget_s=budget_s)
            entry.update(timing)
        except Exception as exc:  # noqa: BLE001 -- the implementation failed to run: say so
            record["unavailable"][label] = f"failed while timing: {type(exc).__name__}: {exc}"[:500]
            log(f"    {label:<22} failed: {record['unavailable'][label]}")
            continue
        extra = getattr(fn, "extra_metrics", None)
        if callable(extra):
            try:
                entry["metrics"] = _jsonable(extra())
            except Exception as exc:  # noqa: BLE001
                entry["metrics"] = {"error": f"{type(exc).__name__}: {exc}"}
        if count_ops:
            entry.update(count_call(fn))
        record["impls"][label] = entry
        log(f"    {label:<22} {format_seconds(entry['median_s']):>11}  ({entry['runs']} runs"
            + (f", {entry['ops_per_call']} ops/call" if entry.get("ops_per_call") is not None else "") + ")")
    base = record["impls"].get(case.baseline)
    for label, entry in record["impls"].items():
        entry["speedup"] = (base["median_s"] / entry["median_s"]) if base and entry["median_s"] > 0 else None
        base_ops, ops = (base or {}).get("ops_per_call"), entry.get("ops_per_call")
        entry["ops_ratio"] = (base_ops / ops) if base_ops and ops else None  # how many times fewer ops
    if base is None:
        record["error"] = record["error"] or f"baseline {case.baseline!r} did not run: no ratios"
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    return record


@contextlib.contextmanager
def _quiet_stderr():
    """Hide the profiler's own start/stop lines (written by C++ straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_call(fn) -> dict:
    """Ops one call issues. A first profiled call (torch.profiler: safe with compiled code) tells
    whether ``fn`` runs torch.compile'd graphs and, on a GPU, how many kernels it launches; code
    without compiled graphs then gets ``count_dispatched_ops`` (one more call). Compiled code is not
    run under the dispatch counter: torch.compile refuses such frames and then skips them for good,
    which would break the next case's compile."""
    from torch.profiler import ProfilerActivity, profile

    unsupported = getattr(fn, "ops_count_unsupported", None)
    out: dict = {"ops_per_call": None}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        with _quiet_stderr(), profile(activities=activities) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        events = prof.events()
    except Exception as exc:  # noqa: BLE001
        out["ops_error"] = f"profiling the call failed: {type(exc).__name__}: {exc}"[:300]
        return out
    names = [e.name for e in events]
    if torch.cuda.is_available():
        out["kernels_per_call"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    graphs = sum(1 for n in names if n.startswith("## Call CompiledFxGraph"))
    if graphs or any(n.startswith("Torch-Compiled Region") for n in names):
        out["compiled_graph_calls"] = graphs
        out["ops_error"] = (f"runs torch.compile'd code ({graphs} compiled-graph calls per call), which the "
                            "ATen dispatch counter cannot enter")
        return out
    if unsupported:
        out["ops_error"] = str(unsupported)
        return out
    try:
        out["ops_per_call"] = count_dispatched_ops(fn)
    except Exception as exc:  # noqa: BLE001
        out["ops_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def environment() -> dict:
    import nova_fast

    env = {"python": platform.python_version(), "torch": torch.__version__, "nova_fast": nova_fast.__version__,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    match = re.search(r"(h100|h200|a100|l40s?|a10g?|l4|b200|rtx\s*\d+)", name)
    return re.sub(r"\s+", "", match.group(1)) if match else "gpu"


def run(*, ops: list[str] | None = None, quick: bool | None = None, configs: list[str] | None = None,
        budget_s: float | None = None, min_runs: int | None = None, count_ops: bool = True,
        log=None) -> dict:
    """Run the selected cases; returns the results dict that report.py writes out."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    on_gpu = torch.cuda.is_available()
    quick = (not on_gpu) if quick is None else quick
    configs = configs if configs is not None else (None if on_gpu else ["tiny", "mid"])
    budget_s = budget_s if budget_s is not None else (0.5 if quick else 2.0)
    min_runs = min_runs if min_runs is not None else (3 if quick else 5)
    started = time.perf_counter()
    suites = discover_suites(ops)
    suite_status = {op: (f"import failed: {type(m).__name__}: {m}" if isinstance(m, BaseException) else "ok")
                    for op, m in suites.items()}
    for op, status in suite_status.items():
        if status != "ok":
            log(f"suite {op}: {status}")
    if ops:
        for op in ops:
            if op not in suites:
                suite_status[op] = "no suite bench/test_%s_bench.py" % op
                log(f"suite {op}: not found")
    cases = select_cases(suites, quick=quick, configs=configs)
    log(f"nova-fast bench: {len(cases)} cases from {len(suites)} suites "
        f"({'quick' if quick else 'full'}, budget {budget_s:g} s per implementation, at least {min_runs} runs)")
    records = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.id}  (elapsed {time.perf_counter() - started:.0f} s)")
        records.append(run_case(case, budget_s=budget_s, min_runs=min_runs, count_ops=count_ops, log=log))
    return {"schema": 1, "created": _dt.datetime.now().isoformat(timespec="seconds"), "device": device_tag(),
            "environment": environment(),
            "options": {"quick": quick, "ops": ops, "configs": configs, "budget_s": budget_s, "min_runs": min_runs},
            "suites": suite_status, "cases": records, "total_s": round(time.perf_counter() - started, 2)}


def write_results(results: dict, out_dir: Path | str | None = None, *, stem: str | None = None,
                  latest: bool = True) -> dict[str, Path]:
    """JSON, Markdown and PNG under ``out_dir`` as ``<device>-<date-time>.*`` (and ``latest.*``)."""
    from nova_fast.bench import report

    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{results['device']}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    paths["md"].write_text(report.markdown(results))
    try:
        report.chart(results, paths["png"])
    except Exception as exc:  # noqa: BLE001 -- no chart is not worth losing the run; say so
        print(f"nova-fast bench: no PNG chart ({type(exc).__name__}: {exc})", file=sys.stderr)
        paths.pop("png")
    if latest:
        for kind, path in list(paths.items()):
            (out_dir / f"latest.{kind}").write_bytes(path.read_bytes())
    return paths
