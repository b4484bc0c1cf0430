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


@pytest.mark.parametrize("use_triton", [True, False])
def test_route_out_of_range_ids_are_never_routed(kernel, use_triton):
    ids = torch.tensor([[0, 4], [-1, 2], [2, 9]])
    r = kernel.route(ids, 4, 16, use_triton)
    # Ids outside [0, E) sort after offsets[E], in flat order, and no tile covers them.
    assert r.expert_offsets.tolist() == [0, 1, 1, 3, 3]
    assert r.sort_idx.tolist() == [0, 3, 4, 1, 2, 5]
    assert r.sorted_token.tolist() == [0, 1, 2, 0, 1, 2]
    assert r.tile_expert.tolist() == [0, 2, -1, -1, -1]
    assert r.tile_row_start.tolist() == [0, 1, 0, 0, 0]


def _assert_same_routing(a, b):
    for name in ("sort_idx", "sorted_token", "expert_offsets", "tile_expert", "tile_row_start"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32, name
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m,low,high",
    [
        (375, 128, 8, 16, 0, 128),  # 3000 rows: several row blocks of the Triton kernels (BLOCK_ROWS each)
        (300, 6, 2, 16, 0, 6),  # E not a power of two
        (200, 60, 4, 32, 0, 60),
        (150, 512, 8, 16, 0, 512),  # 512 experts: 1200 rows, most experts with 0-5 rows
        (700, 6, 2, 16, -2, 9),  # 1400 rows, out-of-range ids in both blocks
        (128, 16, 8, 16, -1, 17),  # 1024 rows: the largest routed in one launch, out-of-range ids
        (129, 16, 8, 32, 0, 16),  # 1032 rows: the smallest routed in three launches
        (0, 60, 8, 16, 0, 60),
        (1, 3, 1, 16, 0, 3),
    ],
)
def test_route_triton_matches_torch(kernel, num_tokens, num_experts, top_k, block_m, low, high):
    g = torch.Generator().manual_seed(num_tokens + num_experts)
    ids = torch.randint(low, high, (num_tokens, top_k), generator=g)
    r = kernel.route(ids, num_experts, block_m, True)
    _assert_same_routing(r, kernel.route(ids, num_experts, block_m, False))
    assert r.tile_expert.numel() == (ids.numel() + block_m - 1) // block_m + num_experts
    if low >= 0 and high <= num_experts:
        _check_routing(r, ids, num_experts)
    # Same result for int32 ids.
    _assert_same_routing(r, kernel.route(ids.int(), num_experts, block_m, True))


def test_route_large_batches_block_size(kernel, monkeypatch):
    """Past SMALL_ROUTING rows the histogram / scatter programs take BLOCK_ROWS rows each: the
    same sort as the torch path (the threshold lowered so that a small batch takes that path)."""
    routing = kernel.routing
    assert routing.BLOCK_ROWS != routing.SMALL_BLOCK_ROWS
    monkeypatch.setattr(routing, "SMALL_ROUTING", 0)
    ids = torch.randint(-1, 41, (500, 6), generator=torch.Generator().manual_seed(5))
    _assert_same_routing(kernel.route(ids, 40, 16, True), kernel.route(ids, 40, 16, False))


@pytest.mark.parametrize(
    "m_sizes,num_rows",
    [
        ([3, 0, 17, 1, 0, 2], 23),
        ([0, 0, 0], 0),
        ([5, -3, 100, 2], 20),  # unchecked sizes: clamped to [0, num_rows], offsets to num_rows
        ([2**40, 3, 1], 8),
    ],
)
def test_route_from_counts_triton_matches_torch(kernel, m_sizes, num_rows):
    route_from_counts = kernel.routing.route_from_counts
    m_sizes = torch.tensor(m_sizes)
    r = route_from_counts(m_sizes, num_rows, 4, True)
    _assert_same_routing(r, route_from_counts(m_sizes, num_rows, 4, False))
    if m_sizes.max() < 2**31:  # same result for int32 sizes
        _assert_same_routing(r, route_from_counts(m_sizes.int(), num_rows, 4, True))
    offsets = r.expert_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] <= num_rows and offsets == sorted(offsets)


def test_launch_sizes_match_triton(kernel):
    """The launch code's plain cdiv / next_power_of_2 (sizes.py) give triton's values."""
    import triton

    sizes = kernel.sizes
    for n in [*range(0, 1100), 4095, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert sizes.next_power_of_2(n) == triton.next_power_of_2(n), n
        for block in (1, 3, 16, 64, 128, 256):
            assert sizes.cdiv(n, block) == triton.cdiv(n, block), (n, block)
