"""One table of bad inputs, at least one row per public entry point: each must raise a
ValueError/TypeError whose message names the argument, and leave the object usable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import build_flow
from pyroflows.cli import main as cli_main
from pyroflows.energies import get as get_energy
from pyroflows.guides import AutoFlow
from pyroflows.infer import bits_per_dim, distill, fit
from pyroflows.mcmc import HMC, MH, SGLD, Gibbs, sample
from pyroflows.models import VAE


@dataclass
class Row:
    entry: str  # the public entry point
    setup: Callable[[], Any]  # builds the object under test
    bad: Callable[[Any], Any]  # the bad call
    error: type[Exception]
    match: str  # must appear in the message (the argument's name)
    still_ok: Callable[[Any], Any] | None = None  # a good call that must still work afterwards


def small_flow(dim=2, **kw):
    torch.manual_seed(0)
    return build_flow("realnvp", dim, num_layers=2, hidden_dims=(8,), **kw)


def flow_ok(flow):
    x = torch.linspace(-1, 1, 2 * flow.event_shape[0]).reshape(2, -1)
    return flow.log_prob(x)


def gaussian_energy(x):
    return 0.5 * (x**2).sum(-1)


def discrete_model():
    pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
    pyro.sample("x", dist.Normal(0.0, 1.0))


def continuous_model():
    pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def vae():
    torch.manual_seed(0)
    return VAE(4, 2, hidden_dims=(8,))


def vae_ok(model):
    torch.manual_seed(1)  # the ELBO is a one-sample estimate
    return model.elbo(torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


def hmc_ok(kernel):
    return sample(kernel, torch.zeros(4, 2), 5, warmup_steps=2, progress=False)


NAN = float("nan")
ROWS = [
    # build_flow
    Row("build_flow", lambda: None, lambda _: build_flow("nope", 2), ValueError, "available flows"),
    Row(
        "build_flow",
        lambda: None,
        lambda _: build_flow("realnvp", 2, num_layers=0),
        ValueError,
        "num_layers",
    ),
    Row(
        "build_flow",
        lambda: None,
        lambda _: build_flow("realnvp", 2, hidden_dims=(8, 0)),
        ValueError,
        "hidden_dims",
    ),
    Row("build_flow", lambda: None, lambda _: build_flow("realnvp", (2, 3)), ValueError, "shape"),
    Row("build_flow", lambda: None, lambda _: build_flow("maf", (1, 4, 4)), ValueError, "shape"),
    Row("build_flow", lambda: None, lambda _: build_flow("glow", (1, 5, 5)), ValueError, "5"),
    Row(
        "build_flow",
        lambda: None,
        lambda _: build_flow("realnvp", 2, context_dim=-1),
        ValueError,
        "context_dim",
    ),
    # Flow methods
    Row(
        "Flow.log_prob",
        small_flow,
        lambda f: f.log_prob(torch.randn(3, 5)),
        ValueError,
        "shape",
        flow_ok,
    ),
    Row(
        "Flow.log_prob",
        small_flow,
        lambda f: f.log_prob(torch.tensor([[NAN, 0.0]])),
        ValueError,
        "NaN",
        flow_ok,
    ),
    Row(
        "Flow.log_prob",
        small_flow,
        lambda f: f.log_prob(torch.randn(3, 2).double()),
        TypeError,
        "dtype",
        flow_ok,
    ),
    Row(
        "Flow.log_prob",
        small_flow,
        lambda f: f.log_prob(torch.randn(3, 2, device="meta")),
        ValueError,
        "meta",
        flow_ok,
    ),
    Row(
        "Flow.log_prob",
        small_flow,
        lambda f: f.log_prob(torch.randn(3, 2), torch.randn(3, 1)),
        ValueError,
        "context",
        flow_ok,
    ),
    Row(
        "Flow.log_prob",
        lambda: small_flow(context_dim=3),
        lambda f: f.log_prob(torch.randn(3, 2), torch.randn(3, 2)),
        ValueError,
        "context",
    ),
    Row("Flow.sample", small_flow, lambda f: f.sample((-2,)), ValueError, "sample_shape", flow_ok),
    Row(
        "Flow.rsample_and_log_prob",
        small_flow,
        lambda f: f.rsample_and_log_prob("x"),
        ValueError,
        "sample_shape",
        flow_ok,
    ),
    Row("Flow.dist", lambda: small_flow(context_dim=1), lambda f: f.dist(), ValueError, "context"),
    Row(
        "Flow.load_state_dict",
        small_flow,
        lambda f: f.load_state_dict({"base_loc": torch.zeros(2)}),
        ValueError,
        "missing",
        flow_ok,
    ),
    # transforms (Pyro interface, under validation)
    Row(
        "transform",
        lambda: small_flow().layers[0],
        lambda t: t(torch.randn(3, 4)),
        ValueError,
        "shape",
        lambda t: t(torch.ones(3, 2)),
    ),
    # finiteness: checked once by the distribution, not by every layer (a host sync each)
    Row(
        "Flow.dist",
        small_flow,
        lambda f: f.dist().log_prob(torch.tensor([[NAN, 1.0]])),
        ValueError,
        "support",
        flow_ok,
    ),
    # fit
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.randn(20, 2), lr=0, progress=False),
        ValueError,
        "lr",
        flow_ok,
    ),
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.randn(20, 2), num_steps=-1, progress=False),
        ValueError,
        "num_steps",
        flow_ok,
    ),
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.randn(20, 3), progress=False),
        ValueError,
        "data",
        flow_ok,
    ),
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.empty(0, 2), progress=False),
        ValueError,
        "empty",
        flow_ok,
    ),
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.full((20, 2), NAN), progress=False),
        ValueError,
        "NaN",
        flow_ok,
    ),
    Row(
        "fit",
        small_flow,
        lambda f: fit(f, torch.randn(20, 2), batch_size=0, progress=False),
        ValueError,
        "batch_size",
        flow_ok,
    ),
    # distill
    Row(
        "distill",
        small_flow,
        lambda f: distill(f, small_flow(3), num_steps=2, progress=False),
        ValueError,
        "shape",
        flow_ok,
    ),
    Row(
        "distill",
        small_flow,
        lambda f: distill(f, small_flow(), num_steps=0, progress=False),
        ValueError,
        "num_steps",
        flow_ok,
    ),
    # bits_per_dim
    Row(
        "bits_per_dim",
        lambda: build_flow("realnvp", (1, 4, 4), num_layers=2, hidden_dims=(4,)),
        lambda f: bits_per_dim(f, torch.full((2, 1, 4, 4), 17.0), 17),
        ValueError,
        "levels",
    ),
    Row(
        "bits_per_dim",
        lambda: build_flow("realnvp", (1, 4, 4), num_layers=2, hidden_dims=(4,)),
        lambda f: bits_per_dim(f, torch.zeros(2, 1, 4, 4), 1),
        ValueError,
        "num_levels",
    ),
    # AutoFlow
    Row(
        "AutoFlow",
        lambda: None,
        lambda _: AutoFlow(discrete_model, flow="realnvp")(),
        ValueError,
        "'k'",
    ),
    Row(
        "AutoFlow",
        lambda: None,
        lambda _: AutoFlow(continuous_model, flow="nope")(),
        ValueError,
        "available flows",
    ),
    # VAE
    Row("VAE", lambda: None, lambda _: VAE(0, 2), ValueError, "x_dim"),
    Row("VAE", lambda: None, lambda _: VAE(4, 2, likelihood="poisson"), ValueError, "likelihood"),
    Row("VAE", lambda: None, lambda _: VAE(4, 2, posterior="nope"), ValueError, "posterior"),
    Row("VAE.elbo", vae, lambda m: m.elbo(torch.zeros(3, 5)), ValueError, "4", vae_ok),
    Row(
        "VAE.elbo", vae, lambda m: m.elbo(torch.full((3, 4), 0.5)), ValueError, "bernoulli", vae_ok
    ),
    Row(
        "VAE.log_likelihood",
        vae,
        lambda m: m.log_likelihood(torch.zeros(3, 4), num_samples=0),
        ValueError,
        "num_samples",
        vae_ok,
    ),
    # MCMC kernels and driver
    Row(
        "HMC", lambda: None, lambda _: HMC(gaussian_energy, step_size=0.0), ValueError, "step_size"
    ),
    Row("HMC", lambda: None, lambda _: HMC(gaussian_energy, num_steps=0), ValueError, "num_steps"),
    Row(
        "SGLD",
        lambda: None,
        lambda _: SGLD(gaussian_energy, step_size=-1.0),
        ValueError,
        "step_size",
    ),
    Row("MH", lambda: None, lambda _: MH(gaussian_energy, scale=-0.5), ValueError, "scale"),
    Row(
        "Gibbs",
        lambda: None,
        lambda _: Gibbs(gaussian_energy, support=torch.tensor([])),
        ValueError,
        "support",
    ),
    Row(
        "mcmc.sample",
        lambda: HMC(gaussian_energy),
        lambda k: sample(k, torch.zeros(4, 2), 0, progress=False),
        ValueError,
        "num_samples",
        hmc_ok,
    ),
    Row(
        "mcmc.sample",
        lambda: HMC(gaussian_energy),
        lambda k: sample(k, torch.full((4, 2), NAN), 3, progress=False),
        ValueError,
        "init",
        hmc_ok,
    ),
    Row(
        "mcmc.sample",
        lambda: HMC(lambda x: x.sum()),
        lambda k: sample(k, torch.zeros(4, 2), 3, progress=False),
        ValueError,
        "energy",
    ),
    Row(
        "mcmc.sample",
        lambda: HMC(get_energy("banana").energy),
        lambda k: sample(k, torch.zeros(4, 3), 3, progress=False),
        ValueError,
        "shape",
    ),
    Row(
        "mcmc.sample",
        lambda: HMC(gaussian_energy),
        lambda k: sample(k, torch.zeros(4, 2), 3, thinning=0, progress=False),
        ValueError,
        "thinning",
        hmc_ok,
    ),
    # energies
    Row("energies.get", lambda: None, lambda _: get_energy("nope"), ValueError, "u1"),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}-{r.entry}" for i, r in enumerate(ROWS)])
def test_bad_input(row: Row):
    obj = row.setup()
    state = None
    if isinstance(obj, torch.nn.Module):
        state = {k: v.clone() for k, v in obj.state_dict().items()}
    before = row.still_ok(obj) if row.still_ok else None
    with pytest.raises(row.error, match=row.match):
        row.bad(obj)
    if state is not None:  # nothing corrupted
        after_state = obj.state_dict()
        assert all(torch.equal(v, after_state[k]) for k, v in state.items())
    if row.still_ok is not None:
        after = row.still_ok(obj)
        if isinstance(before, torch.Tensor):
            assert torch.equal(after, before)


CLI_ROWS = [
    (["fit", "--flow", "nope"], "unknown flow"),
    (["fit", "--steps", "0"], "steps"),
    (["fit", "--data", "missing.npy"], "not found"),
    (["vi", "--target", "nope"], "target"),
    (["sample", "--target", "nope"], "target"),
    (["sample", "--steps", "0"], "steps"),
]


@pytest.mark.parametrize("argv,match", CLI_ROWS, ids=[" ".join(a) for a, _ in CLI_ROWS])
def test_cli_bad_input(argv, match, capsys, tmp_path):
    code = cli_main(argv + ["--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_every_public_entry_point_has_a_row():
    entries = {r.entry for r in ROWS}
    for name in [
        "build_flow",
        "Flow.log_prob",
        "Flow.sample",
        "transform",
        "fit",
        "distill",
        "AutoFlow",
        "VAE",
        "HMC",
        "SGLD",
        "MH",
        "Gibbs",
        "mcmc.sample",
    ]:
        assert name in entries
