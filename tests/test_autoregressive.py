"""MADE, MAF and IAF beyond the conformance suite: autoregressive structure, the single-pass
directions, the sequential inversion against a naive reference, and bad input."""

from unittest import mock

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.nn.made import MADE
from pyroflows.transforms.autoregressive import (
    Autoregressive,
    inverse_autoregressive,
    masked_autoregressive,
)
from pyroflows.transforms.elementwise import Affine

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def _randomised(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.double()


def _degrees(ordering):
    deg = torch.empty_like(ordering)
    deg[ordering] = torch.arange(len(ordering))
    return deg


@pytest.mark.parametrize("dim,context_dim", [(1, None), (1, 2), (5, None), (6, 3)])
def test_made_is_autoregressive_and_fully_connected(dim, context_dim):
    ordering = torch.randperm(dim)
    narrowest = dim if context_dim or dim == 1 else dim - 1
    made = _randomised(MADE(dim, 2, (dim + 2, narrowest), context_dim, ordering))
    ctx = torch.randn(context_dim, dtype=torch.float64) if context_dim else None
    x = torch.randn(dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: torch.cat(made(v, ctx)), x)
    deg = _degrees(ordering)
    allowed = deg[None, :] < deg[:, None]  # output i may depend on input j iff j comes first
    for p in range(2):
        assert torch.all(jac[p * dim : (p + 1) * dim][~allowed] == 0)
    # every legal connection has a path through the masks, even at the smallest legal widths
    masks = [getattr(made, f"mask{i}") for i in range(len(made.layers))]
    paths = masks[0]
    for mask in masks[1:]:
        paths = mask @ paths
    assert torch.all((paths > 0) == allowed.repeat(2, 1))
    if context_dim:  # every output sees the context (the context weights are not masked)
        assert made.context_layer.weight.shape == (dim + 2, context_dim)  # dense, unmasked


def _naive_autoregress(made, u, fn, context=None):
    """Reference inversion: D full passes, each fixing one more variable."""
    y = torch.zeros_like(u)
    for _ in range(made.input_dim):
        y = fn(u, made(y, context))[0]
    return y


@pytest.mark.parametrize("context_dim", [None, 2])
def test_sequential_inversion_matches_naive_passes(context_dim):
    dim = 7
    made = _randomised(MADE(dim, 2, (9, 8, 7), context_dim, torch.randperm(dim)), std=0.3)
    u = torch.randn(3, 4, dim, dtype=torch.float64)
    ctx = torch.randn(4, context_dim, dtype=torch.float64) if context_dim else None
    fn = Affine(3.0).forward
    y, ladj = made.autoregress(u, fn, ctx)
    ctx_full = ctx.expand(3, 4, -1) if ctx is not None else None
    assert torch.allclose(y, _naive_autoregress(made, u, fn, ctx_full), atol=1e-12)
    assert torch.allclose(ladj, fn(u, made(y, ctx_full))[1].sum(-1), atol=1e-12)
    assert y.shape == u.shape and ladj.shape == (3, 4)


def test_sequential_inversion_gradients():
    made = _randomised(MADE(4, 2, (6,), 2), std=0.3)
    ctx = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    fn = Affine(3.0).forward
    assert torch.autograd.gradcheck(lambda u, c: made.autoregress(u, fn, c), (u, ctx))


@pytest.mark.parametrize("name,parallel_op", [("maf", "log_prob"), ("iaf", "rsample_and_log_prob")])
def test_fast_direction_is_one_pass_per_layer(name, parallel_op):
    flow = pyroflows.build_flow(name, 6, num_layers=3, hidden_dims=(16,))
    with (
        mock.patch.object(MADE, "autoregress", side_effect=AssertionError("sequential")),
        mock.patch.object(MADE, "forward", autospec=True, side_effect=MADE.forward) as forward,
    ):
        if parallel_op == "log_prob":
            flow.log_prob(torch.randn(5, 6))
        else:
            flow.rsample_and_log_prob((5,))
    assert forward.call_count == 3


@pytest.mark.parametrize("name,sequential_op", [("maf", "sample"), ("iaf", "log_prob")])
def test_slow_direction_is_exact(name, sequential_op):
    flow = pyroflows.build_flow(name, 5, num_layers=3, hidden_dims=(16, 16), ordering="random")
    _randomised(flow, std=0.3)
    if sequential_op == "sample":  # MAF: the sample inverts to the noise it came from
        z = torch.randn(10, 5, dtype=torch.float64)
        x, ladj = flow.forward_and_log_det(z)
        z_back, ladj_back = flow.inverse_and_log_det(x)
    else:  # IAF: the density of an external point, then back
        x = torch.randn(10, 5, dtype=torch.float64)
        z_back, ladj_back = flow.inverse_and_log_det(x)
        x2, ladj = flow.forward_and_log_det(z_back)
        z, x = z_back, x2
    assert torch.allclose(flow.forward_and_log_det(z)[0], x, atol=1e-10)
    assert torch.allclose(z_back, z, atol=1e-10) and torch.allclose(ladj_back, ladj, atol=1e-10)


def test_one_dimensional_layer_is_a_constant_affine_map():
    layer = _randomised(masked_autoregressive(1, hidden_dims=(4,)))
    z = torch.randn(9, 1, dtype=torch.float64)
    x, ladj = layer.forward_and_log_det(z)
    scale, shift = torch.exp(ladj[0]), x[0, 0] - z[0, 0] * torch.exp(ladj[0])
    assert torch.allclose(x[:, 0], z[:, 0] * scale + shift)
    assert torch.allclose(ladj, ladj[0].expand(9))


def test_fresh_flow_is_standard_normal():
    for name in ("maf", "iaf"):
        flow = pyroflows.build_flow(name, 3)
        x = torch.randn(4, 3)
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        assert torch.allclose(flow.log_prob(x), expected, atol=1e-6)


def test_random_orderings_survive_state_dict():
    flow = pyroflows.build_flow("maf", 6, num_layers=3, hidden_dims=(8,), ordering="random")
    _randomised(flow, 0.3).float()
    torch.manual_seed(7)
    copy = pyroflows.build_flow("maf", 6, num_layers=3, hidden_dims=(8,), ordering="random")
    copy.load_state_dict(flow.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(copy.log_prob(x), flow.log_prob(x))
    assert torch.equal(copy.forward_and_log_det(x)[0], flow.forward_and_log_det(x)[0])


def test_conditional_flow_under_the_device_trap():
    flow = pyroflows.build_flow("iaf", 4, num_layers=2, hidden_dims=(8,), context_dim=3)
    _randomised(flow, 0.3).float()
    x, ctx = torch.randn(5, 4), torch.randn(5, 3)
    with default_device_trap():
        lp = flow.log_prob(x, ctx)  # sequential direction of IAF
        xs = flow.sample((), ctx)
    assert lp.device.type == "cpu" and xs.shape == (5, 4)


@pytest.mark.parametrize(
    "helper,parallel", [(masked_autoregressive, "inverse"), (inverse_autoregressive, "forward")]
)
def test_helpers(helper, parallel):
    layer = helper(3, hidden_dims=(8,), context_dim=2, ordering=[2, 0, 1])
    assert isinstance(layer, Autoregressive) and layer.parallel == parallel
    assert layer.made.ordering.tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "ordering", [[0, 0, 1], [0, 1], [1, 2, 3], [0.0, 1.0, 2.0], [[0, 1, 2]], "sideways"]
)
def test_bad_ordering(ordering):
    with pytest.raises(ValueError, match="ordering"):
        pyroflows.build_flow("maf", 3, ordering=ordering)


def test_hidden_too_narrow():
    with pytest.raises(ValueError, match="hidden_dims must all be >= 9"):
        pyroflows.build_flow("maf", 10, hidden_dims=(32, 8))
    with pytest.raises(ValueError, match="hidden_dims must all be >= 10"):
        pyroflows.build_flow("iaf", 10, hidden_dims=(9,), context_dim=2)
    pyroflows.build_flow("iaf", 10, hidden_dims=(9,))  # D - 1 suffices without a context


def test_bad_parallel_and_elementwise():
    with pytest.raises(ValueError, match="parallel"):
        Autoregressive(3, parallel="sideways")
    with pytest.raises(ValueError, match="elementwise"):
        Autoregressive(3, elementwise="spline-ish")


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_bad_context(name):
    flow = pyroflows.build_flow(name, 3, hidden_dims=(8,), context_dim=2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 2\)"):
        flow.log_prob(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="context"):
        flow.sample((2,), torch.randn(4, 1))
    with pytest.raises(ValueError, match="context"):
        pyroflows.build_flow(name, 3, hidden_dims=(8,)).log_prob(x, torch.randn(4, 2))
    assert torch.isfinite(flow.log_prob(x, torch.randn(4, 2))).all()  # nothing corrupted
