"""What PEFT puts around the experts, read by attribute (no PEFT import), so the layer
can run LoRA inside its own GEMMs instead of letting PEFT form W + s·B@A.

PEFT's `target_parameters` LoRA wraps the experts module in nested `ParamWrapper`s, one
per targeted tensor (`parameter_name`), each holding per-adapter `lora_A` (E·r, in) with
the expert index slowest, `lora_B` (out, E·r) with the expert index fastest, `scaling`,
and the adapter state (`active_adapters`, `disable_adapters`, `merged`).
"""

import torch
from torch import nn

from .quant import nf4_weight


def unwrap_experts(experts: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """-> (the innermost experts module, {parameter name: PEFT wrapper})."""
    wrappers = {}
    module = experts
    while all(hasattr(module, name) for name in ("base_layer", "parameter_name", "lora_A", "lora_B")):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def is_supported(wrapper: nn.Module) -> bool:
    """Plain LoRA on an (E, out, in) tensor: what the fused path computes."""
    identity_dropout = all(isinstance(d, nn.Identity) for d in wrapper.lora_dropout.values())
    no_bias = not any(getattr(wrapper, "lora_bias", {}).values())
    no_variant = not getattr(wrapper, "lora_variant", {})
    transposed = getattr(wrapper.get_base_layer(), "is_transposed", False)
    return identity_dropout and no_bias and no_variant and not transposed


def lora_factors(wrapper: nn.Module | None, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LoRA of the active adapters on weight (E, out, in) as (A (E, R, in), B (E, out, R)),
    the scaling folded into B and several adapters stacked along R; None when LoRA adds
    nothing (no wrapper, adapters disabled or merged into the weight, none active)."""
    if wrapper is None:
        return None
    if wrapper.disable_adapters:
        if wrapper.merged:  # as PEFT's own forward does
            wrapper.unmerge()
        return None
    adapters = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if wrapper.merged or not adapters:
        return None
    quantized = nf4_weight(weight)  # 4-bit: its dense shape and the dtype it was quantized from
    num_experts, out_features, in_features = weight.shape if quantized is None else quantized.shape
    dtype = weight.dtype if quantized is None else quantized.dtype
    factors_a, factors_b = [], []
    for name in adapters:
        lora_a = wrapper.lora_A[name].weight
        rank = lora_a.shape[0] // num_experts
        factors_a.append(lora_a.view(num_experts, rank, in_features))
        lora_b = wrapper.lora_B[name].weight.view(out_features, rank, num_experts)
        factors_b.append(lora_b.permute(2, 0, 1) * wrapper.scaling[name])
    if len(adapters) > 1:
        factors_a, factors_b = [torch.cat(factors_a, dim=1)], [torch.cat(factors_b, dim=2)]
    # Contiguous B: the GEMM epilogue reads (R, BLOCK_N) tiles of it per expert.
    return factors_a[0].to(dtype), factors_b[0].to(dtype, memory_format=torch.contiguous_format)
