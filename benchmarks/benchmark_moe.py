"""Qwen3 MoE experts block: qwen3-moe-fused vs Transformers' eager experts loop.

Written for kernels' benchmark runner (`kernels benchmark <repo path or id>`): every
`benchmark_*.py` in `benchmarks/` is imported, each `kernels.benchmark.Benchmark` subclass
defined here is run, and the kernel is handed in as `self.kernel`. For each workload
`<name>` the runner calls `setup_<name>()`, then `benchmark_<name>()` once, then
`verify_<name>()` (warm-up runs, then one timed run that is reported as "Ref(ms)"), checks
`torch.allclose(self.out, <returned tensor>, atol=1e-2)`, and times `benchmark_<name>()`.

Here `verify_*` runs Transformers 5.x's eager `Qwen3MoeExperts` loop on the same inputs and
weights (so "Ref(ms)" is the eager loop's time) and checks the relative error
||ours - eager|| / ||eager|| < 1e-2 of the output and, in the `*_fwd_bwd` workloads, of the
gradients w.r.t. hidden states, both expert weights and the routing weights; it raises
RuntimeError, which stops the runner, when one is over. It then hands the runner our own output
back, so the runner's fixed elementwise test passes once ours has: that test (atol 1e-2,
rtol 1e-5) is not one a right bf16 result meets at these shapes. At the Qwen3-235B-A22B
shape the outputs reach about 3, and the bf16 eager loop itself is 0.03 away from an fp32
evaluation of the same block in places (relative error 0.6%).

Workloads (bf16 on CUDA): Qwen3-30B-A3B block (H 2048, I 768, E 128, K 8) at 2048 and 16384
tokens, Qwen3-235B-A22B block (H 4096, I 1536, E 128, K 8) at 8192 tokens; forward, and
forward+backward with a random output gradient. The forward runs with autograd on (inputs
and weights require grad), as in full fine-tuning. Inputs are random normal, expert weights
normal(0, 0.02) (the models' initializer_range), routing comes from a random router (softmax,
top-k, renormalised). On a machine without CUDA (or with QWEN3_MOE_BENCH_TINY=1) only the
class SmokeTiny_H64_I32_E8_K2 exists (H 64, I 32, E 8, K 2, 24 tokens, float32), says so when
imported, and the Qwen3 shapes are not timed: a smoke test, not a figure.

Also runs without the kernels CLI, loading the package through benchmarks/_load.py:
    python benchmarks/benchmark_moe.py [--filter 30B] [--list]

side_by_side.py imports the problem-building helpers below.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from kernels.benchmark import Benchmark

REL_TOL = 1e-2
WEIGHT_STD = 0.02  # Qwen3 MoE configs' initializer_range
ROUTER_STD = 0.02


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int  # H
    intermediate: int  # I (moe_intermediate_size)
    experts: int  # E
    top_k: int  # K
    shared: int = 0  # shared_expert_intermediate_size (0: no shared expert)


QWEN3_30B_A3B = MoEShape("Qwen3-30B-A3B", 2048, 768, 128, 8)
QWEN3_235B_A22B = MoEShape("Qwen3-235B-A22B", 4096, 1536, 128, 8)
# The rest of the Qwen3 MoE family (Transformers 5.22.2). Checked against the configuration
# classes, whose defaults are these checkpoints: Qwen3NextConfig (Qwen3-Next-80B-A3B-Instruct),
# Qwen3_5MoeTextConfig (Qwen3.5-35B-A3B; Qwen3.6-35B-A3B has the same architecture, per the
# qwen3_5_moe model doc), Qwen3OmniMoeTextConfig (Qwen3-Omni-30B-A3B thinker: the 30B-A3B
# shape). Not in any configuration class here (from the models' published config.json as
# quoted by public training scripts; a third-party spec page confirms H 4096 and 512
# experts for 397B): Qwen3-Coder-480B-A35B and Qwen3.5-397B-A17B. Qwen3-VL-30B-A3B /
# VL-235B-A22B have the 30B-A3B / 235B-A22B text shapes (Qwen3VLMoeTextConfig's defaults
# are not a released model).
QWEN3_CODER_480B_A35B = MoEShape("Qwen3-Coder-480B-A35B", 6144, 2560, 160, 8)
QWEN3_NEXT_80B_A3B = MoEShape("Qwen3-Next-80B-A3B", 2048, 512, 512, 10, shared=512)
QWEN3_5_35B_A3B = MoEShape("Qwen3.5-35B-A3B", 2048, 512, 256, 8, shared=512)
QWEN3_5_397B_A17B = MoEShape("Qwen3.5-397B-A17B", 4096, 1024, 512, 10, shared=1024)
FAMILY_SHAPES = {s.name: s for s in (QWEN3_30B_A3B, QWEN3_235B_A22B, QWEN3_CODER_480B_A35B, QWEN3_NEXT_80B_A3B,
                                     QWEN3_5_35B_A3B, QWEN3_5_397B_A17B)}  # fmt: skip
TINY = MoEShape("tiny", 64, 32, 8, 2)


def experts_flops(shape: MoEShape, tokens: int) -> int:
    """FLOPs of the experts' forward: 2*T*K*3*H*I (gate, up and down projections)."""
    return 2 * tokens * shape.top_k * 3 * shape.hidden * shape.intermediate


SMOKE_TOKENS = 24  # the smoke shape's token count (no GPU)


def default_dtype(device: str) -> torch.dtype:
    # bf16 is the case that matters (GPU). CPU runs are smoke tests: the package's CPU path is
    # Triton's interpreter, whose bf16 tl.dot is broken, so float32 there.
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def random_routing(x: torch.Tensor, shape: MoEShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's router math with a random router: softmax in fp32, top-k, renormalise."""
    router = torch.randn(shape.experts, shape.hidden, device=x.device, dtype=torch.float32) * ROUTER_STD
    probs = torch.softmax(x.float() @ router.t(), dim=-1)
    top_w, top_i = torch.topk(probs, shape.top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_i.to(torch.int64), top_w.to(x.dtype)


@dataclass
class MoEProblem:
    shape: MoEShape
    tokens: int
    hidden_states: torch.Tensor  # (T, H)
    gate_up_proj: nn.Parameter  # (E, 2I, H), gate rows first
    down_proj: nn.Parameter  # (E, H, I)
    top_k_index: torch.Tensor  # (T, K) int64
    top_k_weights: torch.Tensor  # (T, K)
    grad_out: torch.Tensor  # (T, H)

    @property
    def grad_inputs(self) -> list[torch.Tensor]:
        return [self.hidden_states, self.gate_up_proj, self.down_proj, self.top_k_weights]

    @property
    def flops_fwd(self) -> int:
        return experts_flops(self.shape, self.tokens)


GRAD_NAMES = ["d_hidden_states", "d_gate_up_proj", "d_down_proj", "d_top_k_weights"]


def make_problem(shape: MoEShape, tokens: int, device, dtype: torch.dtype) -> MoEProblem:
    """Random inputs, weights, routing and output gradient; every differentiable input requires grad."""
    H, I, E = shape.hidden, shape.intermediate, shape.experts
    x = torch.randn(tokens, H, device=device, dtype=dtype)
    top_k_index, top_k_weights = random_routing(x, shape)
    gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype).mul_(WEIGHT_STD)
    down = torch.randn(E, H, I, device=device, dtype=dtype).mul_(WEIGHT_STD)
    grad_out = torch.randn(tokens, H, device=device, dtype=dtype)
    return MoEProblem(
        shape=shape,
        tokens=tokens,
        hidden_states=x.requires_grad_(),
        gate_up_proj=nn.Parameter(gate_up),
        down_proj=nn.Parameter(down),
        top_k_index=top_k_index,
        top_k_weights=top_k_weights.requires_grad_(),
        grad_out=grad_out,
    )


def transformers_experts(problem: MoEProblem, implementation: str) -> nn.Module:
    """Transformers' Qwen3MoeExperts dispatching to `implementation` ("eager", "grouped_mm", ...),
    holding the problem's weight Parameters themselves (no copy, so no extra memory)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    s = problem.shape
    config = Qwen3MoeConfig(
        hidden_size=s.hidden,
        moe_intermediate_size=s.intermediate,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        norm_topk_prob=True,
        hidden_act="silu",
        experts_implementation=implementation,
    )
    # A standalone experts module reads config._experts_implementation on every call (None would
    # mean its own eager forward). Set it explicitly rather than relying on the kwarg.
    config._experts_implementation = implementation
    with torch.device("meta"):  # no throwaway fp32 allocation of the full expert weights
        experts = Qwen3MoeExperts(config)
    experts.gate_up_proj = problem.gate_up_proj
    experts.down_proj = problem.down_proj
    assert experts.config._experts_implementation == implementation
    return experts


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32, in slices so that huge weight gradients need no fp32 copy."""
    if out.shape != ref.shape:
        raise RuntimeError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    num = torch.zeros((), device=out.device, dtype=torch.float64)
    den = torch.zeros((), device=out.device, dtype=torch.float64)
    for a, b in zip(out.detach().reshape(-1).split(1 << 24), ref.detach().reshape(-1).split(1 << 24)):
        b = b.float()
        num += (a.float() - b).square().sum().double()
        den += b.square().sum().double()
    num, den = num.item(), den.item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def run_forward(fn, problem: MoEProblem) -> torch.Tensor:
    return fn(problem.hidden_states, problem.top_k_index, problem.top_k_weights)


def run_forward_backward(fn, problem: MoEProblem) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out = run_forward(fn, problem)
    grads = torch.autograd.grad(out, problem.grad_inputs, problem.grad_out)
    return out, grads


class _MoEWorkloads:
    """Shared body of the Benchmark classes below. Not itself a Benchmark: the runner would
    pick up any Benchmark subclass defined in this file and fail on one without workloads."""

    seed = 0

    def _setup(self, shape: MoEShape, tokens: int, backward: bool) -> None:
        self.backward = backward
        self.problem = make_problem(shape, tokens, self.device, default_dtype(self.device))
        p = self.problem
        kernel = self.kernel

        def ours(x, top_k_index, top_k_weights):
            return kernel.moe_experts_forward(
                x, p.gate_up_proj, p.down_proj, top_k_index, top_k_weights, check_ids=False
            )

        self.ours = ours
        self.grads = None

    def _run(self) -> None:
        if self.backward:
            out, self.grads = run_forward_backward(self.ours, self.problem)
        else:
            out = run_forward(self.ours, self.problem)
        self.out = out.detach()

    def _verify(self) -> torch.Tensor:
        p = self.problem
        if not hasattr(self, "eager"):
            self.eager = transformers_experts(p, "eager")
        errors = {}
        if self.backward:
            ref, ref_grads = run_forward_backward(self.eager, p)
            for name, g, r in zip(GRAD_NAMES, self.grads, ref_grads):
                errors[name] = rel_err(g, r)
        else:
            ref = run_forward(self.eager, p)
        ref = ref.detach()
        errors = {"out": rel_err(self.out, ref), **errors}
        bad = {k: v for k, v in errors.items() if not v < REL_TOL}
        if bad:
            detail = ", ".join(f"{k} {v:.3e}" for k, v in errors.items())
            raise RuntimeError(
                f"{type(self).__name__} T={p.tokens}: relative error vs Transformers eager over {REL_TOL}: {detail}"
            )
        self.rel_errors = errors
        # Checked above by relative error; see the module docstring for why not the eager output.
        return self.out


SMOKE = not torch.cuda.is_available() or os.environ.get("QWEN3_MOE_BENCH_TINY", "") not in ("", "0")

if SMOKE:
    # Off a GPU the Qwen3 shapes are not timed at all: the workloads are named for what they run.
    print(
        f"benchmark_moe: no CUDA GPU (or QWEN3_MOE_BENCH_TINY=1): a SMOKE run of the tiny shape "
        f"H {TINY.hidden}, I {TINY.intermediate}, E {TINY.experts}, K {TINY.top_k} in float32, {SMOKE_TOKENS} tokens: "
        "it checks that the package runs and agrees with the eager loop; its times are not figures",
        file=sys.stderr,
    )

    class SmokeTiny_H64_I32_E8_K2(_MoEWorkloads, Benchmark):
        """Tiny smoke shape (no GPU): H 64, I 32, E 8, K 2, float32."""

        def setup_t24_fwd(self):
            self._setup(TINY, SMOKE_TOKENS, backward=False)

        def benchmark_t24_fwd(self):
            self._run()

        def verify_t24_fwd(self):
            return self._verify()

        def setup_t24_fwd_bwd(self):
            self._setup(TINY, SMOKE_TOKENS, backward=True)

        def benchmark_t24_fwd_bwd(self):
            self._run()

        def verify_t24_fwd_bwd(self):
            return self._verify()

    CLASSES = [SmokeTiny_H64_I32_E8_K2]
else:

    class Qwen3_30B_A3B(_MoEWorkloads, Benchmark):
        """Qwen3-30B-A3B MoE block: H 2048, I 768, E 128, K 8."""

        def setup_t2048_fwd(self):
            self._setup(QWEN3_30B_A3B, 2048, backward=False)

        def benchmark_t2048_fwd(self):
            self._run()

        def verify_t2048_fwd(self):
            return self._verify()

        def setup_t2048_fwd_bwd(self):
            self._setup(QWEN3_30B_A3B, 2048, backward=True)

        def benchmark_t2048_fwd_bwd(self):
            self._run()

        def verify_t2048_fwd_bwd(self):
            return self._verify()

        def setup_t16384_fwd(self):
            self._setup(QWEN3_30B_A3B, 16384, backward=False)

        def benchmark_t16384_fwd(self):
            self._run()

        def verify_t16384_fwd(self):
            return self._verify()

        def setup_t16384_fwd_bwd(self):
            self._setup(QWEN3_30B_A3B, 16384, backward=True)

        def benchmark_t16384_fwd_bwd(self):
            self._run()

        def verify_t16384_fwd_bwd(self):
            return self._verify()


    class Qwen3_235B_A22B(_MoEWorkloads, Benchmark):
        """Qwen3-235B-A22B MoE block: H 4096, I 1536, E 128, K 8."""

        def setup_t8192_fwd(self):
            self._setup(QWEN3_235B_A22B, 8192, backward=False)

        def benchmark_t8192_fwd(self):
            self._run()

        def verify_t8192_fwd(self):
            return self._verify()

        def setup_t8192_fwd_bwd(self):
            self._setup(QWEN3_235B_A22B, 8192, backward=True)

        def benchmark_t8192_fwd_bwd(self):
            self._run()

        def verify_t8192_fwd_bwd(self):
            return self._verify()

    CLASSES = [Qwen3_30B_A3B, Qwen3_235B_A22B]


# ---------------------------------------------------------------- standalone runner


def _main() -> int:
    import argparse
    import statistics
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="run only workloads whose Class.workload contains this")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with the eager loop")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _load import kernel_source, load_kernel

    classes = CLASSES
    workloads = [
        (cls, m[len("benchmark_") :])
        for cls in classes
        for m in sorted(dir(cls))
        if m.startswith("benchmark_") and args.filter in f"{cls.__name__}.{m[len('benchmark_'):]}"
    ]
    if args.list:
        for cls, w in workloads:
            print(f"{cls.__name__}.{w}")
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = load_kernel()
    print(f"kernel: {kernel_source()}  device: {device}", file=sys.stderr)

    def bench(fn) -> float:
        if device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, return_mode="median")
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    print("| workload | shape (H, I, E, K) | tokens | ms (median) | TFLOP/s | rel err vs eager (max) |")
    print("|---|---|---|---|---|---|")
    for cls, w in workloads:
        inst = cls()
        inst.kernel, inst.device = kernel, device
        torch.manual_seed(inst.seed)
        getattr(inst, f"setup_{w}")()
        run = getattr(inst, f"benchmark_{w}")
        run()
        err = "-"
        if not args.no_verify:
            getattr(inst, f"verify_{w}")()
            err = f"{max(inst.rel_errors.values()):.2e}"
            del inst.eager
        ms = bench(run)
        p = inst.problem
        flops = p.flops_fwd * (3 if inst.backward else 1)
        s = p.shape
        print(
            f"| {cls.__name__}.{w} | {s.hidden}, {s.intermediate}, {s.experts}, {s.top_k} | {p.tokens} "
            f"| {ms:.3f} | {flops / ms / 1e9:.1f} | {err} |",
            flush=True,
        )
        del inst
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
