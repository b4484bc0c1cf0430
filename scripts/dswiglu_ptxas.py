"""Registers and spills of the down_dx GEMM with the SwiGLU backward in its epilogue
(_dswiglu_gemm_kernel) and of the plain down_dx GEMM, on sm_90, on a machine without a GPU:
compiled as scripts/ptx_compare.py does, the PTX assembled by the installed triton's ptxas -v.

    python3 scripts/dswiglu_ptxas.py BUILD      BUILD: a build/torch-cuda folder (scripts/build.py)
Put the GPU image's triton first on PYTHONPATH (its wheel unpacked) to check that version.
"""

import os
import sys

import torch
import triton
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_compare import Build, _Sm90Driver, ptxas_info  # noqa: E402

TILES = [(128, 64, 8, 4), (128, 64, 8, 3), (128, 32, 8, 4), (256, 64, 8, 3), (64, 64, 4, 4)]  # BLOCK_N, K, warps, stages


def main():
    driver.set_active(_Sm90Driver())
    build = Build(sys.argv[1], "qmf_ptxas")
    dt, (tokens, hidden, inter, experts, top_k) = torch.bfloat16, (256, 2048, 768, 8, 2)
    rows = tokens * top_k
    index = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    r = build.pkg.Routing(index(rows), index(rows), index(experts + 1), index(16), index(16), 128)
    rand = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    x, act, h, dh, down, w = rand(tokens, hidden), rand(rows, inter), rand(rows, 2 * inter), rand(rows, 2 * inter), \
        rand(experts, hidden, inter), rand(rows)  # fmt: skip
    dweights = torch.empty(rows, dtype=dt)
    print("triton", triton.__version__)
    for block_n, block_k, warps, stages in TILES:
        cfg = build.config(block_n=block_n, block_k=block_k, group_m=8, num_warps=warps, num_stages=stages)
        fused = build.dswiglu(x, down, h, w, r, cfg, dh=dh, w_act=act, dweights=dweights, gather=r.sort_idx)
        plain = build.gemm(x, down, act, r, cfg, b_is_kn=True, gather=r.sort_idx)
        for name, kernel in (("down_dx_swiglu", fused), ("down_dx", plain)):
            print(f"{name:15s} 128x{block_n}x{block_k} {warps} warps {stages} stages, shared memory "
                  f"{kernel.metadata.shared}: {ptxas_info(kernel)}")  # fmt: skip


if __name__ == "__main__":
    main()
