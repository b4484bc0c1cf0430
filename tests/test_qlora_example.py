"""examples/qlora_qwen3_30b_a3b.py --tiny: the QLoRA example's code path (4-bit experts and
linear layers, PEFT rslora with per-tensor ranks, gradient checkpointing, 8-bit AdamW) on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import published_cache

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not published_cache(), reason="needs the published build (make publish-local)")
def test_qlora_example_tiny():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "qlora_qwen3_30b_a3b.py"), "--tiny", "--steps", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "experts {'down_proj': 4, 'gate_up_proj': 4}, attention q_proj 16" in run.stdout
    assert "tokens/s" in run.stdout


@pytest.mark.skipif(not published_cache(), reason="needs the published build (make publish-local)")
def test_qlora_qwen3_5_moe_example_tiny():
    """examples/qlora_qwen3_5_moe.py --tiny: Qwen3.5 MoE (Gated DeltaNet + attention, shared
    expert) with 4-bit experts and attention, kernelized, PEFT LoRA on experts, attention and
    the shared expert, one training step on CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "qlora_qwen3_5_moe.py"), "--tiny", "--steps", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "experts {'down_proj': 4, 'gate_up_proj': 4}, attention q_proj 16, shared expert 16" in run.stdout
    assert "tokens/s" in run.stdout


def test_chunked_causal_lm_loss_matches_full_logits(monkeypatch):
    """The Qwen3.5 example's loss without the (T, vocab) logits equals Transformers' causal-LM
    loss on the full logits (shifted next-token cross-entropy, mean), value and gradients."""
    import importlib.util

    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    spec = importlib.util.spec_from_file_location("qlora_qwen3_5_moe", ROOT / "examples" / "qlora_qwen3_5_moe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 21, 16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 21))
    loss = example.chunked_causal_lm_loss(lm_head, hidden, labels, chunk=6)  # 20 targets: 4 chunks, one short
    grads = torch.autograd.grad(loss, [hidden, lm_head.weight])
    expected = ForCausalLMLoss(lm_head(hidden), labels, vocab_size=50)
    expected_grads = torch.autograd.grad(expected, [hidden, lm_head.weight])
    torch.testing.assert_close(loss, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
