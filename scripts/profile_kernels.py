"""Where the GPU time of our layer goes: the CUDA kernels of one forward and one forward+backward
of a block_side_by_side.py case (whole block, every weight trainable), from torch.profiler.

Per kernel name: calls and ms per step, then the sum of kernel time against the wall time of
the step (measured apart, CUDA events around 20 steps): where wall > kernels the GPU waited for
the host.

    python3 scripts/profile_kernels.py [--cases 30b-t16384,30b-t2048] [--impls ours,grouped_mm]
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from block_side_by_side import CASES, make_block  # noqa: E402

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
    args = parser.parse_args()
    kernel = load_kernel()
    device, dtype = torch.device("cuda"), torch.bfloat16
    for name in args.cases.split(","):
        case = CASES[name]
        block, block_cls = make_block(case, device, dtype)
        x = torch.randn(1, case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn_like(x)
        targets = [x, *block.parameters()]
        layer = getattr(kernel.layers, block_cls).forward
        for impl in args.impls.split(","):
            block.experts.config._experts_implementation = "grouped_mm" if impl == "ours" else impl
            forward = (lambda: layer(block, x)) if impl == "ours" else (lambda: block(x))
            steps = {"fwd": forward, "fwd+bwd": lambda f=forward: torch.autograd.grad(f(), targets, grad_out)}
            for step, fn in steps.items():
                table = kernel_table(fn)
                total = sum(ms for _, ms in table.values())
                print(f"\n== {name} {impl} {step}: kernels {total:.3f} ms, wall {wall_ms(fn):.3f} ms per step")
                for kname, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:14]:
                    print(f"  {ms:7.3f} ms  x{calls:<4g} {kname[:110]}")
        del block
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
