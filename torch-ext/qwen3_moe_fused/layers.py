"""Pure layers that replace Transformers' forward (kernels' layer rules: no __init__,
no methods but forward, helpers at module level)."""

import torch
from torch import nn

from .checks import check_experts_inputs, check_lora, weight_like
from .functional import moe_experts
from .gate import call_gate
from .parallel import call_sharded_experts, is_dtensor, is_sharded_experts, take_lora
from .quant import expert_tensor, is_quantized
from .quant.experts import EXPERT_TENSORS
from .shared_expert import fused_shared_inputs
from .wrappers import is_supported, lora_factors, parametrized_lora, unwrap_experts


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def _autocast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to the autocast dtype where autocast is on, as F.linear in the eager loop would
    (4-bit weights are dequantized to the input's dtype by the kernels)."""
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [t if is_quantized(t) else t.to(dtype) for t in tensors]
    return list(tensors)


def _check_expert_tensors(self: nn.Module) -> None:
    """Clear errors for expert tensors that a distributed engine left in a form the kernels cannot read."""
    for name in ("gate_up_proj", "down_proj"):
        weight = expert_tensor(self, name)
        if is_dtensor(weight):
            raise TypeError(
                f"qwen3_moe_fused: experts.{name} is a DTensor: run sharded experts through the forward "
                "Transformers' parallelism installs on them (experts_implementation='qwen3_moe_fused')"
            )
        if weight.dtype == torch.uint8 and not is_quantized(weight):
            raise TypeError(
                f"qwen3_moe_fused: experts.{name} is uint8 without its 4-bit attributes: FSDP2 (fully_shard) "
                "re-creates the parameters it shards; keep the 4-bit expert tensors out of it with "
                "fully_shard(..., ignored_params={p for p in model.parameters() if p.dtype == torch.uint8})"
            )


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    gate_up_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    down_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Transformers ExpertsInterface function for the Qwen3 MoE family's experts classes
    (Qwen3MoeExperts, Qwen3NextExperts, Qwen3_5MoeExperts, Qwen3VLMoeTextExperts,
    Qwen3OmniMoeThinkerTextExperts).

    self holds gate_up_proj (E, 2I, H), down_proj (E, H, I) (dense, or both 4-bit from
    quantize_experts_4bit) and act_fn (SiLU).
    hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K) -> (T, H).
    Expert ids outside [0, E) (expert-parallel sentinels) contribute zero.
    gate_up_lora / down_lora: optional (A (E, R, in), B (E, out, R)), scaling folded into B.
    """
    handed = take_lora(self)  # LoRA cut to this rank's shard, under Transformers' parallel forward
    if handed is not None and gate_up_lora is None and down_lora is None:
        gate_up_lora, down_lora = handed
    _check_expert_tensors(self)
    return _checked_experts_forward(self, hidden_states, top_k_index, top_k_weights, gate_up_lora, down_lora)


def _checked_experts_forward(self, hidden_states, top_k_index, top_k_weights, gate_up_lora, down_lora):
    """experts_forward once the expert tensors passed _check_expert_tensors."""
    if not _is_silu(self.act_fn):
        raise ValueError(
            f"qwen3_moe_fused supports only the SiLU activation (hidden_act='silu'), got {type(self.act_fn).__name__}"
        )
    if gate_up_lora is None and down_lora is None:
        # Through Transformers' experts interface inside PEFT's ParamWrapper forward, the tensors
        # are parametrized as W + s·B@A: take the factors instead of PEFT's folded weight.
        (gate_up, gate_up_lora), (down, down_lora) = (parametrized_lora(self, name) for name in EXPERT_TENSORS)
    else:
        gate_up, down = (expert_tensor(self, name) for name in EXPERT_TENSORS)
    x, gate_up, down = _autocast(hidden_states, gate_up, down)
    gate_up_lora, down_lora = (None if lora is None else tuple(_autocast(*lora)) for lora in (gate_up_lora, down_lora))
    gate_up_like, down_like = weight_like(gate_up, x.dtype), weight_like(down, x.dtype)
    check_experts_inputs(x, gate_up_like, down_like, top_k_index, top_k_weights)
    check_lora("gate_up_lora", gate_up_lora, gate_up_like)
    check_lora("down_lora", down_lora, down_like)
    out = moe_experts(x, gate_up, down, top_k_index, top_k_weights, gate_up_lora, down_lora)
    return out.to(hidden_states.dtype)


def _fused_experts(experts: nn.Module, x, top_k_index, top_k_weights):
    """Our experts forward, with PEFT's LoRA on the expert tensors computed inside the GEMMs;
    None when the experts are wrapped in something this path does not model."""
    base, wrappers = unwrap_experts(experts)
    if not isinstance(getattr(base, "gate_up_proj", None), torch.Tensor) or hasattr(base, "base_layer"):
        return None
    if not set(wrappers) <= {"gate_up_proj", "down_proj"} or not all(map(is_supported, wrappers.values())):
        return None
    sharded = is_sharded_experts(base)
    if not sharded:  # before the LoRA factors are read against the expert tensors' shapes
        _check_expert_tensors(base)
    gate_up_lora = lora_factors(wrappers.get("gate_up_proj"), base.gate_up_proj)
    down_lora = lora_factors(wrappers.get("down_proj"), base.down_proj)
    if sharded:  # Transformers' expert / tensor parallel: through its forward
        return call_sharded_experts(base, x, top_k_index, top_k_weights, gate_up_lora, down_lora)
    return _checked_experts_forward(base, x, top_k_index, top_k_weights, gate_up_lora, down_lora)


def _routed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Router, then the routed experts: (T, H) -> (T, H)."""
    # Calling block.gate keeps the router-logit hooks (output_router_logits, aux_loss) working.
    _, routing_weights, selected_experts = call_gate(block.gate, x)
    out = _fused_experts(block.experts, x, selected_experts, routing_weights)
    if out is None:  # experts wrapped in something else: their own forward
        out = block.experts(x, selected_experts, routing_weights)
    return out


def _shared_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Routed experts plus the shared expert weighted by sigmoid(shared_expert_gate(x)), as
    Transformers computes it; with join_shared_expert the shared expert runs inside the
    routed GEMMs as one more expert."""
    fused = fused_shared_inputs(block, x)
    if fused is not None:
        experts, top_k_index, top_k_weights, gate_up_lora, down_lora = fused
        return experts_forward(experts, x, top_k_index, top_k_weights, gate_up_lora=gate_up_lora, down_lora=down_lora)
    shared = block.shared_expert(x)  # its own modules: PEFT LoRA or 4-bit linears on it keep working
    routed = _routed_forward(block, x)
    return routed + torch.sigmoid(block.shared_expert_gate(x)) * shared


def _block_forward(block: nn.Module, hidden_states: torch.Tensor, shared: bool) -> torch.Tensor:
    batch, seq_len, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    out = _shared_forward(block, x) if shared else _routed_forward(block, x)
    return out.reshape(batch, seq_len, hidden)


# One layer per Transformers block class of the Qwen3 MoE family. They differ only in
# whether the block has a shared expert; the router (block.gate) is the module's own.


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Replaces transformers' Qwen3MoeSparseMoeBlock.forward: router, then fused experts."""

    has_backward = True
    can_torch_compile = True

    gate: nn.Module
    experts: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _block_forward(self, hidden_states, shared=False)


class Qwen3VLMoeTextSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    """Replaces transformers' Qwen3VLMoeTextSparseMoeBlock.forward (Qwen3-VL MoE text model)."""


class Qwen3OmniMoeThinkerTextSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    """Replaces transformers' Qwen3OmniMoeThinkerTextSparseMoeBlock.forward (Qwen3-Omni thinker)."""


class Qwen3NextSparseMoeBlock(nn.Module):
    """Replaces transformers' Qwen3NextSparseMoeBlock.forward: router, fused routed experts,
    and the shared expert with its sigmoid gate."""

    has_backward = True
    can_torch_compile = True

    gate: nn.Module
    experts: nn.Module
    shared_expert: nn.Module
    shared_expert_gate: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _block_forward(self, hidden_states, shared=True)


class Qwen3_5MoeSparseMoeBlock(Qwen3NextSparseMoeBlock):
    """Replaces transformers' Qwen3_5MoeSparseMoeBlock.forward (Qwen3.5 / Qwen3.6 MoE)."""
