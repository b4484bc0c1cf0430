"""Grouped GEMM kernels over a routing: forward / dX (forward.py) and dW (backward_dw.py)."""

from .backward_dw import grouped_dw_launch
from .forward import dswiglu_gemm_launch, grouped_gemm_launch, swiglu_gemm_launch

__all__ = ["dswiglu_gemm_launch", "grouped_dw_launch", "grouped_gemm_launch", "swiglu_gemm_launch"]
