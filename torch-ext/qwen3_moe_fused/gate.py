"""The block's router, block.gate, with its top-k softmax in our kernels (router.py).

Transformers' Qwen3 MoE routers are a linear layer, then softmax, top-k, normalization and a
cast: five kernels each way. The layers call the gate as a module, so that its hooks run
(Transformers records router_logits with one) and so that a forward somebody installed on
the gate instance (Transformers' expert-parallel router plan, accelerate's hooks, another
kernel) stays what runs. Where the gate is one of Transformers' router classes with its
class forward, the call runs `_gate_forward` instead, which computes the same outputs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import tuning
from .functional import router_topk

# Transformers 5.22.2's router classes -> whether they normalize the top-k probabilities
# (None: as their norm_topk_prob says; True: always).
ROUTERS = {
    "Qwen3MoeTopKRouter": None,
    "Qwen3NextTopKRouter": None,
    "Qwen3OmniMoeThinkerTextTopKRouter": None,
    "Qwen3_5MoeTopKRouter": True,
    "Qwen3VLMoeTextTopKRouter": True,
}


def _gate_forward(gate: nn.Module, hidden_states: torch.Tensor):
    """Transformers' router forward: -> router_logits (T, E), router_scores (T, K), router_indices (T, K)."""
    x = hidden_states.reshape(-1, gate.hidden_dim)
    router_logits = F.linear(x, gate.weight)
    normalize = ROUTERS[type(gate).__name__]
    normalize = gate.norm_topk_prob if normalize is None else normalize
    router_scores, router_indices = router_topk(router_logits, gate.top_k, normalize=normalize)
    return router_logits, router_scores, router_indices


def _runs_class_forward(gate: nn.Module) -> bool:
    """A Transformers router of ROUTERS whose forward is its class's own."""
    cls = type(gate)
    return (
        cls.__name__ in ROUTERS
        and cls.forward.__module__.startswith("transformers.models.")
        and "forward" not in vars(gate)
    )


# nn.Module.__call__'s own test for global hooks (torch 2.11 and 2.13); without it, assume some.
_any_global_hook = getattr(torch.nn.modules.module, "_has_any_global_hook", lambda: True)


def _calls_hooks(gate: nn.Module) -> bool:
    """Whether gate(x) would run more than its forward: hooks of the gate or global ones, tracing."""
    own = gate._forward_hooks or gate._forward_pre_hooks or gate._backward_hooks or gate._backward_pre_hooks
    return bool(own) or bool(_any_global_hook()) or torch._C._get_tracing_state() is not None


def call_gate(gate: nn.Module, x: torch.Tensor):
    """gate(x), with _gate_forward as the forward for this call where the gate runs its class's
    own forward (tuning.FUSED_ROUTER; not while compiling: there Inductor fuses the router)."""
    if not tuning.FUSED_ROUTER or torch.compiler.is_compiling() or not _runs_class_forward(gate):
        return gate(x)
    if not _calls_hooks(gate):  # what gate(x) would run, without nn.Module's attribute set and call
        return _gate_forward(gate, x)
    # An instance attribute for the length of the call (nn.Module.__call__ reads self.forward):
    # one module called from two threads at once would see each other's.
    gate.forward = _gate_forward.__get__(gate)
    try:
        return gate(x)
    finally:
        del gate.forward
