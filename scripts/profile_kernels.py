"""Where the GPU time of our layer goes: the CUDA kernels of one forward and one forward+backward
of a block_side_by_side.py case (whole block; --mode full: every weight trainable, lora / qlora:
PEFT LoRA r=16 on the (4-bit) experts, base frozen, as block_side_by_side.py trains it), from
torch.profiler.

Per kernel name: calls and ms per step, then the sum of kernel time against the wall time of
the step (measured apart, CUDA events around 20 steps) and the host time of a step issued
without waiting, with the synchronizing calls of one step. Where host >= kernels the GPU waits
for the host. --trace DIR: a chrome trace of two steps each, for scripts/trace_gaps.py (the
idle gaps between kernels and the late launches behind them).

    python3 scripts/profile_kernels.py [--cases 30b-t16384,30b-t2048] [--impls ours,grouped_mm] [--mode full]
        [--trace DIR]
"""

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from block_side_by_side import CASES, make_block, trainable_module  # noqa: E402

STEPS = 5


def wall_ms(fn, steps=20):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def host_ms(fn, steps=10):
    """Host time per step issuing fn back to back without waiting for the GPU, and the
    synchronizing calls one step makes (torch.cuda sync debug mode): where host ~ wall, or a
    step synchronizes, the GPU waits for the host."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    issued = (time.perf_counter() - start) * 1e3 / steps
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # Only the mode's warnings about a call (its notice that it is a prototype is not one).
    messages = [str(w.message) for w in caught]
    syncs = [m.splitlines()[0][:100] for m in messages if "synchronizing CUDA operation" in m]
    return issued, syncs


def kernel_table(fn):
    """{kernel name: (calls per step, ms per step)} of the CUDA kernels fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            table[event.name][0] += 1
            table[event.name][1] += event.device_time / 1e3
    return {name: (calls / STEPS, ms / STEPS) for name, (calls, ms) in table.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="30b-t16384,30b-t2048")
    parser.add_argument("--impls", default="ours")
    parser.add_argument("--mode", default="full", choices=["full", "lora", "qlora"])
    parser.add_argument("--trace", help="folder: a chrome trace (host and GPU) of two steps of each case / step")
    args = parser.parse_args()
    kernel = load_kernel()
    device, dtype = torch.device("cuda"), torch.bfloat16
    for name in args.cases.split(","):
        case = CASES[name]
        block, block_cls = make_block(case, device, dtype)
        config = block.experts.config  # before PEFT wraps the experts
        module = trainable_module(block, kernel, args.mode)
        x = torch.randn(1, case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn_like(x)
        targets = [x, *(p for p in module.parameters() if p.requires_grad)]
        layer = getattr(kernel.layers, block_cls).forward
        for impl in args.impls.split(","):
            config._experts_implementation = "grouped_mm" if impl == "ours" else impl
            forward = (lambda: layer(module, x)) if impl == "ours" else (lambda: module(x))
            steps = {"fwd": forward, "fwd+bwd": lambda f=forward: torch.autograd.grad(f(), targets, grad_out)}
            for step, fn in steps.items():
                table = kernel_table(fn)
                if args.trace:
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(2):
                            fn()
                        torch.cuda.synchronize()
                    prof.export_chrome_trace(f"{args.trace}/trace_{name}_{impl}_{step.replace('+', '_')}.json")
                total = sum(ms for _, ms in table.values())
                issued, syncs = host_ms(fn)
                print(f"\n== {name} {args.mode} {impl} {step}: kernels {total:.3f} ms, wall {wall_ms(fn):.3f} ms, host "
                      f"{issued:.3f} ms per step; {len(syncs)} synchronizing calls {syncs[:3]}")
                for kname, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:14]:
                    print(f"  {ms:7.3f} ms  x{calls:<4g} {kname[:110]}")
        del block, module
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
