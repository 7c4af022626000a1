"""The default sampler on Pyro models of posteriordb posteriors, against the reference summaries
of long Stan runs (skipped when ../shared/posteriordb is absent); load() and compare()."""

import numpy as np
import pyro
import pytest
import torch

from pyroflows import mcmc
from pyroflows.datasets import posteriordb

pytestmark = pytest.mark.usefixtures("one_thread")

needs_db = pytest.mark.skipif(
    not (posteriordb.default_root() / posteriordb.names()[0]).is_dir(),
    reason="posteriordb folder absent (../shared/posteriordb or $PYROFLOWS_POSTERIORDB)",
)


@needs_db
@pytest.mark.parametrize(
    "name, num_chains, num_samples, warmup_steps",
    [
        ("eight_schools_noncentered", 64, 200, 400),
        ("garch11", 32, 200, 400),
        ("blr", 64, 150, 400),
    ],
)
def test_default_sampler_matches_reference(name, num_chains, num_samples, warmup_steps):
    """Every mean within 4 MCSE (reference sd / sqrt(our ESS)), every sd within 10%, no
    divergences: the issue's goals, at a CI-sized run. R-hat < 1.05 here: with 200 draws per
    chain its estimate varies by a few hundredths (the 1.01 goal is checked at benchmark size,
    benchmarks/posteriors.py)."""
    model, data, reference = posteriordb.load(name)
    idata = mcmc.sample(
        mcmc.HMC(model=model), num_samples=num_samples, warmup_steps=warmup_steps,
        num_chains=num_chains, seed=0, progress=False, model_kwargs=data,
    )
    rows = posteriordb.compare(idata, reference)
    assert set(rows) == set(reference)
    for param, row in rows.items():
        assert abs(row["z"]) < 4, (param, row)
        assert abs(row["sd_ratio"] - 1) < 0.1, (param, row)
        assert row["rhat"] < 1.05, (param, row)
    assert int(idata.sample_stats["diverging"].sum()) == 0


@needs_db
def test_load_every_posterior():
    for name in posteriordb.names():
        model, data, reference = posteriordb.load(name)
        sites = {k.split("[")[0] for k in reference}
        trace = pyro.poutine.trace(model).get_trace(**data)
        assert sites <= set(trace.nodes), name
        assert torch.isfinite(trace.log_prob_sum()), name
        assert all(v.dtype == torch.float64 for v in data.values() if torch.is_tensor(v))


def test_compare_scores_draws_in_mcse_units():
    gen = np.random.default_rng(0)
    reference = {"a[0]": {"mean": 1.0, "sd": 2.0}, "a[1]": {"mean": -1.0, "sd": 0.5},
                 "b": {"mean": 0.0, "sd": 1.0}}
    draws = {
        "a": np.stack([1 + 2 * gen.standard_normal((4, 500)),
                       -1 + 0.5 * gen.standard_normal((4, 500))], -1),
        "b": 0.3 + gen.standard_normal((4, 500)),  # biased by 0.3 sd = 0.3 * sqrt(2000) MCSE
    }
    rows = posteriordb.compare(draws, reference)
    assert abs(rows["a[0]"]["z"]) < 4 and abs(rows["a[1]"]["sd_ratio"] - 1) < 0.1
    assert rows["b"]["z"] > 8 and abs(rows["b"]["err_sd"] - 0.3) < 0.1
    assert rows["a[0]"]["rhat"] < 1.01
    with pytest.raises(ValueError, match="no site 'c'"):
        posteriordb.compare(draws, {"c": {"mean": 0.0, "sd": 1.0}})


def test_compare_includes_the_reference_own_error():
    """With many more draws than the reference has, the reference mean's own error dominates:
    an offset of 2 reference standard errors is z ~ 2, not ~ 2 * sqrt(draws / reference)."""
    gen = np.random.default_rng(1)
    draws = {"a": 0.02 + gen.standard_normal((4, 50_000))}  # reference se 1 / sqrt(10^4)
    row = posteriordb.compare(draws, {"a": {"mean": 0.0, "sd": 1.0, "draws": 10_000}})["a"]
    assert row["ref_se"] == pytest.approx(0.01)
    assert 1.0 < row["z"] < 3.0
    alone = posteriordb.compare(draws, {"a": {"mean": 0.0, "sd": 1.0}})["a"]
    assert alone["ref_se"] == 0.0 and alone["z"] > 6


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        posteriordb.load("radon")
    with pytest.raises(ValueError, match="not found under"):
        posteriordb.load("blr", root=tmp_path)


def test_ordered_and_flat_distributions():
    base = torch.distributions.Normal(torch.zeros(()), 2.0)
    ordered = posteriordb.OrderedIID(base, 2)
    x = ordered.sample((1000,))
    assert x.shape == (1000, 2) and (x[:, 0] <= x[:, 1]).all()
    # the order statistics' density integrates to one: 2 * p(x1) p(x2) on x1 < x2
    value = torch.tensor([[-1.0, 0.5]])
    assert torch.allclose(ordered.log_prob(value), base.log_prob(value).sum(-1) + np.log(2))
    flat = posteriordb.Flat(torch.distributions.constraints.positive, (3,), dtype=torch.float64)
    assert torch.equal(flat.sample(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(flat.log_prob(torch.rand(5, 3)), torch.zeros(5, 3))
