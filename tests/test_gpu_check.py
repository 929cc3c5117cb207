"""bench/gpu_check.sh, the prepared device check: its dry run walks every stage here (CPU), a failing
or overrunning stage does not stop the others, and the summary is always written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nova_fast.testing import gpu_check
from nova_fast.testing.gpu_check import Command, Stage

REPO = Path(__file__).resolve().parents[1]
STAGES = ["env", "install", "build", "tests", "bench-ops", "bench-gen", "ncu"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)   # the device check runs as it would on a fresh shell
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300)
    return out, proc


def test_dry_run_walks_every_stage_and_writes_the_summary(dry_run):
    out, proc = dry_run
    status = json.loads((out / "status.json").read_text())
    by_name = {s["name"]: s for s in status["stages"]}
    assert list(by_name) == STAGES
    problems = {n: s["problems"] for n, s in by_name.items() if s["status"] != "dry-ok"}
    assert proc.returncode == 0 and not problems, (problems, proc.stderr[-3000:])
    assert status["dry_run"] is True
    for name, stage in by_name.items():
        assert stage["commands"], f"{name}: no command recorded"
        assert (out / stage["log"]).exists()
    # the commands the GPU machine will run
    install = by_name["install"]["commands"][0]
    assert "--no-deps" in install and "--no-build-isolation" in install and "-e ." in install
    assert "build_ext --inplace" in by_name["build"]["commands"][0]
    assert "-m 'gpu or triton'" in by_name["tests"]["commands"][0]
    assert all("bench --ops" in c and "--full" in c for c in by_name["bench-ops"]["commands"])
    assert "--configs osp480 --gen-sizes 1x16x10" in by_name["bench-gen"]["commands"][0]
    ncu = next(c for c in by_name["ncu"]["commands"] if c.startswith("ncu --profile-from-start off"))
    assert "--nvtx-include nova.spatial/" in ncu and "regex:(^|::)(" in ncu and "gca_fwd_kernel" in ncu
    assert "--config osp480" in ncu
    # the cheap versions ran: the GPU test selection was collected, the tiny generation wrote its results
    collected = (out / "tests" / "collected.txt").read_text()
    for node in gpu_check.GPU_TESTS:
        assert node in collected
    gen = json.loads((out / "bench" / "dry-generation-tiny.json").read_text())
    assert gen["cases"][0]["sizes"]["ar_steps"] == 1 and gen["cases"][0]["sizes"]["shortened_from"] == "2x4x4"
    assert gen["cases"][0]["impls"], gen["cases"][0]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for name in STAGES:
        assert f"| {name} | dry-ok |" in summary


def test_failing_and_overrunning_stages_do_not_stop_the_others(tmp_path):
    py = sys.executable
    stages = [
        Stage("fails", 20, "exits 3", [Command([py, "-c", "print('partial output'); raise SystemExit(3)"])]),
        Stage("hangs", 2, "runs past its budget", [Command([py, "-c", "import time; print('started', flush=True); "
                                                                     "time.sleep(60)"])]),
        Stage("missing", 5, "a program that is not there", [Command(["no-such-program-anywhere"])]),
        Stage("works", 20, "writes a file", [Command([py, "-c", "print('fine')"], stdout_to="works/out.txt")]),
    ]
    results = gpu_check.run_stages(stages, tmp_path, total_budget_s=60)
    status = {r.name: r.status for r in results}
    assert status == {"fails": "failed", "hangs": "timeout", "missing": "failed", "works": "ok"}
    hang = next(r for r in results if r.name == "hangs")
    assert hang.seconds < 15                          # killed at its own budget, not the total
    assert "started" in (tmp_path / "logs" / "hangs.log").read_text()   # what it wrote is kept
    assert "partial output" in (tmp_path / "logs" / "fails.log").read_text()
    assert (tmp_path / "works" / "out.txt").read_text().strip() == "fine"
    summary = (tmp_path / "summary.md").read_text()
    for line in ("| fails | failed |", "| hangs | timeout |", "| missing | failed |", "| works | ok |"):
        assert line in summary
    assert "exit 3" in summary and "timed out" in summary
    saved = json.loads((tmp_path / "status.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["failed", "timeout", "failed", "ok"]


def test_total_budget_skips_what_no_longer_fits(tmp_path):
    py = sys.executable
    stages = [Stage("first", 30, "uses the time", [Command([py, "-c", "import time; time.sleep(30)"])]),
              Stage("second", 30, "no time left", [Command([py, "-c", "print(1)"])])]
    results = gpu_check.run_stages(stages, tmp_path, total_budget_s=8)
    assert [r.status for r in results] == ["timeout", "skipped"]
    assert "no time left" in results[1].problems[0]
    assert (tmp_path / "summary.md").exists()


def test_a_killed_build_leaves_no_lock_behind(tmp_path, monkeypatch):
    # torch's extension builder waits for ever on a lock its killed owner left
    cache = tmp_path / "cache"
    monkeypatch.setenv("NOVA_FAST_CACHE", str(cache))
    script = f"import pathlib, time; p = pathlib.Path({str(cache / 'cpu' / 'ext')!r}); p.mkdir(parents=True); " \
             "(p / 'lock').write_text(''); time.sleep(60)"
    old_lock = cache / "other" / "lock"
    old_lock.parent.mkdir(parents=True)
    old_lock.write_text("")
    os.utime(old_lock, (1, 1))                     # someone else's, from long ago: left alone
    results = gpu_check.run_stages([Stage("build", 3, "killed mid-build", [Command([sys.executable, "-c", script])])],
                                   tmp_path / "out", total_budget_s=30)
    assert results[0].status == "timeout"
    assert not (cache / "cpu" / "ext" / "lock").exists()
    assert old_lock.exists()


def test_generation_sizes_are_parsed_strictly():
    assert gpu_check.parse_gen_sizes("1x16x10") == {"frames": 1, "ar": 16, "dn": 10}
    for bad in ("1x16", "0x1x1", "ax1x1", "1x2x3x4"):
        with pytest.raises(ValueError, match="FRAMESxARxSTEPS"):
            gpu_check.parse_gen_sizes(bad)


def test_setup_checks_the_cuda_target_list():
    def setup_name(archs):
        env = {**os.environ, "NOVA_FAST_CUDA_ARCHS": archs}
        env.pop("NOVA_FAST_BUILD_CUDA", None)
        return subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True,
                              env=env, timeout=120)

    ok = setup_name("86, sm_90a")
    assert ok.returncode == 0 and ok.stdout.strip() == "nova_fast"
    if "building without nova_fast._C" in ok.stderr:      # CPU torch: the list is still checked and echoed
        assert "sm_86, sm_90a" in ok.stderr
    bad = setup_name("90,ampere")
    assert bad.returncode != 0 and "NOVA_FAST_CUDA_ARCHS" in bad.stderr and "ampere" in bad.stderr
