"""SwiGLU backward over sorted rows, with the routing-weight gradient.

Given g = dOut[token] @ W_down[e] (the gradient of the unweighted expert output with
respect to the activation), the saved pre-activation h = (gate, up) and the routing
weight w of each row:
    w_act   = w * silu(gate) * up             (recomputed and weighted: dW_down = dOut^T w_act)
    d_w     = sum_i g * act                   (routing-weight gradient)
    d_gate  = w * g * up * silu'(gate)
    d_up    = w * g * silu(gate)
"""

import torch
import triton
import triton.language as tl

from .routing import Routing
from .sizes import cdiv, next_power_of_2
from .launch import launcher


@launcher
@triton.jit
def _swiglu_backward_kernel(
    g_ptr,  # (sorted rows, I)
    h_ptr,  # (sorted rows, 2I)
    weights_ptr,  # (T * K,) routing weights in (token, k) order
    sort_idx_ptr,  # (sorted rows,)
    expert_offsets_ptr,  # (E + 1,)
    dh_ptr,  # (sorted rows, 2I)
    w_act_ptr,  # (sorted rows, I)
    dweights_ptr,  # (T * K,) out, in the routing weights' dtype
    num_rows,
    num_experts,
    I,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # Rows past offsets[E] hold out-of-range expert ids: no expert ran, their gradient is 0.
    last_row = tl.load(expert_offsets_ptr + num_experts)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < last_row
    flat = tl.load(sort_idx_ptr + rows, mask=rows < num_rows, other=0)
    w = tl.load(weights_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)
    d_w = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = row_mask[:, None] & (cols < I)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_row = h_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        gate = tl.load(h_row, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_row + I, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        d_w += tl.sum(g * act, axis=1)
        d_act = g * w[:, None]
        d_gate = d_act * up * (sig + silu * (1.0 - sig))
        d_up = d_act * silu
        dh_row = dh_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(dh_row, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_row + I, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        w_act = act * w[:, None]
        tl.store(w_act_ptr + rows64[:, None] * I + cols[None, :], w_act.to(w_act_ptr.dtype.element_ty), mask=mask)
    tl.store(dweights_ptr + flat, d_w.to(dweights_ptr.dtype.element_ty), mask=rows < num_rows)


def swiglu_backward_launch(
    g: torch.Tensor,
    h: torch.Tensor,
    weights_flat: torch.Tensor,
    routing: Routing,
    dh: torch.Tensor,
    w_act: torch.Tensor,
    dweights: torch.Tensor,
    block_r: int,
) -> None:
    """Fill dh (rows, 2I), w_act (rows, I) and dweights (T * K,) from g (rows, I), h (rows, 2I)."""
    num_rows, inter = g.shape
    if num_rows == 0:
        return
    if inter == 0:
        dweights.zero_()
        return
    block_i = min(next_power_of_2(inter), 128)
    _swiglu_backward_kernel[(cdiv(num_rows, block_r),)](
        g,
        h,
        weights_flat,
        routing.sort_idx,
        routing.expert_offsets,
        dh,
        w_act,
        dweights,
        num_rows,
        routing.expert_offsets.numel() - 1,
        inter,
        BLOCK_R=block_r,
        BLOCK_I=block_i,
    )
