"""The whole Qwen3MoeSparseMoeBlock (router included), side by side in ONE process: our layer's
forward vs Transformers' `grouped_mm` and the peers (benchmarks/peers_impls.py: `sonicmoe`,
Transformers' own SonicMoE entry; `scattermoe`, kernels-community scattermoe; `liger`, Liger-Kernel's
fused MoE), on the same module, inputs and weights. Every implementation but ours runs the module's
own forward: its router (block.gate), then its experts switched to that implementation, reading
the experts' own weight Parameters (no copies, no layout conversion in the timed forward:
scattermoe gets transposed views). A peer that cannot load (no anchor site, no CUDA) is named
with its reason and left out.

Full fine-tuning: hidden states and every weight (router, gate_up, down) require grad;
forward+backward = torch.autograd.grad of the output with a random contiguous output
gradient w.r.t. all of them. LoRA cases (`--modes lora`): PEFT `target_parameters` LoRA r=16 on
both expert tensors, base frozen, gradients of the hidden states and the LoRA factors; PEFT
forms W + s*B@A in front of grouped_mm / sonicmoe, our layer reads the adapter itself
(scattermoe and liger are compared in full fine-tuning only). QLoRA (`--modes qlora`): the same
on experts quantized by quantize_experts_4bit (ours only; its reference is then ours, the first
implementation that ran).
Median ms of triton.testing.do_bench after an untimed first call (first_call_s: on the H200
SonicMoE JIT-compiled for 145 s at 30B/16384 tokens, ~25 s at each new token count, 209 s for
235B; Liger autotunes ~240 kernel configs at each new (H, I), ~3.5 minutes, and keeps its choice
for later token counts; scattermoe has one config a kernel and torch.compiles its sort). Each
implementation's output and gradients are compared with grouped_mm's (relative Frobenius error;
in bf16 ties between router probabilities can pick other experts than torch.topk, which shows
there). Our layer runs the router's top-k softmax in its kernel (gate.py); `ours-router` keeps
Transformers' router forward, to time that kernel alone; `ours-jit` launches every kernel through
Triton's JITFunction.run (launch.DIRECT off) (OURS_OPTIONS below).
`--json` is rewritten after every case, so a run cut short keeps the cases it finished.

    python benchmarks/block_side_by_side.py [--cases 30b-t16384,...] [--impls ours,grouped_mm,sonicmoe,scattermoe,liger]
        [--modes full,lora] [--repeats N] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import load_kernel  # noqa: E402
from benchmark_moe import rel_err  # noqa: E402
from lora_side_by_side import peak_mib  # noqa: E402
import peers_impls  # noqa: E402

# Transformers module, configuration class and block class of each family (the block class is
# also the name of our layer).
FAMILIES = {
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock"),
    "qwen3_next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextSparseMoeBlock"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeSparseMoeBlock"),
}


class Case(NamedTuple):
    family: str
    hidden: int  # H
    inter: int  # I, routed experts
    experts: int  # E
    top_k: int  # K
    tokens: int
    shared: int = 0  # shared expert's intermediate size (0: none)


CASES = {  # shapes as benchmarks/benchmark_moe.py's FAMILY_SHAPES
    "30b-t16384": Case("qwen3_moe", 2048, 768, 128, 8, 16384),
    "30b-t2048": Case("qwen3_moe", 2048, 768, 128, 8, 2048),
    "30b-t64": Case("qwen3_moe", 2048, 768, 128, 8, 64),
    "235b-t8192": Case("qwen3_moe", 4096, 1536, 128, 8, 8192),
    "coder480b-t8192": Case("qwen3_moe", 6144, 2560, 160, 8, 8192),
    "coder480b-t2048": Case("qwen3_moe", 6144, 2560, 160, 8, 2048),
    "next80b-t16384": Case("qwen3_next", 2048, 512, 512, 10, 16384, 512),
    "next80b-t2048": Case("qwen3_next", 2048, 512, 512, 10, 2048, 512),
    "qwen3.5-35b-t16384": Case("qwen3_5_moe", 2048, 512, 256, 8, 16384, 512),
    "qwen3.5-35b-t2048": Case("qwen3_5_moe", 2048, 512, 256, 8, 2048, 512),
    "qwen3.5-397b-t8192": Case("qwen3_5_moe", 4096, 1024, 512, 10, 8192, 1024),
    "qwen3.5-397b-t2048": Case("qwen3_5_moe", 4096, 1024, 512, 10, 2048, 1024),
}


def make_block(case: Case, device, dtype):
    import importlib

    module, config_cls, block_cls = FAMILIES[case.family]
    configuration = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    shared = dict(shared_expert_intermediate_size=case.shared) if case.shared else {}
    config = getattr(configuration, config_cls)(hidden_size=case.hidden, moe_intermediate_size=case.inter,
                                                num_experts=case.experts, num_experts_per_tok=case.top_k,
                                                norm_topk_prob=True, **shared)  # fmt: skip
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = getattr(modeling, block_cls)(config).to(device, dtype)
    with torch.no_grad():
        for param in block.parameters():  # the router at 0.02, weights at 1 / sqrt(fan-in)
            param.normal_(0, 0.02 if param is block.gate.weight else param.shape[-1] ** -0.5)
    return block, block_cls


def layer_calls(kernel, case: Case, device, dtype, mode="full"):
    """Our layer on a fresh block of case, trained as in mode (trainable_module): (fwd, step),
    its forward and its forward+backward (gradients of the hidden states and every trainable
    tensor for a random output gradient), the calls the host-time scripts time."""
    block, block_cls = make_block(case, device, dtype)
    module = trainable_module(block, kernel, mode)
    x = torch.randn(1, case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
    layer = getattr(kernel.layers, block_cls).forward
    grad_out = torch.randn_like(x)
    targets = [x, *(p for p in module.parameters() if p.requires_grad)]

    def fwd():
        return layer(module, x)

    def step():
        return torch.autograd.grad(layer(module, x), targets, grad_out)

    return fwd, step


def case_flops(case: Case) -> int:
    """Forward FLOPs of the experts (routed and shared); forward+backward is 3x."""
    return 2 * case.tokens * 3 * case.hidden * (case.top_k * case.inter + case.shared)


class OursOptions(NamedTuple):
    """Our layer with an option forced (None: as shipped)."""

    fuse_dswiglu: bool | None = None  # tuning.FUSE_DSWIGLU: the SwiGLU backward in the down_dx GEMM
    dw_persistent: int = 0  # dW GEMMs on a persistent grid of this many programs per SM
    fused_router: bool = True  # tuning.FUSED_ROUTER: the router's top-k softmax in our kernel
    direct_launch: bool = True  # launch.DIRECT: launches through the compiled kernel's launcher
    sort_rows_per_expert: int | None = None  # tuning.SORT_BEFORE_DW_ROWS_PER_EXPERT


# Our layer as shipped ("ours"), or with an option forced (benchmarks/backward_options.py).
OURS_OPTIONS = {
    "ours": OursOptions(),
    "ours+dswiglu": OursOptions(fuse_dswiglu=True),
    "ours-dswiglu": OursOptions(fuse_dswiglu=False),
    "ours+pdw": OursOptions(dw_persistent=1),
    "ours+dswiglu+pdw": OursOptions(fuse_dswiglu=True, dw_persistent=1),
    "ours-router": OursOptions(fused_router=False),
    "ours-jit": OursOptions(direct_launch=False),
    "ours-gatherdw": OursOptions(sort_rows_per_expert=256),  # dW operands gathered, not copied, at 2048 tokens of 30B
}
_SHIPPED = {}


def _configure(kernel, impl):
    from dataclasses import replace

    options = OURS_OPTIONS.get(impl, OURS_OPTIONS["ours"])
    tuning = kernel.tuning
    shipped_fuse, shipped_dw, shipped_sort_rows = _SHIPPED.setdefault(
        "state", (tuning.FUSE_DSWIGLU, kernel.functional.dw_config, tuning.SORT_BEFORE_DW_ROWS_PER_EXPERT)
    )
    tuning.FUSE_DSWIGLU = shipped_fuse if options.fuse_dswiglu is None else options.fuse_dswiglu
    tuning.FUSED_ROUTER = options.fused_router
    tuning.SORT_BEFORE_DW_ROWS_PER_EXPERT = options.sort_rows_per_expert or shipped_sort_rows
    importlib.import_module(kernel.__name__ + ".launch").DIRECT = options.direct_launch
    persistent = options.dw_persistent
    kernel.functional.dw_config = (
        (lambda *a, **kw: replace(shipped_dw(*a, **kw), persistent=persistent)) if persistent else shipped_dw
    )


def skip_reason(impl, mode):
    """Why `impl` does not run in `mode`, or None."""
    if mode == "qlora" and not impl.startswith("ours"):
        return "4-bit experts: only our layer reads them"
    if mode == "lora" and impl in ("scattermoe", "liger"):
        return "peers are compared in full fine-tuning only"
    return None


def trainable_module(block, kernel, mode):
    """The block as trained in `mode`: itself (full), under PEFT LoRA r=16 on both expert
    tensors with the base frozen (lora), the same on 4-bit experts (qlora; quantized in place)."""
    if mode == "qlora":
        kernel.quantize_experts_4bit(block)
    if mode == "full":
        return block
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Holder(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.mlp = block

    lora_config = LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=16,
                             lora_alpha=32, init_lora_weights=False)  # fmt: skip
    return get_peft_model(Holder(block), lora_config).base_model.model.mlp


def run_case(name, kernel, impls, mode, repeats, device, dtype):
    case = CASES[name]
    hidden, tokens = case.hidden, case.tokens
    block, block_cls = make_block(case, device, dtype)
    lora = mode != "full"
    config = block.experts.config  # read by the experts' forward on every call: switches the implementation
    for impl in impls:
        if skip_reason(impl, mode):
            print(f"{impl} skipped in {mode} mode ({name}): {skip_reason(impl, mode)}", flush=True)
    impls = [i for i in impls if not skip_reason(i, mode)]
    module = trainable_module(block, kernel, mode)
    targets = [p for p in module.parameters() if p.requires_grad]
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    layer_forward = getattr(kernel.layers, block_cls).forward


    def forward_of(impl):
        if impl.startswith("ours"):
            return lambda: layer_forward(module, x)

        def run():
            config._experts_implementation = impl
            return module(x)

        return run

    rows, ref = [], None
    for impl in impls:
        _configure(kernel, impl)
        forward = forward_of(impl)
        grads_of = lambda f=forward: torch.autograd.grad(f(), [x, *targets], grad_out)  # noqa: E731
        try:
            start = time.time()
            out = forward().detach()
            grads = grads_of()
            first_s = time.time() - start
            fwd = [triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median") for _ in range(repeats)]
            both = [triton.testing.do_bench(grads_of, warmup=25, rep=100, return_mode="median") for _ in range(repeats)]
            row = dict(case=name, lora=lora, mode=mode, impl=impl, tokens=tokens, fwd_ms=min(fwd), fwd_bwd_ms=min(both),
                       fwd_ms_all=fwd, fwd_bwd_ms_all=both, peak_mib=peak_mib(grads_of), first_call_s=first_s)  # fmt: skip
            if ref is None:
                ref = (out, grads)
            row["rel_err_out"] = rel_err(out, ref[0])
            row["rel_err_grads"] = max(rel_err(a, b) for a, b in zip(grads, ref[1]))
            flops = case_flops(case)
            row["fwd_tflops"], row["fwd_bwd_tflops"] = flops / row["fwd_ms"] / 1e9, 3 * flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # one implementation failing must not lose the others' numbers
            row = dict(case=name, lora=lora, mode=mode, impl=impl, tokens=tokens, error=f"{type(e).__name__}: {str(e)[:300]}")
        _configure(kernel, "ours")
        rows.append(row)
        print(json.dumps(row), flush=True)
    config._experts_implementation = "grouped_mm"
    del block, module
    torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default="grouped_mm,ours,sonicmoe,scattermoe,liger")
    parser.add_argument("--modes", default="full", help="full (every weight trainable), lora (PEFT LoRA r=16 on "
                        "both expert tensors, base frozen), qlora (the same on 4-bit experts: ours only), "
                        "comma-separated, in one process")  # fmt: skip
    parser.add_argument("--lora-cases", default=None, help="cases of the lora / qlora modes (default: --cases)")
    parser.add_argument("--repeats", type=int, default=1, help="do_bench runs per number (the minimum is kept)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("block_side_by_side.py times CUDA kernels: run it on a GPU (for a CPU check use side_by_side.py --quick)")
    kernel = load_kernel()
    device, dtype = torch.device("cuda"), torch.bfloat16
    impls = peers_impls.load(args.impls.split(","), device)
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    dense_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    import transformers

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, dense_bf16_tflops=2 * 8192**3 / dense_ms / 1e9,
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                peers_unavailable=dict(peers_impls.unavailable))  # fmt: skip
    print(json.dumps(meta), flush=True)
    rows = []
    modes = args.modes.split(",")
    cases = {mode: (args.cases if mode == "full" else args.lora_cases or args.cases).split(",") for mode in modes}
    for mode in modes:
        for name in cases[mode]:
            rows += run_case(name, kernel, impls, mode, args.repeats, device, dtype)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, dense bf16 {meta['dense_bf16_tflops']:.0f} "
          f"TFLOP/s: fwd / fwd+bwd ms (max rel err of the gradients vs {impls[0]})")  # fmt: skip
    print("| case | " + " | ".join(impls) + " |\n|---|" + "---|" * len(impls))
    for mode in modes:
        for name in cases[mode]:
            cells = []
            for impl in impls:
                r = next((r for r in rows if r["case"] == name and r["impl"] == impl and r["mode"] == mode), None)
                cells.append("—" if r is None or "error" in r else f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} ({r['rel_err_grads']:.0e})")
            print(f"| {name} {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
