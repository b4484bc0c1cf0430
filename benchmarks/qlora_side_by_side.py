"""4-bit (NF4) experts: our block on 4-bit experts vs our bf16 block, and QLoRA vs PEFT.

30B-A3B block shape, bf16 compute. For each token count: forward of our bf16 block, of our
4-bit block (the shipped rule), and of each 4-bit path forced (dequant in the GEMM loads;
dequantize all experts first), which is what sets tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT.
Then QLoRA (r on both expert tensors, 4-bit base) forward + backward against PEFT + Transformers
grouped_mm on bf16 experts. Median ms of triton.testing.do_bench.

    python benchmarks/qlora_side_by_side.py [--tokens 1,16,...] [--lora-tokens 2048,16384] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import load_kernel  # noqa: E402
from benchmark_moe import rel_err  # noqa: E402

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 2048, 768, 128, 8


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = Qwen3MoeExperts(config)


def routing(tokens, device):
    w, ids = torch.randn(tokens, NUM_EXPERTS, device=device).softmax(-1).topk(TOP_K, -1)
    return ids, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,64,256,512,1024,2048,4096,8192,16384")
    p.add_argument("--lora-tokens", default="2048,16384")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    kernel = load_kernel()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=NUM_EXPERTS)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    dense = Block(config).to(dev, dtype)
    with torch.no_grad():
        dense.experts.gate_up_proj.normal_(0, 0.02)
        dense.experts.down_proj.normal_(0, 0.02)
    quantized = Block(config).to(dev, dtype)
    quantized.load_state_dict(dense.state_dict())
    kernel.quantize_experts_4bit(quantized)
    tuning = kernel.tuning
    shipped = tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT

    def forced(threshold, fn):
        def run():
            tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT = threshold
            try:
                return fn()
            finally:
                tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT = shipped

        return run

    rows = []
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"forward ms (rule: dequantize first from {shipped} rows per expert)")
    print(f"{'tokens':>7} {'bf16':>8} {'4-bit':>8} {'fused':>8} {'deq-first':>9} {'4-bit/bf16':>10}")
    for tokens in map(int, args.tokens.split(",")):
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=dtype)
        ids, w = routing(tokens, dev)
        with torch.no_grad():
            fns = {
                "bf16": lambda: kernel.experts_forward(dense.experts, x, ids, w),
                "4bit": lambda: kernel.experts_forward(quantized.experts, x, ids, w),
            }
            fns["fused"] = forced(10**9, fns["4bit"])
            fns["dequantize_first"] = forced(0, fns["4bit"])
            t = {name: bench(fn) for name, fn in fns.items()}
            err = rel_err(fns["fused"](), fns["dequantize_first"]())
        rows.append(dict(kind="forward", tokens=tokens, **{f"{k}_ms": v for k, v in t.items()}, fused_vs_dequant_err=err))
        print(f"{tokens:>7} {t['bf16']:>8.3f} {t['4bit']:>8.3f} {t['fused']:>8.3f} {t['dequantize_first']:>9.3f} "
              f"{t['4bit'] / t['bf16']:>10.2f}x")  # fmt: skip

    lora_config = LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=args.rank,
                             lora_alpha=2 * args.rank, init_lora_weights=False)  # fmt: skip
    peft_dense = get_peft_model(dense, lora_config)
    peft_quantized = get_peft_model(quantized, lora_config)
    lora_weights = {k: v for k, v in peft_dense.state_dict().items() if "lora_" in k}
    assert not peft_quantized.load_state_dict(lora_weights, strict=False).unexpected_keys  # the same LoRA weights
    print(f"QLoRA r={args.rank}, forward + backward ms (input and LoRA gradients)")
    for tokens in map(int, args.lora_tokens.split(",")):
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=dtype, requires_grad=True)
        ids, w = routing(tokens, dev)
        grad_out = torch.randn(tokens, HIDDEN, device=dev, dtype=dtype)
        result = {}
        for name, model, fn in (
            ("ours 4-bit", peft_quantized, lambda m: kernel.layers._fused_experts(m.base_model.model.experts, x, ids, w)),
            ("peft+grouped_mm bf16", peft_dense, lambda m: m.base_model.model.experts(x, ids, w)),
        ):
            params = [x] + [q for q in model.parameters() if q.requires_grad]
            step = lambda: torch.autograd.grad(fn(model), params, grad_out)  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            result[name] = dict(fwd_ms=bench(lambda: fn(model)), fwd_bwd_ms=bench(step), peak_mib=peak)
            with torch.no_grad():
                result[name]["out"] = fn(model)
        err = rel_err(result["ours 4-bit"].pop("out"), result["peft+grouped_mm bf16"].pop("out"))
        for name, r in result.items():
            rows.append(dict(kind="qlora", tokens=tokens, impl=name, **r))
            print(f"T={tokens:6d} {name:22s} fwd {r['fwd_ms']:7.3f}  fwd+bwd {r['fwd_bwd_ms']:7.3f}  "
                  f"peak {r['peak_mib']:6.0f} MiB")  # fmt: skip
        print(f"         (4-bit vs bf16 output rel err {err:.1e}: the quantization error)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
