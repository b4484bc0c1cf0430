"""Weight gradient of a grouped GEMM: dW[e] = sum over rows r of expert e of A[r]^T B[r].

A rows and B rows may be gathered through an index. Experts with no rows get an exact
zero gradient.
"""

import torch
import triton
import triton.language as tl

from ..routing import Routing


@triton.jit
def _grouped_dw_kernel(
    a_ptr,  # (rows of A, M)
    b_ptr,  # (rows of B, N)
    c_ptr,  # (E, M, N)
    a_gather_ptr,  # (sorted rows,)
    b_gather_ptr,  # (sorted rows,)
    expert_offsets_ptr,
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_ce,
    stride_cm,
    stride_cn,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_tiles_n
    pid_n = pid % num_tiles_n
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < row_end
        if A_GATHER:
            a_rows = tl.load(a_gather_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tl.load(b_gather_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        a = tl.load(
            a_ptr + a_rows[None, :] * stride_ar + offs_m[:, None] * stride_am,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K): A^T
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def grouped_dw_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    routing: Routing,
    config: dict,
    *,
    a_gather: torch.Tensor | None = None,
    b_gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[e] (M, N) = sum_r A[a_gather[r]]^T B[b_gather[r]] over expert e's sorted rows.

    a: (rows of A, M), b: (rows of B, N), out: (E, M, N); out may be a strided view
    (the dW of a weight stored as (E, N, M) is written through its transpose).
    """
    num_experts, m, n = out.shape
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), num_experts)
    if num_experts == 0 or m == 0 or n == 0:
        return out
    dummy = routing.sort_idx
    _grouped_dw_kernel[grid](
        a,
        b,
        out,
        a_gather if a_gather is not None else dummy,
        b_gather if b_gather is not None else dummy,
        routing.expert_offsets,
        m,
        n,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        A_GATHER=a_gather is not None,
        B_GATHER=b_gather is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
