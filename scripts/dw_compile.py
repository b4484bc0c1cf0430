"""The weight-gradient GEMM kernels of a build compiled for sm_90a on a machine without a GPU: what
the compiler made of each DwConfig, for a kernel change that cannot be timed here.

    python3 scripts/dw_compile.py BUILD [BUILD ...]
BUILD: a build/torch-cuda folder made by scripts/build.py (e.g. main's, in a git worktree, and a
branch's). The installed triton compiles; put the GPU image's triton first on PYTHONPATH (its wheel
unpacked) to check that version, whose ptxas then reports registers and spills. The stand-in driver
of scripts/ptx_compare.py reports an sm_90 target and its Build makes every launch a compile, with
each build's descriptors made as on CUDA (ragged ones where its backward_dw.py uses them). For each tile and
option (TMA on both operands, one operand gathered, persistent, and the build's flat / warp-specialized
options where it has them) it prints: wgmma instructions in the PTX, TMA copies, async copies,
local_loads, dots and loops in the TTGIR, a warp_specialize op, shared memory, ptxas' registers and
spills.
"""

import dataclasses
import os
import sys

import torch
import triton
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_compare import Build, _Sm90Driver, histogram, ptxas_info  # noqa: E402

TILES = [(128, 128, 32, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]


def compile_build(path: str, name: str) -> None:
    build = Build(path, name)  # launches become compiles, descriptors made as on CUDA
    pkg, dw, compiled = build.pkg, build.dw_module, build.compiled
    dt, (rows, experts, m, n) = torch.bfloat16, (4096, 8, 1536, 2048)
    index = torch.zeros(rows, dtype=torch.int32)
    r = pkg.Routing(index, index, torch.zeros(experts + 1, dtype=torch.int32), torch.zeros(16, dtype=torch.int32),
                    torch.zeros(16, dtype=torch.int32), 128)  # fmt: skip
    a, b, out = torch.empty(rows, m, dtype=dt), torch.empty(rows, n, dtype=dt), torch.empty(experts, m, n, dtype=dt)
    fields = {f.name for f in dataclasses.fields(pkg.tuning.DwConfig)}
    print(f"{path}: triton {triton.__version__}")
    for bm, bn, bk, warps, stages in TILES:
        base = pkg.tuning.DwConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, tma=True)
        variants = [("tma", base, {}), ("tma, a gathered", base, dict(a_gather=index)),
                    ("tma persistent", dataclasses.replace(base, persistent=1), {})]  # fmt: skip
        if "flat" in fields:
            variants.append(("flat", dataclasses.replace(base, persistent=1, flat=True), {}))
        if "warp_specialize" in fields:
            variants.append(("tma ws", dataclasses.replace(base, warp_specialize=True), {}))
        for label, cfg, gathers in variants:
            dw.grouped_dw_launch(a, b, out, r, cfg, **gathers)
            c = compiled[-1]
            ttgir, ops = c.asm["ttgir"], histogram(c.asm["ptx"])
            wgmma = sum(v for k, v in ops.items() if k.startswith("wgmma.mma_async"))
            print(f"  {bm}x{bn}x{bk} w{warps} s{stages} {label}: wgmma {wgmma}, TMA copies "
                  f"{ttgir.count('async_tma_copy_global_to_local')}, async copies "
                  f"{ttgir.count('async_copy_global_to_local')}, "
                  f"local_load {ttgir.count('local_load')}, dots {ttgir.count('warp_group_dot ')}, "
                  f"loops {ttgir.count('scf.for')}, warp_specialize {ttgir.count('ttg.warp_specialize')}, "
                  f"shared {c.metadata.shared} | {ptxas_info(c)}", flush=True)  # fmt: skip


def main():
    driver.set_active(_Sm90Driver())
    for i, path in enumerate(sys.argv[1:]):
        compile_build(path, f"qmf_dw_compile_{i}")


if __name__ == "__main__":
    main()
