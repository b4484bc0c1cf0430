"""torch.library custom ops tying routing and kernels together, with autograd and fake
implementations so torch.compile traces the MoE block without graph breaks. Outside
torch.compile the same implementations run through a plain autograd.Function: the
custom-op dispatch costs a few hundred microseconds of host time per call, which decode
and small batches would pay on every layer.

Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; other
tensors take a PyTorch path (the experts loop, plain autograd).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import tuning
from ._ops import add_op_namespace_prefix
from .activation import swiglu_backward_launch
from .checks import (
    check_expert_ids, check_experts_inputs, check_grouped_gemm_inputs, check_lora, check_router_inputs, weight_like,
)  # fmt: skip
from .combine import combine_launch
from .expand import expand_launch, sorted_positions
from .grouped_gemm import dswiglu_gemm_launch, grouped_dw_launch, grouped_gemm_launch, swiglu_gemm_launch
from .quant import Nf4Weight, dequantize_nf4, nf4_views, nf4_weight
from .parallel import is_dtensor
from .router import MAX_EXPERTS, router_topk_backward_launch, router_topk_launch
from .routing import Routing, max_tiles, route, route_from_counts
from .tuning import INTERPRET, block_m_for, dequantize_first, dw_config, gemm_config, rows_block


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or INTERPRET


def _routing(tensors: list[Tensor], block_m: int) -> Routing:
    return Routing(*tensors, block_m)


# ---------------------------------------------------------------- experts forward / backward
#
# LoRA on the experts: for a weight W (E, out, in), A (E, R, in) and B (E, out, R) with the
# scaling folded into B; a routed row x gets W[e] x + B[e] (A[e] x). The ops take the four
# factors as optional inputs; "L" below is a row projected by A (a thin grouped GEMM).
#
# 4-bit experts: gate_up and down are then the 1-D uint8 storage of quant/experts.py and
# nf4 = [E, I, blocksize] (empty for dense weights). The GEMMs dequantize in their B-load,
# or, with many rows per expert, the weights are dequantized first (tuning.dequantize_first).


def _shapes(gate_up, down, nf4):
    """-> (E, I) of the experts."""
    return (nf4[0], nf4[1]) if nf4 else (gate_up.shape[0], down.shape[2])


def _operands(x, gate_up, down, nf4, r: Routing):
    """The experts' weights as GEMM operands: dense tensors or Nf4Weight views (or, with many
    rows per expert, the routed experts dequantized)."""
    if not nf4:
        return gate_up, down
    (num_experts, inter, blocksize), hidden = nf4, x.shape[1]
    gate_up = nf4_views(gate_up, (num_experts, 2 * inter, hidden), x.dtype, blocksize)
    down = nf4_views(down, (num_experts, hidden, inter), x.dtype, blocksize)
    if dequantize_first(r.sort_idx.numel(), num_experts):
        return _dequantized(gate_up, x.dtype, r.expert_offsets), _dequantized(down, x.dtype, r.expert_offsets)
    return gate_up, down


def _kind(kind: str, weight) -> str:
    """The tuning kind of a GEMM: its own tiles when B is dequantized in the load."""
    return f"{kind}_nf4" if isinstance(weight, Nf4Weight) else kind


def _dequantized(weight, dtype, expert_offsets=None):
    return dequantize_nf4(weight.codes, weight.absmax, weight.shape, dtype, weight.blocksize, expert_offsets)


def _experts_torch(x, gate_up, down, top_k_index, top_k_weights, lora):
    """PyTorch path for devices without Triton: the eager loop over experts, differentiable."""
    gate_up_a, gate_up_b, down_a, down_b = lora
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, k = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        h = F.linear(x[token], gate_up[e])
        if gate_up_a is not None:
            h = h + F.linear(F.linear(x[token], gate_up_a[e]), gate_up_b[e])
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = F.linear(act, down[e])
        if down_a is not None:
            y = y + F.linear(F.linear(act, down_a[e]), down_b[e])
        # The weighting in the promoted dtype, the sum in x's, as Transformers' eager loop does.
        out = out.index_add(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
    return out


class _NoRows(torch.autograd.Function):
    """The experts' output when no row reaches an expert's GEMMs (T = 0, K = 0 or I = 0):
    zeros (T, H), still part of the autograd graph, so backward gives every floating input
    a zero gradient as a call with rows would."""

    @staticmethod
    def forward(ctx, x, *tensors):
        ctx.inputs = [(t.shape, t.dtype, t.device) if isinstance(t, Tensor) else None for t in (x, *tensors)]
        return x.new_zeros(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return tuple(None if meta is None or not meta[1].is_floating_point else torch.zeros(meta[0], dtype=meta[1], device=meta[2])
                     for meta in ctx.inputs)  # fmt: skip


def _lora_project(a, lora_factor, r: Routing, *, gather=None, transposed=False):
    """L (sorted rows, R) = a[gather] @ F[e]^T for a factor F (E, R, in), or (E, in, R) when transposed."""
    rank = lora_factor.shape[2] if transposed else lora_factor.shape[1]
    out = a.new_empty(r.sort_idx.numel(), rank)
    cfg = gemm_config("lora", rank, a.shape[1], r.block_m, a.device)
    return grouped_gemm_launch(a, lora_factor, out, r, cfg, gather=gather, b_is_kn=transposed)


def _lora_dw_config(grad: Tensor, block_m: int) -> dict:
    return dw_config("lora_dw", grad.shape[1], grad.shape[2], block_m, grad.device)


def _experts_fwd(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_a: Tensor | None,
    gate_up_b: Tensor | None,
    down_a: Tensor | None,
    down_b: Tensor | None,
    nf4: list[int],
    block_m: int,
    save_h: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out (T, H); the pre-activation h (T*K, 2I) in sorted order when save_h (else empty);
    with LoRA on gate_up and save_h, x_l (T*K, R): the sorted rows projected by its A factor
    (else empty); the routing (sort_idx, sorted_token, expert_offsets, tile_expert,
    tile_row_start). The backward reuses h, x_l and the routing."""
    num_experts, inter = _shapes(gate_up, down, nf4)
    r = route(top_k_index, num_experts, block_m, True)
    weights_flat = top_k_weights.reshape(-1)
    num_tokens, hidden = x.shape
    num_rows = top_k_index.numel()
    gate_up, down = _operands(x, gate_up, down, nf4, r)
    act = x.new_empty(num_rows, inter)
    h = x.new_empty(num_rows, 2 * inter) if save_h else x.new_empty(0)
    lora, x_l = None, x.new_empty(0)
    if gate_up_a is not None:
        lora = (_lora_project(x, gate_up_a, r, gather=r.sorted_token), gate_up_b, False)
        x_l = lora[0] if save_h else x_l
    swiglu_gemm_launch(
        x, gate_up, act, r, gemm_config(_kind("gate_up", gate_up), inter, hidden, block_m, x.device, lora is not None),
        gather=r.sorted_token, h_out=h if save_h else None, lora=lora,
    )  # fmt: skip
    lora = (_lora_project(act, down_a, r), down_b, False) if down_a is not None else None
    rows = x.new_empty(num_rows, hidden)
    grouped_gemm_launch(
        act, down, rows, r, gemm_config(_kind("down", down), hidden, inter, block_m, x.device, lora is not None),
        scatter=r.sort_idx, row_scale=weights_flat, lora=lora,
    )  # fmt: skip
    out = x.new_empty(num_tokens, hidden)
    combine_launch(rows, top_k_index, num_experts, out)
    return out, h, x_l, *r[:5]


experts_fwd_op = torch.library.custom_op(add_op_namespace_prefix("experts_fwd"), _experts_fwd, mutates_args=())


@experts_fwd_op.register_fake
def _(x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, nf4, block_m, save_h):
    num_rows, (num_experts, inter) = top_k_index.numel(), _shapes(gate_up, down, nf4)
    h = x.new_empty(num_rows, 2 * inter) if save_h else x.new_empty(0)
    x_l = x.new_empty(num_rows, gate_up_a.shape[1]) if save_h and gate_up_a is not None else x.new_empty(0)
    n_tiles = max_tiles(num_rows, num_experts, block_m)
    index = [x.new_empty(n, dtype=torch.int32) for n in (num_rows, num_rows, num_experts + 1, n_tiles, n_tiles)]
    return torch.empty_like(x), h, x_l, *index


def _token_rows(t: Tensor, r: Routing, sorted_pos: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A dW operand from token rows t (T, H): (t copied into sorted order, no gather) with
    sorted_pos, else (t, its gather index)."""
    return (expand_launch(t, sorted_pos), None) if sorted_pos is not None else (t, r.sorted_token)


class _DownGrads(NamedTuple):
    """Gradients through the down projection (unneeded ones are empty tensors)."""

    dh: Tensor  # (T*K, 2I) of the pre-activation (gate, up), sorted rows: SwiGLU backward fused in
    dweights: Tensor  # (T*K,) of the routing weights, (token, k) order
    ddown: Tensor  # (E, H, I)
    ddown_a: Tensor  # (E, R, I)
    ddown_b: Tensor  # (E, H, R)


class _GateUpGrads(NamedTuple):
    """Gradients through the gate_up projection (unneeded ones are empty tensors)."""

    dx: Tensor  # (T, H)
    dgate_up: Tensor  # (E, 2I, H)
    dgate_up_a: Tensor  # (E, R, H)
    dgate_up_b: Tensor  # (E, 2I, R)


def _down_projection_bwd(grad_out, h, down, down_a, down_b, top_k_weights, r: Routing, need_ddown, need_lora,
                         sorted_pos):  # fmt: skip
    """grad_out (T, H) -> _DownGrads. h (T*K, 2I): the saved pre-activation. sorted_pos: see
    _experts_bwd."""
    block_m = r.block_m
    num_rows, (hidden, inter) = top_k_weights.numel(), down.shape[1:]
    # Outputs of a custom op may not alias each other: one empty tensor each.
    ddown, ddown_a, ddown_b = (grad_out.new_empty(0) for _ in range(3))
    # g = dOut[token] @ (down[e] + B[e] A[e]): the gradient of each row's unweighted expert output.
    lora = None
    if down_a is not None:
        down_l = _lora_project(grad_out, down_b, r, gather=r.sorted_token, transposed=True)
        lora = (down_l, down_a, True)
    dh = grad_out.new_empty(num_rows, 2 * inter)
    w_act = grad_out.new_empty(num_rows, inter)
    dweights = torch.empty(num_rows, dtype=top_k_weights.dtype, device=grad_out.device)
    if tuning.FUSE_DSWIGLU:  # the SwiGLU backward in the GEMM's epilogue: g never reaches memory
        cfg = gemm_config(_kind("down_dx_swiglu", down), inter, hidden, block_m, grad_out.device, lora is not None)
        dswiglu_gemm_launch(grad_out, down, h, top_k_weights.reshape(-1), r, cfg, dh=dh, w_act=w_act,
                            dweights=dweights, gather=r.sorted_token, lora=lora)  # fmt: skip
    else:
        g = grad_out.new_empty(num_rows, inter)
        cfg = gemm_config(_kind("down_dx", down), inter, hidden, block_m, grad_out.device, lora is not None)
        grouped_gemm_launch(grad_out, down, g, r, cfg, b_is_kn=True, gather=r.sorted_token, lora=lora)
        swiglu_backward_launch(g, h, top_k_weights.reshape(-1), r, dh, w_act, dweights, rows_block())
        del g  # free row buffers as soon as they are consumed: lower peak memory

    if down_a is not None and need_lora:
        ddown_a = torch.empty(down_a.shape, dtype=down_a.dtype, device=grad_out.device)
        grouped_dw_launch(down_l, w_act, ddown_a, r, _lora_dw_config(ddown_a, block_m))
        ddown_b = torch.empty(down_b.shape, dtype=down_b.dtype, device=grad_out.device)
        w_down_l = _lora_project(w_act, down_a, r)  # w * (A act), rows of the routing weight
        grouped_dw_launch(grad_out, w_down_l, ddown_b, r, _lora_dw_config(ddown_b, block_m), a_gather=r.sorted_token)
    if need_ddown:
        ddown = torch.empty(down.shape, dtype=down.dtype, device=down.device)
        cfg = dw_config("down_dw", hidden, inter, block_m, grad_out.device)
        rows, gather = _token_rows(grad_out, r, sorted_pos)
        grouped_dw_launch(rows, w_act, ddown, r, cfg, a_gather=gather)
    return _DownGrads(dh, dweights, ddown, ddown_a, ddown_b)


def _gate_up_projection_bwd(dh, x, x_l, gate_up, gate_up_a, gate_up_b, top_k_index, r: Routing, need_dx,
                            need_dgate_up, need_lora, sorted_pos):  # fmt: skip
    """dh (T*K, 2I) -> _GateUpGrads. x_l (T*K, R): the forward's LoRA-projected rows. sorted_pos:
    see _experts_bwd."""
    num_experts, block_m = r.expert_offsets.numel() - 1, r.block_m
    num_rows, hidden = dh.shape[0], x.shape[1]
    dx, dgate_up, dgate_up_a, dgate_up_b = (x.new_empty(0) for _ in range(4))  # not aliased, as above
    lora = None
    if gate_up_a is not None:
        gate_up_l = _lora_project(dh, gate_up_b, r, transposed=True)  # dh @ B[e]: (rows, R)
        lora = (gate_up_l, gate_up_a, True)
    if need_dx:  # before dgate_up: its (T*K, H) rows are freed before that large gradient exists
        rows = x.new_empty(num_rows, hidden)
        cfg = gemm_config(_kind("gate_up_dx", gate_up), hidden, dh.shape[1], block_m, x.device, lora is not None)
        grouped_gemm_launch(dh, gate_up, rows, r, cfg, b_is_kn=True, scatter=r.sort_idx, lora=lora)
        dx = torch.empty_like(x)
        combine_launch(rows, top_k_index, num_experts, dx)
        del rows
    if gate_up_a is not None and need_lora:
        dgate_up_a = torch.empty(gate_up_a.shape, dtype=gate_up_a.dtype, device=x.device)
        grouped_dw_launch(gate_up_l, x, dgate_up_a, r, _lora_dw_config(dgate_up_a, block_m), b_gather=r.sorted_token)
        dgate_up_b = torch.empty(gate_up_b.shape, dtype=gate_up_b.dtype, device=x.device)
        grouped_dw_launch(dh, x_l, dgate_up_b, r, _lora_dw_config(dgate_up_b, block_m))
    if need_dgate_up:
        dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        cfg = dw_config("gate_up_dw", dh.shape[1], hidden, block_m, x.device)
        rows, gather = _token_rows(x, r, sorted_pos)
        grouped_dw_launch(dh, rows, dgate_up, r, cfg, b_gather=gather)
    return _GateUpGrads(dx, dgate_up, dgate_up_a, dgate_up_b)


def _experts_bwd(
    grad_out: Tensor,
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_a: Tensor | None,
    gate_up_b: Tensor | None,
    down_a: Tensor | None,
    down_b: Tensor | None,
    h: Tensor,
    x_l: Tensor,
    routing: list[Tensor],
    nf4: list[int],
    block_m: int,
    need_dx: bool,
    need_dgate_up: bool,
    need_ddown: bool,
    need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx (T, H), dgate_up (E, 2I, H), ddown (E, H, I), dweights (T, K), then the gradients
    of gate_up_a, gate_up_b, down_a, down_b; unneeded ones are empty. The down projection's
    backward, then the gate_up projection's."""
    r = _routing(routing, block_m)
    grad_out = grad_out.to(x.dtype).contiguous()
    gate_up, down = _operands(x, gate_up, down, nf4, r)
    # With tuning.sort_before_dw the dW GEMMs read the token rows (dOut, x) copied into sorted
    # order (expand.py), both operands then through TMA descriptors, instead of gathering one
    # row index per step; sorted_pos (T*K,) places each (token, k) pair for those copies.
    sort_first = tuning.sort_before_dw(r.sort_idx.numel(), r.expert_offsets.numel() - 1)
    sorted_pos = sorted_positions(r) if sort_first and (need_ddown or need_dgate_up) else None
    down_grads = _down_projection_bwd(grad_out, h, down, down_a, down_b, top_k_weights, r, need_ddown, need_lora,
                                      sorted_pos)  # fmt: skip
    up_grads = _gate_up_projection_bwd(
        down_grads.dh, x, x_l, gate_up, gate_up_a, gate_up_b, top_k_index, r, need_dx, need_dgate_up, need_lora,
        sorted_pos,
    )  # fmt: skip
    return (
        up_grads.dx, up_grads.dgate_up, down_grads.ddown, down_grads.dweights.view(top_k_weights.shape),
        up_grads.dgate_up_a, up_grads.dgate_up_b, down_grads.ddown_a, down_grads.ddown_b,
    )  # fmt: skip


experts_bwd_op = torch.library.custom_op(add_op_namespace_prefix("experts_bwd"), _experts_bwd, mutates_args=())


@experts_bwd_op.register_fake
def _(grad_out, x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, h, x_l, routing,
      nf4, block_m, need_dx, need_dgate_up, need_ddown, need_lora):  # fmt: skip
    def like(t, needed):
        return torch.empty_like(t) if needed and t is not None else x.new_empty(0)

    return (
        like(x, need_dx), like(gate_up, need_dgate_up), like(down, need_ddown), torch.empty_like(top_k_weights),
        like(gate_up_a, need_lora), like(gate_up_b, need_lora), like(down_a, need_lora), like(down_b, need_lora),
    )  # fmt: skip


def _save_for_backward(ctx, inputs, output):
    """What the backward reads: the inputs, the saved pre-activation h, x_l and the routing."""
    x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, nf4, block_m, save_h = inputs
    out, h, x_l, *routing = output
    ctx.save_for_backward(
        x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, h, x_l, *routing
    )
    ctx.nf4, ctx.block_m = nf4, block_m


def _experts_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    _save_for_backward(ctx, inputs, output)


def _experts_backward(ctx, grad_out, bwd):
    """Gradients of the 12 inputs of _experts_fwd, computed by bwd (_experts_bwd or its custom op)."""
    x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, h, x_l, *routing = (
        ctx.saved_tensors
    )
    need = ctx.needs_input_grad
    if grad_out is None:  # the output did not reach the loss
        return (None,) * len(need)
    if h.numel() == 0 and top_k_index.numel() > 0:
        raise RuntimeError("qwen3_moe_fused: backward needs the activations saved by a forward run with grad")
    need_lora = any(need[5:9])
    grads = bwd(
        grad_out, x, gate_up, down, top_k_index, top_k_weights, gate_up_a, gate_up_b, down_a, down_b, h, x_l, routing,
        ctx.nf4, ctx.block_m, need[0], need[1], need[2], need_lora,
    )  # fmt: skip
    dx, dgate_up, ddown, dweights, *dlora = grads
    dlora = [d if n else None for d, n in zip(dlora, need[5:9])]
    return (
        dx if need[0] else None,
        dgate_up if need[1] else None,
        ddown if need[2] else None,
        None,
        dweights if need[4] else None,
        *dlora,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    experts_fwd_op, lambda ctx, grad_out, *_: _experts_backward(ctx, grad_out, experts_bwd_op),
    setup_context=_experts_setup_context,
)  # fmt: skip


class _Experts(torch.autograd.Function):
    """experts_fwd_op and its autograd outside torch.compile, without the custom-op dispatch:
    the output alone, with h, x_l and the routing kept for the backward as intermediates
    (fewer outputs for apply() to wrap: host time that decode pays per layer)."""

    # forward takes ctx: a separate setup_context would make apply() bind its arguments
    # through inspect.signature on every call.
    @staticmethod
    def forward(ctx, *inputs):
        output = _experts_fwd(*inputs)
        _save_for_backward(ctx, inputs, output)
        return output[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _experts_backward(ctx, grad_out, _experts_bwd)


def _nf4_spec(x, gate_up, down) -> list[int]:
    """[E, I, blocksize] when the experts' weights are our 4-bit tensors, [] when dense."""
    gate_up_q, down_q = nf4_weight(gate_up), nf4_weight(down)
    if gate_up_q is None and down_q is None:
        return []
    if gate_up_q is None or down_q is None or gate_up_q.blocksize != down_q.blocksize:
        raise ValueError("qwen3_moe_fused: gate_up_proj and down_proj must both be 4-bit, with one blocksize "
                         "(use quantize_experts_4bit on the model)")  # fmt: skip
    return [gate_up_q.shape[0], down_q.shape[2], gate_up_q.blocksize]


def _float32(t: Tensor | None) -> Tensor | None:
    """A dense bfloat16 operand in float32 (4-bit storage and absent operands as they are)."""
    return t.float() if t is not None and t.dtype == torch.bfloat16 else t


def moe_experts(x, gate_up, down, top_k_index, top_k_weights, gate_up_lora=None, down_lora=None) -> Tensor:
    """The experts' forward on checked inputs: x (T, H) -> (T, H). Ids outside [0, E) contribute zero.
    gate_up / down: dense (E, 2I, H) / (E, H, I), or both 4-bit (quant/experts.py)."""
    if INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter's tl.dot is wrong for bfloat16: compute in float32, round the output once.
        gate_up_lora, down_lora = (None if f is None else tuple(map(_float32, f)) for f in (gate_up_lora, down_lora))
        out = moe_experts(x.float(), _float32(gate_up), _float32(down), top_k_index, top_k_weights.float(),
                          gate_up_lora, down_lora)  # fmt: skip
        return out.to(x.dtype)
    lora = (*(gate_up_lora or (None, None)), *(down_lora or (None, None)))
    nf4 = _nf4_spec(x, gate_up, down)
    if top_k_index.numel() == 0 or _shapes(gate_up, down, nf4)[1] == 0:
        return _NoRows.apply(x, gate_up, down, top_k_weights, *lora)
    if not _use_triton(x):
        if nf4:
            gate_up, down = (_dequantized(nf4_weight(w), x.dtype) for w in (gate_up, down))
        return _experts_torch(x, gate_up, down, top_k_index, top_k_weights, lora)
    block_m = block_m_for(top_k_index.numel(), _shapes(gate_up, down, nf4)[0])
    inputs = (x.contiguous(), gate_up, down, top_k_index.contiguous(), top_k_weights.contiguous(), *lora)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if torch.compiler.is_compiling():
        return experts_fwd_op(*inputs, nf4, block_m, save_h)[0]
    return _Experts.apply(*inputs, nf4, block_m, save_h)


def moe_experts_forward(
    hidden_states: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    *,
    check_ids: bool = True,
    gate_up_lora: tuple[Tensor, Tensor] | None = None,
    down_lora: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Qwen3 MoE experts: sum_k w[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = top_k_index[t, k].

    hidden_states (T, H), gate_up_proj (E, 2I, H) with gate rows first, down_proj (E, H, I),
    top_k_index (T, K) int, top_k_weights (T, K). Returns (T, H); differentiable in all
    floating inputs. gate_up_proj / down_proj may both be 4-bit (quantize_experts_4bit):
    frozen, dequantized to hidden_states' dtype inside the GEMMs.

    gate_up_lora / down_lora: LoRA on the expert weights, (A, B) with A (E, R, in) and
    B (E, out, R), the LoRA scaling already multiplied into B: W[e] becomes W[e] + B[e] A[e]
    without ever being formed.

    check_ids reads the ids back to the host to reject ids outside [0, E) with a
    ValueError (one device synchronization; skipped while compiling or capturing a CUDA
    graph). With check_ids=False nothing synchronizes and such ids contribute zero.
    """
    gate_up_like, down_like = (weight_like(w, hidden_states.dtype) for w in (gate_up_proj, down_proj))
    check_experts_inputs(hidden_states, gate_up_like, down_like, top_k_index, top_k_weights)
    check_lora("gate_up_lora", gate_up_lora, gate_up_like)
    check_lora("down_lora", down_lora, down_like)
    if check_ids:
        check_expert_ids(top_k_index, gate_up_proj.shape[0])
    return moe_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, gate_up_lora, down_lora)


# ---------------------------------------------------------------- plain grouped GEMM


def _grouped_gemm_torch(x, weight, m_sizes):
    out = x.new_zeros(x.shape[0], weight.shape[1])
    start = 0
    for e, size in enumerate(m_sizes.tolist()):
        out[start : start + size] = x[start : start + size] @ weight[e].T
        start += size
    return out


def _grouped_gemm_fwd(x: Tensor, weight: Tensor, m_sizes: Tensor) -> Tensor:
    if not _use_triton(x):
        return _grouped_gemm_torch(x, weight, m_sizes)
    r = route_from_counts(m_sizes, x.shape[0], block_m_for(x.shape[0], weight.shape[0]), True)
    out = x.new_zeros(x.shape[0], weight.shape[1])  # rows past sum(m_sizes) stay zero
    cfg = gemm_config("plain", weight.shape[1], x.shape[1], r.block_m, x.device)
    return grouped_gemm_launch(x, weight, out, r, cfg)


grouped_gemm_op = torch.library.custom_op(add_op_namespace_prefix("grouped_gemm"), _grouped_gemm_fwd, mutates_args=())


@grouped_gemm_op.register_fake
def _(x, weight, m_sizes):
    return x.new_empty(x.shape[0], weight.shape[1])


def _grouped_gemm_bwd(
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


grouped_gemm_bwd_op = torch.library.custom_op(
    add_op_namespace_prefix("grouped_gemm_bwd"), _grouped_gemm_bwd, mutates_args=()
)


@grouped_gemm_bwd_op.register_fake
def _(grad_out, x, weight, m_sizes, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight) if need_dw else x.new_empty(0))


def _grouped_gemm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_gemm_backward(ctx, grad_out, bwd):
    x, weight, m_sizes = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = bwd(grad_out, x, weight, m_sizes, need[0], need[1])
    return (dx if need[0] else None, dw if need[1] else None, None)


torch.library.register_autograd(
    grouped_gemm_op, lambda ctx, grad_out: _grouped_gemm_backward(ctx, grad_out, grouped_gemm_bwd_op),
    setup_context=_grouped_gemm_setup_context,
)  # fmt: skip


class _GroupedGemm(torch.autograd.Function):
    """grouped_gemm_op and its autograd outside torch.compile, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _grouped_gemm_fwd(*inputs)
        _grouped_gemm_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _grouped_gemm_backward(ctx, grad_out, _grouped_gemm_bwd)


def grouped_gemm(x: Tensor, weight: Tensor, m_sizes: Tensor) -> Tensor:
    """Rows of x (M, K) grouped by expert, m_sizes (E,) rows each -> x_e @ weight[e]^T, (M, N).

    weight is (E, N, K), as nn.Linear stores one weight per expert. Differentiable in x and weight.
    """
    check_grouped_gemm_inputs(x, weight, m_sizes)
    if INTERPRET and x.dtype == torch.bfloat16:  # the interpreter's tl.dot is wrong for bfloat16
        return grouped_gemm(x.float(), weight.float(), m_sizes).to(x.dtype)
    op = grouped_gemm_op if torch.compiler.is_compiling() else _GroupedGemm.apply
    return op(x.contiguous(), weight, m_sizes)


# ---------------------------------------------------------------- router top-k


def _router_topk_torch(logits, top_k, normalize):
    """Transformers' routers after their linear layer, as written there (differentiable)."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    values, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values.to(logits.dtype), indices


def _router_topk_fwd(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    return router_topk_launch(logits, top_k, normalize)


router_topk_fwd_op = torch.library.custom_op(
    add_op_namespace_prefix("router_topk_fwd"), _router_topk_fwd, mutates_args=()
)


@router_topk_fwd_op.register_fake
def _(logits, top_k, normalize):
    return logits.new_empty(logits.shape[0], top_k), logits.new_empty(logits.shape[0], top_k, dtype=torch.int64)


def _router_topk_bwd(logits: Tensor, indices: Tensor, dscores: Tensor, normalize: bool) -> Tensor:
    return router_topk_backward_launch(logits, indices, dscores.to(logits.dtype).contiguous(), normalize)


router_topk_bwd_op = torch.library.custom_op(
    add_op_namespace_prefix("router_topk_bwd"), _router_topk_bwd, mutates_args=()
)


@router_topk_bwd_op.register_fake
def _(logits, indices, dscores, normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _router_topk_setup_context(ctx, inputs, output):
    logits, _, normalize = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, output[1])
    ctx.normalize = normalize


def _router_topk_backward(ctx, dscores, bwd):
    if dscores is None:  # the scores did not reach the loss
        return None, None, None
    logits, indices = ctx.saved_tensors
    return bwd(logits, indices, dscores, ctx.normalize), None, None


torch.library.register_autograd(
    router_topk_fwd_op, lambda ctx, dscores, _: _router_topk_backward(ctx, dscores, router_topk_bwd_op),
    setup_context=_router_topk_setup_context,
)  # fmt: skip


class _RouterTopK(torch.autograd.Function):
    """router_topk_fwd_op and its autograd outside torch.compile, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _router_topk_fwd(*inputs)
        _router_topk_setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, dscores, _):
        return _router_topk_backward(ctx, dscores, _router_topk_bwd)


def router_topk(router_logits: Tensor, top_k: int, *, normalize: bool) -> tuple[Tensor, Tensor]:
    """The top-k softmax of Transformers' Qwen3 MoE routers: router_logits (T, E) ->
    (scores (T, K) in router_logits' dtype, indices (T, K) int64), the K largest of
    softmax(router_logits) in float32, in decreasing order, divided by their sum when
    normalize. Differentiable in router_logits. Ties go to the lower expert id.
    """
    check_router_inputs(router_logits, top_k)
    num_experts = router_logits.shape[1]
    if not _use_triton(router_logits) or is_dtensor(router_logits) or num_experts > MAX_EXPERTS:
        return _router_topk_torch(router_logits, top_k, normalize)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    op = router_topk_fwd_op if torch.compiler.is_compiling() else _RouterTopK.apply
    return op(logits, top_k, bool(normalize))
