"""Triton kernels for the adaLN family: ``modulate`` and ``residual_norm``, forward and backward.

Every kernel sees its rows as (B, L, D): a row (b, l) of an input lives at ``b * stride_b + l *
stride_l`` with unit stride along D, so per-sample statistics (B, 1, D) are stride_l = 0 and the
chunks of one projection output (row stride 2*D or 3*D) are read in place, without a copy. Outputs
are contiguous (B, L, D) except the in-place residual, which writes through x's strides.

Forward: one program per ROWS rows (a [ROWS, BLOCK_D] tile of up to ROW_TILE elements; BLOCK_D = next
power of two >= D, masked for ragged D and past the last row), fp32 statistics, one read of each
input and one write of the output. Row offsets are int64 (``_program_rows``).

Backward: program (b, chunk) walks ``rows_per_prog`` consecutive rows of sample b, ROWS at a time. Per-token
statistics get their gradient written row by row; per-sample statistics (and the LayerNorm weight
and bias) accumulate in fp32 registers across the program's rows and leave one partial row per
program, summed over the chunks by the launcher (a (programs, D) read, small next to the inputs).
Gradients that equal the incoming gradient (d out / d x of the residual, d shift of per-token
statistics) are not written at all: the launcher returns the incoming gradient itself.
"""
import torch
import triton
import triton.language as tl

from nova_fast.testing.triton_aot import AotSpec

MAX_D = 4096


# Rows per program: short rows share a program as a [ROWS, BLOCK_D] tile of up to ROW_TILE elements
# (D <= 1024: 2 to 128 rows), so a program's fixed work (weight / bias loads, launch share) is
# amortized and its threads all hold row elements; D > 1024 keeps one row per program. Unlike the
# CUDA kernels' fixed 256-thread blocks (csrc/adaln.cu, 128 threads per row there for 1024 < D <=
# 2048), num_warps follows the tile, so a second row would not put idle threads to work: the lanes
# that idle here are BLOCK_D's power-of-two padding (D = 1152 / 1280 / 1536: 44 / 38 / 25% of the
# tile), which every row of a taller tile would carry as well.
ROW_TILE = 2048


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def rows_per_program(block: int) -> int:
    return max(1, ROW_TILE // block)


def num_warps_for(tile: int, backward: bool = False) -> int:
    # Forward: 8-16 values per thread and tensor (4 warps up to 1024 elements, 8 at 2048, 16 at 4096).
    # Backward holds about twice as many tiles (accumulators): twice the warps, at most 16.
    return min(16, max(4, tile // (128 if backward else 256)))


def forward_grid(rows: int, D: int) -> tuple[int]:
    """Grid of the forward kernels: rows on axis 0 only (limit 2^31 - 1 programs)."""
    return (triton.cdiv(rows, rows_per_program(block_d(D))),)


# ---------------------------------------------------------------- shared index math
@triton.jit
def _program_rows(pid, n_rows, L, ROWS: tl.constexpr):
    """The ROWS consecutive rows of program ``pid`` as int64 (row, b, l) vectors and their mask: all
    offset products (row * D, b * stride_b, l * stride_l) are then 64-bit."""
    row = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    b = row // L
    return row, b, row - b * L, row < n_rows


@triton.jit
def _load_rows(ptr, b, l, sb, sl, cols, mask):
    return tl.load(ptr + (b * sb + l * sl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


# ---------------------------------------------------------------- modulate
@triton.jit
def modulate_fwd_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, mean_ptr, rstd_ptr,
                        n_rows, L, D, x_sb, x_sl, sc_sb, sc_sl, sh_sb, sh_sl, eps,
                        NORMALIZE: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
    row, b, l, row_ok = _program_rows(tl.program_id(0), n_rows, L, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    x = _load_rows(x_ptr, b, l, x_sb, x_sl, cols, mask)
    if NORMALIZE:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        x = xc * rstd[:, None]
        if STORE_STATS:
            tl.store(mean_ptr + row, mean, mask=row_ok)
            tl.store(rstd_ptr + row, rstd, mask=row_ok)
    scale = _load_rows(scale_ptr, b, l, sc_sb, sc_sl, cols, mask)
    shift = _load_rows(shift_ptr, b, l, sh_sb, sh_sl, cols, mask)
    out = x * (1.0 + scale) + shift
    tl.store(out_ptr + row[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def modulate_bwd_kernel(dout_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dscale_ptr, partial_ptr,
                        L, D, rows_per_prog, x_sb, x_sl, sc_sb, sc_sl,
                        NORMALIZE: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
    # dout, dx, dscale (per token) are contiguous (B, L, D); partial is fp32 (B, chunks, 2, D):
    # per-sample d scale and d shift of this program's rows, walked ROWS at a time.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc_dscale = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_dshift = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    l_start = chunk * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)
    for l0 in range(l_start, l_end, ROWS):
        l = (l0 + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = l < l_end
        mask = row_ok[:, None] & col_ok[None, :]
        row = b * L + l
        offs = row[:, None] * D + cols[None, :]
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = _load_rows(x_ptr, b, l, x_sb, x_sl, cols, mask)
        scale = _load_rows(scale_ptr, b, l, sc_sb, sc_sl, cols, mask)
        dxhat = dout * (1.0 + scale)
        if NORMALIZE:
            mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (xhat - mean[:, None]) * rstd[:, None], 0.0)
            c_xhat = tl.sum(dxhat * xhat, axis=1) / D
            c_one = tl.sum(dxhat, axis=1) / D
            dx = (dxhat - xhat * c_xhat[:, None] - c_one[:, None]) * rstd[:, None]
        else:
            dx = dxhat
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(dscale_ptr + offs, (dout * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
        else:
            acc_dscale += dout * xhat
            acc_dshift += dout
    if not PER_TOKEN:
        base = partial_ptr + (b * tl.num_programs(1) + chunk) * 2 * D
        tl.store(base + cols, tl.sum(acc_dscale, axis=0), mask=col_ok)
        tl.store(base + D + cols, tl.sum(acc_dshift, axis=0), mask=col_ok)


# ---------------------------------------------------------------- residual_norm
@triton.jit
def residual_norm_fwd_kernel(x_ptr, y_ptr, w_ptr, bias_ptr, gate_ptr, out_ptr, mean_ptr, rstd_ptr,
                             n_rows, L, D, x_sb, x_sl, y_sb, y_sl, g_sb, g_sl, o_sb, o_sl, eps,
                             HAS_GATE: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROWS: tl.constexpr):
    row, b, l, row_ok = _program_rows(tl.program_id(0), n_rows, L, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    y = _load_rows(y_ptr, b, l, y_sb, y_sl, cols, mask)
    mean = tl.sum(y, axis=1) / D
    yc = tl.where(mask, y - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(yc * yc, axis=1) / D + eps)
    if STORE_STATS:
        tl.store(mean_ptr + row, mean, mask=row_ok)
        tl.store(rstd_ptr + row, rstd, mask=row_ok)
    # weight and bias: loaded once per program, shared by its ROWS rows
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    branch = yc * rstd[:, None] * w[None, :] + bias[None, :]
    if HAS_GATE:
        branch *= _load_rows(gate_ptr, b, l, g_sb, g_sl, cols, mask)
    x = _load_rows(x_ptr, b, l, x_sb, x_sl, cols, mask)
    out = (x + branch).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (b * o_sb + l * o_sl)[:, None] + cols[None, :], out, mask=mask)


@triton.jit
def residual_norm_bwd_kernel(dout_ptr, y_ptr, w_ptr, bias_ptr, gate_ptr, mean_ptr, rstd_ptr,
                             dy_ptr, dgate_ptr, partial_ptr,
                             L, D, rows_per_prog, y_sb, y_sl, g_sb, g_sl,
                             HAS_GATE: tl.constexpr, GATE_PER_TOKEN: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROWS: tl.constexpr):
    # dout, dy, dgate (per token) are contiguous (B, L, D); partial is fp32 (B, chunks, 3, D):
    # d weight, d bias and (per-sample gate) d gate of this program's rows, walked ROWS at a time.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc_dw = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_dg = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    l_start = chunk * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)
    for l0 in range(l_start, l_end, ROWS):
        l = (l0 + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = l < l_end
        mask = row_ok[:, None] & col_ok[None, :]
        row = b * L + l
        offs = row[:, None] * D + cols[None, :]
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _load_rows(y_ptr, b, l, y_sb, y_sl, cols, mask)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        yhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_GATE:
            gate = _load_rows(gate_ptr, b, l, g_sb, g_sl, cols, mask)
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            dgate = dout * (yhat * w + bias)
            if GATE_PER_TOKEN:
                tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
            else:
                acc_dg += dgate
            dbranch = dout * gate
        else:
            dbranch = dout
        acc_dw += dbranch * yhat
        acc_db += dbranch
        dyhat = dbranch * w
        c_yhat = tl.sum(dyhat * yhat, axis=1) / D
        c_one = tl.sum(dyhat, axis=1) / D
        dy = (dyhat - yhat * c_yhat[:, None] - c_one[:, None]) * rstd[:, None]
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    base = partial_ptr + (b * tl.num_programs(1) + chunk) * 3 * D
    tl.store(base + cols, tl.sum(acc_dw, axis=0), mask=col_ok)
    tl.store(base + D + cols, tl.sum(acc_db, axis=0), mask=col_ok)
    if HAS_GATE:
        if not GATE_PER_TOKEN:
            tl.store(base + 2 * D + cols, tl.sum(acc_dg, axis=0), mask=col_ok)


# ---------------------------------------------------------------- launchers
def _rows(t):
    """(stride_b, stride_l) of a (B, L|1, D) tensor; broadcast dims read with stride 0."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def backward_chunks(B: int, L: int, device) -> tuple[int, int]:
    """(rows per program, chunks per sample) for the backward kernels: enough programs to fill the
    GPU (about 4 per SM), as few as possible under the interpreter."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    chunks = max(1, min(L, triton.cdiv(target, B)))
    rows_per_prog = triton.cdiv(L, chunks)
    return rows_per_prog, triton.cdiv(L, rows_per_prog)


def modulate_fwd(x, scale, shift, normalize: bool, eps: float, store_stats: bool):
    """x (B, L, D); scale, shift (B, 1|L, D) unit last stride. Returns out, mean, rstd (fp32 (B, L))."""
    B, L, D = x.shape
    out = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    stats = store_stats and normalize
    mean = torch.empty((B, L) if stats else (0,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B * L == 0:
        return out, mean, rstd
    blk = block_d(D)
    rows = rows_per_program(blk)
    modulate_fwd_kernel[forward_grid(B * L, D)](x, scale, shift, out, mean, rstd, B * L, L, D, *_rows(x),
                                                *_rows(scale), *_rows(shift), eps, NORMALIZE=normalize,
                                                STORE_STATS=stats, BLOCK_D=blk, ROWS=rows,
                                                num_warps=num_warps_for(rows * blk))
    return out, mean, rstd


def modulate_bwd(dout, x, scale, mean, rstd, normalize: bool):
    """Gradients of modulate: dx (B, L, D), dscale and dshift shaped like scale (B, 1|L, D); dshift is
    None for per-token statistics (it equals dout, which the caller passes on)."""
    B, L, D = x.shape
    dout = dout.contiguous()
    per_token = scale.shape[1] == L
    dx = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    dscale = torch.empty((B, L, D) if per_token else (B, 1, D), device=x.device, dtype=x.dtype)
    rows_per_prog, chunks = backward_chunks(B, L, x.device)
    partial = torch.empty((0,) if per_token else (B, chunks, 2, D), device=x.device, dtype=torch.float32)
    if B * L:
        blk = block_d(D)
        rows = rows_per_program(blk)
        modulate_bwd_kernel[(B, chunks)](dout, x, scale, mean, rstd, dx, dscale, partial, L, D, rows_per_prog,
                                         *_rows(x), *_rows(scale), NORMALIZE=normalize, PER_TOKEN=per_token,
                                         BLOCK_D=blk, ROWS=rows, num_warps=num_warps_for(rows * blk, backward=True))
    if per_token:
        return dx, dscale, None
    # (B, 1, D) each, in separate storage: autograd outputs must not alias one another
    return dx, partial[:, :, 0].sum(1, keepdim=True).to(x.dtype), partial[:, :, 1].sum(1, keepdim=True).to(x.dtype)


def residual_norm_fwd(x, y, weight, bias, gate, eps: float, store_stats: bool, out=None):
    """out = x + gate * (LN(y) * weight + bias); out=x writes in place. Returns out, mean, rstd."""
    B, L, D = y.shape
    if out is None:
        out = torch.empty((B, L, D), device=y.device, dtype=y.dtype)
    mean = torch.empty((B, L) if store_stats else (0,), device=y.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B * L == 0:
        return out, mean, rstd
    blk = block_d(D)
    rows = rows_per_program(blk)
    has_gate = gate is not None
    residual_norm_fwd_kernel[forward_grid(B * L, D)](x, y, weight, bias, gate if has_gate else y, out, mean, rstd,
                                                     B * L, L, D, *_rows(x), *_rows(y),
                                                     *(_rows(gate) if has_gate else (0, 0)), *_rows(out), eps,
                                                     HAS_GATE=has_gate, STORE_STATS=store_stats, BLOCK_D=blk,
                                                     ROWS=rows, num_warps=num_warps_for(rows * blk))
    return out, mean, rstd


def residual_norm_bwd(dout, y, weight, bias, gate, mean, rstd):
    """Gradients of residual_norm: dy, dweight, dbias, dgate (shaped like gate, or None without gate).
    d x is dout itself; the caller passes it on."""
    B, L, D = y.shape
    dout = dout.contiguous()
    has_gate = gate is not None
    gate_per_token = has_gate and (gate.shape[1] == L)
    dy = torch.empty((B, L, D), device=y.device, dtype=y.dtype)
    dgate = torch.empty((B, L, D), device=y.device, dtype=y.dtype) if gate_per_token else None
    rows_per_prog, chunks = backward_chunks(B, L, y.device)
    partial = torch.empty((B, chunks, 3, D), device=y.device, dtype=torch.float32)
    if B * L:
        blk = block_d(D)
        rows = rows_per_program(blk)
        residual_norm_bwd_kernel[(B, chunks)](dout, y, weight, bias, gate if has_gate else y, mean, rstd, dy,
                                              dgate if gate_per_token else dy, partial, L, D, rows_per_prog,
                                              *_rows(y), *(_rows(gate) if has_gate else (0, 0)),
                                              HAS_GATE=has_gate, GATE_PER_TOKEN=gate_per_token, BLOCK_D=blk,
                                              ROWS=rows, num_warps=num_warps_for(rows * blk, backward=True))
    else:
        partial.zero_()
    sums = partial.sum(1)  # (B, 3, D)
    dweight = sums[:, 0].sum(0).to(weight.dtype)
    dbias = sums[:, 1].sum(0).to(bias.dtype)
    if has_gate and not gate_per_token:
        dgate = sums[:, 2:3].to(y.dtype)
    return dy, dweight, dbias, dgate


# ---------------------------------------------------------------- AOT specs
_TY = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


# Production widths: 1024 (encoders; two rows per program), 1280 (osp480 head), 4096 (the largest D).
AOT_WIDTHS = {"fp32": (1024, 1280, 4096), "fp16": (1024, 1280), "bf16": (1024, 1280, 4096)}


def _specs():
    specs = []
    for dt, ptr in _TY.items():
        for D in AOT_WIDTHS[dt]:
            blk = block_d(D)
            rows = rows_per_program(blk)
            nw = num_warps_for(rows * blk)
            nw_bwd = num_warps_for(rows * blk, backward=True)
            tag = f"D<={blk} x{rows}"
            sig = {n: ptr for n in ("x_ptr", "scale_ptr", "shift_ptr", "out_ptr")}
            sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", n_rows="i32", L="i32", D="i32", x_sb="i64", x_sl="i64",
                       sc_sb="i64", sc_sl="i64", sh_sb="i64", sh_sl="i64", eps="fp32", NORMALIZE="constexpr",
                       STORE_STATS="constexpr", BLOCK_D="constexpr", ROWS="constexpr")
            specs.append(AotSpec("modulate_fwd_kernel", sig,
                                 {"NORMALIZE": True, "STORE_STATS": True, "BLOCK_D": blk, "ROWS": rows},
                                 num_warps=nw, label=f"modulate_fwd {dt} {tag}"))
            sig = {n: ptr for n in ("dout_ptr", "x_ptr", "scale_ptr", "dx_ptr", "dscale_ptr")}
            sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", partial_ptr="*fp32", L="i32", D="i32",
                       rows_per_prog="i32", x_sb="i64", x_sl="i64", sc_sb="i64", sc_sl="i64",
                       NORMALIZE="constexpr", PER_TOKEN="constexpr", BLOCK_D="constexpr", ROWS="constexpr")
            for per_token in (True, False):
                specs.append(AotSpec("modulate_bwd_kernel", sig,
                                     {"NORMALIZE": True, "PER_TOKEN": per_token, "BLOCK_D": blk, "ROWS": rows},
                                     num_warps=nw_bwd,
                                     label=f"modulate_bwd {dt} {tag} {'token' if per_token else 'sample'}"))
            sig = {n: ptr for n in ("x_ptr", "y_ptr", "w_ptr", "bias_ptr", "gate_ptr", "out_ptr")}
            sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", n_rows="i32", L="i32", D="i32", x_sb="i64", x_sl="i64",
                       y_sb="i64", y_sl="i64", g_sb="i64", g_sl="i64", o_sb="i64", o_sl="i64", eps="fp32",
                       HAS_GATE="constexpr", STORE_STATS="constexpr", BLOCK_D="constexpr", ROWS="constexpr")
            specs.append(AotSpec("residual_norm_fwd_kernel", sig,
                                 {"HAS_GATE": True, "STORE_STATS": True, "BLOCK_D": blk, "ROWS": rows}, num_warps=nw,
                                 label=f"residual_norm_fwd {dt} {tag} gate"))
            sig = {n: ptr for n in ("dout_ptr", "y_ptr", "w_ptr", "bias_ptr", "gate_ptr", "dy_ptr", "dgate_ptr")}
            sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", partial_ptr="*fp32", L="i32", D="i32",
                       rows_per_prog="i32", y_sb="i64", y_sl="i64", g_sb="i64", g_sl="i64",
                       HAS_GATE="constexpr", GATE_PER_TOKEN="constexpr", BLOCK_D="constexpr", ROWS="constexpr")
            for per_token in (True, False):
                specs.append(AotSpec("residual_norm_bwd_kernel", sig,
                                     {"HAS_GATE": True, "GATE_PER_TOKEN": per_token, "BLOCK_D": blk, "ROWS": rows},
                                     num_warps=nw_bwd,
                                     label=f"residual_norm_bwd {dt} {tag} gate {'token' if per_token else 'sample'}"))
    return specs


AOT_SPECS = _specs()


def compile_aligned(targets=(80, 90)):
    """AOT-compile AOT_SPECS the way the JIT specializes aligned inputs: pointers and the D / stride
    arguments marked divisible by 16 (Triton's runtime specialization), so loads vectorize as they do
    for NOVA's tensors. ``triton_aot.compile_module`` gives the no-alignment worst case."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nova_fast.testing import triton_aot

    results = []
    for spec in AOT_SPECS:
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(spec.signature.items())
                 if ty.startswith("*") or (ty in ("i32", "i64") and name not in ("L", "rows_per_prog", "n_rows"))}
        for arch in targets:
            src = ASTSource(fn=globals()[spec.kernel], signature=spec.signature, constexprs=spec.constexprs,
                            attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
            regs, local, sass = triton_aot._resources(compiled.asm["cubin"])
            results.append(triton_aot.AotResult(__name__, spec.name() + " aligned", arch, regs, local,
                                                compiled.metadata.shared, len(re.findall(r"\bHMMA\b", sass)),
                                                len(re.findall(r"\bHGMMA\b", sass)), False))
    return results


if __name__ == "__main__":
    import sys

    from nova_fast.testing import triton_aot

    if "--aligned-aot" in sys.argv:
        res = compile_aligned()
        print(triton_aot.format_table(res))
        for line in triton_aot.problems(res):
            print("PROBLEM:", line)
