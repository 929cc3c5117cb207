"""Which attention-loop constructs survive ``tl.range(..., warp_specialize=True)`` on sm_90.

A FlashAttention-style forward (TMA loads of q, K, V through tensor descriptors, two ``tl.dot``,
online softmax in the exp2 domain), compiled ahead of time for sm_90 (no GPU needed) with the
features of ``gca_fwd_tma_kernel`` switched on one at a time by constexpr flags. Each compile runs
in its own process: a failing warp-specialization pass can abort the process (an MLIR assertion)
rather than raise. For each variant it reports whether it compiled and whether the result is
warp-specialised (``ttg.warp_specialize`` in the TTGIR, ``setmaxnreg`` in the PTX, USETMAXREG in the
SASS) with its TMA (UTMALDG) and wgmma (HGMMA) counts.

``python -m nova_fast.testing.ws_probe`` runs every variant with this triton and with the GPU
machine's (triton_aot.COMPAT_TRITON, when .ci/env.sh installed it) and prints a table (about 2
minutes per triton and warp count on two cores).

What it shows with triton 3.6.0 and 3.9.0 (4 warps, 128 x 64 tiles, 3 stages; the pass is
NVGPUWarpSpecialization, which gives the TMA loads to a producer warp group and splits BLOCK_M
between two 64-row consumer groups): the minimal loop specialises, and so do dynamic loop bounds,
the 1-D program mapping, the shared softmax helper and the empty-row epilogue. Two things fail:
a second loop in the function (either loop specialised: an MLIR Dominance assertion, the process
aborts), and a per-row vector loaded by tl.load before the loop and used in it, here k_visible for
the mask ("unsupported load type for producer commit": only TMA-loaded values can pass from the
producer to the consumers; the same mask against a row vector computed before the loop
specialises). Loading k_visible by TMA inside the loop works; a branch that masks
only the partial tiles compiles but unspecialised. At 8 warps nothing is specialised; at BLOCK_M 64
both consumer groups compute the same 64 rows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import triton
import triton.language as tl

from nova_fast.kernels.group_causal_attention import _fwd_finish, _online_softmax_step, _program
from nova_fast.testing import triton_aot

# the features of gca_fwd_tma_kernel, each a constexpr flag of probe_kernel:
#   PARTIAL     the loop masks keys past each row's k_visible (tl.where(..., -inf)); k_visible's rows
#               loaded by tl.load before the loop, as gca_fwd_tma_kernel does
#   GUARD       rows with nothing visible yet keep m = -inf: shift by 0 so exp2 gives 0 (with PARTIAL)
#   TWO_LOOPS   a full-tile loop without mask, then a partial-tile loop (masked with PARTIAL)
#   DYN_BOUNDS  loop bounds read from k_visible (scalar loads) instead of Nk
#   PID_MAP     the 1-D heaviest-first grid (_program) instead of program_id(0) x program_id(1)
#   HELPER      the loop body is kernels' _online_softmax_step (shared with the gather forward)
#   EPILOGUE    rows that saw no key: output 0 and lse +inf (kernels' _fwd_finish)
# and the ways around what fails (with PARTIAL, one loop):
#   KVIS_TMA    k_visible's rows loaded by TMA inside the loop instead (gca_fwd_tma_ws_kernel's form)
#   TILE_BRANCH the mask applied only on partial tiles, behind a branch on the tile's first key
# and a control: KVIS_ROWS, the mask against a row vector computed before the loop (rows + 1)
# instead of loaded: it specialises, so what fails with PARTIAL is the tl.load, not the mask
FEATURES = ("PARTIAL", "GUARD", "TWO_LOOPS", "DYN_BOUNDS", "PID_MAP", "HELPER", "EPILOGUE", "KVIS_TMA",
            "TILE_BRANCH", "KVIS_ROWS")
# gca_fwd_tma_ws_kernel's features
WS_KERNEL_FORM = ("PARTIAL", "GUARD", "DYN_BOUNDS", "PID_MAP", "HELPER", "EPILOGUE", "KVIS_TMA")


@triton.jit
def _masked_scores(s, keys, kvis, PARTIAL: tl.constexpr):
    if PARTIAL:
        s = tl.where(keys[None, :] < kvis[:, None], s, float("-inf"))
    return s


@triton.jit
def probe_step(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, mask_from, scale_log2, BLOCK_N: tl.constexpr,
               PARTIAL: tl.constexpr, GUARD: tl.constexpr, HELPER: tl.constexpr, TILE_BRANCH: tl.constexpr):
    # one key tile; mask_from: the first key some row does not see (TILE_BRANCH)
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    keys = start_n + tl.arange(0, BLOCK_N)
    if HELPER:
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, keys, kvis, scale_log2, PARTIAL, "tf32")
    else:
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if TILE_BRANCH:
            if start_n + BLOCK_N > mask_from:
                s = _masked_scores(s, keys, kvis, PARTIAL)
        else:
            s = _masked_scores(s, keys, kvis, PARTIAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if GUARD:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def probe_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, k_visible_ptr, scale_log2, Nq, Nk, H, BH, n_qtiles,
                 q_sn, k_sn, v_sn, o_sn, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WS: tl.constexpr, PARTIAL: tl.constexpr, GUARD: tl.constexpr, TWO_LOOPS: tl.constexpr,
                 DYN_BOUNDS: tl.constexpr, PID_MAP: tl.constexpr, HELPER: tl.constexpr,
                 EPILOGUE: tl.constexpr, KVIS_TMA: tl.constexpr, TILE_BRANCH: tl.constexpr,
                 KVIS_ROWS: tl.constexpr):
    # WS: warp_specialize on the first loop (bit 1) and the second (bit 2)
    if PID_MAP:
        tile, b, h, bh = _program(BH, H, n_qtiles, True)
    else:
        tile = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    start_m = tile * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    # each (b, h) a contiguous (N, HEAD_DIM) slice: the probe is about the loop
    q_desc = tl.make_tensor_descriptor(q_ptr + bh * Nq * q_sn, shape=[Nq, HEAD_DIM], strides=[q_sn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr + bh * Nk * k_sn, shape=[Nk, HEAD_DIM], strides=[k_sn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr + bh * Nk * v_sn, shape=[Nk, HEAD_DIM], strides=[v_sn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(o_ptr + bh * Nq * o_sn, shape=[Nq, HEAD_DIM], strides=[o_sn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    if KVIS_TMA:
        kvis_desc = tl.make_tensor_descriptor(k_visible_ptr, shape=[Nq], strides=[1], block_shape=[BLOCK_M])
    elif KVIS_ROWS:
        kvis = rows + 1
    else:
        kvis = tl.load(k_visible_ptr + rows, mask=row_ok, other=0)
    q = q_desc.load([start_m, 0])
    if DYN_BOUNDS or TILE_BRANCH:
        mask_from = tl.load(k_visible_ptr + start_m)
    else:
        mask_from = Nk
    if DYN_BOUNDS:
        n_full = mask_from // BLOCK_N
        n_end = tl.cdiv(tl.load(k_visible_ptr + tl.minimum(start_m + BLOCK_M - 1, Nq - 1)), BLOCK_N)
    else:
        n_full = Nk // BLOCK_N
        n_end = tl.cdiv(Nk, BLOCK_N)
    if not TWO_LOOPS:
        n_full = n_end
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(0, n_full * BLOCK_N, BLOCK_N, warp_specialize=(WS & 1) != 0):
        if KVIS_TMA:
            kvis = kvis_desc.load([start_m])
        acc, m_i, l_i = probe_step(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, mask_from, scale_log2, BLOCK_N,
                                   PARTIAL and not TWO_LOOPS, GUARD and not TWO_LOOPS, HELPER, TILE_BRANCH)
    if TWO_LOOPS:
        for start_n in tl.range(n_full * BLOCK_N, n_end * BLOCK_N, BLOCK_N, warp_specialize=(WS & 2) != 0):
            if KVIS_TMA:
                kvis = kvis_desc.load([start_m])
            acc, m_i, l_i = probe_step(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, mask_from, scale_log2,
                                       BLOCK_N, PARTIAL, GUARD, HELPER, TILE_BRANCH)
    if EPILOGUE:
        out, lse = _fwd_finish(acc, m_i, l_i)
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    o_desc.store([start_m, 0], out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + bh * Nq + rows, lse, mask=row_ok)


def _signature(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "lse_ptr": "*fp32",
           "k_visible_ptr": "*i32", "scale_log2": "fp32"}
    sig.update({n: "i32" for n in ("Nq", "Nk", "H", "BH", "n_qtiles", "q_sn", "k_sn", "v_sn", "o_sn")})
    sig.update({c: "constexpr" for c in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "WS") + FEATURES})
    return sig


@dataclass
class Probe:
    """One compile: the features switched on, the launch shape, and what came out."""
    features: tuple
    ws: int = 3                # warp_specialize on: 1 the first (full-tile) loop, 2 the second, 3 both
    num_warps: int = 4
    num_stages: int = 3
    head_dim: int = 64
    block_m: int = 128
    block_n: int = 64
    dtype: str = "fp16"
    triton_version: str = ""
    compiled: bool = False
    error: str = ""            # the last lines of the failure (exception text or the aborted process's stderr)
    ttgir_ws: int = 0          # ttg.warp_specialize ops in the TTGIR: the loop was partitioned
    setmaxnreg: int = 0        # setmaxnreg in the PTX (register hand-off between warp groups)
    usetmaxreg: int = 0        # USETMAXREG in the SASS
    utmaldg: int = 0           # TMA loads in the SASS
    hgmma: int = 0             # wgmma in the SASS
    total_warps: int = 0       # the kernel's warps after specialisation (metadata num_warps)
    consumer_groups: int = 0   # the TTGIR's warp_specialize partitions besides the default one
    dot_rows: int = 0          # rows of each partition's first wgmma result (the rows one group computes)
    registers: int = 0

    @property
    def specialised(self) -> bool:
        return self.compiled and self.ttgir_ws > 0 and self.usetmaxreg > 0

    @property
    def duplicated(self) -> bool:
        """The consumer groups together compute more rows than the tile has (each the same rows)."""
        return self.specialised and self.consumer_groups * self.dot_rows > self.block_m

    def label(self) -> str:
        return "+".join(self.features) or "base"


def compile_probe(probe: Probe) -> Probe:
    """Compile one probe in this process for sm_90 (TRITON_INTERPRET must be off)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unknown = set(probe.features) - set(FEATURES)
    if unknown:
        raise ValueError(f"features: unknown {sorted(unknown)}; known {FEATURES}")
    constexprs = {"HEAD_DIM": probe.head_dim, "BLOCK_M": probe.block_m, "BLOCK_N": probe.block_n, "WS": probe.ws}
    constexprs.update({f: f in probe.features for f in FEATURES})
    src = ASTSource(fn=probe_kernel, signature=_signature(probe.dtype), constexprs=constexprs)
    probe.triton_version = triton.__version__
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": probe.num_warps, "num_stages": probe.num_stages})
    regs, _, sass = triton_aot._resources(compiled.asm["cubin"])
    probe.compiled = True
    probe.ttgir_ws = len(re.findall(r"ttg\.warp_specialize\b", compiled.asm["ttgir"]))
    probe.setmaxnreg = len(re.findall(r"\bsetmaxnreg\b", compiled.asm["ptx"]))
    probe.usetmaxreg = len(re.findall(r"\bUSETMAXREG\b", sass))
    probe.utmaldg = len(re.findall(r"\bUTMALDG\b", sass))
    probe.hgmma = len(re.findall(r"\bHGMMA\b", sass))
    probe.total_warps = compiled.metadata.num_warps
    ttgir = compiled.asm["ttgir"]
    probe.consumer_groups = len(re.findall(r"^\s*partition\d+\(", ttgir, re.M))
    dot = re.search(r"warp_group_dot [^\n]*-> tensor<(\d+)x", ttgir)
    probe.dot_rows = int(dot.group(1)) if dot else 0
    probe.registers = regs
    return probe


def _version(triton_path) -> str:
    if triton_path is None:
        return triton.__version__
    text = open(os.path.join(str(triton_path), "triton", "__init__.py")).read()
    return re.search(r"__version__ = [\'\"]([^\'\"]+)", text).group(1)


def run_probe(probe: Probe, triton_path=None, timeout: float = 600) -> Probe:
    """compile_probe in a fresh process (an aborting pass takes only that process down);
    ``triton_path``: a folder holding another triton, put first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_path), *filter(None, [env.get("PYTHONPATH")])])
        env["TRITON_CACHE_DIR"] = str(triton_path) + "/.cache"
    cmd = [sys.executable, "-m", "nova_fast.testing.ws_probe", "--one", json.dumps(asdict(probe))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        data = json.loads(lines[-1])
        data["features"] = tuple(data["features"])
        return Probe(**data)
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    # the assertion or exception line, not the stack dump after it
    probe.triton_version = _version(triton_path)
    cause = [ln for ln in err if re.search(r"LLVM ERROR|Assertion", ln)]
    where = [ln for ln in err if "Pipeline failed while executing" in ln]
    probe.error = f"rc={proc.returncode}: " + " | ".join((cause[:1] + where[:1]) or err[-2:])[-600:]
    return probe


# one feature at a time on top of the minimal loop, then gca_fwd_tma_kernel's form (all but the
# remedies), then the remedies
VARIANTS = ((), ("PARTIAL",), ("PARTIAL", "GUARD"), ("TWO_LOOPS",), ("TWO_LOOPS", "PARTIAL", "GUARD"),
            ("DYN_BOUNDS",), ("PID_MAP",), ("HELPER",), ("EPILOGUE",), FEATURES[:7],
            ("PARTIAL", "KVIS_ROWS"), ("PARTIAL", "KVIS_TMA"), ("PARTIAL", "TILE_BRANCH", "KVIS_TMA"), WS_KERNEL_FORM)


def _row(p: Probe) -> str:
    state = ("WS x2" if p.duplicated else "WS" if p.specialised else "plain") if p.compiled else "FAIL"
    detail = (f"warps={p.total_warps:2d} groups={p.consumer_groups}x{p.dot_rows} rows setmaxnreg={p.setmaxnreg} "
              f"USETMAXREG={p.usetmaxreg} UTMALDG={p.utmaldg} HGMMA={p.hgmma}") if p.compiled else p.error[:200]
    return (f"{p.triton_version:6} w{p.num_warps} s{p.num_stages} {p.block_m}x{p.block_n} "
            f"{p.label():55} {state:5} {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help="compile one probe given as JSON (internal: run_probe's child)")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--block-m", default="128", help="BLOCK_M values (64: the two consumer groups duplicate)")
    ap.add_argument("--stages", default="3")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.one:
        data = json.loads(a.one)
        data["features"] = tuple(data["features"])
        print(json.dumps(asdict(compile_probe(Probe(**data)))))
        return 0
    from concurrent.futures import ThreadPoolExecutor

    paths = [None] + ([triton_aot.compat_triton_path()] if triton_aot.compat_triton_path() else [])
    jobs = [(Probe(v, num_warps=w, num_stages=s, block_m=m), path) for path in paths
            for w in map(int, a.warps.split(",")) for s in map(int, a.stages.split(","))
            for m in map(int, a.block_m.split(",")) for v in VARIANTS]
    print("WS: specialised (ttg.warp_specialize in the TTGIR and USETMAXREG in the SASS); WS x2: specialised, but "
          "the consumer groups compute the same rows; plain: compiled unspecialised; FAIL: the compile failed")
    with ThreadPoolExecutor(a.jobs) as pool:
        for p in pool.map(lambda j: run_probe(*j), jobs):
            print(_row(p), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
