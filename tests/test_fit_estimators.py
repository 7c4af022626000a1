"""``fit_guide``'s gradient estimators: sticking the landing (``estimator="stl"``)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows.guides import AutoFlow, fit_guide
from pyroflows.guides.fit import StickingTheLanding_ELBO

MEAN, SD = 1.5, 0.5


def gaussian_model():
    """x ~ N(1.5, 0.5^2) and s ~ LogNormal(0.3, 0.5) (a constrained site)."""
    pyro.sample("x", dist.Normal(MEAN, SD))
    pyro.sample("s", dist.LogNormal(0.3, 0.5))


def gradient(loss_class, guide, num_particles):
    """Gradient of ``loss_class``'s loss with respect to the guide's parameters."""
    loss = loss_class(num_particles=num_particles, vectorize_particles=True).differentiable_loss(
        gaussian_model, guide
    )
    params = [p for p in guide.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.usefixtures("one_thread")
def test_stl_gradient_vanishes_at_the_posterior_where_the_elbo_gradient_does_not():
    # the Laplace warm start of a Gaussian model in unconstrained space is exact, and the
    # spline flow and affine stage start at the identity: q = p
    pyro.clear_param_store()
    guide = AutoFlow(gaussian_model, flow="nsf", num_layers=1, hidden_dims=(8,))
    guide()
    stl = gradient(StickingTheLanding_ELBO, guide, 16)
    elbo = gradient(Trace_ELBO, guide, 16)
    assert stl.abs().max() < 1e-4
    assert elbo.norm() > 0.1


@pytest.mark.usefixtures("one_thread")
def test_stl_gradient_is_unbiased():
    # AutoNormal q = N(m, s^2) for x: E[-ELBO] = ((m - mu)^2 + s^2) / (2 sd^2) - log s + const
    pyro.clear_param_store()
    guide = AutoNormal(lambda: pyro.sample("x", dist.Normal(MEAN, SD)), init_scale=1.0)
    guide()
    m, s = guide.locs.x, guide.scales.x
    exact_loss = ((m - MEAN) ** 2 + s**2) / (2 * SD**2) - torch.log(s)
    params = [p for p in guide.parameters() if p.requires_grad]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_loss, params)])
    model = guide.model
    draws = []
    for _ in range(20):
        loss = StickingTheLanding_ELBO(
            num_particles=5000, vectorize_particles=True
        ).differentiable_loss(model, guide)
        draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    draws = torch.stack(draws)
    stderr = draws.std(0) / 20**0.5
    assert ((draws.mean(0) - exact).abs() < 4 * stderr + 1e-4).all()


@pytest.mark.usefixtures("one_thread")
def test_fit_guide_with_stl_fits_a_gaussian_without_a_warm_start():
    pyro.clear_param_store()
    guide = AutoFlow(
        gaussian_model, flow="nsf", num_layers=1, hidden_dims=(8,), warm_start=None,
        init_scale=1.0,
    )
    history = fit_guide(
        gaussian_model, guide, num_steps=300, num_particles=16, estimator="stl",
        progress=False, seed=0, num_elbo_samples=4000,
    )
    # log Z = 0: the ELBO is -KL(q || p)
    assert -0.02 < history["elbo"] < 4 * history["elbo_stderr"]


@pytest.mark.usefixtures("one_thread")
def test_fit_guide_with_stl_under_the_default_device_trap():
    def model(loc):  # every tensor from the argument's device and dtype
        pyro.sample("x", dist.Normal(loc, SD))
        pyro.sample("s", dist.LogNormal(loc, SD))

    pyro.clear_param_store()
    loc = torch.tensor(MEAN, dtype=torch.float64)
    guide = AutoFlow(model, flow="nsf", num_layers=1, hidden_dims=(8,))
    with default_device_trap():
        history = fit_guide(
            model, guide, loc, num_steps=3, num_particles=4, estimator="stl", progress=False,
            seed=0, num_elbo_samples=100,
        )
    assert len(history["train_loss"]) == 3 and torch.isfinite(torch.tensor(history["elbo"]))
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in guide.parameters())


def test_unknown_estimator_is_named_in_the_error():
    guide = AutoNormal(gaussian_model)
    with pytest.raises(ValueError, match="estimator"):
        fit_guide(gaussian_model, guide, num_steps=1, estimator="iwae", progress=False)
