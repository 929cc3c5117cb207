"""Benchmark: nova_fast.group_causal_attention vs NOVA's dense additive mask and FlexAttention.

Shapes of the released video model's attention (fp32, forward, B=1, H=16, D=64):
- temporal training: prefix 258 + 9 frames x 360 = 3498 tokens, block-causal (``frame_groups``);
- spatial random sets: prefix 360 + 1440 tokens in 64 random sets (``random_set_groups``, unsorted).
A third, non-quick case times forward + backward on the temporal shape.

Implementations: ``sdpa_dense_mask`` (baseline: ``F.scaled_dot_product_attention`` with the dense
N x N additive float mask, NOVA's own path; the mask is built once in setup, outside the timing),
``flex_compiled`` (``torch.compile(flex_attention)`` with a block mask built from the same rule,
also outside the timing: its build time and the first (compiling) call are in the metrics),
``torch`` (this op's torch backend: on fp32 CPU tensors its CPU kernel,
csrc/cpu/group_causal_attention.cpp), ``torch_aten_chunks`` (CPU, fp32: the same backend with the
CPU kernels off, i.e. its chunked ATen flash-attention path, the one fp16 / bf16 take) and
``triton`` on a GPU. Forward cases also time
``sdpa_causal_bound``: SDPA with ``is_causal=True`` on the same tensors, a different mask (not an
answer to the problem) with about the same number of visible pairs (N^2 / 2 against the rule's
``pair_fraction``): how fast the dense kernel runs when it skips half the work itself, i.e. the
ceiling for any method built on that kernel.

Metrics: the work counter (``attention_work``: key tiles the Triton kernel visits / tiles of the
dense problem, split into full tiles (no mask arithmetic) and partial ones; visible (query, key)
pairs, which is exactly what the torch backend computes, and their share of the visited tiles'
pairs),
the dense mask's bytes, and each implementation's peak extra tensor memory during one call
(:func:`peak_extra_bytes`; the output included, the prebuilt mask / block mask not).

Run: ``pytest bench/test_group_causal_attention_bench.py --benchmark-only``.
``python -m bench.test_group_causal_attention_bench`` prints the Triton kernels' resources per
target from an AOT compile (:func:`kernel_resources`; no GPU needed, no timing).
"""
from __future__ import annotations

import os
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import nova_fast
from bench.case import BenchCase, backend_impls, bench_device
from nova_fast.ops.group_causal_attention import attention_work, frame_groups, random_set_groups

EXTRA: dict[str, dict] = {}   # case name -> figures measured in setup (build/compile times, memory)


def peak_extra_bytes(fn) -> int:
    """Peak of tensor memory allocated minus freed during ``fn()`` (the output included).

    CUDA: the allocator's peak above the starting level. CPU: the profiler's memory records; each
    op's net (self) allocation is placed at its start and every free at its time, so the peak is
    at op granularity (scratch an op allocates and frees inside itself is not seen)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def without_cpu_kernels(fn):
    """``fn`` with the CPU kernels off (``NOVA_FAST_CPU_KERNELS=0``): the torch backend's chunked
    ATen flash-attention path, which fp16 / bf16 and machines without the kernels run."""
    def call():
        with mock.patch.dict(os.environ, {"NOVA_FAST_CPU_KERNELS": "0"}):
            return fn()
    return call


def _setup(name, groups_fn, H, D, dtype, backward):
    def setup():
        dev = bench_device()
        groups = groups_fn().to(dev)
        N = groups.numel()
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, N, D, generator=gen).to(dev, dtype).requires_grad_(backward) for _ in range(3))
        grad = torch.randn(1, H, N, D, generator=gen).to(dev, dtype)
        mask = torch.zeros(N, N, device=dev, dtype=dtype).masked_fill_(groups[None, :] > groups[:, None],
                                                                       float("-inf"))

        def timed(f):
            if not backward:
                def fwd():
                    with torch.no_grad():
                        return f()
                return fwd

            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                f().backward(grad)
            return fwd_bwd

        impls = {"sdpa_dense_mask": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))}
        if not backward:
            impls["sdpa_causal_bound"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        fused = timed(lambda: nova_fast.group_causal_attention(q, k, v, groups))
        impls.update(backend_impls("group_causal_attention", fused, dev, candidates=("torch", "triton")))
        if dev.type == "cpu" and dtype == torch.float32:  # the torch backend's other path, same run
            impls["torch_aten_chunks"] = without_cpu_kernels(impls["torch"])
        extra = EXTRA.setdefault(name, {"dense_mask_MiB": round(mask.numel() * mask.element_size() / 2**20, 1),
                                        "output_MiB": round(q.numel() * q.element_size() / 2**20, 1)})
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            t0 = time.perf_counter()
            block_mask = create_block_mask(lambda b, h, qi, ki: groups[ki] <= groups[qi], None, None, N, N,
                                           device=str(dev))
            extra["flex_block_mask_build_s"] = round(time.perf_counter() - t0, 3)
            flex = torch.compile(flex_attention, dynamic=False)  # one static graph per case
            impls["flex_compiled"] = timed(lambda: flex(q, k, v, block_mask=block_mask))
            t0 = time.perf_counter()
            impls["flex_compiled"]()
            extra["flex_first_call_s"] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # noqa: BLE001 -- reported as the impl's skip reason
            impls["flex_compiled"] = exc
            extra["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for label, fn in impls.items():
            if not isinstance(fn, BaseException):
                fn()  # warm up before measuring memory
                extra[f"peak_extra_MiB_{label}"] = round(peak_extra_bytes(fn) / 2**20, 1)
        return impls
    return setup


def _metrics(name, groups_fn):
    def metrics():
        w = attention_work(groups_fn())
        out = {"tiles_visited": w["tiles_visited"], "tiles_full": w["tiles_full"], "tiles_partial": w["tiles_partial"],
               "tiles_total": w["tiles_total"],
               "tile_fraction": round(w["tile_fraction"], 4), "pair_fraction": round(w["pair_fraction"], 4),
               "useful_fraction": round(w["useful_fraction"], 4),
               "tile": f"{w['block_m']}x{w['block_n']}"}
        out.update(EXTRA.get(name, {}))
        return out
    return metrics


def _temporal():
    return frame_groups(9, 360, 258)


def _spatial():
    return random_set_groups(1440, 64, torch.Generator().manual_seed(0), prefix_len=360)


def _case(name, groups_fn, layout, backward=False, quick=True, H=16, D=64, dtype=torch.float32):
    n = groups_fn().numel()
    sizes = {"B": 1, "H": H, "N": n, "D": D, "dtype": str(dtype).replace("torch.", ""), "layout": layout,
             "pass": "forward+backward" if backward else "forward"}
    return BenchCase("group_causal_attention", name, _setup(name, groups_fn, H, D, dtype, backward),
                     "sdpa_dense_mask", sizes, _metrics(name, groups_fn), quick)


CASES = [
    _case("temporal 258+9x360 fp32", _temporal, "prefix 258 + 9 frames x 360, block-causal"),
    _case("spatial 360+1440 in 64 sets fp32", _spatial, "prefix 360 + 1440 tokens in 64 random sets"),
    _case("temporal 258+9x360 fp32 fwd+bwd", _temporal, "prefix 258 + 9 frames x 360, block-causal",
          backward=True, quick=False),
]

_IMPLS = ("sdpa_dense_mask", "sdpa_causal_bound", "flex_compiled", "torch", "torch_aten_chunks", "triton")


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_group_causal_attention_bench(run_bench_case, case, impl):
    run_bench_case(case, impl)


# ---------------------------------------------------------------- kernel resources (AOT, no GPU)
def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM of a kernel, from its AOT registers and shared memory (the occupancy
    model of ``nova_fast.testing.aot_report``, which also names the limiting resource)."""
    from nova_fast.testing.aot_report import ctas_per_sm as occupancy

    return occupancy(registers, shared_bytes, num_warps * 32, arch)[0]


def kernel_resources() -> list[dict]:
    """Per Triton attention kernel and target (sm_80, sm_90): registers, local memory (spills),
    shared memory, CTAs per SM and tensor-core instructions (HMMA / HGMMA) in the SASS, from an AOT
    compile of every production configuration (``AOT_SPECS``). Takes minutes (the triton cache helps)."""
    from nova_fast.testing import triton_aot

    rows = []
    for r in triton_aot.compile_in_subprocess("nova_fast.kernels.group_causal_attention"):
        # the warps the compiled kernel launches (a warp-specialised kernel more than it asked for)
        warps = r.threads // 32
        rows.append({"kernel": r.spec, "arch": f"sm_{r.arch}", "registers": r.registers, "spill_bytes": r.local_bytes,
                     "shared_KiB": round(r.shared_bytes / 1024, 1),
                     "ctas_per_sm": 0 if r.error else ctas_per_sm(r.registers, r.shared_bytes, warps, r.arch),
                     "warps": warps, "hmma": r.hmma, "hgmma": r.hgmma, "error": r.error})
    return rows


if __name__ == "__main__":  # python -m bench.test_group_causal_attention_bench: the resource table
    print(f"{'kernel':34} {'arch':6} {'regs':>5} {'spill':>6} {'smem KiB':>9} {'warps':>5} {'CTA/SM':>6} "
          f"{'HMMA':>5} {'HGMMA':>6}")
    for row in kernel_resources():
        print(f"{row['kernel']:34} {row['arch']:6} {row['registers']:5d} {row['spill_bytes']:6d} "
              f"{row['shared_KiB']:9.1f} {row['warps']:5d} {row['ctas_per_sm']:6d} {row['hmma']:5d} {row['hgmma']:6d}"
              + (f"  ERROR {row['error'][:60]}" if row["error"] else ""))
