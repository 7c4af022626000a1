"""Spline families as AutoFlow guides: the spline formula runs on the sampling side."""

import pyro
import pytest
import torch

from pyroflows import energies
from pyroflows.guides import AutoFlow
from pyroflows.transforms.elementwise import Inverse
from pyroflows.transforms.spline import RationalQuadraticSpline


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_guide_splines_default_to_the_sampling_side(family):
    model = energies.get("u2").model
    pyro.clear_param_store()
    guide = AutoFlow(model, family, num_layers=2, warm_start=None)
    torch.manual_seed(0)
    guide()
    maps = [layer.elementwise for layer in guide.flow.layers if hasattr(layer, "elementwise")]
    assert maps and all(isinstance(m, RationalQuadraticSpline) for m in maps)
    with torch.no_grad():  # away from the identity start
        for parameter in guide.flow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    # the guide's draws score the same through the sampling pass and through log_prob's inverse
    posterior = guide.get_posterior()
    latent = posterior.rsample((64,))
    log_q = posterior.log_prob(latent)
    latent_again = latent.detach().clone()
    assert torch.allclose(posterior.log_prob(latent_again), log_q, atol=1e-4)


def test_guide_keeps_an_explicit_direction():
    pyro.clear_param_store()
    guide = AutoFlow(energies.get("u2").model, "nsf", num_layers=2, direction="density")
    guide()
    assert all(isinstance(layer.elementwise, Inverse) for layer in guide.flow.layers)


def test_families_without_direction_are_unchanged():
    guide = AutoFlow(energies.get("u2").model, "realnvp", num_layers=2)
    assert "direction" not in guide._flow_args
