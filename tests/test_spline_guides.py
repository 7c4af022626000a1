"""Spline families as AutoFlow guides: the spline formula runs on the sampling side, a wide box,
and the training settings a spline guide recommends to ``fit_guide``."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

from pyroflows import energies
from pyroflows.guides import AutoFlow, fit_guide
from pyroflows.registry import family_spec
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


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_spline_guides_default_to_six_layers_and_keep_a_given_depth(family):
    model = energies.get("u2").model

    def spline_layers(guide):
        pyro.clear_param_store()
        guide()
        return sum(hasattr(layer, "elementwise") for layer in guide.flow.layers)

    assert spline_layers(AutoFlow(model, family, warm_start=None)) == 6
    assert spline_layers(AutoFlow(model, family, num_layers=3, warm_start=None)) == 3
    # the other families keep their own default
    realnvp = AutoFlow(model, "realnvp", warm_start=None)
    assert spline_layers(realnvp) == family_spec("realnvp").default_layers


def test_guide_keeps_an_explicit_direction():
    pyro.clear_param_store()
    guide = AutoFlow(energies.get("u2").model, "nsf", num_layers=2, direction="density")
    guide()
    assert all(isinstance(layer.elementwise, Inverse) for layer in guide.flow.layers)


def test_families_without_direction_are_unchanged():
    guide = AutoFlow(energies.get("u2").model, "realnvp", num_layers=2)
    assert "direction" not in guide._flow_args


def _splines(guide):
    return [layer.elementwise for layer in guide.flow.layers if hasattr(layer, "elementwise")]


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_spline_guides_default_to_a_wide_box_and_a_unit_init_scale(family):
    pyro.clear_param_store()
    guide = AutoFlow(energies.get("u2").model, family, num_layers=2, warm_start=None)
    guide()
    assert all(s.bound == 10.0 and s.bins == 16 for s in _splines(guide))
    assert torch.equal(guide.warm_start.scale, torch.ones(2))


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_spline_guide_options_given_win(family):
    pyro.clear_param_store()
    guide = AutoFlow(
        energies.get("u2").model, family, num_layers=2, warm_start=None, bound=3.0, bins=4,
        init_scale=0.5,
    )
    guide()
    assert all(s.bound == 3.0 and s.bins == 4 for s in _splines(guide))
    assert torch.equal(guide.warm_start.scale, torch.full((2,), 0.5))


def test_other_families_keep_their_init_scale_and_recommend_no_training():
    pyro.clear_param_store()
    guide = AutoFlow(energies.get("u2").model, "realnvp", num_layers=2, warm_start=None)
    guide()
    assert torch.equal(guide.warm_start.scale, torch.full((2,), 0.1))
    assert guide.fit_defaults(3000) == {}


def test_spline_guide_recommends_its_training_with_a_cosine_tempering_of_most_of_the_budget():
    guide = AutoFlow(energies.get("u2").model, "nsf")
    assert guide.fit_defaults(3000) == dict(
        lr=3e-3, num_particles=256, anneal_steps=2400, anneal_from=0.5, anneal_shape="cosine",
        forward_kl=1.0,
    )
    assert guide.fit_defaults(1001)["anneal_steps"] == 800
    # an IAF-direction spline evaluates log q at fixed points sequentially: no forward KL
    iaf_like = AutoFlow(energies.get("u2").model, "nsf_ar", parallel="forward")
    assert "forward_kl" not in iaf_like.fit_defaults(3000)
    assert guide.fit_defaults(5000)["anneal_steps"] == 4000


class _Recommending(pyro.infer.autoguide.AutoDelta):
    """A point mass at 0 that recommends training settings, as a spline AutoFlow does."""

    def fit_defaults(self, num_steps):
        return dict(lr=1e-9, num_particles=3, anneal_steps=num_steps - 1, anneal_from=0.25)


class _RecommendingAShape(_Recommending):
    def fit_defaults(self, num_steps):
        return {**super().fit_defaults(num_steps), "anneal_shape": "geometric"}


def _point_mass_fit(guide_class=_Recommending, **options):
    # log q = 0 at the point, so each step's loss is exactly beta * 0.5 log(2 pi)
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    guide = guide_class(model, init_loc_fn=init_to_value(values={"z": torch.tensor(0.0)}))
    history = fit_guide(
        model, guide, num_steps=5, patience=None, cooldown=0, num_elbo_samples=0,
        progress=False, seed=0, **options,
    )
    betas = [loss / (0.5 * math.log(2 * math.pi)) for loss in history["train_loss"]]
    return history, betas


def test_fit_guide_takes_the_guides_recommendation():
    history, betas = _point_mass_fit()
    assert history["num_particles"] == 3
    assert history["lr"][0] == pytest.approx(1e-9)
    assert betas == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0], rel=1e-5)  # 4 tempered


def test_fit_guide_arguments_given_win_over_the_recommendation():
    history, betas = _point_mass_fit(lr=1e-8, num_particles=2, anneal_steps=2, anneal_from=0.5)
    assert history["num_particles"] == 2
    assert history["lr"][0] == pytest.approx(1e-8)
    assert betas == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-5)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("linear", [0.25, 0.4375, 0.625, 0.8125, 1.0]),
        ("cosine", [0.25 + 0.75 * (1 - math.cos(math.pi * k / 4)) / 2 for k in range(4)] + [1.0]),
        ("geometric", [0.25 ** (1 - k / 4) for k in range(4)] + [1.0]),
    ],
)
def test_fit_guide_tempers_with_the_shape_given(shape, expected):
    _, betas = _point_mass_fit(anneal_shape=shape)  # 4 tempered steps from 0.25
    assert betas == pytest.approx(expected, rel=1e-5)


def test_fit_guide_takes_a_recommended_shape_and_a_given_one_wins():
    _, betas = _point_mass_fit(_RecommendingAShape)
    assert betas == pytest.approx([0.25 ** (1 - k / 4) for k in range(4)] + [1.0], rel=1e-5)
    _, betas = _point_mass_fit(_RecommendingAShape, anneal_shape="linear")
    assert betas == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0], rel=1e-5)


def test_fit_guide_rejects_an_unknown_anneal_shape():
    with pytest.raises(ValueError, match="anneal_shape"):
        _point_mass_fit(anneal_shape="sigmoid")


def test_fit_guide_uses_a_spline_guides_particles():
    model = energies.get("u2").model
    pyro.clear_param_store()
    guide = AutoFlow(model, "nsf", num_layers=1, hidden_dims=(8,))
    history = fit_guide(model, guide, num_steps=2, num_elbo_samples=0, progress=False, seed=0)
    assert history["num_particles"] == 256


@pytest.mark.slow
def test_default_spline_guide_fits_u2_within_the_goal():
    # U2 with the plain defaults: 0.0085-0.014 nats on seeds 25-34 (docs/splines.md, sixth pass)
    from pyroflows.infer.importance import reverse_kl

    target = energies.get("u2")
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    guide = AutoFlow(target.model, flow="nsf")
    fit_guide(target.model, guide, num_steps=3000, progress=False, num_elbo_samples=0)
    kl, _ = reverse_kl(target.model, guide, target.log_normalizer, num_samples=20_000)
    assert kl < 0.05
