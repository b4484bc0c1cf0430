"""benchmarks/peers_impls.py: a peer that cannot run is named and dropped, never a crash; where the
anchor site's `peers` module is importable (PYTHONPATH, see ../shared/tools/anchors/setup.sh), the
scattermoe and liger adapters agree with Transformers' eager loop (Triton's interpreter on CPU)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (before a test unsets TRITON_INTERPRET: triton.language's helpers read it at import)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers_impls  # noqa: E402


def test_unavailable_peers_are_named_and_dropped(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kept = peers_impls.load(["grouped_mm", "sonicmoe", "scattermoe", "liger", "ours"], torch.device("cpu"))
    assert kept == ["grouped_mm", "ours"]
    assert "needs a CUDA device" in peers_impls.unavailable["sonicmoe"]
    for peer in ("scattermoe", "liger"):
        assert "need CUDA (or TRITON_INTERPRET=1)" in peers_impls.unavailable[peer]
    err = capsys.readouterr().err
    assert all(f"{peer} unavailable: " in err for peer in peers_impls.PEERS)


@pytest.mark.skipif(importlib.util.find_spec("peers") is None, reason="the anchor site's peers module is not on PYTHONPATH")
@pytest.mark.skipif(torch.cuda.is_available() or not os.environ.get("TRITON_INTERPRET"), reason="CPU, Triton interpreter")
@pytest.mark.parametrize("peer", ["scattermoe", "liger"])
def test_peer_matches_eager(peer, monkeypatch):
    monkeypatch.setenv("LIGER_FUSED_MOE_AUTOTUNE", "0")  # one config: the interpreter would run them all
    from benchmark_moe import GRAD_NAMES, TINY, make_problem, rel_err, run_forward_backward, transformers_experts

    assert peers_impls.load([peer], torch.device("cpu")) == [peer], peers_impls.unavailable.get(peer)
    torch.manual_seed(0)
    problem = make_problem(TINY, 24, "cpu", torch.float32)
    problem.top_k_index[:8] = torch.tensor([0, 1])  # a busy expert; with 24 tokens over 8 experts some get none
    ref_out, ref_grads = run_forward_backward(transformers_experts(problem, "eager"), problem)
    out, grads = run_forward_backward(transformers_experts(problem, peer), problem)
    assert rel_err(out, ref_out) < 1e-5
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name
