"""4-bit (NF4) experts through the package's GEMMs, and QLoRA with PEFT on them.

References nobody here wrote: bitsandbytes' `quantize_4bit` bytes, read by the NF4 definition
(nf4_reference.py), give the weights the 4-bit experts stand for; the float64 reference (reference.py), Transformers'
eager experts loop and PEFT's own LoRA compute with those dense weights. Our side quantizes
with `quantize_experts_4bit` and runs the fused dequant GEMMs (or dequantize-then-GEMM, the
large-batch path, forced here with a threshold of zero). On CPU the Triton kernels run in
Triton's interpreter (TRITON_INTERPRET=1), float32.
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from kernels import Mode  # noqa: E402
from nf4_reference import bnb_round_trip  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from reference import moe_experts_lora_reference, random_routing, rel_err  # noqa: E402
from test_lora import (  # noqa: E402
    EXPERT_PARAMS,
    RTOL,
    _assert_fused,
    _assert_step_matches,
    _batch,
    _embeds,
    _logits,
    _lora_config,
    _observe,
    _randomize_lora,
    _step,
    two_layer_checkpoint,
)
from tiny_model import kernelize_moe, load_tiny, moe_blocks  # noqa: E402


def bnb_dequantized(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """What bitsandbytes' NF4 bytes of a dense tensor stand for (the NF4 definition: its CPU
    dequantize_4bit is wrong on some CPUs, see nf4_reference.py)."""
    return bnb_round_trip(weight, blocksize)


class Experts(nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up.clone(), requires_grad=False)
        self.down_proj = nn.Parameter(down.clone(), requires_grad=False)


@pytest.fixture(params=["fused", "dequantize-first"])
def path(request, kernel, monkeypatch):
    """Which 4-bit path the kernels take: dequant in the GEMM loads, or dense weights first."""
    if request.param == "dequantize-first":
        monkeypatch.setattr(kernel.tuning, "DEQUANTIZE_FIRST_ROWS_PER_EXPERT", 0)
    return request.param


# ================================================================ functional API

SHAPES = [
    # (T, H, I, E, K, routing mode, blocksize); H 35 / I 21: blocks and byte pairs straddle rows
    pytest.param((37, 64, 40, 8, 3, "random", 64), id="H64-I40", marks=pytest.mark.kernels_ci),
    pytest.param((29, 35, 21, 3, 2, "random", 64), id="odd-H35-I21"),
    pytest.param((50, 32, 24, 8, 2, "skip", 128), id="experts-without-tokens-bs128"),
    pytest.param((33, 40, 16, 6, 2, "one", 64), id="one-hot-expert"),
    pytest.param((1, 64, 32, 4, 2, "random", 64), id="T1"),
    pytest.param((0, 64, 32, 4, 2, "random", 64), id="T0"),
]


def _inputs(num_tokens, hidden, inter, num_experts, top_k, mode, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    ids, weights = random_routing(num_tokens, num_experts, top_k, mode, generator=g)

    def factors(out_features, in_features):
        a = torch.randn(num_experts, rank, in_features, generator=g) * in_features**-0.5
        return a, torch.randn(num_experts, out_features, rank, generator=g) * (0.5 * rank**-0.5)

    return x, gate_up, down, ids, weights, factors(2 * inter, hidden), factors(hidden, inter)


@pytest.mark.parametrize("shape", SHAPES)
def test_moe_experts_forward_4bit(kernel, path, shape):
    """4-bit experts + LoRA: output and gradients (input, routing weights, LoRA A and B)
    against the float64 reference on bitsandbytes' dequantized weights."""
    *dims, blocksize = shape
    x, gate_up, down, ids, weights, gate_up_lora, down_lora = _inputs(*dims)
    experts = kernel.quantize_experts_4bit(Experts(gate_up, down), blocksize=blocksize)
    assert experts.gate_up_proj.dtype == torch.uint8 and experts.down_proj.dtype == torch.uint8
    dense = [bnb_dequantized(w, blocksize) for w in (gate_up, down)]

    leaves = [t.clone().requires_grad_() for t in (x, weights, *gate_up_lora, *down_lora)]
    ref_leaves = [t.double().requires_grad_() for t in (x, weights, *gate_up_lora, *down_lora)]
    out = kernel.moe_experts_forward(leaves[0], experts.gate_up_proj, experts.down_proj, ids, leaves[1],
                                     gate_up_lora=tuple(leaves[2:4]), down_lora=tuple(leaves[4:6]))  # fmt: skip
    expected = moe_experts_lora_reference(ref_leaves[0], *dense, ids, ref_leaves[1], ref_leaves[2:4], ref_leaves[4:6])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, expected) <= RTOL, f"output: {rel_err(out, expected):.2e}"
    if x.shape[0] == 0:
        return
    # The 4-bit weights differ materially from the dense ones they were quantized from.
    assert rel_err(moe_experts_lora_reference(x, gate_up, down, ids, weights), expected.detach()) > 1e-2

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    expected.backward(grad_out.double())
    for name, a, b in zip(["x", "weights", "gate_up A", "gate_up B", "down A", "down B"], leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) <= RTOL, f"gradient of {name}: {rel_err(a.grad, b.grad):.2e}"


def test_moe_experts_forward_4bit_no_lora_no_grad(kernel, path):
    x, gate_up, down, ids, weights, _, _ = _inputs(23, 64, 40, 8, 2, "random")
    experts = kernel.quantize_experts_4bit(Experts(gate_up, down))
    with torch.no_grad():
        out = kernel.moe_experts_forward(x, experts.gate_up_proj, experts.down_proj, ids, weights)
    expected = moe_experts_lora_reference(x, bnb_dequantized(gate_up), bnb_dequantized(down), ids, weights)
    assert rel_err(out, expected) <= RTOL


def test_4bit_needs_both_tensors_quantized(kernel):
    x, gate_up, down, ids, weights, _, _ = _inputs(5, 64, 32, 4, 2, "random")
    experts = kernel.quantize_experts_4bit(Experts(gate_up, down))
    with pytest.raises(ValueError, match="both be 4-bit"):
        kernel.moe_experts_forward(x, experts.gate_up_proj, down, ids, weights)
    with pytest.raises(ValueError, match=r"gate_up_proj must be \(E, 2I, H\)"):  # checked as the dense shape
        kernel.moe_experts_forward(x[:, :32], experts.gate_up_proj, experts.down_proj, ids, weights)


# ================================================================ models


def _dequantized_reference(path):
    """The tiny model with every expert tensor replaced by bitsandbytes' NF4 round trip."""
    model = load_tiny(path)
    with torch.no_grad():
        for block in moe_blocks(model):
            for name in EXPERT_PARAMS:
                param = getattr(block.experts, name)
                param.copy_(bnb_dequantized(param))
    return model


def test_4bit_model_matches_eager_on_dequantized_weights(kernel, two_layer_checkpoint, path):
    """Kernelized model with 4-bit experts: logits, loss, aux_loss and the gradients of every
    other parameter and of the input embeddings, against Transformers' eager loop."""
    ref = _dequantized_reference(two_layer_checkpoint).train()
    ours = kernelize_moe(kernel.quantize_experts_4bit(load_tiny(two_layer_checkpoint)), Mode.TRAINING).train()
    for block in moe_blocks(ours):
        assert all(getattr(block.experts, name).dtype == torch.uint8 for name in EXPERT_PARAMS)
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    _assert_fused(fwd, bwd, forwards=2, backwards=2)
    assert rel_err(out.logits, ref_out.logits) <= RTOL and rel_err(out.loss, ref_out.loss) <= RTOL
    assert rel_err(out.aux_loss, ref_out.aux_loss) <= RTOL
    ref_grads = {k: v for k, v in ref_grads.items() if not k.endswith(EXPERT_PARAMS)}  # frozen in ours
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:  # the embedding table: the step feeds inputs_embeds
            assert grads[name] is None, name
            continue
        assert rel_err(grads[name], ref_grad) <= RTOL, name


@pytest.mark.parametrize("order", ["quantize-first", "peft-first"])
def test_qlora_matches_peft_on_dequantized_weights(kernel, two_layer_checkpoint, order):
    """QLoRA: PEFT target_parameters LoRA (rslora) on 4-bit experts, kernelized, against PEFT's
    own LoRA on a model holding bitsandbytes' dequantized weights; then the adapter, saved by
    PEFT, loads into that 16-bit model with the same outputs."""
    config = _lora_config(r=4, lora_alpha=8, use_rslora=True)
    ref = get_peft_model(_dequantized_reference(two_layer_checkpoint), copy.deepcopy(config))
    if order == "quantize-first":
        ours = get_peft_model(kernel.quantize_experts_4bit(load_tiny(two_layer_checkpoint)), copy.deepcopy(config))
    else:
        ours = kernel.quantize_experts_4bit(get_peft_model(load_tiny(two_layer_checkpoint), copy.deepcopy(config)))
    ours = kernelize_moe(ours, Mode.TRAINING)
    for model in (ref, ours):
        _randomize_lora(model)
        model.train()
    ref_shapes = {k: v.shape for k, v in ref.named_parameters() if v.requires_grad}
    assert {k: v.shape for k, v in ours.named_parameters() if v.requires_grad} == ref_shapes
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    _assert_fused(fwd, bwd, forwards=2, backwards=2)
    _assert_step_matches(out, grads, ref_out, ref_grads)


def test_qlora_adapter_loads_into_16bit_model(kernel, two_layer_checkpoint, tmp_path):
    ours = get_peft_model(kernel.quantize_experts_4bit(load_tiny(two_layer_checkpoint)), _lora_config())
    ours = kernelize_moe(ours, Mode.INFERENCE).eval()
    _randomize_lora(ours)
    batch = _batch()
    logits, activity = _logits(ours, batch, lambda: _observe(kernel))
    _assert_fused(activity, forwards=2)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_dequantized_reference(two_layer_checkpoint), tmp_path / "adapter").eval()
    loaded_logits, _ = _logits(loaded, batch)
    assert rel_err(loaded_logits, logits) <= RTOL


def test_qlora_with_bitsandbytes_linear_layers(kernel, two_layer_checkpoint):
    """The QLoRA setup users have: from_pretrained with BitsAndBytesConfig(load_in_4bit=True)
    and device_map (bitsandbytes quantizes the linear layers), then quantize_experts_4bit and
    kernelize, then PEFT on attention and experts; against the same bitsandbytes model with
    the experts replaced by bitsandbytes' dequantized values and Transformers' eager loop."""
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load():
        return load_tiny(two_layer_checkpoint, quantization_config=bnb_config, device_map="cpu")

    config = _lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    reference = load()
    assert type(reference.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        for block in moe_blocks(reference):
            for name in EXPERT_PARAMS:
                getattr(block.experts, name).copy_(bnb_dequantized(getattr(block.experts, name)))
    ref = get_peft_model(reference, copy.deepcopy(config))
    ours = get_peft_model(kernelize_moe(kernel.quantize_experts_4bit(load()), Mode.TRAINING), copy.deepcopy(config))
    for model in (ref, ours):
        _randomize_lora(model)
        model.train()
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    _assert_fused(fwd, bwd, forwards=2, backwards=2)
    _assert_step_matches(out, grads, ref_out, ref_grads)
    assert any("q_proj.lora_A" in k for k in grads)


def test_dequantize_skips_experts_without_rows(kernel):
    """The dequantize-first path dequantizes only experts that received rows (the routing's
    cumulative offsets); theirs equal the full dequantization."""
    weight = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(0))
    codes, absmax = kernel.quant.quantize_nf4(weight, 64)
    offsets = torch.tensor([0, 3, 3, 7, 7], dtype=torch.int32)  # experts 1 and 3 have no rows
    full = kernel.quant.dequantize_nf4(codes, absmax, weight.shape, torch.float32, 64)
    out = kernel.quant.dequantize_nf4(codes, absmax, weight.shape, torch.float32, 64, expert_offsets=offsets)
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
    assert torch.equal(full.double(), bnb_dequantized(weight).double())
