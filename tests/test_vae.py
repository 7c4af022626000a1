"""VAE: Pyro model/guide agree with the direct bounds, IWAE >= ELBO and grows with K, training,
devices, bad input; the digits comparison (flow beats Gaussian) is a slow test."""

import pyro
import pytest
import torch
from conftest import default_device_trap
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyroflows.datasets import digits
from pyroflows.models import VAE, fit_vae

POSTERIORS = ["gaussian", "planar", "iaf", "realnvp"]


def make(posterior, likelihood="bernoulli", x_dim=12):
    torch.manual_seed(0)
    options = {} if posterior == "gaussian" else dict(num_flows=2, flow_hidden_dims=(16,))
    return VAE(x_dim, 3, hidden_dims=(16,), likelihood=likelihood, posterior=posterior, **options)


def binary(n=64, x_dim=12, seed=1):
    """Two prototype patterns with 10% of the pixels flipped: structure for a VAE to learn."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.stack(
        [torch.arange(x_dim) % 2, (torch.arange(x_dim) < x_dim // 2).long()]
    ).float()
    x = prototypes[torch.randint(2, (n,), generator=g)]
    flip = torch.rand(n, x_dim, generator=g) < 0.1
    return torch.where(flip, 1 - x, x)


@pytest.fixture(autouse=True)
def _clear_param_store():
    pyro.clear_param_store()
    yield


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_pyro_model_and_guide_match_the_direct_log_weights(posterior):
    vae, x = make(posterior), binary(8)
    with torch.no_grad():  # move the flow off its identity initialisation
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    pyro_log_w = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    z = guide_trace.nodes["z"]["value"].detach().clone()  # a new tensor: log q by inversion
    direct = (
        vae.prior().log_prob(z)
        + vae.likelihood_dist(z).log_prob(x)
        - vae.posterior_dist(x).log_prob(z)
    )
    torch.testing.assert_close(pyro_log_w, direct.sum(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("posterior", POSTERIORS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "normal"])
def test_shapes_and_iwae_bound_above_elbo(posterior, likelihood):
    vae = make(posterior, likelihood)
    x = binary(200) if likelihood == "bernoulli" else torch.randn(200, 12)
    elbo = torch.stack([vae.elbo(x) for _ in range(10)]).mean(0)
    bounds = [
        vae.log_likelihood(x, num_samples=k, chunk_size=30).mean().item() for k in (1, 10, 100)
    ]
    assert elbo.shape == vae.log_likelihood(x, num_samples=2).shape == (200,)
    assert elbo.mean() < bounds[1] < bounds[2]
    assert bounds[0] < bounds[1]
    assert vae.reconstruct(x).shape == (200, 12) and vae.sample(5).shape == (5, 12)
    assert vae.sample(5, mean=False).shape == (5, 12)
    if likelihood == "bernoulli":
        assert ((vae.reconstruct(x) >= 0) & (vae.reconstruct(x) <= 1)).all()


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_trains_with_pyro_svi_and_with_fit_vae(posterior):
    x = binary(128)
    vae = make(posterior)
    before = vae.log_likelihood(x, 50).mean()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(60):
        svi.step(x)
    after_svi = vae.log_likelihood(x, 50).mean()
    assert after_svi > before + 1.0  # SVI's optimiser reaches the encoder, decoder and flow
    history = fit_vae(
        vae,
        x,
        num_epochs=10,
        batch_size=32,
        lr=1e-2,
        validation=binary(32, seed=2),
        progress=False,
        seed=0,
    )
    first, last = history["train_loss"][:4], history["train_loss"][-4:]  # 4 steps per epoch
    assert sum(last) < sum(first)
    assert len(history["val_loss"]) == 10 and history["best_step"] is not None


def test_devices_dtypes_and_default_device_trap():
    vae = make("iaf").double()
    x = binary(16).double()
    with default_device_trap():
        assert vae.elbo(x).dtype == torch.float64
        assert vae.log_likelihood(x, num_samples=5).device.type == "cpu"
        assert vae.reconstruct(x).device.type == "cpu" and vae.sample(3).device.type == "cpu"
        fit_vae(vae, x, num_epochs=1, progress=False, seed=0)
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x).log_prob_sum()


def test_bad_input():
    vae = make("iaf")
    with pytest.raises(ValueError, match="x must have shape"):
        vae.elbo(torch.zeros(4, 13))
    with pytest.raises(ValueError, match="x must have shape"):
        vae.elbo(torch.zeros(12))
    with pytest.raises(ValueError, match="binary"):
        vae.elbo(torch.full((4, 12), 0.5))
    with pytest.raises(ValueError, match="binary"):
        vae.model(torch.full((4, 12), 2.0))
    with pytest.raises(ValueError, match="num_samples"):
        vae.log_likelihood(binary(4), num_samples=0)
    with pytest.raises(ValueError, match="NaN"):
        make("gaussian", "normal").elbo(torch.full((4, 12), float("nan")))
    with pytest.raises(TypeError, match="float"):
        vae.elbo(binary(4).double())
    with pytest.raises(ValueError, match="likelihood"):
        VAE(12, 3, likelihood="poisson")
    with pytest.raises(ValueError, match="posterior"):
        VAE(12, 3, posterior="nope")
    with pytest.raises(ValueError, match="num_flows"):
        VAE(12, 3, num_flows=2)
    with pytest.raises(ValueError, match="z_dim"):
        VAE(12, 0)
    with pytest.raises(ValueError, match="num_epochs"):
        fit_vae(vae, binary(4), num_epochs=0)


@pytest.mark.slow
def test_flow_posterior_beats_gaussian_on_binarized_digits():
    train, test = (t.flatten(1) for t in digits(binarize=True))
    scores = {}
    for posterior in ("gaussian", "iaf"):
        torch.manual_seed(0)
        options = {} if posterior == "gaussian" else dict(num_flows=4, flow_hidden_dims=(128,))
        vae = VAE(64, 8, hidden_dims=(128, 128), posterior=posterior, **options)
        fit_vae(vae, train[:-200], num_epochs=200, validation=train[-200:], progress=False, seed=0)
        torch.manual_seed(1)
        scores[posterior] = vae.log_likelihood(test, num_samples=1000).mean().item()
    assert scores["iaf"] > scores["gaussian"]
