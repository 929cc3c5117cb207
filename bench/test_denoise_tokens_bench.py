"""Benchmark: nova_fast.denoise_tokens vs the full-canvas denoise loop (one AR step's K steps).

Sizes: the osp480 head (mlp_d3w1280, condition width 1024, patch 2, 4 channels),
a 60x96 latent canvas (L = 1440 tokens), batch 1 with 2x guidance (cfg 5), K = 25 DDPM steps,
n in {8, 22, 64, 180} predicted tokens, fp32. Implementations: ``reference`` (the loop as the
spec states it: full-canvas patch embedding, condition projection every step, guidance and the
scheduler over the whole canvas; the oracle of tests/test_denoise_tokens.py) and ``torch`` (the
op on its CPU backends); ``cuda`` / ``triton`` where a GPU is present (with CUDA graphs).

``metrics`` reports ops per loop: dispatched ATen ops for the reference, and for the op the ATen
ops plus one launch per fused op (modulate, residual_norm, the guidance+scheduler step).

Run: ``pytest bench/test_denoise_tokens_bench.py --benchmark-only``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import nova_fast
from bench.case import BenchCase, backend_impls, bench_device, count_dispatched_ops

TESTS = Path(__file__).resolve().parents[1] / "tests"
_ORACLE = None


def oracle():
    """tests/test_denoise_tokens.py: the spec's full-canvas loop and its head (released names)."""
    global _ORACLE
    if _ORACLE is None:
        sys.path.insert(0, str(TESTS))
        spec = importlib.util.spec_from_file_location("denoise_tokens_oracle", TESTS / "test_denoise_tokens.py")
        _ORACLE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_ORACLE)
    return _ORACLE


_BUILT: dict = {}


def _inputs(n, dtype):
    key = (n, dtype)
    if key not in _BUILT:
        o, dev = oracle(), bench_device()
        head = o.head_for("d3w1280", dtype).to(dev)
        guidance, scheduler = o.Guidance(5.0), o.make_scheduler("ddpm")
        z, canvas, ids, ids_g = o.make_inputs(head, n, guidance, B=1, canvas_hw=(60, 96), dtype=dtype)
        _BUILT[key] = (o, head, guidance, scheduler, z.to(dev), canvas.to(dev), ids_g.to(dev))
    return _BUILT[key]


def _calls(n, dtype):
    o, head, guidance, scheduler, z, canvas, ids_g = _inputs(n, dtype)
    dev = z.device

    def reference():
        with torch.no_grad():
            return o.oracle_loop(head, z, canvas, scheduler, guidance, torch.Generator(dev).manual_seed(7), ids_g)

    def ours():
        with torch.no_grad():
            return nova_fast.denoise_tokens(head, z, canvas, scheduler, guidance, pred_ids=ids_g,
                                            generator=torch.Generator(dev).manual_seed(7))
    return reference, ours


def _setup(n, dtype):
    def setup():
        reference, ours = _calls(n, dtype)
        dev = bench_device()
        impls = {"reference": reference}

        impls.update(backend_impls("denoise_tokens", ours, dev))
        impls["torch"]()  # first call: compiles the adaLN ops' CPU loops, builds the weight plan
        return impls
    return setup


def _metrics(n, dtype):
    def metrics():
        reference, ours = _calls(n, dtype)
        ref_ops = count_dispatched_ops(reference)

        class _Patch:  # count_launches takes pytest's monkeypatch; a tiny stand-in outside pytest
            def __init__(self):
                self.undo = []

            def setitem(self, d, k, v):
                self.undo.append(lambda old=d[k]: d.__setitem__(k, old))
                d[k] = v

            def setattr(self, obj, name, v):
                self.undo.append(lambda old=getattr(obj, name): setattr(obj, name, old))
                setattr(obj, name, v)

        patch = _Patch()
        try:
            with nova_fast.use_backend("torch", op="denoise_tokens"):
                our_ops = oracle().count_launches(ours, patch)
        finally:
            for undo in reversed(patch.undo):
                undo()
        return {"ops_per_loop_reference": ref_ops, "ops_per_loop_denoise_tokens": our_ops,
                "ops_ratio": round(ref_ops / our_ops, 1)}
    return metrics


def _case(n, dtype=torch.float32, quick=True):
    sizes = {"head": "mlp_d3w1280", "cond_dim": 1024, "canvas": "1x4x60x96 (L=1440)", "B": 1, "guidance": "2x",
             "scheduler": "DDPM", "K": 25, "n": n, "dtype": str(dtype).replace("torch.", "")}
    return BenchCase("denoise_tokens", f"osp480 n={n} K=25 cfg fp32", _setup(n, dtype), "reference", sizes,
                     _metrics(n, dtype), quick)


CASES = [_case(8), _case(22), _case(64, quick=False), _case(180, quick=False)]

_IMPLS = ("reference", "torch", "triton", "cuda")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_denoise_tokens_bench(run_bench_case, case, impl):
    run_bench_case(case, impl, rounds=3)
