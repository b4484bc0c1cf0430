"""Kernel launches with less host time than Triton's own launch path.

At small batches the MoE block is bound by the host issuing its ~20 kernels a step, and much of
a launch's host time is Triton's JITFunction.run: on every call it binds each argument, computes
its specialization, builds and hashes the cache key, checks globals and builds launch metadata
for the launch hooks. A `Launcher` keeps, per kernel, the compiled kernels under a key made of
the arguments themselves, which fixes that specialization: each tensor's dtype and address
modulo 16 (Triton specializes on 16-byte alignment), each tensor descriptor's base (dtype,
alignment), shape, strides and block shape, every other argument's exact type and value, the
launch options, the knobs JITFunction.run adds to them (debug, instrumentation) and the current
device. A key seen before launches its compiled kernel directly (CompiledKernel.run, the call
JITFunction.run ends with, on the same arguments); a new key goes through JITFunction.run, which
compiles where needed, and is remembered. Both paths run the same compiled kernel on the same
arguments: the same bits (benchmarks/RESULTS.md, 2026-12-07: 1.0 ms less host time a 2048-token
forward+backward step of the 30B-A3B block).

The direct path is taken only with the Triton versions whose launch convention was checked
(DIRECT_VERSIONS), on NVIDIA GPUs (CUDA builds of torch), outside the interpreter, with no launch or
pre-run hooks installed (profilers such as proton install them); otherwise every launch goes
through JITFunction.run. Set DIRECT = False to send every launch there (read at each call).
"""

import torch
import triton

from .tuning import INTERPRET

DIRECT = True
# Triton releases whose JITFunction.run ends with
#   kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
#              launch_metadata, enter_hook, exit_hook, *bound_args.values())
# with every argument in signature order, constexprs included (3.6: run on the GPU image; 3.9: the
# same code, read in its source, not run on a GPU here).
DIRECT_VERSIONS = ("3.6.", "3.9.")
# New keys past this many (one per distinct token count at decode, for instance) clear the cache.
MAX_KEYS = 4096

_DIRECT_OK = (
    not INTERPRET and triton.__version__.startswith(DIRECT_VERSIONS) and torch.version.hip is None
    and torch.cuda.is_available()
)  # fmt: skip
if _DIRECT_OK:
    from triton import knobs
    from triton.runtime import driver
    from triton.tools.tensor_descriptor import TensorDescriptor
else:
    TensorDescriptor = None


def _no_hooks() -> bool:
    """No launch hook installed (an empty hook chain or None), so no launch metadata is needed."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _knobs_key() -> tuple:
    """The knobs JITFunction.run adds to every launch's compile options (triton 3.9 adds the last)."""
    compilation = knobs.compilation
    return (knobs.runtime.debug, compilation.instrumentation_mode,
            getattr(compilation, "fpsan_homomorphic_casts", None))  # fmt: skip


def _other_key(value):
    """The key's part for an argument that is neither an int, None nor a tensor."""
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        base = value.base
        return (TensorDescriptor, base.dtype, base.data_ptr() & 15, tuple(value.shape), tuple(value.strides),
                tuple(value.block_shape), value.padding)  # fmt: skip
    return type(value), value  # bools and floats apart from equal ints


class Launcher:
    """A Triton kernel launched as kernel[grid](*args, **kwargs), through the direct path where
    it can (module docstring). grid: a tuple of 1 to 3 ints."""

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = tuple(fn.arg_names)
        self.compiled = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if not (DIRECT and _DIRECT_OK) or self.fn.pre_run_hooks or not _no_hooks():
            return self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        options = ("num_warps" in kwargs) + ("num_stages" in kwargs)
        if len(args) + len(kwargs) - options != len(self.arg_names):
            return self.fn.run(*args, grid=grid, warmup=False, **kwargs)  # other launch options
        params = [*args, *map(kwargs.__getitem__, self.arg_names[len(args):])]
        device = torch.cuda.current_device()
        # The key (module docstring), flat and built in one comprehension: this runs on every launch.
        key = (device, kwargs.get("num_warps"), kwargs.get("num_stages"), *_knobs_key(), *[
            p if type(p) is int or p is None else (p.dtype, p.data_ptr() & 15) if isinstance(p, torch.Tensor)
            else _other_key(p) for p in params
        ])  # fmt: skip
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            if len(self.compiled) >= MAX_KEYS:
                self.compiled.clear()
            self.compiled[key] = compiled
            return compiled
        stream = driver.active.get_current_stream(device)
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *params)  # fmt: skip
        return compiled


def launcher(fn):
    """Decorator over @triton.jit for the kernels the package launches: a Launcher, or, under
    the interpreter, the function itself."""
    return fn if INTERPRET else Launcher(fn)
