"""AutoFlow with its defaults against reference posteriors (posteriordb): two quick checks.

benchmarks/vi_posteriors.py runs all five posteriors and Pyro's autoguides for comparison.
"""

import math

import pyro
import pytest

from pyroflows.datasets import posteriordb
from pyroflows.guides import AutoFlow, fit_guide

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not posteriordb.default_root().is_dir(), reason="../shared/posteriordb is absent"
    ),
]


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
