"""The grouped GEMM kernels one option at a time, against float64 torch on the same routing.

Each case launches one kernel of grouped_gemm/ directly (routed GEMM, SwiGLU GEMM, weight
gradient) on tiny shapes with a routing that leaves an expert without rows and sizes that
are not multiples of the tiles. NF4 operands are random codes and absmax, dequantized here
from the NF4 code values.
"""

import importlib
from dataclasses import replace

import pytest
import torch

from reference import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
NUM_TOKENS, TOP_K, NUM_EXPERTS, RANK = 13, 2, 4, 5


def _routing(kernel, block_m, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 1, 3])[torch.randint(0, 3, (NUM_TOKENS, TOP_K), generator=g)]  # expert 2: no rows
    return kernel.route(ids.to(device), NUM_EXPERTS, block_m, True)


def _row_experts(r):
    """Expert of each sorted row."""
    rows = torch.arange(r.sort_idx.numel())
    return torch.searchsorted(r.expert_offsets.long().cpu(), rows, right=True) - 1


def _rand(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _nf4(kernel, shape, dtype, g, scale, blocksize=64):
    """(Nf4Weight of random codes and absmax around scale, the dense float64 tensor it stands
    for with each value rounded to dtype, as the kernels dequantize)."""
    numel = shape[0] * shape[1] * shape[2]
    codes = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=g)
    absmax = (torch.rand(-(-numel // blocksize), generator=g) + 0.5) * scale
    nibbles = torch.stack([codes >> 4, codes & 15], 1).flatten()[:numel].long()
    values = kernel.quant.NF4_CODE[nibbles] * absmax.repeat_interleave(blocksize)[:numel]
    dense = values.to(dtype).double().reshape(shape)
    return kernel.functional.Nf4Weight(codes, absmax, tuple(shape), dtype, blocksize), dense


def _config(kernel, block_n=32, block_k=32, persistent=0, **options):
    fields = dict(block_n=block_n, block_k=block_k, group_m=2, num_warps=4, num_stages=1, persistent=persistent)
    return kernel.tuning.GemmConfig(**dict(fields, **options))


def _case_config(kernel, opts: dict, **overrides):
    """The config of a case (its block_n / block_k / persistent, if it sets them), with overrides
    (the GPU tests' tma_b, persistent, num_stages) taking precedence."""
    fields = {name: opts[name] for name in ("block_n", "block_k", "persistent") if name in opts}
    return _config(kernel, **{**fields, **overrides})


# (name, options) of the routed GEMM; every case also runs in float16 unless it says otherwise.
GEMM_CASES = {
    "plain": {},
    "gather": dict(gather=True),
    "scatter+row_scale": dict(scatter=True, row_scale=True),
    "gather+lora": dict(gather=True, lora=True),
    "scatter+lora+row_scale": dict(scatter=True, lora=True, row_scale=True),
    "b_kn": dict(b_is_kn=True),
    "b_kn+gather+lora_rn": dict(b_is_kn=True, gather=True, lora=True),
    "b_kn+scatter": dict(b_is_kn=True, scatter=True),
    "nf4 k-pairs": dict(nf4=True, gather=True),
    "nf4 k-pairs, one scale per column": dict(nf4=True, block_k=64, k_in=128),
    "nf4 n-pairs (b_kn)": dict(nf4=True, b_is_kn=True, gather=True),
    "nf4 one value at a time (16 tiles)": dict(nf4=True, block_n=16, block_k=16, scatter=True),
    "nf4 one value at a time (odd rows)": dict(nf4=True, k_in=39, gather=True),
    "nf4+lora+scatter+row_scale": dict(nf4=True, lora=True, scatter=True, row_scale=True),
    "persistent": dict(persistent=1, gather=True, scatter=True),
    "persistent+nf4+lora": dict(persistent=2, nf4=True, lora=True),
    "tiles 16": dict(block_n=16, block_k=16, gather=True),
    "tiles 64, block_m 32": dict(block_n=64, block_k=64, block_m=32, scatter=True, row_scale=True),
}


def _routed_gemm(kernel, opts, dtype, device="cpu", **config):
    """(out, expected float64) of one routed GEMM launch with options opts."""
    g = torch.Generator().manual_seed(1)
    block_m, k_in, n_out = opts.get("block_m", 16), opts.get("k_in", 40), 24
    r = _routing(kernel, block_m, device)
    num_rows = r.sort_idx.numel()
    gather, scatter, b_is_kn = opts.get("gather"), opts.get("scatter"), bool(opts.get("b_is_kn"))
    a = _rand(NUM_TOKENS if gather else num_rows, k_in, dtype=dtype, g=g)
    b_shape = (NUM_EXPERTS, k_in, n_out) if b_is_kn else (NUM_EXPERTS, n_out, k_in)
    if opts.get("nf4"):
        b, b_dense = _nf4(kernel, b_shape, dtype, g, k_in**-0.5)
    else:
        b = _rand(*b_shape, dtype=dtype, g=g, scale=k_in**-0.5)
        b_dense = b.double()
    weight = b_dense.transpose(1, 2) if b_is_kn else b_dense  # (E, N, K)
    row_scale = torch.rand(num_rows, generator=g).to(dtype) if opts.get("row_scale") else None
    experts = _row_experts(r).cpu()
    sorted_token, sort_idx = r.sorted_token.long().cpu(), r.sort_idx.long().cpu()
    ref = torch.einsum("rk,rnk->rn", (a[sorted_token] if gather else a).double(), weight[experts])
    lora = None
    if opts.get("lora"):
        lora_x = _rand(num_rows, RANK, dtype=dtype, g=g)
        lb_is_rn = b_is_kn  # the dX GEMMs pass LB as (E, R, N)
        lora_b = _rand(NUM_EXPERTS, *((RANK, n_out) if lb_is_rn else (n_out, RANK)), dtype=dtype, g=g, scale=0.3)
        lb = lora_b.double().transpose(1, 2) if lb_is_rn else lora_b.double()  # (E, N, R)
        ref = ref + torch.einsum("rq,rnq->rn", lora_x.double(), lb[experts])
        lora = (lora_x.to(device), lora_b.to(device), lb_is_rn)
    c_rows = sort_idx if scatter else torch.arange(num_rows)
    if row_scale is not None:
        ref = ref.to(dtype).double() * row_scale.double()[c_rows, None]
    expected = torch.empty(num_rows, n_out, dtype=torch.float64)
    expected[c_rows] = ref

    cfg = _case_config(kernel, opts, **config)
    out = torch.full((num_rows, n_out), float("nan"), dtype=dtype, device=device)
    b = b._replace(codes=b.codes.to(device), absmax=b.absmax.to(device)) if opts.get("nf4") else b.to(device)
    kernel.functional.grouped_gemm_launch(
        a.to(device), b, out, r, cfg, b_is_kn=b_is_kn, gather=r.sorted_token if gather else None,
        scatter=r.sort_idx if scatter else None, row_scale=row_scale.to(device) if row_scale is not None else None,
        lora=lora,
    )  # fmt: skip
    return out.cpu(), expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_routed_gemm(kernel, case, dtype):
    out, expected = _routed_gemm(kernel, GEMM_CASES[case], dtype)
    assert not out.isnan().any()
    assert rel_err(out, expected) < TOL[dtype]


SWIGLU_CASES = {
    "gather+h_out": dict(h_out=True),
    "no h_out": {},
    "lora": dict(h_out=True, lora=True),
    "nf4": dict(nf4=True, h_out=True),
    "nf4 one scale per column": dict(nf4=True, block_k=64, k_in=128),
    "nf4 one value at a time+lora": dict(nf4=True, block_n=16, block_k=16, lora=True, h_out=True),
    "persistent": dict(persistent=1, h_out=True, lora=True),
    "tiles 64, block_m 32": dict(block_n=64, block_k=64, block_m=32, h_out=True),
}


def _swiglu_gemm(kernel, opts, dtype, device="cpu", **config):
    """(act, h or None, expected act, expected h) of one SwiGLU GEMM launch with options opts."""
    g = torch.Generator().manual_seed(2)
    block_m, hidden, inter = opts.get("block_m", 16), opts.get("k_in", 40), 20
    r = _routing(kernel, block_m, device)
    num_rows = r.sort_idx.numel()
    x = _rand(NUM_TOKENS, hidden, dtype=dtype, g=g)
    if opts.get("nf4"):
        b, weight = _nf4(kernel, (NUM_EXPERTS, 2 * inter, hidden), dtype, g, hidden**-0.5)
    else:
        b = _rand(NUM_EXPERTS, 2 * inter, hidden, dtype=dtype, g=g, scale=hidden**-0.5)
        weight = b.double()
    experts = _row_experts(r).cpu()
    pre = torch.einsum("rk,rnk->rn", x[r.sorted_token.long().cpu()].double(), weight[experts])
    lora = None
    if opts.get("lora"):
        lora_x = _rand(num_rows, RANK, dtype=dtype, g=g)
        lora_b = _rand(NUM_EXPERTS, 2 * inter, RANK, dtype=dtype, g=g, scale=0.3)
        pre = pre + torch.einsum("rq,rnq->rn", lora_x.double(), lora_b.double()[experts])
        lora = (lora_x.to(device), lora_b.to(device), False)
    pre = pre.to(dtype).double()  # gate and up are rounded to the output dtype
    gate, up = pre[:, :inter], pre[:, inter:]
    expected = (gate * torch.sigmoid(gate)).to(dtype).double() * up

    cfg = _case_config(kernel, opts, **config)
    act = torch.full((num_rows, inter), float("nan"), dtype=dtype, device=device)
    h = torch.full((num_rows, 2 * inter), float("nan"), dtype=dtype, device=device) if opts.get("h_out") else None
    b = b._replace(codes=b.codes.to(device), absmax=b.absmax.to(device)) if opts.get("nf4") else b.to(device)
    kernel.functional.swiglu_gemm_launch(x.to(device), b, act, r, cfg, gather=r.sorted_token, h_out=h, lora=lora)
    return act.cpu(), h.cpu() if h is not None else None, expected, pre


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(SWIGLU_CASES))
def test_swiglu_gemm(kernel, case, dtype):
    act, h, expected, pre = _swiglu_gemm(kernel, SWIGLU_CASES[case], dtype)
    assert rel_err(act, expected) < TOL[dtype]
    if h is not None:
        assert rel_err(h, pre) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gathers", ["none", "a", "b"])
@pytest.mark.parametrize("tiles", [(32, 32, 16), (16, 64, 32)])
def test_weight_gradient(kernel, dtype, gathers, tiles):
    g = torch.Generator().manual_seed(3)
    r = _routing(kernel, 16)
    num_rows, m, n = r.sort_idx.numel(), 24, 40
    a = _rand(NUM_TOKENS if gathers == "a" else num_rows, m, dtype=dtype, g=g)
    b = _rand(NUM_TOKENS if gathers == "b" else num_rows, n, dtype=dtype, g=g)
    a_rows = a[r.sorted_token.long()] if gathers == "a" else a
    b_rows = b[r.sorted_token.long()] if gathers == "b" else b
    experts = _row_experts(r)
    expected = torch.zeros(NUM_EXPERTS, m, n, dtype=torch.float64)
    expected.index_add_(0, experts, a_rows.double()[:, :, None] * b_rows.double()[:, None, :])
    block_m, block_n, block_k = tiles
    cfg = kernel.tuning.DwConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=1)
    out = torch.full((NUM_EXPERTS, m, n), float("nan"), dtype=dtype)
    kernel.functional.grouped_dw_launch(
        a, b, out, r, cfg, a_gather=r.sorted_token if gathers == "a" else None,
        b_gather=r.sorted_token if gathers == "b" else None,
    )  # fmt: skip
    assert torch.all(out[2] == 0)  # the expert without rows: an exact zero
    assert rel_err(out, expected) < TOL[dtype]
    # A persistent grid walking the tiles, one sorted operand through a TMA descriptor (unmasked:
    # the other operand's masked rows zero the neighbouring experts' rows): the same bits.
    for options in (dict(persistent=1), dict(persistent=2), dict(tma=True), dict(tma=True, persistent=1)):
        walked = torch.full_like(out, float("nan"))
        kernel.functional.grouped_dw_launch(
            a, b, walked, r, replace(cfg, **options), a_gather=r.sorted_token if gathers == "a" else None,
            b_gather=r.sorted_token if gathers == "b" else None,
        )  # fmt: skip
        assert torch.equal(walked, out), options


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("options", [dict(), dict(tma=True), dict(tma=True, persistent=1)])
@pytest.mark.parametrize("gathers", ["none", "a", "b"])
def test_weight_gradient_reads_only_its_experts_rows(kernel, gathers, options, device):
    """Rows that belong to no expert (ids outside [0, E) sort past the last expert's and are
    never computed, so they hold whatever the buffer held) and the neighbouring experts' rows
    never reach an expert's gradient, even as NaN and inf: with a TMA descriptor too, which
    cannot mask its rows (expert-parallel sentinels; a non-finite gradient in one expert).
    On CUDA in bf16, where the descriptor is the hardware's."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 1, 3])[torch.randint(0, 3, (NUM_TOKENS, TOP_K), generator=g)]
    ids[::3, 1] = NUM_EXPERTS  # no expert
    r = kernel.route(ids.to(device), NUM_EXPERTS, 16, True)
    offsets = r.expert_offsets.long().cpu()
    num_rows, m, n = r.sort_idx.numel(), 24, 40
    assert offsets[-1] < num_rows  # there are rows past the last expert's
    a = _rand(NUM_TOKENS if gathers == "a" else num_rows, m, dtype=dtype, g=g)
    b = _rand(NUM_TOKENS if gathers == "b" else num_rows, n, dtype=dtype, g=g)
    sorted_token = r.sorted_token.long().cpu()
    a_rows = a[sorted_token] if gathers == "a" else a
    b_rows = b[sorted_token] if gathers == "b" else b
    experts = _row_experts(r)
    valid = torch.arange(num_rows) < offsets[-1]
    expected = torch.zeros(NUM_EXPERTS, m, n, dtype=torch.float64)
    expected.index_add_(0, experts[valid], (a_rows.double()[:, :, None] * b_rows.double()[:, None, :])[valid])
    # Poison what no expert of 0 and 3 may read: the uncomputed tail, and expert 1's rows.
    for t, gathered in ((a, gathers == "a"), (b, gathers == "b")):
        if not gathered:
            t[offsets[-1]:] = float("nan")
            t[offsets[1]:offsets[2]] = float("inf")
    cfg = kernel.tuning.DwConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=1, **options)
    out = torch.full((NUM_EXPERTS, m, n), float("nan"), dtype=dtype, device=device)
    kernel.functional.grouped_dw_launch(
        a.to(device), b.to(device), out, r, cfg, a_gather=r.sorted_token if gathers == "a" else None,
        b_gather=r.sorted_token if gathers == "b" else None,
    )  # fmt: skip
    out = out.cpu()
    for e in (0, 3):
        assert torch.isfinite(out[e]).all(), e
        assert rel_err(out[e], expected[e]) < (TOL[torch.float32] if device == "cpu" else 1e-2), e
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("gathers", ["none", "a", "b"])
def test_weight_gradient_tma_descriptor_choice(kernel, monkeypatch, gathers):
    """With config.tma every operand read in sorted order comes through a descriptor (both when
    neither is gathered), a gathered one never, and none without the option."""
    backward_dw = importlib.import_module(kernel.__name__ + ".grouped_gemm.backward_dw")
    seen = []
    original = backward_dw._grouped_dw_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(**kwargs):
                seen.append((kwargs["a_desc"] is not None, kwargs["b_desc"] is not None))
                return original[grid](**kwargs)

            return launch

    monkeypatch.setattr(backward_dw, "_grouped_dw_kernel", Spy())
    r = _routing(kernel, 16)
    a = torch.randn(NUM_TOKENS if gathers == "a" else r.sort_idx.numel(), 24)
    b = torch.randn(NUM_TOKENS if gathers == "b" else r.sort_idx.numel(), 40)
    cfg = kernel.tuning.DwConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=1)
    for tma in (False, True):
        kernel.functional.grouped_dw_launch(
            a, b, torch.empty(NUM_EXPERTS, 24, 40), r, replace(cfg, tma=tma),
            a_gather=r.sorted_token if gathers == "a" else None, b_gather=r.sorted_token if gathers == "b" else None,
        )  # fmt: skip
    assert seen == [(False, False), (gathers != "a", gathers != "b")]


DSWIGLU_CASES = {
    "dense": {},
    "lora": dict(lora=True),
    "nf4 n-pairs": dict(nf4=True),
    "nf4 one value at a time+lora": dict(nf4=True, block_n=16, block_k=16, lora=True),
    "nf4 odd rows": dict(nf4=True, inter=21),
    "persistent+lora": dict(persistent=2, lora=True),
    "sentinel ids": dict(sentinel=True),
    "tiles 64 (one column tile), block_m 32": dict(block_n=64, block_k=64, block_m=32),
    # From 128 columns the epilogue runs a quarter of the tile at a time: quarters past N.
    "tiles 128 (epilogue in quarters)": dict(block_n=128, block_k=32),
    "tiles 128, 3 column tiles, the last partial+lora": dict(block_n=128, block_k=32, inter=300, lora=True),
    "nf4 tiles 128": dict(nf4=True, block_n=128, block_k=32),
}


def _dswiglu_gemm(kernel, opts, dtype, device="cpu", **config):
    """The fused down_dx + SwiGLU backward GEMM and the unfused path (down_dx GEMM, then
    activation.py's kernel) on the same inputs: ((dh, w_act, dweights) fused, unfused, float64)."""
    g = torch.Generator().manual_seed(4)
    block_m, hidden, inter = opts.get("block_m", 16), 40, opts.get("inter", 40)
    ids = torch.tensor([0, 1, 3])[torch.randint(0, 3, (NUM_TOKENS, TOP_K), generator=g)]  # expert 2: no rows
    if opts.get("sentinel"):
        ids[::3, 1] = NUM_EXPERTS  # no expert: its rows sort past the last expert's, d_w = 0
    r = kernel.route(ids.to(device), NUM_EXPERTS, block_m, True)
    num_rows = r.sort_idx.numel()
    grad_out = _rand(NUM_TOKENS, hidden, dtype=dtype, g=g)
    if opts.get("nf4"):
        b, down = _nf4(kernel, (NUM_EXPERTS, hidden, inter), dtype, g, hidden**-0.5)
    else:
        b = _rand(NUM_EXPERTS, hidden, inter, dtype=dtype, g=g, scale=hidden**-0.5)
        down = b.double()
    h = _rand(num_rows, 2 * inter, dtype=dtype, g=g)
    weights = torch.rand(num_rows, generator=g)
    experts = _row_experts(r).cpu().clamp(max=NUM_EXPERTS - 1)
    valid = (torch.arange(num_rows) < int(r.expert_offsets[-1])).double()[:, None]
    sorted_token, sort_idx = r.sorted_token.long().cpu(), r.sort_idx.long().cpu()
    ref_g = torch.einsum("rh,rhi->ri", grad_out[sorted_token].double(), down[experts])
    lora = None
    if opts.get("lora"):
        lora_x = _rand(num_rows, RANK, dtype=dtype, g=g)
        lora_b = _rand(NUM_EXPERTS, RANK, inter, dtype=dtype, g=g, scale=0.3)  # (E, R, N), as the backward passes it
        ref_g = ref_g + torch.einsum("rq,rqi->ri", lora_x.double(), lora_b.double()[experts])
        lora = (lora_x.to(device), lora_b.to(device), True)
    ref_g = ref_g.to(dtype).double() * valid  # g is rounded to the activations' dtype
    gate, up = h.double()[:, :inter], h.double()[:, inter:]
    act, w = torch.nn.functional.silu(gate) * up, weights.double()[sort_idx, None]
    sig = torch.sigmoid(gate)
    d_gate = ref_g * w * up * (sig + gate * sig * (1 - sig))
    expected = (torch.cat([d_gate, ref_g * w * gate * sig], 1) * valid, act * w * valid, torch.zeros(num_rows).double())
    expected[2][sort_idx] = (ref_g * act).sum(1)

    cfg = _case_config(kernel, opts, **config)
    b = b._replace(codes=b.codes.to(device), absmax=b.absmax.to(device)) if opts.get("nf4") else b.to(device)
    grad_out, h, weights = grad_out.to(device), h.to(device), weights.to(device)
    runs = []
    for fused in (True, False):
        dh = torch.zeros(num_rows, 2 * inter, dtype=dtype, device=device)  # rows of no expert stay 0
        w_act = torch.zeros(num_rows, inter, dtype=dtype, device=device)
        dweights = torch.full((num_rows,), float("nan"), device=device)
        if fused:
            kernel.functional.dswiglu_gemm_launch(grad_out, b, h, weights, r, cfg, dh=dh, w_act=w_act,
                                                  dweights=dweights, gather=r.sorted_token, lora=lora)  # fmt: skip
        else:
            g_rows = torch.empty(num_rows, inter, dtype=dtype, device=device)
            kernel.functional.grouped_gemm_launch(grad_out, b, g_rows, r, cfg, b_is_kn=True, gather=r.sorted_token,
                                                  lora=lora)  # fmt: skip
            kernel.functional.swiglu_backward_launch(g_rows, h, weights, r, dh, w_act, dweights, 16)
        runs.append([t.cpu() for t in (dh, w_act, dweights)])
    return runs[0], runs[1], expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(DSWIGLU_CASES))
def test_dswiglu_gemm(kernel, case, dtype):
    """The SwiGLU backward in the down_dx GEMM's epilogue: against float64 on the same rounded g,
    and against the unfused path (dh and w_act within one rounding, d_w within float32 sums)."""
    fused, unfused, expected = _dswiglu_gemm(kernel, DSWIGLU_CASES[case], dtype)
    for name, a, b, ref in zip(("dh", "w_act", "dweights"), fused, unfused, expected):
        assert not a.isnan().any(), name
        assert rel_err(a, ref) < TOL[dtype], name
        assert rel_err(a, b) < (1e-6 if dtype == torch.float32 else 1e-3), name
    if DSWIGLU_CASES[case].get("sentinel"):
        assert (expected[2] == 0).any() and torch.equal(fused[2] == 0, expected[2] == 0)


# On the GPU in bf16 the dense cases with B through a TMA descriptor (K a multiple of the
# k-tile, so the transposed B takes it too), on a persistent grid, with more stages.
GPU_CASES = {name: dict(opts, k_in=64) for name, opts in GEMM_CASES.items() if not opts.get("nf4") and "k_in" not in opts}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_routed_gemm_gpu_options_bit_equal(kernel, case):
    """bf16 on CUDA: against float64 within bf16 rounding, and the same bits with tma_b and a
    persistent grid as without."""
    opts = GPU_CASES[case]
    plain, expected = _routed_gemm(kernel, opts, torch.bfloat16, "cuda")
    assert rel_err(plain, expected) < 1e-2
    for options in (dict(tma_b=True), dict(persistent=1), dict(tma_b=True, persistent=2), dict(num_stages=3)):
        out, _ = _routed_gemm(kernel, opts, torch.bfloat16, "cuda", **options)
        assert torch.equal(out, plain), options


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(SWIGLU_CASES))
def test_swiglu_gemm_gpu_options_bit_equal(kernel, case):
    opts = SWIGLU_CASES[case]
    act, h, expected, _ = _swiglu_gemm(kernel, opts, torch.bfloat16, "cuda")
    assert rel_err(act, expected) < 1e-2
    for options in (dict(tma_b=True), dict(persistent=1), dict(tma_b=True, persistent=2)):
        act2, h2, _, _ = _swiglu_gemm(kernel, opts, torch.bfloat16, "cuda", **options)
        assert torch.equal(act2, act) and (h is None or torch.equal(h2, h)), options


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c, opts in DSWIGLU_CASES.items() if not opts.get("nf4")])
def test_dswiglu_gemm_gpu_options_bit_equal(kernel, case):
    """bf16 on CUDA: the fused SwiGLU backward against float64 and the unfused path, and the same
    bits with tma_b, a persistent grid and more stages as without."""
    fused, unfused, expected = _dswiglu_gemm(kernel, DSWIGLU_CASES[case], torch.bfloat16, "cuda")
    for a, b, ref in zip(fused, unfused, expected):
        assert rel_err(a, ref) < 1e-2 and rel_err(a, b) < 1e-2
    for options in (dict(tma_b=True), dict(persistent=1), dict(tma_b=True, persistent=2), dict(num_stages=3)):
        again, _, _ = _dswiglu_gemm(kernel, DSWIGLU_CASES[case], torch.bfloat16, "cuda", **options)
        assert all(torch.equal(a, b) for a, b in zip(again, fused)), options


def test_config_json_round_trip(kernel):
    """Every shipped config entry parses into its config type and writes back to the same JSON."""
    import json
    import os

    tuning = kernel.tuning
    for name in os.listdir(tuning.CONFIG_DIR):
        with open(os.path.join(tuning.CONFIG_DIR, name)) as f:
            entries = json.load(f)
        parsed = tuning.parse_configs(entries)
        assert {k: v.to_json() for k, v in parsed.items()} == entries, name
    cfg = tuning.GemmConfig.from_json(dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, TMA_B=True))
    assert cfg.tma_b and cfg.persistent == 0 and replace(cfg, persistent=1).to_json()["PERSISTENT"] == 1
    dw = tuning.DwConfig.from_json(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))
    assert dw.persistent == 0 and not dw.tma and not {"PERSISTENT", "TMA"} & set(dw.to_json())
    assert tuning.DwConfig.from_json(dict(replace(dw, persistent=2).to_json())).persistent == 2
    assert tuning.DwConfig.from_json(replace(dw, tma=True).to_json()) == replace(dw, tma=True)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        tuning.GemmConfig.from_json(dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, BLOCK_Q=1))
