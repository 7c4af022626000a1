"""Dequantization and bits per dimension: hand computations on trivial models, the bound's
honesty against an exactly computable discrete likelihood, and bad input."""

import math

import pytest
import torch
from conftest import default_device_trap
from torch import nn

import pyroflows
from pyroflows.flow import Flow
from pyroflows.infer import DequantizedFlow, VariationalDequantizer, bits_per_dim, fit
from pyroflows.infer.dequantization import independent_bits_per_dim
from pyroflows.transforms.actnorm import ActNorm

pytestmark = pytest.mark.usefixtures("one_thread")


class _Midpoint(nn.Module):
    """A degenerate dequantizer: u = 1/2, log q = 0 (makes the bound deterministic)."""

    def forward(self, x, event_dim):
        return torch.full_like(x, 0.5), x.new_zeros(x.shape[: x.dim() - event_dim])


def _normal_log_pdf(y):
    return -0.5 * y**2 - 0.5 * math.log(2 * math.pi)


def test_bits_per_dim_by_hand_on_the_base_distribution():
    K = 4
    flow = Flow((1, 2, 2), [])  # no layers: the model density is N(0, I) on y
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[3.0, 3.0], [0.0, 0.0]]]])
    bpd = bits_per_dim(DequantizedFlow(flow, K, _Midpoint()), x, K)
    y = (x + 0.5) / K
    expected = (-_normal_log_pdf(y).sum((1, 2, 3)) + 4 * math.log(K)) / (4 * math.log(2))
    assert torch.allclose(bpd, expected)
    # uniform dequantization: E[-log N((x+u)/K)] = log(2 pi)/2 + ((x+1/2)^2 + 1/12) / (2 K^2)
    torch.manual_seed(0)
    many = x[:1].expand(20000, 1, 2, 2)
    bpd = bits_per_dim(flow, many, K)
    per_dim = 0.5 * math.log(2 * math.pi) + ((x[0] + 0.5) ** 2 + 1 / 12) / (2 * K**2) + math.log(K)
    assert abs(bpd.mean().item() - per_dim.mean().item() / math.log(2)) < 1e-3


def test_bound_is_honest_and_tightens_to_the_exact_discrete_likelihood():
    # one dimension, model y ~ N(0, s^2): P(x) = Phi((x+1)/(K s)) - Phi(x/(K s)) exactly
    K, s = 3, 0.3
    scale = ActNorm((1,))
    with torch.no_grad():
        scale.log_scale.fill_(math.log(s))
        scale.initialized.fill_(True)
    flow = Flow((1,), [scale]).double()
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, s)
    exact = -torch.log2(normal.cdf((x[:, 0] + 1) / K) - normal.cdf(x[:, 0] / K))
    # the uniform-dequantisation bound in closed form: E[-log N((x+u)/K; 0, s^2)] + log K
    second_moment = ((x[:, 0] + 0.5) ** 2 + 1 / 12) / K**2
    bound = (
        math.log(s) + 0.5 * math.log(2 * math.pi) + second_moment / (2 * s**2) + math.log(K)
    ) / math.log(2)
    assert (bound > exact).all()  # honest: never below the true bits/dim
    torch.manual_seed(0)
    single = bits_per_dim(flow, x.repeat(20000, 1), K).reshape(20000, 3).mean(0)
    assert torch.allclose(single, bound, atol=0.04)  # 4 Monte-Carlo standard errors
    many = bits_per_dim(flow, x.repeat(200, 1), K, num_samples=64).reshape(200, 3).mean(0)
    assert (many > exact - 0.03).all() and (many - exact < (bound - exact) / 2).all()


def test_independent_baseline_by_hand():
    train = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
    test = torch.tensor([[0.0, 2.0]])
    # dim 0: counts (2, 1, 0) + 1 -> P(0) = 3/6; dim 1: counts (0, 1, 2) + 1 -> P(2) = 3/6
    bpd = independent_bits_per_dim(train, test, 3)
    assert torch.allclose(bpd, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="event shape"):
        independent_bits_per_dim(train, torch.zeros(1, 3), 3)


def test_levels_are_checked_and_nothing_is_corrupted():
    flow = pyroflows.build_flow("glow", (1, 4, 4), num_layers=1, hidden_dims=(4,))
    model = DequantizedFlow(flow, 17)
    good = torch.randint(17, (4, 1, 4, 4)).float()
    torch.manual_seed(0)
    before = model.log_prob(good)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, what in [
        (good + 17, r"0\.\.16.*\[17"),
        (good - 1, r"0\.\.16.*\[-1"),
        (good + 0.5, "not all integers"),
    ]:
        with pytest.raises(ValueError, match=what):
            model.log_prob(bad)
        with pytest.raises(ValueError, match=what):
            bits_per_dim(model, bad, 17)
    with pytest.raises(ValueError, match="num_levels=16 but the model was built for 17"):
        bits_per_dim(model, good, 16)
    with pytest.raises(ValueError, match="num_levels"):
        DequantizedFlow(flow, 1)
    with pytest.raises(ValueError, match=r"1, 4, 4\)"):
        model.log_prob(torch.zeros(4, 2, 4, 4))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    assert torch.equal(model.log_prob(good), before)
    # integer tensors are accepted as levels
    torch.manual_seed(0)
    assert torch.equal(model.log_prob(good.long()), before)


def test_variational_dequantizer_density_is_the_change_of_variables():
    K = 5
    deq = VariationalDequantizer.build((1, 4, 4), K, num_layers=2, hidden_dims=(8,))
    with torch.no_grad():
        for p in deq.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(K, (6, 1, 4, 4)).float()
    u, log_q = deq(x, 3)
    assert u.shape == x.shape and (u > 0).all() and (u < 1).all()
    v = torch.logit(u.double()).float()
    context = (2 * x / (K - 1) - 1).flatten(1)
    log_dudv = (torch.log(u) + torch.log1p(-u)).sum((1, 2, 3))
    assert torch.allclose(log_q, deq.flow.log_prob(v, context) - log_dudv, atol=1e-3)
    with pytest.raises(ValueError, match="context_dim = 16"):
        VariationalDequantizer(pyroflows.build_flow("realnvp", (1, 4, 4), context_dim=3), K)


def test_fit_trains_a_variational_dequantizer_jointly_and_state_round_trips():
    from pyroflows.datasets import digits

    train, test = digits()
    torch.manual_seed(0)
    model = DequantizedFlow(
        pyroflows.build_flow("glow", (1, 8, 8), num_layers=1, hidden_dims=(8,)), 17, "variational"
    )
    deq_before = [p.detach().clone() for p in model.dequantizer.parameters()]
    torch.manual_seed(1)
    start = bits_per_dim(model, test[:100], 17).mean()
    fit(model, train, num_steps=30, batch_size=32, lr=3e-3, validation=0, progress=False, seed=0)
    torch.manual_seed(1)
    assert bits_per_dim(model, test[:100], 17).mean() < start - 0.3
    assert any(
        not torch.equal(a, b)
        for a, b in zip(deq_before, model.dequantizer.parameters(), strict=True)
    )
    copy = DequantizedFlow(
        pyroflows.build_flow("glow", (1, 8, 8), num_layers=1, hidden_dims=(8,)), 17, "variational"
    )
    copy.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    a = model.log_prob(test[:5])
    torch.manual_seed(2)
    assert torch.equal(copy.log_prob(test[:5]), a)


def test_dequantized_flow_under_the_device_trap_and_in_float64():
    model = DequantizedFlow(
        pyroflows.build_flow("realnvp", (1, 4, 4), num_layers=1, hidden_dims=(4,)), 4, "variational"
    )
    x = torch.randint(4, (3, 1, 4, 4)).float()
    with default_device_trap():
        lp = model.log_prob(x)
        bpd = bits_per_dim(model, x, 4, num_samples=2)
        samples = model.sample((2,))
        lp.mean().backward()
    assert lp.device.type == bpd.device.type == samples.device.type == "cpu"
    assert set(samples.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    model = model.double()
    assert model.log_prob(x.double()).dtype == torch.float64
    with pytest.raises(NotImplementedError, match="model"):
        model.rsample((2,))
