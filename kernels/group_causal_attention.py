"""Triton kernels for group-causal attention: query i sees key j iff ``k_group[j] <= q_group[i]``.

The kernels take the caller's q, k, v in token order together with a mask plan built on the device
by ``nova_fast.ops.group_causal_attention.MaskPlan`` (no host synchronisation):

- ``q_order`` / ``k_order`` (G, N) int32: sorted position -> token, the stable sort by group. The
  kernels gather rows through them in their loads and scatter through them in their stores, so a
  random-set layout costs no permuted copy of q, k, v, the output or the gradients;
- ``k_visible`` (G, Nq) int32: how many keys the query at sorted position i sees. With keys sorted
  by group those are the first ``k_visible[i]`` sorted keys, and k_visible is non-decreasing.

G is 1 (one layout for the batch) or B. From k_visible each tile's work splits in two ranges:

- query tile t (forward, dq): every row sees key tiles ``[0, k_visible[first row] // BLOCK_N)``
  (full tiles: no mask arithmetic, no bounds checks), some rows see the tiles up to
  ``cdiv(k_visible[last row], BLOCK_N)`` (partial tiles: mask ``key < k_visible[row]``); the rest
  is never read. Both bounds come from two scalar loads per program.
- key tile n (dk/dv): query tiles ``[q_start[n], q_full[n])`` see it partly, ``[q_full[n], end)``
  wholly; :func:`key_tile_plan` computes them (two ``searchsorted`` on the device), and the plan
  object caches them for every layer and step that shares the mask.

Work grows with the sorted index (query tiles) or shrinks with it (key tiles), so the 1-D grid
hands out the heaviest tiles first: the last query tile first, the first key tile first. The grid
is (tiles * B * H,): its x dimension allows 2^31 - 1 programs (y and z only 65,535).

FlashAttention-2 online softmax in the exp2 domain with fp32 accumulation. The log-sum-exp is
stored in natural log per row, in token order; a row that sees no key gets output 0 and
LSE = +inf, so in the backward ``exp(s - lse)`` is exactly 0 for it (no NaN). Backward: a
pre-pass writes delta = rowsum(dO * O) and the lse in log2 units in sorted order, then either

- deterministic (the default): one kernel for dk/dv (loop over query tiles) and one for dq (loop
  over key tiles), without atomics: 7 tile GEMMs per visited (query tile, key tile) pair (S^T, dv,
  dP^T, dk; then S, dP, dq), bitwise reproducible;
- atomic (``deterministic=False``): FlashAttention-2's 5 tile GEMMs: the dk/dv kernel also adds
  ds @ k into an fp32 dq buffer in token order with ``tl.atomic_add`` (no dq kernel, no second
  S and dP), so dq's summation order varies between runs. It has its own table entries
  (``dkdv_atomic``: with its extra BLOCK_M x D fp32 dq product the dk/dv kernel's picks spilled up
  to 224 B per thread; its own candidates are pruned of spills like every kernel's), so its own
  key-tile plan (:func:`backward_kind`).

Offsets: batch and head bases and row offsets are computed in int64 (B*H*N*D may pass 2^31).

fp32 inputs run exact fp32 products (``input_precision="ieee"``: FMA, no tensor cores, the
project's fp32 tolerance) on their own smaller tiles: the 16-bit tiles spill in fp32 and the d128
dq kernel's would need more shared memory than an A100 has.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from nova_fast.testing.triton_aot import AotSpec

LOG2E = 1.4426950408889634
MAX_GRID_X = 2**31 - 1

# Block sizes, warps and stages per (arch, dtype class, head dim, kernel) come from the generated
# table kernels/group_causal_attention_configs.py (nova_fast/testing/gca_tune.py: a small candidate
# space compiled ahead of time for sm_80 and sm_90 with the venv's triton and triton 3.6, pruned of
# spills, shared-memory overflow and lost occupancy under both, ranked). The launcher takes the
# first entry for the device's architecture.
TABLE_ARCHS = (80, 90)
# one block's shared memory on the sm_8x parts other than sm_80 (sm_86, sm_89): 99 KiB
SMALL_SHARED_PER_BLOCK = 99 * 1024
DELTA_BLOCK_M = 64

# tests under the interpreter shrink the tiles (more tiles per sequence: the tile logic is exercised)
_block_override: tuple | None = None


@contextlib.contextmanager
def blocks(block_m: int, block_n: int):
    """Use (block_m, block_n) tiles for every kernel inside the block (tests; powers of two >= 16)."""
    global _block_override
    saved, _block_override = _block_override, (block_m, block_n)
    try:
        yield
    finally:
        _block_override = saved


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype``: exact fp32 products for fp32 (16-bit: unused)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_arch(device=None) -> int:
    """Compute capability as major * 10 + minor of a CUDA device; 80 off a GPU (interpreter, tests)."""
    if device is None or torch.device(device).type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def table_configs(kind: str, head_dim: int, dtype: torch.dtype, arch: int) -> list[dict]:
    """The generated table's pruned configurations of kernel ``kind`` ("fwd", "fwd_tma", "fwd_tma_ws",
    "dkdv", "dkdv_atomic", "dq")
    for ``arch``, best first. sm_9x and later read the sm_90 entries; other sm_8x the sm_80 entries
    that fit their 99 KiB of shared memory per block (none fitting: the smallest; sm_80 all of them)."""
    from .group_causal_attention_configs import CONFIGS

    dtype_class = "fp32" if precision(dtype) == "ieee" else "16bit"
    # the TMA forwards are tuned for sm_90 only
    table_arch = 90 if arch >= 90 or kind in ("fwd_tma", "fwd_tma_ws") else 80
    entries = CONFIGS.get((table_arch, dtype_class, head_dim, kind))
    if not entries:
        raise ValueError(f"no {kind} configuration for sm_{arch}, {dtype}, head dim {head_dim} in the generated table")
    if 80 < arch < 90:
        entries = ([c for c in entries if c["shared_bytes"] <= SMALL_SHARED_PER_BLOCK]
                   or [min(entries, key=lambda c: c["shared_bytes"])])
    return entries


def config(kind: str, head_dim: int, dtype: torch.dtype, device=None) -> dict:
    """Block sizes, warps and stages of kernel ``kind`` (a table kind: "fwd", "fwd_tma", "fwd_tma_ws",
    "dkdv", "dkdv_atomic", "dq") for these inputs on ``device`` (its architecture's first table entry;
    off a GPU the sm_80 one)."""
    entry = table_configs(kind, head_dim, dtype, device_arch(device))[0]
    cfg = {k: entry[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    if _block_override is not None:
        cfg["BLOCK_M"], cfg["BLOCK_N"] = _block_override
    return cfg


# ---------------------------------------------------------------- device helpers
@triton.jit
def _program(BH, H, n_tiles, HEAVY_LAST: tl.constexpr):
    # 1-D grid of n_tiles * B * H programs, in rank-major order so the first wave of programs takes
    # the heaviest tile of every head: HEAVY_LAST (query tiles) maps rank r to tile n_tiles - 1 - r.
    # Returns (tile, b, h, b * H + h) with b, h and b * H + h in int64.
    pid = tl.program_id(0)
    rank = pid // BH
    bh = (pid - rank * BH).to(tl.int64)
    b = bh // H
    if HEAVY_LAST:
        tile = n_tiles - 1 - rank
    else:
        tile = rank
    return tile, b, bh - b * H, bh


@triton.jit
def _row_offsets(tok, stride):
    # element offsets of rows ``tok``: int64, a head's rows times their stride may pass 2^31
    return tok.to(tl.int64) * stride


@triton.jit
def _rows(base, tok, stride, cols):
    # pointers to rows ``tok`` (token indices) of a (rows, HEAD_DIM) slice. The launcher guarantees
    # 16-byte aligned rows (aligned base, strides in bytes multiple of 16), so loads and stores are
    # 16-byte vectors.
    return tl.multiple_of(base + _row_offsets(tok, stride)[:, None] + cols[None, :], [16, 16])


@triton.jit
def _load_rows(base, order_b, idx, stride, cols, n, CHECK: tl.constexpr):
    # rows at sorted positions idx (token order_b[idx]); CHECK: positions past n read as 0
    if CHECK:
        ok = idx < n
        tok = tl.load(order_b + idx, mask=ok, other=0)
        return tl.load(_rows(base, tok, stride, cols), mask=ok[:, None], other=0.0)
    tok = tl.load(order_b + idx)
    return tl.load(_rows(base, tok, stride, cols))


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_bh, v_bh, ko_b, keys, kvis, Nk, k_sn, v_sn, cols, scale_log2,
              PARTIAL: tl.constexpr, PRECISION: tl.constexpr):
    # one key tile of the online softmax. Full tiles (every row sees every key, all keys < Nk): no
    # mask and no bounds checks. Partial tiles: key j visible to a row iff j < its k_visible.
    k = _load_rows(k_bh, ko_b, keys, k_sn, cols, Nk, PARTIAL)
    v = _load_rows(v_bh, ko_b, keys, v_sn, cols, Nk, PARTIAL)
    return _online_softmax_step(acc, m_i, l_i, q, k, v, keys, kvis, scale_log2, PARTIAL, PRECISION)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, keys, kvis, scale_log2,
                         PARTIAL: tl.constexpr, PRECISION: tl.constexpr):
    # the online-softmax update for one loaded key tile, shared by the gather and the TMA forwards
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if PARTIAL:
        s = tl.where(keys[None, :] < kvis[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_finish(acc, m_i, l_i):
    # (output, natural-log lse) per row from the online-softmax state; a row that saw no key: 0, +inf
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    return out, lse


@triton.jit
def gca_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_order_ptr, k_order_ptr, k_visible_ptr,
                   scale_log2, Nq, Nk, H, BH, n_qtiles,
                   q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
                   qp_sb, kp_sb,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    # program: one (query tile, b, h), heaviest query tile first. qp_sb / kp_sb: batch strides of the
    # plan's q-side (q_order, k_visible) and k-side (k_order) tensors, 0 when shared by the batch.
    # out is written at the caller's token positions; lse fp32 (B, H, Nq) in token order.
    tile, b, h, bh = _program(BH, H, n_qtiles, True)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    qo_b = q_order_ptr + b * qp_sb
    kvis_b = k_visible_ptr + b * qp_sb
    tok = tl.load(qo_b + rows, mask=row_ok, other=0)
    q = tl.load(_rows(q_ptr + b * q_sb + h * q_sh, tok, q_sn, cols), mask=row_ok[:, None], other=0.0)
    kvis = tl.load(kvis_b + rows, mask=row_ok, other=0)
    n_full = tl.load(kvis_b + tile * BLOCK_M) // BLOCK_N
    n_end = tl.cdiv(tl.load(kvis_b + tl.minimum(tile * BLOCK_M + BLOCK_M - 1, Nq - 1)), BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_bh = k_ptr + b * k_sb + h * k_sh
    v_bh = v_ptr + b * v_sb + h * v_sh
    ko_b = k_order_ptr + b * kp_sb
    for start_n in range(0, n_full * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_bh, v_bh, ko_b, start_n + tl.arange(0, BLOCK_N), kvis, Nk,
                                  k_sn, v_sn, cols, scale_log2, False, PRECISION)
    for start_n in range(n_full * BLOCK_N, n_end * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_bh, v_bh, ko_b, start_n + tl.arange(0, BLOCK_N), kvis, Nk,
                                  k_sn, v_sn, cols, scale_log2, True, PRECISION)

    out, lse = _fwd_finish(acc, m_i, l_i)
    tl.store(_rows(o_ptr + b * o_sb + h * o_sh, tok, o_sn, cols), out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh * Nq + tok, lse, mask=row_ok)


@triton.jit
def gca_bwd_delta_kernel(o_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr, q_order_ptr, Nq, H, BH, n_tiles,
                         o_sb, o_sh, o_sn, do_sb, do_sh, do_sn, qp_sb,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # the backward's per-row inputs in sorted order, (B, H, Nq) fp32 each: delta = rowsum(dO * O)
    # and the lse in log2 units (+inf stays +inf: rows that see no key get probability 0)
    tile, b, h, bh = _program(BH, H, n_tiles, False)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    tok = tl.load(q_order_ptr + b * qp_sb + rows, mask=row_ok, other=0)
    o = tl.load(_rows(o_ptr + b * o_sb + h * o_sh, tok, o_sn, cols), mask=row_ok[:, None], other=0.0)
    do = tl.load(_rows(do_ptr + b * do_sb + h * do_sh, tok, do_sn, cols), mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * Nq + tok, mask=row_ok, other=float("inf"))
    tl.store(delta_ptr + bh * Nq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
    tl.store(lse2_ptr + bh * Nq + rows, lse * 1.4426950408889634, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_bh, do_bh, qo_b, kvis_b, lse2_bh, delta_bh, dq_bh, rows, keys, Nq, q_sn, do_sn, cols,
               scale, scale_log2, HEAD_DIM: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
               DQ_ATOMIC: tl.constexpr):
    # one query tile's contribution to a key tile's dk, dv: 4 tile GEMMs (S^T, dv, dP^T, dk); with
    # DQ_ATOMIC a fifth, ds @ k, added into the fp32 dq rows (dq_bh, token order) by atomics.
    # Rows past Nq read lse = +inf (p = 0). Partial tiles: key j contributes to a row iff j < its k_visible.
    q = _load_rows(q_bh, qo_b, rows, q_sn, cols, Nq, True)
    do = _load_rows(do_bh, qo_b, rows, do_sn, cols, Nq, True)
    row_ok = rows < Nq
    lse2 = tl.load(lse2_bh + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_bh + rows, mask=row_ok, other=0.0)
    pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse2[None, :])
    if PARTIAL:
        kvis = tl.load(kvis_b + rows, mask=row_ok, other=0)
        pT = tl.where(keys[:, None] < kvis[None, :], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    if DQ_ATOMIC:
        # relaxed: the adds only need to be atomic; nothing reads dq before the kernel ends
        tok = tl.load(qo_b + rows, mask=row_ok, other=0)
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION) * scale
        tl.atomic_add(_rows(dq_bh, tok, HEAD_DIM, cols), dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
                  q_order_ptr, k_order_ptr, k_visible_ptr, key_tiles_ptr,
                  scale, scale_log2, Nq, Nk, H, BH, n_ktiles,
                  q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                  qp_sb, kp_sb, kt_sb,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    # the body of both dk/dv kernels. program: one (key tile, b, h), the first key tile (seen by the
    # most queries) first. dk, dv contiguous (B, H, Nk, D), written at the caller's token positions;
    # lse2, delta sorted fp32. key_tiles (G, 2, key tiles) int32: first query tile that sees the key
    # tile, first that sees all of it. DQ_ATOMIC: dq_ptr is a zeroed fp32 (B, H, Nq, D) in token order.
    tile, b, h, bh = _program(BH, H, n_ktiles, False)
    keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    key_ok = keys < Nk
    ktok = tl.load(k_order_ptr + b * kp_sb + keys, mask=key_ok, other=0)
    k = tl.load(_rows(k_ptr + b * k_sb + h * k_sh, ktok, k_sn, cols), mask=key_ok[:, None], other=0.0)
    v = tl.load(_rows(v_ptr + b * v_sb + h * v_sh, ktok, v_sn, cols), mask=key_ok[:, None], other=0.0)
    q_start = tl.load(key_tiles_ptr + b * kt_sb + tile)
    q_full = tl.load(key_tiles_ptr + b * kt_sb + n_ktiles + tile)
    if DQ_ATOMIC:
        # a ragged last key tile runs every query tile as partial: its keys past Nk (k = v = 0) are
        # masked there (k_visible <= Nk). Unmasked, their p = exp2(-lse2) is inf for a row whose
        # visible scores are all below about -88, and ds = inf times k = 0 would put NaN into dq
        # (dk, dv of those keys are never stored, so the deterministic kernels need no such care).
        q_full = tl.where((tile + 1) * BLOCK_N > Nk, tl.cdiv(Nq, BLOCK_M), q_full)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_bh = q_ptr + b * q_sb + h * q_sh
    do_bh = do_ptr + b * do_sb + h * do_sh
    dq_bh = dq_ptr + bh * Nq * HEAD_DIM
    qo_b = q_order_ptr + b * qp_sb
    kvis_b = k_visible_ptr + b * qp_sb
    for start_m in range(q_start * BLOCK_M, q_full * BLOCK_M, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_bh, do_bh, qo_b, kvis_b, lse2_ptr + bh * Nq, delta_ptr + bh * Nq, dq_bh,
                            start_m + tl.arange(0, BLOCK_M), keys, Nq, q_sn, do_sn, cols, scale, scale_log2,
                            HEAD_DIM, True, PRECISION, DQ_ATOMIC)
    for start_m in range(q_full * BLOCK_M, Nq, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_bh, do_bh, qo_b, kvis_b, lse2_ptr + bh * Nq, delta_ptr + bh * Nq, dq_bh,
                            start_m + tl.arange(0, BLOCK_M), keys, Nq, q_sn, do_sn, cols, scale, scale_log2,
                            HEAD_DIM, False, PRECISION, DQ_ATOMIC)

    tl.store(_rows(dk_ptr + bh * Nk * HEAD_DIM, ktok, HEAD_DIM, cols), (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(_rows(dv_ptr + bh * Nk * HEAD_DIM, ktok, HEAD_DIM, cols), dv.to(dv_ptr.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def gca_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                        q_order_ptr, k_order_ptr, k_visible_ptr, key_tiles_ptr,
                        scale, scale_log2, Nq, Nk, H, BH, n_ktiles,
                        q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                        qp_sb, kp_sb, kt_sb,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    # dk, dv only (the deterministic backward; gca_bwd_dq_kernel computes dq). dk_ptr stands in for
    # the dq pointer, which DQ_ATOMIC = False never touches.
    _dkdv_program(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dk_ptr,
                  q_order_ptr, k_order_ptr, k_visible_ptr, key_tiles_ptr, scale, scale_log2, Nq, Nk, H, BH, n_ktiles,
                  q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn, qp_sb, kp_sb, kt_sb,
                  HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION, False)


@triton.jit
def gca_bwd_dkdv_dq_atomic_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
                                  q_order_ptr, k_order_ptr, k_visible_ptr, key_tiles_ptr,
                                  scale, scale_log2, Nq, Nk, H, BH, n_ktiles,
                                  q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                                  qp_sb, kp_sb, kt_sb,
                                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  PRECISION: tl.constexpr):
    # FlashAttention-2's backward: dk, dv as gca_bwd_dkdv_kernel and dq added into dq_acc (zeroed
    # fp32 (B, H, Nq, D), token order) by atomics in the same loop: 5 tile GEMMs per (query tile, key
    # tile) instead of 7, no dq kernel, and a summation order that varies from run to run.
    _dkdv_program(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
                  q_order_ptr, k_order_ptr, k_visible_ptr, key_tiles_ptr, scale, scale_log2, Nq, Nk, H, BH, n_ktiles,
                  q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn, qp_sb, kp_sb, kt_sb,
                  HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION, True)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_bh, v_bh, ko_b, keys, kvis, Nk, k_sn, v_sn, cols, scale_log2,
             PARTIAL: tl.constexpr, PRECISION: tl.constexpr):
    k = _load_rows(k_bh, ko_b, keys, k_sn, cols, Nk, PARTIAL)
    v = _load_rows(v_bh, ko_b, keys, v_sn, cols, Nk, PARTIAL)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - lse2[:, None])
    if PARTIAL:
        p = tl.where(keys[None, :] < kvis[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def gca_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dq_ptr, q_order_ptr, k_order_ptr,
                      k_visible_ptr, scale, scale_log2, Nq, Nk, H, BH, n_qtiles,
                      q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                      qp_sb, kp_sb,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
    # program: one (query tile, b, h), heaviest first; dq contiguous (B, H, Nq, D) in token order
    tile, b, h, bh = _program(BH, H, n_qtiles, True)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    qo_b = q_order_ptr + b * qp_sb
    kvis_b = k_visible_ptr + b * qp_sb
    tok = tl.load(qo_b + rows, mask=row_ok, other=0)
    q = tl.load(_rows(q_ptr + b * q_sb + h * q_sh, tok, q_sn, cols), mask=row_ok[:, None], other=0.0)
    do = tl.load(_rows(do_ptr + b * do_sb + h * do_sh, tok, do_sn, cols), mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse2_ptr + bh * Nq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Nq + rows, mask=row_ok, other=0.0)
    kvis = tl.load(kvis_b + rows, mask=row_ok, other=0)
    n_full = tl.load(kvis_b + tile * BLOCK_M) // BLOCK_N
    n_end = tl.cdiv(tl.load(kvis_b + tl.minimum(tile * BLOCK_M + BLOCK_M - 1, Nq - 1)), BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_bh = k_ptr + b * k_sb + h * k_sh
    v_bh = v_ptr + b * v_sb + h * v_sh
    ko_b = k_order_ptr + b * kp_sb
    for start_n in range(0, n_full * BLOCK_N, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_bh, v_bh, ko_b, start_n + tl.arange(0, BLOCK_N), kvis, Nk, k_sn,
                      v_sn, cols, scale_log2, False, PRECISION)
    for start_n in range(n_full * BLOCK_N, n_end * BLOCK_N, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_bh, v_bh, ko_b, start_n + tl.arange(0, BLOCK_N), kvis, Nk, k_sn,
                      v_sn, cols, scale_log2, True, PRECISION)

    tl.store(_rows(dq_ptr + bh * Nq * HEAD_DIM, tok, HEAD_DIM, cols), (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None])


# ---------------------------------------------------------------- Hopper forward: TMA, no permutation
@triton.jit
def _fwd_tma_tile(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, scale_log2,
                  PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # as _fwd_tile, with keys in token order loaded by TMA (rows past Nk arrive as zeros)
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    keys = start_n + tl.arange(0, BLOCK_N)
    return _online_softmax_step(acc, m_i, l_i, q, k, v, keys, kvis, scale_log2, PARTIAL, PRECISION)


@triton.jit
def _tma_descriptors(q_ptr, k_ptr, v_ptr, o_ptr, b, h, Nq, Nk, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn,
                     o_sb, o_sh, o_sn, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the (b, h) slices of q, k, v and the output as device-built tensor descriptors
    q_desc = tl.make_tensor_descriptor(q_ptr + b * q_sb + h * q_sh, shape=[Nq, HEAD_DIM], strides=[q_sn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr + b * k_sb + h * k_sh, shape=[Nk, HEAD_DIM], strides=[k_sn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr + b * v_sb + h * v_sh, shape=[Nk, HEAD_DIM], strides=[v_sn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(o_ptr + b * o_sb + h * o_sh, shape=[Nq, HEAD_DIM], strides=[o_sn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    return q_desc, k_desc, v_desc, o_desc


@triton.jit
def gca_fwd_tma_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, k_visible_ptr,
                       scale_log2, Nq, Nk, H, BH, n_qtiles,
                       q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn, qp_sb,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    # the forward for groups already in token order (identity q_order and k_order, e.g. frame
    # groups): q, k, v tiles come by TMA through per-(b, h) tensor descriptors built on the device,
    # the output leaves by TMA (rows past Nq are clipped, rows past Nk load as zeros). Same plan
    # (k_visible), grid, softmax and lse as gca_fwd_kernel. The launcher runs it on sm_90 for 16-bit
    # inputs; fp32 (PRECISION "ieee") exists for the interpreter's parity tests. Its warp-specialised
    # form is gca_fwd_tma_ws_kernel (why it is a separate loop structure: see there).
    tile, b, h, bh = _program(BH, H, n_qtiles, True)
    start_m = tile * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    q_desc, k_desc, v_desc, o_desc = _tma_descriptors(q_ptr, k_ptr, v_ptr, o_ptr, b, h, Nq, Nk, q_sb, q_sh, q_sn,
                                                      k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
                                                      HEAD_DIM, BLOCK_M, BLOCK_N)
    kvis_b = k_visible_ptr + b * qp_sb
    q = q_desc.load([start_m, 0])
    kvis = tl.load(kvis_b + rows, mask=row_ok, other=0)
    n_full = tl.load(kvis_b + start_m) // BLOCK_N
    n_end = tl.cdiv(tl.load(kvis_b + tl.minimum(start_m + BLOCK_M - 1, Nq - 1)), BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_full * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_tma_tile(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, scale_log2, False, BLOCK_N,
                                      PRECISION)
    for start_n in range(n_full * BLOCK_N, n_end * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_tma_tile(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis, scale_log2, True, BLOCK_N,
                                      PRECISION)

    out, lse = _fwd_finish(acc, m_i, l_i)
    o_desc.store([start_m, 0], out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + bh * Nq + rows, lse, mask=row_ok)


@triton.jit
def gca_fwd_tma_ws_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, k_visible_ptr,
                          scale_log2, Nq, Nk, H, BH, n_qtiles,
                          q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn, qp_sb,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
    # gca_fwd_tma_kernel with its key loop warp-specialised (tl.range(warp_specialize=True)): on
    # sm_90 triton's NVGPUWarpSpecialization pass gives the TMA loads to a producer warp group and
    # splits the BLOCK_M rows between two 64-row consumer warp groups (wgmma + softmax), with
    # setmaxnreg moving registers from the producer to the consumers. That pass (triton 3.6 and
    # 3.9; nova_fast.testing.ws_probe shows each case) accepts only this loop structure:
    # - one key loop: a second loop in the function, specialised or not, aborts it (MLIR Dominance
    #   assertion), so full and partial tiles share one loop and every tile is masked;
    # - per-row data (k_visible) arrives by TMA inside the loop: a row vector loaded by tl.load
    #   before the loop and used in it fails (3.9 "unsupported load type for producer commit", 3.6
    #   the same check as an assertion; a row vector computed before the loop is accepted), and a
    #   branch masking only the partial tiles makes the pass leave the loop unspecialised;
    # - num_warps 4 and BLOCK_M 128 (2 x 64 rows): at 8 warps the pass does nothing, and at
    #   BLOCK_M 64 both consumer groups compute the same 64 rows.
    # k_visible's rows must be 16-byte aligned for TMA (the launcher's _tma_rows).
    tile, b, h, bh = _program(BH, H, n_qtiles, True)
    start_m = tile * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q_desc, k_desc, v_desc, o_desc = _tma_descriptors(q_ptr, k_ptr, v_ptr, o_ptr, b, h, Nq, Nk, q_sb, q_sh, q_sn,
                                                      k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
                                                      HEAD_DIM, BLOCK_M, BLOCK_N)
    kvis_b = k_visible_ptr + b * qp_sb
    kvis_desc = tl.make_tensor_descriptor(kvis_b, shape=[Nq], strides=[1], block_shape=[BLOCK_M])
    q = q_desc.load([start_m, 0])
    n_end = tl.cdiv(tl.load(kvis_b + tl.minimum(start_m + BLOCK_M - 1, Nq - 1)), BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(0, n_end * BLOCK_N, BLOCK_N, warp_specialize=True):
        acc, m_i, l_i = _fwd_tma_tile(acc, m_i, l_i, q, k_desc, v_desc, start_n, kvis_desc.load([start_m]),
                                      scale_log2, True, BLOCK_N, PRECISION)

    out, lse = _fwd_finish(acc, m_i, l_i)
    o_desc.store([start_m, 0], out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + bh * Nq + rows, lse, mask=rows < Nq)


# ---------------------------------------------------------------- tile plans (device tensors, no sync)
def query_tile_plan(k_visible: torch.Tensor, block_m: int, block_n: int):
    """Per query tile, ``(n_full, n_end)`` int32 (G, query tiles): key tiles [0, n_full) are seen by
    every row of the tile, [n_full, n_end) by some; the kernels read the same two bounds in-kernel."""
    Nq = k_visible.shape[-1]
    first = torch.arange(0, Nq, block_m, device=k_visible.device)
    last = torch.clamp(first + block_m - 1, max=Nq - 1)
    n_full = torch.div(k_visible[:, first], block_n, rounding_mode="floor")
    n_end = torch.div(k_visible[:, last] + block_n - 1, block_n, rounding_mode="floor")
    return n_full.to(torch.int32), n_end.to(torch.int32)


def key_tile_plan(k_visible: torch.Tensor, Nk: int, block_m: int, block_n: int) -> torch.Tensor:
    """(G, 2, key tiles) int32 for the dk/dv kernel: per key tile, the first query tile with a row
    that sees any of its keys (``q_start``) and the first whose rows all see all of them (``q_full``)."""
    first_key = torch.arange(0, Nk, block_n, device=k_visible.device, dtype=k_visible.dtype)
    last_key = torch.clamp(first_key + block_n - 1, max=Nk - 1)
    keys = torch.stack([first_key, last_key])                    # (2, key tiles)
    kvis = k_visible.contiguous()
    # rows seeing key j: the suffix of sorted rows with k_visible > j
    first_row = torch.searchsorted(kvis, keys.reshape(1, -1).expand(kvis.shape[0], -1).contiguous(), right=True)
    first_row = first_row.reshape(kvis.shape[0], 2, -1)
    q_start = torch.div(first_row[:, 0], block_m, rounding_mode="floor")
    q_full = torch.div(first_row[:, 1] + block_m - 1, block_m, rounding_mode="floor")
    return torch.stack([q_start, q_full], 1).to(torch.int32).contiguous()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _plan_stride(t):
    # plan tensors are (G, n): G == 1 is shared by every batch element (stride 0)
    return 0 if t.shape[0] == 1 else t.stride(0)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows are 16-byte aligned (what the kernels' vector loads assume), else a copy."""
    e = t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def grid(n_tiles: int, batch_heads: int) -> tuple[int]:
    """The kernels' 1-D grid for ``n_tiles`` tiles per (b, h): within CUDA's 2^31 - 1 x-dimension."""
    programs = n_tiles * batch_heads
    if programs > MAX_GRID_X:
        raise ValueError(f"group_causal_attention: {n_tiles} tiles x B*H = {batch_heads} is {programs} programs, "
                         f"more than a CUDA grid holds ({MAX_GRID_X}); split the batch")
    return (programs,)


def _launch_opts(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# opt-in: triton.autotune benchmarks on a kernel's first call per shape (host waits: not inside a
# CUDA graph capture), so the table's first entry is launched unless this variable is "1"
AUTOTUNE_ENV = "NOVA_FAST_GCA_AUTOTUNE"
_autotuned: dict = {}


def runtime_configs(kind: str, head_dim: int, dtype: torch.dtype, device=None) -> list[dict]:
    """(num_warps, num_stages) options a GPU autotuner tries for kernel ``kind``: the table entries of
    the device's architecture with the first entry's tile (the tile fixes the grid and the dk/dv plan)."""
    entries = table_configs(kind, head_dim, dtype, device_arch(device))
    tile = (entries[0]["BLOCK_M"], entries[0]["BLOCK_N"])
    return [{"num_warps": e["num_warps"], "num_stages": e["num_stages"]} for e in entries
            if (e["BLOCK_M"], e["BLOCK_N"]) == tile]


def autotuning(device) -> bool:
    """Whether launches on ``device`` go through triton.autotune: CUDA only (never the CPU or the
    interpreter), opted in by NOVA_FAST_GCA_AUTOTUNE=1, no test tiles forced."""
    return (torch.device(device).type == "cuda" and os.environ.get(AUTOTUNE_ENV) == "1"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and _block_override is None)


def _launchable(kernel, kind: str, cfg: dict, q: torch.Tensor, reset_to_zero: list[str] | None = None):
    """(kernel to index with the grid, launch options): the table's config, or on a GPU with
    autotuning on, triton.autotune over :func:`runtime_configs` (keyed on the sequence lengths).
    ``reset_to_zero``: arguments the kernel accumulates into (atomics), zeroed before each timed run."""
    if not autotuning(q.device):
        return kernel, _launch_opts(cfg)
    options = runtime_configs(kind, q.shape[-1], q.dtype, q.device)
    key = (kind, q.shape[-1], q.dtype, device_arch(q.device))
    if key not in _autotuned:
        _autotuned[key] = triton.autotune([triton.Config({}, **o) for o in options], key=["Nq", "Nk"],
                                          reset_to_zero=reset_to_zero)(kernel)
    return _autotuned[key], {}


# the forward kernels: "gather" (gca_fwd_kernel, any token order), "tma" (gca_fwd_tma_kernel,
# groups in token order, sm_90 16-bit) and "tma_ws" (gca_fwd_tma_ws_kernel, the same warp-specialised,
# opted in by WARP_SPECIALIZE_ENV); the path the last forward() call took
FORWARD_PATHS = ("gather", "tma", "tma_ws")
# table kind -> its kernel's name (looked up in this module when launched)
KERNEL_NAMES = {"fwd": "gca_fwd_kernel", "fwd_tma": "gca_fwd_tma_kernel", "fwd_tma_ws": "gca_fwd_tma_ws_kernel",
                "dkdv": "gca_bwd_dkdv_kernel", "dkdv_atomic": "gca_bwd_dkdv_dq_atomic_kernel",
                "dq": "gca_bwd_dq_kernel"}
# forward path -> the table kind of its kernel (its tiles, and the configurations an autotuner tries)
FORWARD_KINDS = {"gather": "fwd", "tma": "fwd_tma", "tma_ws": "fwd_tma_ws"}
# what triton's sm_90 warp_specialize pass needs (gca_fwd_tma_ws_kernel): 4 warps, and BLOCK_M 128 for
# its two 64-row consumer warp groups; gca_tune's fwd_tma_ws candidates are built from these
WS_NUM_WARPS = 4
WS_BLOCK_M = 128
# opt-in: the warp-specialised TMA forward compiles and specialises for sm_90 (SASS checked under
# triton 3.6 and 3.9) but has not run on a GPU yet, so the plain TMA forward stays the default
WARP_SPECIALIZE_ENV = "NOVA_FAST_GCA_WARP_SPECIALIZE"
last_forward_path: str | None = None
_path_override: str | None = None


@contextlib.contextmanager
def forward_path_override(path: str):
    """Run every forward inside the block on ``path`` (tests: the TMA kernel under the interpreter)."""
    global _path_override
    if path not in FORWARD_PATHS:
        raise ValueError(f"forward path must be one of {FORWARD_PATHS}, got {path!r}")
    saved, _path_override = _path_override, path
    try:
        yield
    finally:
        _path_override = saved


def tma_available() -> bool:
    """This triton builds tensor descriptors on the device (``tl.make_tensor_descriptor``)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def tma_device(device) -> tuple[bool, str]:
    """(whether the TMA forward runs on ``device``, why not): an sm_90 GPU and a triton that builds
    tensor descriptors. Whether the groups are in token order and the dtype are the call's to check."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False, "TMA forward is for sm_90 only"
    if not tma_available():
        return False, f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    return True, ""


def forward_path(q: torch.Tensor, sorted_tokens: bool) -> tuple[str, str]:
    """(path, why) the forward takes for q: "tma" on sm_90 for fp16/bf16 when both token orders are
    the identity (the plan's ``sorted_tokens``; "tma_ws", its warp-specialised variant, when opted in
    and the table has a "fwd_tma_ws" configuration for the head dim that fits it), "gather" otherwise."""
    if _path_override is not None:
        return _path_override, "forced by forward_path_override"
    if not sorted_tokens:
        return "gather", "groups not in token order: permutation in the loads"
    runs, why = tma_device(q.device)
    if not runs:
        return "gather", why
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "gather", "TMA forward is for fp16/bf16 only"
    why = "sm_90, groups in token order: TMA loads and stores"
    if os.environ.get(WARP_SPECIALIZE_ENV) != "1":
        return "tma", why
    try:
        ws_cfg = config("fwd_tma_ws", q.shape[-1], q.dtype, q.device)
    except ValueError as exc:  # no entry: every candidate for this head dim pruned (or none generated)
        return "tma", f"{why}; not warp-specialised: {exc}"
    unfit = warp_specialize_unfit(ws_cfg)
    if unfit:
        return "tma", f"{why}; not warp-specialised: {unfit}"
    return "tma_ws", f"{why}, warp-specialised ({WARP_SPECIALIZE_ENV}=1)"


def warp_specialize_unfit(cfg: dict) -> str | None:
    """Why the warp-specialised TMA forward cannot run configuration ``cfg`` (its "fwd_tma_ws" table
    entry), or None if it can: triton's sm_90 pass specialises only at 4 warps and splits BLOCK_M into
    two 64-row consumers."""
    if cfg["num_warps"] != WS_NUM_WARPS:
        return f"needs num_warps {WS_NUM_WARPS}, the table's configuration has {cfg['num_warps']}"
    if cfg["BLOCK_M"] != WS_BLOCK_M:
        return f"needs BLOCK_M {WS_BLOCK_M}, the table's configuration has {cfg['BLOCK_M']}"
    return None


def _tma_rows(plan: torch.Tensor) -> torch.Tensor:
    """A (G, n) int32 plan tensor whose rows start 16-byte aligned (TMA's rule for the descriptor
    base): ``plan`` itself, or a copy with its row stride rounded up to 4 elements."""
    G, n = plan.shape
    if plan.data_ptr() % 16 == 0 and plan.stride(1) == 1 and (G == 1 or plan.stride(0) % 4 == 0):
        return plan
    padded = torch.empty((G, triton.cdiv(n, 4) * 4), dtype=plan.dtype, device=plan.device)
    padded[:, :n] = plan
    return padded[:, :n]


def _scratch(size: int, alignment: int, stream):
    # global memory the device-side tensor descriptors are written to (triton asks per launch)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_descriptor_allocator():
    # device-built descriptors need a global scratch allocator: install one unless the user has
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or type(current).__name__ == "NullAllocator":
        triton.set_allocator(_scratch)


def forward(q, k, v, q_order, k_order, k_visible, scale, sorted_tokens: bool = False):
    """(out, lse): q, k, v (B, H, N, D) in token order with unit stride along D; the plan tensors
    q_order, k_visible (G, Nq) and k_order (G, Nk) int32 contiguous, G in {1, B}. out is contiguous
    (B, H, Nq, D); lse fp32 (B, H, Nq), both in token order. ``sorted_tokens``: q_order and k_order
    are the identity (the caller knows it without reading them), which allows the TMA kernel."""
    global last_forward_path
    q, k, v = aligned(q), aligned(k), aligned(v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    path, _ = forward_path(q, sorted_tokens)
    kind = FORWARD_KINDS[path]
    fn = globals()[KERNEL_NAMES[kind]]
    if precision(q.dtype) == "ieee":
        kind = "fwd"  # the table tunes the TMA forwards for 16-bit inputs; fp32 through them (forced, tests): fp32 tiles
    cfg = config(kind, D, q.dtype, q.device)
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    n_qtiles = triton.cdiv(Nq, cfg["BLOCK_M"])
    kernel, opts = _launchable(fn, kind, cfg, q)
    if path in ("tma", "tma_ws"):
        if q.device.type == "cuda":
            _ensure_descriptor_allocator()
        if path == "tma_ws":
            k_visible = _tma_rows(k_visible)  # loaded by TMA in this kernel
        kernel[grid(n_qtiles, B * H)](
            q, k, v, out, lse, k_visible, scale * LOG2E, Nq, Nk, H, B * H, n_qtiles,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), _plan_stride(k_visible),
            HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=precision(q.dtype), **opts)
    else:
        kernel[grid(n_qtiles, B * H)](
            q, k, v, out, lse, q_order, k_order, k_visible, scale * LOG2E, Nq, Nk, H, B * H, n_qtiles,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), _plan_stride(q_order), _plan_stride(k_order),
            HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=precision(q.dtype), **opts)
    last_forward_path = path
    return out, lse


# the backward kernels: "deterministic" (gca_bwd_dkdv_kernel then gca_bwd_dq_kernel, 7 tile GEMMs,
# no atomics) and "atomic" (gca_bwd_dkdv_dq_atomic_kernel, 5 tile GEMMs, dq by atomic adds); the
# path the last backward() call took
BACKWARD_PATHS = ("deterministic", "atomic")
last_backward_path: str | None = None


def backward_kind(deterministic: bool) -> str:
    """The table kind of the kernel that loops over key tiles in :func:`backward` (the one whose
    blocks its ``key_tiles`` plan is for): "dkdv" (deterministic) or "dkdv_atomic"."""
    return "dkdv" if deterministic else "dkdv_atomic"


def backward(dout, q, k, v, out, lse, q_order, k_order, k_visible, key_tiles, scale, deterministic: bool = True):
    """(dq, dk, dv), contiguous, in token order, for the forward above. ``key_tiles``: the plan of
    the kernel that loops over key tiles, :func:`key_tile_plan` for the blocks of
    ``config(backward_kind(deterministic), D, dtype)`` (None: built here): the dk/dv kernel's, or
    with ``deterministic`` False the atomic kernel's (its own table entry, other tiles). ``deterministic``
    False: dq by atomic adds inside the dk/dv kernel (FlashAttention-2's 5 tile GEMMs; the summation
    order of dq varies between runs), accumulated in fp32 and cast to q's dtype by a torch op (no copy
    for fp32)."""
    global last_backward_path
    q, k, v, dout, out = aligned(q), aligned(k), aligned(v), aligned(dout), aligned(out)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    lse2 = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    dk = torch.empty((B, H, Nk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Nk, D), device=q.device, dtype=v.dtype)
    prec = precision(q.dtype)
    qp, kp = _plan_stride(q_order), _plan_stride(k_order)

    n_rtiles = triton.cdiv(Nq, DELTA_BLOCK_M)
    gca_bwd_delta_kernel[grid(n_rtiles, B * H)](
        out, dout, lse, delta, lse2, q_order, Nq, H, B * H, n_rtiles, *_strides(out), *_strides(dout), qp,
        HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M, num_warps=4)

    kind = backward_kind(deterministic)
    cfg = config(kind, D, q.dtype, q.device)
    if key_tiles is None:
        key_tiles = key_tile_plan(k_visible, Nk, cfg["BLOCK_M"], cfg["BLOCK_N"])
    n_ktiles = triton.cdiv(Nk, cfg["BLOCK_N"])
    if key_tiles.shape[-1] != n_ktiles:
        raise ValueError(f"key_tiles has {key_tiles.shape[-1]} key tiles; the {kind} kernel's {cfg['BLOCK_N']}-key "
                         f"tiles need {n_ktiles}: build it with key_tile_plan for config({kind!r}, ...)")
    if not deterministic:
        # zeroed here: every row is an accumulator, and rows no key tile reaches stay 0
        dq_acc = torch.zeros((B, H, Nq, D), device=q.device, dtype=torch.float32)
        kernel, opts = _launchable(gca_bwd_dkdv_dq_atomic_kernel, kind, cfg, q, reset_to_zero=["dq_acc_ptr"])
        kernel[grid(n_ktiles, B * H)](
            q, k, v, dout, lse2, delta, dk, dv, dq_acc, q_order, k_order, k_visible, key_tiles, scale,
            scale * LOG2E, Nq, Nk, H, B * H, n_ktiles, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            qp, kp, _plan_stride(key_tiles), HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            PRECISION=prec, **opts)
        last_backward_path = "atomic"
        return dq_acc.to(q.dtype), dk, dv

    kernel, opts = _launchable(gca_bwd_dkdv_kernel, "dkdv", cfg, q)
    kernel[grid(n_ktiles, B * H)](
        q, k, v, dout, lse2, delta, dk, dv, q_order, k_order, k_visible, key_tiles, scale, scale * LOG2E,
        Nq, Nk, H, B * H, n_ktiles, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), qp, kp,
        _plan_stride(key_tiles), HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=prec, **opts)

    dq = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    cfg = config("dq", D, q.dtype, q.device)
    n_qtiles = triton.cdiv(Nq, cfg["BLOCK_M"])
    kernel, opts = _launchable(gca_bwd_dq_kernel, "dq", cfg, q)
    kernel[grid(n_qtiles, B * H)](
        q, k, v, dout, lse2, delta, dq, q_order, k_order, k_visible, scale, scale * LOG2E, Nq, Nk, H, B * H,
        n_qtiles, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), qp, kp,
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=prec, **opts)
    last_backward_path = "deterministic"
    return dq, dk, dv


# ---------------------------------------------------------------- AOT specs
_STRIDES = ["q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_sn", "v_sb", "v_sh", "v_sn"]
_CONST = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION")


def _fwd_sig(dt):
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "lse_ptr": "*fp32",
           "q_order_ptr": "*i32", "k_order_ptr": "*i32", "k_visible_ptr": "*i32", "scale_log2": "fp32",
           "Nq": "i32", "Nk": "i32", "H": "i32", "BH": "i32", "n_qtiles": "i32"}
    sig.update({s: "i32" for s in _STRIDES + ["o_sb", "o_sh", "o_sn", "qp_sb", "kp_sb"]})
    sig.update({c: "constexpr" for c in _CONST})
    return sig


def _bwd_sig(dt, kind: str):
    # kind: "dkdv", "dkdv_atomic" (the dk/dv arguments and the fp32 dq accumulator) or "dq"
    dq = kind == "dq"
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "do_ptr": f"*{dt}", "lse2_ptr": "*fp32",
           "delta_ptr": "*fp32"}
    if dq:
        sig["dq_ptr"] = f"*{dt}"
    else:
        sig.update({"dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}"})
    if kind == "dkdv_atomic":
        sig["dq_acc_ptr"] = "*fp32"
    sig.update({"q_order_ptr": "*i32", "k_order_ptr": "*i32", "k_visible_ptr": "*i32"})
    if not dq:
        sig["key_tiles_ptr"] = "*i32"
    sig.update({"scale": "fp32", "scale_log2": "fp32", "Nq": "i32", "Nk": "i32", "H": "i32", "BH": "i32",
                ("n_qtiles" if dq else "n_ktiles"): "i32"})
    sig.update({s: "i32" for s in _STRIDES + ["do_sb", "do_sh", "do_sn", "qp_sb", "kp_sb"]})
    if not dq:
        sig["kt_sb"] = "i32"
    sig.update({c: "constexpr" for c in _CONST})
    return sig


def _delta_sig(dt):
    sig = {"o_ptr": f"*{dt}", "do_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "lse2_ptr": "*fp32",
           "q_order_ptr": "*i32", "Nq": "i32", "H": "i32", "BH": "i32", "n_tiles": "i32"}
    sig.update({s: "i32" for s in ("o_sb", "o_sh", "o_sn", "do_sb", "do_sh", "do_sn", "qp_sb")})
    sig.update({"HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"})
    return sig


def _fwd_tma_sig(dt):
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "lse_ptr": "*fp32",
           "k_visible_ptr": "*i32", "scale_log2": "fp32", "Nq": "i32", "Nk": "i32", "H": "i32", "BH": "i32",
           "n_qtiles": "i32"}
    sig.update({s: "i32" for s in _STRIDES + ["o_sb", "o_sh", "o_sn", "qp_sb"]})
    sig.update({c: "constexpr" for c in _CONST})
    return sig


def kernel_signature(kind: str, dt: str) -> tuple[str, dict]:
    """(kernel name, AOT signature) of the kernel of table kind ``kind`` ("fwd", "fwd_tma", "fwd_tma_ws",
    "dkdv", "dkdv_atomic", "dq") for dtype ``dt``."""
    sig = {"fwd": _fwd_sig, "fwd_tma": _fwd_tma_sig, "fwd_tma_ws": _fwd_tma_sig}.get(kind)
    return KERNEL_NAMES[kind], (sig(dt) if sig else _bwd_sig(dt, kind))


def _specs():
    """Every configuration a launcher picks: the generated table's first entry per (arch, dtype
    class, head dim, kernel), compiled for fp16 and bf16 (16-bit entries) or fp32, for the
    architecture(s) that pick it; plus the delta pre-pass per dtype and head dim on both targets."""
    from .group_causal_attention_configs import CONFIGS

    picks: dict = {}  # (kind, dt, d, tile, warps, stages) -> the archs picking it
    for (arch, dtype_class, d, kind), entries in CONFIGS.items():
        cfg = entries[0]
        for dt in (("fp16", "bf16") if dtype_class == "16bit" else ("fp32",)):
            key = (kind, dt, d, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
            picks.setdefault(key, []).append(arch)
    specs = []
    for (kind, dt, d, bm, bn, warps, stages), archs in picks.items():
        kernel, sig = kernel_signature(kind, dt)
        specs.append(AotSpec(kernel, sig, {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn,
                                           "PRECISION": "ieee" if dt == "fp32" else "tf32"},
                             num_warps=warps, num_stages=stages, tensor_cores=dt != "fp32", archs=tuple(archs),
                             label=f"{kind} {dt} d{d} {bm}x{bn} w{warps} s{stages} "
                                   f"({'/'.join(f'sm_{a}' for a in archs)} pick)"))
    for dt in ("fp16", "bf16", "fp32"):
        for d in (64, 128):
            specs.append(AotSpec("gca_bwd_delta_kernel", _delta_sig(dt), {"HEAD_DIM": d, "BLOCK_M": DELTA_BLOCK_M},
                                 num_warps=4, label=f"bwd delta {dt} d{d} {DELTA_BLOCK_M} rows"))
    return specs


AOT_SPECS = _specs()
# the TMA forward's specs alone (tests compile them with triton 3.9 and the GPU machine's triton)
TMA_AOT_SPECS = [s for s in AOT_SPECS if s.kernel == "gca_fwd_tma_kernel"]
# the warp-specialised TMA forward's specs alone (its table entries, "fwd_tma_ws")
WS_AOT_SPECS = [s for s in AOT_SPECS if s.kernel == "gca_fwd_tma_ws_kernel"]
