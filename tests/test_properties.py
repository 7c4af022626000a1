"""Property-based tests (hypothesis) over every registered family: dimensions, batch shapes,
layer counts and dtypes; plus numerical stress far in the tails."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyroflows
from pyroflows.registry import family_spec

FAMILIES = pyroflows.available_flows()
SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


def _vector_families():
    return [n for n in FAMILIES if family_spec(n).vector]


@st.composite
def flow_cases(draw, name):
    spec = family_spec(name)
    dim = draw(st.integers(min_value=max(1, spec.min_dim), max_value=6))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    layers = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    return dim, batch, layers, dtype, seed


def _build(name, dim, layers, dtype, seed):
    torch.manual_seed(seed)
    flow = pyroflows.build_flow(
        name, dim, num_layers=layers, hidden_dims=(8,), **family_spec(name).test_options
    )
    flow = flow.to(dtype)
    with torch.no_grad():
        flow.log_prob(torch.randn(16, dim, dtype=dtype))  # data-dependent init, if any
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("name", _vector_families())
def test_invertible_and_consistent(name):
    atol = family_spec(name).inverse_atol

    @SETTINGS
    @given(flow_cases(name))
    def check(case):
        dim, batch, layers, dtype, seed = case
        flow = _build(name, dim, layers, dtype, seed)
        tol = atol * (50 if dtype == torch.float32 else 1)
        z = torch.randn(*batch, dim, dtype=dtype)
        x, ladj = flow.forward_and_log_det(z)
        assert x.shape == z.shape and ladj.shape == batch
        z_back, ladj_back = flow.inverse_and_log_det(x)
        assert torch.allclose(z_back, z, atol=tol, rtol=1e-3)
        assert torch.allclose(ladj_back, ladj, atol=10 * tol, rtol=1e-3)
        lp = flow.log_prob(x)
        assert lp.shape == batch and torch.isfinite(lp).all()
        # finite gradients through both directions
        loss = lp.sum() + flow.rsample_and_log_prob((2,))[1].sum()
        grads = torch.autograd.grad(
            loss, [p for p in flow.parameters() if p.requires_grad], allow_unused=True
        )
        assert all(g is None or torch.isfinite(g).all() for g in grads)

    check()


@pytest.mark.parametrize("name", _vector_families())
def test_tails_give_finite_log_density(name):
    """Points far in the tails (|x| = 1e3) give finite log-densities."""
    flow = _build(name, 3, 2, torch.float64, 0)
    x = torch.tensor([[1e3, -1e3, 0.0], [-1e3, 1e3, 1e3], [0.0, 0.0, -1e3]], dtype=torch.float64)
    with torch.no_grad():
        lp = flow.log_prob(x)
    assert torch.isfinite(lp).all(), lp
