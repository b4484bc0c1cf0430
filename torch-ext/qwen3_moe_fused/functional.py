"""torch.library custom ops tying routing and kernels together, with autograd and fake
implementations so torch.compile traces the MoE block without graph breaks.

Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; other
tensors take a PyTorch path over the same routing.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import add_op_namespace_prefix
from .activation import swiglu_backward_launch
from .checks import check_expert_ids, check_experts_inputs, check_grouped_gemm_inputs
from .combine import combine_launch
from .grouped_gemm import grouped_dw_launch, grouped_gemm_launch
from .routing import Routing, max_tiles, route, route_from_counts
from .tuning import INTERPRET, block_m_for, dw_config, gemm_config, rows_block


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or INTERPRET


def _routing(tensors: list[Tensor], block_m: int) -> Routing:
    return Routing(*tensors, block_m)


# ---------------------------------------------------------------- experts forward / backward


def _experts_torch(x, gate_up, down, top_k_index, weights_flat, r: Routing, save_h: bool):
    """PyTorch path over the same routing (devices without Triton); differentiable."""
    num_tokens, hidden = x.shape
    offsets = r.expert_offsets.tolist()
    rows = x.new_zeros(top_k_index.numel(), hidden)
    h = x.new_empty(top_k_index.numel(), gate_up.shape[1]) if save_h else x.new_empty(0)
    for e in range(gate_up.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        he = F.linear(x[r.sorted_token[start:end].long()], gate_up[e])
        if save_h:
            h[start:end] = he.detach()
        gate, up = he.chunk(2, dim=-1)
        flat = r.sort_idx[start:end].long()
        rows = rows.index_put((flat,), F.linear(F.silu(gate) * up, down[e]) * weights_flat[flat, None])
    return rows.view(num_tokens, -1, hidden).sum(1), h


@torch.library.custom_op(add_op_namespace_prefix("experts_fwd"), mutates_args=())
def experts_fwd_op(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    block_m: int,
    save_h: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out (T, H); the pre-activation h (T*K, 2I) in sorted order when save_h (else empty);
    the routing (sort_idx, sorted_token, expert_offsets, tile_expert, tile_row_start) that
    the backward reuses."""
    r = route(top_k_index, gate_up.shape[0], block_m, _use_triton(x))
    weights_flat = top_k_weights.reshape(-1)
    if not _use_triton(x):
        out, h = _experts_torch(x, gate_up, down, top_k_index, weights_flat, r, save_h)
        return out, h, *r[:5]
    num_tokens, hidden = x.shape
    num_rows, inter = top_k_index.numel(), down.shape[2]
    act = x.new_empty(num_rows, inter)
    h = x.new_empty(num_rows, 2 * inter) if save_h else x.new_empty(0)
    grouped_gemm_launch(
        x, gate_up, act, r, gemm_config("gate_up", inter, hidden, block_m, x.device),
        gather=r.sorted_token, swiglu=True, h_out=h if save_h else None,
    )  # fmt: skip
    rows = x.new_empty(num_rows, hidden)
    grouped_gemm_launch(
        act, down, rows, r, gemm_config("down", hidden, inter, block_m, x.device),
        scatter=r.sort_idx, row_scale=weights_flat,
    )  # fmt: skip
    out = x.new_empty(num_tokens, hidden)
    combine_launch(rows, top_k_index, gate_up.shape[0], out)
    return out, h, *r[:5]


@experts_fwd_op.register_fake
def _(x, gate_up, down, top_k_index, top_k_weights, block_m, save_h):
    num_rows, num_experts = top_k_index.numel(), gate_up.shape[0]
    h = x.new_empty(num_rows, gate_up.shape[1]) if save_h else x.new_empty(0)
    n_tiles = max_tiles(num_rows, num_experts, block_m)
    index = [x.new_empty(n, dtype=torch.int32) for n in (num_rows, num_rows, num_experts + 1, n_tiles, n_tiles)]
    return torch.empty_like(x), h, *index


@torch.library.custom_op(add_op_namespace_prefix("experts_bwd"), mutates_args=())
def experts_bwd_op(
    grad_out: Tensor,
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    h: Tensor,
    routing: list[Tensor],
    block_m: int,
    need_dx: bool,
    need_dgate_up: bool,
    need_ddown: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (T, H), dgate_up (E, 2I, H), ddown (E, H, I), dweights (T, K); unneeded ones are empty."""
    r = _routing(routing, block_m)
    weights_flat = top_k_weights.reshape(-1)
    grad_out = grad_out.to(x.dtype).contiguous()
    if not _use_triton(x):
        return _experts_bwd_torch(grad_out, x, gate_up, down, top_k_index, top_k_weights, r)
    num_rows, inter = top_k_index.numel(), down.shape[2]
    hidden = x.shape[1]
    # g = dOut[token] @ down[e]: the gradient of each row's unweighted expert output.
    g = x.new_empty(num_rows, inter)
    cfg = gemm_config("down_dx", inter, hidden, block_m, x.device)
    grouped_gemm_launch(grad_out, down, g, r, cfg, b_is_kn=True, gather=r.sorted_token)
    dh = x.new_empty(num_rows, 2 * inter)
    w_act = x.new_empty(num_rows, inter)
    dweights = torch.zeros(num_rows, dtype=torch.float32, device=x.device)
    swiglu_backward_launch(g, h, weights_flat, r, dh, w_act, dweights, rows_block())
    del g  # free row buffers as soon as they are consumed: lower peak memory

    # Outputs of a custom op may not alias each other: one empty tensor each.
    dx, dgate_up, ddown = (x.new_empty(0) for _ in range(3))
    if need_ddown:
        ddown = torch.empty(down.shape, dtype=down.dtype, device=down.device)
        cfg = dw_config("down_dw", hidden, inter, block_m, x.device)
        grouped_dw_launch(grad_out, w_act, ddown, r, cfg, a_gather=r.sorted_token)
    del w_act
    if need_dx:  # before dgate_up: its (T*K, H) rows are freed before that large gradient exists
        rows = x.new_empty(num_rows, hidden)
        cfg = gemm_config("gate_up_dx", hidden, 2 * inter, block_m, x.device)
        grouped_gemm_launch(dh, gate_up, rows, r, cfg, b_is_kn=True, scatter=r.sort_idx)
        dx = torch.empty_like(x)
        combine_launch(rows, top_k_index, gate_up.shape[0], dx)
        del rows
    if need_dgate_up:
        dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        cfg = dw_config("gate_up_dw", 2 * inter, hidden, block_m, x.device)
        grouped_dw_launch(dh, x, dgate_up, r, cfg, b_gather=r.sorted_token)
    return dx, dgate_up, ddown, dweights.view(top_k_weights.shape).to(top_k_weights.dtype)


def _experts_bwd_torch(grad_out, x, gate_up, down, top_k_index, top_k_weights, r: Routing):
    """PyTorch backward over the same routing (autograd is off inside custom ops)."""
    weights_flat = top_k_weights.reshape(-1)
    dx, dgate_up, ddown = torch.zeros_like(x), torch.zeros_like(gate_up), torch.zeros_like(down)
    dweights = torch.zeros_like(weights_flat)
    offsets = r.expert_offsets.tolist()
    for e in range(gate_up.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        token, flat = r.sorted_token[start:end].long(), r.sort_idx[start:end].long()
        xe, go = x[token], grad_out[token]
        gate, up = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        dweights[flat] = (go * F.linear(act, down[e])).sum(-1)
        dy = go * weights_flat[flat, None]
        ddown[e] = dy.T @ act
        d_act = dy @ down[e]
        dh = torch.cat([d_act * up * (sig + silu * (1 - sig)), d_act * silu], dim=-1)
        dgate_up[e] = dh.T @ xe
        dx.index_add_(0, token, dh @ gate_up[e])
    return dx, dgate_up, ddown, dweights.view(top_k_weights.shape)


@experts_bwd_op.register_fake
def _(grad_out, x, gate_up, down, top_k_index, top_k_weights, h, routing, block_m, need_dx, need_dgate_up, need_ddown):
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        torch.empty_like(gate_up) if need_dgate_up else x.new_empty(0),
        torch.empty_like(down) if need_ddown else x.new_empty(0),
        torch.empty_like(top_k_weights),
    )


def _experts_setup_context(ctx, inputs, output):
    x, gate_up, down, top_k_index, top_k_weights, block_m, save_h = inputs
    out, h, *routing = output
    ctx.mark_non_differentiable(h, *routing)
    ctx.save_for_backward(x, gate_up, down, top_k_index, top_k_weights, h, *routing)
    ctx.block_m = block_m


def _experts_backward(ctx, grad_out, *unused_grads):
    x, gate_up, down, top_k_index, top_k_weights, h, *routing = ctx.saved_tensors
    need = ctx.needs_input_grad
    if h.numel() == 0 and top_k_index.numel() > 0 and _use_triton(x):
        raise RuntimeError("qwen3_moe_fused: backward needs the activations saved by a forward run with grad")
    dx, dgate_up, ddown, dweights = experts_bwd_op(
        grad_out, x, gate_up, down, top_k_index, top_k_weights, h, routing, ctx.block_m, need[0], need[1], need[2]
    )
    return (
        dx if need[0] else None,
        dgate_up if need[1] else None,
        ddown if need[2] else None,
        None,
        dweights if need[4] else None,
        None,
        None,
    )


torch.library.register_autograd(experts_fwd_op, _experts_backward, setup_context=_experts_setup_context)


def moe_experts(x, gate_up, down, top_k_index, top_k_weights) -> Tensor:
    """The experts' forward on checked inputs: x (T, H) -> (T, H). Ids outside [0, E) contribute zero."""
    num_experts = gate_up.shape[0]
    block_m = block_m_for(top_k_index.numel(), num_experts)
    top_k_index = top_k_index.contiguous()
    top_k_weights = top_k_weights.contiguous()
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, top_k_weights))
    return experts_fwd_op(x.contiguous(), gate_up, down, top_k_index, top_k_weights, block_m, save_h)[0]


def moe_experts_forward(
    hidden_states: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    *,
    check_ids: bool = True,
) -> Tensor:
    """Qwen3 MoE experts: sum_k w[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = top_k_index[t, k].

    hidden_states (T, H), gate_up_proj (E, 2I, H) with gate rows first, down_proj (E, H, I),
    top_k_index (T, K) int, top_k_weights (T, K). Returns (T, H); differentiable in all
    floating inputs.

    check_ids reads the ids back to the host to reject ids outside [0, E) with a
    ValueError (one device synchronization; skipped while compiling or capturing a CUDA
    graph). With check_ids=False nothing synchronizes and such ids contribute zero.
    """
    check_experts_inputs(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    if check_ids:
        check_expert_ids(top_k_index, gate_up_proj.shape[0])
    return moe_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)


# ---------------------------------------------------------------- plain grouped GEMM


def _grouped_gemm_torch(x, weight, m_sizes):
    out = x.new_zeros(x.shape[0], weight.shape[1])
    start = 0
    for e, size in enumerate(m_sizes.tolist()):
        out[start : start + size] = x[start : start + size] @ weight[e].T
        start += size
    return out


@torch.library.custom_op(add_op_namespace_prefix("grouped_gemm"), mutates_args=())
def grouped_gemm_op(x: Tensor, weight: Tensor, m_sizes: Tensor) -> Tensor:
    if not _use_triton(x):
        return _grouped_gemm_torch(x, weight, m_sizes)
    r = route_from_counts(m_sizes, x.shape[0], block_m_for(x.shape[0], weight.shape[0]), True)
    out = x.new_zeros(x.shape[0], weight.shape[1])  # rows past sum(m_sizes) stay zero
    cfg = gemm_config("plain", weight.shape[1], x.shape[1], r.block_m, x.device)
    return grouped_gemm_launch(x, weight, out, r, cfg)


@grouped_gemm_op.register_fake
def _(x, weight, m_sizes):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op(add_op_namespace_prefix("grouped_gemm_bwd"), mutates_args=())
def grouped_gemm_bwd_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, m_sizes: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    grad_out = grad_out.to(x.dtype).contiguous()
    if not _use_triton(x):
        dx = _grouped_gemm_torch(grad_out, weight.transpose(1, 2), m_sizes) if need_dx else x.new_empty(0)
        dw = torch.zeros_like(weight)
        start = 0
        for e, size in enumerate(m_sizes.tolist()):
            dw[e] = grad_out[start : start + size].T @ x[start : start + size]
            start += size
        return dx, dw if need_dw else x.new_empty(0)
    r = route_from_counts(m_sizes, x.shape[0], block_m_for(x.shape[0], weight.shape[0]), True)
    dx, dw = x.new_empty(0), x.new_empty(0)
    if need_dx:
        dx = x.new_zeros(x.shape)
        cfg = gemm_config("plain_dx", x.shape[1], weight.shape[1], r.block_m, x.device)
        grouped_gemm_launch(grad_out, weight, dx, r, cfg, b_is_kn=True)
    if need_dw:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        cfg = dw_config("plain_dw", weight.shape[1], weight.shape[2], r.block_m, x.device)
        grouped_dw_launch(grad_out, x, dw, r, cfg)
    return dx, dw


@grouped_gemm_bwd_op.register_fake
def _(grad_out, x, weight, m_sizes, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight) if need_dw else x.new_empty(0))


def _grouped_gemm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_gemm_backward(ctx, grad_out):
    x, weight, m_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = grouped_gemm_bwd_op(grad_out, x, weight, m_sizes, need[0], need[1])
    return (dx if need[0] else None, dw if need[1] else None, None)


torch.library.register_autograd(grouped_gemm_op, _grouped_gemm_backward, setup_context=_grouped_gemm_setup_context)


def grouped_gemm(x: Tensor, weight: Tensor, m_sizes: Tensor) -> Tensor:
    """Rows of x (M, K) grouped by expert, m_sizes (E,) rows each -> x_e @ weight[e]^T, (M, N).

    weight is (E, N, K), as nn.Linear stores one weight per expert. Differentiable in x and weight.
    """
    check_grouped_gemm_inputs(x, weight, m_sizes)
    return grouped_gemm_op(x.contiguous(), weight, m_sizes)
