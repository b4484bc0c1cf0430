"""Compile the grouped GEMM kernels (routed and weight-gradient) of two builds for sm_90 on a
machine without a GPU, and compare their PTX: for a change that only restructures the kernels.

    python3 scripts/ptx_compare.py OLD_BUILD NEW_BUILD
OLD_BUILD / NEW_BUILD: build/torch-cuda folders made by scripts/build.py from the two commits.
The installed triton compiles (put the GPU image's triton first on PYTHONPATH to check that
version: its wheel unpacked, with the executable bits of triton/backends/nvidia/bin/* set).
A stand-in driver reports an sm_90 target and every launch becomes a warmup (compile only),
so the launchers run as they would on the GPU, TMA descriptors included. For each routed
GEMM of the MoE block and option set it prints both builds' PTX instruction counts and the
instructions whose counts differ; "same" when none do, with the same shared memory.
"""

import collections
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bit_compare import load  # noqa: E402  (a build folder imported as a package)


class _Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Build:
    """One build's launchers, with kernel launches turned into compiles that are recorded."""

    def __init__(self, path, name):
        self.pkg = load(path, name)
        self.forward = sys.modules[f"{name}.grouped_gemm.forward"]
        self.dw_module = sys.modules[f"{name}.grouped_gemm.backward_dw"]
        self.compiled = []
        for module in (self.forward, self.dw_module):
            for attr in dir(module):
                kernel = getattr(module, attr)
                kernel = kernel.fn if type(kernel).__name__ == "Launcher" else kernel  # behind launch.Launcher
                if isinstance(kernel, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                    self._record(kernel)
        self.forward._num_sms = lambda device: 132
        self.forward.nf4_code_table = lambda device: torch.zeros(16)
        self.forward._b_descriptor = self._b_descriptor
        if hasattr(self.dw_module, "create_ragged_descriptor"):  # as on CUDA, for CPU tensors
            self.dw_module._rows_descriptor = lambda t, block: self.dw_module.create_ragged_descriptor(t, block)
        elif hasattr(self.dw_module, "_rows_descriptor"):
            self.dw_module._rows_descriptor = lambda t, block: TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)

    def _record(self, kernel):
        run = kernel.run

        def compile_only(*args, grid, warmup, **kwargs):
            self.compiled.append(run(*args, grid=grid, warmup=True, **kwargs))

        kernel.run = compile_only

    def config(self, **fields):
        """A routed GEMM config of this build: a GemmConfig, or a dict before that type."""
        if hasattr(self.pkg.tuning, "GemmConfig"):
            return self.pkg.tuning.GemmConfig(**fields)
        keys = dict(block_n="BLOCK_N", block_k="BLOCK_K", group_m="GROUP_M", tma_b="TMA_B", persistent="PERSISTENT")
        return {keys.get(k, k): v for k, v in fields.items()}

    def _b_descriptor(self, b, config, b_is_kn, k_in):
        """As on CUDA, for CPU tensors (TMA's alignment holds for the shapes below)."""
        get = (lambda k: config.get(k.upper(), 0)) if isinstance(config, dict) else (lambda k: getattr(config, k))
        if not get("tma_b"):
            return None, 0
        experts, rows, cols = b.shape
        block = [get("block_k"), get("block_n")] if b_is_kn else [get("block_n"), get("block_k")]
        return TensorDescriptor(b.view(experts * rows, cols), [experts * rows, cols], [cols, 1], block), rows

    def gemm(self, *args, swiglu=False, **kwargs):
        if swiglu and hasattr(self.forward, "swiglu_gemm_launch"):
            self.forward.swiglu_gemm_launch(*args, **kwargs)
        else:
            self.forward.grouped_gemm_launch(*args, **kwargs, **(dict(swiglu=True) if swiglu else {}))
        return self.compiled[-1]

    def dswiglu(self, *args, **kwargs):
        self.forward.dswiglu_gemm_launch(*args, **kwargs)
        return self.compiled[-1]

    def dw(self, *args, tma=False, persistent=0, **kwargs):
        """A weight-gradient GEMM with 128x128x32 tiles; tma only where the build has the option."""
        fields = dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, persistent=persistent)
        config = self.pkg.tuning.DwConfig(**fields, **(dict(tma=True) if tma else {}))
        self.dw_module.grouped_dw_launch(*args, config, **kwargs)
        return self.compiled[-1]

    def nf4(self, shape, dtype):
        numel = shape[0] * shape[1] * shape[2]
        codes, absmax = torch.zeros(numel // 2, dtype=torch.uint8), torch.zeros(numel // 64)
        return self.pkg.quant.Nf4Weight(codes, absmax, shape, dtype, 64)


def ptxas_info(kernel) -> str:
    """Registers and spills of a compiled kernel: its PTX through the installed triton's ptxas -v
    for sm_90a (the whole stderr, cut, when ptxas says neither)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True)  # fmt: skip
    lines = [line.split(":", 1)[-1].strip() for line in run.stderr.splitlines() if "spill" in line or "registers" in line]
    return " | ".join(lines) or run.stderr.strip()[:200]


def histogram(ptx: str) -> collections.Counter:
    ops = collections.Counter()
    for line in ptx.splitlines():
        words = line.strip().rstrip(";").split()
        if not words or words[0].startswith(("//", ".", "$", "{", "}", "(", ")")) or words[0].endswith(":"):
            continue
        ops[words[1] if words[0].startswith("@") else words[0]] += 1
    return ops


def main():
    driver.set_active(_Sm90Driver())
    old, new = Build(sys.argv[1], "qmf_old"), Build(sys.argv[2], "qmf_new")
    print("triton", triton.__version__)
    dt, (tokens, hidden, inter, experts, top_k, rank) = torch.bfloat16, (256, 512, 256, 8, 2, 16)
    rows = tokens * top_k
    index = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    r = new.pkg.Routing(index(rows), index(rows), index(experts + 1), index(16), index(16), 128)
    rand = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    x, act, h, dh, out_rows = rand(tokens, hidden), rand(rows, inter), rand(rows, 2 * inter), rand(rows, 2 * inter), \
        rand(rows, hidden)  # fmt: skip
    gate_up, down, w, lx = rand(experts, 2 * inter, hidden), rand(experts, hidden, inter), rand(rows), rand(rows, rank)
    s = r.sort_idx
    cases = {  # name: (build -> (operands...), keyword options)
        "gate_up": lambda b: b.gemm(x, gate_up, act, r, cfg(b), gather=s, swiglu=True, h_out=h),
        "gate_up+lora": lambda b: b.gemm(x, gate_up, act, r, cfg(b), gather=s, swiglu=True, h_out=h,
                                         lora=(lx, rand(experts, 2 * inter, rank), False)),
        "gate_up_nf4": lambda b: b.gemm(x, b.nf4(gate_up.shape, dt), act, r, cfg(b), gather=s, swiglu=True),
        "down": lambda b: b.gemm(act, down, out_rows, r, cfg(b), scatter=s, row_scale=w),
        "down+lora": lambda b: b.gemm(act, down, out_rows, r, cfg(b), scatter=s, row_scale=w,
                                      lora=(lx, rand(experts, hidden, rank), False)),
        "down_dx+lora": lambda b: b.gemm(x, down, act, r, cfg(b), b_is_kn=True, gather=s,
                                         lora=(lx, rand(experts, rank, inter), True)),
        "down_dx_nf4": lambda b: b.gemm(x, b.nf4(down.shape, dt), act, r, cfg(b), b_is_kn=True, gather=s),
        "gate_up_dx": lambda b: b.gemm(dh, gate_up, out_rows, r, cfg(b), b_is_kn=True, scatter=s),
        "lora_proj": lambda b: b.gemm(x, rand(experts, rank, hidden), lx, r, cfg(b), gather=s),
        "plain": lambda b: b.gemm(act, down, out_rows, r, cfg(b)),
    }  # fmt: skip
    if hasattr(old.forward, "dswiglu_gemm_launch") and hasattr(new.forward, "dswiglu_gemm_launch"):
        dweights = torch.empty(rows, dtype=dt)
        cases["down_dx_swiglu"] = lambda b: b.dswiglu(x, down, h, w, r, cfg(b), dh=dh, w_act=act, dweights=dweights,
                                                      gather=s)  # fmt: skip
        cases["down_dx_swiglu+lora"] = lambda b: b.dswiglu(x, down, h, w, r, cfg(b), dh=dh, w_act=act,
                                                           dweights=dweights, gather=s,
                                                           lora=(lx, rand(experts, rank, inter), True))  # fmt: skip
        cases["down_dx_swiglu_nf4"] = lambda b: b.dswiglu(x, b.nf4(down.shape, dt), h, w, r, cfg(b), dh=dh,
                                                          w_act=act, dweights=dweights, gather=s)  # fmt: skip
    differ = 0
    for tma_b in (False, True):
        for persistent in (0, 1):

            def cfg(build):
                return build.config(block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3, tma_b=tma_b,
                                    persistent=persistent)  # fmt: skip

            for name, launch in cases.items():
                if tma_b and "nf4" in name:
                    continue
                k_old, k_new = launch(old), launch(new)
                h_old, h_new = histogram(k_old.asm["ptx"]), histogram(k_new.asm["ptx"])
                diff = {op: h_new[op] - h_old[op] for op in sorted(set(h_old) | set(h_new)) if h_new[op] != h_old[op]}
                same = not diff and k_old.metadata.shared == k_new.metadata.shared
                differ += not same
                print(f"{'same' if same else 'DIFFERENT'}: {name} tma_b={tma_b} persistent={persistent}: "
                      f"{sum(h_old.values())} / {sum(h_new.values())} instructions, shared memory "
                      f"{k_old.metadata.shared} / {k_new.metadata.shared}{f', counts new - old {diff}' if diff else ''}",
                      flush=True)  # fmt: skip
    # The weight-gradient GEMMs (gate_up_dw: dh sorted, x gathered; down_dw: dOut gathered, w_act
    # sorted), on both builds; then the new build's TMA option, compiled only.
    dgate_up, ddown = rand(experts, 2 * inter, hidden), rand(experts, hidden, inter)
    dw_cases = {
        "gate_up_dw": lambda b, **o: b.dw(dh, x, dgate_up, r, b_gather=s, **o),
        "down_dw": lambda b, **o: b.dw(out_rows[:tokens], act, ddown, r, a_gather=s, **o),
    }
    for persistent in (0, 1):
        for name, launch in dw_cases.items():
            k_old, k_new = launch(old, persistent=persistent), launch(new, persistent=persistent)
            h_old, h_new = histogram(k_old.asm["ptx"]), histogram(k_new.asm["ptx"])
            same = h_old == h_new and k_old.metadata.shared == k_new.metadata.shared
            differ += not same
            print(f"{'same' if same else 'DIFFERENT'}: {name} persistent={persistent}: {sum(h_old.values())} / "
                  f"{sum(h_new.values())} instructions", flush=True)  # fmt: skip
    # The TMA option: compared where both builds have it, else the new build's compiled alone.
    has_tma = ["tma" in getattr(b.pkg.tuning.DwConfig, "__dataclass_fields__", {}) for b in (old, new)]
    if has_tma[1]:
        for persistent in (0, 1):
            for name, launch in dw_cases.items():
                k_new = launch(new, tma=True, persistent=persistent)
                h_new = histogram(k_new.asm["ptx"])
                tma = f"{k_new.asm['ptx'].count('cp.async.bulk.tensor')} TMA loads in the PTX"
                if not has_tma[0]:
                    print(f"new build, {name} tma persistent={persistent}: {sum(h_new.values())} instructions, {tma}")
                    continue
                k_old = launch(old, tma=True, persistent=persistent)
                h_old = histogram(k_old.asm["ptx"])
                diff = {op: h_new[op] - h_old[op] for op in sorted(set(h_old) | set(h_new)) if h_new[op] != h_old[op]}
                same = not diff and k_old.metadata.shared == k_new.metadata.shared
                differ += not same
                print(f"{'same' if same else 'DIFFERENT'}: {name} tma persistent={persistent}: {sum(h_old.values())} / "
                      f"{sum(h_new.values())} instructions ({tma}), shared memory {k_old.metadata.shared} / "
                      f"{k_new.metadata.shared}{f', counts new - old {diff}' if diff else ''}", flush=True)  # fmt: skip
    print(f"{differ} different")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
