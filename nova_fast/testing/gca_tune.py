"""Generate the group-causal attention kernels' per-architecture tile table, pruned by AOT occupancy.

For every (architecture, dtype class, head dim, kernel) a small candidate space of block sizes,
warps and stages (:func:`candidates`) is compiled ahead of time for sm_80 and sm_90 (no GPU needed)
with two tritons: the venv's and COMPAT_TRITON (3.6, the lent GPU machine's, installed beside the
venv by .ci/env.sh), each in its own interpreter-off process, the two at once. A candidate is
discarded if under either triton it does not compile, spills (local memory) or needs more shared
memory than one block may use on that architecture; its registers and shared memory are the larger
of the two tritons' (kept per triton in ``per_triton``). It is also discarded if it fits fewer CTAs
per SM than the best candidate with the same tile (e.g. a third pipeline stage that halves the
resident CTAs). The survivors are ranked by tile elements resident per SM (CTAs/SM x BLOCK_M x
BLOCK_N), then more stages, then fewer warps; the launcher takes the first (and a GPU autotuner may
try the others). Without triton COMPAT_TRITON the table is not built (no single-triton table).

The dtype class "16bit" is compiled as bf16 and serves fp16 too (same tile shapes, same register and
shared-memory use); "fp32" is the exact-fp32 (ieee) kernels. ``dkdv_atomic`` (the atomic-dq backward:
the dk/dv loop plus a BLOCK_M x D fp32 dq product) has its own entries, its candidates the dk/dv
tiles and smaller ones, so that it too runs spill-free. ``fwd_tma`` (the Hopper TMA forward) and
``fwd_tma_ws`` (its warp-specialised form) are tuned for sm_90 16-bit only. ``fwd_tma_ws`` candidates
are 4 warps and BLOCK_M 128 only (what triton's sm_90 warp_specialize pass splits into a producer and
two 64-row consumer warp groups); one that compiles unspecialised under either triton (no USETMAXREG
in its SASS) is discarded. The occupancy of every candidate counts the threads the compiled kernel
launches (triton_aot.launch_threads), which after warp specialisation is more than 32 x num_warps
(kept as ``launch_warps`` in the entries where it differs).

    python -m nova_fast.testing.gca_tune            # print the table
    python -m nova_fast.testing.gca_tune --write    # rewrite kernels/group_causal_attention_configs.py
    python -m nova_fast.testing.gca_tune --write --keys '[[90, "16bit", 64, "fwd_tma_ws"]]'
        # recompile only these entries; every other entry is kept as the table has it (the table's
        # tritons must be this venv's and COMPAT_TRITON): the file is what the full --write gives
"""
from __future__ import annotations

import argparse
import json
import pprint
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nova_fast.testing.aot_report import ARCH_LIMITS, ctas_per_sm as aot_ctas_per_sm
from nova_fast.testing.triton_aot import COMPAT_TRITON, compat_triton_path, run_interpreter_off

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = REPO_ROOT / "kernels" / "group_causal_attention_configs.py"
COMMAND = "python -m nova_fast.testing.gca_tune --write"

# one block's dynamic shared memory limit, from the occupancy model's architecture table
SHARED_PER_BLOCK = {arch: lim["smem_per_cta_max"] for arch, lim in ARCH_LIMITS.items()}

_16BIT_TILES = {"fwd": [(128, 64), (128, 128), (64, 64)],
                "dkdv": [(32, 64), (32, 128), (64, 64)],
                # the atomic-dq backward: the dk/dv loop plus a BLOCK_M x D fp32 dq product, so the
                # dk/dv tiles and smaller ones (16 rows) for the extra accumulator's registers
                "dkdv_atomic": [(16, 32), (16, 64), (32, 32), (32, 64), (32, 128), (64, 64)],
                "dq": [(128, 32), (128, 64), (64, 64)],
                "fwd_tma": [(128, 64), (128, 128)],
                "fwd_tma_ws": [(None, 64), (None, 128)]}  # BLOCK_M: the kernels' WS_BLOCK_M
# kinds whose kernel loop is warp-specialised: a candidate compiled without USETMAXREG is discarded
WARP_SPECIALISED = ("fwd_tma_ws",)
_FP32_TILES = {"fwd": [(32, 32), (32, 16)], "dkdv": [(16, 32), (32, 32)],
               "dkdv_atomic": [(16, 16), (16, 32), (32, 16), (32, 32)], "dq": [(32, 32), (32, 16)]}


def candidates(arch: int, dtype_class: str, head_dim: int, kind: str) -> list[dict]:
    """The candidate space of one table entry (before pruning)."""
    if kind in WARP_SPECIALISED or kind == "fwd_tma":
        if arch != 90 or dtype_class != "16bit":
            return []
    tiles = (_16BIT_TILES if dtype_class == "16bit" else _FP32_TILES)[kind]
    stages = (2, 3) if dtype_class == "16bit" else (2,)
    warps = (4, 8)
    if kind in WARP_SPECIALISED:  # what the sm_90 pass specialises, as the launcher checks it
        from nova_fast.kernels.group_causal_attention import WS_BLOCK_M, WS_NUM_WARPS

        tiles, warps = [(WS_BLOCK_M, bn) for _, bn in tiles], (WS_NUM_WARPS,)
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm, bn in tiles for w in warps for s in stages]


def keys(archs=(80, 90), dtype_classes=("16bit", "fp32"), head_dims=(64, 128),
         kinds=("fwd", "dkdv", "dkdv_atomic", "dq", "fwd_tma", "fwd_tma_ws")) -> list[tuple]:
    return [(a, c, d, k) for a in archs for c in dtype_classes for d in head_dims for k in kinds
            if candidates(a, c, d, k)]


def ctas_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM of a kernel launching ``num_warps`` warps (:func:`launch_warps`: after warp
    specialisation more than were asked for): the occupancy model of nova_fast.testing.aot_report
    (registers allocated per warp in units of 256, shared memory with its per-CTA reserve, threads,
    CTA slots)."""
    return aot_ctas_per_sm(registers, shared, 32 * num_warps, arch)[0]


def launch_warps(candidate: dict) -> int:
    """The warps a compiled candidate launches per CTA: ``launch_warps`` where the compile gave more
    than the ``num_warps`` asked for (warp specialisation adds warp groups), else ``num_warps``."""
    return candidate.get("launch_warps", candidate["num_warps"])


def _compile_entry(key) -> list[dict]:
    """Compile every candidate of one entry with this process's triton (interpreter off): each with its
    resources or why it failed."""
    from nova_fast.kernels import group_causal_attention as kernels
    from nova_fast.testing.triton_aot import AotSpec, compile_spec, launch_threads, sass_count

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
            compiled, regs, local, sass = compile_spec(getattr(kernels, kernel_name), spec, arch)
        except Exception as exc:  # a candidate that does not compile is pruned, with the reason kept
            out.append(dict(cfg, error=f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"))
            continue
        if kind in WARP_SPECIALISED and not sass_count(sass, "USETMAXREG"):
            out.append(dict(cfg, error="not warp-specialised: no USETMAXREG in the SASS"))
            continue
        row = dict(cfg, registers=regs, local_bytes=local, shared_bytes=compiled.metadata.shared)
        if launch_threads(compiled) != 32 * cfg["num_warps"]:
            row["launch_warps"] = launch_threads(compiled) // 32
        out.append(row)
    return out


def compile_entries(entry_keys) -> dict:
    """{"triton": this process's triton version, "entries": [[key, candidates compiled]]}, compiled in
    this (interpreter-off) process."""
    import triton

    return {"triton": triton.__version__, "entries": [[list(k), _compile_entry(k)] for k in entry_keys]}


def compile_entries_in_subprocess(entry_keys, triton_path=None, timeout: float = 3600) -> dict:
    """:func:`compile_entries` in a fresh interpreter-off process, with the venv's triton or the one
    in ``triton_path`` (triton_aot's subprocess mechanism)."""
    out = run_interpreter_off("nova_fast.testing.gca_tune",
                              ["--compiled-json", "--keys", json.dumps([list(k) for k in entry_keys])],
                              timeout, triton_path=triton_path)
    return json.loads(out)


def merge(per_triton: dict) -> list[dict]:
    """One entry's candidates compiled by several tritons ({version: [candidate results]}, the same
    candidates in the same order) as one list: an error under any triton is an error; local bytes,
    registers and shared bytes are the largest of the tritons', with each triton's (registers, shared
    bytes) kept under ``per_triton``; ``launch_warps`` (where a triton launches more warps than asked
    for) the largest of the tritons' :func:`launch_warps`."""
    versions = list(per_triton)
    merged = []
    for rows in zip(*(per_triton[v] for v in versions)):
        cfg = {k: rows[0][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        if any({k: r[k] for k in cfg} != cfg for r in rows):
            raise ValueError(f"per_triton: the tritons' candidate lists differ at {rows}")
        errors = [f"triton {v}: {r['error']}" for v, r in zip(versions, rows) if r.get("error")]
        if errors:
            merged.append(dict(cfg, error="; ".join(errors)))
            continue
        entry = dict(cfg, registers=max(r["registers"] for r in rows),
                     local_bytes=max(r["local_bytes"] for r in rows),
                     shared_bytes=max(r["shared_bytes"] for r in rows),
                     per_triton={v: (r["registers"], r["shared_bytes"]) for v, r in zip(versions, rows)})
        warps = max(launch_warps(r) for r in rows)
        if warps != cfg["num_warps"]:
            entry["launch_warps"] = warps
        merged.append(entry)
    return merged


def prune(arch: int, compiled: list[dict]) -> list[dict]:
    """Drop candidates that fail, spill or overflow shared memory, then those fitting fewer CTAs/SM
    than the best with the same tile; rank the rest (best first)."""
    ok = []
    for c in compiled:
        if c.get("error") or c["local_bytes"] or c["shared_bytes"] > SHARED_PER_BLOCK[arch]:
            continue
        ok.append(dict(c, ctas_per_sm=ctas_per_sm(arch, c["registers"], c["shared_bytes"], launch_warps(c))))
    best = {}
    for c in ok:
        tile = (c["BLOCK_M"], c["BLOCK_N"])
        best[tile] = max(best.get(tile, 0), c["ctas_per_sm"])
    kept = [c for c in ok if c["ctas_per_sm"] == best[(c["BLOCK_M"], c["BLOCK_N"])] and c["ctas_per_sm"] > 0]
    kept.sort(key=lambda c: (-c["ctas_per_sm"] * c["BLOCK_M"] * c["BLOCK_N"], -c["num_stages"], c["num_warps"],
                             -c["BLOCK_M"]))
    return kept


def build(entry_keys) -> tuple[dict, tuple[str, str]]:
    """({key: ranked pruned configs}, (venv triton version, COMPAT_TRITON)) for ``entry_keys``: the
    candidates compiled with both tritons at once, each in its own interpreter-off process (safe from
    tests), merged (:func:`merge`) and pruned."""
    path = compat_triton_path()
    if path is None:
        raise RuntimeError(f"triton {COMPAT_TRITON} (the lent GPU machine's) is not installed beside the venv: "
                           "run .ci/env.sh; the table is pruned under both tritons, never one")
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda tp: compile_entries_in_subprocess(entry_keys, tp), (None, path)))
    versions = tuple(run["triton"] for run in runs)
    if versions[1] != COMPAT_TRITON or versions[0] == versions[1]:
        raise RuntimeError(f"expected the venv's triton and triton {COMPAT_TRITON}, got {versions}")
    by_key = [{tuple(k): rows for k, rows in run["entries"]} for run in runs]
    table = {tuple(k): prune(k[0], merge({v: rows[tuple(k)] for v, rows in zip(versions, by_key)}))
             for k in entry_keys}
    return table, versions


def render(table: dict, versions: tuple[str, str]) -> str:
    body = pprint.pformat(table, width=118, sort_dicts=False)
    return (f'"""GENERATED by `{COMMAND}` (triton {versions[0]} and {versions[1]}); do not edit by hand.\n\n'
            "Per (arch, dtype class, head dim, kernel): the AOT-pruned configurations, best first, pruned and\n"
            "ranked under both tritons (registers and shared bytes: the larger; per_triton: each one's\n"
            "(registers, shared bytes)); see nova_fast/testing/gca_tune.py for the candidate space, the\n"
            'pruning and the ranking."""\n'
            f"TRITON_VERSIONS = {versions!r}\n"
            f"GENERATED_BY = {COMMAND!r}\n"
            f"CONFIGS = {body}\n")


def complete_with_table(table: dict, versions: tuple[str, str]) -> dict:
    """The full table: ``table``'s entries (some keys, just built) and the committed table's for every
    other key of :func:`keys`, in that order. Refused (RuntimeError) if the committed table was made
    with other tritons or lacks a key not rebuilt: then only the full --write makes a whole table."""
    committed = runpy.run_path(str(TABLE_PATH))
    if tuple(committed["TRITON_VERSIONS"]) != versions:
        raise RuntimeError(f"the table was generated with tritons {committed['TRITON_VERSIONS']}, these are "
                           f"{versions}: regenerate all of it (`{COMMAND}` without --keys)")
    unknown = [k for k in table if k not in keys()]
    missing = [k for k in keys() if k not in table and k not in committed["CONFIGS"]]
    if unknown or missing:
        raise RuntimeError(f"keys not in the candidate space: {unknown}; table entries neither rebuilt nor "
                           f"committed: {missing} (add them to --keys or run `{COMMAND}` without --keys)")
    return {k: table[k] if k in table else committed["CONFIGS"][k] for k in keys()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"rewrite {TABLE_PATH.relative_to(REPO_ROOT)}")
    p.add_argument("--compiled-json", action="store_true",
                   help="compile the candidates with this process's triton only and print them as JSON, unpruned")
    p.add_argument("--keys", help="JSON list of [arch, dtype class, head dim, kind] (default: all); with "
                                  "--write, only these entries are rebuilt and the table's others kept")
    a = p.parse_args(argv)
    entry_keys = [tuple(k) for k in json.loads(a.keys)] if a.keys else keys()
    if a.compiled_json:
        print(json.dumps(compile_entries(entry_keys)))
        return 0
    try:
        table, versions = build(entry_keys)
        if a.write and a.keys:
            table = complete_with_table(table, versions)
    except RuntimeError as exc:  # no compat triton, a compile process that failed, a table that does not
        print(f"gca_tune: {exc}", file=sys.stderr)  # match: nothing written
        return 1
    if a.write:
        TABLE_PATH.write_text(render(table, versions))
        print(f"wrote {TABLE_PATH} ({len(table)} entries, {len(entry_keys)} rebuilt)")
    else:
        print(render(table, versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
