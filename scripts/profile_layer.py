"""Where the host time of our layer goes at small token counts (Qwen3-30B-A3B block, bf16, CUDA).

Times, per call, the router alone (Transformers' forward and ours), the router + experts through our layer, and the functional
`moe_experts_forward` on the router's output (GPU not awaited: host time), then a cProfile of
the layer's forward (with --backward: forward+backward) sorted by own time. First, one
forward+backward of the layer runs under torch.cuda.set_sync_debug_mode("error"): a host
synchronization anywhere in it is reported with its stack.

    python3 scripts/profile_layer.py [--tokens 64] [--calls 300] [--backward]
"""

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _load import load_kernel  # noqa: E402
from block_side_by_side import Case, make_block  # noqa: E402
from host_overhead import host_us  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--backward", action="store_true", help="profile forward+backward")
    args = parser.parse_args()
    kernel = load_kernel()
    block, _ = make_block(Case("qwen3_moe", 2048, 768, 128, 8, args.tokens), torch.device("cuda"), torch.bfloat16)
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flat = x.view(-1, 2048)
    layer = kernel.layers.Qwen3MoeSparseMoeBlock.forward
    _, weights, ids = block.gate(flat)
    experts = block.experts
    calls = {
        "router": lambda: block.gate(flat),
        "router (ours, call_gate)": lambda: kernel.gate.call_gate(block.gate, flat),
        "layer (router + experts)": lambda: layer(block, x),
        "experts_forward": lambda: kernel.experts_forward(experts, flat, ids, weights),
        "moe_experts_forward": lambda: kernel.moe_experts_forward(
            flat, experts.gate_up_proj, experts.down_proj, ids, weights, check_ids=False),
        "grouped_mm block": lambda: block(x),
    }  # fmt: skip
    block.experts.config._experts_implementation = "grouped_mm"
    grad_out = torch.randn_like(x)
    targets = [x, *block.parameters()]

    def layer_step():
        torch.autograd.grad(layer(block, x), targets, grad_out)

    calls["layer fwd+bwd"] = layer_step
    calls["grouped_mm block fwd+bwd"] = lambda: torch.autograd.grad(block(x), targets, grad_out)
    layer_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer_step()
        print("no host synchronization in the layer's forward+backward")
    except RuntimeError:
        import traceback

        print("host synchronization in the layer's forward+backward:\n" + traceback.format_exc()[-3000:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, fn in calls.items():
        print(f"{name:28s} host {host_us(fn, args.calls):8.1f} us/call", flush=True)
    step = layer_step if args.backward else (lambda: layer(block, x))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        step()
    profile.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(40)
    print(stream.getvalue())
    # cProfile sees only this thread; the backward runs on autograd's device thread. torch.profiler
    # records the host time of every op and autograd node on both.
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
