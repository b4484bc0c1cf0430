"""LoRA on the Qwen3 MoE experts: qwen3-moe-fused vs PEFT + Transformers grouped_mm / sonicmoe.

PEFT `target_parameters` LoRA (r on gate_up_proj and down_proj, base frozen) around a
Transformers `Qwen3MoeExperts` (grouped_mm, and sonicmoe where benchmarks/peers_impls.py loads
it: PEFT forms W + s*B@A in front of either); ours reads the same adapter and runs it inside
its grouped GEMMs. Forward and forward+backward (gradients of the hidden states and the
LoRA factors), median ms of triton.testing.do_bench after an untimed first call (first_call_s;
SonicMoE JIT-compiles there, minutes at the first shape), peak memory of forward+backward, and
the relative error against PEFT + grouped_mm. Also our block without LoRA (LoRA's cost).

    python benchmarks/lora_side_by_side.py [--tokens 2048,16384] [--rank 16] [--json out.json]
"""

import argparse
import json
import sys
import time
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
import peers_impls  # noqa: E402


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = Qwen3MoeExperts(config)


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2048,16384")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    kernel = load_kernel()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    hidden, inter, num_experts, top_k = 2048, 768, 128, 8
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = Block(config).to(dev, dtype)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    lora_config = LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=args.rank,
                             lora_alpha=2 * args.rank, init_lora_weights=False)  # fmt: skip
    model = get_peft_model(block, lora_config)
    peft_experts = model.base_model.model.experts
    lora_params = [q for q in model.parameters() if q.requires_grad]
    base, wrappers = kernel.wrappers.unwrap_experts(peft_experts)

    def ours(x, ids, w):
        lora = {n: kernel.wrappers.lora_factors(wrappers[n], getattr(base, n)) for n in ("gate_up_proj", "down_proj")}
        return kernel.experts_forward(base, x, ids, w, gate_up_lora=lora["gate_up_proj"], down_lora=lora["down_proj"])

    def peft_with(implementation):
        def run(x, ids, w):
            base.config._experts_implementation = implementation  # read by the experts' forward on every call
            return peft_experts(x, ids, w)

        return run

    impls = {"ours": ours, "peft+grouped_mm": peft_with("grouped_mm")}
    if peers_impls.load(["sonicmoe"], dev):
        impls["peft+sonicmoe"] = peft_with("sonicmoe")
    impls["ours, no LoRA"] = lambda x, ids, w: kernel.experts_forward(base, x, ids, w)
    rows = []
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | rank {args.rank}")
    for tokens in map(int, args.tokens.split(",")):
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
        w, ids = torch.randn(tokens, num_experts, device=dev).softmax(-1).topk(top_k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(dtype)
        grad_out = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        results = {}
        for name, fn in impls.items():
            targets = [x] + (lora_params if "no LoRA" not in name else [])

            def fwd_bwd():
                return torch.autograd.grad(fn(x, ids, w), targets, grad_out)

            try:
                start = time.time()
                out = fn(x, ids, w).detach()
                grads = fwd_bwd()
                first_s = time.time() - start
                fwd = triton.testing.do_bench(lambda: fn(x, ids, w), warmup=25, rep=100, return_mode="median")
                both = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
                results[name] = dict(out=out, grads=grads, fwd_ms=fwd, fwd_bwd_ms=both, peak_mib=peak_mib(fwd_bwd),
                                     first_call_s=first_s)  # fmt: skip
            except Exception as e:  # one implementation failing must not lose the others' numbers
                results[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        ref = results["peft+grouped_mm"]
        for name, r in results.items():
            if "error" in r:
                rows.append(dict(tokens=tokens, impl=name, error=r["error"]))
                print(f"T={tokens:6d} {name:16s} ERROR {r['error']}")
                continue
            err = rel_err(r["out"], ref["out"])
            gerr = max(rel_err(a, b) for a, b in zip(r["grads"], ref["grads"])) if "no LoRA" not in name else None
            row = dict(tokens=tokens, impl=name, fwd_ms=r["fwd_ms"], fwd_bwd_ms=r["fwd_bwd_ms"], peak_mib=r["peak_mib"],
                       rel_err_out=err, rel_err_grads=gerr, first_call_s=r["first_call_s"])  # fmt: skip
            rows.append(row)
            print(f"T={tokens:6d} {name:16s} fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwd_bwd_ms']:7.3f} ms  peak {r['peak_mib']:7.0f} MiB"
                  f"  rel err vs PEFT: out {err:.1e}" + (f", grads {gerr:.1e}" if gerr is not None else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rank=args.rank, rows=rows), indent=1))


if __name__ == "__main__":
    main()
