"""The routed GEMMs whose A is read in sorted order (the down projection, gate_up_dx, and down_dx
on the sorted copy of dOut) with A through a TMA descriptor (tuning.TMA_A) against through its
pointers: each GEMM alone with the shipped config and a few other tiles, the forward's gate_up
GEMM on x copied into sorted order (expand.py) against gathered, then the experts'
forward+backward with TMA_A off and on, twice each, and whether the bits match. Median ms of
triton.testing.do_bench.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 scripts/a_desc.py [--quick]
"""

import argparse
import os
import sys
from dataclasses import replace

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
import qwen3_moe_fused as qmf  # noqa: E402
from qwen3_moe_fused import tuning  # noqa: E402
from qwen3_moe_fused.expand import expand_launch, sorted_positions  # noqa: E402
from qwen3_moe_fused.grouped_gemm import grouped_gemm_launch, swiglu_gemm_launch  # noqa: E402

CASES = [((2048, 768), 16384), ((4096, 1536), 8192)]  # (H, I), tokens
NUM_EXPERTS, TOP_K = 128, 8
# (BLOCK_N, BLOCK_K, num_warps, num_stages), all with tma_b
TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (256, 64, 8, 4),
         (64, 64, 4, 4)]  # fmt: skip


def bench(fn):
    fn()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shipped configs only")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    summary = []
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
        sorted_pos = sorted_positions(r)
        g_sorted, x_sorted = expand_launch(grad_out, sorted_pos), expand_launch(x, sorted_pos)
        copy_ms = bench(lambda: expand_launch(x, sorted_pos))
        tag = f"H={hidden} T={num_tokens}"
        gemms = {  # kind: (N, K, out, gathered-or-pointer launch, sorted launch)
            "down": (hidden, inter, torch.empty(num_tokens * TOP_K, hidden, device=dev, dtype=dt),
                     lambda c, o: grouped_gemm_launch(act, down, o, r, c, scatter=r.sort_idx,
                                                      row_scale=weights.reshape(-1)),
                     None),
            "gate_up_dx": (hidden, 2 * inter, torch.empty(num_rows, hidden, device=dev, dtype=dt),
                           lambda c, o: grouped_gemm_launch(dh, gate_up, o, r, c, b_is_kn=True, scatter=r.sort_idx),
                           None),
            "down_dx": (inter, hidden, torch.empty(num_rows, inter, device=dev, dtype=dt),
                        lambda c, o: grouped_gemm_launch(grad_out, down, o, r, c, b_is_kn=True, gather=r.sorted_token),
                        lambda c, o: grouped_gemm_launch(g_sorted, down, o, r, c, b_is_kn=True)),
        }  # fmt: skip
        for kind, (n, k, out, launch, sorted_launch) in gemms.items():
            shipped = tuning.gemm_config(kind, n, k, block_m, dev)
            flops = 2 * num_rows * n * k
            tuning.TMA_A = False
            ref = launch(shipped, out).clone()
            cells = [f"pointers {bench(lambda: launch(shipped, out)):.4f}"]
            run = sorted_launch or launch
            tuning.TMA_A = True
            same = torch.equal(run(shipped, out), ref)
            ms = bench(lambda: run(shipped, out))
            cells.append(f"A desc {ms:.4f} ({flops / ms / 1e9:.0f} TFLOP/s) same bits {same}")
            best = (ms, shipped)
            for bn, bk, warps, stages in TILES if not args.quick else ():
                cfg = replace(shipped, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, tma_b=True)
                try:
                    t = bench(lambda cfg=cfg: run(cfg, out))
                except Exception as e:  # out of resources
                    print(f"    {kind} {cfg}: {type(e).__name__}")
                    continue
                print(f"    {tag} {kind} A desc {cfg}: {t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s", flush=True)
                best = min(best, (t, cfg), key=lambda b: b[0])
            summary.append(f"{tag} {kind} (shipped {shipped}): " + " | ".join(cells)
                           + f" | best {best[0]:.4f} {best[1]}")  # fmt: skip
            print(summary[-1], flush=True)
        # The forward's gate_up GEMM on x copied into sorted order, A through a descriptor.
        cfg = tuning.gemm_config("gate_up", inter, hidden, block_m, dev)
        a_out, h_out = act.clone(), dh.clone()
        tuning.TMA_A = False
        gathered_ms = bench(lambda: swiglu_gemm_launch(x, gate_up, a_out, r, cfg, gather=r.sorted_token, h_out=h_out))
        ref = a_out.clone()
        tuning.TMA_A = True
        sorted_ms = bench(lambda: swiglu_gemm_launch(x_sorted, gate_up, a_out, r, cfg, h_out=h_out))
        summary.append(f"{tag} gate_up fwd: gathered {gathered_ms:.4f} | sorted x, A desc {sorted_ms:.4f} "
                       f"(+ copy {copy_ms:.4f}) same bits {torch.equal(a_out, ref)}")  # fmt: skip
        print(summary[-1], flush=True)
        # The experts' forward+backward, TMA_A off / on.
        leaves = [t.detach().requires_grad_() for t in (x, gate_up, down)]

        def step():
            out = qmf.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, weights, check_ids=False)
            return (out, *torch.autograd.grad(out, leaves, grad_out))

        results, cells = {}, []
        for _ in range(2):
            for on in (False, True):
                tuning.TMA_A = on
                results[on] = step()
                cells.append(f"{'on' if on else 'off'} {bench(step):.3f}")
        same = [torch.equal(a, b) for a, b in zip(results[False], results[True])]
        summary.append(f"{tag} experts fwd+bwd, TMA_A: " + " | ".join(cells)
                       + f" ms; same bits (out, dx, dgate_up, ddown): {same}")  # fmt: skip
        print(summary[-1], flush=True)
        tuning.TMA_A = True
        del leaves, results
        torch.cuda.empty_cache()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
