"""Triton kernels for group-causal attention: query i sees key j iff ``k_group[j] <= q_group[i]``.

The launchers expect groups sorted (non-decreasing) along the sequence; the public op
(``nova_fast.ops.group_causal_attention``) sorts unsorted layouts first. With sorted groups the
keys a query tile can see are a prefix of the key tiles and the queries that can see a key tile
are a suffix of the query tiles, so :func:`tile_plan` turns per-tile group ranges into loop bounds:

- forward and dq: query tile t visits key tiles ``0 .. kv_tiles[t]-1``, the tiles whose smallest
  key group is <= the largest query group of t (every other tile is invisible to all of t's rows);
- dk/dv: key tile n visits query tiles ``q_start[n] ..``, the same (t, n) pairs seen from n.

Inside a visited tile the mask comes from the two group vectors in registers (no N x N tensor).
FlashAttention-2 online softmax in the exp2 domain with fp32 accumulation. The log-sum-exp is
stored in natural log per row; a row that sees no key gets output 0 and LSE = +inf, so in the
backward ``exp(s - lse)`` is exactly 0 for it (no NaN). Backward: delta = rowsum(dO * O) in the
launcher, then one kernel for dk/dv (loop over query tiles) and one for dq (loop over key tiles),
without atomics.
"""
import contextlib

import torch
import triton
import triton.language as tl

from nova_fast.testing.triton_aot import AotSpec

LOG2E = 1.4426950408889634
GROUP_PAD = tl.constexpr(2**31 - 1)  # group id of key rows past the end: no query sees them

# head_dim -> block sizes, warps, stages: production configs (no spills on sm_80/sm_90 in AOT_SPECS)
FWD_CONFIG = {64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
              128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)}
DKDV_CONFIG = {64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
               128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)}
DQ_CONFIG = {64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
             128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)}

# tests under the interpreter shrink the tiles (more tiles per sequence: the skipping logic is exercised)
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


@triton.jit
def _tile(base, idx, stride, cols):
    # pointers to rows ``idx`` of a (rows, HEAD_DIM) slice; the launcher guarantees 16-byte aligned
    # rows (aligned base, strides in bytes multiple of 16), so loads and stores are 16-byte vectors
    return tl.multiple_of(base + idx[:, None] * stride + cols[None, :], [16, 16])


@triton.jit
def _program(H):
    # (tile index, b * H + h in int64, b, h) of this program: grid (tiles, B * H)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    return tl.program_id(0), bh, b, bh - b * H


@triton.jit
def _kv_tile(k_bh, v_bh, kg_b, keys, Nk, k_sn, v_sn, cols):
    # K and V rows ``keys`` of one (b, h) and their groups; keys past Nk read as 0 and GROUP_PAD
    # (a group no query reaches), so they are never visible
    key_ok = keys < Nk
    k = tl.load(_tile(k_bh, keys, k_sn, cols), mask=key_ok[:, None], other=0.0)
    v = tl.load(_tile(v_bh, keys, v_sn, cols), mask=key_ok[:, None], other=0.0)
    kg = tl.load(kg_b + keys, mask=key_ok, other=GROUP_PAD)
    return key_ok, k, v, kg


@triton.jit
def _query_grad_tile(q_bh, do_bh, qg_b, lse_bh, delta_bh, rows, Nq, q_sn, do_sn, cols):
    # the backward's per-query inputs: q, dO, groups, lse in log2 units and delta = rowsum(dO * O);
    # lse = +inf (rows past the end, rows that see no key) makes their probabilities exactly 0
    row_ok = rows < Nq
    q = tl.load(_tile(q_bh, rows, q_sn, cols), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(do_bh, rows, do_sn, cols), mask=row_ok[:, None], other=0.0)
    qg = tl.load(qg_b + rows, mask=row_ok, other=-1)
    lse2 = tl.load(lse_bh + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_bh + rows, mask=row_ok, other=0.0)
    return row_ok, q, do, qg, lse2, delta


@triton.jit
def gca_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qg_ptr, kg_ptr, kv_tiles_ptr,
                   scale_log2, Nq, Nk, H,
                   q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
                   qg_sb, kg_sb, tiles_sb,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    # program (query tile, b * H + h); lse is fp32 (B, H, Nq)
    pid_m, bh, b, h = _program(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    q = tl.load(_tile(q_ptr + b * q_sb + h * q_sh, rows, q_sn, cols), mask=row_ok[:, None], other=0.0)
    qg = tl.load(qg_ptr + b * qg_sb + rows, mask=row_ok, other=-1)
    n_tiles = tl.load(kv_tiles_ptr + b * tiles_sb + pid_m)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_bh = k_ptr + b * k_sb + h * k_sh
    v_bh = v_ptr + b * v_sb + h * v_sh
    for start_n in range(0, n_tiles * BLOCK_N, BLOCK_N):
        _, k, v, kg = _kv_tile(k_bh, v_bh, kg_ptr + b * kg_sb, start_n + tl.arange(0, BLOCK_N), Nk, k_sn, v_sn,
                               cols)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        visible = kg[None, :] <= qg[:, None]
        s = tl.where(visible, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(_tile(o_ptr + b * o_sb + h * o_sh, rows, o_sn, cols), out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh * Nq + rows, lse, mask=row_ok)


@triton.jit
def gca_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, qg_ptr, kg_ptr,
                        q_start_ptr, scale, scale_log2, Nq, Nk, H,
                        q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                        qg_sb, kg_sb, tiles_sb,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IEEE: tl.constexpr):
    # program (key tile, b * H + h); dk, dv contiguous (B, H, Nk, D); lse, delta fp32 (B, H, Nq)
    pid_n, bh, b, h = _program(H)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    key_ok, k, v, kg = _kv_tile(k_ptr + b * k_sb + h * k_sh, v_ptr + b * v_sb + h * v_sh, kg_ptr + b * kg_sb, keys,
                                Nk, k_sn, v_sn, cols)
    first_tile = tl.load(q_start_ptr + b * tiles_sb + pid_n)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_bh = q_ptr + b * q_sb + h * q_sh
    do_bh = do_ptr + b * do_sb + h * do_sh
    for start_m in range(first_tile * BLOCK_M, Nq, BLOCK_M):
        _, q, do, qg, lse2, delta = _query_grad_tile(q_bh, do_bh, qg_ptr + b * qg_sb, lse_ptr + bh * Nq,
                                                     delta_ptr + bh * Nq, start_m + tl.arange(0, BLOCK_M), Nq,
                                                     q_sn, do_sn, cols)
        if IEEE:
            qkT = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            qkT = tl.dot(k, tl.trans(q))
        visible = kg[:, None] <= qg[None, :]
        pT = tl.where(visible, tl.math.exp2(qkT * scale_log2 - lse2[None, :]), 0.0)
        if IEEE:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if IEEE:
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision="ieee")
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk)

    tl.store(_tile(dk_ptr + bh * Nk * HEAD_DIM, keys, HEAD_DIM, cols), (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(_tile(dv_ptr + bh * Nk * HEAD_DIM, keys, HEAD_DIM, cols), dv.to(dv_ptr.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def gca_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, qg_ptr, kg_ptr, kv_tiles_ptr,
                      scale, scale_log2, Nq, Nk, H,
                      q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
                      qg_sb, kg_sb, tiles_sb,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    # program (query tile, b * H + h); dq contiguous (B, H, Nq, D)
    pid_m, bh, b, h = _program(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_ok, q, do, qg, lse2, delta = _query_grad_tile(q_ptr + b * q_sb + h * q_sh, do_ptr + b * do_sb + h * do_sh,
                                                      qg_ptr + b * qg_sb, lse_ptr + bh * Nq, delta_ptr + bh * Nq,
                                                      rows, Nq, q_sn, do_sn, cols)
    n_tiles = tl.load(kv_tiles_ptr + b * tiles_sb + pid_m)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_bh = k_ptr + b * k_sb + h * k_sh
    v_bh = v_ptr + b * v_sb + h * v_sh
    for start_n in range(0, n_tiles * BLOCK_N, BLOCK_N):
        _, k, v, kg = _kv_tile(k_bh, v_bh, kg_ptr + b * kg_sb, start_n + tl.arange(0, BLOCK_N), Nk, k_sn, v_sn,
                               cols)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        visible = kg[None, :] <= qg[:, None]
        p = tl.where(visible, tl.math.exp2(qk * scale_log2 - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq)

    tl.store(_tile(dq_ptr + bh * Nq * HEAD_DIM, rows, HEAD_DIM, cols),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------- tile plan (the work counter's rule)
def tile_plan(q_groups: torch.Tensor, k_groups: torch.Tensor, block_m: int, block_n: int):
    """Loop bounds from per-tile group ranges, for sorted int32 groups (G, Nq) and (G, Nk).

    Returns int32 ``kv_tiles`` (G, query tiles): key tiles visited by each query tile, and
    ``q_start`` (G, key tiles): the first query tile that visits each key tile. A pair (t, n) is
    visited iff min(k_group in tile n) <= max(q_group in tile t); everything else is skipped.
    """
    Nq, Nk = q_groups.shape[-1], k_groups.shape[-1]
    q_last = torch.clamp(torch.arange(block_m - 1, Nq + block_m - 1, block_m, device=q_groups.device), max=Nq - 1)
    q_max = q_groups[:, q_last].contiguous()                                    # (G, tiles_m), sorted
    k_min = k_groups[:, ::block_n].contiguous()                                 # (G, tiles_n), sorted
    kv_tiles = torch.searchsorted(k_min, q_max, right=True).to(torch.int32)
    q_start = torch.searchsorted(q_max, k_min, right=False).to(torch.int32)
    return kv_tiles.contiguous(), q_start.contiguous()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _config(table, head_dim):
    cfg = dict(table[head_dim])
    if _block_override is not None:
        cfg["BLOCK_M"], cfg["BLOCK_N"] = _block_override
    return cfg


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows are 16-byte aligned (what the kernels' vector loads assume), else a copy."""
    e = t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch_opts(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def forward(q, k, v, q_groups, k_groups, scale):
    """(out, lse) for sorted int32 groups (G, Nq) / (G, Nk), G in {1, B}; q, k, v (B, H, N, D)
    with unit stride along D. out is contiguous (B, H, Nq, D); lse fp32 (B, H, Nq)."""
    q, k, v = aligned(q), aligned(k), aligned(v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cfg = _config(FWD_CONFIG, D)
    kv_tiles, _ = tile_plan(q_groups, k_groups, cfg["BLOCK_M"], cfg["BLOCK_N"])
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
    gca_fwd_kernel[grid](q, k, v, out, lse, q_groups, k_groups, kv_tiles, scale * LOG2E, Nq, Nk, H,
                         *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                         _group_stride(q_groups), _group_stride(k_groups), _group_stride(kv_tiles),
                         HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         IEEE=q.dtype == torch.float32, **_launch_opts(cfg))
    return out, lse


def backward(dout, q, k, v, out, lse, q_groups, k_groups, scale):
    """(dq, dk, dv), contiguous, for the forward above."""
    q, k, v, dout = aligned(q), aligned(k), aligned(v), aligned(dout)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).contiguous()   # (B, H, Nq) fp32
    dq = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Nk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Nk, D), device=q.device, dtype=v.dtype)
    ieee = q.dtype == torch.float32
    common = dict(HEAD_DIM=D, IEEE=ieee)

    cfg = _config(DKDV_CONFIG, D)
    _, q_start = tile_plan(q_groups, k_groups, cfg["BLOCK_M"], cfg["BLOCK_N"])
    gca_bwd_dkdv_kernel[(triton.cdiv(Nk, cfg["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, q_groups, k_groups, q_start, scale, scale * LOG2E, Nq, Nk, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        _group_stride(q_groups), _group_stride(k_groups), _group_stride(q_start),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common, **_launch_opts(cfg))

    cfg = _config(DQ_CONFIG, D)
    kv_tiles, _ = tile_plan(q_groups, k_groups, cfg["BLOCK_M"], cfg["BLOCK_N"])
    gca_bwd_dq_kernel[(triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, q_groups, k_groups, kv_tiles, scale, scale * LOG2E, Nq, Nk, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        _group_stride(q_groups), _group_stride(k_groups), _group_stride(kv_tiles),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common, **_launch_opts(cfg))
    return dq, dk, dv


def _group_stride(t):
    # groups and tile plans are (G, n): G == 1 is shared by every batch element (stride 0)
    return 0 if t.shape[0] == 1 else t.stride(0)


# ---------------------------------------------------------------- AOT specs
_STRIDES = ["q_sb", "q_sh", "q_sn", "k_sb", "k_sh", "k_sn", "v_sb", "v_sh", "v_sn"]


def _fwd_sig(dt):
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "lse_ptr": "*fp32",
           "qg_ptr": "*i32", "kg_ptr": "*i32", "kv_tiles_ptr": "*i32", "scale_log2": "fp32",
           "Nq": "i32", "Nk": "i32", "H": "i32"}
    sig.update({s: "i32" for s in _STRIDES + ["o_sb", "o_sh", "o_sn", "qg_sb", "kg_sb", "tiles_sb"]})
    sig.update({c: "constexpr" for c in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "IEEE")})
    return sig


def _bwd_sig(dt, dq: bool):
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "do_ptr": f"*{dt}", "lse_ptr": "*fp32",
           "delta_ptr": "*fp32"}
    if dq:
        sig["dq_ptr"] = f"*{dt}"
    else:
        sig.update({"dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}"})
    sig.update({"qg_ptr": "*i32", "kg_ptr": "*i32", ("kv_tiles_ptr" if dq else "q_start_ptr"): "*i32",
                "scale": "fp32", "scale_log2": "fp32", "Nq": "i32", "Nk": "i32", "H": "i32"})
    sig.update({s: "i32" for s in _STRIDES + ["do_sb", "do_sh", "do_sn", "qg_sb", "kg_sb", "tiles_sb"]})
    sig.update({c: "constexpr" for c in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "IEEE")})
    return sig


def _specs():
    specs = []
    for dt in ("fp16", "bf16"):
        for d in (64, 128):
            for kernel, table, sig, what in (("gca_fwd_kernel", FWD_CONFIG, _fwd_sig(dt), "fwd"),
                                             ("gca_bwd_dkdv_kernel", DKDV_CONFIG, _bwd_sig(dt, False), "bwd dkdv"),
                                             ("gca_bwd_dq_kernel", DQ_CONFIG, _bwd_sig(dt, True), "bwd dq")):
                cfg = table[d]
                specs.append(AotSpec(kernel, sig, {"HEAD_DIM": d, "BLOCK_M": cfg["BLOCK_M"],
                                                   "BLOCK_N": cfg["BLOCK_N"], "IEEE": False},
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], tensor_cores=True,
                                     label=f"{what} {dt} d{d} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}"))
    return specs


AOT_SPECS = _specs()
