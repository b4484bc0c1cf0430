"""Shared expert fused into the routed GEMMs (join_shared_expert) against computed apart.

    python3 benchmarks/shared_expert.py [--tokens 2048 16384] [--shapes NAME ...] [--json PATH]

For each shape with a shared expert (Qwen3-Next-80B-A3B, Qwen3.5-35B-A3B; --shapes adds
Qwen3.5-397B-A17B) and token count, one Transformers block (Qwen3NextSparseMoeBlock /
Qwen3_5MoeSparseMoeBlock, bf16, random weights, router included) runs our layer's forward
in two ways: "separate" (the shared expert's three nn.Linear GEMMs beside the routed
grouped GEMMs, the default) and "fused" (the same block after join_shared_expert: the
shared expert is expert E of the routed stack). Timed with triton.testing.do_bench
(median ms): the forward without grad, the forward + backward with every weight trainable
(full fine-tuning), and with the weights frozen and LoRA r=16 on the routed experts
(fwd+bwd). Each line also gives the relative error of the fused output and gradients
against the separate ones (should be ~1e-3 in bf16: different rounding order only).
Keep the faster one: if "fused" wins in the cases that matter, make it the default.
"""

import argparse
import copy
import json
import sys
import types
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import kernel_source, load_kernel  # noqa: E402
from benchmark_moe import QWEN3_5_35B_A3B, QWEN3_5_397B_A17B, QWEN3_NEXT_80B_A3B, MoEShape, rel_err  # noqa: E402

SHAPES = {s.name: s for s in (QWEN3_NEXT_80B_A3B, QWEN3_5_35B_A3B, QWEN3_5_397B_A17B)}
DEFAULT_SHAPES = [QWEN3_NEXT_80B_A3B.name, QWEN3_5_35B_A3B.name]
LORA_RANK = 16


def make_block(shape: MoEShape, kernel, device):
    """The Transformers block of the shape's model class, our layer's forward bound to it."""
    if shape.name.startswith("Qwen3-Next"):
        from transformers import Qwen3NextConfig as Config
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock as Block
    else:
        from transformers import Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock as Block
    config = Config(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
                    num_experts_per_tok=shape.top_k, shared_expert_intermediate_size=shape.shared)  # fmt: skip
    with torch.device(device):
        block = Block(config).to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, param.shape[-1] ** -0.5)
    layer = getattr(kernel.layers, type(block).__name__)
    block.forward = types.MethodType(layer.forward, block)
    return block


def add_lora(block, rank):
    """LoRA on the routed experts as PEFT lays it out, without PEFT: the layer reads these
    attributes (wrappers.py). Built with PEFT itself so the layout is PEFT's."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    config = LoraConfig(r=rank, lora_alpha=rank, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(Holder(block), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    return model


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(shape: MoEShape, tokens: int, kernel, device) -> dict:
    separate = make_block(shape, kernel, device)
    fused = kernel.join_shared_expert(copy.deepcopy(separate))
    fused.forward = types.MethodType(getattr(kernel.layers, type(fused).__name__).forward, fused)
    x = torch.randn(1, tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    result = dict(shape=shape.name, tokens=tokens)
    outputs = {}
    for name, block in (("separate", separate), ("fused", fused)):
        with torch.no_grad():
            result[f"{name}_fwd_ms"] = bench(lambda block=block: block(x))
        xg = x.clone().requires_grad_()

        def step(block=block, xg=xg):
            block.zero_grad(set_to_none=True)
            xg.grad = None
            block(xg).backward(grad)

        result[f"{name}_fwdbwd_ms"] = bench(step)
        step()
        outputs[name] = [block(x).detach(), xg.grad, *(p.grad for p in block.parameters())]
    result["max_rel_err"] = max(rel_err(a, b) for a, b in zip(outputs["fused"], outputs["separate"]))

    for name, block in (("separate", separate), ("fused", fused)):
        for p in block.parameters():
            p.requires_grad_(False)
        model = add_lora(block, LORA_RANK)
        xg = x.clone().requires_grad_()

        def lora_step(model=model, xg=xg):
            model.zero_grad(set_to_none=True)
            model(xg).backward(grad)

        result[f"{name}_lora_fwdbwd_ms"] = bench(lora_step)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the CPU tests check fused against separate: tests/test_family.py)")
    kernel = load_kernel()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, kernel {kernel_source()}")
    print(f"{'shape':20s} {'tokens':>6s} | {'fwd sep':>8s} {'fused':>8s} | {'fwd+bwd sep':>11s} {'fused':>8s} | "
          f"{'LoRA sep':>8s} {'fused':>8s} | max rel err")  # fmt: skip
    results = []
    for name in args.shapes:
        for tokens in args.tokens:
            r = run(SHAPES[name], tokens, kernel, device)
            results.append(r)
            print(f"{r['shape']:20s} {tokens:6d} | {r['separate_fwd_ms']:8.3f} {r['fused_fwd_ms']:8.3f} | "
                  f"{r['separate_fwdbwd_ms']:11.3f} {r['fused_fwdbwd_ms']:8.3f} | "
                  f"{r['separate_lora_fwdbwd_ms']:8.3f} {r['fused_lora_fwdbwd_ms']:8.3f} | {r['max_rel_err']:.1e}",
                  flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
