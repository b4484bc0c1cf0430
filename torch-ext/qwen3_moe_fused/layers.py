"""Pure layers that replace Transformers' forward (kernels' layer rules: no __init__,
no methods but forward, helpers at module level)."""

import torch
from torch import nn

from .checks import check_experts_inputs
from .functional import moe_experts


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def _autocast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to the autocast dtype where autocast is on, as F.linear in the eager loop would."""
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [t.to(dtype) for t in tensors]
    return list(tensors)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Transformers ExpertsInterface function for Qwen3MoeExperts.

    self holds gate_up_proj (E, 2I, H), down_proj (E, H, I) and act_fn (SiLU).
    hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K) -> (T, H).
    Expert ids outside [0, E) (expert-parallel sentinels) contribute zero.
    """
    if not _is_silu(self.act_fn):
        raise ValueError(
            f"qwen3_moe_fused supports only the SiLU activation (hidden_act='silu'), got {type(self.act_fn).__name__}"
        )
    x, gate_up, down = _autocast(hidden_states, self.gate_up_proj, self.down_proj)
    check_experts_inputs(x, gate_up, down, top_k_index, top_k_weights)
    return moe_experts(x, gate_up, down, top_k_index, top_k_weights).to(hidden_states.dtype)


def _has_plain_expert_weights(experts: nn.Module) -> bool:
    # PEFT wraps the experts (base_layer); those keep their own forward until the LoRA path lands.
    return isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and not hasattr(experts, "base_layer")


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Replaces transformers' Qwen3MoeSparseMoeBlock.forward: router, then fused experts."""

    has_backward = True
    can_torch_compile = True

    gate: nn.Module
    experts: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        # Calling self.gate keeps the router-logit hooks (output_router_logits, aux_loss) working.
        _, routing_weights, selected_experts = self.gate(x)
        if _has_plain_expert_weights(self.experts):
            out = experts_forward(self.experts, x, selected_experts, routing_weights)
        else:
            out = self.experts(x, selected_experts, routing_weights)
        return out.reshape(batch, seq_len, hidden)
