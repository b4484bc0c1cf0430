"""examples/train_multi_gpu.py --tiny with 2 gloo ranks: expert parallel (Transformers'
DistributedConfig, token dispatch) + LoRA through the kernelized block trains, and the adapter
it saves loads into a plain one-process PEFT model (no kernel) with the trained model's loss."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def test_expert_parallel_lora_example(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = [str(ROOT / "examples" / "train_multi_gpu.py"), "--tiny", "--mode", "ep", "--finetune", "lora"]
    run = subprocess.run([*command, *script, "--steps", "2", "--out", str(tmp_path / "adapter")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    assert re.search(r"step 1: loss \d", run.stdout), run.stdout
    found = re.search(r"adapter reloaded into one process: loss ([\d.]+), trained model ([\d.]+)", run.stdout)
    assert found, run.stdout
    loaded, trained = map(float, found.groups())
    assert abs(loaded - trained) <= 1e-4 * trained
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
