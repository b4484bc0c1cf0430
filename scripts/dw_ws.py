"""The weight-gradient GEMMs with Triton's automatic warp specialization (DwConfig.warp_specialize:
a producer warp issues the TMA loads of the expert's whole row steps, consumer warps run the
MMAs): each GEMM alone on operands in sorted order (as tuning.sort_before_dw makes them), the
shipped config against the same with the option on and against a few tiles with it on; same
bits checked against the shipped config where the tile is the same. Median ms of
triton.testing.do_bench. Configs that do not compile are reported and skipped.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 scripts/dw_ws.py [--json best.json]
"""

import argparse
import dataclasses
import json
import os
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
import qwen3_moe_fused as qmf  # noqa: E402
from qwen3_moe_fused import tuning  # noqa: E402
from qwen3_moe_fused.grouped_gemm import grouped_dw_launch  # noqa: E402
from qwen3_moe_fused.tuning import DwConfig  # noqa: E402

CASES = [((2048, 768), 16384), ((4096, 1536), 8192)]  # (H, I), tokens
NUM_EXPERTS, TOP_K = 128, 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, persistent), all with tma and warp_specialize
TILES = [(128, 128, 64, 4, 3, 0), (128, 128, 64, 4, 4, 0), (128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 0),
         (128, 256, 64, 8, 3, 0), (256, 128, 64, 8, 3, 0), (128, 128, 32, 4, 4, 0), (128, 128, 64, 4, 3, 1),
         (128, 256, 64, 8, 3, 1), (128, 128, 128, 8, 2, 0)]  # fmt: skip


def bench(fn):
    fn()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the best configs here ({dw key: config JSON})")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    best_configs, summary = {}, []
    for (hidden, inter), num_tokens in CASES:
        weights, ids = torch.randn(num_tokens, NUM_EXPERTS, device=dev).softmax(-1).topk(TOP_K, -1)
        num_rows = ids.numel()
        block_m = tuning.block_m_for(num_rows, NUM_EXPERTS)
        r = qmf.route(ids, NUM_EXPERTS, block_m, True)
        act = torch.randn(num_rows, inter, device=dev, dtype=dt)
        dh = torch.randn(num_rows, 2 * inter, device=dev, dtype=dt)
        x_sorted = torch.randn(num_rows, hidden, device=dev, dtype=dt)
        g_sorted = torch.randn(num_rows, hidden, device=dev, dtype=dt)
        gemms = {  # kind: (M, N, launch)
            "gate_up_dw": (2 * inter, hidden, lambda c, out: grouped_dw_launch(dh, x_sorted, out, r, c)),
            "down_dw": (hidden, inter, lambda c, out: grouped_dw_launch(g_sorted, act, out, r, c)),
        }
        for kind, (m, n, launch) in gemms.items():
            out = torch.empty(NUM_EXPERTS, m, n, device=dev, dtype=dt)
            shipped = tuning.dw_config(kind, m, n, block_m, dev)
            ref = launch(shipped, out).clone()
            flops = 2 * num_rows * m * n
            shipped_ms = bench(lambda: launch(shipped, out))
            print(f"H={hidden} T={num_tokens} {kind} shipped {shipped}: {shipped_ms:.4f} ms "
                  f"{flops / shipped_ms / 1e9:.0f} TFLOP/s", flush=True)  # fmt: skip
            candidates = [dataclasses.replace(shipped, tma=True, warp_specialize=True)]
            candidates += [DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s, persistent=p,
                                    tma=True, warp_specialize=True) for bm, bn, bk, w, s, p in TILES]  # fmt: skip
            results = [(shipped_ms, shipped)]
            for cfg in candidates:
                try:
                    launch(cfg, out)
                    torch.cuda.synchronize()
                    tile = (cfg.block_m, cfg.block_n, cfg.block_k)
                    same = torch.equal(out, ref) if tile == (shipped.block_m, shipped.block_n, shipped.block_k) else None
                    ms = bench(lambda cfg=cfg: launch(cfg, out))
                except Exception as e:  # does not compile, out of resources
                    print(f"    {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
                    continue
                results.append((ms, cfg))
                print(f"    {cfg}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s"
                      + ("" if same is None else f", same bits as shipped: {same}"), flush=True)  # fmt: skip
            ms, cfg = min(results, key=lambda t: t[0])
            best_configs[tuning.dw_key(kind, m, n, block_m)] = cfg
            summary.append(f"H={hidden} T={num_tokens} {kind}: shipped {shipped_ms:.4f} | best {ms:.4f} {cfg}")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({key: cfg.to_json() for key, cfg in best_configs.items()}, f, indent=1)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
