"""The shared expert of Qwen3-Next / Qwen3.5 MoE blocks as one more routed expert.

Those blocks add `sigmoid(shared_expert_gate(x)) * shared_expert(x)` to the routed
experts' output. When the shared expert's intermediate size equals the routed one's, it
is expert E of an (E+1)-expert stack that every token uses with routing weight
sigmoid(gate(x)): the grouped GEMMs then run it with the routed rows (one launch each
instead of three dense GEMMs, the activation and the weighting).

Copying the weights into an (E+1) stack on every forward would cost more than it saves,
so `join_shared_expert(model)` (the switch, off by default) stores them once in one
(E+1, 2I, H) and one (E+1, H, I) buffer: the experts' `gate_up_proj` / `down_proj` and
the shared expert's `gate_proj` / `up_proj` / `down_proj` weights stay the same
Parameters by name, each a view of its part. The layer sees that layout and passes the
whole stack to the kernels; the gradients are split back onto each Parameter. Anything
that reallocates one of them (`model.to(dtype)`, loading with `assign=True`) undoes the
join, and the layer computes the shared expert separately again (same math).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gate import call_gate
from .quant import is_quantized
from .wrappers import is_supported, linear_lora, lora_factors, unwrap_experts

SHARED_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _shared_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, n) for n in ("experts", "shared_expert", "shared_expert_gate"))]


def _base_linear(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def join_shared_expert(model: nn.Module) -> nn.Module:
    """Store every shared expert of `model` (Qwen3-Next / Qwen3.5 MoE, plain or PEFT-wrapped)
    as expert E of its block's routed stack, in place, so that the kernel layer runs it
    inside the routed GEMMs. Dense 16-bit / float32 weights only, and the shared expert's
    intermediate size must equal the routed one. Returns `model`."""
    blocks = _shared_blocks(model)
    if not blocks:
        raise ValueError(f"no MoE block with a shared expert in {type(model).__name__}")
    for block in blocks:
        experts, _ = unwrap_experts(block.experts)
        gate, up, down = (_base_linear(getattr(block.shared_expert, name)) for name in SHARED_LINEARS)
        gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
        if is_quantized(gate_up_proj) or is_quantized(down_proj):
            raise ValueError("join_shared_expert: the routed experts are 4-bit; join before quantize_experts_4bit "
                             "is not supported either (the shared expert stays 16-bit)")  # fmt: skip
        if not all(type(m) is nn.Linear and m.bias is None for m in (gate, up, down)):
            raise ValueError("join_shared_expert: the shared expert's projections must be nn.Linear without bias")
        if any(m.weight.dtype != gate_up_proj.dtype or m.weight.device != gate_up_proj.device for m in (gate, up, down)):
            raise ValueError("join_shared_expert: the shared expert must have the routed experts' dtype and device")
        num_experts, two_inter, hidden = gate_up_proj.shape
        inter = two_inter // 2
        if gate.weight.shape != (inter, hidden) or up.weight.shape != (inter, hidden) or down.weight.shape != (hidden, inter):
            raise ValueError(
                f"join_shared_expert: shared_expert_intermediate_size {gate.weight.shape[0]} must equal "
                f"moe_intermediate_size {inter}"
            )
        if _joined(gate_up_proj, gate.weight, up.weight) is not None and _joined(down_proj, down.weight) is not None:
            continue
        stacks = {}
        for name, routed, parts in (("gate_up_proj", gate_up_proj, (gate, up)), ("down_proj", down_proj, (down,))):
            stack = torch.empty((num_experts + 1, *routed.shape[1:]), dtype=routed.dtype, device=routed.device)
            stack[:num_experts] = routed
            stack[num_experts] = torch.cat([m.weight for m in parts])
            stacks[name] = stack
        for name, routed in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            setattr(experts, name, nn.Parameter(stacks[name][:num_experts], requires_grad=routed.requires_grad))
        for module, part in ((gate, stacks["gate_up_proj"][num_experts, :inter]),
                             (up, stacks["gate_up_proj"][num_experts, inter:]),
                             (down, stacks["down_proj"][num_experts])):  # fmt: skip
            module.weight = nn.Parameter(part, requires_grad=module.weight.requires_grad)
    return model


def _joined(routed: Tensor, *shared: Tensor) -> Tensor | None:
    """The (E+1, out, in) tensor over routed (E, out, in) followed in memory by the shared
    expert's rows `shared` (2-D, concatenated along rows), or None when they are not laid out so."""
    if not all(isinstance(t, Tensor) for t in (routed, *shared)) or routed.dim() != 3:
        return None
    if not routed.is_contiguous() or any(not t.is_contiguous() or t.dtype != routed.dtype for t in shared):
        return None
    if any(t.device != routed.device or t.untyped_storage().data_ptr() != routed.untyped_storage().data_ptr()
           for t in shared):  # fmt: skip
        return None
    offset = routed.storage_offset() + routed.numel()
    for t in shared:
        if t.storage_offset() != offset or t.shape[1] != routed.shape[2]:
            return None
        offset += t.numel()
    if offset != routed.storage_offset() + routed.numel() + routed[0].numel():
        return None
    stack = routed.new_empty(0)
    return stack.set_(routed.untyped_storage(), routed.storage_offset(), (routed.shape[0] + 1, *routed.shape[1:]))


class _JoinedStack(torch.autograd.Function):
    """The (E+1) stack as a differentiable function of its parts (no copy): its gradient is
    split back onto the routed tensor and each shared row block."""

    @staticmethod
    def forward(ctx, stack, routed, *shared):
        ctx.rows = [t.shape[0] for t in shared]
        return stack

    @staticmethod
    def backward(ctx, grad):
        num_experts = grad.shape[0] - 1
        return None, grad[:num_experts], *grad[num_experts].split(ctx.rows)


def _stack(routed: Tensor, *shared: Tensor) -> Tensor | None:
    stack = _joined(routed, *shared)
    if stack is None:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (routed, *shared)):
        return _JoinedStack.apply(stack, routed, *shared)
    return stack


def _with_shared_lora(routed, shared, num_experts: int, out_features: int, in_features: int, like: Tensor):
    """LoRA factors of the (E+1) stack: the routed experts' (A (E, R, in), B (E, out, R)) or
    none, and the shared expert's (A (r, in), B (out, r)) or none, both zero-padded to one rank."""
    if routed is None and shared is None:
        return None
    rank = max(routed[0].shape[1] if routed else 0, shared[0].shape[0] if shared else 0)
    if routed is None:
        routed = (like.new_zeros(num_experts, rank, in_features), like.new_zeros(num_experts, out_features, rank))
    if shared is None:
        shared = (like.new_zeros(rank, in_features), like.new_zeros(out_features, rank))
    routed_a = F.pad(routed[0], (0, 0, 0, rank - routed[0].shape[1]))
    routed_b = F.pad(routed[1], (0, rank - routed[1].shape[2]))
    shared_a = F.pad(shared[0], (0, 0, 0, rank - shared[0].shape[0]))[None]
    shared_b = F.pad(shared[1], (0, rank - shared[1].shape[1]))[None]
    return torch.cat([routed_a, shared_a.to(routed_a.dtype)]), torch.cat([routed_b, shared_b.to(routed_b.dtype)]).contiguous()


def _gate_up_lora(gate, up, inter: int, hidden: int):
    """The shared gate_proj / up_proj LoRA as one (A (rg+ru, H), B (2I, rg+ru)) (B block-diagonal)."""
    if gate is None and up is None:
        return None
    like = (gate or up)[0]
    gate = gate or (like.new_zeros(0, hidden), like.new_zeros(inter, 0))
    up = up or (like.new_zeros(0, hidden), like.new_zeros(inter, 0))
    rank_gate, rank_up = gate[0].shape[0], up[0].shape[0]
    lora_b = torch.cat([F.pad(gate[1], (0, rank_up)), F.pad(up[1], (rank_gate, 0))])
    return torch.cat([gate[0], up[0]]), lora_b


def fused_shared_inputs(block: nn.Module, x: Tensor):
    """For a block whose shared expert join_shared_expert stored after the routed experts:
    the arguments of layers.experts_forward that run routed + gated shared expert in one
    pass of the routed GEMMs, (experts, top_k_index (T, K+1), top_k_weights (T, K+1),
    gate_up_lora, down_lora). None otherwise, or when PEFT or anything else wraps the
    modules in a way this path does not model (the caller then computes them apart)."""
    experts, wrappers = unwrap_experts(block.experts)
    if not set(wrappers) <= {"gate_up_proj", "down_proj"} or not all(map(is_supported, wrappers.values())):
        return None
    linears = [linear_lora(getattr(block.shared_expert, name)) for name in SHARED_LINEARS]
    if any(entry is None for entry in linears):
        return None
    (gate_w, gate_lora), (up_w, up_lora), (down_w, down_lora) = linears
    gate_up = _stack(experts.gate_up_proj, gate_w, up_w)
    down = _stack(experts.down_proj, down_w)
    if gate_up is None or down is None:
        return None
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    gate_up_lora = _with_shared_lora(
        lora_factors(wrappers.get("gate_up_proj"), experts.gate_up_proj),
        _gate_up_lora(gate_lora, up_lora, two_inter // 2, hidden), num_experts, two_inter, hidden, x,
    )  # fmt: skip
    down_lora = _with_shared_lora(
        lora_factors(wrappers.get("down_proj"), experts.down_proj), down_lora, num_experts, hidden, two_inter // 2, x
    )  # fmt: skip

    _, routing_weights, selected_experts = call_gate(block.gate, x)  # the router's hooks record its logits
    shared_weight = torch.sigmoid(block.shared_expert_gate(x))  # (T, 1)
    top_k_index = torch.cat([selected_experts, selected_experts.new_full((x.shape[0], 1), num_experts)], dim=1)
    top_k_weights = torch.cat([routing_weights, shared_weight.to(routing_weights.dtype)], dim=1)
    return _StackView(gate_up, down, experts.act_fn), top_k_index, top_k_weights, gate_up_lora, down_lora


class _StackView:
    """What experts_forward reads of an experts module, over the (E+1) stacks."""

    def __init__(self, gate_up_proj, down_proj, act_fn):
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
