"""Continuous normalizing flow: exact vs Hutchinson trace, round trips at the documented
tolerance, adjoint gradients, solvers, device trap, bad input."""

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.transforms.cnf import ContinuousFlow

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(dim=3, perturb=0.5, dtype=torch.float64, **options):
    torch.manual_seed(0)
    layer = ContinuousFlow(dim, (16, 16), **options).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(perturb * torch.randn_like(p))
    return layer


def test_exact_trace_log_det_matches_the_autograd_jacobian():
    layer = _layer(3, trace="exact", rtol=1e-10, atol=1e-10)
    z = torch.randn(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward_and_log_det(v)[0], z)
    assert torch.allclose(layer.forward_and_log_det(z)[1], torch.linalg.slogdet(jac)[1], atol=1e-7)


def test_hutchinson_log_det_is_unbiased():
    exact = _layer(3, trace="exact", rtol=1e-7, atol=1e-7)
    hutch = _layer(3, trace="hutchinson", rtol=1e-7, atol=1e-7)
    x = torch.randn(1, 3, dtype=torch.float64)
    reference = exact.inverse_and_log_det(x)[1]
    with torch.no_grad():
        draws = hutch.inverse_and_log_det(x.expand(4000, 3))[1]  # one probe per row
    assert draws.std() > 0  # it is an estimate...
    assert (draws.mean() - reference).abs() < 5 * draws.std() / len(
        draws
    ) ** 0.5  # ...an unbiased one
    # and the sample path is the same ODE: only the log-det is estimated
    assert torch.allclose(
        hutch.inverse_and_log_det(x)[0], exact.inverse_and_log_det(x)[0], atol=1e-6
    )


@pytest.mark.parametrize(
    "dtype,tol,bound", [(torch.float64, 1e-8, 1e-6), (torch.float32, 1e-5, 1e-3)]
)
def test_round_trip_within_documented_tolerance(dtype, tol, bound):
    layer = _layer(2, dtype=dtype, rtol=tol, atol=tol)
    z = torch.randn(64, 2, dtype=dtype)
    x, ladj = layer.forward_and_log_det(z)
    z_back, ladj_back = layer.inverse_and_log_det(x)
    assert (z_back - z).abs().max() < bound
    assert (ladj_back - ladj).abs().max() < 10 * bound


@pytest.mark.parametrize("method", ["rk4", "bosh3"])
def test_other_solvers(method):
    layer = _layer(2, method=method, step_size=0.02, rtol=1e-6, atol=1e-6)
    z = torch.randn(8, 2, dtype=torch.float64)
    x, ladj = layer.forward_and_log_det(z)
    reference, ladj_ref = _layer(2, rtol=1e-9, atol=1e-9).forward_and_log_det(z)
    assert torch.allclose(x, reference, atol=1e-4) and torch.allclose(ladj, ladj_ref, atol=1e-4)


def test_adjoint_gradients_match_direct_backpropagation():
    grads = []
    for adjoint in (False, True):
        layer = _layer(2, adjoint=adjoint, rtol=1e-8, atol=1e-8)
        x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        z, ladj = layer.inverse_and_log_det(x)
        (z.pow(2).sum() + ladj.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(trace="hutchinson"), dict(adjoint=True)])
def test_estimator_and_adjoint_modes_survive_the_device_trap(options):
    flow = pyroflows.build_flow("cnf", 2, hidden_dims=(8,), context_dim=2, **options)
    x, context = torch.randn(8, 2), torch.randn(8, 2)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    with default_device_trap():
        loss = -flow.log_prob(x, context).mean() - flow.rsample_and_log_prob((), context)[1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


def test_new_flow_is_the_identity():
    flow = pyroflows.build_flow("cnf", 2)
    x = torch.randn(5, 2)
    assert torch.allclose(flow.inverse_and_log_det(x)[0], x)
    assert torch.allclose(
        flow.log_prob(x), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    )


def test_trace_auto_and_step_cap():
    assert ContinuousFlow(3).trace == "exact" and ContinuousFlow(10).trace == "hutchinson"
    layer = _layer(2, perturb=3.0, rtol=1e-9, atol=1e-9, max_num_steps=2)
    with pytest.raises(RuntimeError, match="max_num_steps"):
        layer.forward_and_log_det(torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(rtol=0.0), "rtol"),
        (dict(atol=-1e-6), "atol"),
        (dict(trace="bogus"), "trace"),
        (dict(method="leapfrog"), "method"),
        (dict(step_size=0.0), "step_size"),
        (dict(max_num_steps=0), "max_num_steps"),
    ],
)
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        pyroflows.build_flow("cnf", 2, **options)


def test_exact_trace_refused_at_infeasible_dimension():
    with pytest.raises(ValueError, match="trace='exact'.*dimension 64"):
        pyroflows.build_flow("cnf", 100, trace="exact")
