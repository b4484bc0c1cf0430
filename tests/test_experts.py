from dataclasses import replace

import pytest
import torch

from reference import moe_experts_reference, random_routing, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}

SHAPES = [
    # (T, H, I, E, K, routing mode)
    (37, 48, 40, 8, 3, "random"),
    (50, 32, 24, 8, 2, "skip"),  # experts with zero tokens
    (33, 40, 16, 6, 2, "one"),  # every token on expert 0
    (1, 64, 32, 4, 2, "random"),
]


def _inputs(num_tokens, hidden, inter, num_experts, top_k, mode, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    ids, weights = random_routing(num_tokens, num_experts, top_k, mode, generator=g)
    return x, gate_up, down, ids, weights.to(dtype)


def _check_forward_backward(fn, inputs, dtype):
    x, gate_up, down, ids, weights = inputs
    ours = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
    ref = [t.detach().double().requires_grad_() for t in (x, gate_up, down, weights)]
    out = fn(ours[0], ours[1], ours[2], ids, ours[3])
    expected = moe_experts_reference(ref[0], ref[1], ref[2], ids, ref[3])
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) < TOL[dtype]
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    for name, a, b in zip(("hidden_states", "gate_up_proj", "down_proj", "top_k_weights"), ours, ref):
        assert a.grad is not None and a.grad.dtype == dtype, name
        assert rel_err(a.grad, b.grad) < TOL[dtype], name
    return ours


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_moe_experts_forward(kernel, dtype, shape):
    inputs = _inputs(*shape, dtype=dtype)
    ours = _check_forward_backward(kernel.moe_experts_forward, inputs, dtype)
    # Experts that received no tokens get an exact zero gradient.
    ids, num_experts = inputs[3], inputs[1].shape[0]
    for e in sorted(set(range(num_experts)) - set(ids.flatten().tolist())):
        assert torch.all(ours[1].grad[e] == 0) and torch.all(ours[2].grad[e] == 0)


def test_pytorch_path_matches_reference(kernel, monkeypatch):
    """Tensors on devices without Triton take the PyTorch path over the same routing."""
    monkeypatch.setattr(kernel.functional, "_use_triton", lambda t: False)
    for shape in SHAPES:
        _check_forward_backward(kernel.moe_experts_forward, _inputs(*shape, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_persistent_grid_matches(kernel, monkeypatch, shape):
    """Routed GEMMs on a persistent grid (GemmConfig.persistent: a few programs that walk the
    tiles) give the same bits as one program per tile, forward and backward."""
    x, gate_up, down, ids, weights = _inputs(*shape, dtype=torch.float32)
    lookup = kernel.tuning.gemm_config

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
        out = kernel.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    plain = run()
    monkeypatch.setattr(kernel.functional, "gemm_config", lambda *a, **kw: replace(lookup(*a, **kw), persistent=1))
    for a, b in zip(plain, run()):
        assert torch.equal(a, b)


def test_empty_batch(kernel):
    x, gate_up, down, ids, weights = _inputs(0, 32, 16, 4, 2, "random", torch.float32)
    x.requires_grad_()
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights)
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 32)


def test_inference_saves_nothing_and_matches(kernel):
    inputs = _inputs(37, 48, 40, 8, 3, "random", torch.float32)
    with torch.no_grad():
        out = kernel.moe_experts_forward(*inputs)
    assert rel_err(out, moe_experts_reference(*inputs)) < TOL[torch.float32]
    with torch.inference_mode():
        assert torch.equal(kernel.moe_experts_forward(*inputs), out)


def test_deterministic(kernel):
    inputs = _inputs(37, 48, 40, 8, 3, "random", torch.float16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[1], inputs[2], inputs[4])]
        out = kernel.moe_experts_forward(leaves[0], leaves[1], leaves[2], inputs[3], leaves[3])
        out.backward(torch.ones_like(out))
        runs.append([out] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_only_needed_gradients(kernel):
    """Frozen weights (LoRA / QLoRA) get no gradient; the input still does."""
    x, gate_up, down, ids, weights = _inputs(37, 48, 40, 8, 3, "random", torch.float32)
    x.requires_grad_()
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights)
    out.backward(torch.ones_like(out))
    ref = x.detach().double().requires_grad_()
    moe_experts_reference(ref, gate_up, down, ids, weights).backward(torch.ones_like(out).double())
    assert gate_up.grad is None and down.grad is None
    assert rel_err(x.grad, ref.grad) < TOL[torch.float32]


def test_sentinel_ids_contribute_zero(kernel):
    """experts_forward treats ids outside [0, E) as expert-parallel sentinels, like Transformers."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    x, gate_up, down, ids, weights = _inputs(20, 32, 16, 4, 2, "random", torch.float32)
    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4))
    experts.gate_up_proj.data.copy_(gate_up)
    experts.down_proj.data.copy_(down)
    ids = ids.clone()
    ids[::3, 1] = 4  # sentinel
    out = kernel.experts_forward(experts, x, ids, weights)
    keep = ids < 4
    expected = moe_experts_reference(x, gate_up, down, ids.clamp(max=3), weights * keep)
    assert rel_err(out, expected) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_forward_matches_transformers_eager(kernel, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    x, gate_up, down, ids, weights = _inputs(29, 48, 24, 6, 2, "random", dtype)
    config = Qwen3MoeConfig(hidden_size=48, moe_intermediate_size=24, num_experts=6)
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config).to(dtype)
    experts.gate_up_proj.data.copy_(gate_up)
    experts.down_proj.data.copy_(down)
    expected = experts(x, ids, weights)
    out = kernel.experts_forward(experts, x, ids, weights)
    assert out.dtype == dtype
    assert rel_err(out, expected) < TOL[dtype] * (1 if dtype == torch.float32 else 2)


def test_unchecked_out_of_range_ids_contribute_zero(kernel):
    """check_ids=False (no host sync) never reads out of bounds: such ids count as zero."""
    x, gate_up, down, ids, weights = _inputs(20, 32, 16, 4, 2, "random", torch.float32)
    ids = ids.clone()
    ids[::2, 0] = 7
    ids[1::4, 1] = -3
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights, check_ids=False)
    keep = (ids >= 0) & (ids < 4)
    expected = moe_experts_reference(x, gate_up, down, ids.clamp(0, 3), weights * keep)
    assert rel_err(out, expected) < TOL[torch.float32]


class _Experts4bit(torch.nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up.clone(), requires_grad=False)
        self.down_proj = torch.nn.Parameter(down.clone(), requires_grad=False)


BACKWARD_OPTION_CASES = {
    # name: (T, H, I, E, K, routing mode), dtype, LoRA rank or None, 4-bit
    "dense": ((37, 48, 40, 8, 3, "random"), torch.float32, None, False),
    "dense fp16, experts without tokens": ((50, 32, 24, 8, 2, "skip"), torch.float16, None, False),
    "dense T=1": ((1, 64, 32, 4, 2, "random"), torch.float32, None, False),
    "lora, one-hot expert": ((33, 40, 16, 6, 2, "one"), torch.float32, 4, False),
    "4-bit+lora, odd H and I": ((29, 35, 21, 3, 2, "random"), torch.float32, 4, True),
    "4-bit+lora, experts without tokens": ((50, 32, 24, 8, 2, "skip"), torch.float32, 4, True),
}


@pytest.mark.parametrize("case", list(BACKWARD_OPTION_CASES))
def test_backward_options_match(kernel, monkeypatch, case):
    """The backward's options against the default path, every gradient: the SwiGLU backward
    fused into the down_dx GEMM (tuning.FUSE_DSWIGLU; the routing-weight gradient is summed
    in another order: within float32 rounding), the dW GEMMs on a persistent grid, and on the
    token rows copied into sorted order (tuning.SORT_BEFORE_DW; with and without TMA
    descriptors for both operands): the same bits."""
    shape, dtype, rank, four_bit = BACKWARD_OPTION_CASES[case]
    x, gate_up, down, ids, weights = _inputs(*shape, dtype=dtype)
    ids[::4, -1] = shape[3]  # a few sentinel ids: no expert, zero contribution and gradient
    g = torch.Generator().manual_seed(5)
    num_experts, hidden, inter = shape[3], shape[1], shape[2]
    lora = []
    if rank:
        for out_f, in_f in ((2 * inter, hidden), (hidden, inter)):
            lora += [(torch.randn(num_experts, rank, in_f, generator=g) * in_f**-0.5).to(dtype),
                     (torch.randn(num_experts, out_f, rank, generator=g) * 0.3).to(dtype)]  # fmt: skip
    if four_bit:
        experts = kernel.quantize_experts_4bit(_Experts4bit(gate_up, down), blocksize=64)
        gate_up, down = experts.gate_up_proj, experts.down_proj
    trainable = [x, weights, *lora] + ([] if rank or four_bit else [gate_up, down])
    grad_out = torch.randn(x.shape, generator=g).to(dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in trainable]
        base = (gate_up, down) if rank or four_bit else leaves[-2:]
        out = kernel.moe_experts_forward(
            leaves[0], *base, ids, leaves[1], check_ids=False, gate_up_lora=tuple(leaves[2:4]) if rank else None,
            down_lora=tuple(leaves[4:6]) if rank else None,
        )  # fmt: skip
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    monkeypatch.setattr(kernel.tuning, "FUSE_DSWIGLU", False)
    monkeypatch.setattr(kernel.tuning, "SORT_BEFORE_DW", False)
    monkeypatch.setattr(kernel.tuning, "SORT_BEFORE_DW_ROWS_PER_EXPERT", 0)  # these few rows: sorted too
    plain = run()
    monkeypatch.setattr(kernel.tuning, "FUSE_DSWIGLU", True)
    fused = run()
    assert torch.equal(fused[0], plain[0])  # the forward is untouched
    # The routing-weight gradient sums I products in another order (the fused epilogue a
    # quarter of its column tile at a time): float32 rounding of terms larger than their sum.
    for i, (a, b) in enumerate(zip(fused[1:], plain[1:])):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-3), i
    monkeypatch.setattr(kernel.tuning, "FUSE_DSWIGLU", False)
    lookup = kernel.tuning.dw_config
    copies = []
    expand = kernel.functional.expand_launch
    monkeypatch.setattr(kernel.functional, "expand_launch", lambda *a: copies.append(1) or expand(*a))
    base_dw = not (rank or four_bit)  # the copies serve the base weights' dW GEMMs only
    for options, sort_first in ((dict(persistent=1), False), (dict(), True), (dict(tma=True), True)):
        monkeypatch.setattr(kernel.tuning, "SORT_BEFORE_DW", sort_first)
        monkeypatch.setattr(kernel.functional, "dw_config", lambda *a, o=options, **kw: replace(lookup(*a, **kw), **o))
        copies.clear()
        for i, (a, b) in enumerate(zip(run(), plain)):
            assert torch.equal(a, b), (options, sort_first, i)
        assert len(copies) == (2 if sort_first and base_dw and shape[0] > 0 else 0), options
    # Below SORT_BEFORE_DW_ROWS_PER_EXPERT rows per expert the dW GEMMs gather as before.
    monkeypatch.setattr(kernel.tuning, "SORT_BEFORE_DW_ROWS_PER_EXPERT", 10**6)
    copies.clear()
    run()
    assert not copies

