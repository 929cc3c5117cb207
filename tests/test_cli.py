"""The nova-fast command: bench (tiny budget), profile (CPU), roofline, doctor; the runner's report."""
import json
import math
import re

import pytest

from nova_fast.bench import report, runner
from nova_fast.bench.case import BenchCase, count_ops_by_stage
from nova_fast.cli import main


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_doctor_still_works(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    assert re.search(r"^CPU kernels +(CPU kernels built \(csrc/cpu\)|.*NOVA_FAST_CPU_KERNELS=0)", out, re.M), out


def test_runner_times_ratios_unavailable_and_writes_files(tmp_path):
    import torch

    x = torch.randn(64, 64)

    def setup():
        return {"eager": lambda: x @ x + x, "fused": lambda: torch.addmm(x, x, x),
                "cuda": RuntimeError("no GPU here")}

    case = BenchCase(op="toy", name="64x64 fp32", setup=setup, baseline="eager", sizes={"n": 64},
                     metrics=lambda: {"bytes_moved": 3 * 64 * 64 * 4})
    record = runner.run_case(case, budget_s=0.01, min_runs=1, count_ops=True, log=lambda _: None)
    assert record["error"] is None
    assert record["impls"]["eager"]["speedup"] == 1.0 and _finite(record["impls"]["fused"]["speedup"])
    assert record["impls"]["eager"]["ops_per_call"] == 2 and record["impls"]["fused"]["ops_per_call"] == 1
    assert record["impls"]["fused"]["ops_ratio"] == 2.0 and record["impls"]["eager"]["ops_ratio"] == 1.0
    assert record["unavailable"] == {"cuda": "no GPU here"}
    results = {"schema": 1, "created": "now", "device": "cpu", "environment": runner.environment(),
               "options": {"quick": True, "ops": None, "configs": None, "budget_s": 0.01, "min_runs": 1},
               "suites": {"toy": "ok"}, "cases": [record], "total_s": 0.1}
    text = report.console(results)
    assert "unavailable: no GPU here" in text and "bytes_moved=49152" in text and "1 (2.00x fewer)" in text
    paths = runner.write_results(results, tmp_path, stem="toy", latest=False)
    assert {p.name for p in tmp_path.iterdir()} == {"toy.json", "toy.md", "toy.png"}
    assert json.loads(paths["json"].read_text())["cases"][0]["impls"]["fused"]["ops_per_call"] == 1
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_runner_reports_broken_setup():
    case = BenchCase(op="toy", name="broken", setup=lambda: 1 / 0, baseline="eager")
    record = runner.run_case(case, budget_s=0.01, min_runs=1, count_ops=False, log=lambda _: None)
    assert "ZeroDivisionError" in record["error"]


def test_bench_tiny_smoke(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nova_fast.reference")
    monkeypatch.setenv("NOVA_BENCH_COMPILE", "0")   # compiling takes minutes on a CPU; the full run does it
    rc = main(["bench", "--ops", "generation", "--configs", "tiny", "--budget", "0.01", "--min-runs", "1",
               "--out", str(tmp_path), "--name", "smoke", "--no-latest"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "generation/tiny" in out and "Per-frame split" in out
    assert {p.name for p in tmp_path.iterdir()} == {"smoke.json", "smoke.md", "smoke.png"}
    data = json.loads((tmp_path / "smoke.json").read_text())
    (case,) = data["cases"]
    assert case["error"] is None
    ref = case["impls"]["reference"]
    assert _finite(ref["median_s"]) and ref["median_s"] > 0 and ref["speedup"] == 1.0
    assert ref["ops_per_call"] > 0
    split = ref["metrics"]["per_frame_s"]
    assert all(_finite(split[k]) for k in ("temporal", "spatial", "head", "other", "total"))
    assert split["spatial"] > 0 and split["head"] > 0
    # nothing silently dropped: every implementation is either timed or has a reason
    for label in ("reference+compile", "accelerated[torch]"):
        assert label in case["impls"] or case["unavailable"].get(label)
    for entry in case["impls"].values():
        assert _finite(entry["speedup"])
    assert "Per-frame split" in (tmp_path / "smoke.md").read_text()


def test_profile_on_cpu_writes_trace_and_table(tmp_path, capsys):
    pytest.importorskip("nova_fast.reference")
    rc = main(["profile", "--config", "tiny", "--out", str(tmp_path), "--latent-frames", "1", "--ar-steps", "2",
               "--diffusion-steps", "2", "--no-warmup"])
    assert rc == 0
    trace = json.loads((tmp_path / "profile-tiny.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"nova.temporal", "nova.spatial", "nova.head", "nova.spatial.block00"} <= names
    table = (tmp_path / "profile-tiny.md").read_text()
    assert "| nova.spatial.block00 |" in table and "torch.profiler" in table
    assert "per frame: temporal" in capsys.readouterr().out


def test_op_count_leaves_compiled_code_compilable():
    # Running compiled code under the dispatch counter makes torch.compile skip that frame for good;
    # count_call must detect compiled graphs with the profiler instead, so later shapes still compile.
    import torch

    fn = torch.compile(lambda x: (x.sin() + 1).cos(), fullgraph=True, dynamic=False)
    x = torch.randn(16)
    fn(x)
    counted = runner.count_call(lambda: fn(x))
    assert counted["ops_per_call"] is None and counted["compiled_graph_calls"] == 1
    assert "compile" in counted["ops_error"]
    fn(torch.randn(7, 3))        # a new shape: compiles again (would raise if the frame were skipped)
    assert runner.count_call(lambda: x.sin() + 1)["ops_per_call"] == 2


def test_count_ops_by_stage_splits_without_changing_outputs():
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

        def forward(self, x):
            return self.head(self.enc(x) * 2) + 1

    model, x = Model(), torch.randn(3, 4)
    want = model(x)
    got = []
    counts = count_ops_by_stage(lambda: got.append(model(x)), model, {"spatial": "enc", "head": "head"})
    assert torch.equal(got[0], want)  # the hooks leave every output as it was
    assert counts["spatial"] >= 1 and counts["head"] >= 2 and counts["other"] >= 2
    assert counts["total"] == counts["spatial"] + counts["head"] + counts["other"]
    assert not model._forward_hooks and not model.enc._forward_pre_hooks  # removed afterwards
