"""The weight-gradient GEMMs on operands in sorted order (tuning.sort_before_dw) with DwConfig.flat:
the persistent programs walk their (tile, row step) pairs in one loop, pipelined across tiles
(grouped_gemm/backward_dw.py, _grouped_dw_flat_kernel). For 30B-A3B at 16384 tokens and
235B-A22B at 8192 (128 experts, top-8, bf16, random routing), each dW GEMM alone: the shipped
config, then a few tiles without flat (TMA, one program a tile) and with it on 1 and 2 programs
an SM; each flat result is checked bit for bit against the same tile without flat. Median ms of
triton.testing.do_bench, TFLOP/s, a table last.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 scripts/dw_flat.py [--json best.json] [--quick]
--json writes the fastest config of each dW key ({dw key: config JSON}, tuning.dw_key with the
routing's block_m; flat ones only where bit-equal), to merge into configs/<device>.json.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("30B-A3B", 2048, 768, 16384), ("235B-A22B", 4096, 1536, 8192)]  # name, H, I, tokens
NUM_EXPERTS, TOP_K = 128, 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 128, 32, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 8, 4)]
PERSISTENT = (1, 2)


def describe(cfg) -> str:
    tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    return tile + (" tma" if cfg.tma else "") + (f" p{cfg.persistent}" if cfg.persistent else "") + (
        " flat" if cfg.flat else "")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the fastest config of each dW key here ({dw key: config JSON})")
    parser.add_argument("--quick", action="store_true", help="only the first two tiles (a short device call)")
    args = parser.parse_args()
    tiles = TILES[:2] if args.quick else TILES

    # GPU work only from here: --help needs neither a GPU nor the build.
    from dataclasses import replace

    import torch
    import triton

    sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
    import qwen3_moe_fused as qmf
    from qwen3_moe_fused import tuning
    from qwen3_moe_fused.grouped_gemm import grouped_dw_launch
    from qwen3_moe_fused.tuning import DwConfig

    def bench(fn):
        fn()
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"{torch.cuda.get_device_name(dev)}, triton {triton.__version__}, torch {torch.__version__}", flush=True)
    best_configs, table = {}, []
    for name, hidden, inter, num_tokens in CASES:
        torch.manual_seed(0)
        ids = torch.randn(num_tokens, NUM_EXPERTS, device=dev).topk(TOP_K, -1).indices
        num_rows = ids.numel()
        block_m = tuning.block_m_for(num_rows, NUM_EXPERTS)
        r = qmf.route(ids, NUM_EXPERTS, block_m, True)
        # The operands as functional.py's backward feeds them with tuning.sort_before_dw: the token
        # rows (x, dOut) copied into sorted order, the others (dh, the weighted act) sorted already.
        x_sorted = torch.randn(num_tokens, hidden, device=dev, dtype=dt).index_select(0, r.sorted_token)
        g_sorted = torch.randn(num_tokens, hidden, device=dev, dtype=dt).index_select(0, r.sorted_token)
        dh = torch.randn(num_rows, 2 * inter, device=dev, dtype=dt)
        act = torch.randn(num_rows, inter, device=dev, dtype=dt)
        gemms = {  # kind: (M, N, launch)
            "gate_up_dw": (2 * inter, hidden, lambda c, out: grouped_dw_launch(dh, x_sorted, out, r, c)),
            "down_dw": (hidden, inter, lambda c, out: grouped_dw_launch(g_sorted, act, out, r, c)),
        }
        print(f"{name}: H={hidden} I={inter} T={num_tokens}, {num_rows / NUM_EXPERTS:.0f} rows an expert, "
              f"BM={block_m}", flush=True)  # fmt: skip
        for kind, (m, n, launch) in gemms.items():
            out = torch.empty(NUM_EXPERTS, m, n, device=dev, dtype=dt)
            flops = 2 * num_rows * m * n
            results = []  # (ms, config)

            def timed(cfg, ref=None):
                """ms of cfg (None where it failed or differs from ref), out holding its result."""
                try:
                    launch(cfg, out)
                    same = None if ref is None else torch.equal(out, ref)
                    ms = bench(lambda: launch(cfg, out))
                except Exception as e:  # out of resources, compile errors
                    print(f"    {describe(cfg)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    return None
                print(f"    {describe(cfg)}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s"
                      + ("" if same is None else f", same bits as without flat: {same}"), flush=True)  # fmt: skip
                if same is False:
                    return None
                results.append((ms, cfg))
                return ms

            shipped = tuning.dw_config(kind, m, n, block_m, dev)
            print(f"  {kind} M={m} N={n}: {flops / 1e12:.2f} TFLOP; shipped:", flush=True)
            shipped_ms = timed(shipped)
            for bm, bn, bk, warps, stages in tiles:
                base = DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, tma=True)
                base_ms = timed(base)
                if base_ms is None:
                    continue
                ref = out.clone()
                for persistent in PERSISTENT:
                    flat_ms = timed(replace(base, persistent=persistent, flat=True), ref)
                    table.append((name, kind, describe(base), persistent, base_ms, flat_ms, flops))
                del ref
            if results:
                ms, cfg = min(results, key=lambda t: t[0])
                best_configs[tuning.dw_key(kind, m, n, block_m)] = cfg
                shipped_cell = "failed" if shipped_ms is None else f"{shipped_ms:.4f} ms"
                print(f"  {kind} best: {describe(cfg)} {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                      f"(shipped {describe(shipped)}: {shipped_cell})", flush=True)  # fmt: skip
            del out
            torch.cuda.empty_cache()
        del x_sorted, g_sorted, dh, act
        torch.cuda.empty_cache()

    def cell(ms, flops):
        return "failed/differs" if ms is None else f"{ms:.4f} ms {flops / ms / 1e9:4.0f} TF/s"

    print("\n| case | kind | tile (TMA) | persistent | without flat | flat |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kind, tile, persistent, base_ms, flat_ms, flops in table:
        print(f"| {name} | {kind} | {tile} | {persistent} | {cell(base_ms, flops)} | {cell(flat_ms, flops)} |")
    for key, cfg in best_configs.items():
        print(f"best {key}: {json.dumps(cfg.to_json())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({key: cfg.to_json() for key, cfg in best_configs.items()}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
