"""Grouped GEMM kernels over a routing: forward / dX (forward.py) and dW (backward_dw.py)."""

from .backward_dw import grouped_dw_launch
from .forward import SwigluGrad, grouped_gemm_launch

__all__ = ["SwigluGrad", "grouped_dw_launch", "grouped_gemm_launch"]
