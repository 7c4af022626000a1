"""fit(), the datasets, and their bad-input errors."""

import numpy as np
import pytest
import torch
from conftest import default_device_trap

from pyroflows import build_flow
from pyroflows.datasets import digits, load, toy, toy_names
from pyroflows.infer import fit


@pytest.mark.parametrize("name", toy_names())
def test_toy_is_seeded_and_shaped(name):
    a, b, c = toy(name, 500, seed=3), toy(name, 500, seed=3), toy(name, 500, seed=4)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_toy_errors():
    with pytest.raises(ValueError, match="moons"):
        toy("nope", 10)
    with pytest.raises(ValueError, match="num_samples"):
        toy("moons", 0)


def test_digits():
    train, test = digits()
    assert train.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert train.min() == 0 and train.max() == 16 and torch.equal(train, train.round())
    btrain, _ = digits(binarize=True)
    assert set(btrain.unique().tolist()) == {0.0, 1.0}


def test_load_files(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", data)
    np.savetxt(tmp_path / "b.csv", data, delimiter=",", header="x,y,z", comments="")
    for f in ["a.npy", "b.csv"]:
        train, test = load(str(tmp_path / f))
        assert train.shape[1] == 3 and len(train) + len(test) == 50
    (tmp_path / "bad.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="bad.csv"):
        load(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="not found"):
        load(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="npy"):
        load("whatever.txt")


def test_fit_learns_and_restores_best():
    data = toy("moons", 2000)
    flow = build_flow("realnvp", 2, num_layers=4, hidden_dims=(32, 32))
    history = fit(flow, data, num_steps=200, progress=False, seed=0)
    assert history["val_loss"][-1] < history["val_loss"][0] - 0.5
    assert len(history["train_loss"]) == 200
    # the restored parameters are the best ones seen
    val_nll = min(history["val_loss"])
    assert history["best_val_loss"] == pytest.approx(val_nll)


def test_fit_is_deterministic_with_a_seed():
    data = toy("rings", 500)
    out = []
    for _ in range(2):
        torch.manual_seed(1)
        flow = build_flow("nice", 2, num_layers=2, hidden_dims=(16,))
        fit(flow, data, num_steps=30, progress=False, seed=5)
        out.append(flow.log_prob(data[:10]))
    assert torch.equal(out[0], out[1])


def test_fit_early_stopping():
    data = toy("moons", 300)
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(64, 64))
    history = fit(
        flow,
        data,
        num_steps=3000,
        lr=5e-3,
        eval_every=10,
        patience=3,
        progress=False,
        seed=0,
        schedule="constant",
    )
    assert history["stopped_early"] and len(history["train_loss"]) < 3000


def test_fit_conditional():
    torch.manual_seed(0)
    context = torch.randint(0, 2, (1000, 1)).float()
    data = torch.randn(1000, 2) * 0.3 + 3 * context  # two clusters selected by the context
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,), context_dim=1)
    fit(flow, data, context=context, num_steps=300, lr=3e-3, progress=False, seed=0)
    samples = flow.sample((500,), torch.ones(1))
    assert (samples.mean(0) - 3).abs().max() < 0.5


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(batch_size=-1), ValueError, "batch_size"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(validation=1.5), ValueError, "validation"),
        (dict(patience=0), ValueError, "patience"),
        (dict(context=torch.zeros(10, 1)), ValueError, "context"),
    ],
)
def test_fit_bad_options(kwargs, err, match):
    flow = build_flow("nice", 2, num_layers=2, hidden_dims=(8,))
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(err, match=match):
        fit(flow, torch.randn(10, 2), progress=False, **kwargs)
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    "data,err,match",
    [
        (torch.randn(10, 3), ValueError, r"\(n, 2\)"),
        (torch.tensor([[0.0, float("nan")]] * 4), ValueError, "NaN"),
        (torch.empty(0, 2), ValueError, "empty"),
        ([[0.0, 1.0]], TypeError, "data"),
    ],
)
def test_fit_bad_data(data, err, match):
    flow = build_flow("nice", 2, num_layers=2, hidden_dims=(8,))
    with pytest.raises(err, match=match):
        fit(flow, data, progress=False)


def test_fit_under_default_device_trap():
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,))
    data = torch.randn(64, 2)
    with default_device_trap():
        history = fit(flow, data, num_steps=3, batch_size=16, progress=False, seed=0)
    assert len(history["train_loss"]) == 3
