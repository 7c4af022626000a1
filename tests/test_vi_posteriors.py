"""AutoFlow with its defaults against posteriors whose answer is known: two toys (the exponential
tails of a bounded site, where the Student-t base buys PSIS k-hat; a Gaussian, which the guide
still matches) and two reference posteriors of posteriordb.

benchmarks/vi_posteriors.py runs all five posteriordb posteriors and Pyro's autoguides.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap

from pyroflows.datasets import posteriordb
from pyroflows.guides import AutoFlow, fit_guide

pytestmark = pytest.mark.usefixtures("one_thread")


def beta(like: torch.Tensor) -> None:
    """Two independent Beta(2, 2) sites: in logit space their tails are $e^{-2|u|}$."""
    pyro.sample("x", dist.Beta(torch.full_like(like, 2.0), 2.0).to_event(1))


MEAN, COV = [1.0, -1.0], [[1.0, 1.6], [1.6, 4.0]]  # sds 1 and 2, correlation 0.8


def gaussian(like: torch.Tensor) -> None:
    """A correlated bivariate normal on the real line."""
    pyro.sample("z", dist.MultivariateNormal(like.new_tensor(MEAN), like.new_tensor(COV)))


def logit_normal(like: torch.Tensor) -> None:
    """The same normal as the logit of a site in (0, 1): Gaussian in the unconstrained space."""
    normal = dist.MultivariateNormal(like.new_tensor(MEAN), like.new_tensor(COV))
    pyro.sample("z", dist.TransformedDistribution(normal, dist.transforms.SigmoidTransform()))


def fitted(model, like, num_steps=500, **options):
    pyro.clear_param_store()
    guide = AutoFlow(model, num_layers=2, **options)
    with default_device_trap():
        fit_guide(
            model, guide, like, num_steps=num_steps, progress=False, seed=0, num_elbo_samples=0
        )
    return guide


def test_student_t_base_covers_an_exponential_tail(dtype):
    like = torch.zeros(2, dtype=dtype)
    guide = fitted(beta, like)
    with default_device_trap():
        report = guide.diagnose(like, num_samples=4000)
    assert isinstance(guide.get_base_dist().base_dist, dist.StudentT)  # tail_df="auto"
    assert report["khat"] < 0.7, report["verdict"]
    # usable weights: the PSIS-reweighted E[x] = 1/2 and E[log x] = psi(2) - psi(4) = -5/6,
    # within 0.1 sd (sd 0.224 and 0.601)
    weights, x = report["weights"].double(), report["samples"]["x"].double()
    assert torch.allclose(weights @ x, x.new_full((2,), 0.5), atol=0.022)
    assert torch.allclose(weights @ x.log(), x.new_full((2,), -5 / 6), atol=0.06)
    # the normal base cannot: its log-space tail is lighter than e^u, the weights are unbounded
    normal = fitted(beta, like, tail_df=None)
    torch.manual_seed(0)
    assert normal.diagnose(like, num_samples=4000)["khat"] > 0.7


@pytest.mark.parametrize(("model", "max_kl"), [(gaussian, 0.01), (logit_normal, 0.03)])
def test_a_gaussian_posterior_stays_exact(model, max_kl, dtype):
    like = torch.zeros(2, dtype=dtype)
    guide = fitted(model, like, num_steps=5000)  # fit_guide's budget: a plateau stop, cooled
    report = guide.diagnose(like, num_samples=20_000)
    if model is gaussian:  # tail_df="auto" keeps the normal base without a bounded site
        assert isinstance(guide.get_base_dist().base_dist, dist.Normal)
    else:  # reverse KL pulls the Student-t base's degrees of freedom up from 7
        assert guide.tail_df.min() > 7.0
    assert report["khat"] < 0.5, report["verdict"]
    # KL(q || p) = log Z - ELBO, and log Z = 0 for a normalised density
    assert -report["elbo"] < max_kl + 3 * report["elbo_stderr"]
    z = report["samples"]["z"].double()
    z = z if model is gaussian else torch.logit(z)
    cov, exact = torch.cov(z.T), z.new_tensor(COV)
    sd, exact_sd = cov.diagonal().sqrt(), exact.diagonal().sqrt()
    assert ((z.mean(0) - z.new_tensor(MEAN)).abs() < 0.1 * exact_sd).all()
    assert ((sd / exact_sd - 1).abs() < 0.1).all()
    assert abs(cov[0, 1] / sd.prod() - 0.8) < 0.05


@pytest.mark.skipif(
    not posteriordb.default_root().is_dir(), reason="../shared/posteriordb is absent"
)
@pytest.mark.parametrize("name", ["eight_schools_noncentered", "kidscore_interaction"])
def test_autoflow_matches_the_reference_posterior(name):
    model, data, reference = posteriordb.load(name)
    pyro.clear_param_store()
    guide = AutoFlow(model, num_layers=2)
    history = fit_guide(
        model, guide, **data, num_steps=300, progress=False, seed=0, num_elbo_samples=0
    )
    assert history["skipped_steps"] == 0
    report = guide.diagnose(**data, num_samples=4000)
    assert report["khat"] < 0.7, report["verdict"]
    weights = report["weights"].double()
    for flat, ref in reference.items():
        site, index = posteriordb._split(flat)
        x = report["samples"][site][(slice(None), *index)].double()
        mean = (weights * x).sum().item()  # PSIS-reweighted moments
        sd = math.sqrt((weights * (x - mean) ** 2).sum().item())
        assert abs(mean - ref["mean"]) < 0.1 * ref["sd"], flat
        assert 0.85 < sd / ref["sd"] < 1.15, flat
