"""The kernelized model against Transformers' eager experts loop, end to end.

A tiny Qwen3 MoE checkpoint in the Hub's per-expert layout is loaded with `from_pretrained`
(Transformers fuses the experts at load time), kernelized from the Hub-layout build with
`kernels.kernelize`, and compared with the same checkpoint loaded with
`experts_implementation="eager"`: logits, loss (labels given), aux_loss
(output_router_logits) and the gradient of every parameter, router and attention included.
On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from kernels import Mode  # noqa: E402
from reference import rel_err  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tiny_model import (  # noqa: E402
    TINY_CONFIG,
    expected_fused_experts,
    kernel_activity,
    kernelize_moe,
    load_tiny,
    moe_blocks,
    runs_kernel_layer,
    sample_batch,
    triton_expected,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NUM_LAYERS, HIDDEN = TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["hidden_size"]
RTOL = 1e-5  # float32: relative (norm) error of every compared tensor


def _batch(device, batch=2, seq_len=11):
    return [t.to(device) for t in sample_batch(TINY_CONFIG["vocab_size"], batch, seq_len)]


def _train_step(model, batch, call=None):
    """One forward + backward of `model` (through `call`, e.g. its compiled version)."""
    input_ids, attention_mask, labels = batch
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, grads


def _assert_step_matches(out, grads, ref_out, ref_grads, rtol):
    assert out.aux_loss is not None and ref_out.aux_loss is not None
    assert rel_err(out.logits, ref_out.logits) <= rtol, "logits"
    assert rel_err(out.loss, ref_out.loss) <= rtol, "loss"
    assert rel_err(out.aux_loss, ref_out.aux_loss) <= rtol, "aux_loss"
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and grads[name] is not None, f"no gradient for {name}"
        assert ref_grad.abs().max() > 0, f"zero reference gradient for {name}"
        assert rel_err(grads[name], ref_grad) <= rtol, f"gradient of {name}: {rel_err(grads[name], ref_grad):.2e}"


def _assert_kernel_ran(activity, device, forwards, backwards):
    assert activity["ops"].get("experts_fwd") == forwards, activity
    assert activity["ops"].get("experts_bwd", 0) == backwards, activity
    if triton_expected(device):
        assert activity["launches"], f"no Triton kernel of the package was launched: {activity}"


@pytest.mark.kernels_ci
def test_checkpoint_is_per_expert_and_loads_fused(tiny_checkpoint):
    path, state = tiny_checkpoint
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)

    model = load_tiny(path)
    num_experts = TINY_CONFIG["num_experts"]
    for layer, block in enumerate(moe_blocks(model)):
        gate_up, down = expected_fused_experts(state, layer, num_experts)
        assert block.experts.gate_up_proj.shape == (num_experts, 2 * TINY_CONFIG["moe_intermediate_size"], HIDDEN)
        assert torch.equal(block.experts.gate_up_proj, gate_up)  # gate rows first, then up
        assert torch.equal(block.experts.down_proj, down)
        assert torch.equal(block.gate.weight, state[f"model.layers.{layer}.mlp.gate.weight"])

    # The random router spreads tokens unevenly over the experts (the kernels' interesting case).
    input_ids, attention_mask, _ = _batch("cpu")
    with torch.no_grad():
        router_logits = model(input_ids=input_ids, attention_mask=attention_mask).router_logits
    for logits in router_logits:
        counts = torch.bincount(logits.topk(TINY_CONFIG["num_experts_per_tok"]).indices.flatten(), minlength=num_experts)
        assert counts.max() > counts.min() + 2, counts


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
def test_training_matches_eager(kernel, tiny_checkpoint, device):
    path, _ = tiny_checkpoint
    ref = load_tiny(path, device=device).train()
    model = kernelize_moe(load_tiny(path, device=device).train(), Mode.TRAINING, device)
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(model))

    batch = _batch(device)
    ref_out, ref_grads = _train_step(ref, batch)
    with kernel_activity(kernel) as activity:
        out, grads = _train_step(model, batch)
    _assert_kernel_ran(activity, device, forwards=NUM_LAYERS, backwards=NUM_LAYERS)
    # The routers too (gate.py): their top-k softmax, forward and backward.
    assert activity["ops"].get("router_topk_fwd") == activity["ops"].get("router_topk_bwd") == NUM_LAYERS, activity
    _assert_step_matches(out, grads, ref_out, ref_grads, RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_and_generate_match_eager(kernel, tiny_checkpoint, device):
    path, _ = tiny_checkpoint
    ref = load_tiny(path, device=device).eval()
    model = kernelize_moe(load_tiny(path, device=device).eval(), Mode.INFERENCE, device)
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(model))
    input_ids, attention_mask, _ = _batch(device)

    with torch.no_grad():
        ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits
        with kernel_activity(kernel) as activity:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    _assert_kernel_ran(activity, device, forwards=NUM_LAYERS, backwards=0)
    assert rel_err(logits, ref_logits) <= RTOL

    # Greedy decoding with the KV cache: a prefill, then one token a step (T = 1 per block).
    prompt, new_tokens = input_ids[:1, :5], 4
    generate = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ref_tokens = ref.generate(prompt, **generate)
    with kernel_activity(kernel) as activity:
        tokens = model.generate(prompt, **generate)
    _assert_kernel_ran(activity, device, forwards=NUM_LAYERS * new_tokens, backwards=0)
    assert tokens.shape == (1, prompt.shape[1] + new_tokens)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(kernel, tiny_checkpoint, device):
    """Mode.TRAINING | Mode.TORCH_COMPILE, then the whole model compiled with fullgraph=True
    (Dynamo must trace the block's custom ops through their fake implementations, with no
    graph break) and trained one step: same logits, losses and gradients as eager.
    The aot_eager backend keeps the test fast; Inductor is checked on one block below."""
    path, _ = tiny_checkpoint
    ref = load_tiny(path, device=device).train()
    model = kernelize_moe(load_tiny(path, device=device).train(), Mode.TRAINING | Mode.TORCH_COMPILE, device)
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(model))
    batch = _batch(device)
    # Transformers installs its output-recording hooks (router logits) on the first call,
    # under a threading lock that Dynamo cannot trace: make that call eagerly.
    with torch.no_grad():
        model(input_ids=batch[0][:1, :3])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    ref_out, ref_grads = _train_step(ref, batch)
    with kernel_activity(kernel, record_ops=False) as activity:  # dispatch modes stop Dynamo
        out, grads = _train_step(model, batch, call=compiled)
    if triton_expected(device):
        assert activity["launches"], activity
    _assert_step_matches(out, grads, ref_out, ref_grads, RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_compiles_kernelized_block(kernel, tiny_checkpoint, device):
    """torch.compile's default backend (Inductor) on one kernelized block, forward and
    backward, fullgraph=True: no graph break, eager-equal output and gradients."""
    path, _ = tiny_checkpoint
    ref_block = moe_blocks(load_tiny(path, device=device))[0]
    model = kernelize_moe(load_tiny(path, device=device), Mode.TRAINING | Mode.TORCH_COMPILE, device)
    block = moe_blocks(model)[0]
    explanation = torch._dynamo.explain(block)(torch.randn(1, 3, HIDDEN, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)

    hidden = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(3)).to(device)
    x, x_ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    grad_out = torch.randn_like(hidden)
    with kernel_activity(kernel, record_ops=False) as activity:
        out = compiled(x)
        out.backward(grad_out)
    ref_out = ref_block(x_ref)
    ref_out.backward(grad_out)
    if triton_expected(device):
        assert activity["launches"], activity
    assert rel_err(out, ref_out) <= RTOL
    assert rel_err(x.grad, x_ref.grad) <= RTOL
    for (name, p), q in zip(block.named_parameters(), ref_block.parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL, name


@pytest.mark.parametrize("device", DEVICES)
def test_float16_training_is_as_close_as_eager(kernel, tiny_checkpoint, device):
    """float16 model: the kernelized step is no further from a float32 eager step than
    Transformers' own float16 eager step is (logits, loss, aux_loss, every gradient)."""
    path, _ = tiny_checkpoint
    ref32 = load_tiny(path, device=device).train()
    ref16 = load_tiny(path, dtype=torch.float16, device=device).train()
    model = kernelize_moe(copy.deepcopy(ref16), Mode.TRAINING, device)
    batch = _batch(device, batch=1, seq_len=9)

    out32, grads32 = _train_step(ref32, batch)
    out16, grads16 = _train_step(ref16, batch)
    with kernel_activity(kernel) as activity:
        out, grads = _train_step(model, batch)
    _assert_kernel_ran(activity, device, forwards=NUM_LAYERS, backwards=NUM_LAYERS)
    assert out.logits.dtype == torch.float16

    def check(name, ours, eager16, ref):
        ours_err, eager_err = rel_err(ours, ref), rel_err(eager16, ref)
        assert ours_err <= 1.5 * eager_err + 3e-4, f"{name}: ours {ours_err:.2e}, eager float16 {eager_err:.2e}"

    check("logits", out.logits, out16.logits, out32.logits)
    check("loss", out.loss, out16.loss, out32.loss)
    check("aux_loss", out.aux_loss, out16.aux_loss, out32.aux_loss)
    for name in grads32:
        check(f"gradient of {name}", grads[name], grads16[name], grads32[name])
