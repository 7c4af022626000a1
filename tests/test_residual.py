"""Residual flow: contractivity, log-det estimators against the exact value, fixed-point inverse
and its implicit gradients, power-iteration state, bad input."""

import io
import pickle

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.transforms.residual import ResidualBlock, SpectralLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _block(dim=3, perturb=0.3, **options):
    torch.manual_seed(0)
    block = ResidualBlock(dim, (16, 16), **options).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(perturb * torch.randn_like(p))
    return block


def _jacobian_g(block, x):
    return torch.autograd.functional.jacobian(lambda v: block.g(v), x)


@pytest.mark.parametrize("lipschitz", [0.5, 0.9, 0.97])
def test_residual_branch_is_contractive(lipschitz):
    block = _block(4, perturb=1.0, lipschitz=lipschitz)
    for _ in range(10):  # let the warm-started power iteration converge
        block.g.linears[0]._power_iterate(20)
        for layer in block.g.linears:
            layer._power_iterate(20)
    for layer in block.g.linears:
        scaled = layer.weight / torch.clamp(layer.u @ layer.weight @ layer.v / layer.coeff, min=1.0)
        assert torch.linalg.matrix_norm(scaled, ord=2) <= layer.coeff * (1 + 1e-6)
    norms = [
        torch.linalg.matrix_norm(_jacobian_g(block, x), ord=2)
        for x in torch.randn(20, 4, dtype=torch.float64) * 3
    ]
    assert max(norms) <= lipschitz * (1 + 1e-6)


def test_spectral_norm_state_is_deterministic_between_updates_and_refreshed_after():
    layer = SpectralLinear(5, 7, coeff=0.9)
    x = torch.randn(3, 5)
    assert torch.equal(layer(x), layer(x))  # no power iteration without a weight change
    u = layer.u.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)  # a realistic small update
    layer(x).pow(2).sum().backward()
    optimizer.step()
    layer(x)
    assert not torch.equal(layer.u, u)  # the optimiser step triggered a refresh
    true_sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    assert torch.isclose(layer.u @ layer.weight.detach() @ layer.v, true_sigma, rtol=1e-3)


def test_exact_log_det_matches_slogdet_and_estimators_are_unbiased():
    block = _block(3, log_det="exact")
    x = torch.randn(3, dtype=torch.float64).expand(40000, 3)
    exact = block.inverse_and_log_det(x[:1])[1]
    jac = _jacobian_g(block, x[0])
    assert torch.allclose(
        -exact, torch.linalg.slogdet(torch.eye(3, dtype=torch.float64) + jac)[1], atol=1e-12
    )
    for mode in ("series", "roulette"):
        block.log_det = mode
        with torch.no_grad():
            est = block.inverse_and_log_det(x)[1]
        # each row has its own Hutchinson probe (and, for the roulette, the batch one draw):
        # the mean over rows is within Monte-Carlo error of the exact value
        err = (est.mean() - exact).abs().item()
        assert err < 5 * est.std().item() / len(est) ** 0.5 + (2e-3 if mode == "series" else 0.0), (
            mode
        )


def test_roulette_is_unbiased_over_its_random_truncation():
    block = _block(2, log_det="roulette", exact_terms=1, roulette_p=0.6)
    x = torch.randn(1, 2, dtype=torch.float64)
    block.log_det = "exact"
    exact = block.inverse_and_log_det(x)[1]
    block.log_det = "roulette"
    with torch.no_grad():
        draws = torch.cat([block.inverse_and_log_det(x.expand(200, 2))[1] for _ in range(100)])
    assert (draws.mean() - exact).abs() < 5 * draws.std() / len(draws) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_point_inverse_within_documented_tolerance(dtype):
    tol, c = 1e-6, 0.9
    block = _block(3, lipschitz=c, tol=tol).to(dtype)
    z = 2 * torch.randn(50, 3, dtype=dtype)
    x, _ = block.forward_and_log_det(z)
    z_back, _ = block.inverse_and_log_det(x)
    bound = c / (1 - c) * tol + (0 if dtype == torch.float64 else 1e-5)
    assert (z_back - z).abs().max() <= bound


def test_implicit_gradients_of_the_fixed_point_match_finite_differences():
    block = _block(2, log_det="exact", tol=1e-13)
    z = torch.randn(4, 2, dtype=torch.float64)
    weights = torch.randn(4, 2, dtype=torch.float64)

    def loss():
        x, ladj = block.forward_and_log_det(z)
        return (x * weights).sum() + ladj.sum()

    loss().backward()
    param = block.g.linears[0].bias
    eps = 1e-6
    for i in range(param.numel()):
        with torch.no_grad():
            param[i] += eps
            up = loss()
            param[i] -= 2 * eps
            down = loss()
            param[i] += eps
        assert torch.isclose(param.grad[i], (up - down) / (2 * eps), atol=1e-6, rtol=1e-5)


def test_state_dict_and_pickle_keep_the_power_iteration_state():
    flow = pyroflows.build_flow("residual", 2, num_layers=2, hidden_dims=(8,), log_det="exact")
    x = torch.randn(5, 2)
    expected = flow.log_prob(x)
    assert any(key.endswith(".u") for key in flow.state_dict())
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    copy = pyroflows.build_flow("residual", 2, num_layers=2, hidden_dims=(8,), log_det="exact")
    copy.load_state_dict(torch.load(buffer))
    assert torch.equal(copy.log_prob(x), expected)
    assert torch.allclose(pickle.loads(pickle.dumps(flow)).log_prob(x), expected)


@pytest.mark.parametrize("log_det", ["series", "roulette"])
def test_estimator_modes_train_and_survive_the_device_trap(log_det):
    flow = pyroflows.build_flow("residual", 4, num_layers=2, hidden_dims=(8,), log_det=log_det)
    x = torch.randn(16, 4)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    with default_device_trap():
        loss = -flow.log_prob(x).mean() - flow.rsample_and_log_prob((4,))[1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_auto_mode_is_exact_for_small_dimensions_only():
    assert ResidualBlock(3).log_det == "exact"
    assert ResidualBlock(10).log_det == "roulette"


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(lipschitz=1.0), "lipschitz"),
        (dict(lipschitz=1.5), "lipschitz"),
        (dict(lipschitz=0.0), "lipschitz"),
        (dict(tol=0.0), "tol"),
        (dict(tol=-1e-3), "tol"),
        (dict(log_det="bogus"), "log_det"),
        (dict(num_terms=0), "num_terms"),
        (dict(roulette_p=1.0), "roulette_p"),
        (dict(max_iter=0), "max_iter"),
    ],
)
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        pyroflows.build_flow("residual", 3, **options)


def test_exact_log_det_refused_at_infeasible_dimension():
    with pytest.raises(ValueError, match="log_det='exact'.*dimension 64"):
        pyroflows.build_flow("residual", 100, log_det="exact")
