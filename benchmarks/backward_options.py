"""The backward's options, each alone and together: the experts' forward+backward
(`moe_experts_forward`, every weight trainable, bf16) with
  default     the shipped configs as they are;
  dswiglu     the SwiGLU backward fused into the down_dx GEMM's epilogue (tuning.FUSE_DSWIGLU);
  persistent  the weight-gradient GEMMs on a persistent grid (PERSISTENT forced to --persistent
              on every dW config);
  both        the two together.
Median ms of triton.testing.do_bench, and the largest relative difference of any gradient
(max |a - b| / max |b|) against the default. 30B-A3B at 16384 tokens and 235B-A22B at 8192.

    python benchmarks/backward_options.py [--persistent 1]
`--quick` runs tiny float32 shapes (CPU with TRITON_INTERPRET=1): a smoke test, not figures.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import kernel_source, load_kernel  # noqa: E402

# (name, H, I, E, K, tokens)
CASES = [("30B-A3B", 2048, 768, 128, 8, 16384), ("235B-A22B", 4096, 1536, 128, 8, 8192)]
QUICK_CASES = [("tiny", 64, 40, 8, 2, 37)]
OPTIONS = {"default": (False, False), "dswiglu": (True, False), "persistent": (False, True), "both": (True, True)}


def problem(hidden, inter, num_experts, top_k, num_tokens, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter**-0.5
    logits = torch.randn(num_tokens, num_experts, device=device, generator=g)
    weights, ids = logits.softmax(-1).topk(top_k, -1)
    grad_out = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=g)
    leaves = [t.requires_grad_() for t in (x, gate_up, down, weights.to(dtype))]
    return leaves, ids, grad_out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persistent", type=int, default=1, help="programs per SM of the persistent dW grid")
    parser.add_argument("--quick", action="store_true", help="tiny float32 shapes (CPU smoke test)")
    args = parser.parse_args()
    qmf = load_kernel()
    tuning, functional = qmf.tuning, qmf.functional
    cuda = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"package {kernel_source()}")  # fmt: skip
    dw_lookup = functional.dw_config
    persistent_dw = lambda *a, **kw: replace(dw_lookup(*a, **kw), persistent=args.persistent)  # noqa: E731
    rows = []
    try:
        for name, hidden, inter, num_experts, top_k, num_tokens in QUICK_CASES if not cuda else CASES:
            leaves, ids, grad_out = problem(hidden, inter, num_experts, top_k, num_tokens, device, dtype)

            def step():
                out = qmf.moe_experts_forward(leaves[0], leaves[1], leaves[2], ids, leaves[3], check_ids=False)
                return torch.autograd.grad(out, leaves, grad_out)

            block_m = tuning.block_m_for(ids.numel(), num_experts)
            for kind, m, n in (("down_dw", hidden, inter), ("gate_up_dw", 2 * inter, hidden)):
                print(f"{name} {kind}: {dw_lookup(kind, m, n, block_m, torch.device(device))}")
            fused_cfg = functional.gemm_config("down_dx_swiglu", inter, hidden, block_m, torch.device(device))
            print(f"{name} down_dx_swiglu: {fused_cfg}")
            reference = None
            for option, (fuse, persistent) in OPTIONS.items():
                tuning.FUSE_DSWIGLU = fuse
                functional.dw_config = persistent_dw if persistent else dw_lookup
                grads = step()  # compiles the kernels of this option
                if reference is None:
                    reference = grads
                diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, reference))
                del grads
                if cuda:
                    ms = triton.testing.do_bench(step, warmup=25, rep=500, return_mode="median")
                else:
                    ms = float("nan")
                rows.append((name, num_tokens, option, ms, diff))
                print(f"{name} T={num_tokens} {option:10s} {ms:8.3f} ms  max rel grad diff vs default {diff:.2e}",
                      flush=True)  # fmt: skip
            del leaves, reference
            if cuda:
                torch.cuda.empty_cache()
    finally:
        tuning.FUSE_DSWIGLU, functional.dw_config = False, dw_lookup
    print("\n| case | tokens | " + " | ".join(OPTIONS) + " |\n|---|---|" + "---|" * len(OPTIONS))
    for name in dict.fromkeys(r[0] for r in rows):
        cells = [r for r in rows if r[0] == name]
        print(f"| {name} | {cells[0][1]} | " + " | ".join(f"{r[3]:.3f} ({r[4]:.0e})" for r in cells) + " |")
    print("ms fwd+bwd (max relative gradient difference vs default)")


if __name__ == "__main__":
    main()
