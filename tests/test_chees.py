"""ChEES-HMC (the default warm-up of HMC with many chains) against exact answers, within
Monte-Carlo error from arviz's ESS: an ill-conditioned rotated Gaussian, the banana, the funnel's
scale variable; its statistics and parameters."""

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch

from pyroflows import energies, mcmc
from pyroflows.mcmc.adapt import ChEESAdaptation
from pyroflows.mcmc.core import diagonal_metric

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz's refactor notice
pytestmark = pytest.mark.usefixtures("one_thread")


def rotated_gaussian(dim: int, condition: float, seed: int = 0) -> energies.Gaussian:
    """N(0, Q diag(eigenvalues) Q^T), eigenvalues log-spaced from 1 to ``condition``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(condition), dim, dtype=torch.float64)
    return energies.Gaussian(torch.zeros(dim), (q @ torch.diag(eig) @ q.T).float())


def run(target, num_chains, warmup, draws, seed=0, **options):
    kernel = mcmc.HMC(target, **options)
    init = torch.randn(
        num_chains, *target.event_shape, generator=torch.Generator().manual_seed(seed)
    )
    idata = mcmc.sample(kernel, init, draws, warmup_steps=warmup, progress=False, seed=seed)
    return kernel, idata


def assert_within_mc_error(values, exact, z=4.5):
    """|mean(f) - E f| <= z sd(f) / sqrt(ESS(f)) for f of shape (chain, draw)."""
    ess = float(az.ess(values))
    se = values.std() / math.sqrt(ess)
    assert abs(values.mean() - exact) <= z * se, (values.mean(), exact, se, ess)


def check_gaussian(idata, target):
    x = idata.posterior["x"].values.astype(np.float64)
    cov = target.covariance.double().numpy()
    # along the eigenvectors, where the scales differ by the condition number
    eig, vec = np.linalg.eigh(cov)
    z = x @ vec
    for i in range(z.shape[-1]):
        assert_within_mc_error(z[..., i], 0.0)
        assert_within_mc_error(z[..., i] ** 2, eig[i])


def test_chees_rotated_gaussian_moments():
    target = rotated_gaussian(10, 100.0)
    kernel, idata = run(target, 128, 300, 200)
    assert kernel.uses_chees(128) and kernel.params.jittered
    check_gaussian(idata, target)
    assert idata.sample_stats["diverging"].values.sum() == 0


@pytest.mark.slow
def test_chees_100d_condition_1000_moments():
    target = rotated_gaussian(100, 1000.0)
    _, idata = run(target, 128, 600, 400)
    check_gaussian(idata, target)


def test_chees_banana_moments_and_few_divergences():
    target = energies.get("banana")  # x1 ~ N(0, 1), x2 | x1 ~ N(x1^2 - 1, 1): var 1 and 3
    kernel, idata = run(target, 128, 300, 300)
    x = idata.posterior["x"].values.astype(np.float64)
    assert_within_mc_error(x[..., 0], 0.0)
    assert_within_mc_error(x[..., 1], 0.0)
    assert_within_mc_error(x[..., 0] ** 2, 1.0)
    assert_within_mc_error(x[..., 1] ** 2, 3.0)
    summary = mcmc.summarize(idata)
    assert summary["divergence_rate"] < 1e-3, summary["advice"]
    assert summary["max_rhat"] < 1.02
    # the learned trajectory stays short enough to pay: a few units, not tens
    length = float(kernel.params.step_size) * kernel.params.num_steps
    assert 1.0 < length < 8.0


def test_chees_learns_a_quarter_period_on_a_standard_normal():
    target = energies.Gaussian(torch.zeros(5), torch.ones(5))
    kernel, idata = run(target, 256, 200, 20)
    length = float(kernel.params.step_size) * kernel.params.num_steps
    # E_h sin^2(hT) / sqrt(T), h ~ U(0, 1) (ChEES of a unit Gaussian, cost-discounted) peaks at
    # T ~ 1.93 and has a second local maximum at T ~ 5.17, where the stochastic ascent also ends
    # for some seeds (diagonal or dense metric alike)
    assert 1.2 < length < 3.5 or 4.3 < length < 7.0
    assert kernel.inverse_mass_matrix.shape == (5, 5)  # dense by default at this size
    assert torch.allclose(kernel.inverse_mass_matrix, torch.eye(5), atol=0.25)


@pytest.mark.parametrize("width, longest", [(3.0, 4 * math.pi * 3.0), (0.1, 4 * math.pi)])
def test_chees_keeps_trajectories_within_two_periods_of_the_widest_coordinate(width, longest):
    # past a few periods ChEES's gradient is mostly noise and T wanders without coming back
    # (a regression posterior kept 365 steps per transition where 1.5 do): a T far too long
    # is cut to two periods of a Gaussian as wide as the chains' widest whitened coordinate
    adapter = ChEESAdaptation(1000, 0.651, 0.025, max_steps=10**6, adapt_mass_matrix=False)
    g = torch.Generator().manual_seed(0)
    chains = torch.randn(4096, 2, generator=g, dtype=torch.float64)
    chains = chains * torch.tensor([width / 3, width], dtype=torch.float64)
    step = torch.tensor(0.1, dtype=torch.float64)
    state = adapter.init(step, diagonal_metric(torch.ones(2, dtype=torch.float64)), 4096)
    state = adapter.restart(state, step)  # past the per-chain phase: one shared step size
    state = state._replace(t=adapter.initial_steps + 10, log_trajectory=torch.tensor(
        math.log(1e4), dtype=torch.float64))
    ones = torch.ones(4096, dtype=torch.float64)
    proposal = chains.flip(0)  # any end points: the cut does not depend on them
    new, _ = adapter.update(state, chains, ones, proposal, proposal, ones, ones < 0,
                            torch.tensor(1.0, dtype=torch.float64))
    length = math.exp(float(new.log_trajectory))
    assert abs(length / longest - 1) < 0.05, (length, longest)


@pytest.mark.slow
def test_chees_funnel_scale_variable():
    target = energies.get("funnel", dim=5)  # v ~ N(0, 3^2)
    _, idata = run(target, 256, 1000, 500, target_accept_prob=0.9, max_steps=256)
    v = idata.posterior["x"].values[..., 0].astype(np.float64)
    assert_within_mc_error(v, 0.0)
    assert_within_mc_error(v**2, 9.0)


def test_sample_stats_of_jittered_and_fixed_trajectories():
    target = energies.get("gaussian", dim=3, correlation=0.5)
    _, chees = run(target, 32, 100, 30, adapt="chees")
    stats = chees.sample_stats
    steps = stats["n_steps"].values
    assert (steps >= 1).all() and len(np.unique(steps)) > 1  # jittered lengths
    assert (steps == steps[:1]).all()  # the same for every chain: one batched call per step
    assert np.unique(stats["step_size"].values).size == 1  # frozen after warm-up
    assert (stats["energy"].values >= -stats["lp"].values - 1e-4).all()  # H >= U
    _, fixed = run(target, 32, 100, 30, num_steps=4)
    assert (fixed.sample_stats["n_steps"].values == 4).all()
    _, few = run(target, 8, 50, 5)  # "auto" with few chains: fixed-length HMC
    assert (few.sample_stats["n_steps"].values == 10).all()


def test_chees_with_few_chains_still_converges():
    """With 16 chains the ChEES statistic is noisy; the trajectory must not collapse."""
    target = energies.get("banana")
    kernel, idata = run(target, 16, 300, 200, adapt="chees")
    length = float(kernel.params.step_size) * kernel.params.num_steps
    assert length > 1.0
    assert float(az.rhat(idata)["x"].max()) < 1.05


def test_per_chain_phase_brings_far_chains_in():
    """Chains started 1e3 sds away from a tight Gaussian (sd 1e-3) with most started near it:
    each chain's own step size in the first phase brings every one to the posterior, and the
    moments come out right (a shared step size would be pinned by the far chains)."""
    target = energies.Gaussian(torch.zeros(3), 1e-6 * torch.eye(3))
    init = 1e-3 * torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    init[:4] += 1.0
    kernel = mcmc.HMC(target)
    idata = mcmc.sample(kernel, init, 200, warmup_steps=400, progress=False, seed=0)
    x = idata.posterior["x"].values
    assert np.abs(x.mean((0, 1))).max() < 2e-4
    np.testing.assert_allclose(x.std((0, 1)), 1e-3, rtol=0.1)
    assert float(az.rhat(idata)["x"].max()) < 1.05


def test_robust_variance_ignores_outlying_chains():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0]).double()
    x[:20] += 1e6
    var = mcmc.adapt.robust_variance(x, torch.ones(2, dtype=torch.float64))
    np.testing.assert_allclose(var.numpy(), [1.0, 9.0], rtol=0.25)


def test_restart_stragglers_moves_only_far_chains():
    target = energies.Gaussian(torch.zeros(2), torch.eye(2))
    position = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    position[:3] = 50.0
    state = mcmc.core.hmc_init(position, mcmc.core.EnergyFunction(target, 1))
    new = mcmc.core.restart_stragglers(state, torch.Generator().manual_seed(1))
    assert new.position[:3].abs().max() < 5
    torch.testing.assert_close(new.position[3:], position[3:])
    rows = (new.position[:3, None] == position[None, 3:]).all(-1).any(-1)
    assert bool(rows.all())  # copies of other chains
    torch.testing.assert_close(new.energy, target(new.position))


# -- dense mass matrix ------------------------------------------------------------------------
def test_dense_metric_algebra():
    """p ~ N(0, M) by the Cholesky factor, M^{-1}p, the kinetic energy and the whitening agree
    with the dense inverse mass matrix, and a diagonal matrix gives the diagonal metric's
    answers."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(4, dtype=torch.float64)
    metric = mcmc.core.dense_metric(cov)
    assert metric.dense
    p = torch.randn(7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(metric.velocity(p), p @ cov)
    torch.testing.assert_close(metric.kinetic(p), 0.5 * ((p @ cov) * p).sum(1))
    torch.testing.assert_close(metric.whiten(p) @ metric.factor.T, p)
    draws = metric.momentum(torch.empty(200_000, 4, dtype=torch.float64), g)
    mass = torch.linalg.inv(cov)
    torch.testing.assert_close(draws.T.cov(), mass, atol=0.03 * mass.abs().max(), rtol=0)
    variance = torch.tensor([0.5, 2.0, 3.0, 4.0], dtype=torch.float64)
    diag, dense = mcmc.core.diagonal_metric(variance), mcmc.core.dense_metric(variance.diag())
    assert not diag.dense
    for f in ("velocity", "kinetic", "whiten"):
        torch.testing.assert_close(getattr(dense, f)(p), getattr(diag, f)(p))


def test_dense_metric_falls_back_to_the_diagonal():
    cov = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # not positive definite
    metric = mcmc.core.dense_metric(cov)
    torch.testing.assert_close(metric.inverse_mass, torch.eye(2))
    assert torch.isfinite(metric.whitener).all()


def test_dense_window_estimate_is_the_pooled_covariance_without_stragglers():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(48, 2, 3, generator=g, dtype=torch.float64) + 5 for _ in range(4)]
    weights = [torch.rand(48, generator=g) > 0.2 for _ in batches]
    batches[0][weights[0].logical_not()] += 1e6  # far stragglers, weighted out
    state, welford = mcmc.adapt.EMPTY_COVARIANCE, mcmc.adapt.EMPTY_WELFORD
    for batch, weight in zip(batches, weights, strict=True):
        state = mcmc.adapt.covariance_update(state, batch, weight)
        welford = mcmc.adapt.welford_update(welford, batch.flatten(1), weight)
    assert state.count.shape == (8,)  # 48 chains: 8 groups
    kept = torch.cat([b[w] for b, w in zip(batches, weights, strict=True)]).flatten(1)
    n = kept.shape[0]
    assert float(state.count.sum()) == n
    mean = state.shift + state.total.sum(0) / n
    pooled = (state.cross.sum(0) - state.total.sum(0).outer(state.total.sum(0)) / n) / (n - 1)
    torch.testing.assert_close(mean, kept.mean(0))
    torch.testing.assert_close(pooled, kept.T.cov())
    shrunk = mcmc.adapt.shrunk_covariance(state)
    # the diagonal is the diagonal estimate's; independent coordinates: off-diagonals mostly gone
    torch.testing.assert_close(shrunk.diagonal(), mcmc.adapt.welford_variance(welford))
    off = ~torch.eye(6, dtype=torch.bool)
    assert shrunk[off].abs().max() < 0.5 * pooled[off].abs().max()


def test_dense_window_estimate_keeps_a_real_correlation():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0], [0.95, 0.31]], dtype=torch.float64)
    state = mcmc.adapt.EMPTY_COVARIANCE
    draws = []
    for _ in range(20):
        batch = torch.randn(64, 2, generator=g, dtype=torch.float64) @ mix.T
        draws.append(batch)
        state = mcmc.adapt.covariance_update(state, batch)
    pooled = torch.cat(draws).T.cov()
    shrunk = mcmc.adapt.shrunk_covariance(state)
    torch.testing.assert_close(shrunk[0, 1], pooled[0, 1], rtol=0.03, atol=0)


@pytest.mark.parametrize("adapt", ["chees", "fixed"])
def test_dense_mass_matrix_learns_a_strong_correlation(adapt):
    """Correlation 0.99: the dense inverse mass matrix is the posterior covariance, so the
    whitened target is isotropic, and the moments are right."""
    cov = torch.tensor([[1.0, 0.99 * 3], [0.99 * 3, 9.0]])
    target = energies.Gaussian(torch.zeros(2), cov)
    options = {"adapt": adapt} if adapt == "chees" else {"num_steps": 5}
    kernel, idata = run(target, 64, 400, 100, **options)
    assert kernel.inverse_mass_matrix.shape == (2, 2)
    torch.testing.assert_close(kernel.inverse_mass_matrix, cov, rtol=0.15, atol=0.05)
    check_gaussian(idata, target)


def test_mass_option_and_auto_rule():
    target = energies.Gaussian(torch.zeros(3), torch.ones(3))
    init = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    kernel = mcmc.HMC(target, mass="diag")
    mcmc.sample(kernel, init, 5, warmup_steps=30, progress=False, seed=0)
    assert kernel.inverse_mass_matrix.shape == (3,)
    auto = mcmc.HMC(target)
    assert auto.uses_dense_mass(16, 200)
    assert not auto.uses_dense_mass(8, 3)  # few chains: too few draws per window
    assert not auto.uses_dense_mass(1024, 201)  # large: O(D^2) per leapfrog step
    assert not mcmc.HMC(target, adapt_mass_matrix=False).uses_dense_mass(1024, 3)
    assert mcmc.HMC(target, mass="dense").uses_dense_mass(1, 1000)
    with pytest.raises(ValueError, match="mass"):
        mcmc.HMC(target, mass="full")
