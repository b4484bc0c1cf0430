"""4-bit (NF4) expert weights: the format (nf4.py) and its storage on the model (experts.py)."""

from .experts import (
    Nf4Weight,
    dequantize_experts_4bit,
    expert_tensor,
    is_quantized,
    is_sharded_4bit,
    nf4_views,
    nf4_weight,
    quantize_experts_4bit,
)
from .nf4 import NF4_CODE, dequantize_nf4, nf4_code_table, quantize_nf4

__all__ = [
    "NF4_CODE",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_code_table",
    "Nf4Weight",
    "nf4_weight",
    "nf4_views",
    "is_quantized",
    "is_sharded_4bit",
    "expert_tensor",
    "quantize_experts_4bit",
    "dequantize_experts_4bit",
]
