"""Benchmarks that cannot mislead: off a GPU, kernels' benchmark runner (which imports
benchmarks/benchmark_moe.py) finds only a workload named for the tiny smoke shape it runs,
and the import says so; the Qwen3 shapes' workloads exist only with a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_benchmark_moe_off_gpu_is_a_named_smoke_run():
    code = (
        "import benchmark_moe as b, kernels.benchmark as kb; "
        "print([n for n, v in vars(b).items() if isinstance(v, type) and issubclass(v, kb.Benchmark) and v is not kb.Benchmark])"
    )
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['SmokeTiny_H64_I32_E8_K2']"
    assert "SMOKE run of the tiny shape H 64, I 32, E 8, K 2" in result.stderr
    assert "not figures" in result.stderr


def test_host_cpu_models_every_launch_of_the_compiled_path():
    """scripts/host_cpu.py runs the layer's CUDA host path on the CPU with stand-in kernels: every
    launch of a 64-token step goes through them (5 in the forward: router top-k, routing, the two
    GEMMs, combine; 7 more in the backward)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "host_cpu.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), "--tokens", "64"], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    cells = [[c.strip() for c in line.split("|")] for line in result.stdout.splitlines()]
    launches = {row[2]: row[6] for row in cells if row[1:2] == ["64"]}  # | tokens | step | ... | launches |
    assert launches == {"fwd": "5", "fwd+bwd": "12"}, result.stdout
