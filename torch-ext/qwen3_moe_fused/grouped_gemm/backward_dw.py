"""Weight gradient of a grouped GEMM: dW[e] = sum over rows r of expert e of A[r]^T B[r].

A rows and B rows may be gathered through an index (None: read in sorted order). Experts
with no rows get an exact zero gradient. DwConfig.persistent launches a grid of fewer
programs that walk the (expert, tile) pairs in the same order (same bits as without).
DwConfig.tma loads the operands read in sorted order through TMA descriptors, which cannot
mask rows: it takes the expert's whole BLOCK_K steps, and the partial last step, if any, is
loaded masked as without the option. No row outside the expert is read either way (rows of
no expert, past the last expert's, are never computed and may hold anything), and the sums
run in the same order: the same bits as without.
"""

import torch
import triton
import triton.language as tl

from ..routing import Routing
from ..tuning import INTERPRET, DwConfig
from .forward import _dot, _mapped_rows, _num_sms
from ..sizes import cdiv
from ..launch import launcher


@triton.jit
def _a_t_tile(a_ptr, a_rows, offs_m, mask, stride_ar, stride_am):
    """(BLOCK_M, BLOCK_K): A^T at rows a_rows (int64), masked loads zero."""
    return tl.load(a_ptr + a_rows[None, :] * stride_ar + offs_m[:, None] * stride_am, mask=mask, other=0.0)


@triton.jit
def _b_tile(b_ptr, b_rows, offs_n, mask, stride_br, stride_bn):
    """(BLOCK_K, BLOCK_N): B at rows b_rows (int64), masked loads zero."""
    return tl.load(b_ptr + b_rows[:, None] * stride_br + offs_n[None, :] * stride_bn, mask=mask, other=0.0)


@triton.jit
def _masked_step(acc, r0, row_end, a_ptr, b_ptr, a_gather_ptr, b_gather_ptr, offs_m, offs_n, m_mask, n_mask, stride_ar,
                 stride_am, stride_br, stride_bn, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + the product of rows [r0, r0 + BLOCK_K) of both operands, rows past row_end masked."""
    rows = r0 + tl.arange(0, BLOCK_K)
    r_mask = rows < row_end
    # Both index loads before both tile loads.
    a_rows = _mapped_rows(a_gather_ptr, rows, r_mask)
    b_rows = _mapped_rows(b_gather_ptr, rows, r_mask)
    a = _a_t_tile(a_ptr, a_rows, offs_m, m_mask[:, None] & r_mask[None, :], stride_ar, stride_am)
    b = _b_tile(b_ptr, b_rows, offs_n, r_mask[:, None] & n_mask[None, :], stride_br, stride_bn)
    return _dot(a, b, acc, IEEE)


@triton.jit
def _dw_tile(
    expert, pid, a_ptr, b_ptr, a_desc, b_desc, c_ptr, a_gather_ptr, b_gather_ptr, expert_offsets_ptr, M, N, stride_ar,
    stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Output tile pid = m-tile * n-tiles + n-tile of expert's gradient (arguments as in _grouped_dw_kernel)."""
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
    if a_desc is None and b_desc is None:
        for r0 in range(row_start, row_end, BLOCK_K):
            acc = _masked_step(acc, r0, row_end, a_ptr, b_ptr, a_gather_ptr, b_gather_ptr, offs_m, offs_n, m_mask,
                               n_mask, stride_ar, stride_am, stride_br, stride_bn, IEEE, BLOCK_K)  # fmt: skip
    else:
        # The expert's whole BLOCK_K steps with the operands read in sorted order through their
        # descriptors (every row of the step is the expert's: nothing to mask), then the partial
        # last step as without.
        full_end = row_start + (row_end - row_start) // BLOCK_K * BLOCK_K
        for r0 in range(row_start, full_end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            if a_desc is not None:
                a = a_desc.load([r0, pid_m * BLOCK_M]).T
            else:
                a_rows = _mapped_rows(a_gather_ptr, rows, rows < full_end)
                a = _a_t_tile(a_ptr, a_rows, offs_m, m_mask[:, None], stride_ar, stride_am)
            if b_desc is not None:
                b = b_desc.load([r0, pid_n * BLOCK_N])
            else:
                b_rows = _mapped_rows(b_gather_ptr, rows, rows < full_end)
                b = _b_tile(b_ptr, b_rows, offs_n, n_mask[None, :], stride_br, stride_bn)
            acc = _dot(a, b, acc, IEEE)
        if full_end < row_end:
            acc = _masked_step(acc, full_end, row_end, a_ptr, b_ptr, a_gather_ptr, b_gather_ptr, offs_m, offs_n,
                               m_mask, n_mask, stride_ar, stride_am, stride_br, stride_bn, IEEE, BLOCK_K)  # fmt: skip

    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@launcher
@triton.jit
def _grouped_dw_kernel(
    a_ptr,  # (rows of A, M)
    b_ptr,  # (rows of B, N)
    a_desc,  # TMA descriptor of A in (BLOCK_K, BLOCK_M) blocks, or None (A gathered, or no TMA)
    b_desc,  # TMA descriptor of B in (BLOCK_K, BLOCK_N) blocks, or None (B gathered, or no TMA)
    c_ptr,  # (E, M, N)
    a_gather_ptr,  # (sorted rows,) row of A for each sorted row, or None
    b_gather_ptr,  # (sorted rows,) row of B for each sorted row, or None
    expert_offsets_ptr,
    num_tiles,  # E * tiles per expert
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_ce,
    stride_cm,
    stride_cn,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One program per tile, grid (tiles per expert, E): an expert's tiles run side by side and
    # share its rows in L2. PERSISTENT: a 1-D grid of fewer programs walking the tiles in that order.
    if PERSISTENT:
        tiles_per_expert = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _dw_tile(tile // tiles_per_expert, tile % tiles_per_expert, a_ptr, b_ptr, a_desc, b_desc, c_ptr, a_gather_ptr,
                     b_gather_ptr, expert_offsets_ptr, M, N, stride_ar, stride_am, stride_br, stride_bn, stride_ce,
                     stride_cm, stride_cn, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        _dw_tile(tl.program_id(1), tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, c_ptr, a_gather_ptr, b_gather_ptr,
                 expert_offsets_ptr, M, N, stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
                 IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


def _rows_descriptor(t: torch.Tensor, block: list[int]):
    """TMA descriptor of t (rows, cols) in blocks of `block`, where TMA can read t (CUDA or the
    interpreter, unit column stride, 16-byte aligned base and rows); else None."""
    if not (t.is_cuda or INTERPRET) or t.stride(1) != 1:
        return None
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)


def _descriptors(a, b, config: DwConfig, a_gather, b_gather):
    """(a_desc, b_desc): with config.tma, a descriptor for each operand read in sorted order
    (None for a gathered one: it is loaded through its pointers)."""
    if not config.tma:
        return None, None
    a_desc = _rows_descriptor(a, [config.block_k, config.block_m]) if a_gather is None else None
    b_desc = _rows_descriptor(b, [config.block_k, config.block_n]) if b_gather is None else None
    return a_desc, b_desc


def grouped_dw_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    routing: Routing,
    config: DwConfig,
    *,
    a_gather: torch.Tensor | None = None,
    b_gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[e] (M, N) = sum_r A[a_gather[r]]^T B[b_gather[r]] over expert e's sorted rows.

    a: (rows of A, M), b: (rows of B, N), out: (E, M, N); out may be a strided view
    (the dW of a weight stored as (E, N, M) is written through its transpose).
    """
    num_experts, m, n = out.shape
    if num_experts == 0 or m == 0 or n == 0:
        return out
    tiles_per_expert = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    num_tiles = num_experts * tiles_per_expert
    if config.persistent:
        grid = (min(num_tiles, config.persistent * _num_sms(a.device)),)
    else:
        grid = (tiles_per_expert, num_experts)
    a_desc, b_desc = _descriptors(a, b, config, a_gather, b_gather)
    _grouped_dw_kernel[grid](
        a_ptr=a, b_ptr=b, a_desc=a_desc, b_desc=b_desc, c_ptr=out, a_gather_ptr=a_gather, b_gather_ptr=b_gather,
        expert_offsets_ptr=routing.expert_offsets, num_tiles=num_tiles, M=m, N=n,
        stride_ar=a.stride(0), stride_am=a.stride(1), stride_br=b.stride(0), stride_bn=b.stride(1),
        stride_ce=out.stride(0), stride_cm=out.stride(1), stride_cn=out.stride(2),
        IEEE=a.dtype == torch.float32, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PERSISTENT=config.persistent > 0, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
