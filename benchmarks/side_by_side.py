"""Qwen3 MoE experts block, side by side: qwen3-moe-fused vs Transformers' own experts
implementations (`grouped_mm`, the default, and the `eager` per-expert loop) and the peers
(benchmarks/peers_impls.py: `sonicmoe`, `scattermoe`, `liger`, each an experts implementation on
the same Parameters; one that cannot load here is named with its reason and left out), forward
and forward+backward, on the same random inputs, weights and routing, in one process.

For each case and implementation it prints the median time in ms (`triton.testing.do_bench`,
return_mode="median", on CUDA), TFLOP/s (forward 2*T*K*3*H*I FLOPs, forward+backward 3x that),
the fraction of a dense bf16 8192^3 matmul's rate measured in the same run, the peak memory of
forward+backward above what was allocated before it, and the relative error of the output and
of every gradient against a reference (the eager loop where it runs, else grouped_mm). At the
end a markdown table; `--json PATH` writes every number with the run's metadata.

Our kernel runs twice: `ours` calls the functional `moe_experts_forward` (with
check_ids=False: no host synchronization, as in a training loop), `ours-iface` registers `experts_forward` in Transformers'
ExpertsInterface and runs a `Qwen3MoeExperts` with that experts_implementation, as models do.
Transformers' modules hold the very weight Parameters our kernel is given (no copies).

Forward runs with autograd on (hidden states, both expert weights and the routing weights
require grad), as in full fine-tuning; forward+backward is `torch.autograd.grad` of the output
with a random output gradient w.r.t. all four.

    python benchmarks/side_by_side.py                          # all cases, CUDA
    python benchmarks/side_by_side.py --cases 30b-a3b-t2048,235b-a22b-t8192 --json out.json
    python benchmarks/side_by_side.py --quick                  # CPU smoke test, tiny shapes

The package is found by benchmarks/_load.py (kernels.get_kernel when LOCAL_KERNELS or a Hub
cache is set up, else build/torch-<backend>/ by path; QWEN3_MOE_FUSED_PATH overrides).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import REPO_ROOT, kernel_source, load_kernel  # noqa: E402
import peers_impls  # noqa: E402
from benchmark_moe import (  # noqa: E402
    GRAD_NAMES,
    REL_TOL,
    QWEN3_30B_A3B,
    QWEN3_235B_A22B,
    TINY,
    MoEShape,
    make_problem,
    rel_err,
    run_forward,
    run_forward_backward,
    transformers_experts,
)

CASES: dict[str, tuple[MoEShape, int]] = {
    "30b-a3b-t256": (QWEN3_30B_A3B, 256),
    "30b-a3b-t512": (QWEN3_30B_A3B, 512),
    "30b-a3b-t2048": (QWEN3_30B_A3B, 2048),
    "30b-a3b-t4096": (QWEN3_30B_A3B, 4096),
    "30b-a3b-t16384": (QWEN3_30B_A3B, 16384),
    "235b-a22b-t8192": (QWEN3_235B_A22B, 8192),
    # decode sizes and the sweep that benchmarks/plot.py draws
    **{f"30b-a3b-t{t}": (QWEN3_30B_A3B, t) for t in (1, 16, 64, 1024, 8192, 32768)},
    # --quick (smoke test) cases
    "tiny-t16": (TINY, 16),
    "tiny-t64": (TINY, 64),
}
DEFAULT_CASES = ["30b-a3b-t256", "30b-a3b-t512", "30b-a3b-t2048", "30b-a3b-t4096", "30b-a3b-t16384", "235b-a22b-t8192"]
QUICK_CASES = ["tiny-t16", "tiny-t64"]
EAGER_MAX_TOKENS = 512  # the eager loop runs by default only up to this many tokens (it is slow)

IMPLS = {
    "ours": "qwen3_moe_fused",  # moe_experts_forward, the functional API (check_ids=False)
    "ours-iface": "qwen3_moe_fused via ExpertsInterface",  # experts_forward as experts_implementation
    "grouped_mm": "transformers grouped_mm",
    "eager": "transformers eager",
    "sonicmoe": "SonicMoE (transformers sonicmoe)",
    "scattermoe": "scattermoe (kernels-community)",
    "liger": "Liger-Kernel fused MoE",
}
DEFAULT_IMPLS = ["ours", "ours-iface", "grouped_mm", "eager", "sonicmoe", "scattermoe", "liger"]
IFACE_NAME = "qwen3_moe_fused"  # name registered in transformers' ExpertsInterface for "ours-iface"


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing


def make_timer(device: torch.device, warmup_ms: int, rep_ms: int):
    if device.type == "cuda":
        import triton.testing

        def cuda_timer(fn) -> float:
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

        return cuda_timer

    def cpu_timer(fn) -> float:
        fn()
        times: list[float] = []
        deadline = time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_timer


def peak_memory_bytes(fn, device: torch.device) -> int | None:
    """Peak allocated bytes while `fn` runs, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def dense_rate(n: int, dtype: torch.dtype, device: torch.device, timer) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: torch.mm(a, b))
    del a, b
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


# ---------------------------------------------------------------- dispatch check


def grouped_mm_ops(experts, problem) -> set[str]:
    """Names of the ATen / custom ops one forward+backward of `experts` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.name()))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        run_forward_backward(experts, problem)
    return rec.ops


def check_grouped_mm_path(experts, problem) -> str:
    """The grouped-GEMM ATen op(s) Transformers' grouped_mm dispatched (normally
    'aten::_grouped_mm'), or 'FALLBACK: ...' when it took its per-expert fallback loop
    (transformers::grouped_mm_fallback) or dispatched no grouped GEMM at all."""
    ops = grouped_mm_ops(experts, problem)
    native = sorted(op for op in ops if "grouped_mm" in op and op.startswith("aten::"))
    fallback = sorted(op for op in ops if "fallback" in op)
    if native and not fallback:
        return ", ".join(native)
    return "FALLBACK: " + (", ".join(fallback) or "no aten grouped_mm op dispatched")


# ---------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def metadata(device: torch.device, args, dtype: torch.dtype) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "cwd": os.getcwd(),
        "env": {
            k: os.environ[k]
            for k in (
                "LOCAL_KERNELS",
                "QWEN3_MOE_FUSED_PATH",
                "HF_HUB_OFFLINE",
                "KERNELS_CACHE",
                "CUDA_VISIBLE_DEVICES",
                "TRITON_INTERPRET",
            )
            if k in os.environ
        },
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "kernels": _version("kernels"),
        "liger_kernel": _version("liger-kernel"),
        "nvidia_cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "repo_commit": _git("rev-parse", "HEAD"),
        "repo_dirty": None,
        "kernel_source": None,
        "dtype": str(dtype).replace("torch.", ""),
        "timer": (
            f"triton.testing.do_bench(warmup={args.warmup}, rep={args.rep}, return_mode='median')"
            if device.type == "cuda"
            else f"time.perf_counter median over ~{args.rep} ms (CPU: not meaningful)"
        ),
        "flops": "forward 2*T*K*3*H*I, forward+backward 3x forward",
        "peak_memory": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it",
    }
    status = _git("status", "--porcelain", "--untracked-files=no") if meta["repo_commit"] else None
    meta["repo_dirty"] = None if status is None else bool(status)
    return meta


def ops_namespace(kernel) -> str | None:
    """The build's torch.library namespace (it carries the build's content hash)."""
    try:
        return kernel._ops.add_op_namespace_prefix("x").split("::")[0]
    except Exception:
        return None


# ---------------------------------------------------------------- one case


def run_case(name: str, shape: MoEShape, tokens: int, impls: list[str], kernel, device, dtype, timer, args) -> list[dict]:
    torch.manual_seed(args.seed)
    problem = make_problem(shape, tokens, device, dtype)
    flops_fwd = problem.flops_fwd

    run_eager = "eager" in impls and (args.eager or tokens <= EAGER_MAX_TOKENS)
    ran = [i for i in impls if i != "eager" or run_eager]
    if "eager" in impls and not run_eager:
        log(f"  eager skipped (T {tokens} > {EAGER_MAX_TOKENS}; --eager runs it)")

    fns = {}
    gmm_path = None
    for impl in ran:
        if impl == "ours":
            fns[impl] = lambda x, i, w, p=problem: kernel.moe_experts_forward(
                x, p.gate_up_proj, p.down_proj, i, w, check_ids=False
            )
        elif impl == "ours-iface":
            fns[impl] = transformers_experts(problem, IFACE_NAME)
        else:
            fns[impl] = transformers_experts(problem, impl)
    if "grouped_mm" in fns:
        gmm_path = check_grouped_mm_path(fns["grouped_mm"], problem)
        log(f"  transformers grouped_mm dispatches: {gmm_path}")
        if gmm_path.startswith("FALLBACK"):
            log(f"  WARNING: transformers grouped_mm did not take torch's grouped GEMM path: {gmm_path}")

    reference = "eager" if "eager" in fns else ("grouped_mm" if "grouped_mm" in fns else None)
    ref_out = ref_grads = None
    if reference is not None:
        try:
            out, grads = run_forward_backward(fns[reference], problem)
            ref_out, ref_grads = out.detach(), grads
            del out, grads
        except Exception as e:
            log(f"  no reference: {IMPLS[reference]} failed ({type(e).__name__}: {e}); no error figures")
            reference = None

    rows = []
    for impl in ran:
        fn = fns[impl]
        row = {
            "case": name,
            "model": shape.name,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "experts": shape.experts,
            "top_k": shape.top_k,
            "tokens": tokens,
            "impl": impl,
            "impl_label": IMPLS[impl],
            "flops_fwd": flops_fwd,
            "flops_fwd_bwd": 3 * flops_fwd,
            "reference": reference if impl != reference else None,
            "rel_err": None,
            "grouped_mm_path": gmm_path if impl == "grouped_mm" else None,
            "error": None,
        }
        try:
            if reference is not None and impl != reference:
                out, grads = run_forward_backward(fn, problem)
                errs = {"out": rel_err(out, ref_out)}
                errs.update({n: rel_err(g, r) for n, g, r in zip(GRAD_NAMES, grads, ref_grads)})
                row["rel_err"] = errs
                row["rel_err_ok"] = all(v < REL_TOL for v in errs.values())
                del out, grads
            fwd = lambda: run_forward(fn, problem)  # noqa: E731
            fwd_bwd = lambda: run_forward_backward(fn, problem)  # noqa: E731
            row["fwd_ms"] = timer(fwd)
            row["fwd_bwd_ms"] = timer(fwd_bwd)
            row["peak_mem_fwd_bytes"] = peak_memory_bytes(fwd, device)
            row["peak_mem_fwd_bwd_bytes"] = peak_memory_bytes(fwd_bwd, device)
            row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3 * flops_fwd / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # one implementation failing should not lose the others' numbers
            if isinstance(e, torch.cuda.OutOfMemoryError):
                row["error"] = "out of memory"
            else:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        rows.append(row)
        log("  " + progress_line(row))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gmm = next((r for r in rows if r["impl"] == "grouped_mm" and not r["error"]), None)
    for r in rows:
        if gmm is not None and not r["error"]:
            r["speedup_vs_grouped_mm_fwd"] = gmm["fwd_ms"] / r["fwd_ms"]
            r["speedup_vs_grouped_mm_fwd_bwd"] = gmm["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def progress_line(r: dict) -> str:
    if r["error"]:
        return f"{r['impl_label']:<38} ERROR {r['error']}"
    mem = r.get("peak_mem_fwd_bwd_bytes")
    err = r.get("rel_err")
    return (
        f"{r['impl_label']:<38} fwd {r['fwd_ms']:8.3f} ms {rate(r['fwd_tflops']):>6} TFLOP/s | "
        f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms {rate(r['fwd_bwd_tflops']):>6} TFLOP/s"
        + (f" | peak {mem / 2**20:.0f} MiB" if mem is not None else "")
        + (f" | rel err vs {r['reference']}: out {err['out']:.1e}, grads <= {max_grad_err(err):.1e}" if err else "")
        + (f" OVER {REL_TOL}" if r.get("rel_err_ok") is False else "")
    )


def rate(v: float) -> str:
    """TFLOP/s or % of dense: one decimal, two significant digits for CPU-sized numbers."""
    return format(v, ".1f" if abs(v) >= 1 else ".2g")


def max_grad_err(err: dict) -> float:
    return max(v for k, v in err.items() if k != "out")


# ---------------------------------------------------------------- table


def err_cell(r: dict, rows: list[dict]) -> str:
    err = r.get("rel_err")
    if err:
        over = f" OVER {REL_TOL}" if r.get("rel_err_ok") is False else ""
        return f"{err['out']:.1e} / {max_grad_err(err):.1e} ({r['reference']}){over}"
    is_ref = any(x["case"] == r["case"] and x["reference"] == r["impl"] for x in rows)
    return "(reference)" if is_ref else "-"


def markdown_table(rows: list[dict], dense: dict | None) -> str:
    def fmt(v, spec):
        if v is None:
            return "-"
        if spec == "rate":
            return rate(v)
        return format(v, spec)

    head = [
        "case",
        "T",
        "implementation",
        "fwd ms",
        "fwd TFLOP/s",
        "fwd % dense",
        "fwd+bwd ms",
        "fwd+bwd TFLOP/s",
        "fwd+bwd % dense",
        "fwd+bwd peak MiB",
        "vs grouped_mm fwd / fwd+bwd",
        "rel err out / grads (vs)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    peak = dense["tflops"] if dense else None
    for r in rows:
        if r["error"]:
            cells = [r["case"], str(r["tokens"]), r["impl_label"], "ERROR: " + r["error"]] + [""] * (len(head) - 4)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        mem = r.get("peak_mem_fwd_bwd_bytes")
        sp_f, sp_fb = r.get("speedup_vs_grouped_mm_fwd"), r.get("speedup_vs_grouped_mm_fwd_bwd")
        impl = r["impl_label"]
        if r["grouped_mm_path"] and r["grouped_mm_path"].startswith("FALLBACK"):
            impl += " (FALLBACK PATH)"
        cells = [
            r["case"],
            str(r["tokens"]),
            impl,
            fmt(r["fwd_ms"], ".3f"),
            fmt(r["fwd_tflops"], "rate"),
            fmt(100 * r["fwd_tflops"] / peak if peak else None, "rate"),
            fmt(r["fwd_bwd_ms"], ".3f"),
            fmt(r["fwd_bwd_tflops"], "rate"),
            fmt(100 * r["fwd_bwd_tflops"] / peak if peak else None, "rate"),
            fmt(mem / 2**20 if mem is not None else None, ".0f"),
            f"{sp_f:.2f}x / {sp_fb:.2f}x" if sp_f is not None else "-",
            err_cell(r, rows),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help=f"comma-separated, from: {', '.join(CASES)} (or 'all'); default: {', '.join(DEFAULT_CASES)}")
    p.add_argument("--quick", action="store_true", help=f"smoke test: tiny shapes ({', '.join(QUICK_CASES)}), small dense matmul")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated, from: {', '.join(IMPLS)}")
    p.add_argument("--eager", action="store_true", help=f"run the eager loop on every case (default: only T <= {EAGER_MAX_TOKENS})")
    p.add_argument("--no-dense", action="store_true", help="skip the dense matmul reference rate")
    p.add_argument("--dense-size", type=int, default=None, help="dense matmul size (default 8192; 1024 with --quick)")
    p.add_argument("--json", metavar="PATH", default=None, help="write all numbers and the run's metadata here")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    if args.cases in (None, ""):
        case_names = QUICK_CASES if args.quick else DEFAULT_CASES
    elif args.cases == "all":
        case_names = list(CASES)
    else:
        case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in case_names if c not in CASES]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown += [i for i in impls if i not in IMPLS]
    if unknown:
        log(f"unknown case or implementation: {', '.join(unknown)}")
        return 2

    if device.type != "cuda":
        log("WARNING: not on CUDA: times come from a CPU timer and say nothing about the kernels' speed; no memory figures.")

    impls = peers_impls.load(impls, device)
    kernel = None
    if any(i.startswith("ours") for i in impls):
        kernel = load_kernel()
    if "ours-iface" in impls:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(IFACE_NAME, kernel.experts_forward)

    meta = metadata(device, args, dtype)
    meta["kernel_source"] = kernel_source()
    meta["peers_unavailable"] = dict(peers_impls.unavailable)
    meta["kernel_ops_namespace"] = ops_namespace(kernel)
    log(f"device {meta['gpu'] or meta['cpu']} | torch {meta['torch']} | triton {meta['triton']} | transformers {meta['transformers']} | kernels {meta['kernels']}")
    log(f"kernel: {meta['kernel_source']} (ops {meta['kernel_ops_namespace']})")

    timer = make_timer(device, args.warmup, args.rep)
    dense = None
    if not args.no_dense:
        n = args.dense_size or (1024 if args.quick else 8192)
        dense = dense_rate(n, dtype, device, timer)
        log(f"dense {dense['dtype']} {n}^3 matmul: {dense['ms']:.3f} ms, {dense['tflops']:.1f} TFLOP/s")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    results: list[dict] = []
    failed = False

    def write_json():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"metadata": meta, "dense_matmul": dense, "results": results}, f, indent=2)

    for name in case_names:
        shape, tokens = CASES[name]
        log(f"[{name}] {shape.name} H {shape.hidden} I {shape.intermediate} E {shape.experts} K {shape.top_k}, T {tokens}, {meta['dtype']}")
        rows = run_case(name, shape, tokens, impls, kernel, device, dtype, timer, args)
        failed |= any(r["error"] or r.get("rel_err_ok") is False for r in rows)
        if dense:
            for r in rows:
                if not r["error"]:
                    r["fwd_frac_dense"] = r["fwd_tflops"] / dense["tflops"]
                    r["fwd_bwd_frac_dense"] = r["fwd_bwd_tflops"] / dense["tflops"]
        results.extend(rows)
        write_json()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    title = f"{meta['gpu'] or meta['cpu']}, {meta['dtype']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, {meta['date']}"
    print(f"Qwen3 MoE experts, {title}")
    if dense:
        print(f"dense {dense['dtype']} {dense['size']}^3 matmul: {dense['tflops']:.1f} TFLOP/s (100% dense)")
    print(f"command: {meta['command']}")
    print()
    print(markdown_table(results, dense))
    if device.type != "cuda":
        print("\n(CPU run: times are not meaningful.)")
    if args.json:
        log(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
