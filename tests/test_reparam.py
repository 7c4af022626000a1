"""Automatic non-centring (mcmc.sample(reparam="auto")): the per-element choice against the
conjugate answer, the exact carry-over of points, exact moments on the funnel, the centred eight
schools against its reference posterior, and bad input."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import mcmc
from pyroflows.datasets import posteriordb as pdb
from pyroflows.mcmc import ModelPotential
from pyroflows.mcmc.reparam import carry_over, decentre, plan

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def funnel():
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=F64), 3.0))
    with pyro.plate("i", 9):
        pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=F64), torch.exp(v / 2)))


# groups 0-3 hold one observation each, groups 4-7 a hundred (noise sd 1)
COUNTS = torch.tensor([1, 1, 1, 1, 100, 100, 100, 100])
GROUP = torch.repeat_interleave(torch.arange(8), COUNTS)
OBS = 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=F64)[GROUP] + (
    torch.randn(len(GROUP), generator=torch.Generator().manual_seed(1), dtype=F64)
)


def groups():
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=F64)))
    with pyro.plate("g", 8):
        a = pyro.sample("a", dist.Normal(mu, s))
    with pyro.plate("obs", len(GROUP)):
        pyro.sample("y", dist.Normal(a[..., GROUP], 1.0), obs=OBS)


def eight_schools_centered(J, y, sigma):
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _points(potential, **values):
    return potential.pack({k: torch.as_tensor(v, dtype=F64) for k, v in values.items()})


def test_the_choice_follows_the_ratio_of_prior_to_likelihood_variance():
    # a_j's likelihood precision is n_j (unit noise): kappa_j = s^2 n_j, centred iff > 1
    potential = ModelPotential(groups)
    gen = torch.Generator().manual_seed(0)
    for s, expect in [(0.3, [0, 0, 0, 0, 1, 1, 1, 1]), (2.0, [1] * 8), (0.05, [0] * 8)]:
        u = _points(
            potential, mu=torch.zeros(64), s=torch.full((64,), s), a=torch.randn(64, 8) * s
        )
        choice, informed = plan(potential, u, gen)
        assert informed
        assert set(choice) == {"a"}
        assert choice["a"].tolist() == expect


def test_sites_without_data_or_with_constant_scale_are_judged_correctly():
    potential = ModelPotential(funnel)
    u = potential.init(32, generator=torch.Generator().manual_seed(0))
    choice, informed = plan(potential, u, torch.Generator().manual_seed(0))
    assert not informed and choice["x"].tolist() == [0.0] * 9
    # eight schools written non-centred already: theta_trans has a constant scale
    data = dict(J=8, y=torch.zeros(8, dtype=F64), sigma=torch.ones(8, dtype=F64))
    potential = ModelPotential(pdb.eight_schools_noncentered, **data)
    u = potential.init(8, generator=torch.Generator().manual_seed(0))
    assert plan(potential, u, torch.Generator().manual_seed(0))[0] == {}


def test_points_carry_over_exactly_and_the_density_changes_by_the_jacobian():
    potential = ModelPotential(groups)
    u = potential.init(16, generator=torch.Generator().manual_seed(3))
    choice = {"a": torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1], dtype=F64)}
    new = ModelPotential(decentre(groups, choice))
    assert set(new._latent) == {"mu", "s", "a_decentered"}
    z = carry_over(potential, new, u, choice)
    before, after = potential.unpack(u), {**new.unpack(z), **new.deterministic(z)}
    for name in ("mu", "s", "a"):
        torch.testing.assert_close(after[name], before[name])
    # x = mu + s z on the decentred elements: U_new(z) = U(x) - 4 log s
    s = before["s"]
    torch.testing.assert_close(new.energy(z), potential.energy(u) - 4 * s.log())


def test_auto_reparam_samples_the_funnel_exactly_and_reports_its_own_sites():
    idata = mcmc.sample(
        mcmc.HMC(model=funnel), num_chains=128, num_samples=300, warmup_steps=300, seed=0,
        progress=False,
    )
    assert set(idata.posterior.data_vars) == {"v", "x"}
    assert idata.posterior["x"].dims == ("chain", "draw", "i")
    assert idata.attrs["reparam"] == "x: 9 of 9 non-centred"
    assert int(idata.sample_stats["diverging"].sum()) == 0
    v = torch.as_tensor(idata.posterior["v"].values).flatten()
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 9)
    assert abs(v.mean()) < 4 * 3 / math.sqrt(len(v) / 2)  # ESS at least half the draws
    assert abs(v.std() / 3 - 1) < 0.05
    # x_i / e^{v/2} is standard normal, independent of v
    w = x / torch.exp(v / 2)[:, None]
    assert abs(w.std() - 1) < 0.03 and abs(torch.corrcoef(torch.stack([v, w[:, 0]]))[0, 1]) < 0.05


def test_reparam_none_keeps_the_model_as_written():
    idata = mcmc.sample(
        mcmc.HMC(model=funnel), num_chains=16, num_samples=20, warmup_steps=20, seed=0,
        progress=False, reparam=None,
    )
    assert "reparam" not in idata.attrs
    with pytest.raises(ValueError, match="reparam"):
        mcmc.sample(mcmc.HMC(model=funnel), num_chains=4, num_samples=5, reparam="always")


def test_the_pilot_counts_against_the_warm_up():
    idata = mcmc.sample(
        mcmc.HMC(model=groups), num_chains=32, num_samples=50, warmup_steps=100, seed=0,
        progress=False,
    )
    assert idata.attrs["warmup_steps"] == 100
    assert idata.attrs["reparam"] == "a: 4 of 8 non-centred"
    assert set(idata.posterior.data_vars) == {"mu", "s", "a"}


@pytest.mark.skipif(
    not (pdb.default_root() / pdb.names()[0]).is_dir(),
    reason="posteriordb folder absent (../shared/posteriordb or $PYROFLOWS_POSTERIORDB)",
)
def test_centred_eight_schools_against_the_reference_posterior():
    _, data, reference = pdb.load("eight_schools_noncentered")
    idata = mcmc.sample(
        mcmc.HMC(model=eight_schools_centered), num_chains=256, num_samples=400,
        warmup_steps=400, seed=1, progress=False,
        model_args=(data["J"], data["y"], data["sigma"]),
    )
    assert idata.attrs["reparam"] == "theta: 8 of 8 non-centred"
    assert int(idata.sample_stats["diverging"].sum()) == 0
    rows = pdb.compare(idata, {k: v for k, v in reference.items() if k.split("[")[0] in
                               ("mu", "tau", "theta")})
    for name, row in rows.items():
        assert abs(row["z"]) < 4, (name, row)
        assert abs(row["sd_ratio"] - 1) < 0.1, (name, row)
        assert row["rhat"] < 1.01, (name, row)
