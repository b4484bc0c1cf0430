"""Where the host time of our layer's step goes at a host-bound size (Qwen3-30B-A3B block, bf16, CUDA).

Prints, in microseconds of host time per call (calls issued back to back, GPU not awaited):
  * the layer's forward and forward+backward, and the GPU's median time of each (do_bench);
  * the same with every Triton launch stubbed out (JITFunction.run returns at once): the host
    time of everything but Triton's launch path (torch ops, autograd, our Python);
  * each Triton launch of one step, timed alone: through JITFunction.run (binder, cache key,
    launcher), through launch.Launcher's direct path, and the compiled kernel's own launcher
    (CompiledKernel.run) on the same arguments;
  * whether both launch paths give the same output and gradients, bit for bit, and the step's
    host and GPU time with launch.DIRECT off and on;
  * with --profile, a torch.profiler table (CPU time by op and autograd node) of the step with
    the Triton launches stubbed: where the rest of the host time goes.

    python3 scripts/host_breakdown.py [--tokens 2048] [--mode full|lora] [--calls 100] [--profile]

--mode lora: PEFT LoRA r = 16 on both expert tensors, base frozen (block_side_by_side's lora mode).
"""

import argparse
import collections
import importlib
import sys
from pathlib import Path

import torch
import triton
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from block_side_by_side import Case, layer_calls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_launch import host_us  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--mode", default="full", choices=("full", "lora"))
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the stubbed step")
    args = parser.parse_args()
    kernel = load_kernel()
    launch = importlib.import_module(kernel.__name__ + ".launch")
    case = Case("qwen3_moe", 2048, 768, 128, 8, args.tokens)
    fwd, step = layer_calls(kernel, case, torch.device("cuda"), torch.bfloat16, args.mode)

    # The same bits through both launch paths.
    results = {}
    for direct in (False, True, True):  # the second direct run takes the cached keys
        launch.DIRECT = direct
        results.setdefault(direct, []).append([fwd().detach(), *step()])
    same = all(torch.equal(a, b) for run in results[True] for a, b in zip(results[False][0], run))
    print(f"direct launches give the same output and gradients as JITFunction.run: {same}")

    rows = []
    for direct in (False, True):
        launch.DIRECT = direct
        for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
            gpu = 1e3 * triton.testing.do_bench(fn, return_mode="median")
            rows.append((name, "direct" if direct else "JITFunction.run", host_us(fn, args.calls), gpu))

    # Every Triton launch of one step, with the compiled kernel it ran.
    launch.DIRECT = False
    original_run = JITFunction.run
    launches = []

    def recording_run(self, *a, grid, warmup, **kw):
        compiled = original_run(self, *a, grid=grid, warmup=warmup, **kw)
        launches.append((self, grid, a, kw, compiled))
        return compiled

    JITFunction.run = recording_run
    step()
    torch.cuda.synchronize()
    JITFunction.run = lambda self, *a, grid, warmup, **kw: None
    stubbed = {name: host_us(fn, args.calls) for name, fn in (("fwd", fwd), ("fwd+bwd", step))}
    if args.profile:  # what the host does besides Triton's launches: torch ops, autograd nodes, our Python
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
        torch.cuda.synchronize()
        print("Triton launches stubbed, 20 fwd+bwd steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    JITFunction.run = original_run
    torch.cuda.synchronize()

    print(f"tokens {args.tokens}: {len(launches)} Triton launches a step")
    launch.DIRECT = True
    per_kernel = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0])
    for fn, grid, a, kw, compiled in launches:
        launcher = launch.Launcher(fn)

        def through_jit():
            fn.run(*a, grid=grid, warmup=False, **kw)

        def through_launcher():
            launcher.launch(grid, a, kw)

        g = (tuple(grid) + (1, 1))[:3]
        params = [*a, *(kw[name] for name in fn.arg_names[len(a):])]
        stream = torch.cuda.current_stream().cuda_stream

        def direct():
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *params)  # fmt: skip

        entry = per_kernel[fn.__name__]
        entry[0] += 1
        entry[1] += host_us(through_jit, 200, repeats=3)
        entry[2] += host_us(through_launcher, 200, repeats=3)
        entry[3] += host_us(direct, 200, repeats=3)
        entry[4] = len(params)
    print("| kernel | launches a step | args | JITFunction.run us | Launcher us | CompiledKernel.run us |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for name, (count, *us, nargs) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {count} | {nargs} | " + " | ".join(f"{u:.1f}" for u in us) + " |")
        totals = [t + u for t, u in zip(totals, us)]
    print(f"| all | {len(launches)} | | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    print()
    print(f"host us a step with every Triton launch stubbed: fwd {stubbed['fwd']:.0f}, fwd+bwd {stubbed['fwd+bwd']:.0f}")
    print("| step | launches | host us | GPU us (do_bench median) |")
    print("|---|---|---|---|")
    for name, path, host, gpu in rows:
        print(f"| {name} | {path} | {host:.0f} | {gpu:.0f} |")


if __name__ == "__main__":
    main()
