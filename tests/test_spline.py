"""Rational-quadratic splines and the nsf / nsf_ar families beyond the conformance suite: the
map itself (exact analytic inverse, derivative, tails, knots, minimum sizes), the pluggable
elementwise interface, the one-pass directions, and bad input."""

import math
from unittest import mock

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.nn.made import MADE
from pyroflows.transforms import numerics
from pyroflows.transforms.autoregressive import Autoregressive
from pyroflows.transforms.coupling import Coupling, coupling_mask
from pyroflows.transforms.elementwise import Additive, Affine, resolve_elementwise
from pyroflows.transforms.spline import (
    RationalQuadraticSpline,
    spline_autoregressive,
    spline_coupling,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(spline, shape, scale=1.5, dtype=torch.float64):
    return tuple(scale * torch.randn(shape, dtype=dtype) for _ in range(spline.num_params))


@pytest.mark.parametrize("bins,bound", [(1, 1.0), (4, 3.0), (8, 5.0)])
def test_inverse_is_exact_and_log_derivative_matches_autograd(bins, bound):
    spline = RationalQuadraticSpline(bins=bins, bound=bound)
    x = torch.linspace(-1.5 * bound, 1.5 * bound, 801, dtype=torch.float64)
    params = _params(spline, x.shape)
    with mock.patch.object(numerics, "solve_increasing", side_effect=AssertionError("bisection")):
        y, log_d = spline.forward(x, params)
        x_back, log_d_back = spline.inverse(y, params)
    assert torch.allclose(x_back, x, atol=1e-9, rtol=0)
    assert torch.allclose(log_d_back, log_d, atol=1e-9)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(spline.forward(xg, params)[0].sum(), xg)
    assert torch.all(grad > 0)  # strictly increasing
    assert torch.allclose(torch.log(grad), log_d, atol=1e-9)


def test_identity_tails_and_continuity_at_the_bound():
    spline = RationalQuadraticSpline(bins=5, bound=2.0)
    eps = 1e-7
    x = torch.tensor([-9.0, -2.0 - eps, -2.0 + eps, 2.0 - eps, 2.0 + eps, 9.0], dtype=torch.float64)
    params = _params(spline, x.shape[:0] or (1,), scale=2.0)
    params = tuple(p.expand(x.shape) for p in params)
    y, log_d = spline.forward(x, params)
    assert y[0] == -9.0 and y[-1] == 9.0 and log_d[0] == 0 and log_d[-1] == 0
    # value and derivative (1 at the bound: linear tails) are continuous at -B and B
    assert torch.allclose(y[1:3], x[1:3], atol=1e-6) and torch.allclose(y[3:5], x[3:5], atol=1e-6)
    assert torch.allclose(log_d[1:5], torch.zeros(4, dtype=torch.float64), atol=1e-3)


def test_value_and_derivative_are_continuous_at_the_knots():
    spline = RationalQuadraticSpline(bins=6, bound=3.0)
    params = _params(spline, (1,), scale=2.0)
    _, knots = spline._knots(torch.stack(params, -1)[..., : spline.bins], spline.min_bin_width)
    inner = knots[0, 1:-1]
    eps = 1e-9
    x = torch.cat([inner - eps, inner + eps])
    y, log_d = spline.forward(x, tuple(p.expand(x.shape) for p in params))
    n = len(inner)
    assert torch.allclose(y[:n], y[n:], atol=1e-7)
    assert torch.allclose(log_d[:n], log_d[n:], atol=1e-5)


def test_zero_parameters_are_the_identity():
    spline = RationalQuadraticSpline(bins=7, bound=4.0, min_derivative=0.1)
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    zeros = tuple(torch.zeros_like(x) for _ in range(spline.num_params))
    y, log_d = spline.forward(x, zeros)
    assert torch.allclose(y, x, atol=1e-12) and torch.allclose(
        log_d, torch.zeros_like(x), atol=1e-12
    )


def test_minimum_bin_sizes_and_derivative_hold_for_extreme_outputs():
    spline = RationalQuadraticSpline(
        bins=4, bound=1.0, min_bin_width=0.05, min_bin_height=0.1, min_derivative=0.2
    )
    raw = torch.tensor([50.0, -50.0, -50.0, -50.0], dtype=torch.float64)
    widths, knots = spline._knots(raw, spline.min_bin_width)
    assert torch.all(widths >= 0.05 * 2 - 1e-12) and knots[0] == -1.0
    assert abs(knots[-1].item() - 1.0) < 1e-12
    x = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    params = tuple(
        50 * torch.randn(()).expand_as(x).to(torch.float64) for _ in range(spline.num_params)
    )
    y, _ = spline.forward(x, params)
    assert torch.all(torch.diff(y) > 0)


def test_float32_round_trip_at_moderate_parameters():
    spline = RationalQuadraticSpline()
    x = 4 * torch.randn(4096)
    params = _params(spline, x.shape, scale=0.5, dtype=torch.float32)
    y, _ = spline.forward(x, params)
    assert torch.allclose(spline.inverse(y, params)[0], x, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bins=0), "bins"),
        (dict(bins=2.5), "bins"),
        (dict(bins=True), "bins"),
        (dict(bound=0.0), "bound"),
        (dict(bound=-1.0), "bound"),
        (dict(bound=math.inf), "bound"),
        (dict(bins=10, min_bin_width=0.1), "min_bin_width"),
        (dict(bins=4, min_bin_height=0.3), "min_bin_height"),
        (dict(min_derivative=0.0), "min_derivative"),
        (dict(min_derivative=1.5), "min_derivative"),
    ],
)
def test_bad_spline_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RationalQuadraticSpline(**kwargs)
    for family in ("nsf", "nsf_ar"):
        with pytest.raises(ValueError, match=match):
            pyroflows.build_flow(family, 2, **kwargs)


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_bad_inputs_name_the_argument(family):
    flow = pyroflows.build_flow(family, 2, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 2\)"):
        flow.log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="finite"):
        flow.log_prob(torch.tensor([[math.nan, 0.0]]))
    with pytest.raises(ValueError, match="parallel"):
        pyroflows.build_flow("nsf_ar", 2, parallel="sideways")
    with pytest.raises(ValueError, match="direction"):
        pyroflows.build_flow(family, 2, direction="up")


def test_elementwise_maps_are_pluggable():
    assert isinstance(resolve_elementwise("additive"), Additive)
    assert isinstance(resolve_elementwise("affine"), Affine)
    assert isinstance(resolve_elementwise("spline"), RationalQuadraticSpline)
    with pytest.raises(ValueError, match="elementwise"):
        resolve_elementwise("quartic")
    with pytest.raises(ValueError, match="elementwise"):
        resolve_elementwise(object())

    class Cubic:  # a user map: x = z + a z^3, a = softplus(raw) (one parameter per coordinate)
        num_params = 1

        def forward(self, z, params):
            a = torch.nn.functional.softplus(params[0])
            return z + a * z**3, torch.log1p(3 * a * z**2)

        def inverse(self, x, params):
            a = torch.nn.functional.softplus(params[0])
            z = numerics.solve_increasing(
                lambda v: v + a * v**3, lambda v: 1 + 3 * a * v**2, x, -abs(x) - 1, abs(x) + 1
            )
            return z, torch.log1p(3 * a * z**2)

    for layer in (
        Coupling(coupling_mask((3,), "half"), Cubic(), (8,)),
        Autoregressive(3, "forward", Cubic(), (8,)),
    ):
        layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.3)
        z = torch.randn(5, 3, dtype=torch.float64)
        x, ladj = layer.forward_and_log_det(z)
        z_back, ladj_back = layer.inverse_and_log_det(x)
        assert torch.allclose(z_back, z, atol=1e-8) and torch.allclose(ladj_back, ladj, atol=1e-8)
        fwd = layer.forward_and_log_det
        jac = torch.autograd.functional.jacobian(lambda v, f=fwd: f(v)[0], z[0])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-8)


def test_fresh_flows_are_standard_normal():
    x = torch.randn(6, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    for family in ("nsf", "nsf_ar"):
        assert torch.allclose(pyroflows.build_flow(family, 3).log_prob(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "parallel,one_pass", [("inverse", "log_prob"), ("forward", "rsample_and_log_prob")]
)
def test_nsf_ar_fast_direction_is_one_pass(parallel, one_pass):
    flow = pyroflows.build_flow("nsf_ar", 5, num_layers=3, hidden_dims=(16,), parallel=parallel)
    with (
        mock.patch.object(MADE, "autoregress", side_effect=AssertionError("sequential")),
        mock.patch.object(MADE, "forward", autospec=True, side_effect=MADE.forward) as forward,
    ):
        flow.log_prob(torch.randn(4, 5)) if one_pass == "log_prob" else flow.rsample_and_log_prob(
            (4,)
        )
    assert forward.call_count == 3


@pytest.mark.parametrize("parallel", ["inverse", "forward"])
def test_nsf_ar_sequential_direction_is_exact(parallel):
    flow = pyroflows.build_flow(
        "nsf_ar", 4, num_layers=2, hidden_dims=(12,), parallel=parallel, ordering="random"
    )
    flow.double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.3)
    z = torch.randn(9, 4, dtype=torch.float64)
    x, ladj = flow.forward_and_log_det(z)
    z_back, ladj_back = flow.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-9) and torch.allclose(ladj_back, ladj, atol=1e-9)


def test_helpers_and_images_under_the_device_trap():
    layers = [
        spline_coupling(3, (8,), context_dim=2, bins=4),
        spline_autoregressive(3, (8,), 2, parallel="forward"),
    ]
    image = pyroflows.build_flow("nsf", (2, 4, 4), num_layers=4, hidden_dims=(4,), context_dim=2)
    z, ctx, img = torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2, 4, 4)
    with default_device_trap():
        for layer in layers:
            x, _ = layer.forward_and_log_det(z, ctx)
            assert torch.allclose(layer.inverse_and_log_det(x, ctx)[0], z, atol=1e-4)
        assert image.log_prob(img, ctx).shape == (5,)
        assert image.sample((), ctx).shape == (5, 2, 4, 4)


def test_image_masks_cover_every_pixel():
    flow = pyroflows.build_flow("nsf", (2, 4, 4), num_layers=4, hidden_dims=(4,))
    transformed = torch.zeros(2, 4, 4, dtype=torch.bool)
    for layer in flow.layers:
        if isinstance(layer, Coupling):
            transformed |= ~layer.mask
    assert transformed.all()


@pytest.mark.slow
def test_nsf_learns_eight_gaussians():
    """Held-out NLL after the toy budget of issue 14 (2000 Adam steps, batch 256, lr 1e-3) beats
    RealNVP's 2.336 nats on the same budget (docs/splines.md has the zuko comparison)."""
    from pyroflows.datasets import load
    from pyroflows.infer import fit

    train, test = load("8gaussians", 10_000, seed=0)
    flow = pyroflows.build_flow("nsf", 2, num_layers=3, hidden_dims=(64, 64))
    fit(flow, train, num_steps=2000, batch_size=256, lr=1e-3, progress=False, seed=0)
    with torch.no_grad():
        assert -flow.log_prob(test).mean().item() < 2.30


@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)])
def test_unconditional_part_is_transformed_and_exactly_inverted(shape):
    mask = coupling_mask(shape, "half" if len(shape) == 1 else "checkerboard")
    layer = Coupling(mask, RationalQuadraticSpline(bins=4), (8,), unconditional=True).double()
    plain = Coupling(mask, RationalQuadraticSpline(bins=4), (8,)).double()
    for module in (layer, plain):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.1)
    z = torch.randn(4, *shape, dtype=torch.float64)
    x, ladj = layer.forward_and_log_det(z)
    assert not torch.allclose(x[..., mask], z[..., mask])  # the conditioning part moves too
    assert torch.equal(plain.forward_and_log_det(z)[0][..., mask], z[..., mask])
    z_back, ladj_back = layer.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-10) and torch.allclose(ladj_back, ladj, atol=1e-10)
    jac = torch.autograd.functional.jacobian(
        lambda v: layer.forward_and_log_det(v)[0].reshape(-1), z[0]
    ).reshape(z[0].numel(), -1)
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-9)


@pytest.mark.parametrize("shape,pshape", [((5, 3), (3,)), ((2, 2, 4, 4), (2, 1, 4)), ((6,), ())])
@pytest.mark.parametrize("inverse", [False, True])
def test_broadcast_parameters_equal_expanded_ones(shape, pshape, inverse):
    spline = RationalQuadraticSpline(bins=5, bound=3.0)
    params = _params(spline, pshape)
    x = 2.5 * torch.randn(shape, dtype=torch.float64)
    apply = spline.inverse if inverse else spline.forward
    y, log_d = apply(x, params)
    y_ref, log_d_ref = apply(x, tuple(p.expand(shape) for p in params))
    assert y.shape == log_d.shape == x.shape
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(log_d, log_d_ref, atol=1e-12)


@pytest.mark.parametrize("family", ["nsf", "nsf_ar"])
def test_direction_chooses_which_side_evaluates_the_spline_formula(family):
    """``direction="density"`` (default): ``log_prob`` runs the spline formula on the data and
    sampling the quadratic root; ``"sample"``: the reverse (the same function family inverted)."""
    torch.manual_seed(0)
    flows = {
        d: pyroflows.build_flow(family, 3, num_layers=1, hidden_dims=(8,), direction=d).double()
        for d in ("density", "sample")
    }
    with torch.no_grad():
        for p in flows["density"].parameters():
            p.normal_(0, 0.3)
    flows["sample"].load_state_dict(flows["density"].state_dict())
    layer = flows["density"].layers[0]
    spline = layer.elementwise.base
    assert isinstance(spline, RationalQuadraticSpline)
    assert flows["sample"].layers[0].elementwise.__class__ is RationalQuadraticSpline
    x = torch.randn(16, 3, dtype=torch.float64)
    with mock.patch.object(spline, "inverse", side_effect=AssertionError("root in log_prob")):
        log_p = flows["density"].log_prob(x)  # the formula only
    z, ladj = layer.inverse_and_log_det(x)
    assert torch.allclose(layer.forward_and_log_det(z)[0], x, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward_and_log_det(v)[0], z[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-9)
    assert torch.isfinite(log_p).all()
    assert not torch.allclose(log_p, flows["sample"].log_prob(x))  # a different function family


def test_nsf_conditioner_activation_is_passed_through():
    """``nonlinearity`` reaches every coupling's conditioner and changes the map; the layer stays
    an exact bijection with the autograd log-determinant; image flows refuse it."""
    torch.manual_seed(0)
    flows = {
        name: pyroflows.build_flow("nsf", 3, num_layers=2, hidden_dims=(8,), **act).double()
        for name, act in (("relu", {}), ("tanh", {"nonlinearity": torch.nn.Tanh()}))
    }
    with torch.no_grad():
        for p in flows["relu"].parameters():
            p.normal_(0, 0.3)
    flows["tanh"].load_state_dict(flows["relu"].state_dict())
    for layer in flows["tanh"].layers:
        assert isinstance(layer.conditioner.net.f, torch.nn.Tanh)
    z = torch.randn(8, 3, dtype=torch.float64)
    layer = flows["tanh"].layers[0]
    x, ladj = layer.forward_and_log_det(z)
    assert not torch.allclose(x, flows["relu"].layers[0].forward_and_log_det(z)[0])
    z_back, ladj_back = layer.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-10) and torch.allclose(ladj_back, ladj, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward_and_log_det(v)[0], z[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-9)
    with pytest.raises(ValueError, match="nonlinearity"):
        pyroflows.build_flow("nsf", (2, 4, 4), nonlinearity=torch.nn.Tanh())
    with pytest.raises(ValueError, match="nonlinearity"):
        Coupling(coupling_mask((2, 4, 4), "checkerboard"), "affine", nonlinearity=torch.nn.Tanh())
