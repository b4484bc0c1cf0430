"""LoRA on the experts (PEFT `target_parameters`) through the package's fused path, against
PEFT itself.

PEFT wraps the experts module of every MoE block in nested `ParamWrapper`s, one per targeted
tensor (`gate_up_proj`, `down_proj`), and on every forward asks each wrapper to build or fold
`W + s·B@A` for all experts before calling the experts. The kernelized block instead finds
those wrappers (by attributes) and computes base + LoRA itself through the package's
`experts_fwd` / `experts_bwd` ops. These tests check that:

- `moe_experts_forward(..., gate_up_lora=(A, B), down_lora=(A, B))` (A (E, r, in), B (E, out, r),
  scaling folded into B) matches a float64 dense reference written here, outputs and
  gradients (input, routing weights, A, B; a frozen base gets none);
- a kernelized PEFT model (kernelize before or after `get_peft_model`) gives PEFT's own
  logits, loss, aux_loss and gradients (every trainable LoRA tensor and the input
  embeddings) for several ranks, rslora, two adapters, `disable_adapter()`, merge / unmerge /
  `merge_and_unload()`, inference with `generate`, and LoRA on attention and on the router
  beside the experts; and that the package's ops ran for every block while PEFT was never
  asked to build `W + s·B@A` for the experts;
- adapters trained through the kernel are ordinary PEFT adapters (save / load both ways).

The reference is the same PEFT model without kernelize (Transformers' eager experts loop).
On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), float32.
"""

import contextlib
import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from kernels import Mode  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from reference import moe_experts_lora_reference, random_routing, rel_err  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tiny_model import (  # noqa: E402
    TINY_CONFIG,
    kernel_activity,
    kernelize_moe,
    load_tiny,
    moe_blocks,
    runs_kernel_layer,
    sample_batch,
    triton_expected,
    write_tiny_checkpoint,
)

RTOL = 1e-5  # float32: relative (norm) error of every compared tensor
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_TARGETS = [f"mlp.experts.{name}" for name in EXPERT_PARAMS]


# ================================================================ functional API


def _functional_inputs(num_tokens, hidden, inter, num_experts, top_k, mode, rank_gate_up, rank_down, seed=0):
    """x, gate_up, down, ids, weights and the LoRA factors (A, B) of each tensor (None: no LoRA).
    B is scaled so that B@A is about half the base weight: the LoRA term is far from negligible."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    ids, weights = random_routing(num_tokens, num_experts, top_k, mode, generator=g)

    def factors(rank, out_features, in_features):
        if rank is None:
            return None
        a = torch.randn(num_experts, rank, in_features, generator=g) * in_features**-0.5
        b = torch.randn(num_experts, out_features, rank, generator=g) * (0.5 * rank**-0.5)
        return a, b

    return x, gate_up, down, ids, weights, factors(rank_gate_up, 2 * inter, hidden), factors(rank_down, hidden, inter)


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


LORA_SHAPES = [
    # (T, H, I, E, K, routing mode, gate_up rank, down rank); rank None: that tensor has no LoRA
    pytest.param((37, 48, 40, 8, 3, "random", 4, 4), id="r4", marks=pytest.mark.kernels_ci),
    pytest.param((50, 32, 24, 8, 2, "skip", 1, 1), id="r1-experts-without-tokens"),
    pytest.param((1, 64, 32, 4, 2, "random", 16, 16), id="r16-T1"),
    pytest.param((33, 40, 16, 6, 2, "one", 16, 4), id="r16-r4-one-hot-expert"),
    pytest.param((29, 32, 24, 4, 2, "random", 8, None), id="gate_up-only"),
    pytest.param((29, 32, 24, 4, 2, "random", None, 8), id="down-only"),
]


@pytest.mark.parametrize("shape", LORA_SHAPES)
def test_moe_experts_forward_lora(kernel, shape):
    """Frozen base, trainable LoRA: output and gradients of the input, routing weights, A and B
    against the float64 reference; the base gets no gradient; experts that received no
    tokens get exactly zero LoRA gradients."""
    x, gate_up, down, ids, weights, gate_up_lora, down_lora = _functional_inputs(*shape)
    ours = _leaves([x, weights, *(gate_up_lora or (None, None)), *(down_lora or (None, None))])
    ref = _leaves([x, weights, *(gate_up_lora or (None, None)), *(down_lora or (None, None))], torch.float64)

    def call(fn, leaves):
        gu = None if gate_up_lora is None else (leaves[2], leaves[3])
        dn = None if down_lora is None else (leaves[4], leaves[5])
        return fn(leaves[0], gate_up, down, ids, leaves[1], gate_up_lora=gu, down_lora=dn)

    out = call(kernel.moe_experts_forward, ours)
    expected = call(moe_experts_lora_reference, ref)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, expected) <= RTOL, f"output: {rel_err(out, expected):.2e}"
    base_only = moe_experts_lora_reference(x, gate_up, down, ids, weights)
    assert rel_err(expected, base_only) > 1e-2  # the LoRA term matters

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    expected.backward(grad_out.double())
    names = ["hidden_states", "top_k_weights", "gate_up A", "gate_up B", "down A", "down B"]
    for name, a, b in zip(names, ours, ref):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == torch.float32, name
        assert b.grad.abs().max() > 0, name
        assert rel_err(a.grad, b.grad) <= RTOL, f"gradient of {name}: {rel_err(a.grad, b.grad):.2e}"
    assert gate_up.grad is None and down.grad is None  # frozen base

    unrouted = sorted(set(range(gate_up.shape[0])) - set(ids.flatten().tolist()))
    if shape[5] == "skip":
        assert unrouted, "the 'skip' routing should leave experts without tokens"
    for name, leaf in zip(names[2:], ours[2:]):
        for e in unrouted:
            if leaf is not None:
                assert torch.all(leaf.grad[e] == 0), f"{name} of expert {e} (no tokens) has a gradient"


def test_moe_experts_forward_lora_trainable_base_and_peft_layout(kernel):
    """Base trainable too (every floating input gets its gradient), and the factors given the
    way the block gets them from PEFT: views of `lora_A.weight` (E·r, in) and
    `lora_B.weight` (out, E·r) (expert index fastest in B), B times the scaling."""
    num_tokens, hidden, inter, num_experts, top_k, rank, scaling = 31, 40, 24, 6, 2, 4, 1.7
    x, gate_up, down, ids, weights, gu, dn = _functional_inputs(
        num_tokens, hidden, inter, num_experts, top_k, "random", rank, rank
    )

    def to_peft(a, b):  # (E, r, in), (E, out, r) -> PEFT's lora_A.weight, lora_B.weight
        return a.reshape(-1, a.shape[-1]), (b / scaling).permute(1, 2, 0).reshape(b.shape[1], -1)

    def from_peft(a_w, b_w):  # what a ParamWrapper's get_delta_factors views, scaling into B
        b = b_w.reshape(b_w.shape[0], -1, num_experts).permute(2, 0, 1)
        return a_w.reshape(num_experts, -1, a_w.shape[-1]), b * scaling

    tensors = [x, gate_up, down, weights, *to_peft(*gu), *to_peft(*dn)]
    ours, ref = _leaves(tensors), _leaves(tensors, torch.float64)

    def call(fn, leaves):
        x_, gate_up_, down_, weights_, *peft = leaves
        loras = dict(gate_up_lora=from_peft(*peft[:2]), down_lora=from_peft(*peft[2:]))
        return fn(x_, gate_up_, down_, ids, weights_, **loras)

    out = call(kernel.moe_experts_forward, ours)
    expected = call(moe_experts_lora_reference, ref)
    assert rel_err(out, expected) <= RTOL
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out)
    expected.backward(grad_out.double())
    names = ["hidden_states", "gate_up_proj", "down_proj", "top_k_weights"]
    names += [f"{tensor} lora_{factor}" for tensor in ("gate_up", "down") for factor in "AB"]
    for name, a, b in zip(names, ours, ref):
        assert a.grad is not None, name
        assert rel_err(a.grad, b.grad) <= RTOL, f"gradient of {name}: {rel_err(a.grad, b.grad):.2e}"


def test_lora_backward_reuses_the_forwards_projected_rows(kernel, monkeypatch):
    """The gate_up LoRA term's input x @ A^T is computed once, in the forward, and saved for the
    gradient of B: the backward projects only dh, dOut and w_act (and gives the reference's
    gradients, test above)."""
    x, gate_up, down, ids, weights, gu, dn = _functional_inputs(29, 32, 24, 4, 2, "random", 4, 4, seed=5)
    a_gu, b_gu, a_dn, b_dn = _leaves([*gu, *dn])
    projected = []
    original = kernel.functional._lora_project
    monkeypatch.setattr(kernel.functional, "_lora_project",
                        lambda a, factor, *args, **kw: projected.append(factor) or original(a, factor, *args, **kw))
    out = kernel.moe_experts_forward(x, gate_up, down, ids, weights, gate_up_lora=(a_gu, b_gu), down_lora=(a_dn, b_dn))
    assert [f is a_gu for f in projected] == [True, False]  # forward: x @ A_gate_up^T, act @ A_down^T
    projected.clear()
    out.sum().backward()
    assert len(projected) == 3 and not any(f is a_gu for f in projected), projected
    assert all(t.grad is not None for t in (a_gu, b_gu, a_dn, b_dn))


def test_moe_experts_forward_lora_no_grad(kernel):
    """Inference (no_grad, inference_mode) with LoRA: the reference's output, deterministic."""
    x, gate_up, down, ids, weights, gu, dn = _functional_inputs(1, 48, 32, 8, 2, "random", 8, 8, seed=3)
    expected = moe_experts_lora_reference(x, gate_up, down, ids, weights, gu, dn)
    with torch.no_grad():
        out = kernel.moe_experts_forward(x, gate_up, down, ids, weights, gate_up_lora=gu, down_lora=dn)
    assert rel_err(out, expected) <= RTOL
    with torch.inference_mode():
        again = kernel.moe_experts_forward(x, gate_up, down, ids, weights, gate_up_lora=gu, down_lora=dn)
    assert torch.equal(again, out)


# ================================================================ model level, against PEFT


# Triton's interpreter costs about the same per block whatever the token count, and its cost
# grows with the number of experts: the model-level cases use the tiny model with 4 experts
# (top-2 still routes unevenly), most of them with one decoder layer.
SMALL = dict(num_experts=4)


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe-1-layer")
    write_tiny_checkpoint(path, num_hidden_layers=1, **SMALL)
    return path


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe-2-layers")
    write_tiny_checkpoint(path, num_hidden_layers=2, **SMALL)
    return path


def _checkpoint(request, layers: int):
    name = {1: "one_layer_checkpoint", 2: "two_layer_checkpoint"}[layers]
    return request.getfixturevalue(name), layers


def _lora_config(r=4, lora_alpha=8, target_parameters=tuple(EXPERT_TARGETS), **kwargs):
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_parameters=list(target_parameters), **kwargs)


def _randomize_lora(model, seed=0):
    """Deterministic non-zero LoRA weights, by parameter name, so that two models with the same
    adapters get the same values whatever the order of kernelize and get_peft_model. B@A is
    about half the base weight (B is zero at PEFT's default init: LoRA would do nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        num_experts = model.get_base_model().config.num_experts
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
            elif ".lora_B." in name:
                # experts' lora_B is (out, E·r): each expert uses r of those columns
                rank = param.shape[1] // num_experts if ".mlp.experts." in name else param.shape[1]
                param.copy_(0.5 * torch.randn(param.shape, generator=generator) / math.sqrt(rank))


def _peft_pair(kernel, path, config, order, mode=Mode.TRAINING, train=True, seed=0):
    """(reference, ours): PEFT models of the same checkpoint with the same adapter weights;
    ours kernelized before or after get_peft_model, the reference never kernelized."""
    ref = get_peft_model(load_tiny(path), copy.deepcopy(config))
    if order == "before":
        ours = get_peft_model(kernelize_moe(load_tiny(path), mode), copy.deepcopy(config))
    else:
        ours = kernelize_moe(get_peft_model(load_tiny(path), copy.deepcopy(config)), mode)
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(ours))
    for model in (ref, ours):
        _randomize_lora(model, seed)
        model.train(train)
    return ref, ours


def _expert_wrappers(model):
    return [m for m in model.modules() if isinstance(m, ParamWrapper) and m.parameter_name in EXPERT_PARAMS]


@contextlib.contextmanager
def _observe(kernel):
    """kernel_activity (the package's ops dispatched, its Triton kernels launched), plus
    "folds": the calls that ask PEFT to build or fold W + s·B@A for an experts tensor."""
    names = ("get_delta_weight", "get_delta_factors", "_activate_lora")
    originals = {name: getattr(ParamWrapper, name) for name in names}
    folds = []

    def counting(name, original):
        def method(self, *args, **kwargs):
            if self.parameter_name in EXPERT_PARAMS:
                folds.append(f"{name}({self.parameter_name})")
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(ParamWrapper, name, counting(name, original))
    try:
        with kernel_activity(kernel) as activity:
            activity["folds"] = folds
            yield activity
    finally:
        for name, original in originals.items():
            setattr(ParamWrapper, name, original)


def _assert_fused(fwd, bwd=None, *, forwards, backwards=0, folds_allowed=False):
    """Our path ran: one experts_fwd per block forward (none of the backward op), one
    experts_bwd per block backward, and PEFT never built W + s·B@A for the experts."""
    assert fwd["ops"].get("experts_fwd") == forwards, (
        f"the kernelized block did not run the package's experts_fwd once per block ({forwards}) "
        f"(did it fall back to PEFT's experts forward?): {fwd}"
    )
    assert "experts_bwd" not in fwd["ops"], fwd
    if not folds_allowed:
        assert not fwd["folds"], f"PEFT was asked to build W + s·B@A in the forward: {fwd['folds']}"
    if triton_expected("cpu"):
        assert fwd["launches"], f"no Triton kernel of the package was launched: {fwd}"
    if bwd is not None:
        assert bwd["ops"].get("experts_bwd") == backwards, f"experts_bwd did not run once per block: {bwd}"
        assert not bwd["folds"], f"PEFT was asked to build W + s·B@A in the backward: {bwd['folds']}"


def _batch(batch=2, seq_len=9):
    return sample_batch(TINY_CONFIG["vocab_size"], batch, seq_len)


def _embeds(model, input_ids):
    """The input embeddings as a leaf, so their gradient (the input's) is compared too."""
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids).detach()


def _step(model, batch, embeds, kernel=None):
    """One forward + backward on inputs_embeds. -> out, {name: grad} of every parameter that
    requires grad and of the input embeddings, and what ran in each direction."""
    _, attention_mask, labels = batch
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_()
    observe = (lambda: _observe(kernel)) if kernel is not None else contextlib.nullcontext
    with observe() as fwd:
        out = model(inputs_embeds=x, attention_mask=attention_mask, labels=labels)
    with observe() as bwd:
        out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = x.grad
    return out, grads, fwd, bwd


def _assert_step_matches(out, grads, ref_out, ref_grads, expect_lora_grads=True):
    assert rel_err(out.logits, ref_out.logits) <= RTOL, f"logits: {rel_err(out.logits, ref_out.logits):.2e}"
    assert rel_err(out.loss, ref_out.loss) <= RTOL, "loss"
    assert out.aux_loss is not None and rel_err(out.aux_loss, ref_out.aux_loss) <= RTOL, "aux_loss"
    assert grads.keys() == ref_grads.keys()
    if expect_lora_grads:
        assert any(".lora_A." in name for name in ref_grads) and any(".lora_B." in name for name in ref_grads)
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and grads[name] is not None, f"no gradient for {name}"
        assert ref_grad.abs().max() > 0, f"zero reference gradient for {name}"
        err = rel_err(grads[name], ref_grad)
        assert err <= RTOL, f"gradient of {name}: {err:.2e}"


def _logits(model, batch, observe=None):
    input_ids, attention_mask, _ = batch
    with torch.no_grad(), observe() if observe else contextlib.nullcontext() as activity:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits, activity


TRAINING_CASES = [
    # (order of kernelize and get_peft_model, decoder layers, LoraConfig arguments)
    pytest.param("before", 2, dict(r=4, lora_alpha=8), id="before-r4", marks=pytest.mark.kernels_ci),
    pytest.param("after", 1, dict(r=4, lora_alpha=8), id="after-r4", marks=pytest.mark.kernels_ci),
    # rslora, and the wrappers nested the other way round (gate_up_proj outermost)
    pytest.param(
        "after", 1, dict(r=8, lora_alpha=4, use_rslora=True, target_parameters=EXPERT_TARGETS[::-1]),
        id="after-r8-rslora",
    ),  # fmt: skip
    pytest.param(
        "before", 1, dict(r=2, lora_alpha=5, target_parameters=["mlp.experts.down_proj"]), id="before-r2-down-only"
    ),
]


@pytest.mark.parametrize("order,layers,lora", TRAINING_CASES)
def test_training_matches_peft(kernel, request, order, layers, lora):
    path, num_layers = _checkpoint(request, layers)
    ref, ours = _peft_pair(kernel, path, _lora_config(**lora), order)
    assert len(_expert_wrappers(ours)) == num_layers * len(lora.get("target_parameters", EXPERT_TARGETS))
    batch = _batch()
    embeds = _embeds(ref, batch[0])

    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    _assert_fused(fwd, bwd, forwards=num_layers, backwards=num_layers)
    _assert_step_matches(out, grads, ref_out, ref_grads)

    with torch.no_grad(), ref.disable_adapter():  # the adapters change the model materially
        base_logits = ref(inputs_embeds=embeds, attention_mask=batch[1]).logits
    assert rel_err(ref_out.logits, base_logits) > 1e-2


def test_two_adapters_match_peft(kernel, one_layer_checkpoint):
    """A second adapter (other rank, alpha, rslora): alone after set_adapter, then both active."""
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(r=4, lora_alpha=8), "after", seed=0)
    second = _lora_config(r=8, lora_alpha=16, use_rslora=True)
    for model in (ref, ours):
        model.add_adapter("second", copy.deepcopy(second))
        _randomize_lora(model, seed=1)  # both adapters, same values in both models
    batch = _batch()
    embeds = _embeds(ref, batch[0])

    for model in (ref, ours):
        model.set_adapter("second")
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    assert all(".second." in name for name in grads if name != "inputs_embeds")
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_step_matches(out, grads, ref_out, ref_grads)

    for model in (ref, ours):
        model.base_model.set_adapter(["default", "second"])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    assert any(".default." in name for name in grads) and any(".second." in name for name in grads)
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_step_matches(out, grads, ref_out, ref_grads)


def test_disable_adapter_matches_peft(kernel, one_layer_checkpoint):
    """Inside `disable_adapter()` the base model (input gradient only, the LoRA tensors are
    frozen by PEFT there), still through our ops; after it, base + LoRA again."""
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(), "before")
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    with ref.disable_adapter(), ours.disable_adapter():
        ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
        out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    assert list(grads) == ["inputs_embeds"]
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_step_matches(out, grads, ref_out, ref_grads, expect_lora_grads=False)
    base = load_tiny(one_layer_checkpoint)
    assert rel_err(out.logits, base(inputs_embeds=embeds, attention_mask=batch[1]).logits) <= RTOL

    ref_logits, _ = _logits(ref, batch)
    logits, activity = _logits(ours, batch, lambda: _observe(kernel))
    _assert_fused(activity, forwards=1)
    assert rel_err(logits, ref_logits) <= RTOL
    assert rel_err(logits, out.logits) > 1e-2


def test_merge_and_unmerge_match_peft(kernel, one_layer_checkpoint):
    """merge_adapter(): the merged base only (through our ops); disable_adapter() while merged
    (PEFT unmerges in the forward); unmerge_adapter(): base + LoRA again."""
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(), "after", mode=Mode.INFERENCE, train=False)
    batch = _batch()
    observe = lambda: _observe(kernel)  # noqa: E731

    for model in (ref, ours):
        model.merge_adapter()
    assert all(w.merged for w in _expert_wrappers(ours))
    ref_logits, _ = _logits(ref, batch)
    logits, activity = _logits(ours, batch, observe)
    _assert_fused(activity, forwards=1)
    assert rel_err(logits, ref_logits) <= RTOL

    with ref.disable_adapter(), ours.disable_adapter():
        ref_logits, _ = _logits(ref, batch)
        logits, activity = _logits(ours, batch, observe)
    _assert_fused(activity, forwards=1, folds_allowed=True)  # unmerging builds B@A, as in PEFT
    assert rel_err(logits, ref_logits) <= RTOL
    ref_logits, _ = _logits(ref, batch)
    logits, activity = _logits(ours, batch, observe)
    _assert_fused(activity, forwards=1, folds_allowed=True)
    assert rel_err(logits, ref_logits) <= RTOL

    for model in (ref, ours):
        if not all(w.merged for w in _expert_wrappers(model)):
            model.merge_adapter()
        model.unmerge_adapter()
    assert not any(w.merged for w in _expert_wrappers(ours))
    ref_logits, _ = _logits(ref, batch)
    logits, activity = _logits(ours, batch, observe)
    _assert_fused(activity, forwards=1)
    assert rel_err(logits, ref_logits) <= RTOL


def test_merge_and_unload_matches_peft(kernel, one_layer_checkpoint):
    """merge_and_unload(): a plain model with merged experts, still kernelized."""
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(), "before", mode=Mode.INFERENCE, train=False)
    batch = _batch()
    ref_merged, merged = ref.merge_and_unload(), ours.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    assert all(runs_kernel_layer(block, kernel) for block in moe_blocks(merged))
    ref_logits, _ = _logits(ref_merged, batch)
    logits, activity = _logits(merged, batch, lambda: _observe(kernel))
    _assert_fused(activity, forwards=1)
    assert rel_err(logits, ref_logits) <= RTOL


def test_inference_and_generate_match_peft(kernel, one_layer_checkpoint):
    """eval() + no_grad forward, then greedy generate with the KV cache (T = 1 per decode step)."""
    config = _lora_config(r=8, lora_alpha=16)
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, config, "before", mode=Mode.INFERENCE, train=False)
    batch = _batch()
    ref_logits, _ = _logits(ref, batch)
    logits, activity = _logits(ours, batch, lambda: _observe(kernel))
    _assert_fused(activity, forwards=1)
    assert rel_err(logits, ref_logits) <= RTOL

    prompt, new_tokens = batch[0][:1, :5], 3
    generate = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ref_tokens = ref.generate(input_ids=prompt, **generate)
    with _observe(kernel) as activity:
        tokens = ours.generate(input_ids=prompt, **generate)
    _assert_fused(activity, forwards=new_tokens)
    assert tokens.shape == (1, prompt.shape[1] + new_tokens)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param(dict(target_modules=["q_proj", "v_proj"]), id="attention+experts"),
        pytest.param(dict(target_modules=["q_proj", "v_proj"], target_parameters=[]), id="attention-only"),
    ],
)
def test_attention_lora_beside_experts(kernel, one_layer_checkpoint, lora):
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(**lora), "after")
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    assert any("q_proj.lora_A" in name for name in grads) and any("v_proj.lora_B" in name for name in grads)
    assert any(".mlp.experts." in name for name in grads) == bool(lora.get("target_parameters", True))
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_step_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize(
    "lora",
    [
        # PEFT wraps the router (Qwen3MoeTopKRouter holds a raw `weight` Parameter) in a
        # ParamWrapper either way.
        pytest.param(dict(target_modules=["gate"]), id="router-target_modules"),
        pytest.param(dict(target_parameters=["mlp.gate.weight", *EXPERT_TARGETS]), id="router-target_parameters"),
    ],
)
def test_router_lora_beside_experts(kernel, one_layer_checkpoint, lora):
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(**lora), "before")
    router = [m for m in ours.modules() if isinstance(m, ParamWrapper) and m.parameter_name == "weight"]
    assert len(router) == 1 and type(router[0].get_base_layer()).__name__ == "Qwen3MoeTopKRouter"
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    ref_out, ref_grads, _, _ = _step(ref, batch, embeds)
    out, grads, fwd, bwd = _step(ours, batch, embeds, kernel)
    assert any(".mlp.gate.lora_A." in name for name in grads) and any(".mlp.experts." in name for name in grads)
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_step_matches(out, grads, ref_out, ref_grads)


# ================================================================ save / load


def _train_one_step(model, batch, embeds, kernel=None):
    """One SGD step on the LoRA tensors. -> what ran in the forward and in the backward."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _, _, fwd, bwd = _step(model, batch, embeds, kernel)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return fwd, bwd


def _adapter_tensors(folder):
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_adapter_trained_with_kernel_loads_without_it(kernel, one_layer_checkpoint, tmp_path):
    """An adapter trained (one step) through the kernel is saved by PEFT as usual: the same
    keys and shapes as one trained without it, the same values up to the gradients' rounding,
    and it loads into a model without the kernel with the same outputs."""
    ref, ours = _peft_pair(kernel, one_layer_checkpoint, _lora_config(), "before")
    batch = _batch()
    embeds = _embeds(ref, batch[0])
    _train_one_step(ref, batch, embeds)
    fwd, bwd = _train_one_step(ours, batch, embeds, kernel)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    saved, ref_saved = _adapter_tensors(tmp_path / "ours"), _adapter_tensors(tmp_path / "ref")
    assert saved.keys() == ref_saved.keys() and any("experts" in key for key in saved)
    for key, tensor in saved.items():
        assert tensor.shape == ref_saved[key].shape and rel_err(tensor, ref_saved[key]) <= RTOL, key

    ours.eval()
    logits, activity = _logits(ours, batch, lambda: _observe(kernel))
    loaded = PeftModel.from_pretrained(load_tiny(one_layer_checkpoint), tmp_path / "ours").eval()
    loaded_logits, _ = _logits(loaded, batch)
    assert rel_err(loaded_logits, logits) <= RTOL
    _assert_fused(fwd, bwd, forwards=1, backwards=1)
    _assert_fused(activity, forwards=1)


def test_adapter_trained_without_kernel_loads_into_it(kernel, one_layer_checkpoint, tmp_path):
    """The reverse: an adapter trained and saved without the kernel loads (PeftModel.from_pretrained)
    into a kernelized model and gives the same outputs through our path."""
    ref = get_peft_model(load_tiny(one_layer_checkpoint), _lora_config()).train()
    _randomize_lora(ref)
    batch = _batch()
    _train_one_step(ref, batch, _embeds(ref, batch[0]))
    ref.save_pretrained(tmp_path / "ref")
    ref.eval()
    ref_logits, _ = _logits(ref, batch)

    base = kernelize_moe(load_tiny(one_layer_checkpoint).eval(), Mode.INFERENCE)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ref").eval()
    assert len(_expert_wrappers(loaded)) == 2
    logits, activity = _logits(loaded, batch, lambda: _observe(kernel))
    assert rel_err(logits, ref_logits) <= RTOL
    _assert_fused(activity, forwards=1)


# ================================================================ lora_dropout


@pytest.mark.kernels_ci
@pytest.mark.parametrize("order", ["before", "after"])
def test_lora_dropout_follows_peft(kernel, one_layer_checkpoint, order):
    """PEFT refuses lora_dropout != 0 on target_parameters (x cannot be factored out of
    B(A(dropout(x))) for a parameter): get_peft_model raises, kernelized or not, with the
    same message. Dropout on target_modules beside them is refused too (one config)."""
    for lora in (dict(lora_dropout=0.1), dict(lora_dropout=0.1, target_modules=["q_proj"])):
        with pytest.raises(ValueError) as plain:
            get_peft_model(load_tiny(one_layer_checkpoint), _lora_config(**lora))
        base = load_tiny(one_layer_checkpoint)
        with pytest.raises(ValueError) as kernelized:
            if order == "before":
                get_peft_model(kernelize_moe(base, Mode.TRAINING), _lora_config(**lora))
            else:
                kernelize_moe(get_peft_model(base, _lora_config(**lora)), Mode.TRAINING)
        assert "lora_dropout" in str(kernelized.value)
        assert str(kernelized.value) == str(plain.value)


@pytest.mark.parametrize("with_down_lora", [True, False], ids=["both", "gate_up-only"])
def test_moe_experts_forward_lora_compiles_fullgraph(kernel, with_down_lora):
    """The custom ops' fake implementations cover the LoRA inputs: torch.compile traces
    forward and backward without graph breaks and matches eager bit for bit."""
    x, gate_up, down, ids, weights, gate_up_lora, down_lora = _functional_inputs(21, 32, 24, 4, 2, "random", 4, 4)
    down_lora = down_lora if with_down_lora else None

    def run(fn):
        leaves = _leaves([x, weights, *gate_up_lora, *(down_lora or ())])
        lora_down = (leaves[4], leaves[5]) if down_lora else None
        out = fn(leaves[0], gate_up, down, ids, leaves[1], gate_up_lora=(leaves[2], leaves[3]), down_lora=lora_down)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [out, *grads]

    torch._dynamo.reset()
    compiled = torch.compile(kernel.moe_experts_forward, fullgraph=True, backend="aot_eager")
    for a, b in zip(run(compiled), run(kernel.moe_experts_forward)):
        assert torch.equal(a, b)
