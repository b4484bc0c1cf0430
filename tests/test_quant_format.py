"""The 4-bit NF4 format of the expert tensors (quant/nf4.py) and its storage on the model
(quant/experts.py), against bitsandbytes itself and the NF4 definition (nf4_reference.py).

- `quantize_nf4` gives the bytes of bitsandbytes' `quantize_4bit(..., quant_type="nf4",
  compress_statistics=False)` (packed codes and absmax) and `dequantize_nf4` the values the NF4
  definition gives those bytes (and bitsandbytes' CPU `dequantize_4bit`, where this machine's
  bitsandbytes agrees with the definition), for float32 / float16 / bfloat16, blocksizes 64 and 128, numel a multiple
  of the blocksize or not (odd too), with exact zeros, all-zero blocks, values at the block max
  and values exactly on the thresholds between two NF4 values;
- the Triton dequant kernel (TRITON_INTERPRET=1 on CPU) gives the torch path's bits;
- the CUDA flavour of quantization (bitsandbytes' CUDA kernel differs from its CPU path in
  corner cases), run on CPU against those corner cases; it is compared with bitsandbytes'
  CUDA kernel itself in the GPU tests;
- `quantize_experts_4bit` on a tiny Qwen3 MoE model, a PEFT model (either order), a bare MoE
  block and a bare experts module: `nf4_weight` views hold bitsandbytes' bytes, LoRA factors
  get the dense shapes, `dequantize_experts_4bit` restores bitsandbytes' values; dtype casts,
  device moves and a safetensors round trip keep the storage exact; errors.
"""

import copy
import math
import os
import struct
from fractions import Fraction

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_model, save_file  # noqa: E402
from nf4_reference import bnb_dequantize_checked, bnb_quantize, bnb_round_trip, nf4_definition  # noqa: E402
from tiny_model import tiny_config  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# numel: a multiple of 128; of 64 only; of neither (even); odd; shorter than one block.
SHAPES = [(4, 256), (5, 64), (5, 50), (3, 5, 33), (7,)]
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

# bitsandbytes' own table (not ours) and the thresholds its CPU path uses.
BNB_NF4 = bnb_functional.get_4bit_type("nf4", device="cpu")
BNB_MIDPOINTS = (BNB_NF4[:-1] + BNB_NF4[1:]) / 2
# The thresholds of bitsandbytes' CUDA kernel: the decimal literals of dQuantizeNF4 (csrc).
CUDA_LITERALS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
]  # fmt: skip


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t`: equal bits, not just equal values (-0.0 vs 0.0)."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def awkward_tensor(shape, blocksize: int, dtype, seed: int = 0) -> torch.Tensor:
    """Random values plus the cases that matter: exact zeros, an all-zero block, a block with
    its max twice and negative, a block of absmax 1 holding exactly the thresholds between
    NF4 values and the NF4 values themselves (x / absmax is then the threshold itself)."""
    generator = torch.Generator().manual_seed(seed)
    flat = 0.05 * torch.randn(math.prod(shape), generator=generator)
    flat[::7] = 0.0
    blocks = flat[: flat.numel() // blocksize * blocksize].view(-1, blocksize)
    if len(blocks) > 1:
        blocks[1] = 0.0
    if len(blocks) > 2:
        blocks[2, 3] = blocks[2, 9] = -2 * blocks[2].abs().max()
    if len(blocks) > 3:
        special = torch.cat([torch.tensor([1.0]), BNB_MIDPOINTS, BNB_NF4, -BNB_MIDPOINTS])
        blocks[3, : len(special)] = special[:blocksize]
    return flat.view(shape).to(dtype)


def tiny_model(dtype=torch.float32, seed: int = 0):
    """A randomly initialized tiny Qwen3 MoE model (2 layers, 8 experts, H 64, I 40)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(tiny_config()).to(dtype)


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"]


def dense_experts(model) -> dict:
    """{(module index, name): a copy of the dense tensor}."""
    modules = experts_modules(model)
    return {(i, n): getattr(m, n).detach().clone() for i, m in enumerate(modules) for n in EXPERT_TENSORS}


def check_quantized_like_bnb(kernel, model, dense: dict, blocksize: int = 64):
    """Every expert tensor of `model` is our 4-bit storage holding bitsandbytes' bytes of `dense`."""
    for (i, name), original in dense.items():
        param = getattr(experts_modules(model)[i], name)
        assert isinstance(param, nn.Parameter) and not param.requires_grad
        assert param.dtype == torch.uint8 and param.dim() == 1
        assert kernel.quant.is_quantized(param)
        assert param.quant_type == "nf4" and param.quant_shape == original.shape == param.ds_shape
        assert param.quant_dtype == original.dtype and param.quant_blocksize == blocksize
        weight = kernel.quant.nf4_weight(param)
        packed, state = bnb_quantize(original, blocksize)
        assert torch.equal(weight.codes, packed.view(-1))
        assert torch.equal(bits(weight.absmax), bits(state.absmax))
        assert weight.shape == tuple(original.shape) and weight.dtype == original.dtype
        # Views into the one storage tensor, with zero padding between codes and absmax.
        assert weight.codes.data_ptr() == param.data_ptr()
        assert weight.absmax.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        gap = param[weight.codes.numel() : weight.absmax.data_ptr() - param.data_ptr()]
        assert gap.numel() < 16 and not gap.any()


# ------------------------------------------------------------------ format: against bitsandbytes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_nf4_matches_bnb(kernel, dtype, blocksize, shape):
    t = awkward_tensor(shape, blocksize, dtype)
    codes, absmax = kernel.quant.quantize_nf4(t, blocksize)
    packed, state = bnb_quantize(t, blocksize)
    assert codes.shape == packed.shape == ((t.numel() + 1) // 2, 1) and codes.dtype == torch.uint8
    assert torch.equal(codes, packed)
    assert absmax.shape == (math.ceil(t.numel() / blocksize),) and absmax.dtype == torch.float32
    assert torch.equal(bits(absmax), bits(state.absmax))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nf4_matches_definition(kernel, dtype, blocksize, shape):
    """Any output dtype, whatever the input was: value = NF4[idx] * absmax in float32, rounded once."""
    t = awkward_tensor(shape, blocksize, torch.float32, seed=1)
    codes, absmax = kernel.quant.quantize_nf4(t, blocksize)
    out = kernel.quant.dequantize_nf4(codes, absmax, shape, dtype, blocksize)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(bits(out), bits(bnb_round_trip(t, blocksize, dtype)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nf4_matches_bnb(kernel, dtype, blocksize, shape):
    """bitsandbytes' own CPU dequantize_4bit, where it keeps to the definition on this machine."""
    t = awkward_tensor(shape, blocksize, torch.float32, seed=1)
    codes, absmax = kernel.quant.quantize_nf4(t, blocksize)
    packed, state = bnb_quantize(t, blocksize)
    state.dtype = dtype
    expected = bnb_dequantize_checked(packed, state)
    assert torch.equal(bits(kernel.quant.dequantize_nf4(codes, absmax, shape, dtype, blocksize)), bits(expected))


def test_bnb_disagreement_is_detected(monkeypatch):
    """The CPU guard: a bitsandbytes dequantize_4bit that is off its own codes x absmax (as on
    some CPUs) skips the comparison instead of failing it, and never changes the reference."""
    t = awkward_tensor((5, 64), 128, torch.float32)
    packed, state = bnb_quantize(t, 128)
    reference = nf4_definition(packed, state.absmax, t.shape, t.dtype, 128)
    original = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: original(*a, **k) + 0.5)
    with pytest.raises(pytest.skip.Exception, match="disagrees with its own codes"):
        bnb_dequantize_checked(packed, state)
    assert torch.equal(bits(bnb_round_trip(t, 128)), bits(reference))


@pytest.mark.parametrize("length", [64, 70, 71, 128])
def test_all_zero_tensor_matches_bnb(kernel, length):
    """CPU: indices 7 (0.0); absmax 0, or 1e-38 for a short last block (bitsandbytes clamps it)."""
    t = torch.zeros(length)
    t[::3] = -0.0
    codes, absmax = kernel.quant.quantize_nf4(t, 64)
    packed, state = bnb_quantize(t, 64)
    assert torch.equal(codes, packed) and torch.equal(bits(absmax), bits(state.absmax))
    out = kernel.quant.dequantize_nf4(codes, absmax, t.shape, torch.float32, 64)
    assert torch.equal(bits(out), bits(bnb_round_trip(t, 64)))


def test_chunked_matches_bnb(kernel, monkeypatch):
    """Tensors of several chunks (a few million values each, 128 here) give the same bytes and values."""
    monkeypatch.setattr(kernel.quant.nf4, "_CHUNK", 128)
    for shape in [(5, 50), (3, 5, 33), (4, 256)]:
        t = awkward_tensor(shape, 64, torch.bfloat16, seed=4)
        codes, absmax = kernel.quant.quantize_nf4(t, 64)
        packed, state = bnb_quantize(t, 64)
        assert torch.equal(codes, packed) and torch.equal(bits(absmax), bits(state.absmax))
        out = torch.empty(shape, dtype=torch.bfloat16)
        kernel.quant.nf4._dequantize_nf4_torch(codes.view(-1), absmax, out.view(-1), 64)
        assert torch.equal(bits(out), bits(bnb_round_trip(t, 64)))


def test_nf4_code_is_bnb(kernel):
    assert torch.equal(bits(kernel.quant.NF4_CODE), bits(BNB_NF4.float()))
    assert torch.equal(kernel.quant.nf4_code_table("cpu"), kernel.quant.NF4_CODE)


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 33), (7,), (2, 3000)], ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dequantize_equals_torch(kernel, dtype, blocksize, shape):
    """The Triton kernel (taken on CUDA and under TRITON_INTERPRET=1) gives the torch path's bits;
    scale 1e3 puts values where bfloat16 rounding matters."""
    nf4 = kernel.quant.nf4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = 1e3 * awkward_tensor(shape, blocksize, torch.float32, seed=2).to(device)
    codes, absmax = nf4.quantize_nf4(t, blocksize)
    expected = torch.empty(shape, dtype=dtype, device=device)
    nf4._dequantize_nf4_torch(codes.view(-1), absmax, expected.view(-1), blocksize)
    assert torch.equal(bits(nf4.dequantize_nf4(codes, absmax, shape, dtype, blocksize)), bits(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_bnb_cuda(kernel, dtype, blocksize):
    """On a GPU against bitsandbytes' CUDA kernels: the corner cases, and 16M random values so
    that one-ulp differences (reciprocal, thresholds) would show."""
    for t in (awkward_tensor((7, 3 * blocksize + 5), blocksize, dtype), torch.randn(1 << 24).to(dtype)):
        t = t.cuda()
        codes, absmax = kernel.quant.quantize_nf4(t, blocksize)
        packed, state = bnb_quantize(t, blocksize)
        assert torch.equal(codes, packed) and torch.equal(bits(absmax), bits(state.absmax))
        for out_dtype in DTYPES:
            out = kernel.quant.dequantize_nf4(codes, absmax, t.shape, out_dtype, blocksize)
            state.dtype = out_dtype
            assert torch.equal(bits(out), bits(bnb_functional.dequantize_4bit(packed, state)))


# ------------------------------------------------------------------ the CUDA flavour, on CPU


def _nearest_float32(decimal: str) -> float:
    """The float32 nearest to the decimal (what nvcc makes of a float literal), computed exactly."""
    exact = Fraction(decimal)
    as_bits = struct.unpack("<I", struct.pack("<f", float(exact)))[0]
    candidates = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (as_bits - 1, as_bits, as_bits + 1)]
    return min(candidates, key=lambda c: abs(Fraction(c) - exact))


def _quantize_like_cuda(nf4, t: torch.Tensor, blocksize: int = 64):
    codes = torch.empty((t.numel() + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(math.ceil(t.numel() / blocksize), dtype=torch.float32)
    nf4.quantize_nf4_into(t, codes, absmax, blocksize, like_cuda=True)
    return codes, absmax


def test_cuda_flavour_corner_cases(kernel):
    nf4 = kernel.quant.nf4
    # Its thresholds are bitsandbytes' CUDA literals rounded straight to float32 (4 of them one
    # ulp away from the float32 midpoints of the CPU path).
    cuda_midpoints = torch.tensor([_nearest_float32(d) for d in CUDA_LITERALS])
    assert torch.equal(bits(nf4._MIDPOINTS_CUDA), bits(cuda_midpoints))
    assert (nf4._MIDPOINTS_CUDA != BNB_MIDPOINTS).sum() == 4

    # A value on a threshold gets the lower index (x > threshold is false), like the CPU path.
    block = torch.zeros(64)
    block[0], block[1:16], block[16:31] = 1.0, cuda_midpoints, BNB_MIDPOINTS
    codes, absmax = _quantize_like_cuda(nf4, block)
    idx = torch.stack((codes >> 4, codes & 0xF), 1).view(-1).long()
    assert idx[1:16].tolist() == list(range(15))
    higher = (BNB_MIDPOINTS > cuda_midpoints).long()  # the CPU threshold is past the CUDA one: next index
    assert idx[16:31].tolist() == (torch.arange(15) + higher).tolist()

    # All-zero blocks (whole and short): 0 * (1 / 0) is nan, every comparison false: index 0.
    codes, absmax = _quantize_like_cuda(nf4, torch.zeros(64 + 7))
    assert not codes.any() and not absmax.any()
    out = nf4.dequantize_nf4(codes, absmax, (71,), torch.float32, 64)
    assert torch.equal(bits(out), bits(torch.full((71,), -0.0)))

    # Elsewhere it agrees with the CPU path (random data, whole blocks).
    t = torch.randn(64 * 50, generator=torch.Generator().manual_seed(3))
    codes, absmax = _quantize_like_cuda(nf4, t)
    cpu_codes, cpu_absmax = nf4.quantize_nf4(t, 64)
    assert torch.equal(codes, cpu_codes.view(-1)) and torch.equal(absmax, cpu_absmax)


# ------------------------------------------------------------------ storage on the model


def test_quantize_experts_tiny_model(kernel):
    model = tiny_model()
    dense = dense_experts(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" not in n}
    assert kernel.quantize_experts_4bit(model) is model
    check_quantized_like_bnb(kernel, model, dense)
    for name, param in model.named_parameters():  # nothing else changed
        if "experts" not in name:
            assert torch.equal(param, others[name]) and param.requires_grad

    # Quantizing again leaves the 4-bit tensors as they are.
    before = [getattr(m, n) for m in experts_modules(model) for n in EXPERT_TENSORS]
    kernel.quantize_experts_4bit(model, blocksize=128)
    assert all(a is b for a, b in zip(before, [getattr(m, n) for m in experts_modules(model) for n in EXPERT_TENSORS]))

    assert kernel.dequantize_experts_4bit(model) is model
    for (i, name), original in dense.items():
        param = getattr(experts_modules(model)[i], name)
        assert isinstance(param, nn.Parameter) and param.requires_grad and not kernel.quant.is_quantized(param)
        assert torch.equal(bits(param), bits(bnb_round_trip(original)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quantize_experts_16bit_blocksize_128(kernel, dtype):
    model = tiny_model(dtype)
    dense = dense_experts(model)
    kernel.quantize_experts_4bit(model, blocksize=128)
    check_quantized_like_bnb(kernel, model, dense, blocksize=128)
    kernel.dequantize_experts_4bit(model)
    for (i, name), original in dense.items():
        param = getattr(experts_modules(model)[i], name)
        assert param.dtype == dtype and torch.equal(bits(param), bits(bnb_round_trip(original, 128)))


def test_quantize_bare_block_and_experts(kernel):
    model = tiny_model()
    block, experts = model.model.layers[0].mlp, model.model.layers[1].mlp.experts
    dense = dense_experts(model)
    kernel.quantize_experts_4bit(block)
    assert kernel.quant.is_quantized(block.experts.gate_up_proj) and kernel.quant.is_quantized(block.experts.down_proj)
    assert not kernel.quant.is_quantized(experts.gate_up_proj)
    kernel.quantize_experts_4bit(experts)
    check_quantized_like_bnb(kernel, model, dense)
    assert block.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("order", ["quantize-first", "peft-first"])
def test_quantize_experts_peft(kernel, order):
    """LoRA factors get the dense tensors' shapes (PEFT reads ds_shape) and the base tensors
    behind PEFT's ParamWrappers are quantized (not the wrappers)."""
    config = dict(r=4, lora_alpha=8, target_parameters=TARGETS)
    reference = get_peft_model(tiny_model(), LoraConfig(**config))
    expected = {n: p.shape for n, p in reference.named_parameters() if "lora_" in n}
    model = tiny_model()
    dense = dense_experts(model)
    if order == "quantize-first":
        peft_model = get_peft_model(kernel.quantize_experts_4bit(model), LoraConfig(**config))
    else:
        peft_model = kernel.quantize_experts_4bit(get_peft_model(model, LoraConfig(**config)))
    got = {n: p.shape for n, p in peft_model.named_parameters() if "lora_" in n}
    assert got == expected and len(got) == 2 * 2 * len(experts_modules(model))
    check_quantized_like_bnb(kernel, model, dense)
    wrappers = [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers and all(not m._parameters for m in wrappers)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(expected)


def test_casts_and_moves_keep_storage(kernel):
    model = kernel.quantize_experts_4bit(tiny_model())
    params = [getattr(m, n) for m in experts_modules(model) for n in EXPERT_TENSORS]
    saved = [(p.detach().clone(), dict(vars(p))) for p in params]
    model.to(torch.float16)
    model.to("cpu")
    model.bfloat16()
    model.half()
    assert model.lm_head.weight.dtype == torch.float16
    after = [getattr(m, n) for m in experts_modules(model) for n in EXPERT_TENSORS]
    for param, before, (data, attributes) in zip(after, params, saved):
        assert param is before  # the same Parameter object, attributes and all
        assert param.dtype == torch.uint8 and torch.equal(param, data) and vars(param) == attributes
        assert param.quant_dtype == torch.float32  # the dtype it was quantized from, whatever casts came after


def test_safetensors_round_trip(kernel, tmp_path):
    """Save the state dict, build a fresh model, quantize it (shapes then match), load: exact."""
    model = kernel.quantize_experts_4bit(tiny_model(seed=0))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = kernel.quantize_experts_4bit(tiny_model(seed=1))
    assert not torch.equal(fresh.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    load_model(fresh, tmp_path / "model.safetensors")
    for ours, theirs in zip(experts_modules(fresh), experts_modules(model)):
        for name in EXPERT_TENSORS:
            assert torch.equal(getattr(ours, name), getattr(theirs, name))
            assert kernel.quant.is_quantized(getattr(ours, name))
    for name, param in fresh.state_dict().items():
        assert torch.equal(param, model.state_dict()[name]), name
    kernel.dequantize_experts_4bit(model)
    kernel.dequantize_experts_4bit(fresh)
    for ours, theirs in zip(experts_modules(fresh), experts_modules(model)):
        for name in EXPERT_TENSORS:
            assert torch.equal(bits(getattr(ours, name)), bits(getattr(theirs, name)))


# ------------------------------------------------------------------ errors


def test_errors(kernel):
    with pytest.raises(ValueError, match="only 'nf4'"):
        kernel.quantize_experts_4bit(tiny_model(), quant_type="fp4")
    with pytest.raises(ValueError, match="blocksize"):
        kernel.quantize_experts_4bit(tiny_model(), blocksize=100)
    with pytest.raises(ValueError, match="no Qwen3 MoE experts"):
        kernel.quantize_experts_4bit(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="blocksize"):
        kernel.quant.quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernel.quant.quantize_nf4(torch.ones(64, dtype=torch.int32))
    codes, absmax = kernel.quant.quantize_nf4(torch.randn(128))
    with pytest.raises(ValueError, match="codes"):
        kernel.quant.dequantize_nf4(codes, absmax, (130,), torch.float32)
    with pytest.raises(ValueError, match="absmax"):
        kernel.quant.dequantize_nf4(codes, absmax, (128,), torch.float32, blocksize=32)
    assert kernel.quant.nf4_weight(None) is None and kernel.quant.nf4_weight(nn.Parameter(torch.ones(3))) is None


def test_deepcopy_keeps_4bit_tensors(kernel):
    """A deep copy of a quantized model is still 4-bit: same bytes, same attributes, own storage."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=40, num_experts=4)
    experts = kernel.quantize_experts_4bit(Qwen3MoeExperts(config))
    copied = copy.deepcopy(experts)
    for name in ("gate_up_proj", "down_proj"):
        original, clone = getattr(experts, name), getattr(copied, name)
        assert kernel.quant.is_quantized(clone) and clone.quant_shape == original.quant_shape
        assert torch.equal(clone, original) and clone.data_ptr() != original.data_ptr()
        assert not clone.requires_grad
