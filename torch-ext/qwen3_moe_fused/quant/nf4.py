"""NF4, bitsandbytes' 4-bit NormalFloat format (QLoRA), byte for byte.

A tensor of n values is cut, flat, into blocks of `blocksize` values (the last one may be
short). Each block keeps its absolute maximum and each value keeps the index (0..15) of the
NF4 value nearest to value / absmax. Two indices share a byte, the first in the high nibble:

    codes   (ceil(n/2), 1) uint8     codes[i] = idx[2i] << 4 | idx[2i+1]  (odd n: idx[n] quantizes 0.0)
    absmax  (ceil(n/blocksize),) float32
    value[i] = (NF4_CODE[idx[i]] * absmax[i // blocksize]).to(dtype)  (float32 product, rounded once)

`quantize_nf4` gives the bytes of `bitsandbytes.functional.quantize_4bit(t, blocksize,
quant_type="nf4", compress_statistics=False)` on the device the tensor is on. bitsandbytes'
CPU path (torch code) and its CUDA kernel (built with --use_fast_math) disagree in corner
cases, and so does this code, to match each:

                      CPU                                   CUDA
    scaling           x * (1 / max(absmax, 1e-38));         x * rcp.approx.ftz(absmax)
                      short last block: x / max(absmax, 1e-38)
    all-zero block    indices 7 (0.0), absmax 0             indices 0 (-1.0 * 0 = -0.0), absmax 0
                      (short last block: absmax 1e-38)
    nearest value     float32 midpoints of NF4_CODE,        nvcc's float32 roundings of the
                      a tie goes to the lower value         float64 midpoints (4 of 15 one ulp
                                                            away), a tie goes to the lower value

Not matched on CUDA: blocks whose absmax is a float32 subnormal (< 2^-126), where the CUDA
kernel flushes to zero. `dequantize_nf4` equals `bitsandbytes.functional.dequantize_4bit`
(same caveat for products below 2^-126 on CUDA).
"""

import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tuning import INTERPRET
from ..sizes import cdiv
from ..launch import launcher

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], sorted.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Thresholds between neighbouring NF4 values; index = how many thresholds are < x.
# bitsandbytes' CPU path computes them in float32 (torch.bucketize, right=False).
_MIDPOINTS_CPU = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
# Its CUDA kernel (dQuantizeNF4) compares `x > <decimal literal>`; the literals are the float64
# midpoints and nvcc rounds them straight to float32: these bits (read from its PTX).
_MIDPOINTS_CUDA = torch.tensor(
    struct.unpack(
        "<15f",
        struct.pack(
            "<15I",
            *(0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF),
            *(0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9),
        ),
    ),
    dtype=torch.float32,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Values per step of the torch code: bounds its float32 temporaries (~16 MiB each).
_CHUNK = 1 << 22


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize}: NF4 blocksize must be one of {BLOCKSIZES}")


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


@functools.lru_cache(maxsize=None)
def _on_device(name: str, device: torch.device) -> Tensor:
    table = {"code": NF4_CODE, "cpu": _MIDPOINTS_CPU, "cuda": _MIDPOINTS_CUDA}[name]
    return table.to(device)


def nf4_code_table(device) -> Tensor:
    """NF4_CODE on `device` (16 float32, cached): the lookup table of dequantizing kernels."""
    return _on_device("code", torch.device(device))


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or INTERPRET


# ---------------------------------------------------------------- quantize


@launcher
@triton.jit
def _rcp_approx_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = rcp.approx.ftz.f32(x): what nvcc --use_fast_math makes of bitsandbytes' 1.0f / absmax."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + offs, y, mask=mask)


def _reciprocal_like_cuda(absmax: Tensor) -> Tensor:
    if not absmax.is_cuda or INTERPRET:  # no PTX to run: IEEE 1/x (off by one ulp at times)
        return 1.0 / absmax
    out = torch.empty_like(absmax)
    BLOCK = 1024
    _rcp_approx_kernel[(cdiv(absmax.numel(), BLOCK),)](absmax, out, absmax.numel(), BLOCK=BLOCK)
    return out


@torch.no_grad()
def quantize_nf4_into(t: Tensor, codes: Tensor, absmax: Tensor, blocksize: int = 64, like_cuda: bool | None = None):
    """Quantize `t` (any shape, float32/float16/bfloat16) into `codes` ((ceil(n/2),) uint8) and
    `absmax` ((ceil(n/blocksize),) float32), a few million values at a time.

    like_cuda: follow bitsandbytes' CUDA kernel (default: when `t` is on CUDA) or its CPU path.
    """
    check_blocksize(blocksize)
    if t.dtype not in DTYPES:
        raise ValueError(f"NF4 quantization needs a float32, float16 or bfloat16 tensor, got {t.dtype}")
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if codes.shape != ((n + 1) // 2,) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be ({(n + 1) // 2},) uint8, got {tuple(codes.shape)} {codes.dtype}")
    if absmax.shape != (num_blocks(n, blocksize),) or absmax.dtype != torch.float32:
        raise ValueError(
            f"absmax must be ({num_blocks(n, blocksize)},) float32, got {tuple(absmax.shape)} {absmax.dtype}"
        )
    if like_cuda is None:
        like_cuda = t.is_cuda
    midpoints = _on_device("cuda" if like_cuda else "cpu", t.device)

    step = max(_CHUNK // blocksize, 1) * blocksize  # whole blocks, an even count of values
    for start in range(0, n, step):
        x = flat[start : start + step].float()
        m = x.numel()
        blocks = num_blocks(m, blocksize)
        if m % blocksize:  # zeros up to a whole block: no absmax changes, and 0.0 pads an odd n
            x = torch.nn.functional.pad(x, (0, blocks * blocksize - m))
        x = x.view(blocks, blocksize)
        amax = x.abs().amax(dim=1)

        if like_cuda:
            scaled = x * _reciprocal_like_cuda(amax)[:, None]  # all-zero block: 0 * inf = nan
        else:
            # The expressions of bitsandbytes' CPU path, which also clamps (a no-op for the index).
            scaled = torch.clamp(x * (1.0 / amax.clamp(min=1e-38))[:, None], -1, 1)
            if m % blocksize:  # its short last block: a division, and the clamped absmax is stored
                amax[-1:] = amax[-1:].clamp(min=1e-38)
                scaled[-1] = torch.clamp(x[-1] / amax[-1:], -1, 1)

        idx = torch.bucketize(scaled, midpoints, out_int32=True)
        if like_cuda:
            idx.masked_fill_(scaled.isnan(), 0)  # the CUDA kernel's comparisons are all false on nan
        idx = idx.view(-1)[: m + m % 2].to(torch.uint8)
        codes[start // 2 : start // 2 + (m + 1) // 2] = (idx[0::2] << 4) | idx[1::2]
        absmax[start // blocksize : start // blocksize + blocks] = amax


def quantize_nf4(t: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """t (any shape, float32/float16/bfloat16) -> (codes (ceil(n/2), 1) uint8, absmax (ceil(n/blocksize),) float32),
    the packed tensor and quant_state.absmax of bitsandbytes' quantize_4bit(t, blocksize, quant_type="nf4")."""
    check_blocksize(blocksize)
    n = t.numel()
    codes = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=t.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=t.device)
    quantize_nf4_into(t, codes.view(-1), absmax, blocksize)
    return codes, absmax


# ---------------------------------------------------------------- dequantize


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16, to nearest even (cvt.rn on the GPU). Written out because Triton's
    interpreter truncates in `.to(tl.bfloat16)`; the same code then runs in both."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@launcher
@triton.jit
def _dequantize_nf4_kernel(
    codes_ptr, absmax_ptr, code_ptr, out_ptr, n, offsets_ptr, per_expert,
    BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, SKIP_EMPTY: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK bytes of codes -> 2*BLOCK values of the flat output (n values).
    SKIP_EMPTY: values of expert e are [e * per_expert, (e + 1) * per_expert); a program whose
    experts all have no rows (offsets: cumulative rows per expert, (E + 1,)) writes nothing."""
    pid = tl.program_id(0).to(tl.int64)  # offsets in int64: n may pass 2^31
    if SKIP_EMPTY:
        first_expert = (2 * pid * BLOCK) // per_expert
        last_expert = (tl.minimum(2 * pid * BLOCK + 2 * BLOCK, n) - 1) // per_expert
        if tl.load(offsets_ptr + last_expert + 1) == tl.load(offsets_ptr + first_expert):
            return
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    first = 2 * byte  # the flat index of the byte's high nibble; the low nibble is first + 1
    mask = first < n
    packed = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
    # Both nibbles of a byte are in the same block (blocksize is even).
    scale = tl.load(absmax_ptr + first // BLOCKSIZE, mask=mask, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 0xF)) * scale
    values = tl.interleave(high, low)  # (2*BLOCK,) in memory order
    offs = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        values = _round_to_bf16(values)
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n)


def _dequantize_nf4_triton(codes: Tensor, absmax: Tensor, out: Tensor, blocksize: int, skip=None) -> None:
    BLOCK = 1024  # 2.7 TB/s on an H100 (bf16 out), near its memory bandwidth
    code = nf4_code_table(codes.device)
    grid = (cdiv(codes.numel(), BLOCK),)
    offsets, per_expert = skip if skip is not None else (absmax, 1)
    _dequantize_nf4_kernel[grid](
        codes, absmax, code, out, out.numel(), offsets, per_expert, BLOCKSIZE=blocksize, BLOCK=BLOCK, SKIP_EMPTY=skip is not None
    )  # fmt: skip


def _dequantize_nf4_torch(codes: Tensor, absmax: Tensor, out: Tensor, blocksize: int) -> None:
    code = nf4_code_table(codes.device)
    n = out.numel()
    step = max(_CHUNK // blocksize, 1) * blocksize
    for start in range(0, n, step):
        m = min(step, n - start)
        blocks = num_blocks(m, blocksize)
        packed = codes[start // 2 : start // 2 + (m + 1) // 2]
        idx = torch.stack((packed >> 4, packed & 0xF), dim=1).view(-1).int()  # high nibble first
        idx = torch.nn.functional.pad(idx, (0, blocks * blocksize - idx.numel()))  # whole blocks
        values = code[idx].view(blocks, blocksize) * absmax[start // blocksize : start // blocksize + blocks, None]
        out[start : start + m] = values.view(-1)[:m].to(out.dtype)


def dequantize_nf4(
    codes: Tensor, absmax: Tensor, shape, dtype: torch.dtype, blocksize: int = 64, expert_offsets: Tensor | None = None
) -> Tensor:
    """codes (ceil(n/2),) or (ceil(n/2), 1) uint8, absmax (ceil(n/blocksize),) float32 -> (shape) dtype,
    equal to bitsandbytes' dequantize_4bit. On CUDA (and under TRITON_INTERPRET=1) a Triton
    kernel, else torch; both give the same bits.

    expert_offsets: for an expert stack (E, ...), cumulative rows routed to each expert (E + 1,)
    int32 (a Routing's): the Triton kernel then skips experts without rows, whose values are
    left unset (no GEMM reads them)."""
    check_blocksize(blocksize)
    if dtype not in DTYPES:
        raise ValueError(f"NF4 dequantization gives float32, float16 or bfloat16, not {dtype}")
    shape = torch.Size(shape)
    n = shape.numel()
    codes = codes.reshape(-1)
    if codes.dtype != torch.uint8 or codes.numel() != (n + 1) // 2:
        raise ValueError(
            f"codes must hold {(n + 1) // 2} uint8 for shape {tuple(shape)}, got {codes.numel()} {codes.dtype}"
        )
    if absmax.dtype != torch.float32 or absmax.numel() != num_blocks(n, blocksize):
        raise ValueError(
            f"absmax must hold {num_blocks(n, blocksize)} float32 for shape {tuple(shape)} and blocksize {blocksize}, "
            f"got {absmax.numel()} {absmax.dtype}"
        )
    codes, absmax = codes.contiguous(), absmax.reshape(-1).contiguous()
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    if _use_triton(codes):
        skip = None
        if expert_offsets is not None and shape[0] > 0:
            skip = (expert_offsets, n // shape[0])
        _dequantize_nf4_triton(codes, absmax, out.view(-1), blocksize, skip)
    else:
        _dequantize_nf4_torch(codes, absmax, out.view(-1), blocksize)
    return out
