"""Generate the group-causal attention kernels' per-architecture tile table, pruned by AOT occupancy.

For every (architecture, dtype class, head dim, kernel) a small candidate space of block sizes,
warps and stages (``CANDIDATES``) is compiled ahead of time with triton for sm_80 and sm_90 (no GPU
needed). A candidate is discarded if it does not compile, spills (local memory), needs more shared
memory than one block may use on that architecture, or fits fewer CTAs per SM than the best
candidate with the same tile (e.g. a third pipeline stage that halves the resident CTAs). The
survivors are ranked by tile elements resident per SM (CTAs/SM x BLOCK_M x BLOCK_N), then more
stages, then fewer warps; the launcher takes the first (and a GPU autotuner may try the others).

The dtype class "16bit" is compiled as bf16 and serves fp16 too (same tile shapes, same register and
shared-memory use); "fp32" is the exact-fp32 (ieee) kernels. ``fwd_tma`` (the Hopper TMA forward) is
tuned for sm_90 only.

    python -m nova_fast.testing.gca_tune            # print the table
    python -m nova_fast.testing.gca_tune --write    # rewrite kernels/group_causal_attention_configs.py
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import subprocess
import sys
from pathlib import Path

from nova_fast.testing.aot_report import ARCH_LIMITS, ctas_per_sm as aot_ctas_per_sm

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = REPO_ROOT / "kernels" / "group_causal_attention_configs.py"
COMMAND = "python -m nova_fast.testing.gca_tune --write"

# one block's dynamic shared memory limit, from the occupancy model's architecture table
SHARED_PER_BLOCK = {arch: lim["smem_per_cta_max"] for arch, lim in ARCH_LIMITS.items()}

_16BIT_TILES = {"fwd": [(128, 64), (128, 128), (64, 64)],
                "dkdv": [(32, 64), (32, 128), (64, 64)],
                "dq": [(128, 32), (128, 64), (64, 64)],
                "fwd_tma": [(128, 64), (128, 128)]}
_FP32_TILES = {"fwd": [(32, 32), (32, 16)], "dkdv": [(16, 32), (32, 32)], "dq": [(32, 32), (32, 16)]}


def candidates(arch: int, dtype_class: str, head_dim: int, kind: str) -> list[dict]:
    """The candidate space of one table entry (before pruning)."""
    if kind == "fwd_tma" and (arch != 90 or dtype_class != "16bit"):
        return []
    tiles = (_16BIT_TILES if dtype_class == "16bit" else _FP32_TILES)[kind]
    stages = (2, 3) if dtype_class == "16bit" else (2,)
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm, bn in tiles for w in (4, 8) for s in stages]


def keys(archs=(80, 90), dtype_classes=("16bit", "fp32"), head_dims=(64, 128),
         kinds=("fwd", "dkdv", "dq", "fwd_tma")) -> list[tuple]:
    return [(a, c, d, k) for a in archs for c in dtype_classes for d in head_dims for k in kinds
            if candidates(a, c, d, k)]


def ctas_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM: the occupancy model of nova_fast.testing.aot_report (registers allocated
    per warp in units of 256, shared memory with its per-CTA reserve, threads, CTA slots)."""
    return aot_ctas_per_sm(registers, shared, 32 * num_warps, arch)[0]


def _compile_entry(key) -> list[dict]:
    """Compile every candidate of one entry (interpreter off): each with its resources or why it failed."""
    from nova_fast.kernels import group_causal_attention as kernels
    from nova_fast.testing.triton_aot import AotSpec, compile_spec

    arch, dtype_class, head_dim, kind = key
    dt = "bf16" if dtype_class == "16bit" else "fp32"
    kernel_name, signature = kernels.kernel_signature(kind, dt)
    out = []
    for cfg in candidates(*key):
        spec = AotSpec(kernel_name, signature,
                       {"HEAD_DIM": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                        "PRECISION": "ieee" if dt == "fp32" else "tf32"},
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        try:
            compiled, regs, local, _ = compile_spec(getattr(kernels, kernel_name), spec, arch)
            out.append(dict(cfg, registers=regs, local_bytes=local, shared_bytes=compiled.metadata.shared))
        except Exception as exc:  # a candidate that does not compile is pruned, with the reason kept
            out.append(dict(cfg, error=f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"))
    return out


def prune(arch: int, compiled: list[dict]) -> list[dict]:
    """Drop candidates that fail, spill or overflow shared memory, then those fitting fewer CTAs/SM
    than the best with the same tile; rank the rest (best first)."""
    ok = []
    for c in compiled:
        if c.get("error") or c["local_bytes"] or c["shared_bytes"] > SHARED_PER_BLOCK[arch]:
            continue
        ok.append(dict(c, ctas_per_sm=ctas_per_sm(arch, c["registers"], c["shared_bytes"], c["num_warps"])))
    best = {}
    for c in ok:
        tile = (c["BLOCK_M"], c["BLOCK_N"])
        best[tile] = max(best.get(tile, 0), c["ctas_per_sm"])
    kept = [c for c in ok if c["ctas_per_sm"] == best[(c["BLOCK_M"], c["BLOCK_N"])] and c["ctas_per_sm"] > 0]
    kept.sort(key=lambda c: (-c["ctas_per_sm"] * c["BLOCK_M"] * c["BLOCK_N"], -c["num_stages"], c["num_warps"],
                             -c["BLOCK_M"]))
    return kept


def build(entry_keys) -> dict:
    """{key: ranked pruned configs} for ``entry_keys``, compiled in this (interpreter-off) process."""
    return {key: prune(key[0], _compile_entry(key)) for key in entry_keys}


def build_in_subprocess(entry_keys, timeout: float = 900) -> dict:
    """:func:`build` in a fresh process with the interpreter off (safe from tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "nova_fast.testing.gca_tune", "--json", "--keys",
                           json.dumps([list(k) for k in entry_keys])],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"gca_tune failed:\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(k): v for k, v in rows}


def render(table: dict) -> str:
    import triton

    body = pprint.pformat(table, width=118, sort_dicts=False)
    return (f'"""GENERATED by `{COMMAND}` (triton {triton.__version__}); do not edit by hand.\n\n'
            "Per (arch, dtype class, head dim, kernel): the AOT-pruned configurations, best first (see\n"
            'nova_fast/testing/gca_tune.py for the candidate space, the pruning and the ranking)."""\n'
            f"TRITON_VERSION = {triton.__version__!r}\n"
            f"GENERATED_BY = {COMMAND!r}\n"
            f"CONFIGS = {body}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"rewrite {TABLE_PATH.relative_to(REPO_ROOT)}")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keys", help="JSON list of [arch, dtype class, head dim, kind] (default: all)")
    a = p.parse_args(argv)
    entry_keys = [tuple(k) for k in json.loads(a.keys)] if a.keys else keys()
    table = build(entry_keys)
    if a.json:
        print(json.dumps([[list(k), v] for k, v in table.items()]))
    elif a.write:
        TABLE_PATH.write_text(render(table))
        print(f"wrote {TABLE_PATH} ({len(table)} entries)")
    else:
        print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
