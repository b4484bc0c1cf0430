"""Every way users load the package, each checked to run the package's code with eager results.

1. `get_kernel("org/qwen3-moe-fused", version=1)` offline from a Hub-layout cache.
2. The same call through `LOCAL_KERNELS` (a checkout's build/).
3. `replace_kernel_forward_from_hub` + `use_kernel_mapping` + `kernelize` in each mode.
4. `from_pretrained(..., use_kernels=True, kernel_config=KernelConfig(...))`.
5. `experts_implementation="qwen3_moe_fused"` through Transformers' ExpertsInterface.

Paths that load the build from another place, or change process-wide state of Transformers,
run in a subprocess: each build registers its custom ops once per process.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernels import Mode
from reference import rel_err
from tiny_model import (
    REPO_ID,
    TINY_CONFIG,
    kernel_activity,
    kernelize_moe,
    load_tiny,
    moe_blocks,
    runs_kernel_layer,
    sample_batch,
    triton_expected,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VARIANT = "torch-cuda" if torch.version.cuda else "torch-cpu"  # what kernels picks for this torch
RTOL = 1e-5
VOCAB = TINY_CONFIG["vocab_size"]


def run_python(script: str, *args, **env) -> dict:
    """Run `script` with `args` in a fresh interpreter (tests/ importable) with the kernel
    environment replaced by `env`; return the JSON object its last output line holds."""
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    environ.update({k: str(v) for k, v in env.items()})
    command = [sys.executable, "-c", textwrap.dedent(script), *map(str, args)]
    result = subprocess.run(command, cwd=TESTS, env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Loads the package with get_kernel and runs its experts function against a float64 reference.
GET_KERNEL_SCRIPT = """
import json, sys, torch
from kernels import get_kernel
from reference import moe_experts_reference, random_routing, rel_err
from tiny_model import kernel_activity, triton_expected

device = sys.argv[1]
kernel = get_kernel("org/qwen3-moe-fused", version=1)
g = torch.Generator().manual_seed(0)
x = torch.randn(13, 64, generator=g)
gate_up, down = torch.randn(8, 80, 64, generator=g) / 8, torch.randn(8, 64, 40, generator=g) / 6
ids, weights = random_routing(13, 8, 2, generator=g)
args = [t.to(device) for t in (x, gate_up, down, ids, weights)]
with kernel_activity(kernel) as activity:
    out = kernel.moe_experts_forward(*args)
report = dict(
    file=kernel.__file__, err=rel_err(out, moe_experts_reference(*args)), activity=activity,
    triton=triton_expected(device), api=sorted(kernel.__all__),
)
"""


def _assert_functional(report):
    assert report["err"] <= RTOL, report
    assert report["activity"]["ops"].get("experts_fwd") == 1, report
    if report["triton"]:
        assert report["activity"]["launches"], report
    assert {"layers", "moe_experts_forward", "experts_forward", "grouped_gemm"} <= set(report["api"])


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
def test_get_kernel_offline_from_hub_cache(hub_cache, device, tmp_path):
    script = GET_KERNEL_SCRIPT + "print(json.dumps(report))"
    report = run_python(script, device, HF_HUB_OFFLINE=1, HF_HUB_CACHE=hub_cache)
    snapshots = hub_cache / ("kernels--" + REPO_ID.replace("/", "--")) / "snapshots"
    loaded = Path(report["file"])
    assert loaded.name == "__init__.py" and loaded.parent.name == VARIANT
    assert loaded.is_relative_to(snapshots), report["file"]
    _assert_functional(report)


def _local_kernels_checkout() -> Path:
    """The checkout LOCAL_KERNELS names for the package: the environment's (kernels CI) or
    this one, built when its build/ is missing."""
    for entry in os.environ.get("LOCAL_KERNELS", "").split(":"):
        repo_id, _, path = entry.partition("=")
        if repo_id == REPO_ID:
            return Path(path)
    if not (ROOT / "build" / VARIANT).is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py")], check=True, cwd=ROOT)
    return ROOT


LOCAL_KERNELS_SCRIPT = """
import importlib.util
if importlib.util.find_spec("transformers"):
    from kernels import Mode
    from tiny_model import TINY_CONFIG, kernelize_moe, load_tiny, moe_blocks, runs_kernel_layer, sample_batch

    path = sys.argv[2]
    ref = load_tiny(path, device=device).eval()
    model = kernelize_moe(load_tiny(path, device=device).eval(), Mode.INFERENCE, device)
    ids = sample_batch(TINY_CONFIG["vocab_size"], batch=1, seq_len=5)[0].to(device)
    with torch.no_grad():
        logits_err = rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    report.update(logits_err=logits_err, replaced=[runs_kernel_layer(b, kernel) for b in moe_blocks(model)])
print(json.dumps(report))
"""


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
def test_get_kernel_and_kernelize_through_local_kernels(request, device, tmp_path):
    """LOCAL_KERNELS=org/qwen3-moe-fused=<checkout> loads the checkout's build/: get_kernel with
    version=1, and kernelize (with Transformers installed). kernels 0.17.2 cannot resolve a
    LayerRepository's version=1 without the Hub or a cache, so there tiny_model.layer_repository
    names the v1 branch (revision="v1")."""
    checkout = _local_kernels_checkout()
    checkpoint = request.getfixturevalue("tiny_checkpoint")[0] if importlib.util.find_spec("transformers") else ""
    env = dict(LOCAL_KERNELS=f"{REPO_ID}={checkout}", HF_HUB_OFFLINE=1, HF_HUB_CACHE=tmp_path / "empty-cache")
    report = run_python(GET_KERNEL_SCRIPT + LOCAL_KERNELS_SCRIPT, device, checkpoint, **env)
    loaded = Path(report["file"])
    assert loaded.name == "__init__.py" and loaded.parent.name == VARIANT
    assert loaded.is_relative_to(checkout), report["file"]
    _assert_functional(report)
    if "replaced" in report:
        assert report["replaced"] == [True, True], report
        assert report["logits_err"] <= RTOL, report


@pytest.mark.parametrize(
    "mode",
    [Mode.INFERENCE, pytest.param(Mode.TRAINING, marks=pytest.mark.kernels_ci), Mode.TRAINING | Mode.TORCH_COMPILE],
    ids=["inference", "training", "training-compile"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_kernelize(kernel, tiny_checkpoint, mode, device):
    """kernelize swaps the forward of every MoE block (and of nothing else) for the package's
    layer, loaded from the Hub-layout build with version=1; the model then matches eager."""
    pytest.importorskip("transformers")
    path, _ = tiny_checkpoint
    training = Mode.TRAINING in mode
    ref = load_tiny(path, device=device).train(training)
    model = kernelize_moe(load_tiny(path, device=device).train(training), mode, device)
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(model))
    others = [m for m in model.modules() if m not in moe_blocks(model) and "forward" in vars(m)]
    assert not [m for m in others if getattr(m.forward, "__module__", "").startswith(kernel.__name__)]

    input_ids, _, labels = (t.to(device) for t in sample_batch(VOCAB, batch=1, seq_len=7))
    with torch.set_grad_enabled(training), kernel_activity(kernel) as activity:
        out = model(input_ids=input_ids, labels=labels)
        if training:
            out.loss.backward()
    with torch.set_grad_enabled(training):
        ref_out = ref(input_ids=input_ids, labels=labels)
        if training:
            ref_out.loss.backward()
    assert activity["ops"].get("experts_fwd") == len(moe_blocks(model)), activity
    assert activity["ops"].get("experts_bwd", 0) == (len(moe_blocks(model)) if training else 0), activity
    assert rel_err(out.logits, ref_out.logits) <= RTOL
    assert rel_err(out.loss, ref_out.loss) <= RTOL
    if training:
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) <= RTOL, name


@pytest.mark.parametrize("device", DEVICES)
def test_from_pretrained_use_kernels_kernel_config(hub_cache, tiny_checkpoint, device):
    """from_pretrained(use_kernels=True, kernel_config=KernelConfig(...)) on Transformers 5.22.2.

    Transformers' KernelConfig accepts accelerator device keys only (not "cpu"), so on CPU the
    script adds "cpu" to that list. inherit_mapping=False keeps Transformers' own default
    mapping out (offline, its CUDA entries such as kernels-community/rotary cannot resolve
    and kernelize raises). The model comes back in eval mode, kernelized for Mode.INFERENCE.
    After model.train(), Transformers re-kernelizes with that INFERENCE-only mapping and falls
    back to its own forward; calling set_use_kernels again with the KernelConfig in training
    mode registers the kernel for Mode.TRAINING.
    """
    pytest.importorskip("transformers")
    script = """
    import json, sys, torch
    import transformers.utils.kernel_config as kernel_config
    from kernels import get_kernel, replace_kernel_forward_from_hub
    from reference import rel_err
    from transformers import KernelConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from tiny_model import TINY_CONFIG, kernel_activity, load_tiny, moe_blocks, runs_kernel_layer, sample_batch

    device, path = sys.argv[1], sys.argv[2]
    VOCAB = TINY_CONFIG["vocab_size"]
    if device not in kernel_config.KERNELS_SUPPORTED_DEVICE_TYPES:
        kernel_config.KERNELS_SUPPORTED_DEVICE_TYPES.append(device)
    replace_kernel_forward_from_hub(Qwen3MoeSparseMoeBlock, "Qwen3MoeSparseMoeBlock")
    mapping = {"Qwen3MoeSparseMoeBlock": {device: ("org/qwen3-moe-fused:Qwen3MoeSparseMoeBlock", {"version": 1})}}
    model = Qwen3MoeForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map=device, experts_implementation="eager",
        use_kernels=True, kernel_config=KernelConfig(mapping, inherit_mapping=False),
    )
    kernel = get_kernel("org/qwen3-moe-fused", version=1)
    ref = load_tiny(path, device=device).eval()
    input_ids, _, labels = (t.to(device) for t in sample_batch(VOCAB, batch=1, seq_len=7))
    report = dict(training_at_load=model.training)
    report["replaced_eval"] = [runs_kernel_layer(b, kernel) for b in moe_blocks(model)]
    with torch.no_grad(), kernel_activity(kernel) as activity:
        report["logits_err"] = rel_err(model(input_ids=input_ids).logits, ref(input_ids=input_ids).logits)
    report["ops_eval"] = activity["ops"]

    model.train()
    report["replaced_after_train"] = [runs_kernel_layer(b, kernel) for b in moe_blocks(model)]
    model.set_use_kernels(True, KernelConfig(mapping, inherit_mapping=False))
    report["replaced_train"] = [runs_kernel_layer(b, kernel) for b in moe_blocks(model)]
    ref.train()
    with kernel_activity(kernel) as activity:
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
    ref_out = ref(input_ids=input_ids, labels=labels)
    ref_out.loss.backward()
    report["ops_train"] = activity["ops"]
    report["loss_err"] = rel_err(out.loss, ref_out.loss)
    report["grad_err"] = max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    print(json.dumps(report))
    """
    report = run_python(script, device, tiny_checkpoint[0], HF_HUB_OFFLINE=1, HF_HUB_CACHE=hub_cache)
    assert report["training_at_load"] is False
    assert report["replaced_eval"] == [True, True], report
    assert report["ops_eval"].get("experts_fwd") == 2, report
    assert report["logits_err"] <= RTOL, report
    assert report["replaced_train"] == [True, True], report
    assert report["ops_train"].get("experts_bwd") == 2, report
    assert report["loss_err"] <= RTOL and report["grad_err"] <= RTOL, report


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
def test_experts_interface(kernel, tiny_checkpoint, device):
    """ExpertsInterface.register("qwen3_moe_fused", kernel.experts_forward), then
    from_pretrained(..., experts_implementation="qwen3_moe_fused"): Transformers' block
    forward (router included) calls the package's experts function."""
    pytest.importorskip("transformers")
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("qwen3_moe_fused", kernel.experts_forward)
    path, _ = tiny_checkpoint
    model = load_tiny(path, device=device, experts_implementation="qwen3_moe_fused").train()
    ref = load_tiny(path, device=device).train()
    assert model.config._experts_implementation == "qwen3_moe_fused"
    assert not any(runs_kernel_layer(block, kernel) for block in moe_blocks(model))

    input_ids, _, labels = (t.to(device) for t in sample_batch(VOCAB, batch=1, seq_len=7))
    with kernel_activity(kernel) as activity:
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
    ref_out = ref(input_ids=input_ids, labels=labels)
    ref_out.loss.backward()
    assert activity["ops"].get("experts_fwd") == 2 and activity["ops"].get("experts_bwd") == 2, activity
    if triton_expected(device):
        assert activity["launches"], activity
    assert rel_err(out.logits, ref_out.logits) <= RTOL
    assert rel_err(out.aux_loss, ref_out.aux_loss) <= RTOL
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL, name
