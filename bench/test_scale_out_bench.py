"""Scale-out on one CPU: a generation split over 2 gloo processes (nova_fast.distributed) against one process.

Cases (config ``mid``, 2 latent frames x 8 AR steps x 5 denoising steps, guidance on, fp32):
* batch 1: one process against CFG-parallel x2 (conditional and unconditional pass on two ranks)
  and Ulysses x2 (each encoder's sequence split over two ranks);
* batch 2: one process against data-parallel x2 (one video per rank).
Every process runs one thread (``torch.set_num_threads(1)``), so the ratio is that of one core against
two; on a machine shared with other work it is bounded by the cores actually free. The ranks are
started once (setup) and stay up; each timed call sends "run" to both and waits for both.
Metrics: the bytes each rank sends per executed AR step, by kind (cfg / dp / ulysses, from
``ParallelGeneration.stats``), and the collectives per AR step.
"""
from __future__ import annotations

import atexit
import tempfile
import threading
from pathlib import Path

import torch

from nova_fast.bench.case import BenchCase

try:  # the runner imports this module without needing pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

WORLD = 2
SCALE_SIZES = dict(config="mid", latent_frames=2, ar_steps=8, diffusion_steps=5)
GEN = dict(num_latent_frames=SCALE_SIZES["latent_frames"], num_ar_steps=SCALE_SIZES["ar_steps"],
           num_diffusion_steps=SCALE_SIZES["diffusion_steps"])
PLANS = {
    "cfg-parallel x2": dict(config="mid", cfg=2, batch=1, gen=GEN),
    "ulysses x2": dict(config="mid", ulysses=2, batch=1, gen=GEN),
    "data-parallel x2": dict(config="mid", dp=2, batch=2, gen=GEN),
}
REPLY_TIMEOUT_S = 600.0


class RankPool:
    """WORLD long-lived ranks (spawned processes) holding one parallelized model per plan."""
    _shared = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls) -> "RankPool":
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
                atexit.register(cls._shared.close)
            return cls._shared

    def __init__(self):
        import torch.multiprocessing as mp

        from nova_fast.testing.distributed_worker import serve

        ctx = mp.get_context("spawn")
        self.folder = tempfile.TemporaryDirectory(prefix="nova-scale-out-")
        store = str(Path(self.folder.name) / "store")
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(rank, WORLD, store, PLANS, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._replies("ready")

    def _replies(self, expected: str) -> list:
        out = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(REPLY_TIMEOUT_S):
                self.close()
                raise RuntimeError(f"scale-out rank {rank} did not answer within {REPLY_TIMEOUT_S:.0f} s")
            kind, payload = conn.recv()
            if kind != expected:
                self.close()
                raise RuntimeError(f"scale-out rank {rank}: {payload}")
            out.append(payload)
        return out

    def run(self, name: str) -> list[dict]:
        for conn in self.conns:
            conn.send(("run", name))
        return self._replies("done")

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except Exception:  # noqa: BLE001 -- already gone
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []


class OneProcess:
    """The plan's generation in this process, on one thread (like each rank)."""

    def __init__(self, plan: dict):
        from nova_fast.testing.distributed_worker import build_case

        self.model, self.text, self.kwargs, self.seed = build_case(plan)

    def __call__(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.model.generate_video(self.text, generator=torch.Generator().manual_seed(self.seed),
                                             **self.kwargs)
        finally:
            torch.set_num_threads(threads)


class PoolRun:
    """One plan on the shared ranks; ``extra_metrics`` gives the bytes sent per AR step."""
    ops_count_unsupported = "runs in other processes"

    def __init__(self, pool: RankPool, name: str, ar_steps: int):
        self.pool, self.name, self.ar_steps = pool, name, ar_steps
        self.last = None

    def __call__(self):
        self.last = self.pool.run(self.name)

    def extra_metrics(self) -> dict:
        if self.last is None:
            return {}
        kinds = ("cfg", "dp", "ulysses")
        per_rank = [{k: r["stats"]["bytes"][k] / self.ar_steps for k in kinds} for r in self.last]
        calls = [{k: r["stats"]["calls"][k] / self.ar_steps for k in kinds} for r in self.last]
        return {"processes": WORLD, "threads_per_process": 1,
                "bytes_sent_per_ar_step_per_rank": {k: sum(r[k] for r in per_rank) / WORLD for k in kinds},
                "bytes_sent_per_ar_step_all_ranks": sum(sum(r.values()) for r in per_rank),
                "collectives_per_ar_step_per_rank": {k: sum(c[k] for c in calls) / WORLD for k in kinds},
                "rank_seconds": [round(r["seconds"], 4) for r in self.last]}


def _ar_steps(plan: dict) -> int:
    from nova_fast.distributed import ar_steps_executed
    from nova_fast.reference import NOVAConfig

    return ar_steps_executed(NOVAConfig.preset(plan["config"]), GEN["num_latent_frames"], GEN["num_ar_steps"])


def scale_out_setup(names: list[str], batch: int):
    def setup() -> dict:
        impls = {"1 process": OneProcess(dict(config="mid", batch=batch, gen=GEN))}
        try:
            pool = RankPool.shared()
        except Exception as exc:  # noqa: BLE001 -- reported as unavailable with the reason
            for name in names:
                impls[name] = RuntimeError(f"could not start {WORLD} gloo ranks: {exc}")
            return impls
        for name in names:
            impls[name] = PoolRun(pool, name, _ar_steps(PLANS[name]))
        return impls
    return setup


def _sizes(batch: int) -> dict:
    return {**SCALE_SIZES, "batch": batch, "guidance": True, "dtype": "float32", "device": "cpu",
            "backend": "gloo", "processes": WORLD}


_NAME = f"{SCALE_SIZES['config']} {SCALE_SIZES['latent_frames']}f x{SCALE_SIZES['ar_steps']}ar x{SCALE_SIZES['diffusion_steps']}dn"
CASES: list[BenchCase] = [
    BenchCase(op="scale_out", name=f"{_NAME} b1", setup=scale_out_setup(["cfg-parallel x2", "ulysses x2"], 1),
              baseline="1 process", sizes=_sizes(1)),
    BenchCase(op="scale_out", name=f"{_NAME} b2", setup=scale_out_setup(["data-parallel x2"], 2),
              baseline="1 process", sizes=_sizes(2)),
]
IMPLS = ("1 process", "cfg-parallel x2", "ulysses x2", "data-parallel x2")

if pytest is not None:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.split()[-1])
    def test_scale_out(run_bench_case, case, impl):
        run_bench_case(case, impl, rounds=3)
