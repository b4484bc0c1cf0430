"""Host time per call of each piece of our layer's forward and backward at a small token count
(Qwen3-30B-A3B experts, bf16, CUDA): each routed launch of functional.py, the routing, the
allocations, the router's top-k softmax (Transformers' torch ops and ours), an empty Triton
kernel (Triton's own launch floor) and a torch op, so that the layer's host time can be read
piece by piece.

    python3 scripts/bench_launch.py [--tokens 64]
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402


@triton.jit
def _empty_kernel(x_ptr, n):
    pass


@triton.jit
def _many_args_kernel(a, b, c, d, e, f, g, h, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11,
                      C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):  # fmt: skip
    pass


def host_us(fn, calls=200, repeats=5):
    """Best of repeats of the mean host time of calls calls (fewer than the launch queue holds);
    the GPU, where there is one, is awaited between rounds, outside the timing."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
        sync()
    return 1e6 * best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    kernel = load_kernel()
    fn = kernel.functional  # it imports the launchers (kernel.grouped_gemm is the function, not the package)
    dev, dt = torch.device("cuda"), torch.bfloat16
    num_experts, hidden, inter, top_k, tokens = 128, 2048, 768, 8, args.tokens
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dt) * 0.02
    down = torch.randn(num_experts, hidden, inter, device=dev, dtype=dt) * 0.02
    ids = torch.randint(0, num_experts, (tokens, top_k), device=dev, dtype=torch.int64)
    weights = torch.rand(tokens, top_k, device=dev, dtype=dt)
    rows = tokens * top_k
    block_m = fn.block_m_for(rows, num_experts)
    r = fn.route(ids, num_experts, block_m, True)
    act = torch.empty(rows, inter, device=dev, dtype=dt)
    h = torch.empty(rows, 2 * inter, device=dev, dtype=dt)
    out_rows = torch.empty(rows, hidden, device=dev, dtype=dt)
    out = torch.empty(tokens, hidden, device=dev, dtype=dt)
    cfg_up = fn.gemm_config("gate_up", inter, hidden, block_m, dev)
    cfg_down = fn.gemm_config("down", hidden, inter, block_m, dev)
    cfg_dw = fn.dw_config("down_dw", hidden, inter, block_m, dev)
    ddown = torch.empty_like(down)
    wflat = weights.reshape(-1)
    logits = torch.randn(tokens, num_experts, device=dev, dtype=dt)
    flat_x = x.view(-1)
    pieces = {
        "torch.empty (rows, H)": lambda: torch.empty(rows, hidden, device=dev, dtype=dt),
        "x.new_empty": lambda: x.new_empty(rows, hidden),
        "torch add (T, H)": lambda: torch.add(x, x),
        "triton empty kernel, 2 args": lambda: _empty_kernel[(1,)](flat_x, 1),
        "triton empty kernel, 24 args": lambda: _many_args_kernel[(1,)](
            *([flat_x] * 8), *range(1, 13), C0=1, C1=2, C2=3, C3=4),
        "gemm_config lookup": lambda: fn.gemm_config("gate_up", inter, hidden, block_m, dev),
        "route": lambda: fn.route(ids, num_experts, block_m, True),
        "swiglu_gemm_launch (gate_up, h saved)": lambda: fn.swiglu_gemm_launch(
            x, gate_up, act, r, cfg_up, gather=r.sorted_token, h_out=h),
        "swiglu_gemm_launch, tma_b off": lambda: fn.swiglu_gemm_launch(
            x, gate_up, act, r, dataclasses.replace(cfg_up, tma_b=False), gather=r.sorted_token, h_out=h),
        "grouped_gemm_launch (down, scatter)": lambda: fn.grouped_gemm_launch(
            act, down, out_rows, r, cfg_down, scatter=r.sort_idx, row_scale=wflat),
        "grouped_gemm_launch, tma_b off": lambda: fn.grouped_gemm_launch(
            act, down, out_rows, r, dataclasses.replace(cfg_down, tma_b=False), scatter=r.sort_idx, row_scale=wflat),
        "combine_launch": lambda: fn.combine_launch(out_rows, ids, num_experts, out),
        "grouped_dw_launch (down_dw)": lambda: fn.grouped_dw_launch(x, act, ddown, r, cfg_dw, a_gather=r.sorted_token),
        "_experts_fwd (save_h)": lambda: fn._experts_fwd(
            x, gate_up, down, ids, weights, None, None, None, None, [], block_m, True),
        "moe_experts_forward (no grad)": lambda: kernel.moe_experts_forward(x, gate_up, down, ids, weights, check_ids=False),
        "router top-k: Transformers' torch ops": lambda: fn._router_topk_torch(logits, top_k, True),
        "router top-k: router_topk (one kernel)": lambda: kernel.router_topk(logits, top_k, normalize=True),
    }  # fmt: skip
    print(f"tokens {tokens}, block_m {block_m}, configs: gate_up {cfg_up}, down {cfg_down}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    with torch.no_grad():
        for name, call in pieces.items():
            print(f"| {name:40s} | {host_us(call):8.1f} us |", flush=True)


if __name__ == "__main__":
    main()
