"""qwen3-moe-fused: Triton kernels for the MoE blocks of the Qwen3 MoE family (Transformers, PEFT LoRA on the experts)."""

from . import layers
from .functional import grouped_gemm, moe_experts_forward, router_topk
from .layers import experts_forward
from .lora_convert import lora_from_per_expert, lora_to_per_expert
from .quant import dequantize_experts_4bit, quantize_experts_4bit
from .routing import Routing, route
from .shared_expert import join_shared_expert

__all__ = [
    "layers",
    "moe_experts_forward",
    "experts_forward",
    "grouped_gemm",
    "router_topk",
    "route",
    "Routing",
    "lora_to_per_expert",
    "lora_from_per_expert",
    "quantize_experts_4bit",
    "dequantize_experts_4bit",
    "join_shared_expert",
]
