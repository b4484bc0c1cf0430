"""Argument checks of the public functions: clear errors instead of wrong answers."""

import torch

from .quant import nf4_weight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _tensor(name: str, value, ndim: int, dtypes) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")


def _same_device(**tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")


def values_checkable(t: torch.Tensor) -> bool:
    """Value checks read data back to the host: skip them while compiling or capturing a graph."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_expert_ids(top_k_index: torch.Tensor, num_experts: int) -> None:
    if top_k_index.numel() == 0 or not values_checkable(top_k_index):
        return
    lo, hi = torch.aminmax(top_k_index)
    lo, hi = torch.stack([lo, hi]).tolist()  # one synchronization
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"top_k_index holds expert ids in [{lo}, {hi}], outside [0, {num_experts})")


def weight_like(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What checks see of an expert weight: itself, or for a 4-bit one a zero-memory stand-in
    with its dense shape, in dtype (the kernels dequantize it to the input's dtype)."""
    quantized = nf4_weight(weight)
    if quantized is None:
        return weight
    return torch.empty((), dtype=dtype, device=weight.device).expand(quantized.shape)


def check_experts_inputs(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights) -> None:
    """Shapes: hidden_states (T, H), gate_up_proj (E, 2I, H), down_proj (E, H, I),
    top_k_index (T, K) int, top_k_weights (T, K) float."""
    _tensor("hidden_states", hidden_states, 2, FLOAT_DTYPES)
    _tensor("gate_up_proj", gate_up_proj, 3, FLOAT_DTYPES)
    _tensor("down_proj", down_proj, 3, FLOAT_DTYPES)
    _tensor("top_k_index", top_k_index, 2, INDEX_DTYPES)
    _tensor("top_k_weights", top_k_weights, 2, FLOAT_DTYPES)
    _same_device(
        hidden_states=hidden_states,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
        top_k_index=top_k_index,
        top_k_weights=top_k_weights,
    )
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != hidden_states.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but hidden_states has {hidden_states.dtype}")
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, gu_hidden = gate_up_proj.shape
    if gu_hidden != hidden or two_inter % 2:
        raise ValueError(
            f"gate_up_proj must be (E, 2I, H) with H = {hidden}, got shape {tuple(gate_up_proj.shape)}"
        )
    if tuple(down_proj.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"down_proj must be (E, H, I) = {(num_experts, hidden, two_inter // 2)}, got {tuple(down_proj.shape)}"
        )
    if top_k_index.shape[0] != num_tokens:
        raise ValueError(f"top_k_index must be (T, K) with T = {num_tokens}, got {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, "
            f"got {tuple(top_k_weights.shape)}"
        )


def check_grouped_gemm_inputs(x, weight, m_sizes) -> None:
    """Shapes: x (M, K), weight (E, N, K), m_sizes (E,) int summing to M."""
    _tensor("x", x, 2, FLOAT_DTYPES)
    _tensor("weight", weight, 3, FLOAT_DTYPES)
    _tensor("m_sizes", m_sizes, 1, INDEX_DTYPES)
    _same_device(x=x, weight=weight, m_sizes=m_sizes)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    if weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight must be (E, N, K) with K = {x.shape[1]}, got {tuple(weight.shape)}")
    if m_sizes.shape[0] != weight.shape[0]:
        raise ValueError(f"m_sizes must be (E,) with E = {weight.shape[0]}, got {tuple(m_sizes.shape)}")
    if m_sizes.numel() and values_checkable(m_sizes):
        lo, total = int(m_sizes.min()), int(m_sizes.sum())
        if lo < 0 or total != x.shape[0]:
            raise ValueError(f"m_sizes must be >= 0 and sum to M = {x.shape[0]}, got min {lo} and sum {total}")


def check_lora(name: str, lora, weight: torch.Tensor) -> None:
    """lora: None or (A (E, R, in), B (E, out, R)) for a weight (E, out, in)."""
    if lora is None:
        return
    if not isinstance(lora, (tuple, list)) or len(lora) != 2:
        raise TypeError(f"{name} must be None or a pair (A, B) of tensors")
    lora_a, lora_b = lora
    _tensor(f"{name}[0]", lora_a, 3, FLOAT_DTYPES)
    _tensor(f"{name}[1]", lora_b, 3, FLOAT_DTYPES)
    _same_device(weight=weight, **{f"{name}[0]": lora_a, f"{name}[1]": lora_b})
    num_experts, out_features, in_features = weight.shape
    rank = lora_a.shape[1]
    if tuple(lora_a.shape) != (num_experts, rank, in_features) or tuple(lora_b.shape) != (num_experts, out_features, rank):
        raise ValueError(
            f"{name} must be A (E, R, in) = ({num_experts}, R, {in_features}) and B (E, out, R) = "
            f"({num_experts}, {out_features}, R), got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    for i, factor in enumerate(lora):
        if factor.dtype != weight.dtype:
            raise TypeError(f"{name}[{i}] has dtype {factor.dtype} but the expert weight has {weight.dtype}")


def check_router_inputs(router_logits, top_k) -> None:
    """router_logits (T, E) float; top_k an int in [1, E]."""
    _tensor("router_logits", router_logits, 2, FLOAT_DTYPES)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E] = [1, {num_experts}], got {top_k}")
