import importlib

import pytest
import torch


def _expand_module(kernel):
    return importlib.import_module(kernel.__name__ + ".expand")


@pytest.mark.parametrize("num_tokens,hidden,num_experts,top_k", [(37, 40, 8, 3), (1, 300, 4, 2), (0, 64, 4, 2),
                                                                  (64, 513, 16, 8)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expand_matches_index_select(kernel, num_tokens, hidden, num_experts, top_k, dtype):
    """Token rows copied to their sorted positions: bit-equal to x[sorted_token] (index_select),
    with ids outside [0, E) (their rows sort past the last expert's and are still written) and
    all of a token's pairs on one expert."""
    expand = _expand_module(kernel)
    g = torch.Generator().manual_seed(num_tokens + hidden)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=g)
    ids[::3, 0] = num_experts  # no expert
    ids[1::5] = 2  # every pair of these tokens on expert 2
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    r = kernel.route(ids, num_experts, 16, True)
    sorted_pos = expand.sorted_positions(r)
    assert torch.equal(sorted_pos[r.sort_idx.long()], torch.arange(ids.numel(), dtype=torch.int32))
    out = expand.expand_launch(x, sorted_pos)
    assert out.shape == (num_tokens * top_k, hidden)
    assert torch.equal(out, x.index_select(0, r.sorted_token))
