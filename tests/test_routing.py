import pytest
import torch

from reference import random_routing


def _check_routing(r, top_k_index, num_experts):
    flat = top_k_index.reshape(-1)
    sort_idx = r.sort_idx.long()
    # A permutation of the (token, k) pairs, sorted by expert, stable within an expert.
    assert torch.equal(torch.sort(sort_idx).values, torch.arange(flat.numel()))
    sorted_ids = flat[sort_idx]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1])
    assert torch.equal(r.sorted_token.long(), sort_idx // top_k_index.shape[1])
    counts = torch.bincount(flat, minlength=num_experts)
    expected_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    assert torch.equal(r.expert_offsets.long(), expected_offsets)
    for e in range(num_experts):
        rows = sort_idx[expected_offsets[e] : expected_offsets[e + 1]]
        assert torch.all(flat[rows] == e)
        assert torch.all(rows[1:] > rows[:-1])  # stable
    # Each row is covered by exactly one tile of its own expert; unused tiles are -1.
    covered = torch.zeros(flat.numel(), dtype=torch.long)
    used = r.tile_expert >= 0
    n_used = int(used.sum())
    assert torch.all(used[:n_used]) and not torch.any(used[n_used:])
    for expert, start in zip(r.tile_expert[:n_used].tolist(), r.tile_row_start[:n_used].tolist()):
        end = min(start + r.block_m, int(expected_offsets[expert + 1]))
        assert start >= expected_offsets[expert] and start < end
        covered[start:end] += 1
    assert torch.all(covered == 1)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,mode,block_m",
    [(37, 8, 3, "random", 16), (50, 8, 2, "skip", 16), (40, 6, 2, "one", 32), (1, 4, 2, "random", 16), (0, 5, 2, "random", 16)],
)
def test_route(kernel, use_triton, num_tokens, num_experts, top_k, mode, block_m):
    g = torch.Generator().manual_seed(num_tokens)
    ids, _ = random_routing(num_tokens, num_experts, top_k, mode, generator=g)
    r = kernel.route(ids, num_experts, block_m, use_triton)
    assert r.tile_expert.numel() == (ids.numel() + block_m - 1) // block_m + num_experts
    _check_routing(r, ids, num_experts)


def test_route_out_of_range_ids_are_never_routed(kernel):
    ids = torch.tensor([[0, 4], [-1, 2], [2, 9]])
    r = kernel.route(ids, 4, 16, True)
    offsets = r.expert_offsets.tolist()
    routed = r.sort_idx[offsets[0] : offsets[-1]].tolist()
    assert sorted(routed) == [0, 3, 4]  # positions of ids 0, 2, 2
