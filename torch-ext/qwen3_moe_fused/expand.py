"""Token rows copied into sorted order: out[p] = x[sorted_token[p]] for every sorted row p,
(T, H) -> (T * K, H), the operand the weight-gradient GEMMs read without a gather.

index_select reads a token's row once for each of its K sorted rows, at random; this reads
each row once and writes it to its K positions, given the inverse of the routing's sort
(sorted_pos[t * K + k] = the sorted position of the pair (t, k)). Every pair has a position,
those of ids outside [0, E) included (past the last expert's rows), so every output row is
written.
"""

import torch
import triton
import triton.language as tl

from .routing import Routing
from .sizes import cdiv, next_power_of_2
from .launch import launcher


@launcher
@triton.jit
def _invert_kernel(sort_idx_ptr, sorted_pos_ptr, num_rows, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    flat = tl.load(sort_idx_ptr + rows, mask=mask)
    tl.store(sorted_pos_ptr + flat, rows, mask=mask)


@launcher
@triton.jit
def _expand_kernel(
    x_ptr,  # (T, H)
    sorted_pos_ptr,  # (T * K,) int32 sorted position of each (token, k) pair
    out_ptr,  # (T * K, H)
    T,
    H,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < T)[:, None] & (cols < H)[None, :]
    rows = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :], mask=mask)
    for k in tl.static_range(TOP_K):
        pos = tl.load(sorted_pos_ptr + tokens.to(tl.int64) * TOP_K + k, mask=tokens < T, other=0)
        tl.store(out_ptr + pos.to(tl.int64)[:, None] * H + cols[None, :], rows, mask=mask)


def sorted_positions(r: Routing) -> torch.Tensor:
    """(T * K,) int32: the inverse of r.sort_idx."""
    num_rows = r.sort_idx.numel()
    sorted_pos = torch.empty_like(r.sort_idx)
    if num_rows:
        block = 1024
        _invert_kernel[(cdiv(num_rows, block),)](r.sort_idx, sorted_pos, num_rows, BLOCK=block)
    return sorted_pos


def expand_launch(x: torch.Tensor, sorted_pos: torch.Tensor) -> torch.Tensor:
    """x (T, H), sorted_pos (T * K,) from sorted_positions -> (T * K, H) in sorted order."""
    x = x.contiguous()
    num_tokens, hidden = x.shape
    top_k = sorted_pos.numel() // max(num_tokens, 1)
    out = x.new_empty(sorted_pos.numel(), hidden)
    if out.numel() == 0:
        return out
    block_t, block_h = 16, min(next_power_of_2(hidden), 256)
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    _expand_kernel[grid](x, sorted_pos, out, num_tokens, hidden, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out
