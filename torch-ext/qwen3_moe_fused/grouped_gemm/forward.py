"""Grouped GEMM over routed rows: C[r] = A[gather[r]] @ B[expert(r)]^T.

One kernel serves the forward GEMMs and the dX GEMMs of the backward:
  * the A-load gathers token rows through an index (no permuted copy of activations);
  * SWIGLU: B holds gate rows [0, N) and up rows [N, 2N); a tile computes both and
    writes silu(gate) * up, optionally saving the pre-activation (gate, up);
  * ROW_SCALE / SCATTER: the epilogue multiplies each row by its routing weight and
    writes it to its (token, k) position instead of its sorted position;
  * LORA: before the epilogue, the low-rank term L[r] @ LB[expert(r)]^T is added, where
    L (sorted rows, R) is the input already projected by the LoRA A factor (a thin GEMM
    of this same kernel) and LB (E, N, R) the scaled B factor;
  * NF4: B is 4-bit (bitsandbytes NF4: packed codes and per-block absmax over the flat
    index of the dense (E, rows, cols) tensor) and is dequantized in the load, to the
    values bitsandbytes' dequantize_4bit gives.
Config keys besides the tiles: TMA_B loads a dense B through a TMA descriptor; PERSISTENT
(programs per SM) launches a persistent grid whose programs walk the tiles. Both give the
same bits as without.
"""

import functools

import torch
import triton
import triton.language as tl

from ..quant import Nf4Weight, nf4_code_table
from ..routing import Routing


@triton.jit
def _load_b(b_ptr, absmax_ptr, code_ptr, offs, mask, NF4: tl.constexpr, QBLOCK: tl.constexpr, dtype: tl.constexpr):
    """B elements at flat offsets offs; for NF4 the byte offs // 2 holds element offs in its
    high nibble when offs is even, low nibble when odd; value = code * absmax of its block."""
    if NF4:
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
def _gemm_tile(
    tile,  # index of the (row tile, column tile) this call computes
    a_ptr,  # (rows of A, K)
    b_ptr,  # (E, N or 2N, K) through strides; NF4: the packed codes
    b_desc,  # B_TMA: TMA descriptor of B's 2-D view (E * b_rows, cols), else None
    b_rows,  # B_TMA: rows of one expert in that view
    absmax_ptr,  # NF4: per-block absmax (float32)
    code_ptr,  # NF4: the 16 code values (float32)
    c_ptr,  # (rows of C, N)
    h_ptr,  # (sorted rows, 2N) pre-activation, written when SAVE_H
    lora_x_ptr,  # (sorted rows, R) LoRA-projected input, read when LORA
    lora_b_ptr,  # (E, N or 2N, R) through strides, read when LORA
    gather_ptr,  # (sorted rows,) row of A for each sorted row
    scatter_ptr,  # (sorted rows,) row of C for each sorted row
    scale_ptr,  # (rows of C,) multiplier of each output row
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
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    SWIGLU: tl.constexpr,
    SAVE_H: tl.constexpr,
    IEEE: tl.constexpr,
    LORA: tl.constexpr,
    NF4: tl.constexpr,
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: neighbouring tiles share B tiles of one expert in L2.
    pid = tile
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_size = min(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    expert = tl.load(tile_expert_ptr + pid_m)
    if expert >= 0:  # else past the last used tile
        row_start = tl.load(tile_row_start_ptr + pid_m)
        row_end = tl.load(expert_offsets_ptr + expert + 1)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if GATHER:
            a_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        dtype = a_ptr.dtype.element_ty
        # Offsets into B in elements (int64: an expert stack can pass 2**31 elements).
        b_base = expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
        elif B_TMA:
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
                acc = _dot(a, _load_b(b_ptr, absmax_ptr, code_ptr, b_offs, b_mask, NF4, QBLOCK, dtype), acc, IEEE)
                if SWIGLU:
                    b_up = _load_b(b_ptr, absmax_ptr, code_ptr, b_offs + N * stride_bn, b_mask, NF4, QBLOCK, dtype)
                    acc_up = _dot(a, b_up, acc_up, IEEE)
                a_ptrs += BLOCK_K * stride_ak
                b_offs += BLOCK_K * stride_bk

        if LORA:
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

        mask = row_mask[:, None] & n_mask[None, :]
        if SWIGLU:
            # Round gate and up to the output dtype as the eager loop does; backward reads these values.
            acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
            acc_up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
            if SAVE_H:
                h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
                tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
                tl.store(h_ptrs + N, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
            silu = (acc * tl.sigmoid(acc)).to(c_ptr.dtype.element_ty).to(tl.float32)
            acc = silu * acc_up
        if SCATTER:
            c_rows = tl.load(scatter_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            c_rows = rows.to(tl.int64)
        if ROW_SCALE:
            # The expert output is rounded before its routing weight is applied, as in the eager loop.
            scale = tl.load(scale_ptr + c_rows, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * scale[:, None]
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # (rows of A, K)
    b_ptr,  # (E, N or 2N, K) through strides; NF4: the packed codes
    b_desc,  # B_TMA: TMA descriptor of B's 2-D view (E * b_rows, cols), else None
    b_rows,  # B_TMA: rows of one expert in that view
    absmax_ptr,  # NF4: per-block absmax (float32)
    code_ptr,  # NF4: the 16 code values (float32)
    c_ptr,  # (rows of C, N)
    h_ptr,  # (sorted rows, 2N) pre-activation, written when SAVE_H
    lora_x_ptr,  # (sorted rows, R) LoRA-projected input, read when LORA
    lora_b_ptr,  # (E, N or 2N, R) through strides, read when LORA
    gather_ptr,  # (sorted rows,) row of A for each sorted row
    scatter_ptr,  # (sorted rows,) row of C for each sorted row
    scale_ptr,  # (rows of C,) multiplier of each output row
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
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    SWIGLU: tl.constexpr,
    SAVE_H: tl.constexpr,
    IEEE: tl.constexpr,
    LORA: tl.constexpr,
    NF4: tl.constexpr,
    NF4_PAIRS: tl.constexpr,
    SCALE_PER_COL: tl.constexpr,
    B_TMA: tl.constexpr,
    B_KN: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One tile per program, or (PERSISTENT) a grid of a few programs per SM that walk the
    # tiles in the same grouped order.
    if PERSISTENT:
        num_tiles = num_tiles_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(
                tile, a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, h_ptr, lora_x_ptr, lora_b_ptr,
                gather_ptr, scatter_ptr, scale_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
                num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                stride_hm, R, stride_lx, stride_le, stride_ln, stride_lr, GATHER, SCATTER, ROW_SCALE, SWIGLU,
                SAVE_H, IEEE, LORA, NF4, NF4_PAIRS, SCALE_PER_COL, B_TMA, B_KN, QBLOCK, BLOCK_R, BLOCK_M, BLOCK_N,
                BLOCK_K, GROUP_M,
            )  # fmt: skip
    else:
        _gemm_tile(
            tl.program_id(0), a_ptr, b_ptr, b_desc, b_rows, absmax_ptr, code_ptr, c_ptr, h_ptr, lora_x_ptr,
            lora_b_ptr, gather_ptr, scatter_ptr, scale_ptr, tile_expert_ptr, tile_row_start_ptr,
            expert_offsets_ptr, num_tiles_m, N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk,
            stride_cm, stride_cn, stride_hm, R, stride_lx, stride_le, stride_ln, stride_lr, GATHER, SCATTER,
            ROW_SCALE, SWIGLU, SAVE_H, IEEE, LORA, NF4, NF4_PAIRS, SCALE_PER_COL, B_TMA, B_KN, QBLOCK, BLOCK_R,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a few programs stand in for them elsewhere."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _b_descriptor(b: torch.Tensor, config: dict, b_is_kn: bool, k_in: int):
    """(TMA descriptor of b's 2-D view, rows per expert) where the config asks for it and TMA
    can read b (CUDA, contiguous, 16-byte aligned rows); else (None, 0)."""
    if not config.get("TMA_B") or not b.is_cuda or not b.is_contiguous() or b.data_ptr() % 16:
        return None, 0
    num_experts, rows, cols = b.shape
    if (cols * b.element_size()) % 16 or (b_is_kn and k_in % config["BLOCK_K"]):
        return None, 0
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [config["BLOCK_K"], config["BLOCK_N"]] if b_is_kn else [config["BLOCK_N"], config["BLOCK_K"]]
    return TensorDescriptor(b.view(num_experts * rows, cols), [num_experts * rows, cols], [cols, 1], block), rows


def grouped_gemm_launch(
    a: torch.Tensor,
    b: "torch.Tensor | Nf4Weight",
    out: torch.Tensor,
    routing: Routing,
    config: dict,
    *,
    b_is_kn: bool = False,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    swiglu: bool = False,
    h_out: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> torch.Tensor:
    """Launch the grouped GEMM into out (rows, N).

    a: (rows of A, K). b: (E, N, K), or (E, K, N) when b_is_kn; with swiglu (E, 2N, K);
    dense, or an Nf4Weight (4-bit, dequantized to a's dtype in the load).
    gather / scatter: (sorted rows,) int32 row maps; row_scale: (rows of out,).
    h_out: (sorted rows, 2N) receives (gate, up) when swiglu.
    lora: (L, LB, lb_is_rn): L (sorted rows, R) and LB (E, N or 2N, R), or (E, R, N) when
    lb_is_rn; adds L @ LB[e]^T to each row before the epilogue.
    """
    n_out, k_in = out.shape[1], a.shape[1]
    nf4 = isinstance(b, Nf4Weight)
    if nf4:  # the flat layout of the dense tensor it stands for
        b_strides = (b.shape[1] * b.shape[2], b.shape[2], 1)
        b_data, absmax, code, qblock = b.codes, b.absmax, nf4_code_table(a.device), b.blocksize
    else:
        b_strides = b.stride()
        b_data, absmax, code, qblock = b, out, out, 1
    stride_bn, stride_bk = (b_strides[2], b_strides[1]) if b_is_kn else (b_strides[1], b_strides[2])
    # 4-bit: where the dense rows have an even length, a byte never straddles two rows and
    # holds neighbours along k (1) or along n (2, B read transposed); else one value at a time (0).
    nf4_pairs = 0
    if nf4 and b.shape[2] % 2 == 0 and config["BLOCK_K"] >= 32 and config["BLOCK_N"] >= 32:  # dots of >= 16
        nf4_pairs = 2 if b_is_kn else 1
    # k-pairs whose k-tiles never straddle an absmax block: one scale per column and tile.
    scale_per_col = nf4_pairs == 1 and b_strides[0] % qblock == 0 and stride_bn % qblock == 0
    scale_per_col = scale_per_col and qblock % config["BLOCK_K"] == 0 and b_strides[0] < 2**31
    num_tiles_m = routing.tile_expert.numel()
    block_n = config["BLOCK_N"]
    num_tiles = num_tiles_m * triton.cdiv(n_out, block_n)
    if num_tiles == 0:
        return out
    persistent = config.get("PERSISTENT", 0)  # programs per SM, 0: one program per tile
    grid = (min(num_tiles, persistent * _num_sms(a.device)) if persistent else num_tiles,)
    dummy = routing.sort_idx  # stands in for absent optional pointers; never read
    lora_x, lora_b, rank, stride_le, stride_ln, stride_lr = out, out, 0, 0, 0, 0
    if lora is not None:
        lora_x, lora_b, lb_is_rn = lora
        rank, stride_le = lora_x.shape[1], lora_b.stride(0)
        stride_ln, stride_lr = (lora_b.stride(2), lora_b.stride(1)) if lb_is_rn else (lora_b.stride(1), lora_b.stride(2))
    b_desc, b_rows = _b_descriptor(b, config, b_is_kn, k_in) if not nf4 else (None, 0)
    _grouped_gemm_kernel[grid](
        a,
        b_data,
        b_desc,
        b_rows,
        absmax,
        code,
        out,
        h_out if h_out is not None else out,
        lora_x,
        lora_b,
        gather if gather is not None else dummy,
        scatter if scatter is not None else dummy,
        row_scale if row_scale is not None else out,
        routing.tile_expert,
        routing.tile_row_start,
        routing.expert_offsets,
        num_tiles_m,
        n_out,
        k_in,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        stride_bn,
        stride_bk,
        out.stride(0),
        out.stride(1),
        h_out.stride(0) if h_out is not None else 0,
        rank,
        lora_x.stride(0),
        stride_le,
        stride_ln,
        stride_lr,
        GATHER=gather is not None,
        SCATTER=scatter is not None,
        ROW_SCALE=row_scale is not None,
        SWIGLU=swiglu,
        SAVE_H=h_out is not None,
        IEEE=a.dtype == torch.float32,
        LORA=lora is not None,
        NF4=nf4,
        NF4_PAIRS=nf4_pairs,
        SCALE_PER_COL=scale_per_col,
        B_TMA=b_desc is not None,
        B_KN=b_is_kn,
        QBLOCK=qblock,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        BLOCK_M=routing.block_m,
        BLOCK_N=block_n,
        BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"],
        PERSISTENT=bool(persistent),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
