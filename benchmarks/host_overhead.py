"""Small token counts: where the time goes, ours vs Transformers' grouped_mm (Qwen3-30B-A3B block, bf16).

At decode sizes the block is bound by the host issuing kernels, not by the GPU. For each
token count this prints, in microseconds per call:
  host       Python/launch time of one call (mean over back-to-back calls, GPU not awaited);
  do_bench   triton.testing.do_bench median (what benchmarks/side_by_side.py reports);
  graph      the GPU alone: the same call captured in a CUDA graph and replayed.
Forward runs with autograd on (inputs and weights require grad), as in side_by_side.py;
"fwd+bwd" is torch.autograd.grad of the output w.r.t. all four inputs.

    python benchmarks/host_overhead.py [--tokens 1 16 64 2048]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import load_kernel  # noqa: E402
from benchmark_moe import QWEN3_30B_A3B, make_problem, transformers_experts  # noqa: E402


def host_us(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def graph_us(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 2048])
    args = parser.parse_args()
    kernel = load_kernel()
    device = torch.device("cuda")
    print("| tokens | call | ours host | grouped_mm host | ours do_bench | grouped_mm do_bench | ours graph | grouped_mm graph |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        p = make_problem(QWEN3_30B_A3B, tokens, device, torch.bfloat16)
        inputs = (p.hidden_states, p.gate_up_proj, p.down_proj, p.top_k_index, p.top_k_weights)
        grouped_mm = transformers_experts(p, "grouped_mm")
        forwards = {
            "ours": lambda: kernel.moe_experts_forward(*inputs, check_ids=False),
            "grouped_mm": lambda: grouped_mm(p.hidden_states, p.top_k_index, p.top_k_weights),
        }
        for call in ("fwd", "fwd+bwd"):
            row = {}
            for impl, forward in forwards.items():
                fn = forward if call == "fwd" else lambda f=forward: torch.autograd.grad(f(), p.grad_inputs, p.grad_out)
                row[impl] = (host_us(fn), 1e3 * triton.testing.do_bench(fn, return_mode="median"), graph_us(fn))
            cells = [f"{row[i][j]:.0f}" for j in range(3) for i in ("ours", "grouped_mm")]
            print(f"| {tokens} | {call} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
