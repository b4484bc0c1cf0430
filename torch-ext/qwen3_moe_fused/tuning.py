"""Tile configurations for the grouped GEMMs: heuristic defaults by rows per expert."""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_m_for(num_rows: int, num_experts: int) -> int:
    """Row tile of the routed GEMMs: small for decode, large for training batches."""
    if INTERPRET:
        return 16
    rows_per_expert = num_rows / max(num_experts, 1)
    for block_m in (16, 32, 64):
        if rows_per_expert <= block_m:
            return block_m
    return 128


def gemm_config(block_m: int, swiglu: bool) -> dict:
    """Config of the routed GEMM (grouped_gemm/forward.py) for a given row tile."""
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    # SwiGLU keeps two accumulators: halve the column tile to keep registers in budget.
    block_n = 64 if swiglu and block_m >= 64 else 128
    if block_m <= 32:
        block_n = 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=num_warps, num_stages=3)


def dw_config() -> dict:
    """Config of the weight-gradient GEMM (grouped_gemm/backward_dw.py)."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def rows_block() -> int:
    """Rows per program of the elementwise SwiGLU backward."""
    return 16 if INTERPRET else 8
