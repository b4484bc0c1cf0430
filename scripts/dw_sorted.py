"""The weight-gradient GEMMs with their gathered operand (x for gate_up_dw, dOut for down_dw)
copied into sorted order first (tuning.SORT_BEFORE_DW), so that both operands come through TMA
descriptors: each GEMM alone over a list of tiles, sorted against gathered (the shipped config),
the copy's own time, then the experts' forward+backward with the option off and on (the best
sorted tiles found here), twice each; the copy by index_select and by expand.py. Median ms of
triton.testing.do_bench.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 scripts/dw_sorted.py [--json best.json] [--quick]
"""

import argparse
import json
import os
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
import qwen3_moe_fused as qmf  # noqa: E402
from qwen3_moe_fused import functional, tuning  # noqa: E402
from qwen3_moe_fused.expand import expand_launch, sorted_positions  # noqa: E402
from qwen3_moe_fused.grouped_gemm import grouped_dw_launch  # noqa: E402
from qwen3_moe_fused.tuning import DwConfig  # noqa: E402

CASES = [((2048, 768), 16384), ((4096, 1536), 8192)]  # (H, I), tokens
NUM_EXPERTS, TOP_K = 128, 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 128, 64, 4, 3), (128, 128, 32, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
         (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (256, 128, 32, 8, 4), (128, 256, 64, 8, 4),
         (128, 128, 128, 8, 3), (128, 128, 128, 4, 2)]  # fmt: skip


def bench(fn):
    fn()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the best sorted configs here ({dw key: config JSON})")
    parser.add_argument("--quick", action="store_true", help="no tile sweep: the shipped configs on sorted rows")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    best_configs, summary = {}, []
    for (hidden, inter), num_tokens in CASES:
        x = torch.randn(num_tokens, hidden, device=dev, dtype=dt)
        gate_up = torch.randn(NUM_EXPERTS, 2 * inter, hidden, device=dev, dtype=dt) * hidden**-0.5
        down = torch.randn(NUM_EXPERTS, hidden, inter, device=dev, dtype=dt) * inter**-0.5
        weights, ids = torch.randn(num_tokens, NUM_EXPERTS, device=dev).softmax(-1).topk(TOP_K, -1)
        weights = weights.to(dt)
        num_rows = ids.numel()
        block_m = tuning.block_m_for(num_rows, NUM_EXPERTS)
        r = qmf.route(ids, NUM_EXPERTS, block_m, True)
        act = torch.randn(num_rows, inter, device=dev, dtype=dt)
        dh = torch.randn(num_rows, 2 * inter, device=dev, dtype=dt)
        grad_out = torch.randn_like(x)
        sorted_rows = torch.empty(num_rows, hidden, device=dev, dtype=dt)
        copy_ms = bench(lambda: torch.index_select(x, 0, r.sorted_token, out=sorted_rows))
        sorted_pos = sorted_positions(r)
        invert_ms = bench(lambda: sorted_positions(r))
        expand_ms = bench(lambda: expand_launch(x, sorted_pos))
        assert torch.equal(expand_launch(x, sorted_pos), x.index_select(0, r.sorted_token))
        print(f"H={hidden} T={num_tokens}: copy (T*K, H): index_select {copy_ms:.4f} ms, expand.py "
              f"{expand_ms:.4f} ms (+ sorted_positions {invert_ms:.4f}, once a backward)", flush=True)  # fmt: skip
        copy_ms = expand_ms
        gemms = {  # kind: (M, N, gathered launch, sorted launch)
            "gate_up_dw": (2 * inter, hidden,
                           lambda c, out: grouped_dw_launch(dh, x, out, r, c, b_gather=r.sorted_token),
                           lambda c, out: grouped_dw_launch(dh, x_sorted, out, r, c)),
            "down_dw": (hidden, inter,
                        lambda c, out: grouped_dw_launch(grad_out, act, out, r, c, a_gather=r.sorted_token),
                        lambda c, out: grouped_dw_launch(g_sorted, act, out, r, c)),
        }  # fmt: skip
        x_sorted, g_sorted = x.index_select(0, r.sorted_token), grad_out.index_select(0, r.sorted_token)
        for kind, (m, n, gathered, in_order) in gemms.items():
            out = torch.empty(NUM_EXPERTS, m, n, device=dev, dtype=dt)
            shipped = tuning.dw_config(kind, m, n, block_m, dev)
            ref = gathered(shipped, out).clone()
            shipped_ms = bench(lambda: gathered(shipped, out))
            flops = 2 * num_rows * m * n
            print(f"  {kind} gathered, shipped {shipped}: {shipped_ms:.4f} ms {flops / shipped_ms / 1e9:.0f} TFLOP/s")
            results = [] if not args.quick else [(bench(lambda: in_order(shipped, out)), shipped)]
            for bm, bn, bk, warps, stages in TILES if not args.quick else ():
                for tma in (False, True):
                    cfg = DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, tma=tma)
                    try:
                        in_order(cfg, out)
                        same = torch.equal(out, ref) if (bm, bn, bk) == (shipped.block_m, shipped.block_n,
                                                                         shipped.block_k) else None  # fmt: skip
                        ms = bench(lambda cfg=cfg: in_order(cfg, out))
                    except Exception as e:  # out of resources
                        print(f"    {cfg}: {type(e).__name__}")
                        continue
                    results.append((ms, cfg))
                    print(f"    sorted {cfg}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s"
                          + ("" if same is None else f" same bits as gathered: {same}"), flush=True)  # fmt: skip
            ms, cfg = min(results, key=lambda t: t[0])
            best_configs[tuning.dw_key(kind, m, n, block_m)] = cfg
            summary.append(f"H={hidden} T={num_tokens} {kind}: gathered {shipped_ms:.4f} | sorted {ms:.4f} "
                           f"(+ copy {copy_ms:.4f}) {cfg}")  # fmt: skip
        # The experts' forward+backward with the option off, then on (with the best sorted tiles).
        leaves = [t.detach().requires_grad_() for t in (x, gate_up, down)]
        lookup = functional.dw_config

        def step():
            out = qmf.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, weights, check_ids=False)
            return torch.autograd.grad(out, leaves, grad_out)

        def sorted_config(kind, m, n, bm, device):
            return best_configs.get(tuning.dw_key(kind, m, n, bm)) or lookup(kind, m, n, bm, device)

        grads = {}
        cells = []
        for run in range(2):
            for on in (False, True):
                tuning.SORT_BEFORE_DW = on
                functional.dw_config = sorted_config if on else lookup
                grads[on] = step()
                cells.append(f"{'on' if on else 'off'} {bench(step):.3f}")
        tuning.SORT_BEFORE_DW, functional.dw_config = False, lookup
        same = [torch.equal(a, b) for a, b in zip(grads[False], grads[True])]
        summary.append(f"H={hidden} T={num_tokens} experts fwd+bwd, SORT_BEFORE_DW: " + " | ".join(cells)
                       + f" ms; same bits (dx, dgate_up, ddown): {same}")  # fmt: skip
        del leaves, grads
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({key: cfg.to_json() for key, cfg in best_configs.items()}, f, indent=1)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
