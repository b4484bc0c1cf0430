"""The layer's host path on the CPU, as it runs for CUDA tensors, with the GPU taken out: where
the host time of a small-batch step goes, measurable on any machine.

Our layer's forward and forward+backward on a block with Qwen3-30B-A3B's routing (128 experts,
top-8) and a tiny hidden size (float32 CPU tensors: the CPU's allocator and matmuls at full size
would swamp the host path; CUDA's caching allocator hands out such buffers in microseconds, and
cuBLAS runs the router's matmuls asynchronously), with:
  * functional._use_triton forced on, so the CUDA path's glue runs (routing, configs, launches);
  * every kernel launched through launch.Launcher's direct path, its compiled kernel a stand-in
    whose launcher returns at once (Triton is not called after the first launch of a key);
  * the router's linear layer and its backward on the CPU (real matmuls: the table shows their
    share, small at 64 tokens, most of the step at 2048).
Not modelled: CUDA's own costs (caching allocator, cuBLAS, kernel-launch driver calls, TMA
descriptor encoding), which a GPU host adds; scripts/host_breakdown.py measures those on the GPU.

Prints, per step: host microseconds (best of 15 means), the part of it that is the CPU compute
of the router's matmuls and autograd's gradient sum (profiled apart: tens of microseconds at 64
tokens, most of a millisecond at 2048 on a 2.6 GHz EPYC), aten ops, kernel launches and Python
function calls; with --ops, each aten op and the line that issued it. The numbers depend on this
machine's CPU: compare two versions of the code on one machine.

    python3 scripts/host_cpu.py [--tokens 64,2048] [--mode full|lora] [--hidden 8 --inter 8] [--ops]

--mode lora: PEFT `target_parameters` LoRA r = 16 on both expert tensors, base frozen (the
benchmarks' lora mode), gradients of the hidden states and the LoRA factors.
"""

import argparse
import cProfile
import collections
import importlib
import os
import pstats
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("host_cpu.py models the compiled path: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from block_side_by_side import Case, layer_calls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_launch import host_us  # noqa: E402


class _Compiled:
    """A compiled kernel whose launcher only counts its launches."""

    function, packed_metadata = None, None
    launches = 0  # of every stand-in, the first launch of a key (through _Jit.run) included

    def run(self, *call):
        _Compiled.launches += 1


class _Jit:
    """A JITFunction stand-in with the real kernel's parameters: returns a _Compiled."""

    def __init__(self, fn):
        self.arg_names, self.pre_run_hooks, self.__name__ = fn.arg_names, [], fn.__name__

    def run(self, *args, grid, warmup, **kwargs):
        _Compiled.launches += 1
        return _Compiled()


def _fake_launches(kernel) -> None:
    """Route every Launcher of the package to stand-ins, with the direct path on."""
    launch = importlib.import_module(kernel.__name__ + ".launch")
    launch._DIRECT_OK, launch.DIRECT = True, True
    runtime = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None, debug=False)
    launch.knobs = SimpleNamespace(runtime=runtime, compilation=SimpleNamespace(instrumentation_mode=""))
    launch.driver = SimpleNamespace(active=SimpleNamespace(get_current_stream=lambda device: 0))
    torch.cuda.current_device = lambda: 0
    for name, module in list(sys.modules.items()):
        if name.startswith(kernel.__name__):
            for value in vars(module).values():
                if isinstance(value, launch.Launcher) and not isinstance(value.fn, _Jit):
                    value.fn = _Jit(value.fn)
    functional = importlib.import_module(kernel.__name__ + ".functional")
    functional._use_triton = lambda t: True


class _Ops(TorchDispatchMode):
    """Counts aten ops, with the package's line that issued each."""

    def __init__(self, package: str):
        super().__init__()
        self.package, self.ops = package, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ours = [f for f in traceback.extract_stack() if self.package in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "(autograd)"
        self.ops[(str(func), where)] += 1
        return func(*args, **(kwargs or {}))


def _compute_us(fn, calls=20) -> float:
    """Mean self CPU time a call of the matmuls and the gradient sum: real CPU compute that on
    the GPU runs asynchronously."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    ops = ("aten::mm", "aten::addmm", "aten::add_", "aten::add")
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ops) / calls


def _python_calls(fn, calls=50) -> float:
    profile = cProfile.Profile()
    profile.runcall(lambda: [fn() for _ in range(calls)])
    return pstats.Stats(profile).total_calls / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="64,2048")
    parser.add_argument("--mode", default="full", choices=("full", "lora"))
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--inter", type=int, default=8)
    parser.add_argument("--ops", action="store_true", help="list each aten op of a step and where it came from")
    args = parser.parse_args()
    kernel = load_kernel()
    _fake_launches(kernel)
    device = torch.device("cpu")
    torch.set_num_threads(1)  # the host path is one thread; the CPU matmuls below stay small
    package_dir = Path(kernel.__file__).parent.name
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        case = Case("qwen3_moe", args.hidden, args.inter, 128, 8, tokens)
        fwd, step = layer_calls(kernel, case, device, torch.float32, args.mode)
        for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
            fn()
            ops = _Ops(package_dir)
            _Compiled.launches = 0
            with ops:
                fn()
            launches = _Compiled.launches
            host, compute = host_us(fn, 200, repeats=15), _compute_us(fn)
            rows.append((tokens, name, host, compute, sum(ops.ops.values()), launches, _python_calls(fn)))
            if args.ops:
                print(f"tokens {tokens} {name}: aten ops and the line of the package that issued them")
                for (op, where), count in ops.ops.items():
                    print(f"  {count:3d} {op:36s} {where}")
    print("| tokens | step | host us (CPU) | of which matmuls + gradient sum (CPU compute, profiled) "
          "| aten ops | launches | Python calls |")
    print("|---|---|---|---|---|---|---|")
    for tokens, name, us, compute, ops, launches, calls in rows:
        print(f"| {tokens} | {name} | {us:.0f} | {compute:.0f} | {ops} | {launches} | {calls:.0f} |")


if __name__ == "__main__":
    main()
