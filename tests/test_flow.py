"""Flow / build_flow contracts and bad-input errors."""

import pyro
import pytest
import torch

import pyroflows
from pyroflows import build_flow


def test_available_flows_has_the_seed_families():
    names = pyroflows.available_flows()
    assert {"planar", "radial", "nice", "realnvp"} <= set(names)
    assert len(names) == len(set(names))


def test_unknown_flow_lists_available():
    with pytest.raises(ValueError, match="realnvp"):
        build_flow("no-such-flow", 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=-2), "num_layers"),
        (dict(num_layers=1.5), "num_layers"),
        (dict(hidden_dims=0), "hidden_dims"),
        (dict(hidden_dims=(16, -1)), "hidden_dims"),
        (dict(hidden_dims=()), "hidden_dims"),
        (dict(context_dim=0), "context_dim"),
    ],
)
def test_invalid_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_flow("realnvp", 2, **kwargs)


@pytest.mark.parametrize("shape", [0, -1, (2, 3), (1, 2, 3, 4), "2", True, 2.0])
def test_invalid_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        build_flow("realnvp", shape)


def test_vector_only_family_rejects_images():
    with pytest.raises(ValueError, match=r"vectors"):
        build_flow("planar", (1, 4, 4))


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="bogus"):
        build_flow("realnvp", 2, bogus=3)


def test_invalid_mask():
    with pytest.raises(ValueError, match="mask"):
        build_flow("realnvp", 4, mask="checkerboard")
    with pytest.raises(ValueError, match="channel"):
        build_flow("realnvp", (1, 4, 4), mask="channel")


@pytest.fixture
def flow():
    return build_flow("realnvp", 3, num_layers=2, hidden_dims=(8,))


def test_log_prob_rejects_bad_input_and_stays_usable(flow):
    good = torch.randn(4, 3)
    before = flow.log_prob(good)
    with pytest.raises(ValueError, match=r"\(\*batch, 3\)"):
        flow.log_prob(torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        flow.log_prob(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        flow.log_prob(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(TypeError, match="dtype"):
        flow.log_prob(good.double())
    with pytest.raises(TypeError, match="floating"):
        flow.log_prob(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="Tensor"):
        flow.log_prob([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(good, torch.randn(4, 2))
    assert torch.equal(flow.log_prob(good), before)


def test_validation_off_skips_the_finiteness_check(flow):
    with pyro.validation_enabled(False):
        assert torch.isnan(flow.log_prob(torch.full((1, 3), float("nan")))).all()


def test_sample_shape_errors(flow):
    with pytest.raises(ValueError, match="sample_shape"):
        flow.sample((-1,))
    with pytest.raises(ValueError, match="sample_shape"):
        flow.sample("abc")
    assert flow.sample(5).shape == (5, 3)


def test_conditional_flow_context_errors():
    flow = build_flow("realnvp", 3, num_layers=2, hidden_dims=(8,), context_dim=2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match=r"\(\*batch, 2\)"):
        flow.log_prob(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="context"):
        flow.sample((2,))
    with pytest.raises(TypeError, match="context"):
        flow.log_prob(x, torch.randn(4, 2).double())
    assert flow.log_prob(x, torch.randn(4, 2)).shape == (4,)


def test_flow_moves_everything_with_to_and_state_dict():
    flow = build_flow("nice", 2, num_layers=2, hidden_dims=(8,))
    keys = flow.state_dict().keys()
    assert "base_loc" in keys and "base_scale" in keys
    flow.double()
    assert flow.base_dist().mean.dtype == torch.float64
    assert flow.sample((3,)).dtype == torch.float64


def test_flow_is_a_pyro_distribution_in_a_model():
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,))
    trace = pyro.poutine.trace(lambda: pyro.sample("x", flow.dist())).get_trace()
    node = trace.nodes["x"]
    assert node["value"].shape == (2,)
    value = node["value"]
    assert torch.allclose(node["fn"].log_prob(value), flow.log_prob(value), atol=1e-5)


def test_flow_requires_flow_transforms():
    with pytest.raises(TypeError, match="FlowTransform"):
        pyroflows.Flow((2,), [torch.distributions.transforms.ExpTransform()])


def test_coupling_layers_cover_every_coordinate():
    # after two alternating layers, every output coordinate depends on every input coordinate
    flow = build_flow("realnvp", 5, num_layers=3, hidden_dims=(8,))
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(5, dtype=torch.float32)
    jac = torch.autograd.functional.jacobian(lambda v: flow.forward_and_log_det(v)[0], z)
    assert (jac.abs() > 0).all()


@pytest.mark.parametrize("name", ["realnvp", "planar"])
def test_transforms_validate_their_inputs_under_pyro_validation(name):
    layer = build_flow(name, 3, num_layers=1, hidden_dims=(8,)).layers[0]
    with pytest.raises(ValueError, match=r"\(\*batch, 3\)"):
        layer(torch.randn(4, 2))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 3, dtype=torch.long))
    # finiteness costs a host sync: checked once by the distribution, not by every layer
    assert torch.isnan(layer(torch.full((2, 3), float("nan")))).all()
    flow = pyroflows.Flow((3,), [layer])
    with pytest.raises(ValueError, match="support"):
        flow.dist().log_prob(torch.full((2, 3), float("nan")))
    assert layer(torch.randn(2, 3)).shape == (2, 3)  # still usable


@pytest.mark.parametrize("mask", ["half", "alternate"])
@pytest.mark.parametrize("dim", [1, 4, 5])
def test_coupling_masks_invert_and_match_autograd(mask, dim):
    flow = build_flow("realnvp", dim, num_layers=3, hidden_dims=(8,), mask=mask).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    z = torch.randn(dim, dtype=torch.float64)
    x, ladj = flow.forward_and_log_det(z)
    assert torch.allclose(flow.inverse_and_log_det(x)[0], z, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: flow.forward_and_log_det(v)[0], z)
    assert torch.allclose(ladj, torch.linalg.slogdet(jac)[1], atol=1e-10)


def test_scoring_a_dist_sample_does_not_invert():
    # IAF's inverse is sequential; scoring its own sample must reuse the forward pass
    flow = build_flow("iaf", 4, num_layers=2, hidden_dims=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = flow.dist()
    x = d.rsample((5,))
    calls = []
    for layer in flow.layers:
        original = layer.inverse_and_log_det
        layer.inverse_and_log_det = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    lp = d.log_prob(x)
    assert not calls
    assert torch.allclose(lp, flow.log_prob(x.detach().clone()), atol=1e-4)
    calls.clear()
    d.log_prob(x.detach().clone())  # a new tensor is always inverted for real
    assert len(calls) == len(flow.layers)


def test_data_dependent_init_follows_load_state_dict():
    # the layers mirror their `initialized` buffer on the host; a load must refresh the mirror
    flow = build_flow("realnvp", (1, 4, 4), num_layers=2, hidden_dims=(4,))
    fresh = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.log_prob(torch.rand(8, 1, 4, 4))
    layers = [m for m in flow.modules() if hasattr(m, "initialized")]
    assert layers and all(bool(m.initialized) for m in layers)
    flow.load_state_dict(fresh)  # back to "not initialised"
    shifts = [m.shift.clone() for m in layers]
    flow.log_prob(5 + 3 * torch.rand(8, 1, 4, 4))  # so it initialises again, from this batch
    assert all(bool(m.initialized) for m in layers)
    assert not torch.equal(layers[-1].shift, shifts[-1])
