"""Time the experts' forward and forward+backward (`moe_experts_forward`, bf16, CUDA) with the
shipped configs and with each config file given, at the Qwen3-30B-A3B and 235B-A22B shapes.

    python3 scripts/compare_configs.py old.json [other.json ...] [--tokens 2048 16384]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402

SHAPES = {"30b": (2048, 768), "235b": (4096, 1536)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--shapes", nargs="+", default=["30b"])
    args = parser.parse_args()
    kernel = load_kernel()
    tuning = kernel.tuning
    sources = {"shipped": None, **{Path(p).name: p for p in args.configs}}
    for shape in args.shapes:
        hidden, inter = SHAPES[shape]
        for tokens in args.tokens:
            torch.manual_seed(0)
            dev, dt = "cuda", torch.bfloat16
            x = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
            gate_up = (torch.randn(128, 2 * inter, hidden, device=dev, dtype=dt) * hidden**-0.5).requires_grad_()
            down = (torch.randn(128, hidden, inter, device=dev, dtype=dt) * inter**-0.5).requires_grad_()
            w, ids = torch.randn(tokens, 128, device=dev).softmax(-1).topk(8, -1)
            w = (w / w.sum(-1, keepdim=True)).to(dt).requires_grad_()
            grad = torch.randn_like(x)

            def fwd():
                return kernel.moe_experts_forward(x, gate_up, down, ids, w, check_ids=False)

            def both():
                return torch.autograd.grad(fwd(), [x, gate_up, down, w], grad)

            for name, path in sources.items():
                shipped = tuning._shipped_configs
                if path is not None:
                    table = tuning.parse_configs(json.load(open(path)))
                    tuning._shipped_configs = lambda index, table=table: table
                try:
                    both()
                    f = triton.testing.do_bench(fwd, return_mode="median")
                    b = triton.testing.do_bench(both, return_mode="median")
                finally:
                    tuning._shipped_configs = shipped
                print(f"{shape} T={tokens:6d} {name:28s} fwd {f:7.3f} ms  fwd+bwd {b:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
