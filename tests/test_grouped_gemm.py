import pytest
import torch

from reference import grouped_gemm_reference, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m_sizes", [[5, 0, 17, 3], [0, 0, 1, 0], [40], [0, 0, 0]])
def test_grouped_gemm_forward_backward(kernel, dtype, m_sizes):
    torch.manual_seed(len(m_sizes))
    m_sizes = torch.tensor(m_sizes)
    num_rows, k_in, n_out = int(m_sizes.sum()), 40, 24  # not multiples of the tiles
    x = torch.randn(num_rows, k_in, dtype=dtype, requires_grad=True)
    weight = torch.randn(len(m_sizes), n_out, k_in, dtype=dtype, requires_grad=True)
    out = kernel.grouped_gemm(x, weight, m_sizes)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    ref = grouped_gemm_reference(x64, w64, m_sizes)
    assert out.dtype == dtype and out.shape == (num_rows, n_out)
    if num_rows:
        assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    if num_rows:
        assert rel_err(x.grad, x64.grad) < TOL[dtype]
        assert rel_err(weight.grad, w64.grad) < TOL[dtype]
    # Experts without rows get an exact zero weight gradient.
    for e in torch.nonzero(m_sizes == 0).flatten().tolist():
        assert torch.all(weight.grad[e] == 0)


def test_grouped_gemm_compiles_fullgraph_and_matches_eager(kernel):
    """Under torch.compile the custom ops (and their fake implementations) run; in eager mode an
    autograd.Function runs the same implementation: both give the same bits, forward and backward."""
    torch.manual_seed(0)
    m_sizes = torch.tensor([7, 0, 12, 3])
    x = torch.randn(22, 40, requires_grad=True)
    weight = torch.randn(4, 24, 40, requires_grad=True)

    def run(fn):
        out = fn(x, weight, m_sizes)
        return [out, *torch.autograd.grad(out, [x, weight], torch.ones_like(out))]

    torch._dynamo.reset()
    compiled = torch.compile(kernel.grouped_gemm, fullgraph=True, backend="aot_eager")
    for a, b in zip(run(compiled), run(kernel.grouped_gemm)):
        assert torch.equal(a, b)
