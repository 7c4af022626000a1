"""Gaussianization flow: marginal CDF transform (monotone, finite tails, exact inverse and
implicit gradients), Householder rotations, data-dependent initialisation, bad input."""

import io
import math

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.datasets import load
from pyroflows.infer import fit
from pyroflows.transforms.gaussianization import (
    HouseholderRotation,
    MarginalGaussianization,
    gaussianization,
    ndtri_exp,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _marginal(dtype=torch.float64, **kwargs):
    layer = MarginalGaussianization(2, num_components=4, data_init=False, **kwargs).to(dtype)
    with torch.no_grad():
        layer.loc.copy_(torch.tensor([[-3.0, -0.5, 0.2, 4.0], [-1.0, 0.0, 1.0, 2.0]]))
        layer.log_scale.copy_(torch.tensor([[-1.0, 0.5, -0.3, 0.0], [0.0, -2.0, 0.3, 0.1]]))
        layer.logits.copy_(torch.tensor([[0.0, 1.0, -1.0, 0.5], [0.2, 0.0, 0.0, -0.7]]))
    return layer


def test_ndtri_exp_matches_ndtri_and_inverts_log_ndtr_deep_in_the_tail():
    log_p = torch.linspace(-50, math.log(0.5), 200, dtype=torch.float64)
    assert torch.allclose(
        ndtri_exp(log_p), torch.special.ndtri(log_p.exp()), rtol=1e-10, atol=1e-10
    )
    deep = -torch.logspace(2, 6, 50, dtype=torch.float64)  # p = e^-100 .. e^-1e6: exp underflows
    z = ndtri_exp(deep)
    assert torch.isfinite(z).all()
    assert torch.allclose(torch.special.log_ndtr(z), deep, rtol=1e-10)
    # continuous across the switch between the two branches
    around = torch.tensor([-60.0 - 1e-9, -60.0 + 1e-9], dtype=torch.float64)
    assert (ndtri_exp(around).diff().abs() < 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_marginal_transform_is_monotone_and_finite_at_the_tails(dtype):
    layer = _marginal(dtype)
    x = torch.linspace(-1e4, 1e4, 20001, dtype=dtype)
    x = torch.cat([x, torch.linspace(-10, 10, 2001, dtype=dtype)]).sort().values
    x2 = torch.stack([x, x], -1)
    z, ladj = layer.inverse_and_log_det(x2)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    assert (z.diff(dim=0) >= 0).all()  # monotone (non-decreasing at float resolution)
    # strictly increasing where the output resolves it, and far into both tails
    assert (z[-1] > 20).all() and (z[0] < -20).all()
    # gradients at the tails are finite too
    xg = x2.clone().requires_grad_()
    layer.inverse_and_log_det(xg)[0].sum().backward()
    assert torch.isfinite(xg.grad).all() and (xg.grad > 0).all()


def test_marginal_transform_matches_the_mixture_cdf_in_the_bulk():
    layer = _marginal()
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)[:, None].expand(-1, 2)
    z, _ = layer.inverse_and_log_det(x)
    w = torch.softmax(layer.logits, -1)
    cdf = (w * torch.sigmoid((x[..., None] - layer.loc) / layer.log_scale.exp())).sum(-1)
    assert torch.allclose(torch.special.ndtr(z), cdf, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_direction_inverts_the_cdf_to_tolerance_including_tails(dtype):
    layer = _marginal(dtype)
    z = torch.linspace(-9, 9, 181, dtype=dtype)[:, None].expand(-1, 2).contiguous()
    x, ladj = layer.forward_and_log_det(z)
    assert torch.isfinite(x).all() and (x.diff(dim=0) > 0).all()
    z_back, ladj_back = layer.inverse_and_log_det(x)
    atol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(z_back, z, atol=atol, rtol=1e-4)
    assert torch.allclose(ladj_back, ladj, atol=atol * 10, rtol=1e-4)


def test_gradients_of_samples_are_exact_implicit_gradients():
    """d x / d theta from the bisection + Newton step equals a finite difference."""
    layer = _marginal()
    z = torch.tensor([[-2.5, 0.3], [1.7, 4.0]], dtype=torch.float64)
    weights = torch.tensor([[0.3, -1.2], [2.0, 0.7]], dtype=torch.float64)
    (layer.forward_and_log_det(z)[0] * weights).sum().backward()
    eps = 1e-6
    for name in ("loc", "log_scale", "logits"):
        param = getattr(layer, name)
        for i, j in [(0, 0), (0, 3), (1, 1)]:
            with torch.no_grad():
                param[i, j] += eps
                up = (layer.forward_and_log_det(z)[0] * weights).sum()
                param[i, j] -= 2 * eps
                down = (layer.forward_and_log_det(z)[0] * weights).sum()
                param[i, j] += eps
            assert torch.isclose(param.grad[i, j], (up - down) / (2 * eps), atol=1e-6, rtol=1e-5), (
                name
            )


@pytest.mark.parametrize("num_reflections", [1, 3, 5])
def test_householder_rotation_is_orthogonal(num_reflections):
    layer = HouseholderRotation(3, num_reflections).double()
    z = torch.randn(3, dtype=torch.float64)
    q = torch.autograd.functional.jacobian(lambda v: layer.forward_and_log_det(v)[0], z)
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.isclose(torch.linalg.det(q).abs(), torch.tensor(1.0, dtype=torch.float64))
    x, ladj = layer.forward_and_log_det(torch.randn(4, 3, dtype=torch.float64))
    assert torch.equal(ladj, torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(layer.inverse_and_log_det(x)[0] @ q.T, x, atol=1e-12)


def test_data_dependent_init_uses_the_first_batch_and_lives_in_the_state_dict():
    torch.manual_seed(1)
    flow = pyroflows.build_flow("gaussianization", 2, num_layers=1, num_components=5)
    (layer,) = flow.layers
    assert not bool(layer.initialized)
    data = torch.randn(4000, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    flow.log_prob(data)
    assert bool(layer.initialized) and "transform.0.initialized" in flow.state_dict()
    levels = (torch.arange(5) + 0.5) / 5
    assert torch.allclose(layer.loc.detach(), torch.quantile(data, levels, dim=0).T)
    # a one-layer flow initialised this way is already close to the Gaussian it was fitted to
    nll = -flow.log_prob(data).mean()
    exact = (
        -torch.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]))
        .log_prob(data)
        .sum(-1)
        .mean()
    )
    assert nll < exact + 0.05
    # a second batch does not re-initialise, nor does loading into a fresh copy
    before = layer.loc.detach().clone()
    flow.log_prob(torch.randn(100, 2) + 10)
    assert torch.equal(layer.loc.detach(), before)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    copy = pyroflows.build_flow("gaussianization", 2, num_layers=1, num_components=5)
    copy.load_state_dict(torch.load(buffer))
    copy.log_prob(torch.randn(100, 2) + 10)
    assert torch.equal(copy.layers[0].loc.detach(), before)


def test_data_init_can_be_switched_off():
    flow = pyroflows.build_flow("gaussianization", 2, num_layers=2, data_init=False)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.log_prob(torch.randn(50, 2) * 7)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_layer_structure_and_helper():
    flow = pyroflows.build_flow("gaussianization", 3, num_layers=3, num_reflections=2)
    kinds = [type(layer).__name__ for layer in flow.layers]
    assert kinds == ["MarginalGaussianization", "HouseholderRotation"] * 2 + [
        "MarginalGaussianization"
    ]
    assert [type(t).__name__ for t in gaussianization(1)] == ["MarginalGaussianization"]
    assert len(pyroflows.build_flow("gaussianization", 1, num_layers=3).layers) == 3


def test_device_trap_covers_init_and_sampling():
    flow = pyroflows.build_flow("gaussianization", 2, num_layers=3)
    x = torch.randn(64, 2)
    with default_device_trap():
        assert flow.log_prob(x).device.type == "cpu"  # includes the data-dependent init
        x_s, log_q = flow.rsample_and_log_prob((8,))
        (log_q.sum() + x_s.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "option,value", [("num_components", 0), ("num_components", 2.5), ("num_reflections", 0)]
)
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        pyroflows.build_flow("gaussianization", 3, **{option: value})


def test_short_fit_improves_held_out_nll():
    torch.manual_seed(0)
    train, test = load("8gaussians", 1000)
    flow = pyroflows.build_flow("gaussianization", 2, num_layers=3)
    with torch.no_grad():
        flow.log_prob(train[:512])  # data init
        start = -flow.log_prob(test).mean().item()
    fit(flow, train, num_steps=60, batch_size=256, lr=1e-2, validation=0, progress=False, seed=0)
    with torch.no_grad():
        end = -flow.log_prob(test).mean().item()
    assert end < start - 0.2
