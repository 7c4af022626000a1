"""The pure kernel core: determinism from a seeded generator, second runs equal fresh runs, the
global generator untouched, distribution-validation errors rejected per chain, a Pyro model passed
as an energy refused with a clear message, and bad input."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap
from pyro.infer import MCMC

from pyroflows import build_flow, energies, mcmc
from pyroflows.mcmc.core import EnergyFunction

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz's refactor notice
pytestmark = pytest.mark.usefixtures("one_thread")

GAUSS = energies.get("gaussian", dim=3, correlation=0.7)

KERNELS = {
    "hmc-chees": lambda e: mcmc.HMC(e, adapt="chees"),
    "hmc-fixed": lambda e: mcmc.HMC(e, num_steps=4),
    "mala": lambda e: mcmc.MALA(e),
    "mh": lambda e: mcmc.MH(e),
    "mh-flow": lambda e: mcmc.MH(e, proposal=build_flow("realnvp", 3, num_layers=2)),
    "sgld": lambda e: mcmc.SGLD(e, step_size=0.05),
    "gibbs": lambda e: mcmc.Gibbs(e),
}


def _run(kernel, init, seed=0, **kw):
    kw = {"warmup_steps": 30, "progress": False, "seed": seed, **kw}
    return mcmc.sample(kernel, init, 20, **kw)


@pytest.mark.parametrize("name", list(KERNELS))
def test_step_is_pure_given_the_generator(name):
    kernel = KERNELS[name](GAUSS)
    state = kernel.init(torch.randn(16, 3))
    params = kernel.default_params(state)
    out = [kernel.step(state, torch.Generator().manual_seed(5), params) for _ in range(2)]
    assert torch.equal(out[0][0].position, out[1][0].position)
    assert torch.equal(out[0][1].accept_prob, out[1][1].accept_prob)
    before = state.position.clone()
    kernel.step(state, torch.Generator().manual_seed(6), params)
    assert torch.equal(state.position, before)  # the input state is not modified


@pytest.mark.parametrize("name", list(KERNELS))
def test_second_run_equals_fresh_run_and_global_rng_untouched(name):
    init = torch.randn(16, 3)
    kernel = KERNELS[name](GAUSS)
    first = _run(kernel, init)
    rng = torch.get_rng_state()
    second = _run(kernel, init)  # the same kernel object again
    assert torch.equal(torch.get_rng_state(), rng)  # seed= never touches torch's generator
    fresh = _run(KERNELS[name](GAUSS), init)
    x1, x2, x3 = (i.posterior["x"].values for i in (first, second, fresh))
    if name == "mh-flow":  # a fresh flow has other weights: compare the same kernel's two runs
        np.testing.assert_array_equal(x1, x2)
    else:
        np.testing.assert_array_equal(x2, x3)
        np.testing.assert_array_equal(x1, x3)
    other = _run(kernel, init, seed=1).posterior["x"].values
    assert not np.array_equal(other, x1)


def test_sgld_second_run_starts_at_the_initial_step_size():
    """The reported bug: a second run of the same SGLD kernel started at 0.0187, not 0.05."""
    kernel = mcmc.SGLD(GAUSS, step_size=0.05, decay=0.55, decay_steps=100)
    runs = [_run(kernel, torch.zeros(8, 3), warmup_steps=0) for _ in range(2)]
    for idata in runs:
        assert idata.sample_stats["step_size"].values[0, 0] == pytest.approx(0.05)


def test_run_chains_contract():
    kernel = mcmc.HMC(GAUSS, num_steps=3)
    gen = torch.Generator().manual_seed(0)
    draws, stats, attrs = mcmc.driver.run_chains(
        kernel, torch.randn(8, 3), 7, warmup_steps=5, thinning=2, progress=False, generator=gen
    )
    assert draws.shape == (7, 8, 3)
    assert all(v.shape == (8, 7) for v in stats.values())
    assert set(mcmc.driver.STATS) == set(stats)
    assert attrs["warmup_steps"] == 5 and attrs["thinning"] == 2
    # the Hamiltonian is at least the potential energy: kinetic energy >= 0
    assert (stats["energy"] >= -stats["lp"] - 1e-4).all()


def test_energy_path_init_from_num_chains():
    target = energies.get("banana")
    idata = mcmc.sample(mcmc.MH(target), num_chains=6, num_samples=5, progress=False, seed=0)
    assert idata.posterior["x"].shape == (6, 5, 2)


# -- issue 16.2: validation errors are rejected proposals -----------------------------------------
def _validated_energy(x):
    """A Normal whose scale 2 - x_0 must be positive: argument validation raises beyond x_0 = 2."""
    scale = 2.0 - x[..., 0]
    return -dist.Normal(0.0, scale).log_prob(x[..., 1]) - dist.Normal(0.0, 1.0).log_prob(x[..., 0])


def test_energy_function_isolates_rows_that_fail_validation():
    energy = EnergyFunction(_validated_energy, 1)
    x = torch.zeros(9, 2)
    x[3, 0], x[7, 0] = 2.5, 3.0
    u, g = energy.value_and_grad(x)
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[3, 7]] = True
    assert torch.isnan(u[bad]).all() and torch.isfinite(u[~bad]).all()
    assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all()
    with pytest.raises(ValueError, match="constraint"):  # unguarded (the starting points)
        energy(x, guard=False)


def test_energy_function_bisects_rows_finite_without_validation():
    """An Exponential at a negative value: finite without validation, so bisection finds it."""
    energy = EnergyFunction(lambda x: -dist.Exponential(1.0).log_prob(x).sum(-1), 1)
    x = torch.rand(8, 2)
    x[5, 1] = -1.0
    u = energy(x)
    assert torch.isnan(u[5]) and torch.isfinite(u[torch.arange(8) != 5]).all()


@pytest.mark.parametrize("make", [lambda e: mcmc.HMC(e, num_steps=5), lambda e: mcmc.MH(e)])
def test_validation_errors_are_rejected_and_counted(make):
    assert pyro.distributions.is_validation_enabled()
    idata = _run(make(_validated_energy), 0.3 * torch.randn(64, 2), warmup_steps=60)
    x = idata.posterior["x"].values
    assert np.isfinite(x).all() and (x[..., 0] < 2).all()
    assert idata.sample_stats["nonfinite"].values.sum() + idata.attrs["warmup_nonfinite"] > 0
    assert pyro.distributions.is_validation_enabled()  # never switched off for the user


# -- issue 16.1: a Pyro model where an energy belongs ---------------------------------------------
def _model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("n", len(data)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=data)


def test_pyro_model_passed_as_energy_is_a_clear_type_error():
    kernel = mcmc.HMC(_model)
    with pytest.raises(TypeError, match=r"latent sample sites mu\).*model=fn"):
        mcmc.sample(kernel, torch.zeros(8, 1), 5, progress=False)
    with pytest.raises(TypeError, match="one argument x"):
        mcmc.HMC(lambda: 0.0)
    with pytest.raises(TypeError, match="exactly one"):
        mcmc.SGLD()
    with pytest.raises(TypeError, match="exactly one"):
        mcmc.MH(GAUSS, model=_model)
    with pytest.raises(TypeError, match=r"Gibbs does not sample Pyro models.*HMC\(model"):
        mcmc.Gibbs(GAUSS, model=_model)


def test_model_kernel_keeps_the_model():
    for kernel in (mcmc.HMC(model=_model), mcmc.MH(model=_model), mcmc.SGLD(model=_model)):
        assert kernel.model is _model and kernel.energy is None
    with pytest.raises(ValueError, match="runs through pyroflows.mcmc.sample"):
        MCMC(mcmc.HMC(model=_model), num_samples=5, disable_progbar=True).run(torch.zeros(3))


# -- bad input --------------------------------------------------------------------------------
def test_bad_sample_arguments():
    init = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="adapt"):
        mcmc.HMC(GAUSS, adapt="nuts")
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.sample(mcmc.MH(GAUSS), init, 5, num_chains=3, progress=False)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.sample(mcmc.MH(GAUSS), init, 5, num_chains=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        mcmc.sample(mcmc.MH(GAUSS), init, 5, seed=-1, progress=False)
    with pytest.raises(ValueError, match="model_args"):
        mcmc.sample(mcmc.MH(GAUSS), init, 5, model_args=(1,), progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        mcmc.sample(mcmc.MH(GAUSS), init)
    with pytest.raises(ValueError, match="init must be given"):
        mcmc.sample(mcmc.MH(lambda x: (x**2).sum(-1)), num_samples=5, num_chains=4)
    with pytest.raises(ValueError, match="learning_rate"):
        mcmc.HMC(GAUSS, learning_rate=0.0)


def test_summarize_puts_divergences_in_context():
    kernel = mcmc.HMC(
        energies.get("funnel", dim=3), step_size=1.5, num_steps=3, adapt_step_size=False
    )
    idata = _run(kernel, 0.1 * torch.randn(32, 3), warmup_steps=0)
    m = mcmc.summarize(idata)
    assert m["divergences"] > 0
    assert m["divergence_rate"] == pytest.approx(m["divergences"] / (32 * 20))
    assert 0 < m["diverging_chains"] <= 32
    assert "divergent transitions" in m["advice"] and "target_accept_prob" in m["advice"]
    calm = mcmc.summarize(_run(mcmc.HMC(GAUSS, num_steps=3), torch.randn(32, 3)))
    assert calm["advice"].startswith("No divergent transitions after warm-up.")


@pytest.mark.parametrize("name", ["hmc-chees", "hmc-fixed", "sgld", "mh-flow"])
def test_default_device_trap(name):
    # 16 chains: both HMC warm-ups adapt a dense mass matrix in a window
    kernel, x0 = KERNELS[name](GAUSS), torch.randn(16, 3)
    with default_device_trap():
        idata = _run(kernel, x0)
    assert np.isfinite(idata.posterior["x"].values).all()


def test_halton_is_low_discrepancy():
    from pyroflows.mcmc.core import halton

    values = [halton(i) for i in range(1, 257)]
    assert all(0 < v < 1 for v in values)
    assert max(abs(np.mean(values[:n]) - 0.5) for n in (16, 64, 256)) < 1 / 16
    assert math.isclose(halton(1), 0.5) and math.isclose(halton(3), 0.75)
