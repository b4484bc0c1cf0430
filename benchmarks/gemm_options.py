"""Each routed and weight-gradient GEMM of the MoE block with its shipped config, with one config
option set to each of several values (e.g. PERSISTENT 0 1 2, TMA_B 0 1 for the routed GEMMs,
TMA 0 1 for the weight-gradient ones: keys of configs/*.json; GEMMs without the key are
skipped): median ms of triton.testing.do_bench.
The first value is timed again at the end, which shows the drift between measurements.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 benchmarks/gemm_options.py PERSISTENT 0 1 2
    python3 benchmarks/gemm_options.py TMA 0 1
"""

import argparse
import os
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
import qwen3_moe_fused as qmf  # noqa: E402
from qwen3_moe_fused import tuning  # noqa: E402
from qwen3_moe_fused.grouped_gemm import grouped_dw_launch, grouped_gemm_launch, swiglu_gemm_launch  # noqa: E402

CASES = [((2048, 768), 16384), ((2048, 768), 2048), ((4096, 1536), 8192), ((2048, 768), 64)]  # (H, I), tokens
NUM_EXPERTS, TOP_K = 128, 8


def routed_gemms(hidden, inter, num_tokens):
    """{kind: (N, K, launch(config))} of the four routed GEMMs and (M, N, launch(config)) of the two
    weight-gradient GEMMs on random inputs, and the row tile."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(num_tokens, hidden, device=dev, dtype=dt)
    gate_up = torch.randn(NUM_EXPERTS, 2 * inter, hidden, device=dev, dtype=dt) * hidden**-0.5
    down = torch.randn(NUM_EXPERTS, hidden, inter, device=dev, dtype=dt) * inter**-0.5
    weights, ids = torch.randn(num_tokens, NUM_EXPERTS, device=dev).softmax(-1).topk(TOP_K, -1)
    weights = weights.to(dt).reshape(-1)
    num_rows = ids.numel()
    block_m = tuning.block_m_for(num_rows, NUM_EXPERTS)
    r = qmf.route(ids, NUM_EXPERTS, block_m, True)
    act = torch.randn(num_rows, inter, device=dev, dtype=dt)
    h = torch.empty(num_rows, 2 * inter, device=dev, dtype=dt)
    rows = torch.empty(num_rows, hidden, device=dev, dtype=dt)
    dh = torch.randn(num_rows, 2 * inter, device=dev, dtype=dt)
    grad_out = torch.randn_like(x)
    gemms = {
        "gate_up": (inter, hidden, lambda c: swiglu_gemm_launch(
            x, gate_up, act, r, c, gather=r.sorted_token, h_out=h)),
        "down": (hidden, inter, lambda c: grouped_gemm_launch(
            act, down, rows, r, c, scatter=r.sort_idx, row_scale=weights)),
        "down_dx": (inter, hidden, lambda c: grouped_gemm_launch(
            grad_out, down, act, r, c, b_is_kn=True, gather=r.sorted_token)),
        "gate_up_dx": (hidden, 2 * inter, lambda c: grouped_gemm_launch(
            dh, gate_up, rows, r, c, b_is_kn=True, scatter=r.sort_idx)),
        "gate_up_dw": (2 * inter, hidden, lambda c: grouped_dw_launch(
            dh, x, torch.empty_like(gate_up), r, c, b_gather=r.sorted_token)),
        "down_dw": (hidden, inter, lambda c: grouped_dw_launch(
            grad_out, act, torch.empty_like(down), r, c, a_gather=r.sorted_token)),
    }  # fmt: skip
    return gemms, block_m


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("option", help="config key as in configs/*.json, e.g. PERSISTENT or TMA_B")
    parser.add_argument("values", type=int, nargs="+")
    args = parser.parse_args()
    dev = torch.device("cuda")
    for (hidden, inter), num_tokens in CASES:
        gemms, block_m = routed_gemms(hidden, inter, num_tokens)
        for kind, (n, k, launch) in gemms.items():
            dw = kind.endswith("_dw")
            if args.option not in (tuning._DW_KEYS if dw else tuning._GEMM_KEYS).values():
                continue
            base = (tuning.dw_config if dw else tuning.gemm_config)(kind, n, k, block_m, dev)
            cells = []
            for value in args.values + args.values[:1]:
                cfg = type(base).from_json(dict(base.to_json(), **{args.option: value}))
                launch(cfg)
                ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=10, rep=50, return_mode="median")
                cells.append(f"{args.option}={value} {ms:.4f}")
            print(f"H={hidden} T={num_tokens} {kind:10s} {base}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
