"""Sum of each token's K expert rows, in a fixed order (deterministic, no atomics).

rows (T * K, H) holds one row per (token, k) pair; pairs whose expert id is outside
[0, E) were never computed and count as zero.
"""

import torch
import triton
import triton.language as tl

from .sizes import cdiv, next_power_of_2
from .launch import launcher


@launcher
@triton.jit
def _combine_kernel(
    rows_ptr,  # (T * K, H)
    ids_ptr,  # (T * K,) expert ids
    out_ptr,  # (T, H)
    T,
    H,
    num_experts,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = tokens < T
    col_mask = (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        flat = tokens.to(tl.int64) * TOP_K + k
        ids = tl.load(ids_ptr + flat, mask=t_mask, other=-1)
        valid = t_mask & (ids >= 0) & (ids < num_experts)
        acc += tl.load(rows_ptr + flat[:, None] * H + cols[None, :], mask=valid[:, None] & col_mask, other=0.0)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & col_mask)


def combine_launch(rows: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """out (T, H) = sum over k of rows (T * K, H) where top_k_index (T, K) is a valid expert."""
    num_tokens, hidden = out.shape
    if num_tokens == 0 or hidden == 0:
        return out
    block_t, block_h = 16, min(next_power_of_2(hidden), 256)
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    _combine_kernel[grid](
        rows,
        top_k_index,
        out,
        num_tokens,
        hidden,
        num_experts,
        TOP_K=top_k_index.shape[1],
        BLOCK_T=block_t,
        BLOCK_H=block_h,
    )
    return out
