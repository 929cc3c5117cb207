"""Benchmark: nova_fast.residual_norm vs the eager composition ``x + gate * F.layer_norm(y, w, b)``.

Sizes of the released heads and encoders: (B*L, D) = (4096, 1280) and (2*1800, 1024), fp32, forward. The gated form is the
diffusion-head residual (gate per token, the third chunk of a (B, L, 3D) adaLN projection, read in
place); the ungated form is the encoders' post-norm residual. Implementations: ``eager``, ``torch``
(on CPU the one-pass kernel of csrc/cpu/adaln.cpp), ``torch_inplace`` (inplace=True), and ``triton`` /
``cuda`` where a GPU is present.

``metrics`` reports the bytes each call moves: eager is 3 passes with a gate (layer_norm, multiply,
add) or 2 without; fused is one read of x, y (and gate) and one write; plus the torch backend's
first-call (compile) time for the case, measured separately from the timed calls.

Run: ``pytest bench/test_residual_norm_bench.py --benchmark-only``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import nova_fast
from bench.case import BenchCase, backend_impls, bench_device, first_call_seconds, traffic_metrics, with_backend

COMPILE_S: dict[str, float] = {}


def _setup(name, B, L, D, dtype, gated):
    def setup():
        dev = bench_device()
        x = torch.randn(B, L, D, device=dev, dtype=dtype)
        y = torch.randn(B, L, D, device=dev, dtype=dtype)
        weight, bias = torch.randn(2, D, device=dev, dtype=dtype).unbind(0)
        gate = torch.randn(B, L, 3 * D, device=dev, dtype=dtype).chunk(3, -1)[2] if gated else None
        target = x.clone()

        def eager():
            branch = F.layer_norm(y, (D,), weight, bias, 1e-5)
            return x + (branch if gate is None else gate * branch)

        impls = {"eager": eager}
        impls.update(backend_impls("residual_norm", lambda: nova_fast.residual_norm(x, y, weight, bias, gate=gate), dev))
        impls["torch_inplace"] = with_backend(
            "residual_norm", "torch", lambda: nova_fast.residual_norm(target, y, weight, bias, gate=gate, inplace=True))
        COMPILE_S[name] = first_call_seconds(impls["torch"])
        return impls
    return setup


def _metrics(name, B, L, D, dtype, gated):
    def metrics():
        X = B * L * D * torch.empty((), dtype=dtype).element_size()  # one (B, L, D) tensor
        eager = 2 * X + (3 * X if gated else 0) + 3 * X  # layer_norm, [gate *], x +
        fused = (4 if gated else 3) * X
        return traffic_metrics(eager, fused, 3 if gated else 2, COMPILE_S.get(name))
    return metrics


def _case(name, B, L, D, dtype=torch.float32, gated=True, quick=True):
    sizes = {"B": B, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""),
             "gate": "per token, chunk of (B, L, 3D)" if gated else None}
    return BenchCase("residual_norm", name, _setup(name, B, L, D, dtype, gated), "eager", sizes,
                     _metrics(name, B, L, D, dtype, gated), quick)


CASES = [
    _case("gated 1x4096x1280 fp32", 1, 4096, 1280),
    _case("gated 2x1800x1024 fp32", 2, 1800, 1024),
    _case("post-norm 1x4096x1280 fp32", 1, 4096, 1280, gated=False, quick=False),
    _case("post-norm 2x1800x1024 fp32", 2, 1800, 1024, gated=False, quick=False),
]

_IMPLS = ("eager", "torch", "torch_inplace", "triton", "cuda")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_residual_norm_bench(run_bench_case, case, impl):
    run_bench_case(case, impl)
