"""GPU time of the routing (routing.route) for Qwen3 MoE row counts, at several rows per program
of its histogram / scatter kernels (routing.BLOCK_ROWS and SMALL_BLOCK_ROWS, read at each call).
Timed as a CUDA graph replay (host launch time left out), µs.

    python3 scripts/bench_routing.py [--block-rows 128 256 512 1024]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from host_overhead import graph_us  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-rows", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = parser.parse_args()
    routing = load_kernel().routing
    shipped = routing.BLOCK_ROWS, routing.SMALL_BLOCK_ROWS
    print("| tokens x K, E | " + " | ".join(f"BLOCK_ROWS {b}" for b in args.block_rows) + " |")
    for tokens, top_k, experts in ((64, 8, 128), (2048, 8, 128), (16384, 8, 128), (8192, 10, 512), (16384, 10, 512)):
        ids = torch.randn(tokens, experts, device="cuda").topk(top_k, -1).indices
        cells, ref = [], None
        for block_rows in args.block_rows:
            routing.BLOCK_ROWS = routing.SMALL_BLOCK_ROWS = block_rows
            r = routing.route(ids, experts, 128, True)
            ref = ref or r
            assert all(torch.equal(a, b) for a, b in zip(r[:5], ref[:5])), "routing differs between BLOCK_ROWS"
            cells.append(f"{graph_us(lambda: routing.route(ids, experts, 128, True)):.1f} us")
        print(f"| {tokens} x {top_k}, {experts} | " + " | ".join(cells) + " |", flush=True)
    routing.BLOCK_ROWS, routing.SMALL_BLOCK_ROWS = shipped


if __name__ == "__main__":
    main()
