"""Registers and spills of the router's two kernels (router.py) on sm_90, on a machine without
a GPU: each is compiled (as scripts/ptx_compare.py does) and its PTX assembled by the ptxas of
the installed triton with -v.

    python3 scripts/router_ptxas.py BUILD      BUILD: a build/torch-cuda folder (scripts/build.py)
Put the GPU image's triton first on PYTHONPATH (its wheel unpacked) to check that version; its
ptxas must accept the PTX version that triton writes.
"""

import os
import sys

import torch
import triton
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bit_compare import load  # noqa: E402
from ptx_compare import _Sm90Driver, ptxas_info  # noqa: E402

SHAPES = [(60, 4), (128, 8), (160, 8), (512, 10), (2048, 8), (4096, 8)]  # (E, K)


def main():
    driver.set_active(_Sm90Driver())
    load(sys.argv[1], "qmf_router")
    router = sys.modules["qmf_router.router"]
    compiled = []
    for kernel in (router._router_topk_kernel, router._router_topk_backward_kernel):
        kernel = kernel.fn if type(kernel).__name__ == "Launcher" else kernel  # behind launch.Launcher

        def compile_only(*args, grid, warmup, _run=kernel.run, **kwargs):
            compiled.append(_run(*args, grid=grid, warmup=True, **kwargs))

        kernel.run = compile_only
    print("triton", triton.__version__)
    for num_experts, top_k in SHAPES:
        logits = torch.zeros(100, num_experts, dtype=torch.bfloat16)
        scores, indices = router.router_topk_launch(logits, top_k, True)
        router.router_topk_backward_launch(logits, indices, scores, True)
        for kernel in compiled[-2:]:
            print(f"E {num_experts:5d} K {top_k:3d} {kernel.name:30s} {ptxas_info(kernel)}")

if __name__ == "__main__":
    main()
