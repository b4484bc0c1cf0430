"""The experts' forward and forward+backward of two builds, timed side by side on the GPU: for a
kernel change that should not change results but may change speed.

    python3 scripts/time_builds.py OLD_BUILD NEW_BUILD [--rounds 3] [--cases 30b-t2048,...]
OLD_BUILD / NEW_BUILD: build/torch-cuda folders made by scripts/build.py from the two commits.
moe_experts_forward (bf16, random routing) at Qwen3-30B-A3B (16384 and 2048 tokens) and
Qwen3-235B-A22B (8192 tokens) widths: dense with every weight trainable, LoRA r=16 on frozen
experts, and 4-bit frozen experts with LoRA (QLoRA; 30B 16384 only). Median ms of
triton.testing.do_bench, builds alternating round after round (old, new, old, new, ...), each
round's figure printed, the best round in the closing table, with whether the two builds'
outputs and gradients are the same bits.
"""

import argparse
import os
import sys

import torch
import triton

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.join(os.path.dirname(SCRIPTS), "benchmarks")]
from bit_compare import Experts, experts_case, load  # noqa: E402
from block_side_by_side import CASES  # noqa: E402

# The block benchmark's cases timed here, and the modes of each.
MODES = {"30b-t16384": ("full", "lora", "qlora"), "235b-t8192": ("full",), "30b-t2048": ("full", "lora")}


def step_fns(pkg, tensors, ids, grad, mode):
    """(forward, forward+backward, both with their results) closures of one build on one case."""
    x, gate_up, down, weights, *lora = tensors
    if mode == "qlora":
        experts = pkg.quantize_experts_4bit(Experts(gate_up, down), blocksize=64)
        gate_up, down = experts.gate_up_proj, experts.down_proj
    leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
    if mode == "full":
        gate_up, down = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
        leaves += [gate_up, down]
    lora = [t.clone().requires_grad_() for t in lora]
    kwargs = dict(gate_up_lora=tuple(lora[:2]), down_lora=tuple(lora[2:])) if lora else {}

    def forward():
        return pkg.moe_experts_forward(leaves[0], gate_up, down, ids, leaves[1], check_ids=False, **kwargs)

    def backward():
        return torch.autograd.grad(forward(), leaves + lora, grad)

    return forward, backward, lambda: [forward(), *backward()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(MODES), help="cases of MODES to time (default: all)")
    args = parser.parse_args()
    builds = {"old": load(args.old, "qmf_old"), "new": load(args.new, "qmf_new")}
    device = torch.device("cuda")
    rows = []
    for name in args.cases.split(","):
        modes = MODES[name]
        case = CASES[name]
        tokens, hidden = case.tokens, case.hidden
        for mode in modes:
            rank = 16 if mode != "full" else 0
            tensors, ids = experts_case(tokens, hidden, case.inter, case.experts, case.top_k, torch.bfloat16, device, rank)
            grad = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
            fns = {b: step_fns(pkg, tensors, ids, grad, mode) for b, pkg in builds.items()}
            times = {(b, s): [] for b in builds for s in ("fwd", "fwd+bwd")}
            for _ in range(args.rounds):
                for b, (forward, backward, _) in fns.items():
                    times[b, "fwd"].append(triton.testing.do_bench(forward))
                    times[b, "fwd+bwd"].append(triton.testing.do_bench(backward))
            old_out, new_out = fns["old"][2](), fns["new"][2]()
            same = all(torch.equal(a, b) for a, b in zip(old_out, new_out))
            line = f"{name} {mode}: " + " | ".join(
                f"{s} old {' '.join(f'{t:.3f}' for t in times['old', s])} new {' '.join(f'{t:.3f}' for t in times['new', s])}"
                for s in ("fwd", "fwd+bwd")
            )  # fmt: skip
            print(f"{line} | same bits {same}", flush=True)
            rows.append((name, mode, *(min(times[b, s]) for s in ("fwd", "fwd+bwd") for b in builds), same))
            del fns, tensors
            torch.cuda.empty_cache()
    print("\n| case | mode | fwd old | fwd new | fwd+bwd old | fwd+bwd new | same bits |\n|---|---|---|---|---|---|---|")
    for name, mode, fo, fn, bo, bn, same in rows:
        print(f"| {name} | {mode} | {fo:.3f} | {fn:.3f} | {bo:.3f} | {bn:.3f} | {same} |")


if __name__ == "__main__":
    main()
