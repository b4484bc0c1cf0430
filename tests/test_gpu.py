"""GPU tests (bf16, the Qwen3-30B-A3B block shape). Run on a CUDA machine: make test-gpu."""

from dataclasses import replace

import pytest
import torch

from reference import moe_experts_reference, random_routing, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN3_30B = dict(hidden=2048, inter=768, num_experts=128, top_k=8)


def _inputs(num_tokens, hidden, inter, num_experts, top_k, mode="random", dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    ids, weights = random_routing(num_tokens, num_experts, top_k, mode, generator=g)
    return [t.cuda() for t in (x.to(dtype), gate_up.to(dtype), down.to(dtype), ids, weights.to(dtype))]


def _transformers_experts(impl, gate_up, down):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    num_experts, two_inter, hidden = gate_up.shape
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=num_experts)
    config._experts_implementation = impl
    experts = Qwen3MoeExperts(config).to(device=gate_up.device, dtype=gate_up.dtype)
    experts.gate_up_proj.data.copy_(gate_up)
    experts.down_proj.data.copy_(down)
    return experts


def _grads(fn, x, gate_up, down, ids, weights, grad_out, dtype=None):
    """Output and gradients of x, gate_up, down, weights; leaves cast to dtype if given (float64 reference)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, gate_up, down, weights)]
    out = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("num_tokens,mode", [(2048, "random"), (1, "random"), (512, "one"), (777, "skip")])
def test_block_bf16_vs_float64_and_grouped_mm(kernel, num_tokens, mode):
    x, gate_up, down, ids, weights = _inputs(num_tokens, **QWEN3_30B, mode=mode)
    grad_out = torch.randn_like(x)
    ours = _grads(kernel.moe_experts_forward, x, gate_up, down, ids, weights, grad_out)
    ref = _grads(moe_experts_reference, x, gate_up, down, ids, weights, grad_out, torch.float64)
    with torch.no_grad():
        grouped_mm = _transformers_experts("grouped_mm", gate_up, down)(x, ids, weights)
        eager = _transformers_experts("eager", gate_up, down)(x, ids, weights)
    err_ours, err_grouped_mm = rel_err(ours[0], ref[0]), rel_err(grouped_mm, ref[0])
    print(f"\nT={num_tokens} {mode}: forward rel err vs float64: ours {err_ours:.2e}, grouped_mm {err_grouped_mm:.2e}; "
          f"vs eager bf16: ours {rel_err(ours[0], eager):.2e}, grouped_mm {rel_err(grouped_mm, eager):.2e}; "
          "grads (x, gate_up, down, weights) " + " ".join(f"{rel_err(a, b):.2e}" for a, b in zip(ours[1:], ref[1:])))
    assert err_ours <= 1.05 * err_grouped_mm
    # grouped_mm can equal eager bit for bit (all tokens on one expert): then compare with its usual 4e-3.
    assert rel_err(ours[0], eager) <= max(1.05 * rel_err(grouped_mm, eager), 4.5e-3)
    for name, a, b in zip(("x", "gate_up", "down", "weights"), ours[1:], ref[1:]):
        assert rel_err(a, b) < 8e-3, name


def test_odd_shapes_bf16(kernel):
    x, gate_up, down, ids, weights = _inputs(333, hidden=1000, inter=350, num_experts=60, top_k=6)
    grad_out = torch.randn_like(x)
    ours = _grads(kernel.moe_experts_forward, x, gate_up, down, ids, weights, grad_out)
    ref = _grads(moe_experts_reference, x, gate_up, down, ids, weights, grad_out, torch.float64)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 8e-3


def test_empty_batch_cuda(kernel):
    x, gate_up, down, ids, weights = _inputs(0, 64, 32, 4, 2)
    assert kernel.moe_experts_forward(x, gate_up, down, ids, weights).shape == (0, 64)


def test_no_int32_overflow(kernel):
    """T * K * H > 2**31: row offsets must be 64-bit."""
    num_tokens = 140000
    x, gate_up, down, ids, weights = _inputs(num_tokens, **QWEN3_30B)
    assert num_tokens * QWEN3_30B["top_k"] * QWEN3_30B["hidden"] > 2**31
    with torch.no_grad():
        out = kernel.moe_experts_forward(x, gate_up, down, ids, weights)
    sample = torch.cat([torch.arange(8), torch.randint(0, num_tokens, (56,)), torch.arange(num_tokens - 8, num_tokens)]).cuda()
    expected = moe_experts_reference(x[sample], gate_up, down, ids[sample], weights[sample])
    assert rel_err(out[sample], expected) < 8e-3


def test_torch_compile_fullgraph(kernel):
    x, gate_up, down, ids, weights = _inputs(256, **QWEN3_30B)
    grad_out = torch.randn_like(x)
    compiled = torch.compile(kernel.moe_experts_forward, fullgraph=True)  # check_ids is skipped while compiling
    eager = _grads(kernel.moe_experts_forward, x, gate_up, down, ids, weights, grad_out)
    traced = _grads(compiled, x, gate_up, down, ids, weights, grad_out)
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)


def test_cuda_graph_replay(kernel):
    """Forward + backward have no host synchronization: they capture in a CUDA graph."""
    x, gate_up, down, ids, weights = _inputs(512, **QWEN3_30B)
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up, down, weights)]
    grad_out = torch.randn_like(x)

    def step():
        for t in leaves:
            t.grad = None
        out = kernel.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        out.backward(grad_out)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    # Replay on new data: results must follow the inputs.
    x2, gate_up2, down2, ids2, weights2 = _inputs(512, **QWEN3_30B, seed=1)
    for leaf, new in zip(leaves, (x2, gate_up2, down2, weights2)):
        leaf.data.copy_(new)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    expected = _grads(kernel.moe_experts_forward, x2, gate_up2, down2, ids2, weights2, grad_out)
    assert torch.equal(out, expected[0])
    for leaf, g in zip(leaves, expected[1:]):
        assert torch.equal(leaf.grad, g)


def _lora_reference(x, gate_up, down, ids, weights, gate_up_lora, down_lora):
    """float64: the LoRA-merged weights through the dense reference."""
    merge = lambda w, lora: w.double() + torch.einsum("eor,eri->eoi", lora[1].double(), lora[0].double())  # noqa: E731
    return moe_experts_reference(x, merge(gate_up, gate_up_lora), merge(down, down_lora), ids, weights)


def _lora_bf16_errors(kernel, x, gate_up, down, ids, weights, dense_gate_up, dense_down):
    """LoRA r = 16 on both expert tensors of (gate_up, down), bf16: relative errors of the
    output and of the gradients (x, gate_up A, gate_up B, down A, down B) against float64 on
    the dense weights (dense_gate_up, dense_down)."""
    num_experts, hidden, inter, rank = QWEN3_30B["num_experts"], QWEN3_30B["hidden"], QWEN3_30B["inter"], 16
    g = torch.Generator().manual_seed(2)

    def factor(*shape, fan_in):
        return (torch.randn(*shape, generator=g) * fan_in**-0.5).to(torch.bfloat16).cuda().requires_grad_()

    gate_up_lora = (factor(num_experts, rank, hidden, fan_in=hidden), factor(num_experts, 2 * inter, rank, fan_in=rank))
    down_lora = (factor(num_experts, rank, inter, fan_in=inter), factor(num_experts, hidden, rank, fan_in=rank))
    x = x.requires_grad_()
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights, gate_up_lora=gate_up_lora, down_lora=down_lora)
    leaves = [x, *gate_up_lora, *down_lora]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _lora_reference(ref_leaves[0], dense_gate_up, dense_down, ids, weights, ref_leaves[1:3], ref_leaves[3:5])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    return rel_err(out, ref), [rel_err(a, b) for a, b in zip(grads, ref_grads)]


LORA_GRADS = ("x", "gate_up A", "gate_up B", "down A", "down B")


@pytest.mark.parametrize("num_tokens", [1, 2048])
def test_lora_bf16(kernel, num_tokens):
    """LoRA r = 16 on both expert tensors, frozen base, bf16 on the 30B-A3B shape."""
    x, gate_up, down, ids, weights = _inputs(num_tokens, **QWEN3_30B)
    out_err, grad_errs = _lora_bf16_errors(kernel, x, gate_up, down, ids, weights, gate_up, down)
    assert out_err < 8e-3
    for name, err in zip(LORA_GRADS, grad_errs):
        assert err < 1e-2, name


@pytest.mark.parametrize("num_tokens", [1, 512, 4096])
@pytest.mark.parametrize("path", ["fused", "dequantize-first"])
def test_4bit_bf16(kernel, monkeypatch, num_tokens, path):
    """4-bit experts (quantize_experts_4bit) + LoRA r = 16, bf16, 30B-A3B shape: output and
    gradients against float64 on bitsandbytes' dequantized weights, both 4-bit paths."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    threshold = 0 if path == "dequantize-first" else 10**9
    monkeypatch.setattr(kernel.tuning, "DEQUANTIZE_FIRST_ROWS_PER_EXPERT", threshold)
    x, gate_up, down, ids, weights = _inputs(num_tokens, **QWEN3_30B)
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(gate_up.clone(), requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down.clone(), requires_grad=False)
    kernel.quantize_experts_4bit(experts)
    dense = [dequantize_4bit(*quantize_4bit(w, blocksize=64, quant_type="nf4"), quant_type="nf4") for w in (gate_up, down)]
    out_err, grad_errs = _lora_bf16_errors(kernel, x, experts.gate_up_proj, experts.down_proj, ids, weights, *dense)
    print(f"\n4-bit {path} T={num_tokens}: rel err out {out_err:.2e}, grads " + " ".join(f"{e:.2e}" for e in grad_errs))
    assert out_err < 8e-3
    for name, err in zip(LORA_GRADS, grad_errs):
        assert err < 1e-2, name


@pytest.mark.parametrize("option", ["tma_b", "persistent", "dw:tma", "dw:persistent"])
def test_gemm_options_bit_equal(kernel, monkeypatch, option):
    """The routed GEMMs give the same bits with a config option on or off: expert weights
    through a TMA descriptor (tma_b), a persistent grid (persistent); so do the weight-gradient
    GEMMs (dw:): the sorted operand through a TMA descriptor, a persistent grid; forward and
    all gradients, 30B-A3B shape."""
    x, gate_up, down, ids, weights = _inputs(2048, **QWEN3_30B)
    grad_out = torch.randn_like(x)
    dw = option.startswith("dw:")
    field = option.removeprefix("dw:")
    name = "dw_config" if dw else "gemm_config"
    lookup = getattr(kernel.functional, name)
    kinds = ("gate_up_dw", "down_dw") if dw else ("gate_up", "down", "down_dx", "gate_up_dx")

    def forced(value):
        def config(kind, *args, **kwargs):
            cfg = lookup(kind, *args, **kwargs)
            if kind in kinds:
                cfg = replace(cfg, **{field: type(getattr(cfg, field))(value)})
            return cfg

        return config

    results = []
    for value in (0, 1):
        monkeypatch.setattr(kernel.functional, name, forced(value))
        results.append(_grads(kernel.moe_experts_forward, x, gate_up, down, ids, weights, grad_out))
    for off, on in zip(*results):
        assert torch.equal(off, on)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(4096, 128, 8), (1, 128, 8), (2048, 512, 10), (300, 160, 8)])
def test_router_topk_bf16(kernel, num_tokens, num_experts, top_k):
    """bf16 router logits (as the Qwen3 MoE routers make them): many exact ties, which torch.topk
    orders as it likes. Ours must pick a top-k set (its probabilities equal torch's top-k values,
    sorted), agree with torch wherever the two pick the same experts, and give the logits'
    gradient of the float64 formula for the experts it picked."""
    g = torch.Generator().manual_seed(num_tokens + num_experts)
    x = torch.randn(num_tokens, 2048, generator=g).cuda().bfloat16()
    weight = (0.02 * torch.randn(num_experts, 2048, generator=g)).cuda().bfloat16()
    logits = (x @ weight.T).requires_grad_()
    scores, indices = kernel.router_topk(logits, top_k, normalize=True)
    probs = torch.softmax(logits.detach(), dtype=torch.float, dim=-1)
    ref_values, ref_indices = torch.topk(probs, top_k, dim=-1)
    picked = probs.gather(1, indices)
    assert torch.allclose(picked, ref_values, rtol=1e-6, atol=0)  # a top-k set, in decreasing order
    ref_scores = (ref_values / ref_values.sum(-1, keepdim=True)).bfloat16()
    same = (indices == ref_indices).all(-1)
    ours_sorted, ours_order = indices.sort(-1)
    ref_sorted, ref_order = ref_indices.sort(-1)
    same_set = (ours_sorted == ref_sorted).all(-1)
    print(f"\nrouter T={num_tokens} E={num_experts} K={top_k}: tokens with torch's indices {same.float().mean():.4f}, "
          f"with torch's set {same_set.float().mean():.4f}")
    # torch.topk on CUDA takes the lower ids among values equal to the K-th, as ours does; the
    # order inside the K slots may differ among equal values (their scores are equal too).
    assert same_set.float().mean() >= 0.9
    by_id, ref_by_id = scores.gather(1, ours_order), ref_scores.gather(1, ref_order)
    assert torch.allclose(by_id[same_set].float(), ref_by_id[same_set].float(), rtol=2**-7, atol=0)
    dscores = torch.randn(num_tokens, top_k, generator=g).cuda().bfloat16()
    scores.backward(dscores)
    ref_logits = logits.detach().double().requires_grad_()
    values = torch.softmax(ref_logits, -1).gather(1, indices)
    (values / values.sum(-1, keepdim=True)).backward(dscores.double())
    assert rel_err(logits.grad, ref_logits.grad) < 1e-2
