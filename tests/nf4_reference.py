"""The NF4 reference for the 4-bit tests, portable across CPUs.

The values a 4-bit tensor stands for are given by the NF4 definition: each index selects one
of the 16 NF4 values (bitsandbytes' own table, `get_4bit_type("nf4")`), multiplied by its
block's absmax in float32 and rounded once to the output dtype. bitsandbytes' CUDA kernels
follow it; its CPU `dequantize_4bit` does not on every CPU (0.50.2 on an AMD EPYC without
AVX-512 returns values up to 0.87 away from its own codes x absmax for some shapes). So the
tests compare with the definition, applied to the bytes bitsandbytes' `quantize_4bit` wrote,
and compare with bitsandbytes' CPU `dequantize_4bit` only where this machine's bitsandbytes
agrees with the definition (else the test is skipped with the reason).
"""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

NF4_VALUES = bnb_functional.get_4bit_type("nf4", device="cpu").float()


def nf4_definition(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype, blocksize: int) -> torch.Tensor:
    """Dense values of NF4 bytes: packed (ceil(n/2),) uint8, two indices a byte, the first in
    the high nibble; absmax (ceil(n/blocksize),) float32; -> (shape) of dtype."""
    numel = torch.Size(shape).numel()
    codes = packed.reshape(-1).cpu()
    index = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)[:numel].long()
    scale = absmax.reshape(-1).cpu().float().repeat_interleave(blocksize)[:numel]
    return (NF4_VALUES[index] * scale).to(dtype).reshape(shape).to(packed.device)


def bnb_quantize(t: torch.Tensor, blocksize: int = 64):
    return bnb_functional.quantize_4bit(t, blocksize=blocksize, quant_type="nf4", compress_statistics=False)


def bnb_round_trip(weight: torch.Tensor, blocksize: int = 64, dtype=None) -> torch.Tensor:
    """What the NF4 bytes bitsandbytes writes for `weight` stand for, by the definition."""
    packed, state = bnb_quantize(weight, blocksize)
    return nf4_definition(packed, state.absmax, weight.shape, dtype or weight.dtype, blocksize)


def bnb_dequantize_checked(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own dequantize_4bit of (packed, state); skips the calling test when, on
    this machine, it disagrees with the NF4 definition of the same bytes (a bitsandbytes bug,
    not ours: then there is nothing to compare with)."""
    out = bnb_functional.dequantize_4bit(packed, state)
    expected = nf4_definition(packed, state.absmax, state.shape, state.dtype, state.blocksize)
    if not torch.equal(out.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)):
        worst = (out.double() - expected.double()).abs().max().item()
        pytest.skip(
            f"bitsandbytes' {out.device.type} dequantize_4bit disagrees with its own codes x absmax on this "
            f"machine (shape {tuple(state.shape)}, blocksize {state.blocksize}, {state.dtype}: up to {worst:.3g} off)"
        )
    return out
