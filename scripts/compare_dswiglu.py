"""The down_dx GEMM with the SwiGLU backward in its epilogue (dswiglu_gemm_launch) in two builds,
timed side by side on the GPU, and their outputs compared: for a change to that kernel.

    python3 scripts/compare_dswiglu.py OLD_BUILD NEW_BUILD
OLD_BUILD / NEW_BUILD: build/torch-cuda folders made by scripts/build.py from the two commits.
At the Qwen3-30B-A3B (16384 tokens) and Qwen3-235B-A22B (8192 tokens) training shapes, for the
shipped config of each build and a few others, median ms of triton.testing.do_bench, builds
alternating; then whether d(gate, up) and w * act are the same bits and how far the
routing-weight gradients are apart (float32 sums in another order).
"""

import dataclasses
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bit_compare import load  # noqa: E402

SHAPES = {"30b": (2048, 768, 16384), "235b": (4096, 1536, 8192)}  # (H, I, tokens)
NUM_EXPERTS, TOP_K = 128, 8
OTHER_TILES = [(128, 64, 8, 3), (128, 32, 8, 4), (128, 64, 8, 4), (64, 64, 8, 4), (256, 64, 8, 3)]


def main():
    old, new = load(sys.argv[1], "qmf_old"), load(sys.argv[2], "qmf_new")
    dev, dt = torch.device("cuda"), torch.bfloat16
    for name, (hidden, inter, tokens) in SHAPES.items():
        torch.manual_seed(0)
        grad_out = torch.randn(tokens, hidden, device=dev, dtype=dt)
        down = torch.randn(NUM_EXPERTS, hidden, inter, device=dev, dtype=dt) * inter**-0.5
        weights, ids = torch.randn(tokens, NUM_EXPERTS, device=dev).softmax(-1).topk(TOP_K, -1)
        weights = weights.to(dt).reshape(-1)
        rows = ids.numel()
        block_m = new.tuning.block_m_for(rows, NUM_EXPERTS)
        h = torch.randn(rows, 2 * inter, device=dev, dtype=dt)
        outs, routes = {}, {tag: pkg.route(ids, NUM_EXPERTS, block_m, True) for tag, pkg in (("old", old), ("new", new))}

        def launch(pkg, r, cfg):
            dh, w_act = torch.empty(rows, 2 * inter, device=dev, dtype=dt), torch.empty(rows, inter, device=dev, dtype=dt)
            dweights = torch.empty(rows, device=dev, dtype=dt)
            run = lambda: pkg.functional.dswiglu_gemm_launch(grad_out, down, h, weights, r, cfg, dh=dh, w_act=w_act,  # noqa: E731
                                                             dweights=dweights, gather=r.sorted_token)  # fmt: skip
            run()
            return run, (dh, w_act, dweights)

        shipped = new.tuning.gemm_config("down_dx_swiglu", inter, hidden, block_m, dev)
        configs = [("shipped", shipped)] + [
            (f"{bn}x{bk} {w}w {s}s", dataclasses.replace(shipped, block_n=bn, block_k=bk, num_warps=w, num_stages=s))
            for bn, bk, w, s in OTHER_TILES
        ]
        flops = 2 * rows * hidden * inter
        for label, cfg in configs:
            times = {}
            for tag, pkg in (("old", old), ("new", new)):
                cfg_pkg = pkg.tuning.GemmConfig(**dataclasses.asdict(cfg))
                run, out = launch(pkg, routes[tag], cfg_pkg)
                times[tag] = triton.testing.do_bench(run, warmup=25, rep=200)
                outs[tag] = out
            same = all(torch.equal(a, b) for a, b in zip(outs["old"][:2], outs["new"][:2]))
            dw_diff = (outs["old"][2].float() - outs["new"][2].float()).abs().max().item()
            print(f"{name} {label:16s} {cfg}: old {times['old']:.4f} ms | new {times['new']:.4f} ms "
                  f"({flops / times['new'] * 1e-9:.0f} TFLOP/s) | dh, w_act same bits: {same} | "
                  f"max |d_w old - new| {dw_diff:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
