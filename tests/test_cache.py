"""A layer reuses its last pass through Pyro's interface only when that is exact.

Each case scores a tensor through ``flow.dist()`` (Pyro's path, where layers remember their
last pass) and compares with ``Flow.log_prob`` of a fresh copy of the same values (which never
reuses anything). The remembered pass used to be matched on tensor identity alone, which made
every case below return a stale density or drop gradients.
"""

import pytest
import torch
from conftest import small_flow

import pyroflows


def _reference(flow, x, context=None):
    return flow.log_prob(x.detach().clone(), context)


def _count_inversions(flow):
    """Wrap every layer's inverse so the test sees whether a sequential inverse ran."""
    calls = []
    for layer in flow.layers:
        original = layer.inverse_and_log_det
        layer.inverse_and_log_det = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    return calls


@pytest.mark.parametrize("name", ["iaf", "planar", "realnvp"])
def test_fresh_sample_is_scored_without_inversion(name):
    flow = small_flow(name, 3)
    calls = _count_inversions(flow)
    x = flow.dist().sample((5,))
    lp = flow.dist().log_prob(x)
    assert not calls
    assert torch.allclose(lp, _reference(flow, x), atol=1e-4)
    calls.clear()
    flow.dist().log_prob(x.clone())  # another tensor object is inverted for real
    assert len(calls) == len(flow.layers)


@pytest.mark.parametrize("name", ["iaf", "realnvp"])
def test_score_after_an_optimiser_step(name):
    flow = small_flow(name, 3)
    x = flow.dist().sample((6,))
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    loss = -flow.log_prob(torch.randn(32, 3)).mean()
    loss.backward()
    optimizer.step()
    assert torch.allclose(flow.dist().log_prob(x), _reference(flow, x), atol=1e-4)


def test_score_after_load_state_dict():
    flow = small_flow("iaf", 3)
    other = small_flow("iaf", 3, perturb=0.5)
    x = flow.dist().sample((6,))
    flow.load_state_dict(other.state_dict())
    assert torch.allclose(flow.dist().log_prob(x), _reference(other, x), atol=1e-4)


def test_score_after_load_state_dict_with_assign():
    flow = small_flow("realnvp", 3)
    other = small_flow("realnvp", 3, perturb=0.5)
    x = flow.dist().sample((6,))
    flow.load_state_dict(other.state_dict(), assign=True)
    assert torch.allclose(flow.dist().log_prob(x), _reference(other, x), atol=1e-4)


def test_score_after_the_sample_is_changed_in_place():
    flow = small_flow("iaf", 3)
    x = flow.dist().sample((6,))
    x.add_(0.5)
    assert torch.allclose(flow.dist().log_prob(x), _reference(flow, x), atol=1e-4)


@pytest.mark.parametrize("name", ["iaf", "realnvp"])
def test_sample_without_grad_then_score_with_grad(name):
    flow = small_flow(name, 3)
    with torch.no_grad():
        x = flow.dist().sample((6,))
    flow.dist().log_prob(x).sum().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    _reference(flow, x).sum().backward()
    for got, want in zip(grads, [p.grad for p in flow.parameters()], strict=True):
        assert torch.allclose(got, want, atol=1e-4)


def test_same_tensor_through_two_flows_sharing_a_layer():
    # the same layer object in two flows: its remembered pass is right for it, and only for it
    first = small_flow("iaf", 3)
    second = small_flow("iaf", 3, perturb=0.5)
    shared = first.layers[-1]
    mixed = pyroflows.Flow((3,), [second.layers[0], shared])
    x = first.dist().sample((6,))
    assert torch.allclose(mixed.dist().log_prob(x), _reference(mixed, x), atol=1e-4)
    assert torch.allclose(first.dist().log_prob(x), _reference(first, x), atol=1e-4)


def test_same_tensor_under_two_contexts():
    flow = small_flow("iaf", 3, context_dim=2, perturb=0.3)
    c1, c2 = torch.randn(6, 2), torch.randn(6, 2)
    x = flow.dist(c1).sample()
    assert torch.allclose(flow.dist(c2).log_prob(x), _reference(flow, x, c2), atol=1e-4)
    assert torch.allclose(flow.dist(c1).log_prob(x), _reference(flow, x, c1), atol=1e-4)
    layer = flow.layers[0]
    z = torch.randn(6, 3)
    y = layer.condition(c1)(z)
    want = layer.forward_and_log_det(z, c2)[1]
    assert torch.allclose(layer.condition(c2).log_abs_det_jacobian(z, y), want)


def test_inference_mode_is_never_remembered():
    flow = small_flow("iaf", 3)
    with torch.inference_mode():
        x = flow.dist().sample((4,))
        assert torch.allclose(flow.dist().log_prob(x), flow.log_prob(x.clone()), atol=1e-4)
