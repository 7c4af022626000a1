"""BNAF beyond the conformance suite: block-triangular structure, the log-space log-det, the
bracketed numerical inverse (exact to 1e-6 in float64, far in the tails), its implicit
gradients, the one-pass direction of each ``parallel`` setting, and bad input."""

from unittest import mock

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.transforms.bnaf import (
    BlockNeuralAutoregressive,
    MaskedBlockLinear,
    block_autoregressive,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(dim=4, hidden=(12, 8), context_dim=None, parallel="inverse", ordering=None, std=0.3):
    layer = BlockNeuralAutoregressive(dim, hidden, context_dim, ordering, parallel)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(std * torch.randn_like(p))
    return layer.double()


def test_weights_are_block_triangular_with_positive_diagonal_blocks():
    lin = MaskedBlockLinear(3, 2, 4).double()
    weight, log_diag = lin.weights()
    blocks = weight.view(3, 4, 3, 2)
    for i in range(3):
        for j in range(3):
            if j > i:
                assert torch.all(blocks[i, :, j] == 0)
        assert torch.all(blocks[i, :, i] > 0)
        assert torch.allclose(torch.log(blocks[i, :, i]), log_diag[i])
    # weight normalisation: every row has norm exp(log_norm)
    assert torch.allclose(weight.norm(dim=-1), torch.exp(lin.log_norm.squeeze(-1)))


@pytest.mark.parametrize("parallel", ["inverse", "forward"])
def test_jacobian_is_triangular_in_the_ordering_and_log_det_exact(parallel):
    ordering = torch.tensor([2, 0, 3, 1])
    layer = _layer(parallel=parallel, ordering=ordering, context_dim=2)
    z, ctx = torch.randn(4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward_and_log_det(v, ctx)[0], z)
    permuted = jac[ordering][:, ordering]
    assert torch.all(permuted.triu(1).abs() < 1e-12) and torch.all(permuted.diagonal() > 0)
    assert torch.allclose(
        torch.linalg.slogdet(jac)[1], layer.forward_and_log_det(z, ctx)[1], atol=1e-9
    )


@pytest.mark.parametrize("parallel", ["inverse", "forward"])
def test_numerical_inverse_is_exact_far_in_the_tails(parallel):
    layer = _layer(dim=3, parallel=parallel, std=0.5)
    z = torch.cat([torch.randn(20, 3), 40 * torch.randn(5, 3), torch.full((1, 3), 1e3)]).double()
    x, ladj = layer.forward_and_log_det(z)
    z_back, ladj_back = layer.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-6, rtol=0)
    assert torch.allclose(ladj_back, ladj, atol=1e-6)


def test_inverse_gradients_are_the_implicit_ones():
    """Gradients through the numerical inverse match finite differences (inputs, context, and a
    parameter)."""
    layer = _layer(dim=2, hidden=(4,), context_dim=1)
    y = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, c: layer.forward_and_log_det(a, c), (y, ctx), fast_mode=True
    )
    gate = layer.gate
    loss = lambda: layer.forward_and_log_det(y.detach(), ctx.detach())[0].sum()  # noqa: E731
    (grad,) = torch.autograd.grad(loss(), gate)
    eps = 1e-6
    with torch.no_grad():
        gate[1] += eps
        up = loss()
        gate[1] -= 2 * eps
        down = loss()
        gate[1] += eps
    assert torch.allclose(grad[1], (up - down) / (2 * eps), atol=1e-6)


@pytest.mark.parametrize(
    "parallel,one_pass", [("inverse", "log_prob"), ("forward", "rsample_and_log_prob")]
)
def test_fast_direction_never_solves(parallel, one_pass):
    flow = pyroflows.build_flow("bnaf", 3, hidden_dims=(9,), parallel=parallel)
    with mock.patch.object(
        BlockNeuralAutoregressive, "_solve", side_effect=AssertionError("solve")
    ):
        out = (
            flow.log_prob(torch.randn(4, 3))
            if one_pass == "log_prob"
            else flow.rsample_and_log_prob((4,))[1]
        )
    assert out.shape == (4,) and torch.isfinite(out).all()


def test_log_prob_normalises_in_one_dimension():
    flow = pyroflows.build_flow("bnaf", 1, hidden_dims=(8, 8)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.linspace(-25, 25, 20001, dtype=torch.float64)[:, None]
    mass = torch.trapezoid(flow.log_prob(x).exp(), x[:, 0])
    assert abs(mass.item() - 1) < 1e-3


def test_helper_and_conditional_sampling_under_the_device_trap():
    layer = block_autoregressive(3, (9, 9), context_dim=2, parallel="forward")
    flow = pyroflows.build_flow("bnaf", 3, hidden_dims=(9,), context_dim=2)
    z, ctx = torch.randn(5, 3), torch.randn(5, 2)
    with default_device_trap():
        x, _ = layer.forward_and_log_det(z, ctx)
        assert torch.allclose(layer.inverse_and_log_det(x, ctx)[0], z, atol=1e-4)
        xs, log_q = flow.rsample_and_log_prob((), ctx)  # through the numerical inverse
        assert xs.shape == (5, 3) and log_q.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(parallel="sideways"), "parallel"),
        (dict(hidden_dims=(0,)), "hidden_dims"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(ordering=[0, 0, 1]), "ordering"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyroflows.build_flow("bnaf", 3, **kwargs)


def test_bad_inputs():
    flow = pyroflows.build_flow("bnaf", 2, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 2\)"):
        flow.log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="finite"):
        flow.log_prob(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="hidden_dims"):
        BlockNeuralAutoregressive(2, ())
