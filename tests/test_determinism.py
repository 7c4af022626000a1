"""With a seed, fit, Flow.sample and the MCMC driver are bit-identical across runs on the CPU."""

import numpy as np
import torch

from pyroflows import build_flow
from pyroflows.energies import get as get_energy
from pyroflows.mcmc import HMC, MH, sample


def test_flow_sample_is_deterministic_under_a_seed():
    flow = build_flow("maf", 3, num_layers=2, hidden_dims=(8,))
    draws = []
    for _ in range(2):
        torch.manual_seed(42)
        draws.append(flow.sample((50,)))
    assert torch.equal(draws[0], draws[1])


def test_mcmc_driver_is_deterministic_under_a_seed():
    energy = get_energy("banana").energy
    for make in [lambda: HMC(energy, step_size=0.2, num_steps=5), lambda: MH(energy)]:
        runs = [
            sample(make(), torch.zeros(8, 2), 30, warmup_steps=20, progress=False, seed=3)
            for _ in range(2)
        ]
        a, b = (r.posterior["x"].values for r in runs)
        assert np.array_equal(a, b)
        assert np.array_equal(
            runs[0].sample_stats["acceptance_rate"].values,
            runs[1].sample_stats["acceptance_rate"].values,
        )
