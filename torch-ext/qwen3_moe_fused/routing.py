"""Routing: from the router's top-k expert ids to what every grouped GEMM needs.

Computed once per MoE block and reused by the forward and backward GEMMs, on the
device and without host synchronization (no data-dependent shapes): the tile map
has a static upper bound on its length and unused tiles are marked with -1.

For N = T * K (token, k) pairs sorted by expert:
    sort_idx        (N,)      int32  flat position t * K + k of each sorted row
    sorted_token    (N,)      int32  token t of each sorted row (the gather index)
    expert_offsets  (E + 1,)  int32  rows of expert e are [offsets[e], offsets[e + 1])
    tile_expert     (n_tiles,) int32 expert of each BLOCK_M row tile, -1 when unused
    tile_row_start  (n_tiles,) int32 first sorted row of each tile
Ids outside [0, E) sort past offsets[E] and are never computed; callers that
combine rows treat them as contributing zero (like Transformers' EP sentinels).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Routing(NamedTuple):
    sort_idx: torch.Tensor
    sorted_token: torch.Tensor
    expert_offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    block_m: int


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e cdiv(count_e, block_m) over all routings of num_rows rows."""
    return (num_rows + block_m - 1) // block_m + num_experts


@triton.jit
def _tile_map_kernel(
    expert_offsets_ptr,  # (E + 1,)
    tile_offsets_ptr,  # (E + 1,) exclusive cumsum of tiles per expert
    tile_expert_ptr,  # (n_tiles,)
    tile_row_start_ptr,  # (n_tiles,)
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per expert writes the entries of its own tiles.
    expert = tl.program_id(0)
    row_start = tl.load(expert_offsets_ptr + expert)
    first_tile = tl.load(tile_offsets_ptr + expert)
    num_tiles = tl.load(tile_offsets_ptr + expert + 1) - first_tile
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = t < num_tiles
        tl.store(tile_expert_ptr + first_tile + t, tl.zeros_like(t) + expert, mask=mask)
        tl.store(tile_row_start_ptr + first_tile + t, row_start + t * BLOCK_M, mask=mask)


def _tile_map(expert_offsets: torch.Tensor, num_rows: int, block_m: int, use_triton: bool):
    num_experts = expert_offsets.numel() - 1
    n_tiles = max_tiles(num_rows, num_experts, block_m)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=counts.device)
    tile_offsets[1:] = torch.cumsum(tiles_per_expert, 0)
    tile_expert = torch.full((n_tiles,), -1, dtype=torch.int32, device=counts.device)
    tile_row_start = torch.zeros(n_tiles, dtype=torch.int32, device=counts.device)
    if num_experts == 0 or n_tiles == 0:
        return tile_expert, tile_row_start
    if use_triton:
        _tile_map_kernel[(num_experts,)](
            expert_offsets, tile_offsets, tile_expert, tile_row_start, BLOCK_M=block_m, BLOCK_T=64
        )
    else:
        # Same map in PyTorch: tile i belongs to the last expert whose first tile is <= i.
        tile_ids = torch.arange(n_tiles, dtype=torch.int32, device=counts.device)
        expert = torch.searchsorted(tile_offsets, tile_ids, right=True) - 1
        valid = tile_ids < tile_offsets[-1]
        expert = expert.clamp(max=num_experts - 1).to(torch.int32)
        start = expert_offsets[expert.long()] + (tile_ids - tile_offsets[expert.long()]) * block_m
        tile_expert = torch.where(valid, expert, tile_expert)
        tile_row_start = torch.where(valid, start.to(torch.int32), tile_row_start)
    return tile_expert, tile_row_start


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int, use_triton: bool) -> Routing:
    """Sort the (token, k) pairs of top_k_index (T, K) by expert and build the tile map."""
    top_k = top_k_index.shape[1]
    flat_ids = top_k_index.reshape(-1)
    # Stable sort keeps each expert's rows in token order (deterministic results).
    sorted_ids, sort_idx = torch.sort(flat_ids, stable=True)
    experts = torch.arange(num_experts + 1, device=flat_ids.device, dtype=sorted_ids.dtype)
    expert_offsets = torch.searchsorted(sorted_ids, experts).to(torch.int32)
    sort_idx = sort_idx.to(torch.int32)
    sorted_token = torch.div(sort_idx, top_k, rounding_mode="floor")
    tile_expert, tile_row_start = _tile_map(expert_offsets, flat_ids.numel(), block_m, use_triton)
    return Routing(sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m)


def route_from_counts(m_sizes: torch.Tensor, num_rows: int, block_m: int, use_triton: bool) -> Routing:
    """Tile map for num_rows rows already grouped by expert, m_sizes (E,) rows each, in order."""
    expert_offsets = torch.zeros(m_sizes.numel() + 1, dtype=torch.int32, device=m_sizes.device)
    # Clamping keeps the tile map inside its bound even for sizes that overrun num_rows.
    expert_offsets[1:] = torch.cumsum(m_sizes, 0).clamp(max=num_rows)
    rows = torch.arange(num_rows, dtype=torch.int32, device=m_sizes.device)
    tile_expert, tile_row_start = _tile_map(expert_offsets, num_rows, block_m, use_triton)
    return Routing(rows, rows, expert_offsets, tile_expert, tile_row_start, block_m)
