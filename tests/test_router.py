"""The router's top-k softmax (router.py) and the gate call of the layers (gate.py), against
Transformers' own routers and a float64 reference.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1). Random float32
logits never tie, so the selected experts must equal Transformers'; with ties (integer
logits) the kernel's documented rule, the lower expert id first, is checked against a
stable sort.
"""

import pytest
import torch

pytest.importorskip("transformers")

from reference import rel_err  # noqa: E402
from tiny_model import kernel_activity  # noqa: E402

# (module, router class) of each family member; True where the router reads norm_topk_prob.
ROUTERS = [
    ("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", True),
    ("qwen3_next", "Qwen3NextTopKRouter", "Qwen3NextConfig", True),
    ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextTopKRouter", "Qwen3OmniMoeTextConfig", True),
    ("qwen3_5_moe", "Qwen3_5MoeTopKRouter", "Qwen3_5MoeTextConfig", False),
    ("qwen3_vl_moe", "Qwen3VLMoeTextTopKRouter", "Qwen3VLMoeTextConfig", False),
]


def _router(module, cls_name, config_name, hidden, num_experts, top_k, norm, seed=0):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    configuration = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    config = getattr(configuration, config_name)(
        hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm
    )
    router = getattr(modeling, cls_name)(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, hidden, generator=torch.Generator().manual_seed(seed)))
    return router


def _float64_topk(logits, indices, normalize):
    """scores at the given indices from float64 softmax (differentiable in logits)."""
    probs = torch.softmax(logits.double(), dim=-1)
    values = probs.gather(1, indices)
    return values / values.sum(-1, keepdim=True) if normalize else values


def _step(call, router, x, grad):
    router.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    logits, scores, indices = call(router, x)
    # The aux loss reads the logits too: both paths into the router's weight.
    (scores * grad).sum().backward(retain_graph=True)
    logits.square().mean().backward()
    return logits, scores, indices, x.grad, router.weight.grad


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "module,cls_name,config_name,norm",
    [(*r[:3], norm) for r in ROUTERS for norm in ([True, False] if r[3] else [True])],
)
@pytest.mark.parametrize("hook", ["gate's", "global", None])
def test_call_gate_matches_transformers_router(kernel, module, cls_name, config_name, norm, hook):
    """call_gate runs the router's top-k softmax in our kernels (one forward and one backward
    launch) and gives Transformers' outputs and gradients; hooks on the gate, or on every module,
    still see them (without any, the gate's forward is called directly)."""
    router = _router(module, cls_name, config_name, hidden=24, num_experts=12, top_k=3, norm=norm)
    x = torch.randn(2, 19, 24, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(38, 3, generator=torch.Generator().manual_seed(2))
    seen = []

    def record(module, args, output):
        if module is router:
            seen.append(output)

    handle = None
    if hook == "gate's":
        handle = router.register_forward_hook(record)
    elif hook == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with kernel_activity(kernel) as activity:
            ours = _step(kernel.gate.call_gate, router, x, grad)
        ref = _step(type(router).__call__, router, x, grad)
    finally:
        if handle is not None:
            handle.remove()
    assert activity["ops"] == {"router_topk_fwd": 1, "router_topk_bwd": 1}, activity
    assert "forward" not in vars(router)  # the class forward is back
    assert len(seen) == (0 if hook is None else 2)  # ours, then the reference's
    assert hook is None or seen[0][1] is ours[1]
    assert torch.equal(ours[0], ref[0])  # the same linear layer
    assert torch.equal(ours[2], ref[2]) and ours[2].dtype == torch.int64
    assert rel_err(ours[1], ref[1]) < 1e-6
    assert rel_err(ours[3], ref[3]) < 1e-6, "hidden_states gradient"
    assert rel_err(ours[4], ref[4]) < 1e-6, "router weight gradient"


def test_call_gate_leaves_other_forwards_alone(kernel, monkeypatch):
    """A forward installed on the gate instance (Transformers' expert-parallel router plan,
    accelerate's hooks), a subclass with its own forward and tuning.FUSED_ROUTER = False all
    run the gate's own forward, with no launch of ours."""
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    router = _router("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", 24, 12, 3, True)
    ref = router(x)
    installed = router.forward
    router.forward = lambda h: tuple(t * 1 for t in installed(h))  # as install_forward does

    class Subclass(type(router)):
        def forward(self, hidden_states):
            return super().forward(hidden_states)

    subclassed = _router("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", 24, 12, 3, True)
    subclassed.__class__ = Subclass
    with kernel_activity(kernel) as activity:
        for gate in (router, subclassed):
            out = kernel.gate.call_gate(gate, x)
            assert all(torch.equal(a, b) for a, b in zip(out, ref))
        monkeypatch.setattr(kernel.tuning, "FUSED_ROUTER", False)
        plain = _router("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", 24, 12, 3, True)
        assert all(torch.equal(a, b) for a, b in zip(kernel.gate.call_gate(plain, x), ref))
    assert not activity["ops"] and not activity["launches"], activity
    assert vars(router)["forward"] is not None


def test_call_gate_restores_the_class_forward_after_an_error(kernel):
    router = _router("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", 24, 12, 3, True)
    with pytest.raises(RuntimeError):
        kernel.gate.call_gate(router, torch.randn(5, 23))  # wrong hidden size
    assert "forward" not in vars(router)


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,normalize",
    [(37, 8, 3, True), (5, 128, 8, False), (70, 60, 4, True), (3, 512, 10, True), (1, 6, 6, True), (2, 5, 1, False),
     (33, 1, 1, True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_topk_against_float64(kernel, num_tokens, num_experts, top_k, normalize, dtype):
    """Indices equal torch.topk's on the float64 softmax; scores and the logits' gradient
    within a few rounding steps of the float64 values."""
    g = torch.Generator().manual_seed(num_tokens * num_experts)
    logits = (3 * torch.randn(num_tokens, num_experts, generator=g)).to(dtype).requires_grad_()
    dscores = torch.randn(num_tokens, top_k, generator=g).to(dtype)
    scores, indices = kernel.router_topk(logits, top_k, normalize=normalize)
    assert scores.dtype == dtype and scores.shape == indices.shape == (num_tokens, top_k)
    ref_values, ref_indices = torch.softmax(logits.detach().double(), -1).topk(top_k, dim=-1)
    assert torch.equal(indices, ref_indices)
    ref_logits = logits.detach().double().requires_grad_()
    ref_scores = _float64_topk(ref_logits, indices, normalize)
    (scores.double() * dscores.double()).sum().backward()
    (ref_scores * dscores.double()).sum().backward()
    eps = torch.finfo(dtype).eps
    assert (scores.double() - ref_scores).abs().max() <= 2 * eps
    assert rel_err(logits.grad, ref_logits.grad) <= 8 * eps


def test_router_topk_ties_go_to_the_lower_expert(kernel):
    """Integer logits: many exact ties; the selection is that of a stable descending sort."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (40, 16), generator=g).float().requires_grad_()
    scores, indices = kernel.router_topk(logits, 5, normalize=True)
    expected = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(indices, expected)
    dscores = torch.randn(40, 5, generator=g)
    ref_logits = logits.detach().double().requires_grad_()
    ref_scores = _float64_topk(ref_logits, expected, True)
    (scores * dscores).sum().backward()
    (ref_scores * dscores.double()).sum().backward()
    assert rel_err(scores, ref_scores) < 1e-6
    assert rel_err(logits.grad, ref_logits.grad) < 1e-6


def test_router_topk_nan_logits_give_nan_scores(kernel):
    """A token with a NaN logit has NaN probabilities (as in torch's softmax): its scores are NaN
    and its K experts distinct ids in [0, E) (never an id past E, which routing would drop);
    the other tokens are unaffected."""
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(8))
    logits[1, 7] = float("nan")
    logits[3] = float("nan")
    scores, indices = kernel.router_topk(logits, 4, normalize=True)
    ref_scores, ref_indices = kernel.functional._router_topk_torch(logits, 4, True)
    for t in (1, 3):
        assert torch.isnan(scores[t]).all() and torch.isnan(ref_scores[t]).all()
        assert indices[t].unique().numel() == 4 and 0 <= indices[t].min() and indices[t].max() < 12
    ok = torch.tensor([0, 2, 4])
    assert torch.equal(indices[ok], ref_indices[ok]) and rel_err(scores[ok], ref_scores[ok]) < 1e-6


def test_router_topk_reads_strided_logits_and_zero_tokens(kernel):
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(9, 20, generator=g)
    logits = wide[:, 3:15]  # row stride 20, unit stride along the experts
    scores, indices = kernel.router_topk(logits, 4, normalize=False)
    ref_values, ref_indices = torch.softmax(logits, -1).topk(4, dim=-1)
    assert torch.equal(indices, ref_indices) and rel_err(scores, ref_values) < 1e-6
    transposed = torch.randn(12, 9, generator=g).T  # stride 1 along the tokens: copied first
    scores, indices = kernel.router_topk(transposed, 4, normalize=True)
    assert torch.equal(indices, torch.softmax(transposed, -1).topk(4, dim=-1).indices)

    empty = torch.randn(0, 12, requires_grad=True)
    scores, indices = kernel.router_topk(empty, 4, normalize=True)
    assert scores.shape == indices.shape == (0, 4)
    scores.sum().backward()
    assert empty.grad.shape == (0, 12)


def test_router_topk_unused_scores_give_no_gradient(kernel):
    logits = torch.randn(6, 8, requires_grad=True)
    _, indices = kernel.router_topk(logits, 2, normalize=True)
    assert not indices.requires_grad
    (logits.sum() + 0 * indices.sum()).backward()
    assert torch.equal(logits.grad, torch.ones_like(logits))


def test_router_topk_many_experts_take_the_torch_formula(kernel):
    """Above router.MAX_EXPERTS a program would not hold a token's logits: torch computes it."""
    num_experts = kernel.router.MAX_EXPERTS + 7
    logits = torch.randn(3, num_experts, generator=torch.Generator().manual_seed(5))
    with_launches = []
    original = kernel.functional.router_topk_launch
    kernel.functional.router_topk_launch = lambda *a: with_launches.append(a) or original(*a)
    try:
        scores, indices = kernel.router_topk(logits, 2, normalize=True)
    finally:
        kernel.functional.router_topk_launch = original
    assert not with_launches
    values, ref_indices = torch.softmax(logits, -1).topk(2, dim=-1)
    assert torch.equal(indices, ref_indices)
    assert rel_err(scores, values / values.sum(-1, keepdim=True)) < 1e-6


@pytest.mark.parametrize(
    "logits,top_k,error,match",
    [
        (torch.randn(4, 8), 0, ValueError, "top_k must be in"),
        (torch.randn(4, 8), 9, ValueError, "top_k must be in"),
        (torch.randn(4, 8), 2.0, TypeError, "top_k must be an int"),
        (torch.randn(4, 8), True, TypeError, "top_k must be an int"),
        (torch.randn(8), 2, ValueError, "router_logits must have 2 dimensions"),
        (torch.randint(0, 4, (4, 8)), 2, TypeError, "router_logits must have dtype"),
        ([[0.0, 1.0]], 1, TypeError, "router_logits must be a torch.Tensor"),
    ],
)
def test_router_topk_bad_input(kernel, logits, top_k, error, match):
    with pytest.raises(error, match=match):
        kernel.router_topk(logits, top_k, normalize=True)


def test_router_topk_compiles_fullgraph(kernel):
    """Under torch.compile the custom ops (and their fake implementations) run."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: kernel.router_topk(t, 3, normalize=True), fullgraph=True, backend="aot_eager")
    logits = torch.randn(10, 12, generator=torch.Generator().manual_seed(6), requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_()
    scores, indices = compiled(logits)
    ref_scores, ref_indices = kernel.router_topk(ref_logits, 3, normalize=True)
    assert torch.equal(indices, ref_indices) and torch.equal(scores, ref_scores)
    dscores = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    (scores * dscores).sum().backward()
    (ref_scores * dscores).sum().backward()
    assert torch.equal(logits.grad, ref_logits.grad)
