"""Image flows: squeeze / factor-out, multi-scale RealNVP, Glow (ActNorm, LU 1x1 conv), MintNet.

The conformance suite already checks every registered family (round trips, log-dets against
autograd Jacobians, the device trap) on (1, 4, 4) and (2, 4, 4) with default options; these tests
check the parts and the properties specific to each architecture, and run the same checks on the
spline and additive coupling options of RealNVP and Glow."""

import io
import json

import pytest
import torch
from conftest import default_device_trap, small_flow

import pyroflows
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.coupling import Coupling
from pyroflows.transforms.elementwise import Additive, Affine
from pyroflows.transforms.glow import InvertibleConv1x1
from pyroflows.transforms.mintnet import MaskedInvertibleConv
from pyroflows.transforms.multiscale import FactorOut, Squeeze, squeeze, unsqueeze
from pyroflows.transforms.spline import RationalQuadraticSpline

pytestmark = pytest.mark.usefixtures("one_thread")


def _jacobian(fn, x):
    flat = x.reshape(-1)
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(-1), flat)


def _modules(flow, cls):
    return [m for m in flow.modules() if isinstance(m, cls)]


# -- squeeze and factor-out ----------------------------------------------------------------
def test_squeeze_layout_and_exact_inverse():
    x = torch.arange(2 * 4 * 6.0).reshape(1, 2, 4, 6)
    s = squeeze(x)
    assert s.shape == (1, 8, 2, 3)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[0, 4 * c + 2 * i + j], x[0, c, i::2, j::2])
    batch = torch.randn(3, 5, 3, 8, 4)
    assert torch.equal(unsqueeze(squeeze(batch)), batch)
    layer = Squeeze((3, 8, 4))
    out, ladj = layer.forward_and_log_det(batch)
    assert torch.equal(out, batch) and torch.equal(ladj, torch.zeros(3, 5))


def test_squeeze_rejects_odd_sizes_and_mismatched_layers():
    with pytest.raises(ValueError, match=r"H and W must be even.*\(1, 5, 4\)"):
        Squeeze((1, 5, 4))
    with pytest.raises(ValueError, match=r"\(4, 2, 2\)"):
        Squeeze((1, 4, 4), [ActNorm((1, 4, 4))])


def test_factor_out_leaves_half_the_channels_alone():
    inner = ActNorm((2, 4, 4))
    with torch.no_grad():
        inner.log_scale.fill_(0.5)
        inner.initialized.fill_(True)
    layer = FactorOut((4, 4, 4), [inner])
    z = torch.randn(3, 4, 4, 4)
    x, ladj = layer.forward_and_log_det(z)
    assert torch.equal(x[:, 2:], z[:, 2:])
    assert torch.allclose(x[:, :2], z[:, :2] * torch.exp(torch.tensor(0.5)))
    assert torch.allclose(ladj, torch.full((3,), 0.5 * 2 * 16))
    assert torch.allclose(layer.inverse_and_log_det(x)[0], z)
    with pytest.raises(ValueError, match="at least 2 channels"):
        FactorOut((1, 4, 4), [])


# -- multi-scale RealNVP -------------------------------------------------------------------
def test_realnvp_image_is_multiscale():
    flow = pyroflows.build_flow("realnvp", (1, 8, 8), num_layers=6, hidden_dims=(4,))
    squeezes = _modules(flow, Squeeze)
    assert [s.event_shape for s in squeezes] == [(1, 8, 8), (2, 4, 4)]  # 3 scales: 8x8, 4x4, 2x2
    assert [f.event_shape for f in _modules(flow, FactorOut)] == [(4, 4, 4), (8, 2, 2)]
    couplings = _modules(flow, Coupling)
    # 3 checkerboard + 3 channel per scale, 4 checkerboard at the last (the paper's counts)
    assert len(couplings) == 6 + 6 + 4 == len(_modules(flow, ActNorm))
    assert (
        len(
            _modules(
                pyroflows.build_flow("realnvp", (1, 8, 8), hidden_dims=(4,), actnorm=False), ActNorm
            )
        )
        == 0
    )
    shapes = [c.event_shape for c in couplings]
    assert (
        shapes.count((4, 2, 2)) == 4
        and shapes.count((1, 8, 8)) == 3
        and shapes.count((4, 4, 4)) == 3
    )


def test_realnvp_multiscale_round_trip_and_log_det_on_digits_shape():
    flow = pyroflows.build_flow("realnvp", (1, 8, 8), num_layers=2, hidden_dims=(4,)).double()
    with torch.no_grad():
        flow.log_prob(torch.rand(16, 1, 8, 8, dtype=torch.float64))  # ActNorm's data-dependent init
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(1, 8, 8, dtype=torch.float64)
    x, ladj = flow.forward_and_log_det(z)
    assert torch.allclose(flow.inverse_and_log_det(x)[0], z, atol=1e-12)
    expected = torch.linalg.slogdet(_jacobian(lambda v: flow.forward_and_log_det(v)[0], z))[1]
    assert torch.allclose(ladj, expected, atol=1e-8)


def test_realnvp_scales_option_and_errors():
    assert (
        len(
            _modules(
                pyroflows.build_flow("realnvp", (1, 8, 8), num_scales=1, hidden_dims=(4,)), Squeeze
            )
        )
        == 0
    )
    with pytest.raises(ValueError, match=r"num_scales.*\(1, 6, 6\)"):
        pyroflows.build_flow("realnvp", (1, 6, 6), num_scales=3)
    # odd sizes: a single scale, no squeeze
    assert len(_modules(pyroflows.build_flow("realnvp", (1, 5, 5), hidden_dims=(4,)), Squeeze)) == 0


# -- Glow ----------------------------------------------------------------------------------
def test_invertible_conv_is_lu_with_cheap_log_det():
    layer = InvertibleConv1x1((4, 3, 5)).double()
    with torch.no_grad():
        layer.lower.add_(0.3 * torch.randn_like(layer.lower))
        layer.upper.add_(0.3 * torch.randn_like(layer.upper))
        layer.log_abs_s.add_(0.3 * torch.randn_like(layer.log_abs_s))
    w = layer.weight()
    assert torch.equal(layer.perm @ layer.perm.T, torch.eye(4, dtype=torch.float64))
    assert torch.allclose(
        torch.linalg.slogdet(w)[1] * 15,
        layer.forward_and_log_det(torch.randn(2, 4, 3, 5, dtype=torch.float64))[1],
    )
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    x, _ = layer.forward_and_log_det(z)
    assert torch.allclose(x, torch.nn.functional.conv2d(z, w[:, :, None, None]))
    assert torch.allclose(layer.inverse_and_log_det(x)[0], z, atol=1e-12)
    # the sign of s is a buffer: training moves log|s| only, so det W never crosses zero
    assert "sign_s" in dict(layer.named_buffers()) and "sign_s" not in dict(
        layer.named_parameters()
    )


def test_actnorm_data_dependent_init_is_state():
    layer = ActNorm((3, 4, 4))
    x = 2.0 + 3.0 * torch.randn(32, 3, 4, 4)
    z, _ = layer.inverse_and_log_det(x)
    assert bool(layer.initialized)
    per_channel = z.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, correction=0), torch.ones(3), atol=1e-4)
    # a second batch does not re-initialise
    before = layer.shift.detach().clone()
    layer.inverse_and_log_det(x + 10)
    assert torch.equal(layer.shift, before)
    # the flag is in the state dict and survives a save/load into a fresh layer and .double()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm((3, 4, 4))
    fresh.load_state_dict(torch.load(buffer))
    fresh = fresh.double()
    assert bool(fresh.initialized) and fresh.initialized.dtype == torch.bool
    fresh.inverse_and_log_det(torch.randn(8, 3, 4, 4, dtype=torch.float64) + 100)
    assert torch.allclose(fresh.shift.float(), before)
    moved = fresh.to("meta")  # .to(device) carries the flag along
    assert moved.initialized.device.type == "meta" and "initialized" in moved.state_dict()


def test_glow_structure_and_learned_prior():
    flow = pyroflows.build_flow("glow", (1, 8, 8), num_layers=3, hidden_dims=(4,))
    assert [s.event_shape for s in _modules(flow, Squeeze)] == [(1, 8, 8), (2, 4, 4), (4, 2, 2)]
    assert len(_modules(flow, InvertibleConv1x1)) == 9 and len(_modules(flow, ActNorm)) == 9
    assert len(_modules(flow, Coupling)) == 9 + 2  # one per step, plus a prior per factor-out
    no_prior = pyroflows.build_flow(
        "glow", (1, 8, 8), num_layers=3, hidden_dims=(4,), learned_prior=False
    )
    assert len(_modules(no_prior, Coupling)) == 9
    # zero-initialised couplings: before any data, the couplings are the identity
    for c in _modules(flow, Coupling):
        z = torch.randn(2, *c.event_shape)
        assert torch.equal(c.forward_and_log_det(z)[0], z)


def test_glow_bad_shapes():
    with pytest.raises(ValueError, match=r"images: shape must be \(C, H, W\)"):
        pyroflows.build_flow("glow", 16)
    with pytest.raises(
        ValueError, match=r"num_levels for shape \(1, 6, 6\) must be an int in \[1, 1\]"
    ):
        pyroflows.build_flow("glow", (1, 6, 6), num_levels=2)
    with pytest.raises(ValueError, match=r"H and W must be even, got shape \(1, 5, 6\)"):
        pyroflows.build_flow("glow", (1, 5, 6))
    with pytest.raises(ValueError, match="num_levels"):
        pyroflows.build_flow("glow", (1, 8, 8), num_levels=0)
    flow = pyroflows.build_flow("glow", (1, 8, 8), num_layers=1, hidden_dims=(4,))
    good = torch.rand(4, 1, 8, 8)
    before = flow.log_prob(good)
    with pytest.raises(ValueError, match=r"\(\*batch, 1, 8, 8\), got \(4, 3, 8, 8\)"):
        flow.log_prob(torch.rand(4, 3, 8, 8))
    assert torch.equal(flow.log_prob(good), before)  # nothing corrupted, ActNorm not re-initialised


# -- coupling="spline" | "additive" in the multi-scale architectures ----------------------------
# bound=2: standard-normal inputs hit both the spline and its identity tails
MAP_CASES = [
    (name, shape, options)
    for name in ("realnvp", "glow")
    for shape in ((1, 4, 4), (2, 4, 4))
    for options in (dict(coupling="spline", bins=4, bound=2.0), dict(coupling="additive"))
]
MAP_IDS = [f"{n}-{s}-{o['coupling']}" for n, s, o in MAP_CASES]


@pytest.mark.parametrize("name,shape,options", MAP_CASES, ids=MAP_IDS)
def test_coupling_option_round_trip_and_log_det(name, shape, options, device):
    flow = small_flow(name, shape, **options).to(device=device, dtype=torch.float64)
    z = torch.randn(5, *shape, dtype=torch.float64, device=device)
    x, ladj = flow.forward_and_log_det(z)
    z_back, ladj_back = flow.inverse_and_log_det(x)
    assert torch.allclose(z_back, z, atol=1e-10, rtol=0)
    assert torch.allclose(ladj_back, ladj, atol=1e-10)
    expected = torch.linalg.slogdet(_jacobian(lambda v: flow.forward_and_log_det(v)[0], z[0]))[1]
    assert torch.allclose(ladj[0], expected, atol=1e-10)
    for c in _modules(flow, Coupling):  # the couplings checked are far from the identity
        zc = torch.randn(5, *c.event_shape, dtype=torch.float64, device=device)
        assert (c.forward_and_log_det(zc)[0] - zc).abs().max() > 0.1
    flow32 = flow.float()
    x32 = flow32.forward_and_log_det(z.float())[0]
    assert torch.allclose(flow32.inverse_and_log_det(x32)[0], z.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_spline_coupling_conditional_and_state_dict(name):
    shape = (2, 4, 4)
    flow = small_flow(name, shape, context_dim=2, coupling="spline", bins=3, bound=2.0).double()
    context = torch.randn(4, 2, dtype=torch.float64)
    z = torch.randn(4, *shape, dtype=torch.float64)
    x, ladj = flow.forward_and_log_det(z, context)
    assert torch.allclose(flow.inverse_and_log_det(x, context)[0], z, atol=1e-10)
    expected = torch.linalg.slogdet(
        _jacobian(lambda v: flow.forward_and_log_det(v, context[0])[0], z[0])
    )[1]
    assert torch.allclose(ladj[0], expected, atol=1e-10)
    assert not torch.allclose(flow.log_prob(x, context), flow.log_prob(x, context.flip(0)))
    # the options are in the config, so a rebuilt flow loads the state dict
    config = dict(flow.config)
    copy = pyroflows.build_flow(config.pop("name"), config.pop("shape"), **config).double()
    copy.load_state_dict(flow.state_dict())
    assert torch.equal(copy.log_prob(x, context), flow.log_prob(x, context))


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_spline_coupling_under_device_trap(name, conditional, device, dtype):
    context_dim = 2 if conditional else None
    flow = small_flow(name, (2, 4, 4), context_dim=context_dim, coupling="spline", bins=3)
    flow = flow.to(device=device, dtype=dtype)
    x = torch.randn(4, 2, 4, 4, device=device, dtype=dtype)
    context = torch.randn(4, 2, device=device, dtype=dtype) if conditional else None
    sample_shape = () if conditional else (4,)
    with default_device_trap():
        lp = flow.log_prob(x, context)
        xs, log_q = flow.rsample_and_log_prob(sample_shape, context)
        (-lp.mean() - log_q.mean()).backward()
        assert flow.sample(sample_shape, context).device == x.device
    assert lp.device == xs.device == x.device and lp.dtype == dtype
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_coupling_option_structure():
    realnvp = pyroflows.build_flow(
        "realnvp", (1, 8, 8), num_layers=2, hidden_dims=(4,), coupling="spline", bins=5, bound=3.0
    )
    maps = [c.elementwise for c in _modules(realnvp, Coupling)]
    assert len(maps) == 2 + 2 + 2 and all(isinstance(m, RationalQuadraticSpline) for m in maps)
    assert (maps[0].bins, maps[0].bound) == (5, 3.0)
    # every conditioner predicts 3K - 1 numbers per channel
    assert all(c.elementwise.num_params == 14 for c in _modules(realnvp, Coupling))
    glow = pyroflows.build_flow(
        "glow", (1, 8, 8), num_layers=2, hidden_dims=(4,), coupling="spline"
    )
    couplings = _modules(glow, Coupling)
    # the learned priors (one per factor-out) stay affine: they are Gaussian priors
    assert sum(isinstance(c.elementwise, Affine) for c in couplings) == 2
    assert sum(isinstance(c.elementwise, RationalQuadraticSpline) for c in couplings) == 6
    additive = pyroflows.build_flow("realnvp", 4, num_layers=2, coupling="additive")
    assert all(isinstance(c.elementwise, Additive) for c in _modules(additive, Coupling))
    # zero-initialised conditioners: a fresh spline coupling is the identity
    for c in couplings:
        z = torch.randn(2, *c.event_shape)
        x, ladj = c.forward_and_log_det(z)
        assert torch.allclose(x, z, atol=1e-5) and torch.allclose(ladj, torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_coupling_option_errors(name):
    with pytest.raises(ValueError, match=r"coupling must be one of 'affine', 'additive', 'spline'"):
        pyroflows.build_flow(name, (1, 8, 8), coupling="rq")
    with pytest.raises(ValueError, match=r"bins apply to coupling='spline' only"):
        pyroflows.build_flow(name, (1, 8, 8), bins=4)
    with pytest.raises(ValueError, match=r"bins and bound apply .*coupling='additive'"):
        pyroflows.build_flow(name, (1, 8, 8), coupling="additive", bins=4, bound=2.0)
    with pytest.raises(ValueError, match=r"bins must be an int >= 1, got 0"):
        pyroflows.build_flow(name, (1, 8, 8), coupling="spline", bins=0)
    with pytest.raises(ValueError, match=r"bound must be a positive number, got -1"):
        pyroflows.build_flow(name, (1, 8, 8), coupling="spline", bound=-1.0)


# -- MintNet -------------------------------------------------------------------------------
def _perturbed_mintnet_layer(order, shape=(2, 3, 3)):
    layer = MaskedInvertibleConv(shape, hidden_per_channel=3, order=order).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("order", ["A", "B"])
def test_mintnet_jacobian_is_triangular_with_positive_diagonal(order):
    layer = _perturbed_mintnet_layer(order)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    jac = _jacobian(lambda v: layer.explicit(v)[0], x)
    # order the coordinates pixel by pixel (raster), then channel; "B" reverses that order
    perm = torch.arange(18).reshape(2, 9).T.reshape(-1)
    if order == "B":
        perm = perm.flip(0)
    ordered = jac[perm][:, perm]
    assert torch.equal(ordered.triu(1), torch.zeros_like(ordered))
    diag = layer.explicit(x)[1].reshape(-1)
    assert torch.allclose(jac.diagonal(), diag, atol=1e-12) and (diag > 0).all()
    assert torch.allclose(layer.inverse_and_log_det(x)[1], -torch.linalg.slogdet(jac)[1])


def test_mintnet_inverse_meets_its_tolerance_and_warns_when_capped():
    layer = _perturbed_mintnet_layer("A", (2, 6, 6))
    z = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    x = layer.solve(z)
    assert (layer.explicit(x)[0] - z).abs().max() <= 1e-10
    layer.tol = 1e-4
    assert (layer.explicit(layer.float().solve(z.float()))[0] - z.float()).abs().max() <= 1e-4
    layer.max_iter = 1
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        layer.solve(z.float())


def test_mintnet_implicit_gradients_match_finite_differences():
    layer = _perturbed_mintnet_layer("B")
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    weights = torch.randn(2, 2, 3, 3, dtype=torch.float64)

    def loss():
        x, ladj = layer.forward_and_log_det(z)
        return (x * weights).sum() + ladj.sum()

    loss().backward()
    for p in [layer.weight1, layer.weight2, layer.log_t, layer.bias1]:
        idx = tuple(int(i) for i in torch.nonzero(p.grad)[0])
        with torch.no_grad():
            p[idx] += 1e-6
            up = loss()
            p[idx] -= 2e-6
            down = loss()
            p[idx] += 1e-6
        assert torch.allclose(p.grad[idx], (up - down) / 2e-6, rtol=1e-4, atol=1e-6)


def test_mintnet_architecture_and_errors():
    flow = pyroflows.build_flow("mintnet", (1, 8, 8), num_layers=2, hidden_dims=(3,))
    masked = _modules(flow, MaskedInvertibleConv)
    assert [m.event_shape for m in masked] == [(4, 4, 4)] * 2 + [(1, 8, 8)] * 2
    assert [m.order for m in masked] == ["B", "A", "B", "A"]
    with pytest.raises(ValueError, match="images"):
        pyroflows.build_flow("mintnet", 8)
    with pytest.raises(ValueError, match=r"num_scales.*\(1, 5, 5\)"):
        pyroflows.build_flow("mintnet", (1, 5, 5), num_scales=2)
    with pytest.raises(ValueError, match="context"):
        pyroflows.build_flow("mintnet", (1, 8, 8), context_dim=2)


# -- training and the CLI --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options",
    [("realnvp", {}), ("glow", {}), ("mintnet", {}), ("glow", dict(coupling="spline"))],
    ids=["realnvp", "glow", "mintnet", "glow-spline"],
)
def test_image_flow_learns_digits_and_runs_under_device_trap(name, options):
    from pyroflows.datasets import NUM_LEVELS, digits
    from pyroflows.infer import DequantizedFlow, bits_per_dim, fit

    train, test = digits()
    model = DequantizedFlow(
        pyroflows.build_flow(name, (1, 8, 8), num_layers=1, hidden_dims=(8,), **options),
        NUM_LEVELS,
    )
    torch.manual_seed(1)
    start = bits_per_dim(model, test[:100], NUM_LEVELS).mean()
    fit(model, train, num_steps=40, batch_size=32, lr=3e-3, validation=0, progress=False, seed=0)
    torch.manual_seed(1)
    end = bits_per_dim(model, test[:100], NUM_LEVELS).mean()
    assert end < start - 0.3
    with default_device_trap():
        assert bits_per_dim(model, test[:4], NUM_LEVELS).device.type == "cpu"
        samples = model.sample((3,))
    assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16


def test_cli_fit_digits_glow(capsys, tmp_path):
    from pyroflows.cli import main

    code = main(
        [
            "fit",
            "--data",
            "digits",
            "--flow",
            "glow",
            "--steps",
            "3",
            "--num-layers",
            "1",
            "--hidden",
            "4",
            "--batch-size",
            "16",
            "--quiet",
            "--json",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["flow"] == "glow" and metrics["test_bits_per_dim"] > 0
    # bits/dim and NLL describe the same bound: nats per image / (64 ln 2)
    assert (
        abs(
            metrics["test_nll"] / (64 * torch.log(torch.tensor(2.0)).item())
            - metrics["test_bits_per_dim"]
        )
        < 0.05
    )
    assert (tmp_path / "fit-glow-digits.png").is_file()
