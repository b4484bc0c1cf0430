"""The Qwen3 MoE router's top-k softmax, forward and backward, one kernel each.

From the router logits l (T, E) of a token, Transformers' routers compute
    p = softmax(l) in float32,  (v, ids) = topk(p, K),  w = v / sum(v) (when normalizing),
and hand the experts w rounded to l's dtype. The forward kernel does that for a tile of
tokens in registers (torch runs five kernels and keeps p in memory); the backward kernel
gives dl from dw, recomputing p from the logits instead of saving it:
    dv = (dw - <dw, w>) / sum(v)   (dv = dw without normalizing)
    dl = p * (dp - <dv, v>)        where dp is dv scattered to the selected experts
                                   (<dv, v> = 0 when normalizing, <dw, v> without).
Ties in p go to the lower expert id (torch.topk leaves their order unspecified).
"""

import torch
import triton
import triton.language as tl

from .sizes import cdiv, next_power_of_2
from .launch import launcher

# The largest expert count a program holds in registers; BLOCK_T * BLOCK_E <= _TILE elements a
# program: at 2048 neither kernel spills registers on sm_90 for E 60 to 4096 (ptxas -v, triton
# 3.6); at 8192 the backward spilled (E 128: 296 bytes).
MAX_EXPERTS = 4096
_TILE = 2048


@triton.jit
def _token_tile(logits_ptr, stride_lt, num_tokens, num_experts, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tokens and experts, their masks, and softmax over the experts of each
    token's logits in float32 (BLOCK_T, BLOCK_E), 0 in the padding."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < num_experts
    mask = token_mask[:, None] & expert_mask[None, :]
    offs = tokens.to(tl.int64)[:, None] * stride_lt + experts[None, :]
    logits = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    logits = tl.where(token_mask[:, None], logits, 0.0)  # padding tokens: finite, never stored
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = shifted / tl.sum(shifted, axis=1)[:, None]
    return tokens, token_mask, experts, expert_mask, probs


@launcher
@triton.jit
def _router_topk_kernel(
    logits_ptr,  # (T, E) through its row stride
    scores_ptr,  # (T, K) out, in the logits' dtype
    indices_ptr,  # (T, K) out, int64
    num_tokens,
    num_experts,
    stride_lt,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens, token_mask, experts, expert_mask, probs = _token_tile(
        logits_ptr, stride_lt, num_tokens, num_experts, BLOCK_T, BLOCK_E
    )
    # Selection: K rounds of (largest p, lowest id among equals); a chosen expert drops to -1.
    # NaN ranks above every probability, as in torch.topk, and stays the value of its slot.
    remaining = tl.where(expert_mask[None, :], tl.where(probs == probs, probs, 2.0), -1.0)
    slots = tl.arange(0, BLOCK_K)
    values = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        best_id = tl.min(tl.where(remaining == best[:, None], experts[None, :], BLOCK_E), axis=1)
        value = tl.where(best == 2.0, float("nan"), best)  # probabilities are at most 1
        values = tl.where(slots[None, :] == k, value[:, None], values)
        ids = tl.where(slots[None, :] == k, best_id[:, None], ids)
        remaining = tl.where(experts[None, :] == best_id[:, None], -1.0, remaining)
    if NORMALIZE:
        values = values / tl.sum(values, axis=1)[:, None]
    out = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask = token_mask[:, None] & (slots < TOP_K)[None, :]
    tl.store(scores_ptr + out, values.to(scores_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + out, ids.to(tl.int64), mask=mask)


@launcher
@triton.jit
def _router_topk_backward_kernel(
    logits_ptr,  # (T, E) through its row stride
    indices_ptr,  # (T, K) int64, from the forward
    dscores_ptr,  # (T, K) contiguous
    dlogits_ptr,  # (T, E) out, contiguous, in the logits' dtype
    num_tokens,
    num_experts,
    stride_lt,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    tokens, token_mask, experts, expert_mask, probs = _token_tile(
        logits_ptr, stride_lt, num_tokens, num_experts, BLOCK_T, BLOCK_E
    )
    slot_ptrs = tokens.to(tl.int64) * TOP_K
    # First pass: sum(v) and <dw, v>, with v the selected probabilities.
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        ids = tl.load(indices_ptr + slot_ptrs + k, mask=token_mask, other=-1)
        dw = tl.load(dscores_ptr + slot_ptrs + k, mask=token_mask, other=0.0).to(tl.float32)
        v = tl.sum(tl.where(experts[None, :] == ids[:, None], probs, 0.0), axis=1)
        total += v
        dot += dw * v
    total = tl.where(token_mask, total, 1.0)  # padding tokens select nothing
    # Second pass: dv per slot, scattered to its expert (dp).
    dp = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        ids = tl.load(indices_ptr + slot_ptrs + k, mask=token_mask, other=-1)
        dv = tl.load(dscores_ptr + slot_ptrs + k, mask=token_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            # w = v / S: dv = dw / S - <dw, v> / S^2
            dv = (dv - dot / total) / total
        dp += tl.where(experts[None, :] == ids[:, None], dv[:, None], 0.0)
    # <dv, v>: sum_k v_k (dw_k - <dw, v> / S) / S = 0 with the normalization, else <dw, v>.
    if NORMALIZE:
        dlogits = probs * dp
    else:
        dlogits = probs * (dp - dot[:, None])
    offs = tokens.to(tl.int64)[:, None] * num_experts + experts[None, :]
    mask = token_mask[:, None] & expert_mask[None, :]
    tl.store(dlogits_ptr + offs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): a program's tokens and its padded expert count."""
    block_e = next_power_of_2(num_experts)
    return max(1, min(64, _TILE // block_e)), block_e


def router_topk_launch(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E), unit stride along E -> scores (T, K) in logits' dtype, indices (T, K) int64."""
    num_tokens, num_experts = logits.shape
    scores = logits.new_empty(num_tokens, top_k)
    indices = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return scores, indices
    block_t, block_e = _blocks(num_experts)
    _router_topk_kernel[(cdiv(num_tokens, block_t),)](
        logits, scores, indices, num_tokens, num_experts, logits.stride(0),
        TOP_K=top_k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_power_of_2(top_k),
    )  # fmt: skip
    return scores, indices


def router_topk_backward_launch(
    logits: torch.Tensor, indices: torch.Tensor, dscores: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """dlogits (T, E) in logits' dtype from dscores (T, K), contiguous."""
    num_tokens, num_experts = logits.shape
    dlogits = torch.empty(num_tokens, num_experts, dtype=logits.dtype, device=logits.device)
    if num_tokens == 0:
        return dlogits
    block_t, block_e = _blocks(num_experts)
    _router_topk_backward_kernel[(cdiv(num_tokens, block_t),)](
        logits, indices, dscores, dlogits, num_tokens, num_experts, logits.stride(0),
        TOP_K=indices.shape[1], NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return dlogits
