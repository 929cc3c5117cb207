"""Benchmark: nova_fast.modulate vs the eager composition ``F.layer_norm(x) * (1 + scale) + shift``.

Sizes of the released heads and encoders: (B*L, D) = (4096, 1280) and (2*1800, 1024), fp32, forward, statistics per token
as NOVA feeds them (chunks of one (B, L, 3D) adaLN projection, read in place); plus the video mixer
(no norm, chunks of a (B, L, 2D) projection). Implementations: ``eager``, ``torch`` (the backend:
on CPU the one-pass kernel of csrc/cpu/adaln.cpp), and ``triton`` / ``cuda`` where a GPU is present.

``metrics`` reports the bytes each call moves: the eager composition is 4 passes (layer_norm,
1 + scale, multiply, add), the fused op one read of x, scale, shift and one write; and the torch
backend's first-call (compile) time for the case, measured separately from the timed calls.

Run: ``pytest bench/test_modulate_bench.py --benchmark-only``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import nova_fast
from bench.case import BenchCase, backend_impls, bench_device, first_call_seconds, traffic_metrics

COMPILE_S: dict[str, float] = {}


def _setup(name, B, L, D, dtype, normalize, n_stats):
    def setup():
        dev = bench_device()
        x = torch.randn(B, L, D, device=dev, dtype=dtype)
        stats = torch.randn(B, L, n_stats * D, device=dev, dtype=dtype)
        scale, shift = stats.chunk(n_stats, -1)[:2]

        def eager():
            h = F.layer_norm(x, (D,), eps=1e-6) if normalize else x
            return h * (1 + scale) + shift

        def fused():
            return nova_fast.modulate(x, scale, shift, normalize=normalize)

        impls = {"eager": eager, **backend_impls("modulate", fused, dev)}
        COMPILE_S[name] = first_call_seconds(impls["torch"])
        return impls
    return setup


def _metrics(name, B, L, D, dtype, normalize, n_stats):
    def metrics():
        e = torch.empty((), dtype=dtype).element_size()
        X = B * L * D * e  # one (B, L, D) tensor
        S = X              # per-token statistics: scale and shift are (B, L, D) each
        eager = (2 * X if normalize else 0) + 2 * S + (2 * X + S) + (2 * X + S)
        fused = X + 2 * S + X
        return traffic_metrics(eager, fused, 4 if normalize else 3, COMPILE_S.get(name))
    return metrics


def _case(name, B, L, D, dtype=torch.float32, normalize=True, n_stats=3, quick=True):
    sizes = {"B": B, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""), "normalize": normalize,
             "stats": f"per token, chunk of (B, L, {n_stats}D)"}
    return BenchCase("modulate", name, _setup(name, B, L, D, dtype, normalize, n_stats), "eager", sizes,
                     _metrics(name, B, L, D, dtype, normalize, n_stats), quick)


CASES = [
    _case("adaLN 1x4096x1280 fp32", 1, 4096, 1280),
    _case("adaLN 2x1800x1024 fp32", 2, 1800, 1024),
    _case("mixer 2x1800x1024 fp32", 2, 1800, 1024, normalize=False, n_stats=2, quick=False),
]

_IMPLS = ("eager", "torch", "triton", "cuda")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_modulate_bench(run_bench_case, case, impl):
    run_bench_case(case, impl)
