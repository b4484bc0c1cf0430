"""What the QLoRA examples share: the command line, bitsandbytes' NF4 linear layers, the memory
cap and the timed training loop with its report (peak memory, tokens/s) and checks."""

import argparse
import math
import sys
import time

import bitsandbytes as bnb
import torch
from torch import nn


def parse_args(description: str, memory_cap_gib: float) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration on CPU (the tests' mode)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 5, tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048, tiny 32)")
    parser.add_argument("--memory-cap-gib", type=float, default=memory_cap_gib,
                        help=f"CUDA memory cap (default {memory_cap_gib:g})")  # fmt: skip
    args = parser.parse_args()
    args.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.steps = args.steps or (2 if args.tiny else 5)
    args.seq_len = args.seq_len or (32 if args.tiny else 2048)
    # bf16 on a GPU; float32 in Triton's interpreter (its bf16 matmul is unreliable).
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    if args.device.type == "cuda":
        total = torch.cuda.get_device_properties(args.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), torch.cuda.current_device())
    return args


def linear_4bit(linear: nn.Linear, device) -> nn.Module:
    """bitsandbytes NF4 Linear4bit holding linear's weight (quantized when moved to device)."""
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")  # fmt: skip
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=64,
                                         compress_statistics=False, quant_type="nf4")  # fmt: skip
    return quantized.to(device)


def train(step, trainable: list[torch.Tensor], args: argparse.Namespace) -> None:
    """One warm-up step (Triton compiles, the optimizer allocates its state), then args.steps timed
    ones; prints losses, tokens/s and peak memory; exits non-zero if a loss is not finite or the
    LoRA weights did not change."""
    device = args.device
    before = [p.detach().clone() for p in trainable[:4]]
    losses = [step()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"losses: {', '.join(f'{loss:.4f}' for loss in losses)}")
    print(f"step time {seconds * 1e3:.0f} ms, {args.seq_len / seconds:.0f} tokens/s (batch 1 x {args.seq_len} tokens)")
    if device.type == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
        print(f"peak memory {peak:.2f} GiB allocated, {reserved:.2f} GiB reserved (cap {args.memory_cap_gib} GiB)")
    if not all(math.isfinite(loss) for loss in losses):
        sys.exit("loss is not finite")
    if all(torch.equal(a, b) for a, b in zip(before, trainable[:4])):
        sys.exit("the LoRA weights did not change")
