"""Grouped GEMMs over routed rows: C[r] = A[gather[r]] @ B[expert(r)]^T.

Three kernels, one per job, built from the same tile helpers:
  * _swiglu_gemm_kernel, the forward's gate_up GEMM: B holds gate rows [0, N) and up rows
    [N, 2N); a tile computes both and writes silu(gate) * up, optionally saving the
    pre-activation (gate, up);
  * _gemm_kernel, every other routed GEMM (down, the dX GEMMs, LoRA projections, plain):
    one accumulator; the epilogue may multiply each row by its routing weight (row_scale)
    and write it to its (token, k) position instead of its sorted position (scatter).
  * _dswiglu_gemm_kernel, the down projection's dX GEMM with the SwiGLU backward in its
    epilogue: it reads the saved (gate, up) and writes their gradient, the weighted
    activation and per-tile partial sums of the routing-weight gradient (g is never written).
All: the A-load may gather token rows through an index (no permuted copy of activations);
LORA: before the epilogue, the low-rank term L[r] @ LB[expert(r)]^T is added, where L
(sorted rows, R) is the input already projected by the LoRA A factor (a thin GEMM of
_gemm_kernel) and LB (E, N, R) the scaled B factor; NF4: B is 4-bit (bitsandbytes NF4:
packed codes and per-block absmax over the flat index of the dense (E, rows, cols) tensor)
and is dequantized in the load, to the values bitsandbytes' dequantize_4bit gives.
Absent operands are passed as None; the kernels branch on that at compile time.
GemmConfig's switches: tma_b loads a dense B through a TMA descriptor; persistent (programs
per SM) launches a grid of fewer programs that walk the tiles. Both give the same bits as
without.
"""

import functools

import torch
import triton
import triton.language as tl

from ..quant import Nf4Weight, nf4_code_table
from ..routing import Routing
from ..tuning import GemmConfig
from ..sizes import cdiv, next_power_of_2
from ..launch import launcher


@triton.jit
def _load_b(b_ptr, absmax_ptr, code_ptr, offs, mask, QBLOCK: tl.constexpr, dtype: tl.constexpr):
    """B elements at flat offsets offs; for NF4 (absmax given) the byte offs // 2 holds element
    offs in its high nibble when offs is even, low nibble when odd; value = code * absmax of its block."""
    if absmax_ptr is not None:
        byte = tl.load(b_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
        nibble = tl.where((offs & 1) == 0, byte >> 4, byte & 15)
        code = tl.load(code_ptr + nibble)
        scale = tl.load(absmax_ptr + offs // QBLOCK, mask=mask, other=0.0)
        return (code * scale).to(dtype)
    else:
        return tl.load(b_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _nf4_byte_values(byte, scale, code_ptr, dtype: tl.constexpr):
    """The two values of NF4 bytes (high nibble first): code * absmax, rounded once to dtype."""
    high = (tl.load(code_ptr + (byte >> 4)) * scale).to(dtype)
    low = (tl.load(code_ptr + (byte & 15)) * scale).to(dtype)
    return high, low


@triton.jit
def _load_nf4_pairs(b_ptr, absmax_ptr, code_ptr, offs, mask, QBLOCK: tl.constexpr, dtype: tl.constexpr):
    """4-bit B at even flat offsets offs and at offs + 1: both in the byte offs // 2 (high,
    low nibble) and in one absmax block (blocksizes are even)."""
    byte = tl.load(b_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offs // QBLOCK, mask=mask, other=0.0)
    return _nf4_byte_values(byte, scale, code_ptr, dtype)


@triton.jit
def _load_nf4_cols(
    codes_ptr, absmax_ptr, code_ptr, col, k0, offs_j, mask, n_mask, QBLOCK: tl.constexpr, dtype: tl.constexpr
):
    """_load_nf4_pairs for a k-tile inside one absmax block per column: col (BLOCK_N,) the
    element offsets of the columns' k = 0 within the expert, k0 + 2 * offs_j the even k."""
    byte = tl.load(codes_ptr + (col[None, :] + k0) // 2 + offs_j[:, None], mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (col + k0) // QBLOCK, mask=n_mask, other=0.0)[None, :]
    return _nf4_byte_values(byte, scale, code_ptr, dtype)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mapped_rows(map_ptr, rows, mask):
    """int64 row indices: map_ptr[rows] (a gather or scatter map) where map_ptr is given, else rows."""
    if map_ptr is not None:
        mapped = tl.load(map_ptr + rows, mask=mask, other=0).to(tl.int64)
    else:
        mapped = rows.to(tl.int64)
    return mapped


@triton.jit
def _tile_rows(pid_m, expert, tile_row_start_ptr, expert_offsets_ptr, gather_ptr, a_ptr, stride_am, stride_ak,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The sorted rows of row tile pid_m (of `expert`), their mask (rows of the expert) and the
    pointers of the first K block of their A rows (gathered by token when gather_ptr is given)."""
    row_start = tl.load(tile_row_start_ptr + pid_m)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    a_rows = _mapped_rows(gather_ptr, rows, row_mask)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :] * stride_ak
    return rows, row_mask, a_ptrs


@triton.jit
def _tile_position(tile, num_tiles_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a tile index, in grouped order: neighbouring tiles share
    B tiles of one expert in L2."""
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_tiles_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_size = min(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_size
    pid_n = (tile % tiles_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _mainloop(
    a_ptrs,  # (BLOCK_M, BLOCK_K) pointers to this tile's first k-tile of A
    row_mask,
    K,
    stride_ak,
    b_ptr,  # (E, N or 2N, K) through strides; NF4: the packed codes
    b_desc,  # TMA descriptor of B's 2-D view (E * b_rows, cols), or None
    b_rows,  # with b_desc: rows of one expert in that view
    absmax_ptr,  # NF4: per-block absmax (float32); None for a dense B
    code_ptr,  # NF4: the 16 code values (float32)
    expert,
    pid_n,
    N,
    stride_be,
    stride_bn,
    stride_bk,
    IEEE: tl.constexpr,
    SWIGLU: tl.constexpr,  # also accumulate against B's rows [N, 2N) (acc_up)
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    B_KN: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The K loop of one tile -> (acc, acc_up) in float32 (acc_up is acc's initial zeros
    without SWIGLU)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    dtype = a_ptrs.dtype.element_ty
    # Offsets into B in elements (int64: an expert stack can pass 2**31 elements).
    b_base = expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc_up = acc
    if NF4_PAIRS == 1:
        # 4-bit B, k contiguous: the two values of a byte are neighbours along k. Load each byte
        # once, and multiply the even / odd columns of A by them (two dots of BLOCK_K / 2).
        offs_j = tl.arange(0, BLOCK_K // 2)
        if SCALE_PER_COL:
            # Blocks align with k-tiles: one absmax per column, and offsets within the expert
            # fit in int32 (fewer integer instructions: this loop is bound by them).
            codes_e = b_ptr + b_base // 2
            absmax_e = absmax_ptr + b_base // QBLOCK
            col = offs_n * stride_bn
            if SWIGLU:
                col_up = col + N * stride_bn
        else:
            pair_offs = b_base + offs_n[None, :].to(tl.int64) * stride_bn + 2 * offs_j[:, None]
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            pair_mask = (2 * offs_j < K - k0)[:, None] & n_mask[None, :]
            if SCALE_PER_COL:
                b_even, b_odd = _load_nf4_cols(
                    codes_e, absmax_e, code_ptr, col, k0, offs_j, pair_mask, n_mask, QBLOCK, dtype
                )
            else:
                b_even, b_odd = _load_nf4_pairs(b_ptr, absmax_ptr, code_ptr, pair_offs, pair_mask, QBLOCK, dtype)
            acc = _dot(a_odd, b_odd, _dot(a_even, b_even, acc, IEEE), IEEE)
            if SWIGLU:
                if SCALE_PER_COL:
                    b_even, b_odd = _load_nf4_cols(
                        codes_e, absmax_e, code_ptr, col_up, k0, offs_j, pair_mask, n_mask, QBLOCK, dtype
                    )
                else:
                    up_offs = pair_offs + N * stride_bn
                    b_even, b_odd = _load_nf4_pairs(b_ptr, absmax_ptr, code_ptr, up_offs, pair_mask, QBLOCK, dtype)
                acc_up = _dot(a_odd, b_odd, _dot(a_even, b_even, acc_up, IEEE), IEEE)
            a_ptrs += BLOCK_K * stride_ak
            if not SCALE_PER_COL:
                pair_offs += BLOCK_K
    elif NF4_PAIRS == 2:
        # 4-bit B, n contiguous (a dX GEMM): a byte holds neighbours along n. Even and odd
        # output columns accumulate apart and are interleaved at the end.
        offs_i = pid_n * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)
        pair_offs = b_base + offs_k[:, None] * stride_bk + offs_i[None, :]
        acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            pair_mask = k_mask[:, None] & (offs_i < N)[None, :]
            b_even, b_odd = _load_nf4_pairs(b_ptr, absmax_ptr, code_ptr, pair_offs, pair_mask, QBLOCK, dtype)
            acc_even = _dot(a, b_even, acc_even, IEEE)
            acc_odd = _dot(a, b_odd, acc_odd, IEEE)
            a_ptrs += BLOCK_K * stride_ak
            pair_offs += BLOCK_K * stride_bk
        acc = tl.interleave(acc_even, acc_odd)
    elif b_desc is not None:
        # Dense B through a TMA descriptor of its 2-D view (E * b_rows, cols). Rows past this
        # expert's N only feed masked-out columns; the launcher makes K a multiple of BLOCK_K
        # when K runs along the rows (B_KN).
        n0 = pid_n * BLOCK_N
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            if B_KN:
                b = b_desc.load([expert * b_rows + k0, n0])
            else:
                b = b_desc.load([expert * b_rows + n0, k0]).T
            acc = _dot(a, b, acc, IEEE)
            if SWIGLU:
                acc_up = _dot(a, b_desc.load([expert * b_rows + N + n0, k0]).T, acc_up, IEEE)
            a_ptrs += BLOCK_K * stride_ak
    else:
        b_offs = b_base + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b_mask = k_mask[:, None] & n_mask[None, :]
            acc = _dot(a, _load_b(b_ptr, absmax_ptr, code_ptr, b_offs, b_mask, QBLOCK, dtype), acc, IEEE)
            if SWIGLU:
                b_up = _load_b(b_ptr, absmax_ptr, code_ptr, b_offs + N * stride_bn, b_mask, QBLOCK, dtype)
                acc_up = _dot(a, b_up, acc_up, IEEE)
            a_ptrs += BLOCK_K * stride_ak
            b_offs += BLOCK_K * stride_bk
    return acc, acc_up


@triton.jit
def _add_lora(
    acc,
    acc_up,
    lora_x_ptr,  # (sorted rows, R) LoRA-projected input
    lora_b_ptr,  # (E, N or 2N, R) through strides
    rows,
    row_mask,
    expert,
    pid_n,
    N,
    R,
    stride_lx,
    stride_le,
    stride_ln,
    stride_lr,
    IEEE: tl.constexpr,
    SWIGLU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """acc (+ acc_up) += L[rows] @ LB[expert]^T over this tile's columns (and, SWIGLU, the up rows)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    lora_x = tl.load(
        lora_x_ptr + rows.to(tl.int64)[:, None] * stride_lx + offs_r[None, :],
        mask=row_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    lb_ptrs = lora_b_ptr + expert.to(tl.int64) * stride_le
    lb_ptrs += offs_n[None, :] * stride_ln + offs_r[:, None] * stride_lr
    lb_mask = r_mask[:, None] & n_mask[None, :]
    acc = _dot(lora_x, tl.load(lb_ptrs, mask=lb_mask, other=0.0), acc, IEEE)
    if SWIGLU:
        lb_up = tl.load(lb_ptrs + N * stride_ln, mask=lb_mask, other=0.0)
        acc_up = _dot(lora_x, lb_up, acc_up, IEEE)
    return acc, acc_up


@triton.jit
def _tile_product(
    pid_m, pid_n, expert, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, lora_x_ptr, lora_b_ptr, gather_ptr,
    tile_row_start_ptr, expert_offsets_ptr, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, R,
    stride_lx, stride_le, stride_ln, stride_lr, IEEE: tl.constexpr, SWIGLU: tl.constexpr, NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr, B_KN: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """What every tile computes before its epilogue: (rows, row_mask, acc, acc_up), the sorted rows
    of row tile pid_m of `expert`, their mask and the float32 accumulators of A[rows] @ B[expert]^T
    over column tile pid_n (acc_up: the up rows with SWIGLU), the LoRA term added when given."""
    rows, row_mask, a_ptrs = _tile_rows(
        pid_m, expert, tile_row_start_ptr, expert_offsets_ptr, gather_ptr, a_ptr, stride_am, stride_ak,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    acc, acc_up = _mainloop(
        a_ptrs, row_mask, K, stride_ak, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, expert, pid_n, N,
        stride_be, stride_bn, stride_bk, IEEE=IEEE, SWIGLU=SWIGLU, NF4_PAIRS=NF4_PAIRS,
        SCALE_PER_COL=SCALE_PER_COL, B_KN=B_KN, QBLOCK=QBLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )  # fmt: skip
    if lora_x_ptr is not None:
        acc, acc_up = _add_lora(
            acc, acc_up, lora_x_ptr, lora_b_ptr, rows, row_mask, expert, pid_n, N, R, stride_lx, stride_le,
            stride_ln, stride_lr, IEEE=IEEE, SWIGLU=SWIGLU, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        )  # fmt: skip
    return rows, row_mask, acc, acc_up


@triton.jit
def _swiglu_tile(
    tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, h_ptr, lora_x_ptr, lora_b_ptr, gather_ptr,
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K, stride_am, stride_ak, stride_be,
    stride_bn, stride_bk, stride_cm, stride_cn, stride_hm, R, stride_lx, stride_le, stride_ln, stride_lr,
    IEEE: tl.constexpr, NF4_PAIRS: tl.constexpr, SCALE_PER_COL: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile of _swiglu_gemm_kernel (arguments as there)."""
    pid_m, pid_n = _tile_position(tile, num_tiles_m, N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert >= 0:  # else past the last used tile
        rows, row_mask, acc, acc_up = _tile_product(
            pid_m, pid_n, expert, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, lora_x_ptr, lora_b_ptr,
            gather_ptr, tile_row_start_ptr, expert_offsets_ptr, N, K, stride_am, stride_ak, stride_be, stride_bn,
            stride_bk, R, stride_lx, stride_le, stride_ln, stride_lr, IEEE=IEEE, SWIGLU=True, NF4_PAIRS=NF4_PAIRS,
            SCALE_PER_COL=SCALE_PER_COL, B_KN=False, QBLOCK=QBLOCK, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n < N)[None, :]
        # Round gate and up to the output dtype as the eager loop does; backward reads these values.
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        acc_up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        if h_ptr is not None:
            h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + N, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
        silu = (acc * tl.sigmoid(acc)).to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = silu * acc_up
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _swiglu_gemm_kernel(
    a_ptr,  # (rows of A, K): the tokens
    b_ptr,  # (E, 2N, K) through strides, gate rows first; NF4: the packed codes
    b_desc,  # TMA descriptor of B's 2-D view (E * b_rows, K), or None
    b_rows,  # with b_desc: 2N
    absmax_ptr,  # NF4: per-block absmax (float32), else None
    code_ptr,  # NF4: the 16 code values (float32), else None
    c_ptr,  # (sorted rows, N): silu(gate) * up
    h_ptr,  # (sorted rows, 2N): (gate, up), or None
    lora_x_ptr,  # (sorted rows, R) LoRA-projected input, or None
    lora_b_ptr,  # (E, 2N, R) through strides, or None
    gather_ptr,  # (sorted rows,) row of A for each sorted row, or None
    tile_expert_ptr,
    tile_row_start_ptr,
    expert_offsets_ptr,
    num_tiles_m,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_hm,
    R,
    stride_lx,
    stride_le,
    stride_ln,
    stride_lr,
    IEEE: tl.constexpr,
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One program per tile, or (PERSISTENT) a grid of fewer programs that walk the tiles in
    # the same grouped order. The tile is a function so that one program per tile stays
    # straight-line code: a loop of one trip compiles to other index arithmetic and a barrier.
    if PERSISTENT:
        num_tiles = num_tiles_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _swiglu_tile(tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, h_ptr, lora_x_ptr,
                lora_b_ptr, gather_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K,
                stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_hm, R,
                stride_lx, stride_le, stride_ln, stride_lr, IEEE, NF4_PAIRS, SCALE_PER_COL, QBLOCK, BLOCK_R,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    else:
        _swiglu_tile(tl.program_id(0), a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, h_ptr, lora_x_ptr,
            lora_b_ptr, gather_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K,
            stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_hm, R, stride_lx,
            stride_le, stride_ln, stride_lr, IEEE, NF4_PAIRS, SCALE_PER_COL, QBLOCK, BLOCK_R, BLOCK_M, BLOCK_N,
            BLOCK_K, GROUP_M)  # fmt: skip


@triton.jit
def _gemm_tile(
    tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, lora_x_ptr, lora_b_ptr, gather_ptr,
    scatter_ptr, scale_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K, stride_am,
    stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, R, stride_lx, stride_le, stride_ln, stride_lr,
    IEEE: tl.constexpr, NF4_PAIRS: tl.constexpr, SCALE_PER_COL: tl.constexpr, B_KN: tl.constexpr,
    QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile of _gemm_kernel (arguments as there)."""
    pid_m, pid_n = _tile_position(tile, num_tiles_m, N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert >= 0:  # else past the last used tile
        rows, row_mask, acc, _ = _tile_product(
            pid_m, pid_n, expert, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, lora_x_ptr, lora_b_ptr,
            gather_ptr, tile_row_start_ptr, expert_offsets_ptr, N, K, stride_am, stride_ak, stride_be, stride_bn,
            stride_bk, R, stride_lx, stride_le, stride_ln, stride_lr, IEEE=IEEE, SWIGLU=False, NF4_PAIRS=NF4_PAIRS,
            SCALE_PER_COL=SCALE_PER_COL, B_KN=B_KN, QBLOCK=QBLOCK, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n < N)[None, :]
        c_rows = _mapped_rows(scatter_ptr, rows, row_mask)
        if scale_ptr is not None:
            # The expert output is rounded before its routing weight is applied, as in the eager loop.
            scale = tl.load(scale_ptr + c_rows, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * scale[:, None]
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _gemm_kernel(
    a_ptr,  # (rows of A, K)
    b_ptr,  # (E, N, K), or (E, K, N) when B_KN, through strides; NF4: the packed codes
    b_desc,  # TMA descriptor of B's 2-D view (E * b_rows, cols), or None
    b_rows,  # with b_desc: rows of one expert in that view
    absmax_ptr,  # NF4: per-block absmax (float32), else None
    code_ptr,  # NF4: the 16 code values (float32), else None
    c_ptr,  # (rows of C, N)
    lora_x_ptr,  # (sorted rows, R) LoRA-projected input, or None
    lora_b_ptr,  # (E, N, R) through strides, or None
    gather_ptr,  # (sorted rows,) row of A for each sorted row, or None
    scatter_ptr,  # (sorted rows,) row of C for each sorted row, or None
    scale_ptr,  # (rows of C,) multiplier of each output row, or None
    tile_expert_ptr,
    tile_row_start_ptr,
    expert_offsets_ptr,
    num_tiles_m,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    R,
    stride_lx,
    stride_le,
    stride_ln,
    stride_lr,
    IEEE: tl.constexpr,
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    B_KN: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One program per tile, or (PERSISTENT) a grid of fewer programs that walk the tiles in
    # the same grouped order. The tile is a function so that one program per tile stays
    # straight-line code: a loop of one trip compiles to other index arithmetic and a barrier.
    if PERSISTENT:
        num_tiles = num_tiles_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, lora_x_ptr, lora_b_ptr,
                gather_ptr, scatter_ptr, scale_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
                num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, R,
                stride_lx, stride_le, stride_ln, stride_lr, IEEE, NF4_PAIRS, SCALE_PER_COL, B_KN, QBLOCK, BLOCK_R,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    else:
        _gemm_tile(tl.program_id(0), a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, lora_x_ptr,
            lora_b_ptr, gather_ptr, scatter_ptr, scale_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
            num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, R,
            stride_lx, stride_le, stride_ln, stride_lr, IEEE, NF4_PAIRS, SCALE_PER_COL, B_KN, QBLOCK, BLOCK_R,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip


@triton.jit
def _dswiglu_tile(
    tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, h_ptr, weights_ptr, sort_idx_ptr, dh_ptr, w_act_ptr,
    dw_partial_ptr, lora_x_ptr, lora_b_ptr, gather_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_hm, stride_dm, stride_wm, R,
    stride_lx, stride_le, stride_ln, stride_lr, IEEE: tl.constexpr, NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile of _dswiglu_gemm_kernel (arguments as there)."""
    pid_m, pid_n = _tile_position(tile, num_tiles_m, N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert >= 0:  # else past the last used tile
        rows, row_mask, acc, _ = _tile_product(
            pid_m, pid_n, expert, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, lora_x_ptr, lora_b_ptr,
            gather_ptr, tile_row_start_ptr, expert_offsets_ptr, N, K, stride_am, stride_ak, stride_be, stride_bn,
            stride_bk, R, stride_lx, stride_le, stride_ln, stride_lr, IEEE=IEEE, SWIGLU=False, NF4_PAIRS=NF4_PAIRS,
            SCALE_PER_COL=SCALE_PER_COL, B_KN=True, QBLOCK=QBLOCK, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip

        # The SwiGLU backward of activation.py on this tile; g is rounded to the activations'
        # dtype, as the unfused path stores it. From 128 columns on, a quarter of them at a time:
        # the whole tile at once holds ~5 float32 values per accumulator element and spills (255
        # registers at 128x128, 8 warps, against 128 in quarters). Narrower tiles in quarters
        # make ptxas serialize the wgmma of the main loop (C7514; ptxas of triton 3.6).
        g = acc.to(dh_ptr.dtype.element_ty).to(tl.float32)
        flat = tl.load(sort_idx_ptr + rows, mask=row_mask, other=0)
        w = tl.load(weights_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
        rows64 = rows.to(tl.int64)
        n0 = pid_n * BLOCK_N
        if BLOCK_N >= 128:
            g_lo, g_hi = _column_halves(g, BLOCK_M, BLOCK_N)
            g0, g1 = _column_halves(g_lo, BLOCK_M, BLOCK_N // 2)
            g2, g3 = _column_halves(g_hi, BLOCK_M, BLOCK_N // 2)
            Q: tl.constexpr = BLOCK_N // 4
            dw_sum = _dswiglu_cols(g0, w, rows64, row_mask, n0, N, h_ptr, dh_ptr, w_act_ptr, stride_hm, stride_dm,
                                   stride_wm, Q)  # fmt: skip
            dw_sum += _dswiglu_cols(g1, w, rows64, row_mask, n0 + Q, N, h_ptr, dh_ptr, w_act_ptr, stride_hm,
                                    stride_dm, stride_wm, Q)  # fmt: skip
            dw_sum += _dswiglu_cols(g2, w, rows64, row_mask, n0 + 2 * Q, N, h_ptr, dh_ptr, w_act_ptr, stride_hm,
                                    stride_dm, stride_wm, Q)  # fmt: skip
            dw_sum += _dswiglu_cols(g3, w, rows64, row_mask, n0 + 3 * Q, N, h_ptr, dh_ptr, w_act_ptr, stride_hm,
                                    stride_dm, stride_wm, Q)  # fmt: skip
        else:
            dw_sum = _dswiglu_cols(g, w, rows64, row_mask, n0, N, h_ptr, dh_ptr, w_act_ptr, stride_hm, stride_dm,
                                   stride_wm, BLOCK_N)  # fmt: skip
        # This tile's part of the routing-weight gradient, in its column of the partial sums.
        num_tiles_n = tl.cdiv(N, BLOCK_N)
        tl.store(dw_partial_ptr + flat.to(tl.int64) * num_tiles_n + pid_n, dw_sum, mask=row_mask)


@triton.jit
def _column_halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS) -> its columns [0, COLS / 2) and [COLS / 2, COLS)."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _dswiglu_cols(g, w, rows64, row_mask, n0, N, h_ptr, dh_ptr, w_act_ptr, stride_hm, stride_dm, stride_wm,
                  COLS: tl.constexpr):  # fmt: skip
    """The SwiGLU backward of g (rows, COLS), the output gradient of columns [n0, n0 + COLS):
    stores d(gate, up) and w * act, returns the rows' sums of g * act. Columns past N load
    (gate, up) = 0: act = 0."""
    offs_n = n0 + tl.arange(0, COLS)
    mask = row_mask[:, None] & (offs_n < N)[None, :]
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_n[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    d_act = g * w[:, None]
    d_gate = d_act * up * (sig + silu * (1.0 - sig))
    d_up = d_act * silu
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dm + offs_n[None, :]
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + N, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
    w_act_ptrs = w_act_ptr + rows64[:, None] * stride_wm + offs_n[None, :]
    tl.store(w_act_ptrs, (act * w[:, None]).to(w_act_ptr.dtype.element_ty), mask=mask)
    return tl.sum(g * act, axis=1)


@launcher
@triton.jit
def _dswiglu_gemm_kernel(
    a_ptr,  # (rows of A, K): the output gradient of the tokens
    b_ptr,  # (E, K, N) through strides (the down weights, read transposed); NF4: the packed codes
    b_desc,  # TMA descriptor of B's 2-D view (E * K, N), or None
    b_rows,  # with b_desc: K
    absmax_ptr,  # NF4: per-block absmax (float32), else None
    code_ptr,  # NF4: the 16 code values (float32), else None
    h_ptr,  # (sorted rows, 2N): the saved pre-activation (gate, up)
    weights_ptr,  # (T * K,) routing weights in (token, k) order
    sort_idx_ptr,  # (sorted rows,) (token, k) position of each sorted row
    dh_ptr,  # (sorted rows, 2N) out: gradient of (gate, up)
    w_act_ptr,  # (sorted rows, N) out: w * silu(gate) * up
    dw_partial_ptr,  # (T * K, cdiv(N, BLOCK_N)) float32 out: per column tile, sum of g * act
    lora_x_ptr,  # (sorted rows, R) LoRA-projected output gradient, or None
    lora_b_ptr,  # (E, R, N) through strides, or None
    gather_ptr,  # (sorted rows,) row of A for each sorted row, or None
    tile_expert_ptr,
    tile_row_start_ptr,
    expert_offsets_ptr,
    num_tiles_m,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_hm,
    stride_dm,
    stride_wm,
    R,
    stride_lx,
    stride_le,
    stride_ln,
    stride_lr,
    IEEE: tl.constexpr,
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One program per tile, or (PERSISTENT) fewer programs walking the tiles, as _gemm_kernel.
    if PERSISTENT:
        num_tiles = num_tiles_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _dswiglu_tile(tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, h_ptr, weights_ptr, sort_idx_ptr,
                dh_ptr, w_act_ptr, dw_partial_ptr, lora_x_ptr, lora_b_ptr, gather_ptr, tile_expert_ptr,
                tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K, stride_am, stride_ak, stride_be,
                stride_bn, stride_bk, stride_hm, stride_dm, stride_wm, R, stride_lx, stride_le, stride_ln,
                stride_lr, IEEE, NF4_PAIRS, SCALE_PER_COL, QBLOCK, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
                GROUP_M)  # fmt: skip
    else:
        _dswiglu_tile(tl.program_id(0), a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, h_ptr, weights_ptr,
            sort_idx_ptr, dh_ptr, w_act_ptr, dw_partial_ptr, lora_x_ptr, lora_b_ptr, gather_ptr, tile_expert_ptr,
            tile_row_start_ptr, expert_offsets_ptr, num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn,
            stride_bk, stride_hm, stride_dm, stride_wm, R, stride_lx, stride_le, stride_ln, stride_lr, IEEE,
            NF4_PAIRS, SCALE_PER_COL, QBLOCK, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a few programs stand in for them elsewhere."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(num_tiles: int, config: GemmConfig, device: torch.device) -> tuple[int]:
    """One program per tile, or config.persistent programs per SM (at most one per tile)."""
    return (min(num_tiles, config.persistent * _num_sms(device)) if config.persistent else num_tiles,)


def _b_descriptor(b: torch.Tensor, config: GemmConfig, b_is_kn: bool, k_in: int):
    """(TMA descriptor of b's 2-D view, rows per expert) where the config asks for it and TMA
    can read b (CUDA, contiguous, 16-byte aligned rows); else (None, 0)."""
    if not config.tma_b or not b.is_cuda or not b.is_contiguous() or b.data_ptr() % 16:
        return None, 0
    num_experts, rows, cols = b.shape
    if (cols * b.element_size()) % 16 or (b_is_kn and k_in % config.block_k):
        return None, 0
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [config.block_k, config.block_n] if b_is_kn else [config.block_n, config.block_k]
    return TensorDescriptor(b.view(num_experts * rows, cols), [num_experts * rows, cols], [cols, 1], block), rows


def _b_operand(a: torch.Tensor, b: "torch.Tensor | Nf4Weight", config: GemmConfig, b_is_kn: bool) -> dict:
    """Kernel arguments of B: its data, TMA descriptor, NF4 tables, strides and load scheme."""
    k_in = a.shape[1]
    nf4 = isinstance(b, Nf4Weight)
    if nf4:  # the flat layout of the dense tensor it stands for
        b_strides = (b.shape[1] * b.shape[2], b.shape[2], 1)
        b_data, absmax, code, qblock = b.codes, b.absmax, nf4_code_table(a.device), b.blocksize
        b_desc, b_rows = None, 0
    else:
        b_strides = b.stride()
        b_data, absmax, code, qblock = b, None, None, 1
        b_desc, b_rows = _b_descriptor(b, config, b_is_kn, k_in)
    stride_bn, stride_bk = (b_strides[2], b_strides[1]) if b_is_kn else (b_strides[1], b_strides[2])
    # 4-bit: where the dense rows have an even length, a byte never straddles two rows and
    # holds neighbours along k (1) or along n (2, B read transposed); else one value at a time (0).
    nf4_pairs = 0
    if nf4 and b.shape[2] % 2 == 0 and config.block_k >= 32 and config.block_n >= 32:  # dots of >= 16
        nf4_pairs = 2 if b_is_kn else 1
    # k-pairs whose k-tiles never straddle an absmax block: one scale per column and tile.
    scale_per_col = nf4_pairs == 1 and b_strides[0] % qblock == 0 and stride_bn % qblock == 0
    scale_per_col = scale_per_col and qblock % config.block_k == 0 and b_strides[0] < 2**31
    return dict(
        b_ptr=b_data, b_desc=b_desc, b_rows=b_rows, absmax_ptr=absmax, code_ptr=code,
        stride_be=b_strides[0], stride_bn=stride_bn, stride_bk=stride_bk,
        NF4_PAIRS=nf4_pairs, SCALE_PER_COL=scale_per_col, QBLOCK=qblock,
    )  # fmt: skip


def _lora_operand(lora: "tuple[torch.Tensor, torch.Tensor, bool] | None") -> dict:
    """Kernel arguments of the LoRA term (L, LB, lb_is_rn), or of its absence."""
    if lora is None:
        return dict(lora_x_ptr=None, lora_b_ptr=None, R=0, stride_lx=0, stride_le=0, stride_ln=0, stride_lr=0,
                    BLOCK_R=16)  # fmt: skip
    lora_x, lora_b, lb_is_rn = lora
    stride_ln, stride_lr = (lora_b.stride(2), lora_b.stride(1)) if lb_is_rn else (lora_b.stride(1), lora_b.stride(2))
    rank = lora_x.shape[1]
    return dict(
        lora_x_ptr=lora_x, lora_b_ptr=lora_b, R=rank, stride_lx=lora_x.stride(0), stride_le=lora_b.stride(0),
        stride_ln=stride_ln, stride_lr=stride_lr, BLOCK_R=max(16, next_power_of_2(rank)),
    )  # fmt: skip


def _tile_map(routing: Routing) -> dict:
    return dict(
        tile_expert_ptr=routing.tile_expert, tile_row_start_ptr=routing.tile_row_start,
        expert_offsets_ptr=routing.expert_offsets, num_tiles_m=routing.tile_expert.numel(),
    )  # fmt: skip


def swiglu_gemm_launch(
    a: torch.Tensor,
    b: "torch.Tensor | Nf4Weight",
    out: torch.Tensor,
    routing: Routing,
    config: GemmConfig,
    *,
    gather: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> torch.Tensor:
    """out (sorted rows, N) = silu(gate) * up with (gate, up) = A[gather[r]] @ B[e]^T.

    a: (rows of A, K). b: (E, 2N, K), gate rows first; dense, or an Nf4Weight (4-bit,
    dequantized to a's dtype in the load). gather: (sorted rows,) int32.
    h_out: (sorted rows, 2N) receives (gate, up), rounded to out's dtype.
    lora: (L, LB, lb_is_rn): L (sorted rows, R) and LB (E, 2N, R), or (E, R, 2N) when
    lb_is_rn; adds L @ LB[e]^T to (gate, up) before the SwiGLU.
    """
    n_out = out.shape[1]
    num_tiles = routing.tile_expert.numel() * cdiv(n_out, config.block_n)
    if num_tiles == 0:
        return out
    _swiglu_gemm_kernel[_grid(num_tiles, config, a.device)](
        a_ptr=a, c_ptr=out, h_ptr=h_out, gather_ptr=gather, N=n_out, K=a.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_cm=out.stride(0), stride_cn=out.stride(1),
        stride_hm=h_out.stride(0) if h_out is not None else 0,
        **_b_operand(a, b, config, b_is_kn=False), **_lora_operand(lora), **_tile_map(routing),
        IEEE=a.dtype == torch.float32, BLOCK_M=routing.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, PERSISTENT=config.persistent > 0, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out


def grouped_gemm_launch(
    a: torch.Tensor,
    b: "torch.Tensor | Nf4Weight",
    out: torch.Tensor,
    routing: Routing,
    config: GemmConfig,
    *,
    b_is_kn: bool = False,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> torch.Tensor:
    """out[scatter[r]] = row_scale[scatter[r]] * (A[gather[r]] @ B[e]^T) into out (rows, N).

    a: (rows of A, K). b: (E, N, K), or (E, K, N) when b_is_kn; dense, or an Nf4Weight
    (4-bit, dequantized to a's dtype in the load).
    gather / scatter: (sorted rows,) int32 row maps; row_scale: (rows of out,).
    lora: (L, LB, lb_is_rn): L (sorted rows, R) and LB (E, N, R), or (E, R, N) when
    lb_is_rn; adds L @ LB[e]^T to each row before the epilogue.
    """
    n_out = out.shape[1]
    num_tiles = routing.tile_expert.numel() * cdiv(n_out, config.block_n)
    if num_tiles == 0:
        return out
    _gemm_kernel[_grid(num_tiles, config, a.device)](
        a_ptr=a, c_ptr=out, gather_ptr=gather, scatter_ptr=scatter, scale_ptr=row_scale, N=n_out, K=a.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_cm=out.stride(0), stride_cn=out.stride(1),
        **_b_operand(a, b, config, b_is_kn), **_lora_operand(lora), **_tile_map(routing),
        B_KN=b_is_kn, IEEE=a.dtype == torch.float32, BLOCK_M=routing.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, PERSISTENT=config.persistent > 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def dswiglu_gemm_launch(
    a: torch.Tensor,
    b: "torch.Tensor | Nf4Weight",
    h: torch.Tensor,
    weights: torch.Tensor,
    routing: Routing,
    config: GemmConfig,
    *,
    dh: torch.Tensor,
    w_act: torch.Tensor,
    dweights: torch.Tensor,
    gather: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> None:
    """The down projection's dX GEMM with the SwiGLU backward in its epilogue (activation.py's
    formulas): g = A[gather[r]] @ B[e] (never written), then dh (sorted rows, 2N),
    w_act (sorted rows, N) and dweights (T * K,) in (token, k) order.

    a: (rows of A, K). b: (E, K, N) (the down weights, read transposed); dense or an Nf4Weight.
    h: (sorted rows, 2N) the saved (gate, up); weights: (T * K,) routing weights.
    lora: (L, LB, lb_is_rn) as in grouped_gemm_launch, added to g before the SwiGLU backward.
    dweights is the sum of one float32 partial per column tile (no atomics: deterministic);
    rows that no expert's tile covers get 0.
    """
    n_out = w_act.shape[1]
    num_tiles_n = cdiv(n_out, config.block_n)
    partial = torch.zeros(dweights.numel(), num_tiles_n, dtype=torch.float32, device=a.device)
    num_tiles = routing.tile_expert.numel() * num_tiles_n
    if num_tiles > 0:
        _dswiglu_gemm_kernel[_grid(num_tiles, config, a.device)](
            a_ptr=a, h_ptr=h, weights_ptr=weights, sort_idx_ptr=routing.sort_idx, dh_ptr=dh, w_act_ptr=w_act,
            dw_partial_ptr=partial, gather_ptr=gather, N=n_out, K=a.shape[1], stride_am=a.stride(0),
            stride_ak=a.stride(1), stride_hm=h.stride(0), stride_dm=dh.stride(0), stride_wm=w_act.stride(0),
            **_b_operand(a, b, config, b_is_kn=True), **_lora_operand(lora), **_tile_map(routing),
            IEEE=a.dtype == torch.float32, BLOCK_M=routing.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, PERSISTENT=config.persistent > 0, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    dweights.copy_(partial.sum(1))
