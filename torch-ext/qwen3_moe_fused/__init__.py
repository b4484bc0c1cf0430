"""qwen3-moe-fused: Triton kernels for the Qwen3 MoE block (Transformers + PEFT + bitsandbytes)."""

from . import layers
from .functional import grouped_gemm, moe_experts_forward
from .layers import experts_forward
from .routing import Routing, route

__all__ = ["layers", "moe_experts_forward", "experts_forward", "grouped_gemm", "route", "Routing"]
