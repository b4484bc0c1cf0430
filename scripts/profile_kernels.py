"""Where the GPU time of our layer goes: the CUDA kernels of one forward and one forward+backward
of a block_side_by_side.py case (whole block, every weight trainable), from torch.profiler.

Per kernel name: calls and ms per step, then the sum of kernel time against the wall time of
the step (measured apart, CUDA events around 20 steps): where wall > kernels the GPU waited for
the host.

    python3 scripts/profile_kernels.py [--cases 30b-t16384,30b-t2048] [--impls ours,grouped_mm]
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
    syncs = [str(w.message).splitlines()[0][:100] for w in caught if "synchroniz" in str(w.message)]
    return issued, syncs


def kernel_table(fn):
    """({kernel name: (calls per step, ms per step)} of the CUDA kernels fn launches, the GPU's
    idle gaps between them: (ms per step, the largest few as (ms, kernel before, kernel after)))."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in events:
        table[event.name][0] += 1
        table[event.name][1] += event.device_time / 1e3
    events.sort(key=lambda e: e.time_range.start)
    gaps = [((b.time_range.start - a.time_range.end) / 1e3, a.name[:40], b.name[:40])
            for a, b in zip(events, events[1:])]  # fmt: skip
    gaps = [g for g in gaps if g[0] > 0]
    idle = sum(g[0] for g in gaps) / STEPS
    return {name: (calls / STEPS, ms / STEPS) for name, (calls, ms) in table.items()}, (idle, sorted(gaps)[::-1][:6])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="30b-t16384,30b-t2048")
    parser.add_argument("--impls", default="ours")
    parser.add_argument("--trace", help="folder: a chrome trace (host and GPU) of two steps of each case / step")
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
                table, (idle, largest) = kernel_table(fn)
                if args.trace:
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(2):
                            fn()
                        torch.cuda.synchronize()
                    prof.export_chrome_trace(f"{args.trace}/trace_{name}_{impl}_{step.replace('+', '_')}.json")
                total = sum(ms for _, ms in table.values())
                issued, syncs = host_ms(fn)
                print(f"\n== {name} {impl} {step}: kernels {total:.3f} ms, wall {wall_ms(fn):.3f} ms, host "
                      f"{issued:.3f} ms per step; {len(syncs)} synchronizing calls {syncs[:3]}")
                print(f"  GPU idle between kernels {idle:.3f} ms per step; largest gaps (ms, before, after): "
                      + "; ".join(f"{ms:.3f} {a} -> {b}" for ms, a, b in largest))
                for kname, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:14]:
                    print(f"  {ms:7.3f} ms  x{calls:<4g} {kname[:110]}")
        del block
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
