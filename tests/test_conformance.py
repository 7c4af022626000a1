"""The transform conformance suite: every registered family runs through it automatically.

Tests that take the ``device`` / ``dtype`` fixtures follow ``pytest --device ... --dtype ...``
(see ``conftest.py``); log-determinants are checked in float64 against the autograd Jacobian.
"""

import io

import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap, family_cases, small_flow

import pyroflows
from pyroflows.registry import family_spec

CASES = family_cases()
COND_CASES = family_cases(conditional=True)


def _ids(cases):
    return [f"{n}-{s}" for n, s in cases]


def _event(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _flow(name, shape, device, dtype, **options):
    return small_flow(name, shape, **options).to(device=device, dtype=dtype)


def _jacobian_log_det(fn, z):
    """slogdet of the autograd Jacobian of `fn` at one event `z` (any event shape)."""
    flat = z.reshape(-1)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(z.shape)).reshape(-1), flat)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabsdet


@pytest.mark.parametrize("precision", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_round_trip(name, shape, precision, device):
    flow = _flow(name, shape, device, precision)
    atol = family_spec(name).inverse_atol * (10 if precision == torch.float32 else 1)
    z = torch.randn(7, *_event(shape), dtype=precision, device=device)
    x, ladj = flow.forward_and_log_det(z)
    z_back, ladj_back = flow.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=atol, rtol=0)
    assert torch.allclose(ladj_back, ladj, atol=atol * 10, rtol=1e-4)
    # the same through Pyro's transform interface, layer by layer
    t = flow.transform
    assert torch.allclose(t.inv(t(z)), z, atol=atol, rtol=0)


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_log_det_matches_autograd_jacobian(name, shape, device):
    flow = _flow(name, shape, device, torch.float64)
    atol = max(1e-6, 10 * family_spec(name).inverse_atol)
    z0 = z = torch.randn(*_event(shape), dtype=torch.float64, device=device)
    total = 0.0
    for layer in flow.layers:
        expected = _jacobian_log_det(lambda v, f=layer: f.forward_and_log_det(v)[0], z)
        total = total + expected
        x = layer(z)  # Pyro's interface: the call, then log_abs_det_jacobian of that pair
        assert torch.allclose(layer.log_abs_det_jacobian(z, x), expected, atol=1e-6, rtol=1e-6)
        # the inverse direction reports the forward log-det at the point it recovers
        assert torch.allclose(layer.inverse_and_log_det(x.clone())[1], expected, atol=atol)
        z = x.detach()
    x, ladj = flow.forward_and_log_det(z0)
    assert torch.allclose(ladj, total, atol=1e-6, rtol=1e-6)  # the chain rule over layers
    # and log_prob is the change of variables
    base = dist.Normal(0.0, 1.0).log_prob(flow.inverse_and_log_det(x)[0]).sum()
    assert torch.allclose(flow.log_prob(x), base - total, atol=atol)


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_batch_shapes(name, shape, device, dtype):
    flow = _flow(name, shape, device, dtype)
    event = _event(shape)
    for batch in [(), (5,), (2, 3)]:
        x = torch.randn(*batch, *event, device=device, dtype=dtype)
        assert flow.log_prob(x).shape == batch
        assert flow.sample(batch).shape == batch + event
        xs, log_q = flow.rsample_and_log_prob(batch)
        assert xs.shape == batch + event and log_q.shape == batch
        atol = max(1e-3, 20 * family_spec(name).inverse_atol)
        assert torch.allclose(log_q, flow.log_prob(xs), atol=atol, rtol=1e-3)
    assert flow.dist().batch_shape == () and flow.dist().event_shape == event


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_pyro_distribution_agrees(name, shape, device, dtype):
    flow = _flow(name, shape, device, dtype)
    x = flow.sample((4,))
    d = flow.dist()
    assert torch.allclose(d.log_prob(x.clone()), flow.log_prob(x), atol=1e-4, rtol=1e-4)
    assert d.rsample((3,)).shape == (3, *_event(shape))


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_state_dict_round_trip(name, shape):
    flow = small_flow(name, shape)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a differently initialised copy
    config = dict(flow.config)
    copy = pyroflows.build_flow(config.pop("name"), config.pop("shape"), **config)
    copy.load_state_dict(torch.load(buffer))
    x = torch.randn(6, *_event(shape))
    assert torch.equal(copy.log_prob(x), flow.log_prob(x))
    z = torch.randn(6, *_event(shape))
    assert torch.equal(copy.forward_and_log_det(z)[0], flow.forward_and_log_det(z)[0])


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_double_and_to(name, shape):
    flow = small_flow(name, shape).double()
    assert all(b.dtype == torch.float64 for b in flow.buffers() if b.is_floating_point())
    x = torch.randn(3, *_event(shape), dtype=torch.float64)
    assert flow.log_prob(x).dtype == torch.float64
    assert flow.sample((2,)).dtype == torch.float64


@pytest.mark.parametrize("name,shape", COND_CASES, ids=_ids(COND_CASES))
def test_conditional(name, shape, device):
    flow = _flow(name, shape, device, torch.float64, context_dim=2, perturb=0.3)
    event = _event(shape)
    atol = family_spec(name).inverse_atol
    context = torch.randn(5, 2, dtype=torch.float64, device=device)
    z = torch.randn(5, *event, dtype=torch.float64, device=device)
    x, ladj = flow.forward_and_log_det(z, context)
    z_back, _ = flow.inverse_and_log_det(x, context)
    assert torch.allclose(z_back, z, atol=atol)
    # log-det against autograd, for one context
    expected = _jacobian_log_det(lambda v: flow.forward_and_log_det(v, context[0])[0], z[0])
    assert torch.allclose(flow.forward_and_log_det(z[0], context[0])[1], expected, atol=1e-6)
    # the context is used, and broadcasts: sample_shape + context batch + event
    lp = flow.log_prob(x, context)
    assert lp.shape == (5,)
    assert not torch.allclose(lp, flow.log_prob(x, context.flip(0)))
    assert flow.sample((3,), context).shape == (3, 5, *event)
    xs, log_q = flow.rsample_and_log_prob((3,), context)
    assert torch.allclose(log_q, flow.log_prob(xs, context), atol=1e-5 + 20 * atol)
    # one shared context for a batch of points
    assert flow.log_prob(x, context[0]).shape == (5,)
    # Pyro's conditional API: condition(context) and ConditionalTransformedDistribution
    assert torch.allclose(flow.dist(context).log_prob(x.clone()), lp, atol=1e-8)
    cond = flow.conditional_dist().condition(context)
    assert torch.allclose(cond.log_prob(x.clone()), lp, atol=1e-8)
    bound = flow.layers[0].condition(context)
    assert torch.allclose(bound.inv(bound(z)), z, atol=atol)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_default_device_trap(name, shape, conditional, device, dtype):
    if conditional and not family_spec(name).conditional:
        pytest.skip("family has no conditional form")
    context_dim = 2 if conditional else None
    flow = _flow(name, shape, device, dtype, context_dim=context_dim)
    event = _event(shape)
    x = torch.randn(4, *event, device=device, dtype=dtype)
    context = torch.randn(4, 2, device=device, dtype=dtype) if conditional else None
    optimizer = torch.optim.SGD(flow.parameters(), lr=1e-3)
    sample_shape = (4,) if context is None else ()
    with default_device_trap():
        assert flow.log_prob(x, context).device == x.device
        assert flow.sample(sample_shape, context).device == x.device
        xs, log_q = flow.rsample_and_log_prob(sample_shape, context)
        assert xs.device == x.device and log_q.device == x.device
        loss = -flow.log_prob(x, context).mean() - log_q.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in flow.parameters())


@pytest.mark.parametrize("name,shape", CASES, ids=_ids(CASES))
def test_gradients_are_finite_and_reach_parameters(name, shape, device, dtype):
    flow = _flow(name, shape, device, dtype)
    x = torch.randn(8, *_event(shape), device=device, dtype=dtype)
    loss = -flow.log_prob(x).mean() - flow.rsample_and_log_prob((8,))[1].mean()
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
