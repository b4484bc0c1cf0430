"""What a new user runs into first: bfloat16 under Triton's interpreter, degenerate shapes,
mixed dtypes on the PyTorch path, and 4-bit experts reaching code that cannot read them
(Transformers' own experts forward, save_pretrained, PEFT's merge): a clear error that says
what to do, and the documented alternative working."""

import copy

import pytest
import torch
from kernels import Mode
from reference import moe_experts_reference, random_routing, rel_err
from tiny_model import kernelize_moe, sample_batch, tiny_config

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Qwen3MoeForCausalLM  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _inputs(num_tokens=13, hidden=32, inter=24, num_experts=4, top_k=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5
    ids, weights = random_routing(num_tokens, num_experts, top_k, generator=generator)
    return [t.to(dtype) for t in (x, gate_up, down)] + [ids, weights]


def _tiny_model(dtype=torch.float32, seed=0, experts_implementation="eager"):
    torch.manual_seed(seed)
    config = tiny_config()
    config._experts_implementation = experts_implementation
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


# ---------------------------------------------------------------- bfloat16 under the interpreter


def test_bfloat16_moe_experts_forward(kernel):
    """bf16 inputs (the interpreter's bf16 tl.dot is wrong): computed in float32, rounded once,
    forward and gradients within bf16 rounding of float64 on the same bf16 values."""
    x, gate_up, down, ids, weights = _inputs(dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, gate_up, down)]
    out = kernel.moe_experts_forward(*leaves, ids, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    reference = [t.detach().double().requires_grad_() for t in leaves]
    expected = moe_experts_reference(*reference, ids, weights.bfloat16())
    assert rel_err(out, expected) <= 1e-2
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.bfloat16())
    expected.backward(grad.bfloat16().double())
    for ours, ref in zip(leaves, reference):
        assert ours.grad.dtype == torch.bfloat16 and rel_err(ours.grad, ref.grad) <= 2e-2


def test_bfloat16_grouped_gemm(kernel):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(10, 32, generator=generator), torch.randn(3, 16, 32, generator=generator)
    m_sizes = torch.tensor([4, 0, 6])
    out = kernel.grouped_gemm(x.bfloat16(), weight.bfloat16(), m_sizes)
    expected = torch.cat([x[:4].bfloat16().double() @ weight[0].bfloat16().double().T,
                          x[4:].bfloat16().double() @ weight[2].bfloat16().double().T])  # fmt: skip
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) <= 1e-2


def test_bfloat16_kernelized_model_matches_eager(kernel):
    """A bf16 tiny model kernelized on CPU gives bf16 eager logits within bf16 rounding."""
    model = _tiny_model(torch.bfloat16)
    input_ids, attention_mask, _ = sample_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
        kernelize_moe(model, Mode.INFERENCE)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.double() - expected).abs().max() <= 0.05 * expected.abs().max()


# ---------------------------------------------------------------- degenerate shapes, mixed dtypes


@pytest.mark.parametrize("path", ["triton", "pytorch"])
@pytest.mark.parametrize("case", ["T=0", "I=0", "K=0"])
def test_no_rows_backward(kernel, monkeypatch, path, case):
    """No row reaches a GEMM: zeros, connected to autograd, zero gradients for every input."""
    if path == "pytorch":
        monkeypatch.setattr(kernel.functional, "_use_triton", lambda t: False)
    num_tokens, inter, top_k = {"T=0": (0, 24, 2), "I=0": (7, 0, 2), "K=0": (7, 24, 0)}[case]
    x, gate_up, down, ids, weights = _inputs(num_tokens=num_tokens, inter=inter, top_k=max(top_k, 1))
    ids, weights = ids[:, :top_k], weights[:, :top_k]
    leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
    out = kernel.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    assert out.shape == x.shape and out.requires_grad and not out.any()
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any()


def test_pytorch_path_float16_hidden_float32_weights(kernel, monkeypatch):
    """As Transformers' eager loop: float16 hidden states with float32 routing weights."""
    monkeypatch.setattr(kernel.functional, "_use_triton", lambda t: False)
    x, gate_up, down, ids, weights = _inputs(dtype=torch.float16)
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights)
    assert out.dtype == torch.float16
    assert rel_err(out, moe_experts_reference(x, gate_up, down, ids, weights)) <= 2e-3


# ---------------------------------------------------------------- 4-bit experts where they cannot go


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_4bit_through_transformers_experts_forward(kernel, implementation):
    model = kernel.quantize_experts_4bit(_tiny_model(experts_implementation=implementation))
    with pytest.raises(RuntimeError, match='kernelize the model .*experts_implementation="qwen3_moe_fused"'):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_4bit_save_pretrained(kernel, tmp_path):
    """save_pretrained refuses with what to do; each alternative it names round-trips."""
    from safetensors.torch import load_model, save_model

    model = kernelize_moe(kernel.quantize_experts_4bit(_tiny_model(), blocksize=128), Mode.INFERENCE)
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    with pytest.raises(RuntimeError, match="4-bit experts cannot be split. From save_pretrained"):
        model.save_pretrained(tmp_path / "refused")

    # Lossless: safetensors of the model, loaded into a model quantized with the same blocksize.
    save_model(model, str(tmp_path / "model.safetensors"))
    loaded = kernel.quantize_experts_4bit(_tiny_model(seed=1), blocksize=128)
    load_model(loaded, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(kernelize_moe(loaded, Mode.INFERENCE)(input_ids=input_ids).logits, logits)

    # 16-bit: the values the 4-bit experts stand for, in Transformers' checkpoint layout.
    kernel.dequantize_experts_4bit(model).save_pretrained(tmp_path / "dense")
    dense = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "dense", experts_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(dense(input_ids=input_ids).logits, logits) <= 1e-5


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload", "safe_merge"])
def test_4bit_lora_merge(kernel, merge):
    """Merging into NF4 is refused with what to do; merging into the dequantized copy works
    and gives the unmerged model's outputs."""
    model = get_peft_model(kernel.quantize_experts_4bit(_tiny_model()), LoraConfig(r=4, target_parameters=TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    calls = {"merge_adapter": lambda m: m.merge_adapter(), "merge_and_unload": lambda m: m.merge_and_unload(),
             "safe_merge": lambda m: m.merge_adapter(safe_merge=True)}  # fmt: skip
    with pytest.raises(RuntimeError, match="dequantize_experts_4bit"):
        calls[merge](model)

    input_ids = torch.tensor([[2, 7, 1, 8, 2, 8]])
    kernel.dequantize_experts_4bit(model)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        merged = model.merge_and_unload()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert rel_err(merged(input_ids=input_ids).logits, unmerged) <= 1e-5


def test_4bit_storage_still_moves_copies_and_loads(kernel):
    """The guard refuses only dense reads: dtype casts, deepcopy, state_dict / load_state_dict
    and torch.save keep working on the 4-bit storage."""
    import io

    model = kernel.quantize_experts_4bit(_tiny_model())
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    copied = copy.deepcopy(model).half()
    copied.load_state_dict(torch.load(buffer))
    experts = copied.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.uint8 and kernel.quant.is_quantized(experts.gate_up_proj)
    assert torch.equal(experts.gate_up_proj, model.model.layers[0].mlp.experts.gate_up_proj)
