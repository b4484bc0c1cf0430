"""Tune the grouped GEMM tile configs on this GPU and write configs/<device>.json.

Run on a CUDA machine after `python3 scripts/build.py` (it imports build/torch-cuda):
    python3 scripts/tune.py [--quick] [--shapes NAME ... | --family] [--tokens 1024 ...] [--only routed|dw|dswiglu|lora]
        [--from-shipped]
Each GEMM kind of the MoE block is timed (triton.testing.do_bench, median) over a small
candidate list for the Qwen3-30B-A3B and Qwen3-235B-A22B shapes (--shapes: any of SHAPES;
--family: all of them, Qwen3-Coder / Next / 3.5 too), at a training and a decode token
count (or --tokens); the fastest config of each key is merged into
torch-ext/qwen3_moe_fused/configs/<device>.json, which is written after every key.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "torch-cuda"))
import qwen3_moe_fused as qmf  # noqa: E402
from qwen3_moe_fused import tuning  # noqa: E402
from qwen3_moe_fused.grouped_gemm import (  # noqa: E402
    dswiglu_gemm_launch, grouped_dw_launch, grouped_gemm_launch, swiglu_gemm_launch,
)  # fmt: skip
from qwen3_moe_fused.tuning import DwConfig, GemmConfig  # noqa: E402

# (H, I, E, K, training token count), as benchmarks/benchmark_moe.py's named shapes. The
# configs are keyed by (GEMM, N, K, block_m); E and K set the rows per expert (block_m).
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, 8192),
    "qwen3-coder-480b-a35b": (6144, 2560, 160, 8, 8192),
    "qwen3-next-80b-a3b": (2048, 512, 512, 10, 16384),
    "qwen3.5-35b-a3b": (2048, 512, 256, 8, 16384),
    "qwen3.5-397b-a17b": (4096, 1024, 512, 10, 8192),
}
DEFAULT_SHAPES = ["qwen3-30b-a3b", "qwen3-235b-a22b"]
LORA_RANK = 16


def gemm_candidates(block_m: int, swiglu: bool):
    if block_m <= 32:
        tiles = [(32, 64, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (32, 128, 4, 4),
                 (64, 256, 4, 2), (128, 128, 4, 3), (32, 256, 4, 3)]  # fmt: skip
    else:
        tiles = [(64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 128, 8, 3),
                 (128, 64, 4, 3), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 5), (256, 32, 8, 4), (256, 64, 8, 4),
                 (128, 64, 8, 5), (128, 128, 8, 4)]  # fmt: skip
    for block_n, block_k, warps, stages in tiles:
        smem = stages * (block_m * block_k + block_k * block_n * (2 if swiglu else 1)) * 2
        if smem <= 220 * 1024 and not (swiglu and block_n > 128):
            cfg = GemmConfig(block_n=block_n, block_k=block_k, group_m=8, num_warps=warps, num_stages=stages)
            yield cfg
            if block_m > 32:  # training tiles: also with B through a TMA descriptor, on a persistent grid
                yield dataclasses.replace(cfg, tma_b=True)
                yield dataclasses.replace(cfg, tma_b=True, persistent=1)


def lora_candidates():
    for block_n, block_k, warps, stages in [(16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3),
                                            (16, 256, 4, 2), (32, 128, 8, 4)]:  # fmt: skip
        yield GemmConfig(block_n=block_n, block_k=block_k, group_m=8, num_warps=warps, num_stages=stages)


def lora_dw_candidates(thin_m: bool):
    """Tiles of a factor gradient (E, R, big) (thin_m) or (E, big, R): thin along the rank."""
    for thin, wide, block_k, warps, stages in [(16, 128, 64, 4, 3), (16, 256, 64, 4, 3), (32, 128, 64, 4, 3),
                                               (16, 128, 128, 4, 3), (32, 256, 64, 8, 3), (16, 64, 128, 4, 4),
                                               (32, 64, 64, 4, 4), (16, 256, 32, 4, 4), (32, 128, 128, 4, 3)]:  # fmt: skip
        block_m, block_n = (thin, wide) if thin_m else (wide, thin)
        yield DwConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages)
        yield DwConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages, tma=True)


# dW tiles that were best on the H100 / H200: also tried on a persistent grid (1 and 2 programs per SM)
# and with the sorted operand through a TMA descriptor.
DW_PERSISTENT_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 4),
                       (128, 128, 32, 8, 3)]  # fmt: skip


def dw_candidates():
    for bm, bn, bk, warps, stages in [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4),
                                      (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (256, 128, 32, 8, 4), (128, 128, 32, 8, 5),
                                      (128, 128, 64, 4, 3), (128, 256, 32, 8, 4)]:  # fmt: skip
        smem = stages * (bm + bn) * bk * 2
        if smem <= 220 * 1024:
            yield DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in DW_PERSISTENT_TILES:
        for persistent in (1, 2):
            yield DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                           persistent=persistent)  # fmt: skip
        yield DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, tma=True)


# --from-shipped: {(kind, decode row tile?): configs} already in the device's JSON file; each key
# is then tuned over those (they won for other shapes and row tiles of the same class) instead
# of the whole candidate list.
SHIPPED_CANDIDATES = {}


def _tile_class(key: str) -> tuple[str, bool]:
    kind, *_, bm = key.split(" ")[0].split("|")
    return kind, int(bm.removeprefix("BM=")) <= 32


def _shipped_candidates(configs: dict) -> dict:
    found = {}
    for key, cfg in configs.items():
        found.setdefault(_tile_class(key), set()).add(cfg)
    return found


def best(name, launch, candidates, log):
    shipped = SHIPPED_CANDIDATES.get(_tile_class(name))
    if shipped:
        candidates = sorted(shipped, key=str)
    results = []
    for cfg in candidates:
        try:
            launch(cfg)
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=10, rep=40, return_mode="median")
        except Exception as e:  # out of resources for this tile
            log.write(f"{name} {cfg} failed: {type(e).__name__}\n")
            continue
        results.append((ms, cfg))
        log.write(f"{name} {cfg} {ms:.4f} ms\n")
    ms, cfg = min(results, key=lambda r: r[0])
    print(f"{name:48s} {ms:8.4f} ms  {cfg}", flush=True)
    return cfg


def tune_shape(hidden, inter, num_experts, top_k, num_tokens, configs, log, save, only=None):
    """Tune every GEMM of one shape at num_tokens into configs, calling save() after each key."""
    dev = torch.device("cuda")
    x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) * inter**-0.5
    weights, ids = torch.randn(num_tokens, num_experts, device=dev).softmax(-1).topk(top_k, -1)
    weights = weights.to(torch.bfloat16)
    num_rows = ids.numel()
    block_m = tuning.block_m_for(num_rows, num_experts)
    r = qmf.route(ids, num_experts, block_m, True)
    act = torch.empty(num_rows, inter, device=dev, dtype=torch.bfloat16)
    h = torch.randn(num_rows, 2 * inter, device=dev, dtype=torch.bfloat16)
    rows = torch.empty(num_rows, hidden, device=dev, dtype=torch.bfloat16)
    dh = torch.randn(num_rows, 2 * inter, device=dev, dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    flat_w = weights.reshape(-1)
    dh_out, dweights = torch.empty_like(dh), torch.empty_like(flat_w)

    def dswiglu(c, lora=None):  # the down_dx GEMM with the SwiGLU backward in its epilogue
        dswiglu_gemm_launch(grad_out, down, h, flat_w, r, c, dh=dh_out, w_act=act, dweights=dweights,
                            gather=r.sorted_token, lora=lora)  # fmt: skip

    routed = {
        "gate_up": (inter, hidden, True, lambda c: swiglu_gemm_launch(
            x, gate_up, act, r, c, gather=r.sorted_token, h_out=h)),
        "down": (hidden, inter, False, lambda c: grouped_gemm_launch(
            act, down, rows, r, c, scatter=r.sort_idx, row_scale=flat_w)),
        "down_dx": (inter, hidden, False, lambda c: grouped_gemm_launch(
            grad_out, down, act, r, c, b_is_kn=True, gather=r.sorted_token)),
        "gate_up_dx": (hidden, 2 * inter, False, lambda c: grouped_gemm_launch(
            dh, gate_up, rows, r, c, b_is_kn=True, scatter=r.sort_idx)),
        "down_dx_swiglu": (inter, hidden, False, dswiglu),
    }  # fmt: skip
    if only in ("dw", "lora"):
        routed = {}
    if only == "dswiglu":
        routed = {"down_dx_swiglu": routed["down_dx_swiglu"]}
    for kind, (n, k, swiglu, launch) in routed.items():
        key = tuning.gemm_key(kind, n, k, block_m)
        configs[key] = best(f"{key} T={num_tokens}", launch, gemm_candidates(block_m, swiglu), log)
        save()
    if block_m > 32 and only not in ("dw", "dswiglu"):  # training: the GEMMs with the LoRA term (rank LORA_RANK)
        lora_rows = torch.randn(num_rows, LORA_RANK, device=dev, dtype=torch.bfloat16)
        lora_b = {n: torch.randn(num_experts, n, LORA_RANK, device=dev, dtype=torch.bfloat16) * 0.1
                  for n in (2 * inter, hidden)}  # fmt: skip
        lora_a_down = torch.randn(num_experts, LORA_RANK, inter, device=dev, dtype=torch.bfloat16) * 0.1  # (E, R, I)
        lora_a_gate_up = torch.randn(num_experts, LORA_RANK, hidden, device=dev, dtype=torch.bfloat16) * 0.1  # (E, R, H)
        with_lora = {
            "gate_up": (inter, hidden, True, lambda c: swiglu_gemm_launch(
                x, gate_up, act, r, c, gather=r.sorted_token, h_out=h,
                lora=(lora_rows, lora_b[2 * inter], False))),
            "down": (hidden, inter, False, lambda c: grouped_gemm_launch(
                act, down, rows, r, c, scatter=r.sort_idx, row_scale=flat_w, lora=(lora_rows, lora_b[hidden], False))),
            "down_dx_swiglu": (inter, hidden, False, lambda c: dswiglu(c, lora=(lora_rows, lora_a_down, True))),
            "down_dx": (inter, hidden, False, lambda c: grouped_gemm_launch(
                grad_out, down, act, r, c, b_is_kn=True, gather=r.sorted_token, lora=(lora_rows, lora_a_down, True))),
            "gate_up_dx": (hidden, 2 * inter, False, lambda c: grouped_gemm_launch(
                dh, gate_up, rows, r, c, b_is_kn=True, scatter=r.sort_idx, lora=(lora_rows, lora_a_gate_up, True))),
        }  # fmt: skip
        if only == "lora":  # the shipped backward: the SwiGLU backward apart (tuning.FUSE_DSWIGLU off)
            with_lora.pop("down_dx_swiglu")
        for kind, (n, k, swiglu, launch) in with_lora.items():
            key = tuning.gemm_key(f"{kind}+lora", n, k, block_m)
            configs[key] = best(f"{key} T={num_tokens}", launch, gemm_candidates(block_m, swiglu), log)
            save()
    if only in ("routed", "dswiglu"):
        return
    if only != "dw":
        tune_lora(hidden, inter, num_experts, x, act, grad_out, dh, r, configs, log, save, num_tokens)
    if only == "lora":
        return
    if block_m <= 32:  # decode: no backward
        return
    d_down, d_gate_up = torch.empty_like(down), torch.empty_like(gate_up)
    dws = {
        "down_dw": (hidden, inter, lambda c: grouped_dw_launch(
            grad_out, act, d_down, r, c, a_gather=r.sorted_token)),
        "gate_up_dw": (2 * inter, hidden, lambda c: grouped_dw_launch(dh, x, d_gate_up, r, c, b_gather=r.sorted_token)),
    }  # fmt: skip
    for kind, (m, n, launch) in dws.items():
        key = tuning.dw_key(kind, m, n, block_m)
        configs[key] = best(f"{key} T={num_tokens}", launch, dw_candidates(), log)
        save()


def tune_lora(hidden, inter, num_experts, x, act, grad_out, dh, r, configs, log, save, num_tokens):
    """The thin GEMMs of LoRA rank LORA_RANK: the projections by a factor ("lora", one key for
    the forward's A and the backward's transposed B of the same K: both timed together) and,
    at training row tiles, the four factor gradients ("lora_dw")."""
    dev, dt, rank, num_rows, block_m = x.device, x.dtype, LORA_RANK, r.sort_idx.numel(), r.block_m
    projected = torch.empty(num_rows, rank, device=dev, dtype=dt)
    a_factor = {k: torch.randn(num_experts, rank, k, device=dev, dtype=dt) for k in (hidden, inter)}  # (E, R, in)
    b_factor = {n: torch.randn(num_experts, n, rank, device=dev, dtype=dt) for n in (hidden, 2 * inter)}  # (E, out, R)
    projections = [  # (K, launch): launches of one K share a key, and are timed together
        (hidden, lambda c: grouped_gemm_launch(x, a_factor[hidden], projected, r, c, gather=r.sorted_token)),
        (inter, lambda c: grouped_gemm_launch(act, a_factor[inter], projected, r, c)),
    ]  # fmt: skip
    if block_m > 32:  # training: the backward's projections by the transposed B factors
        projections += [
            (hidden, lambda c: grouped_gemm_launch(grad_out, b_factor[hidden], projected, r, c, gather=r.sorted_token,
                                                   b_is_kn=True)),
            (2 * inter, lambda c: grouped_gemm_launch(dh, b_factor[2 * inter], projected, r, c, b_is_kn=True)),
        ]  # fmt: skip
    for k in dict.fromkeys(k for k, _ in projections):
        launches = [launch for k_, launch in projections if k_ == k]
        key = tuning.gemm_key("lora", rank, k, block_m)
        configs[key] = best(f"{key} T={num_tokens}", lambda c, ls=launches: [f(c) for f in ls], lora_candidates(), log)
        save()
    if block_m <= 32:
        return
    lora_rows = torch.randn(num_rows, rank, device=dev, dtype=dt)
    dws = [  # ((M, N), launch): the factor gradients as functional.py makes them; one key's timed together
        ((rank, inter), lambda c, out=torch.empty(num_experts, rank, inter, device=dev, dtype=dt): grouped_dw_launch(
            lora_rows, act, out, r, c)),
        ((hidden, rank), lambda c, out=torch.empty(num_experts, hidden, rank, device=dev, dtype=dt): grouped_dw_launch(
            grad_out, lora_rows, out, r, c, a_gather=r.sorted_token)),
        ((rank, hidden), lambda c, out=torch.empty(num_experts, rank, hidden, device=dev, dtype=dt): grouped_dw_launch(
            lora_rows, x, out, r, c, b_gather=r.sorted_token)),
        ((2 * inter, rank), lambda c, out=torch.empty(num_experts, 2 * inter, rank, device=dev, dtype=dt):
            grouped_dw_launch(dh, lora_rows, out, r, c)),
    ]  # fmt: skip
    for m, n in dict.fromkeys(mn for mn, _ in dws):
        launches = [launch for mn, launch in dws if mn == (m, n)]
        key = tuning.dw_key("lora_dw", m, n, block_m)
        configs[key] = best(f"{key} T={num_tokens}", lambda c, ls=launches: [f(c) for f in ls], lora_dw_candidates(m < n),
                            log)  # fmt: skip
        save()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 30B-A3B shape")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help=f"shapes to tune (default {DEFAULT_SHAPES})")
    parser.add_argument("--family", action="store_true", help="every shape of SHAPES")
    parser.add_argument("--only", choices=["routed", "dw", "dswiglu", "lora"], help="only the routed GEMMs (with and "
                        "without the LoRA term), only the weight-gradient GEMMs, only the down_dx GEMM with the fused "
                        "SwiGLU backward (down_dx_swiglu), or only LoRA's GEMMs (the routed ones with its term, its thin "
                        "projections and factor gradients), at the "
                        "training token count")  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts to tune at (default: the training "
                        "count, 16384 for 30B-A3B and 8192 for 235B-A22B, and 16 for decode)")  # fmt: skip
    parser.add_argument("--from-shipped", action="store_true", help="try only the configs the device's JSON "
                        "already holds for the same GEMM kind and row tile (fewer compiles: for new shapes)")  # fmt: skip
    parser.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "tune.log"))
    args = parser.parse_args()
    name = tuning.device_key(torch.cuda.get_device_name())
    path = os.path.join(ROOT, "torch-ext", "qwen3_moe_fused", "configs", f"{name}.json")
    configs = tuning.parse_configs(json.load(open(path))) if os.path.exists(path) else {}
    if args.from_shipped:
        SHIPPED_CANDIDATES.update(_shipped_candidates(configs))
    start = time.time()

    def save():  # after each key: a partial run still leaves its results
        write(path, name, configs)

    with open(args.log, "w") as log:
        shapes = ["qwen3-30b-a3b"] if args.quick else list(SHAPES) if args.family else args.shapes or DEFAULT_SHAPES
        for shape in shapes:
            hidden, inter, num_experts, top_k, train_tokens = SHAPES[shape]
            token_counts = (train_tokens,) + (() if args.only else (16,))
            for num_tokens in args.tokens or token_counts:
                tune_shape(hidden, inter, num_experts, top_k, num_tokens, configs, log, save, args.only)
    print(f"wrote {path} ({len(configs)} configs) in {time.time() - start:.0f} s")


def write(path, name, configs):
    """configs {key: GemmConfig or DwConfig} -> the JSON file (and a copy under $OUT)."""
    entries = {key: cfg.to_json() for key, cfg in sorted(configs.items())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    paths = [path] + ([os.path.join(os.environ["OUT"], f"{name}.json")] if os.environ.get("OUT") else [])
    for p in paths:  # the device tool brings back files under $OUT
        with open(p, "w") as f:
            json.dump(entries, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
