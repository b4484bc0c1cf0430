"""Routing: from the router's top-k expert ids to what every grouped GEMM needs.

Computed once per MoE block and reused by the forward and backward GEMMs, on the
device and without host synchronization (no data-dependent shapes): the tile map
has a static upper bound on its length and unused tiles are marked with -1.

For N = T * K (token, k) pairs sorted by expert:
    sort_idx        (N,)      int32  flat position t * K + k of each sorted row
    sorted_token    (N,)      int32  token t of each sorted row (the gather index)
    expert_offsets  (E + 1,)  int32  rows of expert e are [offsets[e], offsets[e + 1])
    tile_expert     (n_tiles,) int32 expert of each BLOCK_M row tile, -1 when unused
    tile_row_start  (n_tiles,) int32 first sorted row of each tile, 0 when unused
The sort is stable: an expert's rows keep increasing flat positions. Ids outside
[0, E) sort past offsets[E] (offsets[0] is 0) and are never computed; callers that
combine rows treat them as contributing zero (like Transformers' EP sentinels).

On GPUs the sort is a counting sort in three launches over blocks of BLOCK_ROWS rows:
    1. _histogram_kernel  hist[b, e] = rows of block b routed to expert e
    2. _scan_kernel       prefix over blocks (in place), expert offsets and the tile map
    3. _scatter_kernel    each row goes to offsets[e] + rows of e in earlier blocks
                          + rows of e before it in its own block
Up to SINGLE_PROGRAM_ROWS rows (decode, small batches) _route_block_kernel does all three in one
launch: there, launches cost more host time than the kernels take on the GPU.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .sizes import cdiv, next_power_of_2
from .launch import launcher


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


# Rows per program of the histogram and scatter kernels (a row is one (token, k) pair): each
# program walks its rows SUB_ROWS at a time, so fewer rows per program means shorter serial loops
# and a longer scan over the blocks. Measured on the H200 (scripts/bench_routing.py): 128 rows
# fastest up to 16384 rows, 256 above.
BLOCK_ROWS = 256
SMALL_BLOCK_ROWS, SMALL_ROUTING = 128, 32768
# Up to this many rows, _route_block_kernel sorts them in one program and one launch.
SINGLE_PROGRAM_ROWS = 1024
# Elements of the (chunk, E_PAD) one-hot tiles the kernels hold in registers.
CHUNK_ELEMENTS = 8192


def _launch_sizes(num_experts: int) -> tuple[int, int]:
    """(E_PAD, CHUNK): experts padded to a power of two, chunk length for (CHUNK, E_PAD) tiles."""
    e_pad = max(16, next_power_of_2(num_experts))
    return e_pad, min(128, max(16, CHUNK_ELEMENTS // e_pad))


@triton.jit
def _load_experts(ids_ptr, rows, num_rows, num_experts):
    """Expert id (int32) of each row; -1 for rows past num_rows and for ids outside [0, E)."""
    ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    return tl.where(valid, ids, -1).to(tl.int32)


@triton.jit
def _count_rows(ids_ptr, start, end, num_rows, num_experts, SUB_ROWS: tl.constexpr, E_PAD: tl.constexpr):
    """(E_PAD,) int32: rows in [start, end) routed to each expert, SUB_ROWS at a time."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for r0 in range(start, end, SUB_ROWS):
        rows = r0 + tl.arange(0, SUB_ROWS)
        expert = _load_experts(ids_ptr, rows, num_rows, num_experts)
        counts += tl.sum((expert[:, None] == experts[None, :]).to(tl.int32), axis=0)
    return counts


@launcher
@triton.jit
def _histogram_kernel(
    ids_ptr,  # (N,) expert id of each flat row
    hist_ptr,  # (num_blocks, E) int32 out
    num_rows,
    num_experts,
    BLOCK_ROWS: tl.constexpr,
    SUB_ROWS: tl.constexpr,
    E_PAD: tl.constexpr,
):
    # One program per block of rows counts them per expert.
    block = tl.program_id(0)
    start = block * BLOCK_ROWS
    end = tl.minimum(start + BLOCK_ROWS, num_rows)
    counts = _count_rows(ids_ptr, start, end, num_rows, num_experts, SUB_ROWS, E_PAD)
    experts = tl.arange(0, E_PAD)
    tl.store(hist_ptr + block * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _write_offsets_and_tiles(
    counts,  # (E_PAD,) int32 rows of each expert
    expert_offsets_ptr,  # (E + 1,) int32 out
    tile_expert_ptr,  # (n_tiles,) int32 out
    tile_row_start_ptr,  # (n_tiles,) int32 out
    num_experts,
    max_rows,
    n_tiles,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Expert offsets and the tile map from the rows of each expert; returns the offsets
    (E_PAD,) and their total."""
    experts = tl.arange(0, E_PAD)
    expert_mask = experts < num_experts
    # Expert offsets: exclusive cumsum over experts, clamped to max_rows (int64 so that
    # unchecked sizes cannot overflow).
    ends = tl.cumsum(counts.to(tl.int64), axis=0)
    starts = tl.minimum(ends - counts, max_rows).to(tl.int32)
    counts = tl.minimum(ends, max_rows).to(tl.int32) - starts
    total = tl.sum(counts, axis=0)
    tl.store(expert_offsets_ptr + experts, starts, mask=expert_mask)
    tl.store(expert_offsets_ptr + num_experts, total)

    # Tile map: expert e owns tiles [first_tile[e], first_tile[e] + tiles[e]).
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    first_tile = tl.cumsum(tiles, axis=0) - tiles
    used_tiles = tl.sum(tiles, axis=0)
    # Row start of tile t of expert e is t * BLOCK_M + row_shift[e].
    row_shift = starts - first_tile * BLOCK_M
    for t0 in range(0, n_tiles, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        # Tile t belongs to the last expert whose first tile is <= t (experts without
        # tiles share their first tile with the next expert that has some).
        owner = (first_tile[None, :] <= t[:, None]) & expert_mask[None, :]
        expert = tl.sum(owner.to(tl.int32), axis=1) - 1
        # Registers cannot be indexed: gather row_shift[expert] with a one-hot sum.
        one_hot = (experts[None, :] == expert[:, None]).to(tl.int32)
        row_start = t * BLOCK_M + tl.sum(one_hot * row_shift[None, :], axis=1)
        used = t < used_tiles
        tl.store(tile_expert_ptr + t, tl.where(used, expert, -1), mask=t < n_tiles)
        tl.store(tile_row_start_ptr + t, tl.where(used, row_start, 0), mask=t < n_tiles)
    return starts, total


@launcher
@triton.jit
def _scan_kernel(
    hist_ptr,  # (num_blocks, E) counts per block and expert; exclusive prefix over blocks out
    expert_offsets_ptr,  # (E + 1,) int32 out
    tile_expert_ptr,  # (n_tiles,) int32 out
    tile_row_start_ptr,  # (n_tiles,) int32 out
    num_blocks,
    num_experts,
    max_rows,
    n_tiles,
    WRITE_PREFIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # A single program: every stage needs the totals of the one before.
    experts = tl.arange(0, E_PAD)
    expert_mask = experts < num_experts

    # 1. Prefix over blocks, CHUNK blocks at a time; `counts` carries the running totals.
    # Clamping to [0, max_rows] only matters for route_from_counts' unchecked sizes.
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        ptrs = hist_ptr + blocks[:, None] * num_experts + experts[None, :]
        mask = (blocks < num_blocks)[:, None] & expert_mask[None, :]
        h = tl.load(ptrs, mask=mask, other=0)
        h = tl.minimum(tl.maximum(h, 0), max_rows).to(tl.int32)
        if WRITE_PREFIX:
            tl.store(ptrs, counts[None, :] + tl.cumsum(h, axis=0) - h, mask=mask)
        counts += tl.sum(h, axis=0)

    _write_offsets_and_tiles(
        counts, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_experts, max_rows, n_tiles,
        BLOCK_M, E_PAD, CHUNK,
    )  # fmt: skip


@triton.jit
def _scatter_rows(
    ids_ptr, sort_idx_ptr, sorted_token_ptr, start, end, next_pos, next_oob, num_rows, num_experts, top_k,
    SUB_ROWS: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    """Write the sorted positions of rows [start, end): next_pos (E_PAD,) is the next free
    sorted position of each expert, next_oob that of out-of-range ids."""
    experts = tl.arange(0, E_PAD)
    for r0 in range(start, end, SUB_ROWS):
        rows = r0 + tl.arange(0, SUB_ROWS)
        in_bounds = rows < num_rows
        expert = _load_experts(ids_ptr, rows, num_rows, num_experts)
        one_hot = (expert[:, None] == experts[None, :]).to(tl.int32)
        # Rows of the same expert earlier in this chunk keep the sort stable.
        rank = tl.cumsum(one_hot, axis=0) - one_hot
        pos = tl.sum(one_hot * (next_pos[None, :] + rank), axis=1)
        oob = (in_bounds & (expert < 0)).to(tl.int32)
        pos = tl.where(oob != 0, next_oob + tl.cumsum(oob, axis=0) - oob, pos)
        tl.store(sort_idx_ptr + pos, rows, mask=in_bounds)
        tl.store(sorted_token_ptr + pos, rows // top_k, mask=in_bounds)
        next_pos += tl.sum(one_hot, axis=0)
        next_oob += tl.sum(oob, axis=0)


@launcher
@triton.jit
def _scatter_kernel(
    ids_ptr,  # (N,) expert id of each flat row
    prefix_ptr,  # (num_blocks, E) int32 rows of each expert in earlier blocks
    expert_offsets_ptr,  # (E + 1,) int32
    sort_idx_ptr,  # (N,) int32 out
    sorted_token_ptr,  # (N,) int32 out
    num_rows,
    num_experts,
    top_k,
    BLOCK_ROWS: tl.constexpr,
    SUB_ROWS: tl.constexpr,
    E_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    expert_mask = experts < num_experts
    earlier = tl.load(prefix_ptr + block * num_experts + experts, mask=expert_mask, other=0)
    # Next free sorted position of each expert, and of out-of-range ids (after offsets[E],
    # behind the out-of-range rows of earlier blocks: every earlier row not counted above).
    next_pos = tl.load(expert_offsets_ptr + experts, mask=expert_mask, other=0) + earlier
    start = block * BLOCK_ROWS
    next_oob = tl.load(expert_offsets_ptr + num_experts) + start - tl.sum(earlier, axis=0)
    end = tl.minimum(start + BLOCK_ROWS, num_rows)
    _scatter_rows(
        ids_ptr, sort_idx_ptr, sorted_token_ptr, start, end, next_pos, next_oob, num_rows, num_experts, top_k,
        SUB_ROWS, E_PAD,
    )  # fmt: skip


@launcher
@triton.jit
def _route_block_kernel(
    ids_ptr,  # (N,) expert id of each flat row, N <= SINGLE_PROGRAM_ROWS
    expert_offsets_ptr,  # (E + 1,) int32 out
    tile_expert_ptr,  # (n_tiles,) int32 out
    tile_row_start_ptr,  # (n_tiles,) int32 out
    sort_idx_ptr,  # (N,) int32 out
    sorted_token_ptr,  # (N,) int32 out
    num_rows,
    num_experts,
    top_k,
    n_tiles,
    BLOCK_M: tl.constexpr,
    SUB_ROWS: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # The three kernels above for a single block of rows, in one program.
    counts = _count_rows(ids_ptr, 0, num_rows, num_rows, num_experts, SUB_ROWS, E_PAD)
    starts, total = _write_offsets_and_tiles(
        counts, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_experts, num_rows, n_tiles,
        BLOCK_M, E_PAD, CHUNK,
    )  # fmt: skip
    _scatter_rows(
        ids_ptr, sort_idx_ptr, sorted_token_ptr, 0, num_rows, starts, total, num_rows, num_experts, top_k,
        SUB_ROWS, E_PAD,
    )  # fmt: skip


def _scan(hist, num_experts, max_rows, block_m, write_prefix):
    """Launch _scan_kernel on hist (num_blocks, E): (expert_offsets, tile_expert, tile_row_start)."""
    device = hist.device
    n_tiles = max_tiles(max_rows, num_experts, block_m)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
    tile_row_start = torch.empty(n_tiles, dtype=torch.int32, device=device)
    e_pad, chunk = _launch_sizes(num_experts)
    _scan_kernel[(1,)](
        hist, expert_offsets, tile_expert, tile_row_start,
        hist.shape[0], num_experts, max_rows, n_tiles,
        WRITE_PREFIX=write_prefix, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk,
    )  # fmt: skip
    return expert_offsets, tile_expert, tile_row_start


def _empty_routing(num_experts: int, block_m: int, device) -> Routing:
    """The routing of zero rows, without launching kernels on empty grids."""
    # Distinct tensors: custom ops may not return aliases of one another.
    sort_idx = torch.empty(0, dtype=torch.int32, device=device)
    sorted_token = torch.empty(0, dtype=torch.int32, device=device)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    tile_row_start = torch.zeros(num_experts, dtype=torch.int32, device=device)
    return Routing(sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m)


def _tile_map_torch(expert_offsets: torch.Tensor, num_rows: int, block_m: int):
    """PyTorch version of _scan_kernel's tile map, for devices without Triton."""
    num_experts = expert_offsets.numel() - 1
    device = expert_offsets.device
    n_tiles = max_tiles(num_rows, num_experts, block_m)
    tiles_per_expert = (expert_offsets[1:] - expert_offsets[:-1] + block_m - 1) // block_m
    tile_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    tile_offsets[1:] = torch.cumsum(tiles_per_expert, 0)
    # Tile t belongs to the last expert whose first tile is <= t.
    tile_ids = torch.arange(n_tiles, dtype=torch.int32, device=device)
    expert = (torch.searchsorted(tile_offsets, tile_ids, right=True) - 1).clamp(max=num_experts - 1)
    start = expert_offsets[expert] + (tile_ids - tile_offsets[expert]) * block_m
    used = tile_ids < tile_offsets[-1]
    tile_expert = torch.where(used, expert, -1).to(torch.int32)
    tile_row_start = torch.where(used, start, 0).to(torch.int32)
    return tile_expert, tile_row_start


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int, use_triton: bool) -> Routing:
    """Sort the (token, k) pairs of top_k_index (T, K) by expert and build the tile map."""
    top_k = top_k_index.shape[1]
    ids = top_k_index.reshape(-1)
    num_rows = ids.numel()
    if not use_triton:
        # Out-of-range ids get key E so that they sort after every expert.
        keys = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        sorted_keys, sort_idx = torch.sort(keys, stable=True)
        experts = torch.arange(num_experts + 1, device=ids.device, dtype=keys.dtype)
        expert_offsets = torch.searchsorted(sorted_keys, experts).to(torch.int32)
        sort_idx = sort_idx.to(torch.int32)
        sorted_token = torch.div(sort_idx, top_k, rounding_mode="floor")
        tile_expert, tile_row_start = _tile_map_torch(expert_offsets, num_rows, block_m)
        return Routing(sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m)
    if num_rows == 0:
        return _empty_routing(num_experts, block_m, ids.device)

    device = ids.device
    e_pad, sub_rows = _launch_sizes(num_experts)
    sort_idx = torch.empty(num_rows, dtype=torch.int32, device=device)
    sorted_token = torch.empty(num_rows, dtype=torch.int32, device=device)
    if num_rows <= SINGLE_PROGRAM_ROWS:
        n_tiles = max_tiles(num_rows, num_experts, block_m)
        expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
        tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
        tile_row_start = torch.empty(n_tiles, dtype=torch.int32, device=device)
        _route_block_kernel[(1,)](
            ids, expert_offsets, tile_expert, tile_row_start, sort_idx, sorted_token,
            num_rows, num_experts, top_k, n_tiles,
            BLOCK_M=block_m, SUB_ROWS=sub_rows, E_PAD=e_pad, CHUNK=sub_rows,
        )  # fmt: skip
        return Routing(sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m)
    block_rows = SMALL_BLOCK_ROWS if num_rows <= SMALL_ROUTING else BLOCK_ROWS
    num_blocks = cdiv(num_rows, block_rows)
    hist = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=device)
    _histogram_kernel[(num_blocks,)](
        ids, hist, num_rows, num_experts, BLOCK_ROWS=block_rows, SUB_ROWS=sub_rows, E_PAD=e_pad
    )
    expert_offsets, tile_expert, tile_row_start = _scan(hist, num_experts, num_rows, block_m, True)
    _scatter_kernel[(num_blocks,)](
        ids, hist, expert_offsets, sort_idx, sorted_token, num_rows, num_experts, top_k,
        BLOCK_ROWS=block_rows, SUB_ROWS=sub_rows, E_PAD=e_pad,
    )  # fmt: skip
    return Routing(sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m)


def route_from_counts(m_sizes: torch.Tensor, num_rows: int, block_m: int, use_triton: bool) -> Routing:
    """Tile map for num_rows rows already grouped by expert, m_sizes (E,) rows each, in order.

    Sizes are clamped to [0, num_rows] and offsets to num_rows, which keeps the tile map
    inside its bound even for sizes that were not checked."""
    num_experts = m_sizes.numel()
    rows = torch.arange(num_rows, dtype=torch.int32, device=m_sizes.device)
    if not use_triton:
        expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=m_sizes.device)
        expert_offsets[1:] = torch.cumsum(m_sizes.clamp(0, num_rows).long(), 0).clamp(max=num_rows)
        tile_expert, tile_row_start = _tile_map_torch(expert_offsets, num_rows, block_m)
        return Routing(rows, rows, expert_offsets, tile_expert, tile_row_start, block_m)
    if num_rows == 0:
        return _empty_routing(num_experts, block_m, m_sizes.device)
    # m_sizes is the histogram of a single block; its prefix over blocks is not needed.
    hist = m_sizes.reshape(1, num_experts).contiguous()
    expert_offsets, tile_expert, tile_row_start = _scan(hist, num_experts, num_rows, block_m, False)
    return Routing(rows, rows, expert_offsets, tile_expert, tile_row_start, block_m)
