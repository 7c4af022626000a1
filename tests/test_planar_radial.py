"""Planar and radial layers: invertibility constraints hold for any parameters, and the inverses
Pyro lacks work, including for training by maximum likelihood."""

import pytest
import torch

from pyroflows import build_flow
from pyroflows.datasets import toy
from pyroflows.infer import fit
from pyroflows.transforms import Planar, Radial


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_planar_constraint_and_inverse_for_extreme_parameters(scale):
    layer = Planar(4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(scale * torch.randn_like(p))
    u_hat, w, _ = layer._uwb(None)
    assert (w * u_hat).sum() > -1  # the invertibility condition
    z = 3 * torch.randn(100, 4, dtype=torch.float64)
    x, ladj = layer.forward_and_log_det(z)
    z_back, ladj_back = layer.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-8)
    assert torch.isfinite(ladj).all() and torch.allclose(ladj, ladj_back, atol=1e-8)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_radial_constraint_and_inverse_for_extreme_parameters(scale):
    layer = Radial(3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(scale * torch.randn_like(p))
    _, alpha, beta = layer._params(None)
    assert alpha > 0 and beta > -alpha
    z = 3 * torch.randn(100, 3, dtype=torch.float64)
    x, ladj = layer.forward_and_log_det(z)
    z_back, _ = layer.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-7)
    assert torch.isfinite(ladj).all()


def test_planar_inverse_gradient_matches_finite_differences():
    # the root solve is bisection + one autograd Newton step: its gradient must be exact
    layer = Planar(2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, dtype=torch.float64)
    param = layer.params.params["w"]

    def nll():
        return -layer.inverse_and_log_det(x)[0].sum() + layer.inverse_and_log_det(x)[1]

    (grad,) = torch.autograd.grad(nll(), param)
    eps = 1e-6
    fd = torch.zeros_like(param)
    with torch.no_grad():
        for i in range(len(param)):
            param[i] += eps
            up = nll()
            param[i] -= 2 * eps
            down = nll()
            param[i] += eps
            fd[i] = (up - down) / (2 * eps)
    assert torch.allclose(grad, fd, atol=1e-6)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_density_estimation_through_the_inverse_learns(name):
    # Pyro's Planar/Radial cannot do this (no inverse, pyro-ppl/pyro#2718)
    torch.manual_seed(0)
    data = toy("8gaussians", 2000, seed=1)
    flow = build_flow(name, 2, num_layers=8)
    before = -flow.log_prob(data).mean().item()
    fit(flow, data, num_steps=150, lr=2e-2, progress=False, seed=0)
    after = -flow.log_prob(data).mean().item()
    assert after < before - 0.3
