import pytest
import torch

from reference import random_routing


def _valid(num_tokens=6, hidden=16, inter=8, num_experts=4, top_k=2):
    ids, weights = random_routing(num_tokens, num_experts, top_k)
    return dict(
        hidden_states=torch.randn(num_tokens, hidden),
        gate_up_proj=torch.randn(num_experts, 2 * inter, hidden),
        down_proj=torch.randn(num_experts, hidden, inter),
        top_k_index=ids,
        top_k_weights=weights,
    )


def _replace(**changes):
    args = _valid()
    args.update(changes)
    return args


BAD_INPUTS = [
    (dict(hidden_states=torch.randn(2, 3, 16)), ValueError, "hidden_states"),
    (dict(gate_up_proj=torch.randn(4, 16, 17)), ValueError, "gate_up_proj"),
    (dict(gate_up_proj=torch.randn(4, 15, 16)), ValueError, "gate_up_proj"),
    (dict(down_proj=torch.randn(4, 16, 9)), ValueError, "down_proj"),
    (dict(down_proj=torch.randn(3, 16, 8)), ValueError, "down_proj"),
    (dict(top_k_index=torch.zeros(5, 2, dtype=torch.long)), ValueError, "top_k_index"),
    (dict(top_k_index=torch.zeros(6, 2)), TypeError, "top_k_index"),
    (dict(top_k_weights=torch.rand(6, 3)), ValueError, "top_k_weights"),
    (dict(gate_up_proj=torch.randn(4, 16, 16, dtype=torch.float16)), TypeError, "gate_up_proj"),
    (dict(hidden_states=torch.randn(6, 16).to(torch.int32)), TypeError, "hidden_states"),
    (dict(down_proj="not a tensor"), TypeError, "down_proj"),
    (dict(top_k_index=torch.full((6, 2), 4)), ValueError, "top_k_index"),
    (dict(top_k_index=torch.full((6, 2), -1)), ValueError, "top_k_index"),
    (dict(down_proj=torch.randn(4, 16, 8, device="meta")), ValueError, "down_proj"),
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("changes,error,name", BAD_INPUTS)
def test_moe_experts_forward_rejects(kernel, changes, error, name):
    with pytest.raises(error, match=name):
        kernel.moe_experts_forward(**_replace(**changes))


@pytest.mark.parametrize(
    "args,error,name",
    [
        ((torch.randn(10, 8), torch.randn(2, 4, 8), torch.tensor([3, 3])), ValueError, "m_sizes"),
        ((torch.randn(10, 8), torch.randn(2, 4, 8), torch.tensor([-1, 11])), ValueError, "m_sizes"),
        ((torch.randn(10, 8), torch.randn(2, 4, 7), torch.tensor([5, 5])), ValueError, "weight"),
        ((torch.randn(10, 8), torch.randn(3, 4, 8), torch.tensor([5, 5])), ValueError, "m_sizes"),
        ((torch.randn(10, 8), torch.randn(2, 4, 8).half(), torch.tensor([5, 5])), TypeError, "weight"),
        ((torch.randn(10, 8), torch.randn(2, 4, 8), torch.tensor([5.0, 5.0])), TypeError, "m_sizes"),
    ],
)
def test_grouped_gemm_rejects(kernel, args, error, name):
    with pytest.raises(error, match=name):
        kernel.grouped_gemm(*args)


def test_non_silu_activation_rejected(kernel):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, hidden_act="gelu"))
    args = _valid()
    with pytest.raises(ValueError, match="SiLU"):
        kernel.experts_forward(experts, args["hidden_states"], args["top_k_index"], args["top_k_weights"])
