"""NeuTra: the pulled-back energy is exact (autograd Jacobian), HMC and the flow independence
sampler in a fitted AutoFlow's base space recover a funnel's exact marginal, bad input."""

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import mcmc
from pyroflows.guides import AutoFlow, fit_guide
from pyroflows.mcmc import ModelPotential
from pyroflows.mcmc.neutra import NeuTraPotential

pytestmark = pytest.mark.usefixtures("one_thread")


def funnel(ref, scale=3.0):
    """Neal's funnel: v ~ N(0, scale), x_i | v ~ N(0, exp(v / 2)), four coordinates (scale 3 is
    Neal's; the default-suite tests take a milder neck, so that a short SVI fit suffices)."""
    v = pyro.sample("v", dist.Normal(ref.new_tensor(0.0), scale))
    with pyro.plate("coords", 4, dim=-1):
        pyro.sample("x", dist.Normal(ref.new_tensor(0.0), torch.exp(v / 2)))


def other(ref):
    pyro.sample("w", dist.Normal(ref.new_tensor(0.0), 1.0))


def other_vector(ref):
    pyro.sample("w", dist.Normal(ref.new_tensor(0.0), 1.0).expand([3]).to_event(1))


def fitted_guide(num_steps, scale=3.0):
    ref = torch.zeros(())
    pyro.clear_param_store()  # autoguide parameters live in the global store, by name
    guide = AutoFlow(funnel, flow="iaf", num_layers=2)
    fit_guide(funnel, guide, ref, scale, num_steps=num_steps, progress=False, seed=0)
    return guide, ref


def test_pulled_back_energy_is_exact():
    guide, ref = fitted_guide(20)
    guide.double()  # float64 for the autograd Jacobian
    ref = ref.double()
    potential = ModelPotential(funnel, ref)
    energy = NeuTraPotential(potential, guide.get_transform(), torch.float64)
    eps = torch.randn(3, 5, dtype=torch.float64)
    u, log_det = energy.to_unconstrained(eps)
    t = guide.get_transform()
    assert torch.allclose(u, t(eps))
    for c in range(3):
        jac = torch.autograd.functional.jacobian(t, eps[c])
        assert torch.allclose(log_det[c], torch.linalg.slogdet(jac)[1])
    assert torch.allclose(energy(eps), potential.energy(u) - log_det)


@pytest.mark.parametrize("kernel", ["hmc", "mh"])
def test_neutra_recovers_funnel_marginal(kernel):
    """v ~ N(0, 1.5) exactly: NeuTra is exact MCMC whatever the fit (a good fit only makes it
    mix faster)."""
    guide, ref = fitted_guide(300, scale=1.5)
    idata = mcmc.neutra(
        funnel,
        guide,
        model_args=(ref, 1.5),
        num_samples=150,
        warmup_steps=150,
        num_chains=64,
        kernel=kernel,
        seed=0,
        progress=False,
    )
    v = idata.posterior["v"].values
    assert idata.posterior["x"].dims == ("chain", "draw", "coords")
    ess = float(az.ess(v))
    assert ess > 200  # the independence sampler with a short fit: ~300 of 9600 draws
    assert abs(v.mean()) < 4 * 1.5 / ess**0.5
    assert abs(v.std() / 1.5 - 1) < 0.1
    assert idata.attrs["neutra"] == kernel


@pytest.mark.parametrize("tail_df", [None, 5.0])
def test_independence_proposal_is_the_guides_q(tail_df):
    """A model whose posterior is the guide's own q: the flow independence sampler, proposing
    from the guide's base (normal or Student-t) through T, accepts every move."""
    ref = torch.zeros(())
    pyro.clear_param_store()
    guide = AutoFlow(other_vector, flow="iaf", num_layers=2, tail_df=tail_df, warm_start=None)
    fit_guide(other_vector, guide, ref, num_steps=20, progress=False, seed=0)
    with torch.no_grad():
        q = guide.get_posterior()

    def exact(ref):
        pyro.sample("w", q)

    idata = mcmc.neutra(
        exact,
        guide,
        model_args=(ref,),
        num_samples=20,
        warmup_steps=0,
        num_chains=16,
        kernel="mh",
        seed=0,
        progress=False,
    )
    assert float(idata.sample_stats["acceptance_rate"].min()) > 0.999


@pytest.mark.slow
def test_neutra_beats_plain_hmc_on_the_funnel():
    """With a well-fitted flow the independence sampler accepts most proposals and NeuTra-HMC
    has no divergences, where plain HMC in the funnel's neck diverges."""
    guide, ref = fitted_guide(1500)
    kwargs = dict(
        model_args=(ref,), num_samples=300, warmup_steps=300, num_chains=64, seed=0, progress=False
    )
    neutra_mh = mcmc.neutra(funnel, guide, kernel="mh", **kwargs)
    assert float(neutra_mh.sample_stats["acceptance_rate"].mean()) > 0.6
    neutra_hmc = mcmc.neutra(funnel, guide, kernel="hmc", **kwargs)
    plain = mcmc.sample(mcmc.HMC(model=funnel), **kwargs)
    ess = {
        k: float(az.ess(r.posterior["v"].values))
        for k, r in [("neutra", neutra_hmc), ("plain", plain)]
    }
    assert ess["neutra"] > ess["plain"]


def test_bad_input():
    ref = torch.zeros(())
    with pytest.raises(ValueError, match="has not been fitted"):
        mcmc.neutra(funnel, AutoFlow(funnel), model_args=(ref,), num_samples=5)
    guide, ref = fitted_guide(2)
    with pytest.raises(ValueError, match="do not match the model"):
        mcmc.neutra(other, guide, model_args=(ref,), num_samples=5)
    with pytest.raises(ValueError, match="kernel must be one of"):
        mcmc.neutra(funnel, guide, model_args=(ref,), num_samples=5, kernel="nuts")
    with pytest.raises(TypeError, match="guide must be an AutoFlow"):
        mcmc.neutra(funnel, object(), model_args=(ref,), num_samples=5)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.neutra(funnel, guide, model_args=(ref,), num_samples=5, num_chains=0)
