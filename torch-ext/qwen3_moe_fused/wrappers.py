"""What PEFT puts around the experts, read by attribute (no PEFT import), so the layer
can run LoRA inside its own GEMMs instead of letting PEFT form W + s·B@A.

PEFT's `target_parameters` LoRA wraps the experts module in nested `ParamWrapper`s, one
per targeted tensor (`parameter_name`), each holding per-adapter `lora_A` (E·r, in) with
the expert index slowest, `lora_B` (out, E·r) with the expert index fastest, `scaling`,
and the adapter state (`active_adapters`, `disable_adapters`, `merged`).
"""

import torch
from torch import nn

from .quant import expert_tensor, nf4_weight


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
    if getattr(weight, "quant_type", None) == "nf4":
        # 4-bit: the dense shape of the whole tensor (all ranks, under expert parallel) and the dtype quantized
        (num_experts, out_features, in_features), dtype = weight.ds_shape, weight.quant_dtype
    else:
        (num_experts, out_features, in_features), dtype = weight.shape, weight.dtype
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


def parametrized_lora(module: nn.Module, name: str) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(weight, LoRA) of an experts tensor as the experts module's own forward sees it.

    Inside PEFT's ParamWrapper forward (the path of `experts_implementation`), the tensor is
    parametrized: with one adapter by a proxy holding the factors (`lhs` (E, out, r), `rhs`
    (E, r, in), `scaling`), which gives (the original tensor, (rhs, lhs * scaling)) for the
    fused GEMMs; with anything else PEFT has already formed W + delta, which is returned
    as it is (no LoRA). Without a parametrization: (the tensor, None). 4-bit tensors under
    PEFT's parametrization raise a ValueError (PEFT casts the factors to uint8).
    """
    # torch.nn.utils.parametrize keeps them as a submodule: read there, not through a getattr that
    # raises and catches AttributeError for every module without (most of them, on every forward).
    # Not every caller passes an nn.Module (shared_expert.py's stacked view).
    submodules = getattr(module, "_modules", None)
    parametrizations = (submodules.get("parametrizations") if submodules is not None
                        else getattr(module, "parametrizations", None))  # fmt: skip
    if parametrizations is None or name not in parametrizations:
        return expert_tensor(module, name), None
    chain = parametrizations[name]
    proxy = chain[0] if len(chain) == 1 else None
    weight = chain.original
    quantized = nf4_weight(weight)
    shape = weight.shape if quantized is None else quantized.shape
    if quantized is not None:
        # PEFT casts the factors to the parameter's dtype (uint8 here): their values are lost.
        raise ValueError(
            f"qwen3_moe_fused: PEFT LoRA on 4-bit experts ({name}) cannot run through experts_implementation "
            "(PEFT casts the LoRA factors to the 4-bit storage's dtype); kernelize the MoE blocks instead"
        )
    if proxy is not None and all(hasattr(proxy, attr) for attr in ("lhs", "rhs", "scaling")):
        lhs, rhs = proxy.lhs, proxy.rhs
        if lhs.dim() == 3 and lhs.shape[:2] == shape[:2] and rhs.shape[2] == shape[2]:
            if not weight.requires_grad:
                # Each PEFT forward registers the parametrization again, which set_()s the original
                # tensor to itself: a version bump that would fail the backward of an earlier forward
                # (two forwards, one backward). A frozen base needs no autograd: its .data does not
                # share the version counter.
                weight = weight.data
            return weight, (rhs, (lhs * proxy.scaling).contiguous())
    return getattr(module, name), None


def linear_lora(linear: nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None:
    """(weight (out, in), LoRA (A (R, in), B (out, R) with the scaling folded in) or None) of an
    nn.Linear without bias, plain or wrapped by PEFT's LoRA `Linear`; None when the module is
    anything else (a bias, dropout, DoRA, a quantized base): callers then run its forward."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    if type(base) is not nn.Linear or base.bias is not None:
        return None
    if base is linear:
        return base.weight, None
    if not hasattr(linear, "lora_A") or getattr(linear, "merged", False):
        return None
    if linear.disable_adapters:
        return base.weight, None
    if not is_supported(linear) or getattr(linear, "use_dora", {}) and any(linear.use_dora.values()):
        return None
    adapters = [name for name in linear.active_adapters if name in linear.lora_A]
    if not adapters:
        return base.weight, None
    factors_a = [linear.lora_A[name].weight for name in adapters]
    factors_b = [linear.lora_B[name].weight * linear.scaling[name] for name in adapters]
    return base.weight, (torch.cat(factors_a, dim=0), torch.cat(factors_b, dim=1))
