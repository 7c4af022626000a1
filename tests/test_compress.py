"""BitsBackCodec: bit-exact round trips (Gaussian and flow posteriors, Bernoulli and discretised
Gaussian likelihoods, float32 and float64), determinism, rate against the ELBO, bad input."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import default_device_trap

pytest.importorskip("constriction")

from pyroflows.compress import BitsBackCodec, baseline_sizes, dequantize, evaluate  # noqa: E402
from pyroflows.datasets import digits  # noqa: E402
from pyroflows.models import VAE, fit_vae  # noqa: E402

Z = 4
POSTERIORS = {
    "gaussian": {},
    "iaf": dict(num_flows=2, flow_hidden_dims=(16,), ordering=list(range(Z))),
    "maf": dict(num_flows=2, flow_hidden_dims=(16,), ordering=[2, 0, 3, 1]),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def data():
    binary = digits(binarize=True)[1][:24]
    grey = digits()[1][:12]
    return binary, grey


def make_vae(posterior="gaussian", likelihood="bernoulli", dtype=torch.float32, seed=0):
    """A small VAE whose flow layers are moved off their identity initialisation."""
    torch.manual_seed(seed)
    vae = VAE(64, Z, hidden_dims=(32,), likelihood=likelihood, posterior=posterior,
              **POSTERIORS[posterior])
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.to(dtype).eval()


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the untrained-model warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """A tiny Gaussian-posterior VAE trained for a few seconds on binarised digits."""
    torch.manual_seed(0)
    train, test = digits(binarize=True)
    vae = VAE(64, 8, hidden_dims=(64,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fit_vae(vae, train.reshape(len(train), -1), num_epochs=30, lr=5e-3, progress=False, seed=0)
    torch.set_num_threads(threads)
    return vae, test[:150]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("posterior", list(POSTERIORS))
@pytest.mark.parametrize("likelihood", ["bernoulli", "normal"])
def test_round_trip_bit_exact(data, posterior, likelihood, dtype):
    binary, grey = data
    x = binary if likelihood == "bernoulli" else grey
    vae = make_vae(posterior, likelihood, dtype)
    codec = BitsBackCodec(vae, num_levels=None if likelihood == "bernoulli" else 17)
    message = quiet(codec.encode, x)
    decoded = codec.decode(message, len(x))
    assert decoded.dtype == dtype and decoded.shape == x.shape
    assert torch.equal(decoded, x.to(dtype))


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_round_trip_on_device(data, posterior, device, dtype):
    """The VAE and the images on ``pytest --device`` / ``--dtype`` (default CPU, float32)."""
    binary, _ = data
    vae = make_vae(posterior, dtype=dtype).to(device)
    codec = BitsBackCodec(vae)
    x = binary[:8].to(device)
    decoded = codec.decode(quiet(codec.encode, x), 8)
    assert decoded.device.type == device.type and torch.equal(decoded, x.to(dtype))


def test_integer_input_and_flat_rows(data):
    binary, _ = data
    codec = BitsBackCodec(make_vae())
    flat = binary.reshape(len(binary), -1).to(torch.uint8)
    decoded = codec.decode(quiet(codec.encode, flat))
    assert decoded.shape == flat.shape and torch.equal(decoded, flat.float())


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_deterministic(data, posterior):
    binary, _ = data
    vae = make_vae(posterior)
    first = quiet(BitsBackCodec(vae).encode, binary)
    again = quiet(BitsBackCodec(copy.deepcopy(vae)).encode, binary.clone())
    assert first == again


@pytest.mark.parametrize("posterior", ["iaf", "maf"])
def test_flow_posterior_replay_is_exact(data, posterior):
    """Decoding recomputes, from the known buckets, the very tables the encoder popped with."""
    binary, _ = data
    codec = BitsBackCodec(make_vae(posterior))
    coder_tables = []

    def pop(dims, table):
        coder_tables.append(table.copy())
        return np.asarray([int(np.argmax(table[0]))] * len(dims), dtype=np.int32)

    x_in = codec.likelihood.encoder_input(binary[:1].reshape(1, -1).long())
    buckets, tables = codec._posterior(x_in, pop)
    replayed, replay_tables = codec._posterior(x_in, codec._replay(codec._dimension_order(buckets)))
    assert np.array_equal(replayed, buckets)
    assert np.array_equal(replay_tables, np.concatenate(coder_tables))
    # each table is a distribution over the buckets
    np.testing.assert_allclose(tables.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("posterior", ["gaussian", "iaf", "maf"])
def test_bucket_masses_follow_the_posterior_density(data, posterior):
    """With fine buckets, Q(bucket) / width at the buckets holding a draw z ~ q(z | x) gives
    q's density at z: the per-coordinate conditionals are the flow's own."""
    binary, _ = data
    codec = BitsBackCodec(make_vae(posterior, dtype=torch.float64), latent_precision=14)
    x_in = codec.likelihood.encoder_input(binary[:1].reshape(1, -1).long())
    q = codec.vae.posterior_dist(x_in)
    z = q.sample((6,))
    for draw, log_q in zip(z[:, 0], q.log_prob(z)[:, 0], strict=True):
        buckets = torch.searchsorted(codec._edges, draw.cpu()) - 1
        _, tables = codec._posterior(x_in, codec._replay(buckets.numpy()))
        # tables come in the order the coordinates were popped: the flow's ordering
        order = codec._layers[0].made.ordering.numpy() if codec._layers else np.arange(Z)
        chosen = buckets.numpy()[order]
        widths = (codec._edges[1:] - codec._edges[:-1]).numpy()[chosen]
        density = np.log(tables[np.arange(Z), chosen] / widths).sum()
        assert abs(density - log_q.item()) < 0.02


def test_rate_close_to_elbo(trained):
    vae, test = trained
    codec = BitsBackCodec(vae)
    rate = codec.rate(test, num_samples=200, importance_samples=200)
    assert rate["num_dims"] == 64 * len(test)
    assert rate["bits_per_dim"] == 8 * rate["message_bytes"] / rate["num_dims"]
    assert rate["bits_per_dim"] > rate["amortised_bits_per_dim"]
    # net cost = -ELBO of the discretised model; the per-image costs are random (popped bits),
    # so allow their Monte-Carlo spread over 150 images plus the bucket discretisation
    assert abs(rate["overhead"]) < 0.03, rate
    assert rate["nll_bits_per_dim"] <= rate["elbo_bits_per_dim"] + 0.01
    assert rate["amortised_bits_per_dim"] < 0.9  # well below raw storage


def test_elbo_matches_vae_for_bernoulli(trained):
    vae, test = trained
    codec = BitsBackCodec(vae)
    torch.manual_seed(1)
    ours = codec.log_weights(test, 200).mean(0)
    x = test.reshape(len(test), -1)
    theirs = torch.stack([vae.elbo(x).detach() for _ in range(200)]).mean(0).double()
    assert (ours.mean() - theirs.mean()).abs() < 0.3  # nats per image, both Monte-Carlo


def test_default_device_trap(data):
    binary, _ = data
    codec = BitsBackCodec(make_vae("iaf"))
    with default_device_trap():
        message = quiet(codec.encode, binary[:4])
        decoded = codec.decode(message, 4)
        rate = quiet(codec.rate, binary[:4], num_samples=3, importance_samples=3)
        report = quiet(evaluate, codec, binary[:4], num_samples=2)
        noisy = dequantize(binary[:4], 2, generator=torch.Generator(device="cpu"))
    assert torch.equal(decoded, binary[:4]) and math.isfinite(rate["elbo_bits_per_dim"])
    assert report["roundtrip_ok"] and noisy.shape == binary[:4].shape


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec_and_message(data):
    binary, _ = data
    codec = BitsBackCodec(make_vae())
    return codec, quiet(codec.encode, binary[:6]), binary[:6]


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, float("nan")])
def test_outside_support(data, value):
    binary, _ = data
    x = binary[:3].clone()
    x[1, 0, 2, 2] = value
    with pytest.raises(ValueError, match="integer levels 0..1"):
        BitsBackCodec(make_vae()).encode(x)


def test_outside_support_grey(data):
    _, grey = data
    codec = BitsBackCodec(make_vae(likelihood="normal"), num_levels=17)
    with pytest.raises(ValueError, match="integer levels 0..16"):
        codec.encode(grey[:2] + 1)


def test_wrong_width_and_type(data):
    binary, _ = data
    codec = BitsBackCodec(make_vae())
    with pytest.raises(ValueError, match="x_dim"):
        codec.encode(binary[:, :, :4])
    with pytest.raises(ValueError, match="n >= 1"):
        codec.encode(binary[:0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        codec.encode(binary.numpy())
    with pytest.raises(TypeError, match="pyroflows.models.VAE"):
        BitsBackCodec(torch.nn.Linear(2, 2))


def test_message_for_another_width(codec_and_message):
    _, message, _ = codec_and_message
    other = BitsBackCodec(VAE(32, Z, hidden_dims=(8,)))
    with pytest.raises(ValueError, match="x_dim 32"):
        other.decode(message)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupted_message(codec_and_message, where):
    codec, message, _ = codec_and_message
    broken = bytearray(message)
    broken[-3 if where == "payload" else 5] ^= 0x10
    with pytest.raises(ValueError, match="corrupted|another version|encoded with"):
        codec.decode(bytes(broken))


def test_truncated_and_foreign_message(codec_and_message):
    codec, message, _ = codec_and_message
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(message[:-4])
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(message[:20])
    with pytest.raises(ValueError, match="not a pyroflows BB-ANS message"):
        codec.decode(b"\x89PNG" + message[4:])
    with pytest.raises(TypeError, match="bytes"):
        codec.decode("text")


def test_wrong_count_and_model(codec_and_message):
    codec, message, x = codec_and_message
    with pytest.raises(ValueError, match="holds 6 images"):
        codec.decode(message, 5)
    other = copy.deepcopy(codec.vae)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    with pytest.raises(ValueError, match="different model"):
        BitsBackCodec(other).decode(message)
    with pytest.raises(ValueError, match="latent_precision"):
        BitsBackCodec(codec.vae, latent_precision=10).decode(message)


def test_checksum_catches_a_desynchronised_decoder(codec_and_message, monkeypatch):
    """If the decoder's tables differ from the encoder's, decoding fails loudly."""
    codec, message, _ = codec_and_message
    real = codec._likelihood_table
    monkeypatch.setattr(codec, "_likelihood_table", lambda b: real(b)[:, ::-1].copy())
    with pytest.raises(ValueError, match="checksum"):
        codec.decode(message)


def test_untrained_model_is_flagged(data):
    binary, _ = data
    codec = BitsBackCodec(make_vae())
    with pytest.warns(UserWarning, match="is it trained"):
        codec.encode(binary)


def test_bad_settings():
    with pytest.raises(ValueError, match="latent_precision"):
        BitsBackCodec(make_vae(), latent_precision=20)
    with pytest.raises(ValueError, match="num_levels is required"):
        BitsBackCodec(make_vae(likelihood="normal"))
    with pytest.raises(ValueError, match="num_levels must be 2"):
        BitsBackCodec(make_vae(), num_levels=17)
    with pytest.raises(ValueError, match="affine autoregressive"):
        BitsBackCodec(VAE(64, Z, hidden_dims=(32,), posterior="planar"))
    with pytest.raises(ValueError, match="share one ordering"):
        BitsBackCodec(VAE(64, Z, hidden_dims=(32,), posterior="iaf", num_flows=2))


# -- helpers -----------------------------------------------------------------------------------
def test_baselines(data):
    binary, grey = data
    sizes = baseline_sizes(binary, 2)
    assert sizes["raw"] == 1.0 and {"gzip", "bz2", "lzma", "png"} <= set(sizes)
    assert baseline_sizes(grey, 17)["raw"] == 8.0
    assert baseline_sizes(torch.zeros(64, 8, 8), 2)["bz2"] < 0.5  # constant images compress
    with pytest.raises(ValueError, match="levels 0..1"):
        baseline_sizes(grey, 2)


def test_dequantize_stays_in_its_bin(data):
    _, grey = data
    g = torch.Generator().manual_seed(0)
    y = dequantize(grey, 17, copies=3, generator=g)
    assert y.shape == (3 * len(grey), *grey.shape[1:])
    assert torch.equal(torch.floor(y * 17), grey.repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match="copies"):
        dequantize(grey, 17, copies=0)


# -- command line ------------------------------------------------------------------------------
def test_cli_json_and_load(tmp_path, capsys):
    import json

    from pyroflows.cli import main

    common = ["--importance-samples", "0", "--out", str(tmp_path), "--quiet", "--json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one epoch: may be flagged as untrained
        assert main(["compress", "--steps", "12", *common]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("bits_per_dim", "elbo_bits_per_dim", "gzip_bits_per_dim", "lzma_bits_per_dim"):
        assert math.isfinite(metrics[key])
    assert metrics["roundtrip_ok"] is True and metrics["num_test"] == 359
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["compress", "--load", metrics["model"], "--overwrite", *common]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["message_bytes"] == metrics["message_bytes"]  # same model, same file size
    assert main(["compress", "--load", str(tmp_path / "missing.pt"), *common]) == 2
    assert "cannot load" in capsys.readouterr().err
