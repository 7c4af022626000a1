"""Batched-chain kernels against exact answers, within Monte-Carlo error from arviz's ESS: Gaussian
moments, a bimodal mixture (KS distance), an enumerable Ising model (total variation), the flow
independence sampler's invariance; R-hat; Pyro MCMC and arviz interop; bad input; devices."""

import json
import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from conftest import default_device_trap
from pyro.infer import MCMC

from pyroflows import build_flow, energies, mcmc

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz's refactor notice

GAUSS = energies.get("gaussian", dim=3, correlation=0.7)
SPINS = torch.tensor([-1.0, 1.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensor programs on a shared CPU


def run(kernel, init, num_samples=400, warmup_steps=200, **kw):
    return mcmc.sample(
        kernel, init, num_samples, warmup_steps=warmup_steps, progress=False, seed=0, **kw
    )


def draws(idata):
    return idata.posterior["x"].values  # (chain, draw, *event)


def assert_mean_within_mc_error(values, exact, z=4.5, bias=0.0):
    """|mean(f) - E[f]| <= z * sd(f) / sqrt(ESS(f)) + bias, for f of shape (chain, draw)."""
    ess = float(az.ess(values))
    se = values.std() / math.sqrt(ess)
    assert abs(values.mean() - exact) <= z * se + bias, (values.mean(), exact, se, ess)


def assert_gaussian_moments(idata, target, bias=0.0):
    x = draws(idata)
    mean, cov = target.loc.double().numpy(), target.covariance.double().numpy()
    d = x.shape[-1]
    for i in range(d):
        assert_mean_within_mc_error(x[..., i], mean[i], bias=bias)
        for j in range(i, d):
            assert_mean_within_mc_error(
                (x[..., i] - mean[i]) * (x[..., j] - mean[j]), cov[i, j], bias=bias
            )


@pytest.mark.parametrize(
    "make",
    [
        lambda t: mcmc.HMC(t, step_size=0.2, num_steps=8),
        lambda t: mcmc.MALA(t, step_size=0.5),
        lambda t: mcmc.MH(t),
        lambda t: mcmc.Gibbs(t),
    ],
    ids=["hmc", "mala", "mh", "metropolis-within-gibbs"],
)
def test_correlated_gaussian_moments(make):
    idata = run(make(GAUSS), torch.randn(128, 3))
    assert_gaussian_moments(idata, GAUSS)
    assert not idata.sample_stats["diverging"].values.any()


def test_hmc_adapts_to_target_acceptance_and_mass():
    scales = torch.logspace(-1, 1, 10)  # very different: the mass matrix must learn them
    kernel = mcmc.HMC(lambda x: 0.5 * ((x / scales) ** 2).sum(-1), step_size=0.01, num_steps=5)
    idata = run(kernel, torch.randn(128, 10), num_samples=200, warmup_steps=300)
    assert abs(idata.sample_stats["acceptance_rate"].values.mean() - 0.8) < 0.1
    # 128 chains and 10 coordinates: a dense mass matrix by default; its diagonal learns the scales
    assert torch.allclose(kernel.inverse_mass_matrix.diagonal().sqrt(), scales, rtol=0.2)


def test_sgld_correlated_gaussian_with_decaying_steps():
    kernel = mcmc.SGLD(GAUSS, step_size=0.05, decay=0.55, decay_steps=100)
    idata = run(kernel, torch.randn(256, 3), num_samples=600, warmup_steps=300)
    # unadjusted: a variance bias of order the final step size (~0.01) on top of the MC error
    assert_gaussian_moments(idata, GAUSS, bias=0.03)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_sgld_stochastic_energy(preconditioned):
    """Mini-batch posterior of a Gaussian mean: y_i ~ N(theta, 1), theta ~ N(0, 10^2)."""
    g = torch.Generator().manual_seed(1)
    y = 1.5 + torch.randn(1000, generator=g)
    n, batch = len(y), 50

    def energy(theta):  # unbiased mini-batch estimate of U(theta)
        idx = torch.randint(0, n, (batch,))
        return (n / batch) * 0.5 * ((y[idx] - theta) ** 2).sum(-1) + theta[..., 0] ** 2 / 200

    post_var = 1 / (n + 1 / 100)
    post_mean = post_var * y.sum().item()
    # RMSprop divides by the gradient's scale (~ n / sqrt(batch) here), so its step is larger
    step_size = 2e-2 if preconditioned else 1e-4
    kernel = mcmc.SGLD(
        energy, step_size=step_size, decay=0.55, decay_steps=100, preconditioned=preconditioned
    )
    x = draws(run(kernel, torch.zeros(64, 1), num_samples=300, warmup_steps=300))[..., 0]
    assert abs(x.mean() - post_mean) < 0.2 * math.sqrt(post_var) + 4 * x.std() / math.sqrt(64)
    assert 0.3 < x.var() / post_var < 3  # mini-batch noise inflates it somewhat; the order is right


def _mixture_cdf(target, t):
    locs, scales, w = (target.locs[:, 0].double(), target.scales.double(), target.weights.double())
    return (w * torch.special.ndtr((torch.as_tensor(t)[..., None] - locs) / scales)).sum(-1).numpy()


@pytest.mark.parametrize(
    "make",
    [lambda t: mcmc.MH(t), lambda t: mcmc.HMC(t, step_size=0.3, num_steps=10)],
    ids=["mh", "hmc"],
)
def test_bimodal_mixture_ks(make):
    target = energies.Mixture([[-2.0], [2.0]], scales=1.0, weights=[0.3, 0.7])
    idata = run(make(target), 3 * torch.randn(128, 1), num_samples=500, warmup_steps=300)
    x = draws(idata)[..., 0]
    ess = min(float(az.ess(x)), float(az.ess((x > 0).astype(float))))
    sorted_x = np.sort(x.ravel())
    ecdf = np.arange(1, len(sorted_x) + 1) / len(sorted_x)
    ks = np.abs(ecdf - _mixture_cdf(target, sorted_x)).max()
    assert ks < 1.63 / math.sqrt(ess) + 2 / len(sorted_x)  # 99% KS bound at the effective size
    assert (x > 0).mean() == pytest.approx(0.7, abs=0.05)


def _tv_bound(probs, n_eff, rng, reps=50):
    """The 99th percentile of the TV distance of n_eff exact draws from probs."""
    tv = [0.5 * np.abs(rng.multinomial(n_eff, probs) / n_eff - probs).sum() for _ in range(reps)]
    return float(np.quantile(tv, 0.99))


def test_gibbs_ising_exact_enumeration():
    target = energies.get("ising", size=3, coupling=0.4, field=0.1)
    init = torch.randint(0, 2, (256, 3, 3)).float() * 2 - 1
    idata = run(mcmc.Gibbs(target, support=SPINS), init, num_samples=200, warmup_steps=20)
    x = draws(idata).reshape(*draws(idata).shape[:2], 9)
    codes = ((x > 0) * (2 ** np.arange(9))).sum(-1)
    probs = target.probs().numpy()
    empirical = np.bincount(codes.ravel(), minlength=512) / codes.size
    tv = 0.5 * np.abs(empirical - probs).sum()
    n_eff = int(min(az.ess(x.sum(-1)), az.ess(idata.sample_stats["energy"].values)))
    assert tv < 1.2 * _tv_bound(probs, n_eff, np.random.default_rng(0))
    assert (idata.sample_stats["acceptance_rate"].values == 1).all()


def test_gibbs_user_conditionals_rbm_block_gibbs():
    """A tiny RBM (3 visible, 2 hidden binary units): block Gibbs against enumeration."""
    g = torch.Generator().manual_seed(0)
    w, b, c = (
        torch.randn(3, 2, generator=g),
        torch.randn(3, generator=g),
        torch.randn(2, generator=g),
    )

    def energy(s):
        v, h = s[..., :3], s[..., 3:]
        return -(v @ w * h).sum(-1) - v @ b - h @ c

    def sample_h(s):
        h = torch.bernoulli(torch.sigmoid(s[:, :3] @ w + c))
        return torch.cat([s[:, :3], h], -1)

    def sample_v(s):
        v = torch.bernoulli(torch.sigmoid(s[:, 3:] @ w.T + b))
        return torch.cat([v, s[:, 3:]], -1)

    kernel = mcmc.Gibbs(energy, conditionals=[sample_h, sample_v])
    idata = run(kernel, torch.zeros(256, 5), num_samples=200, warmup_steps=20)
    x = draws(idata)
    codes = (x * (2 ** np.arange(5))).sum(-1).astype(int)
    states = ((torch.arange(32)[:, None] >> torch.arange(5)) & 1).float()
    probs = torch.softmax(-energy(states).double(), 0).numpy()
    tv = 0.5 * np.abs(np.bincount(codes.ravel(), minlength=32) / codes.size - probs).sum()
    n_eff = int(az.ess(idata.sample_stats["energy"].values))
    assert tv < 1.2 * _tv_bound(probs, n_eff, np.random.default_rng(0))


def _perturbed_flow(scale=0.3):
    torch.manual_seed(3)
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def test_flow_independence_mh_leaves_target_invariant():
    target = energies.get("gaussian", dim=2, correlation=0.5)
    flow = _perturbed_flow()  # a proposal clearly unlike the target
    torch.manual_seed(0)
    init = target.sample(512)  # start at stationarity: the marginal must stay the target's
    idata = run(mcmc.MH(target, proposal=flow), init, num_samples=100, warmup_steps=0)
    assert 0.05 < idata.sample_stats["acceptance_rate"].values.mean() < 0.95
    assert_gaussian_moments(idata, target)
    # an independence sampler that ignored q(x)/q(x') would drift towards the proposal
    with torch.no_grad():
        q = flow.sample(50_000)
    assert abs(float(q[:, 0].var()) - 1.0) > 0.2 or abs(float(q.mean(0)[0])) > 0.2


def test_independence_proposal_without_generator_draws_from_the_run():
    """A proposal with only sample()/log_prob() (here a torch distribution, which takes no
    generator) is drawn from the run's generator: the same seed gives the same draws whatever
    the global generator's state, and the global generator is left as it was."""
    target = energies.get("gaussian", dim=2, correlation=0.5)
    proposal = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2), 1.5 * torch.ones(2)), 1
    )
    init = torch.zeros(64, 2)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        idata = run(mcmc.MH(target, proposal=proposal), init, num_samples=20, warmup_steps=0)
        assert torch.equal(torch.get_rng_state(), before)
        results.append(draws(idata))
    assert (results[0] == results[1]).all()
    assert 0.2 < idata.sample_stats["acceptance_rate"].values.mean() < 0.95


def test_flow_independence_refit_improves_acceptance():
    target = energies.get("banana")
    flow = build_flow("realnvp", 2, num_layers=4, hidden_dims=(32,))
    kernel = mcmc.MH(target, proposal=flow, refit_every=10, refit_steps=30, refit_lr=1e-2)
    idata = run(kernel, torch.randn(256, 2), num_samples=50, warmup_steps=60)
    before = run(
        mcmc.MH(target, proposal=build_flow("realnvp", 2, num_layers=4, hidden_dims=(32,))),
        torch.randn(256, 2),
        num_samples=50,
        warmup_steps=0,
    )
    assert (
        idata.sample_stats["acceptance_rate"].values.mean()
        > before.sample_stats["acceptance_rate"].values.mean() + 0.1
    )


def test_rhat_close_to_one():
    kernel = mcmc.HMC(energies.get("banana"), step_size=0.1, num_steps=10, target_accept_prob=0.9)
    idata = run(kernel, torch.randn(64, 2), num_samples=400, warmup_steps=300)
    assert float(az.rhat(idata)["x"].max()) < 1.02
    assert idata.posterior["x"].shape == (64, 400, 2)


def test_driver_shapes_thinning_and_stats():
    kernel = mcmc.HMC(GAUSS, num_steps=3)
    idata = run(kernel, torch.randn(8, 3), num_samples=10, warmup_steps=5, thinning=3)
    assert idata.posterior["x"].shape == (8, 10, 3)
    assert set(mcmc.driver.STATS) <= set(idata.sample_stats.data_vars)
    for name in mcmc.driver.STATS:
        assert idata.sample_stats[name].shape == (8, 10)
    assert idata.attrs["num_energy_evals"] == idata.attrs["num_energy_calls"] * 8
    assert np.allclose(
        idata.sample_stats["lp"].values,
        -GAUSS.energy(torch.as_tensor(draws(idata))).numpy(),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "make",
    [lambda t: mcmc.HMC(t), lambda t: mcmc.MH(t), lambda t: mcmc.SGLD(t), lambda t: mcmc.Gibbs(t)],
    ids=["hmc", "mh", "sgld", "gibbs"],
)
def test_runs_under_pyro_mcmc_and_arviz(make):
    kernel = make(GAUSS)
    m = MCMC(
        kernel,
        num_samples=30,
        warmup_steps=20,
        initial_params={"x": torch.randn(16, 3)},
        disable_progbar=True,
    )
    m.run()
    assert m.get_samples()["x"].shape == (30, 16, 3)  # (draw, pyroflows chain, *event)
    assert "acceptance rate" in m.diagnostics()
    idata = az.from_pyro(m)
    assert idata.posterior["x"].shape == (1, 30, 16, 3)


# -- non-finite energies -------------------------------------------------------------------
def _walled(x):
    """The Gaussian, with NaN energy for x_0 > 1 (a region every proposal into must be rejected)."""
    u = GAUSS.energy(x)
    return torch.where(x[..., 0] > 1, torch.nan, u)


@pytest.mark.parametrize(
    "make",
    [
        lambda e: mcmc.HMC(e, num_steps=5),
        lambda e: mcmc.MH(e),
        lambda e: mcmc.SGLD(e, step_size=0.1),
        lambda e: mcmc.Gibbs(e),
    ],
    ids=["hmc", "mh", "sgld", "gibbs"],
)
def test_nan_energy_rejected_and_counted(make):
    idata = run(make(_walled), torch.randn(64, 3).clamp(max=0.5), num_samples=100, warmup_steps=50)
    x = draws(idata)
    assert np.isfinite(x).all() and (x[..., 0] <= 1).all()
    assert idata.sample_stats["nonfinite"].values.sum() > 0
    assert np.isfinite(idata.sample_stats["energy"].values).all()


def test_gibbs_discrete_nan_values_get_zero_probability():
    def energy(s):  # the Ising energy, but a spin 0 of +1 is forbidden (NaN)
        return torch.where(s[..., 0, 0] > 0, torch.nan, energies.get("ising").energy(s))

    init = -torch.ones(32, 3, 3)
    idata = run(mcmc.Gibbs(energy, support=SPINS), init, num_samples=20, warmup_steps=0)
    assert (draws(idata)[..., 0, 0] == -1).all()
    assert idata.sample_stats["nonfinite"].values.sum() == 32 * 20


def test_non_finite_start_is_an_error():
    init = torch.zeros(4, 3)
    init[2, 0] = 2.0
    with pytest.raises(ValueError, match=r"chains \[2\] start at a non-finite energy"):
        run(mcmc.HMC(_walled), init)
    with pytest.raises(ValueError, match="NaN or inf"):
        run(mcmc.MH(GAUSS), torch.full((4, 3), math.nan))


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: mcmc.HMC(GAUSS, step_size=0.0), "step_size"),
        (lambda: mcmc.HMC(GAUSS, step_size=-1.0), "step_size"),
        (lambda: mcmc.HMC(GAUSS, num_steps=0), "num_steps"),
        (lambda: mcmc.HMC(GAUSS, num_steps=2.5), "num_steps"),
        (lambda: mcmc.HMC(GAUSS, target_accept_prob=1.5), "target_accept_prob"),
        (lambda: mcmc.SGLD(GAUSS, step_size=0), "step_size"),
        (lambda: mcmc.SGLD(GAUSS, decay=2.0), "decay"),
        (lambda: mcmc.MH(GAUSS, scale=-0.1), "scale"),
        (lambda: mcmc.MH(GAUSS, refit_every=5), "Flow"),
        (lambda: mcmc.Gibbs(GAUSS, support=torch.tensor([1.0])), "support"),
        (lambda: mcmc.Gibbs(GAUSS, support=torch.tensor([1.0, 1.0])), "distinct"),
    ],
)
def test_bad_hyperparameters(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_arguments():
    with pytest.raises(TypeError, match="energy must be callable"):
        mcmc.HMC("banana")
    with pytest.raises(TypeError, match="proposal"):
        mcmc.MH(GAUSS, proposal=3)
    with pytest.raises(ValueError, match=r"init must have shape \(num_chains, 3\)"):
        run(mcmc.HMC(GAUSS), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="energy must return a tensor of shape \\(4,\\)"):
        run(mcmc.MH(lambda x: x.sum()), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="energy must return a tensor of shape \\(4,\\)"):
        run(mcmc.MH(lambda x: x), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        run(mcmc.HMC(GAUSS), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_samples"):
        run(mcmc.HMC(GAUSS), torch.zeros(4, 3), num_samples=0)
    with pytest.raises(ValueError, match="thinning"):
        run(mcmc.HMC(GAUSS), torch.zeros(4, 3), thinning=0)
    with pytest.raises(ValueError, match="support"):
        run(mcmc.Gibbs(energies.get("ising"), support=SPINS), torch.zeros(4, 3, 3))
    with pytest.raises(TypeError, match="pyroflows.mcmc kernel"):
        mcmc.sample(object(), torch.zeros(4, 3), 10)


def test_state_untouched_by_a_failed_call():
    kernel = mcmc.MH(GAUSS)
    run(kernel, torch.zeros(4, 3), num_samples=5, warmup_steps=0)
    before = kernel.x.clone()
    with pytest.raises(ValueError):
        kernel.set_chains(torch.zeros(4, 2))
    assert torch.equal(kernel.x, before)


# -- devices -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, target, init",
    [
        (lambda t: mcmc.HMC(t, num_steps=3), GAUSS, lambda: torch.randn(8, 3)),
        (lambda t: mcmc.SGLD(t, preconditioned=True), GAUSS, lambda: torch.randn(8, 3)),
        (lambda t: mcmc.MH(t), GAUSS, lambda: torch.randn(8, 3)),
        (
            lambda t: mcmc.MH(t, proposal=build_flow("realnvp", 3, num_layers=2)),
            GAUSS,
            lambda: torch.randn(8, 3),
        ),
        (lambda t: mcmc.Gibbs(t), GAUSS, lambda: torch.randn(8, 3)),
        (
            lambda t: mcmc.Gibbs(t, support=SPINS),
            energies.get("ising"),
            lambda: -torch.ones(8, 3, 3),
        ),
    ],
    ids=["hmc", "sgld", "mh", "mh-flow", "mwg", "gibbs"],
)
def test_default_device_trap(make, target, init):
    kernel, x0 = make(target), init()
    with default_device_trap():
        idata = mcmc.sample(kernel, x0, 5, warmup_steps=25, progress=False)
    assert np.isfinite(draws(idata)).all()


# -- command line --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, kernel", [("u2", "hmc"), ("banana", "mh"), ("ising", "gibbs"), ("funnel", "sgld")]
)
def test_cli_sample(tmp_path, capsys, target, kernel):
    from pyroflows.cli import main

    argv = [
        "sample",
        "--target",
        target,
        "--kernel",
        kernel,
        "--steps",
        "30",
        "--warmup",
        "20",
        "--chains",
        "8",
        "--quiet",
        "--json",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["min_ess"] > 0 and (tmp_path / f"sample-{target}-{kernel}.png").exists()


def test_cli_sample_bad_input(tmp_path, capsys):
    from pyroflows.cli import main

    assert main(["sample", "--chains", "0", "--out", str(tmp_path)]) == 2
    assert main(["sample", "--target", "ising", "--kernel", "hmc", "--out", str(tmp_path)]) == 2
    assert "use --kernel gibbs" in capsys.readouterr().err
