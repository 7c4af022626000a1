"""Built-in energy targets: normalizers against closed forms and quadrature, exact samples against
known moments and densities, shapes, the Pyro model, and bad input."""

import math

import pyro
import pytest
import torch
from conftest import default_device_trap
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from pyroflows import energies
from pyroflows.energies import grid_log_normalizer

NAMES = energies.available()


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensor programs on a shared CPU
TWO_D = ["u1", "u2", "u3", "u4", "banana", "gaussian", "mixture"]


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_dtypes(name):
    target = energies.get(name)
    for batch in [(), (5,), (3, 4)]:
        x = torch.randn(*batch, *target.event_shape, dtype=torch.float64)
        u = target.energy(x)
        assert u.shape == batch and u.dtype == torch.float64
        assert torch.equal(target(x), u)
    assert isinstance(target.log_normalizer, float)


@pytest.mark.parametrize("name", ["u2", "u3", "u4", "banana", "gaussian", "mixture"])
def test_closed_form_normalizer_matches_quadrature(name):
    target = energies.get(name)
    box = (-24.0, 24.0, -24.0, 24.0) if name != "banana" else (-8.0, 8.0, -12.0, 70.0)
    log_z = grid_log_normalizer(target.energy, box, 600)
    assert log_z == pytest.approx(target.log_normalizer, abs=1e-8)


def test_u1_quadrature_converged():
    target = energies.get("u1")
    coarse = grid_log_normalizer(target.energy, (-7.0, 7.0, -7.0, 7.0), 500)
    assert coarse == pytest.approx(target.log_normalizer, abs=1e-10)


def test_funnel_normalizer_by_quadrature_in_2d():
    target = energies.get("funnel", dim=2)
    box = (-30.0, 30.0, -1e4, 1e4)  # x | v has scale exp(v / 2): wide in x, so integrate in (v, x)
    # the x-integral is exactly exp(v / 2) sqrt(2 pi); integrate the v-marginal on a fine grid
    v = torch.linspace(box[0], box[1], 20001, dtype=torch.float64)
    x0 = torch.stack([v, torch.zeros_like(v)], -1)
    log_marginal = -target.energy(x0) + v / 2 + 0.5 * math.log(2 * math.pi)
    log_z = torch.logsumexp(log_marginal, 0).item() + math.log((box[1] - box[0]) / 20000)
    assert log_z == pytest.approx(target.log_normalizer, abs=1e-8)


@pytest.mark.parametrize("name", [n for n in NAMES if energies.get(n).has_sampler])
def test_exact_samples_match_density(name):
    """The mean energy of exact samples matches E_p[U] from quadrature or enumeration."""
    torch.manual_seed(0)
    target = energies.get(name, **({"dim": 2} if name == "funnel" else {}))
    n = 20_000
    x = target.sample(n)
    assert x.shape == (n, *target.event_shape) and torch.isfinite(x).all()
    u = target.energy(x.double())
    if name == "ising":
        states, probs = target.states().double(), target.probs()
        exact = (probs * target.energy(states)).sum().item()
    elif name == "funnel":  # E[v^2 / 18] = 1/2, E[x^2 e^{-v} / 2] = 1/2, E[v / 2] = 0
        exact = 1.0
    else:
        exact = _grid_mean_energy(target)
    err = 5 * u.std().item() / math.sqrt(n)
    assert abs(u.mean().item() - exact) < err


def _grid_mean_energy(target):
    lo, hi, num = -14.0, 14.0, 1000
    h = (hi - lo) / num
    g = lo + h * (torch.arange(num, dtype=torch.float64) + 0.5)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    u = target.energy(grid)
    w = torch.softmax(-u, 0)
    return (w * u).sum().item()


def test_banana_moments():
    x = energies.get("banana").sample(50_000)
    assert x.mean(0).abs().max() < 0.05
    assert x.var(0).tolist() == pytest.approx([1.0, 3.0], rel=0.05)


def test_ising_enumeration():
    target = energies.get("ising", size=2, coupling=0.3, field=0.2)
    states = target.states()
    assert states.shape == (16, 2, 2) and set(states.unique().tolist()) == {-1.0, 1.0}
    # by hand: 4 bonds on the open 2 x 2 lattice
    s = states.reshape(16, 4)
    bonds = s[:, 0] * s[:, 1] + s[:, 2] * s[:, 3] + s[:, 0] * s[:, 2] + s[:, 1] * s[:, 3]
    energy = -0.3 * bonds - 0.2 * s.sum(-1)
    assert torch.allclose(target.energy(states), energy)
    assert target.log_normalizer == pytest.approx(torch.logsumexp(-energy.double(), 0).item())
    assert target.probs().sum().item() == pytest.approx(1.0)


def test_ising_periodic_counts_each_bond_once():
    target = energies.get("ising", size=3, coupling=1.0, field=0.0, periodic=True)
    up = torch.ones(3, 3)
    assert target.energy(up).item() == -18.0  # 2 * 9 bonds on a 3 x 3 torus


@pytest.mark.parametrize("guide", [AutoNormal, AutoMultivariateNormal, AutoIAFNormal])
def test_model_is_fit_by_autoguides(guide):
    target = energies.get("gaussian", correlation=0.5)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = guide(target.model)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(target.model, g, pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step() for _ in range(150)]
    assert g()["x"].shape == (2,)
    kl = sum(losses[-20:]) / 20 + target.log_normalizer  # -ELBO + log Z = KL(q || p)
    # mean-field's best is KL = -log(1 - rho^2) / 2 = 0.144; the others can reach 0
    assert kl < (0.25 if guide is AutoNormal else 0.1)


def test_model_log_density_is_minus_energy():
    target = energies.get("u3")
    trace = pyro.poutine.trace(target.model).get_trace()
    x = trace.nodes["x"]["value"]
    assert torch.allclose(trace.log_prob_sum(), -target.energy(x))


def test_ising_model_factor():
    target = energies.get("ising", size=2)
    trace = pyro.poutine.trace(target.model).get_trace()
    s = trace.nodes["s"]["value"]
    expected = -target.energy(2 * s - 1) + 4 * math.log(0.5)
    assert torch.allclose(trace.log_prob_sum(), expected)


@pytest.mark.parametrize("name", NAMES)
def test_default_device_trap(name):
    x = torch.randn(4, *energies.get(name).event_shape)
    with default_device_trap():
        target = energies.get(name)  # built under the trap too: every buffer says its device
        assert target.energy(x).device.type == "cpu"
        if target.has_sampler:
            assert target.sample(3).device.type == "cpu"
        # torch's own argument validation makes tensors on the default device: switch it off
        with pyro.validation_enabled(False):
            pyro.poutine.trace(target.model).get_trace()


def test_bad_input():
    with pytest.raises(ValueError, match="unknown target"):
        energies.get("nope")
    target = energies.get("banana")
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 2\)"):
        target.energy(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        target.energy(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        target.energy([0.0, 0.0])
    with pytest.raises(ValueError, match="num_samples"):
        target.sample(-1)
    with pytest.raises(NotImplementedError, match="no exact sampler"):
        energies.get("u1").sample(3)
    with pytest.raises(ValueError, match="dim"):
        energies.get("funnel", dim=1)
    with pytest.raises(ValueError, match="correlation"):
        energies.get("gaussian", dim=3, correlation=-0.9)
    with pytest.raises(ValueError, match="size"):
        energies.get("ising", size=1)
    with pytest.raises(ValueError, match="scales"):
        energies.Mixture([[0.0], [1.0]], scales=[1.0, -1.0])
    with pytest.raises(ValueError, match="positive definite"):
        energies.Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])


def test_dense_gaussian_equals_diagonal_path_on_diagonal_covariance():
    variances = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.1], dtype=torch.float64)
    loc = torch.linspace(-1, 1, 5, dtype=torch.float64)
    dense, diagonal = energies.Gaussian(loc, variances.diag()), energies.Gaussian(loc, variances)
    assert diagonal.is_diagonal and not dense.is_diagonal
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(dense.energy(x), diagonal.energy(x), rtol=1e-14, atol=0)
    assert dense.log_normalizer == diagonal.log_normalizer
    torch.testing.assert_close(dense.covariance, diagonal.covariance, rtol=0, atol=0)


def test_dense_gaussian_matches_torch_multivariate_normal():
    torch.manual_seed(1)
    a = torch.randn(6, 6, dtype=torch.float64)
    target = energies.Gaussian(torch.randn(6, dtype=torch.float64), a @ a.T + 0.5 * torch.eye(6))
    reference = torch.distributions.MultivariateNormal(
        target.loc.double(), scale_tril=target.scale_tril.double()
    )
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(target.log_prob(x), reference.log_prob(x), rtol=1e-12, atol=1e-12)
    assert target.energy(torch.zeros(0, 6)).shape == (0,)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ising"] + ["dense100"])
def test_energy_gradients_match_finite_differences(name):
    if name == "dense100":
        target, x = energies.get("gaussian", dim=100, correlation=0.5), torch.randn(3, 100)
    else:
        target = energies.get(name)
        x = torch.randn(4, *target.event_shape)
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(target.energy, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gaussian_covariance_errors():
    with pytest.raises(ValueError, match="positive variances"):
        energies.Gaussian([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"covariance \(D, D\) or \(D,\)"):
        energies.Gaussian([0.0, 0.0], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ising"] + ["dense100"])
def test_energy_and_gradient_on_the_chosen_device(name, device, dtype):
    target = (energies.get("gaussian", dim=100, correlation=0.5) if name == "dense100"
              else energies.get(name))
    x64 = torch.randn(64, *target.event_shape, dtype=torch.float64)
    reference = torch.func.grad(lambda x: target.energy(x).sum())(x64)
    moved = target.to(device)
    x = x64.to(device, dtype).requires_grad_()
    u = moved.energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    assert u.device == x.device and u.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(grad.cpu().double(), reference, rtol=tol, atol=tol)
