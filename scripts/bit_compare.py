"""Do two builds of the package give the same bits? For a change that only restructures code.

    python3 scripts/bit_compare.py OLD_BUILD NEW_BUILD
OLD_BUILD / NEW_BUILD: build/torch-cuda (or build/torch-cpu) folders made by scripts/build.py
from the two commits (e.g. `git worktree add /tmp/old <commit>` and build there). Runs the
experts' forward and backward (dense, LoRA, 4-bit both paths) and grouped_gemm through each
build's public functions with the shipped configs and with forced config options, and
compares every output and gradient with torch.equal. On CUDA in bf16 at the Qwen3-30B-A3B
width; on CPU (TRITON_INTERPRET=1) in float32 and float16 at small shapes. Exit code 1 on
any difference. Both builds' configs may be dicts (before the GemmConfig type) or GemmConfigs.
"""

import dataclasses
import importlib.util
import os
import sys

import torch
from torch import nn

OLD_KEYS = dict(block_n="BLOCK_N", block_k="BLOCK_K", persistent="PERSISTENT", tma_b="TMA_B", block_m="BLOCK_M")


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _with(cfg, options):
    if isinstance(cfg, dict):
        return dict(cfg, **{OLD_KEYS[k]: v for k, v in options.items()})
    return dataclasses.replace(cfg, **options)


def forced(pkg, gemm: dict, dw: dict):
    """Make pkg's functional use its looked-up configs with these options set; returns an undo."""
    functional = pkg.functional
    gemm_config, dw_config = functional.gemm_config, functional.dw_config
    functional.gemm_config = lambda *a, **kw: _with(gemm_config(*a, **kw), gemm)
    functional.dw_config = lambda *a, **kw: _with(dw_config(*a, **kw), dw)

    def undo():
        functional.gemm_config, functional.dw_config = gemm_config, dw_config

    return undo


class Experts(nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up.clone(), requires_grad=False)
        self.down_proj = nn.Parameter(down.clone(), requires_grad=False)


def experts_case(num_tokens, hidden, inter, num_experts, top_k, dtype, device, rank=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = logits.softmax(-1).topk(top_k, -1)
    tensors = [x, gate_up, down, weights]
    if rank:
        tensors += [torch.randn(num_experts, rank, hidden, generator=g) * hidden**-0.5,
                    torch.randn(num_experts, 2 * inter, rank, generator=g) * 0.1,
                    torch.randn(num_experts, rank, inter, generator=g) * inter**-0.5,
                    torch.randn(num_experts, hidden, rank, generator=g) * 0.1]  # fmt: skip
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    return tensors, ids.to(device)


def run_experts(pkg, tensors, ids, nf4: bool):
    x, gate_up, down, weights, *lora = tensors
    if nf4:
        experts = pkg.quantize_experts_4bit(Experts(gate_up, down), blocksize=64)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        lora = [t.clone().requires_grad_() for t in lora]
        args = (leaves[0], gate_up, down, ids, leaves[1])
    else:
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
        lora = [t.clone().requires_grad_() for t in lora]
        args = (*leaves[:3], ids, leaves[3])
    kwargs = dict(gate_up_lora=tuple(lora[:2]), down_lora=tuple(lora[2:])) if lora else {}
    out = pkg.moe_experts_forward(*args, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return [out, *torch.autograd.grad(out, leaves + lora, grad)]


def run_grouped_gemm(pkg, m_sizes, k_in, n_out, dtype, device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(int(sum(m_sizes)), k_in, generator=g).to(device, dtype).requires_grad_()
    weight = torch.randn(len(m_sizes), n_out, k_in, generator=g).to(device, dtype).requires_grad_()
    out = pkg.grouped_gemm(x, weight, torch.tensor(m_sizes, device=device))
    return [out, *torch.autograd.grad(out, [x, weight], torch.ones_like(out))]


def main():
    old, new = load(sys.argv[1], "qmf_old"), load(sys.argv[2], "qmf_new")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        # the second shape: odd rows per expert, other tiles (few experts: many rows each)
        dtypes, shapes = [torch.bfloat16], [(512, 2048, 768, 128, 8), (300, 1024, 384, 16, 4)]
        options = [({}, {}), (dict(tma_b=True), {}), (dict(tma_b=True, persistent=2), {})]
    else:
        # the second shape: odd H and I (4-bit B read one value at a time)
        dtypes, shapes = [torch.float32, torch.float16], [(37, 48, 40, 8, 3), (20, 33, 21, 4, 2)]
        options = [({}, {}), (dict(persistent=1), {}), (dict(block_n=16, block_k=16), dict(block_m=16, block_n=16)),
                   (dict(block_n=64, block_k=64, persistent=2), dict(block_k=32))]  # fmt: skip
    cases = []

    def add(dtype, shape, gemm_opts, dw_opts, rank, nf4):
        name = f"experts {str(dtype)[6:]} {shape} rank={rank} nf4={nf4} {gemm_opts} {dw_opts}"
        tensors, ids = experts_case(*shape, dtype, device, rank)
        cases.append((name, gemm_opts, dw_opts, lambda p: run_experts(p, tensors, ids, nf4)))

    for dtype in dtypes:
        for i, shape in enumerate(shapes):
            for gemm_opts, dw_opts in options if i == 0 else options[:1]:
                for rank, nf4 in ((0, False), (4, False), (4, True)):
                    if not (nf4 and dtype == torch.float16):
                        add(dtype, shape, gemm_opts, dw_opts, rank, nf4)
        name = f"grouped_gemm {dtype}"
        cases.append((name, {}, {}, lambda p, d=dtype: run_grouped_gemm(p, [5, 0, 17, 3], 40, 24, d, device)))
    failures = 0
    for name, gemm_opts, dw_opts, fn in cases:
        for dequantize_first in ((False, True) if "nf4=True" in name else (False,)):
            results = []
            for pkg in (old, new):
                undo = forced(pkg, gemm_opts, dw_opts)
                threshold = pkg.tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT
                if dequantize_first:
                    pkg.tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT = 0
                try:
                    results.append(fn(pkg))
                finally:
                    undo()
                    pkg.tuning.DEQUANTIZE_FIRST_ROWS_PER_EXPERT = threshold
            same = all(torch.equal(a, b) for a, b in zip(*results)) and len(results[0]) == len(results[1])
            failures += not same
            print(f"{'same' if same else 'DIFFERENT'}: {name}{' dequantize-first' if dequantize_first else ''}",
                  flush=True)  # fmt: skip
    print(f"{len(cases)} cases, {failures} different")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
