"""ModelPotential: energies and gradients equal Pyro's own potential chain by chain, shapes,
log-likelihoods, init strategies, the model path of mcmc.sample, and bad input."""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap
from pyro.distributions import constraints
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import (
    init_to_median,
    init_to_sample,
    init_to_uniform,
    init_to_value,
)
from pyro.infer.mcmc.util import initialize_model

from pyroflows import mcmc
from pyroflows.datasets import posteriordb as pdb
from pyroflows.mcmc import ModelPotential
from pyroflows.mcmc.core import EnergyFunction

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def eight_schools():
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12], dtype=F64)
    sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18], dtype=F64)
    return pdb.eight_schools_noncentered, dict(J=8, y=y, sigma=sigma)


def regression():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=F64)
    noise = torch.randn(30, generator=gen, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 * noise
    return pdb.blr, dict(N=30, D=3, X=X, y=y)


def mixture():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(40, generator=gen, dtype=F64) + torch.tensor([-2.0, 2.0], dtype=F64).repeat(20)
    return pdb.low_dim_gauss_mix, dict(N=40, y=y)


def kidiq_like():
    gen = torch.Generator().manual_seed(2)
    hs = (torch.rand(25, generator=gen) < 0.5).to(F64)
    iq = 100 + 15 * torch.randn(25, generator=gen, dtype=F64)
    score = 20 + 10 * hs + 0.6 * iq + 10 * torch.randn(25, generator=gen, dtype=F64)
    return pdb.kidscore_interaction, dict(N=25, kid_score=score, mom_iq=iq, mom_hs=hs)


def pyro_params(potential, transforms, u_row):
    params = {}
    for name, info in potential._latent.items():
        shape = transforms[name].inverse_shape(info.shape)
        params[name] = u_row[info.start : info.start + info.unconstrained_numel].reshape(shape)
    return params


@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
@pytest.mark.parametrize("case", [eight_schools, regression, mixture, kidiq_like])
def test_energy_and_gradient_equal_pyro_potential(case, vectorize):
    model, data = case()
    potential = ModelPotential(model, vectorize=vectorize, **data)
    u = potential.init(5, generator=torch.Generator().manual_seed(0))
    assert_equals_pyro_potential(potential, model, data, u)


def assert_equals_pyro_potential(potential, model, data, u):
    """Energy and gradient of every chain equal Pyro's own potential at that chain's point."""
    _, pyro_potential, transforms, _ = initialize_model(model, model_kwargs=data)
    u = u.clone().requires_grad_(True)
    energy = potential.energy(u)
    (grad,) = torch.autograd.grad(energy.sum(), u)
    assert energy.shape == u.shape[:1] and energy.dtype == F64
    for c in range(len(u)):
        row = u[c].detach().clone().requires_grad_(True)
        expected = pyro_potential(pyro_params(potential, transforms, row))
        (expected_grad,) = torch.autograd.grad(expected, row)
        assert torch.allclose(energy[c], expected, rtol=1e-10, atol=1e-8)
        assert torch.allclose(grad[c], expected_grad, rtol=1e-8, atol=1e-8)


def test_dependent_support_matches_hand_written_jacobian():
    """GARCH's beta1 lives on (0, 1 - alpha1): the map and its log-Jacobian are taken from the
    support each execution sees (Pyro's potential freezes the bound at its initial point)."""
    gen = torch.Generator().manual_seed(3)
    y = 5 + torch.randn(15, generator=gen, dtype=F64)
    data = dict(T=15, y=y, sigma1=torch.tensor(0.5, dtype=F64))
    potential = ModelPotential(pdb.garch11, **data)
    u = torch.randn(4, 4, generator=gen, dtype=F64)
    mu, a0, a1, b1 = u.unbind(-1)
    alpha0, alpha1 = a0.exp(), torch.sigmoid(a1)
    beta1 = (1 - alpha1) * torch.sigmoid(b1)
    var = torch.full_like(mu, 0.25)
    log_p = torch.distributions.Normal(mu, var.sqrt()).log_prob(y[0])
    for t in range(1, 15):
        var = alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * var
        log_p = log_p + torch.distributions.Normal(mu, var.sqrt()).log_prob(y[t])
    sig = torch.nn.functional.logsigmoid
    log_jac = a0 + (sig(a1) + sig(-a1)) + torch.log1p(-alpha1) + sig(b1) + sig(-b1)
    assert torch.allclose(potential.energy(u), -(log_p + log_jac), rtol=1e-10)
    values = potential.unpack(u)
    assert torch.allclose(values["beta1"], beta1) and (values["beta1"] < 1 - values["alpha1"]).all()


def test_unpack_deterministic_dims_and_log_likelihood():
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    assert potential.dim == 10 and potential.event_shape == (10,)
    u = potential.init(7, generator=torch.Generator().manual_seed(0))
    values = potential.unpack(u)
    assert {k: tuple(v.shape) for k, v in values.items()} == {
        "mu": (7,), "tau": (7,), "theta_trans": (7, 8)
    }
    assert (values["tau"] > 0).all()
    theta = potential.deterministic(u)["theta"]
    expected = values["theta_trans"] * values["tau"][:, None] + values["mu"][:, None]
    assert torch.allclose(theta, expected)
    loglik = potential.log_likelihood(u)["y"]
    assert loglik.shape == (7, 8)
    for c in range(7):  # against a trace of the model conditioned on chain c's values
        point = {k: v[c] for k, v in values.items()}
        trace = pyro.poutine.trace(pyro.poutine.condition(model, point)).get_trace(**data)
        expected = trace.nodes["y"]["fn"].log_prob(data["y"])
        assert torch.allclose(loglik[c], expected)
    assert potential.dims() == {
        "mu": [], "tau": [], "theta_trans": ["school"], "theta": ["school"], "y": ["school"]
    }
    assert torch.equal(potential.observed_data()["y"], data["y"])
    assert torch.allclose(potential.pack(values), u)


def test_vector_site_with_event_dims_and_ordered_support():
    model, data = mixture()
    potential = ModelPotential(model, **data)
    u = potential.init(6, init_to_sample, generator=torch.Generator().manual_seed(0))
    values = potential.unpack(u)
    assert values["mu"].shape == (6, 2) and (values["mu"][:, 0] < values["mu"][:, 1]).all()
    assert potential.dims()["mu"] == ["mu_dim_0"]
    assert potential.log_likelihood(u)["y"].shape == (6, 40)


@pytest.mark.parametrize(
    "strategy", [None, init_to_uniform, init_to_uniform(radius=0.5), init_to_median, init_to_sample]
)
def test_init_strategies_for_all_chains(strategy):
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    u = potential.init(50, strategy, generator=torch.Generator().manual_seed(0))
    assert u.shape == (50, 10) and torch.isfinite(potential.energy(u)).all()
    if strategy is not init_to_median:
        assert u.std(0).min() > 0.05  # every chain its own point
    again = potential.init(50, strategy, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, again)  # the generator decides, not the global RNG


def test_init_from_values():
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    u = potential.init(4, {"tau": 2.0, "mu": torch.arange(4.0)})
    values = potential.unpack(u)
    assert torch.allclose(values["tau"], torch.full((4,), 2.0, dtype=F64))
    assert torch.allclose(values["mu"], torch.arange(4.0, dtype=F64))
    u = potential.init(3, init_to_value(values={"tau": torch.tensor(1.5)}))
    assert torch.allclose(potential.unpack(u)["tau"], torch.full((3,), 1.5, dtype=F64))


def test_flat_improper_priors_initialise():
    model, data = kidiq_like()
    u = ModelPotential(model, **data).init(8, generator=torch.Generator().manual_seed(0))
    assert u.shape == (8, 5) and u.std(0).min() > 0.1


@pytest.mark.filterwarnings("ignore:Estimated shape parameter")  # 30 short draws: k-hat is noisy
def test_model_path_of_sample_returns_named_inference_data():
    model, data = eight_schools()
    kernel = mcmc.HMC(model=model, step_size=0.2, num_steps=5)
    idata = mcmc.sample(
        kernel, num_samples=30, warmup_steps=30, num_chains=8, seed=0, progress=False,
        model_kwargs=data,
    )
    post = idata.posterior
    assert post["tau"].dims == ("chain", "draw") and (post["tau"] > 0).all()
    assert post["theta"].dims == ("chain", "draw", "school") and post["theta"].shape == (8, 30, 8)
    assert idata.log_likelihood["y"].shape == (8, 30, 8)
    assert idata.observed_data["y"].shape == (8,)
    assert {"acceptance_rate", "step_size", "diverging", "energy", "lp"} <= set(idata.sample_stats)
    assert math.isfinite(float(az.loo(idata).elpd_loo))
    samples = {k: torch.as_tensor(v.values).flatten(0, 1) for k, v in post.items()}
    for parallel in (False, True):
        predictive = Predictive(
            model, posterior_samples=samples, return_sites=["y"], parallel=parallel
        )
        replicated = predictive(J=8, y=None, sigma=data["sigma"])["y"]
        assert replicated.shape == (240, 8)


def one_chain_model(X, y):
    """Written for one chain, as for Pyro's NUTS: ``X @ beta`` and a Cholesky factor built from
    a parameter do not broadcast over a chain plate."""
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
    rho = pyro.sample("rho", dist.Uniform(X.new_tensor(-0.9), 0.9))
    sigma = pyro.sample("sigma", dist.HalfCauchy(X.new_tensor(1.0)))
    pyro.deterministic("beta_norm", beta.norm())
    eye = torch.eye(2, dtype=X.dtype)
    scale_tril = sigma * torch.linalg.cholesky(eye + rho * (1 - eye))
    with pyro.plate("pairs", len(y) // 2):
        mean = (X @ beta).reshape(-1, 2)
        pyro.sample("y", dist.MultivariateNormal(mean, scale_tril=scale_tril), obs=y.reshape(-1, 2))


def one_chain_data():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(20, 3, generator=gen, dtype=F64)
    return dict(X=X, y=X @ torch.tensor([1.0, -1.0, 0.5], dtype=F64) + 0.5 * torch.randn(
        20, generator=gen, dtype=F64))


def test_vmap_runs_a_model_written_for_one_chain():
    data = one_chain_data()
    with pytest.raises(ValueError, match="vectorize='vmap'"):
        ModelPotential(one_chain_model, **data)
    potential = ModelPotential(one_chain_model, vectorize="vmap", **data)
    u = potential.init(6, generator=torch.Generator().manual_seed(0))  # HalfCauchy: per chain
    assert u.shape == (6, 5) and u.std(0).min() > 0.05
    assert_equals_pyro_potential(potential, one_chain_model, data, u)
    values = potential.unpack(u)
    assert values["beta"].shape == (6, 3) and values["rho"].shape == (6,)
    assert torch.allclose(potential.deterministic(u)["beta_norm"], values["beta"].norm(dim=1))
    assert potential.log_likelihood(u)["y"].shape == (6, 10)
    given = potential.init(3, {"rho": torch.tensor([-0.5, 0.0, 0.5]), "sigma": 2.0})
    assert torch.allclose(potential.unpack(given)["rho"], torch.tensor([-0.5, 0.0, 0.5], dtype=F64))
    assert torch.allclose(potential.pack(potential.unpack(u)), u)


def test_vmap_sampling_matches_the_exact_posterior():
    """Conjugate regression written for one chain: the posterior of beta is Gaussian."""
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(15, 2, generator=gen, dtype=F64)
    y = X @ torch.tensor([0.5, -1.0], dtype=F64) + torch.randn(15, generator=gen, dtype=F64)

    def model(X, y):
        beta = pyro.sample("beta", dist.Normal(X.new_zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ beta, 1.0).to_event(1), obs=y)

    precision = torch.eye(2, dtype=F64) + X.T @ X
    exact_mean = torch.linalg.solve(precision, X.T @ y)
    idata = mcmc.sample(
        mcmc.HMC(model=model), num_chains=64, num_samples=200, warmup_steps=200, seed=0,
        progress=False, model_args=(X, y), vectorize="vmap",
    )
    draws = idata.posterior["beta"]
    assert draws.shape == (64, 200, 2)
    mcse = az.mcse(idata, var_names=["beta"])["beta"].values
    error = draws.mean(("chain", "draw")).values - exact_mean.numpy()
    assert (abs(error) < 4 * mcse).all()


def test_vmap_names_control_flow_on_a_latent_value():
    def branches(y):
        x = pyro.sample("x", dist.Normal(y.new_tensor(0.0), 1.0))
        if x > 0:  # Python control flow on a value: cannot be vectorized
            pyro.factor("f", -x)

    with pytest.raises(ValueError, match="cannot be mapped over chains"):
        ModelPotential(branches, torch.zeros(3), vectorize="vmap")
    with pytest.raises(ValueError, match="vectorize"):
        ModelPotential(branches, torch.zeros(3), vectorize="loop")


def test_vmap_names_an_in_place_write_and_the_plate_runs_that_model():
    # Pyro's OrderedLogistic fills a new tensor in place, which vmap cannot batch
    data = {"x": torch.linspace(-2, 2, 6, dtype=F64), "y": torch.tensor([0, 0, 1, 1, 2, 2])}

    def ordinal(x, y):
        beta = pyro.sample("beta", dist.Normal(x.new_tensor(0.0), 2.0))
        cut = pyro.sample("cut", dist.Normal(x.new_tensor([-1.0, 1.0]), 1.0).to_event(1))
        with pyro.plate("obs", 6):
            pyro.sample("y", dist.OrderedLogistic(beta * x, cut.sort(-1).values), obs=y)

    with pytest.raises(ValueError, match="in-place write"):
        ModelPotential(ordinal, vectorize="vmap", **data)
    potential = ModelPotential(ordinal, **data)
    u = torch.randn(5, potential.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_equals_pyro_potential(potential, ordinal, data, u)


@pytest.mark.filterwarnings("error:.*cannot be replayed")  # such points do not stop replay
def test_points_without_a_cholesky_factor_are_rejected_chain_by_chain():
    """A covariance that is not positive definite at some chains' points: those chains get a
    non-finite energy (their proposals are rejected), the others their own."""

    def model(y):
        rho = pyro.sample("rho", dist.Normal(y.new_tensor(0.0), 0.1))
        eye = torch.eye(2, dtype=y.dtype)
        scale_tril = torch.linalg.cholesky(eye + rho * (1 - eye))
        pyro.sample("y", dist.MultivariateNormal(y.new_zeros(2), scale_tril=scale_tril), obs=y)

    potential = ModelPotential(model, torch.tensor([0.3, -0.2], dtype=F64), vectorize="vmap")
    u = torch.tensor([[0.5], [2.0], [-0.2], [-1.5]], dtype=F64)
    with pytest.raises(torch.linalg.LinAlgError):
        potential.energy(u)
    for _ in range(3):  # the graph's trace meets the bad rows: put off, never given up
        value, grad = EnergyFunction(potential, 1).value_and_grad(u)
    ok = torch.tensor([True, False, True, False])
    assert torch.isfinite(value[ok]).all() and not torch.isfinite(value[~ok]).any()
    assert torch.allclose(value[ok], potential.energy(u[ok]))
    assert torch.isfinite(grad[ok]).all()
    # init_to_uniform's points in (-2, 2) and steps of 1.5 reach |rho| >= 1: those chains are
    # redrawn at init and their proposals rejected, in compiled trajectories too
    kernel = mcmc.HMC(model=model, step_size=1.5, num_steps=3, adapt_step_size=False, compile=True)
    idata = mcmc.sample(
        kernel, num_chains=16, num_samples=20, warmup_steps=0, seed=0, progress=False,
        model_args=(torch.tensor([0.3, -0.2], dtype=F64),), vectorize="vmap",
    )
    assert (abs(idata.posterior["rho"]) < 1).all()
    assert int(idata.sample_stats["nonfinite"].sum()) > 0


def funnel_with_data(y):
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=F64), 3.0))
    with pyro.plate("i", 4):
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=F64), torch.exp(v / 2)))
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def test_reparameterized_sites_are_reported_as_deterministic_not_as_data():
    from pyro.infer.reparam import LocScaleReparam

    y = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    model = pyro.poutine.reparam(funnel_with_data, config={"x": LocScaleReparam(centered=0.0)})
    potential = ModelPotential(model, y)
    u = potential.init(5, generator=torch.Generator().manual_seed(0))
    values = potential.unpack(u)
    assert set(values) == {"v", "x_decentered"} and potential.dim == 5
    x = potential.deterministic(u)["x"]
    assert torch.allclose(x, values["x_decentered"] * torch.exp(values["v"][:, None] / 2))
    assert set(potential.log_likelihood(u)) == {"y"}
    v, z = values["v"], values["x_decentered"]
    log_p = (
        dist.Normal(0.0, 3.0).log_prob(v)
        + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(x, 1.0).log_prob(y).sum(-1)
    )
    assert torch.allclose(potential.energy(u), -log_p)

    # without data the non-centred funnel is exactly v ~ N(0, 3^2), x_decentered ~ N(0, 1)
    no_data = pyro.poutine.reparam(
        lambda: funnel_with_data(None), config={"x": LocScaleReparam(centered=0.0)}
    )
    idata = mcmc.sample(
        mcmc.HMC(model=no_data), num_chains=64, num_samples=200, warmup_steps=200, seed=0,
        progress=False,
    )
    post = idata.posterior
    assert post["x"].dims == ("chain", "draw", "i") and "log_likelihood" not in idata.groups()
    draws = post["v"].values
    se = 3.0 / math.sqrt(float(az.ess(draws)))
    assert abs(draws.mean()) < 4 * se and abs(draws.std() / 3.0 - 1) < 0.05


def test_default_device_trap():
    model, data = eight_schools()
    with default_device_trap():
        potential = ModelPotential(model, **data)
        u = potential.init(4, init_to_median, generator=torch.Generator().manual_seed(0))
        assert u.device.type == "cpu"
        assert torch.isfinite(potential.energy(u)).all()
        assert potential.unpack(u)["theta_trans"].device.type == "cpu"
        assert potential.log_likelihood(u)["y"].device.type == "cpu"


# -- bad input ---------------------------------------------------------------------------
def no_latent(y):
    with pyro.plate("data", len(y), dim=-1):
        pyro.sample("y", dist.Normal(y.new_tensor(0.0), 1.0), obs=y)


def discrete(y):
    pyro.sample("k", dist.Bernoulli(y.new_tensor(0.5)))


class _NoBijection(constraints.Constraint):
    def check(self, value):
        return value == value


class _Odd(dist.Normal):
    @property
    def support(self):
        return _NoBijection()


def no_bijection(y):
    pyro.sample("odd", _Odd(y.new_tensor(0.0), 1.0))


def mixes_chains(y):
    x = pyro.sample("x", dist.Normal(y.new_tensor(0.0), 1.0))
    pyro.factor("penalty", -(x.sum() ** 2))  # sums over all chains


def nowhere_finite(y):
    x = pyro.sample("x", dist.Normal(y.new_tensor(0.0), 1.0))
    pyro.factor("bad", torch.full_like(x, -math.inf))


@pytest.mark.parametrize(
    "model, match",
    [
        (no_latent, "no latent"),
        (discrete, "'k' is discrete"),
        (no_bijection, "'odd' has support"),
        (mixes_chains, "'penalty' is not chain-broadcastable"),
    ],
)
def test_bad_models_name_the_site(model, match):
    with pytest.raises(ValueError, match=match):
        ModelPotential(model, torch.zeros(3))


def test_bad_init():
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    with pytest.raises(ValueError, match="'sigma_b', which is not a latent site"):
        potential.init(4, {"sigma_b": 1.0})
    with pytest.raises(ValueError, match="'theta_trans' must have shape"):
        potential.init(4, {"theta_trans": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_chains"):
        potential.init(0)
    with pytest.raises(TypeError, match="init must be"):
        potential.init(2, 3.0)
    with pytest.raises(ValueError, match="every chain starts at a non-finite energy"):
        ModelPotential(nowhere_finite, torch.zeros(3)).init(3, max_tries=2)
    with pytest.raises(ValueError, match="u must have shape"):
        potential.energy(torch.zeros(4, 3, dtype=F64))
