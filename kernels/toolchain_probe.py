"""Two small kernels that prove the verification toolchain (interpreter, AOT, SASS reading).

``row_sum_kernel`` is a masked reduction (ragged columns); ``matmul_tile_kernel`` multiplies one
tile with ``tl.dot`` so its SASS must hold tensor-core instructions. tests/test_toolchain.py runs
both under TRITON_INTERPRET=1 against torch and AOT-compiles them for sm_80 and sm_90.
"""
import triton
import triton.language as tl

from nova_fast.testing.triton_aot import AotSpec


@triton.jit
def row_sum_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def matmul_tile_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # C[M, N] = A[M, K] @ B[K, N], row-major, one program per (BM, BN) tile, fp32 accumulation.
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :], mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def row_sum(x):
    import torch

    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    row_sum_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK=64)
    return out


def matmul_tile(a, b, block=(64, 64, 32)):
    import torch

    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    BM, BN, BK = block
    matmul_tile_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](a, b, c, M, N, K, BM=BM, BN=BN, BK=BK)
    return c


AOT_SPECS = [
    AotSpec("row_sum_kernel", {"x_ptr": "*fp16", "out_ptr": "*fp32", "n_cols": "i32", "stride_row": "i32",
                               "BLOCK": "constexpr"}, {"BLOCK": 256}, label="row_sum fp16"),
    AotSpec("matmul_tile_kernel", {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32",
                                   "K": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
            {"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3, tensor_cores=True,
            label="matmul_tile fp16 128x128x64"),
    AotSpec("matmul_tile_kernel", {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32",
                                   "K": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
            {"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3, tensor_cores=True,
            label="matmul_tile bf16 128x128x64"),
]
