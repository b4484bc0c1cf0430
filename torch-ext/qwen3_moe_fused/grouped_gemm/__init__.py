"""Grouped GEMM kernels over a routing: forward / dX (forward.py) and dW (backward_dw.py)."""

from .backward_dw import grouped_dw_launch
from .forward import grouped_gemm_launch, swiglu_gemm_launch

__all__ = ["grouped_dw_launch", "grouped_gemm_launch", "swiglu_gemm_launch"]
