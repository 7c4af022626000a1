"""Many-chain samplers head to head: pyroflows' default sampler (ChEES-HMC) on a Pyro model and on
a hand-written energy, against BlackJAX ChEES-HMC, MEADS and NUTS and NumPyro's vectorized NUTS.

Targets: eight schools (non-centred), a 100-D Gaussian with condition number 1000 (rotated, so a
diagonal mass matrix cannot undo it), the banana and Neal's funnel (10-D). Every sampler runs
``--chains`` chains for ``--warmup`` adaptation steps and ``--draws`` draws. The score is min-ESS
per second: the smallest bulk ESS (arviz, rank-normalised, so ``tau`` and ``log tau`` agree) over
every coordinate, divided by the wall time of warm-up plus sampling. JAX samplers are timed twice
with fresh keys: the first call includes compilation (``incl``), the second does not (``excl``).
pyroflows is timed the same way: its first run traces the model's graph and, where its leapfrog
trajectories get compiled (``HMC(compile="auto")``), compiles them cold (the script points
``TORCHINDUCTOR_CACHE_DIR`` at a fresh folder unless it is set); the second run traces again and
recompiles from torch's warm caches, so ``excl`` still holds a few seconds of compilation. Each
row also shows the largest |mean error| over the coordinates in Monte-Carlo standard errors
where the answer is known (exactly, or for eight schools from the reference posterior in
``../shared/posteriordb`` when it is there), and divergent transitions after warm-up. ``--skip``
leaves out configurations (by default NumPyro's NUTS on the 100-D Gaussian, which does not
finish within 15 minutes at 1024 chains).

Rounds are interleaved and shuffled (every round runs each configuration once, in a random
order); tables show medians over rounds. A second table gives the per-call overhead of
[`ModelPotential`][pyroflows.mcmc.ModelPotential] against a hand-written energy of the same
model (energy and gradient at ``--chains`` chains, interleaved repetitions). Needs the ``bench``
extra (``numpyro``, ``blackjax``, ``jax``). Run on a quiet machine, one thread:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 OMP_NUM_THREADS=1 \\
        XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \\
        python benchmarks/samplers.py --chains 1024 --warmup 1000 --draws 1000 --rounds 3

and, to check that everything runs (seconds):

    python benchmarks/samplers.py --chains 16 --warmup 30 --draws 30 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroflows import energies, mcmc
from pyroflows.mcmc.potential import ModelPotential

warnings.filterwarnings("ignore", category=FutureWarning)

SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


@dataclass
class Target:
    """One benchmark target in every framework's terms (all on the unconstrained space)."""

    name: str
    dim: int
    pyro_model: Callable  # a Pyro model (pyroflows-model)
    energy: Callable  # torch energy (C, D) -> (C,) (pyroflows-energy)
    jax_logdensity: Callable  # jax: (D,) -> scalar
    numpyro_model: Callable
    mean: np.ndarray | None  # posterior mean per constrained coordinate, where known
    sd: np.ndarray | None  # posterior sd per constrained coordinate
    constrain: Callable = lambda x: x  # unconstrained draws (..., D) -> constrained
    derive: Callable = lambda x: x  # constrained draws -> the coordinates `mean`/`sd` describe
    mean_se: float | np.ndarray = 0.0  # the known mean's own Monte-Carlo error (a reference's)


def _rotated_covariance(dim: int, condition: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q @ np.diag(np.logspace(0, math.log10(condition), dim)) @ q.T


def make_targets() -> dict[str, Target]:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    y, sigma = torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)
    jy, jsigma = jnp.array(SCHOOLS_Y), jnp.array(SCHOOLS_SIGMA)

    def schools_model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", 8):
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)

    def schools_energy(u):  # u = (mu, log tau, theta_tilde[8])
        mu, log_tau, tt = u[:, 0], u[:, 1], u[:, 2:]
        tau = log_tau.exp()
        lp = -0.5 * (mu / 5.0) ** 2 - torch.log1p((tau / 5.0) ** 2) + log_tau
        lp = lp - 0.5 * (tt**2).sum(1)
        lp = lp - 0.5 * (((y - mu[:, None] - tau[:, None] * tt) / sigma) ** 2).sum(1)
        return -lp

    def schools_jax(u):
        mu, log_tau, tt = u[0], u[1], u[2:]
        tau = jnp.exp(log_tau)
        lp = -0.5 * (mu / 5.0) ** 2 - jnp.log1p((tau / 5.0) ** 2) + log_tau - 0.5 * (tt**2).sum()
        return lp - 0.5 * (((jy - mu - tau * tt) / jsigma) ** 2).sum()

    def schools_numpyro():
        mu = numpyro.sample("mu", ndist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", ndist.HalfCauchy(5.0))
        with numpyro.plate("school", 8):
            theta_tilde = numpyro.sample("theta_tilde", ndist.Normal(0.0, 1.0))
            numpyro.sample("y", ndist.Normal(mu + tau * theta_tilde, jsigma), obs=jy)

    cov = _rotated_covariance(100, 1000.0)
    gauss = energies.Gaussian(torch.zeros(100), torch.tensor(cov, dtype=torch.float32))
    precision = jnp.array(np.linalg.inv(cov), dtype=jnp.float32)
    jcov = jnp.array(cov, dtype=jnp.float32)

    def gauss_model():
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(100), gauss.covariance))

    def gauss_numpyro():
        numpyro.sample("x", ndist.MultivariateNormal(jnp.zeros(100), jcov))

    banana = energies.get("banana")

    def banana_model():
        x1 = pyro.sample("x1", dist.Normal(0.0, 1.0))
        pyro.sample("x2", dist.Normal(x1**2 - 1.0, 1.0))

    def banana_jax(x):
        return -0.5 * x[0] ** 2 - 0.5 * (x[1] - x[0] ** 2 + 1.0) ** 2

    def banana_numpyro():
        x1 = numpyro.sample("x1", ndist.Normal(0.0, 1.0))
        numpyro.sample("x2", ndist.Normal(x1**2 - 1.0, 1.0))

    funnel = energies.get("funnel", dim=10)

    def funnel_model():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        with pyro.plate("i", 9):
            pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    def funnel_jax(z):
        v, x = z[0], z[1:]
        return -(v**2) / 18 - 0.5 * (x**2).sum() * jnp.exp(-v) - 4.5 * v

    def funnel_numpyro():
        v = numpyro.sample("v", ndist.Normal(0.0, 3.0))
        with numpyro.plate("i", 9):
            numpyro.sample("x", ndist.Normal(0.0, jnp.exp(v / 2)))

    schools_mean, schools_sd, schools_mean_se = _schools_reference()
    zeros, ones = np.zeros, np.ones

    def schools_constrain(x):
        return np.concatenate([x[..., :1], np.exp(x[..., 1:2]), x[..., 2:]], -1)

    def schools_theta(x):  # (mu, tau, theta_tilde) -> (mu, tau, theta), as the reference has
        return np.concatenate([x[..., :2], x[..., :1] + x[..., 1:2] * x[..., 2:]], -1)

    return {
        "eight_schools": Target(
            "eight_schools", 10, schools_model, schools_energy, schools_jax, schools_numpyro,
            schools_mean, schools_sd, schools_constrain, schools_theta, schools_mean_se,
        ),
        "gauss100": Target(
            "gauss100", 100, gauss_model, gauss.energy, lambda x: -0.5 * x @ precision @ x,
            gauss_numpyro, zeros(100), np.sqrt(np.diag(cov)),
        ),
        "banana": Target(  # x2 = x1^2 - 1 + noise: Var = Var(x1^2) + 1 = 3
            "banana", 2, banana_model, banana.energy, banana_jax, banana_numpyro, zeros(2),
            np.array([1.0, math.sqrt(3.0)]),
        ),
        "funnel": Target(  # x_i | v ~ N(0, e^v): Var x_i = E e^v = e^{9/2}
            "funnel", 10, funnel_model, funnel.energy, funnel_jax, funnel_numpyro, zeros(10),
            np.concatenate([[3.0], math.exp(2.25) * ones(9)]),
        ),
    }


def _schools_reference() -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | float]:
    """Reference mean, sd and the mean's own Monte-Carlo error of (mu, tau, theta[8]) from
    ../shared/posteriordb, if there."""
    from pyroflows.datasets import posteriordb

    try:
        _, _, reference = posteriordb.load("eight_schools_noncentered")
    except (FileNotFoundError, OSError, ValueError):
        return None, None, 0.0
    names = ["mu", "tau"] + [f"theta[{i}]" for i in range(8)]
    mean, sd = (np.array([reference[n][k] for n in names]) for k in ("mean", "sd"))
    return mean, sd, sd / math.sqrt(reference["mu"].get("draws", math.inf))


# -- samplers: each returns (draws (chains, draws, D) or {name: (chains, draws, ...)}, divergences)
def run_pyroflows_model(target: Target, args, seed: int):
    idata = mcmc.sample(
        mcmc.HMC(model=target.pyro_model),
        num_chains=args.chains,
        num_samples=args.draws,
        warmup_steps=args.warmup,
        seed=seed,
        progress=False,
    )
    posterior = {k: v.values for k, v in idata.posterior.data_vars.items()}
    return posterior, int(idata.sample_stats["diverging"].sum())


def run_pyroflows_energy(target: Target, args, seed: int):
    init = torch.rand(args.chains, target.dim, generator=torch.Generator().manual_seed(seed))
    idata = mcmc.sample(
        mcmc.HMC(target.energy),
        4 * init - 2,
        args.draws,
        warmup_steps=args.warmup,
        seed=seed,
        progress=False,
    )
    return idata.posterior["x"].values, int(idata.sample_stats["diverging"].sum())


def _jax_init(target: Target, args, key):
    import jax

    return jax.random.uniform(key, (args.chains, target.dim), minval=-2.0, maxval=2.0)


def _jax_sample(step, states, key, num_draws, num_chains):
    import jax

    def one(states, k):
        states, info = jax.vmap(step)(jax.random.split(k, num_chains), states)
        return states, (states.position, info.is_divergent)

    return jax.lax.scan(one, states, jax.random.split(key, num_draws))


def run_blackjax_chees(target: Target, args, seed: int):
    import blackjax
    import jax
    import optax

    k_init, k_warm, k_draw = jax.random.split(jax.random.PRNGKey(seed), 3)
    warmup = blackjax.chees_adaptation(target.jax_logdensity, args.chains)
    (states, params), _ = warmup.run(
        k_warm, _jax_init(target, args, k_init), 0.1, optax.adam(0.025), args.warmup
    )
    step = blackjax.dynamic_hmc(target.jax_logdensity, **params).step
    _, (xs, div) = jax.jit(_jax_sample, static_argnums=(0, 3, 4))(
        step, states, k_draw, args.draws, args.chains
    )
    return np.asarray(xs).swapaxes(0, 1), int(div.sum())


def run_blackjax_meads(target: Target, args, seed: int):
    import blackjax
    import jax

    k_init, k_warm, k_draw = jax.random.split(jax.random.PRNGKey(seed), 3)
    warmup = blackjax.meads_adaptation(target.jax_logdensity, args.chains)
    (states, params), _ = warmup.run(k_warm, _jax_init(target, args, k_init), args.warmup)
    step = blackjax.ghmc(target.jax_logdensity, **params).step
    _, (xs, div) = jax.jit(_jax_sample, static_argnums=(0, 3, 4))(
        step, states, k_draw, args.draws, args.chains
    )
    return np.asarray(xs).swapaxes(0, 1), int(div.sum())


def run_blackjax_nuts(target: Target, args, seed: int):
    import blackjax
    import jax

    k_init, k_warm, k_draw = jax.random.split(jax.random.PRNGKey(seed), 3)
    warmup = blackjax.window_adaptation(blackjax.nuts, target.jax_logdensity)

    def adapt(key, position):  # Stan-style warm-up, one per chain, vectorised over chains
        (state, params), _ = warmup.run(key, position, num_steps=args.warmup)
        return state, params

    states, params = jax.jit(jax.vmap(adapt))(
        jax.random.split(k_warm, args.chains), _jax_init(target, args, k_init)
    )

    def step(key, state, params):
        return blackjax.nuts(target.jax_logdensity, **params).step(key, state)

    def one(states, k):
        states, info = jax.vmap(step)(jax.random.split(k, args.chains), states, params)
        return states, (states.position, info.is_divergent)

    _, (xs, div) = jax.jit(lambda s, k: jax.lax.scan(one, s, jax.random.split(k, args.draws)))(
        states, k_draw
    )
    return np.asarray(xs).swapaxes(0, 1), int(div.sum())


def run_numpyro_nuts(target: Target, args, seed: int):
    import jax
    from numpyro.infer import MCMC, NUTS

    sampler = MCMC(
        NUTS(target.numpyro_model),
        num_warmup=args.warmup,
        num_samples=args.draws,
        num_chains=args.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    sampler.run(jax.random.PRNGKey(seed), extra_fields=("diverging",))
    samples = sampler.get_samples(group_by_chain=True)
    div = int(np.asarray(sampler.get_extra_fields()["diverging"]).sum())
    return {k: np.asarray(v) for k, v in samples.items()}, div


SAMPLERS = {
    "pyroflows-model": run_pyroflows_model,
    "pyroflows-energy": run_pyroflows_energy,
    "blackjax-chees": run_blackjax_chees,
    "blackjax-meads": run_blackjax_meads,
    "blackjax-nuts": run_blackjax_nuts,
    "numpyro-nuts": run_numpyro_nuts,
}


def _as_matrix(draws) -> np.ndarray:
    """(chains, draws, D): a dict of sites is flattened site by site (in name order)."""
    if isinstance(draws, dict):
        parts = [np.asarray(draws[k]) for k in sorted(draws)]
        return np.concatenate([p.reshape(*p.shape[:2], -1) for p in parts], -1)
    return np.asarray(draws)


def score(draws, target: Target) -> tuple[float, float]:
    """Min bulk ESS, and the largest |mean error| in Monte-Carlo standard errors (NaN unknown;
    a reference mean's own error is part of the standard error).

    Dict draws (the model paths) are constrained already; arrays are unconstrained."""
    x = _as_matrix(draws).astype(np.float64)
    if not isinstance(draws, dict):
        x = target.constrain(x)
    ess = az.ess(az.convert_to_dataset({"x": x}))["x"].values
    error = math.nan
    if target.mean is not None:
        y = target.derive(x)
        se = target.sd / np.sqrt(az.ess(az.convert_to_dataset({"y": y}))["y"].values)
        error = float(np.max(np.abs(y.mean((0, 1)) - target.mean) / np.hypot(se, target.mean_se)))
    return float(ess.min()), error


def potential_overhead(target: Target, chains: int, reps: int) -> dict[str, float]:
    """Median seconds per energy-and-gradient call as the samplers make it: the model's
    potential (replayed after its first calls) vs the hand-written energy through autograd."""
    potential = ModelPotential(target.pyro_model)
    u = torch.randn(chains, potential.dim)

    def energy_and_grad(x):
        x = x.clone().requires_grad_(True)
        value = target.energy(x)
        return value.detach(), torch.autograd.grad(value.sum(), x)[0]

    calls = {"model": potential.value_and_grad, "energy": energy_and_grad}
    for fn in calls.values():  # warm-up: the potential traces its graph here
        for _ in range(3):
            fn(u)
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name in random.sample(list(calls), len(calls)):
            start = time.perf_counter()
            calls[name](u)
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["ratio"] = out["model"] / out["energy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--targets", nargs="+", default=["eight_schools", "gauss100", "banana", "funnel"]
    )
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument(
        "--skip", nargs="*", default=["gauss100/numpyro-nuts"], help="target/sampler pairs"
    )
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # a cold compile is part of a first run's cost; read by inductor when it first compiles
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    targets = make_targets()
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    configs = [
        (t, s) for t in args.targets for s in args.samplers if f"{t}/{s}" not in args.skip
    ]
    for r in range(args.rounds):
        for target_name, sampler in random.sample(configs, len(configs)):
            target, run = targets[target_name], SAMPLERS[sampler]
            row = results.setdefault((target_name, sampler), {})
            times = []
            for repeat in range(2):  # JAX: the first call compiles, the second reuses it
                start = time.perf_counter()
                draws, divergences = run(target, args, seed=100 * r + repeat)
                times.append(time.perf_counter() - start)
            ess, error = score(draws, target)
            for key, value in [
                ("ess", ess),
                ("incl", ess / times[0]),
                ("excl", ess / times[1]),
                ("error_se", error),
                ("divergences", divergences),
            ]:
                row.setdefault(key, []).append(value)
            print(
                f"round {r} {target_name:14s} {sampler:17s} min ESS {ess:9.0f} "
                f"ESS/s incl {ess / times[0]:9.1f} excl {ess / times[1]:9.1f} "
                f"|err| {error:5.2f} se  divergences {divergences}",
                flush=True,
            )
    print(
        f"\n{args.chains} chains, {args.warmup} warm-up + {args.draws} draws; medians over "
        f"{args.rounds} rounds\n"
    )
    print(
        "| target | sampler | min ESS | min-ESS/s incl. compile | excl. | max mean error (se) "
        "| divergences |\n|---|---|---|---|---|---|---|"
    )
    table = {}
    for (target_name, sampler), row in sorted(results.items()):
        med = {k: statistics.median(v) for k, v in row.items()}
        table[f"{target_name}/{sampler}"] = med
        print(
            f"| {target_name} | {sampler} | {med['ess']:.0f} | {med['incl']:.1f} | "
            f"{med['excl']:.1f} | {med['error_se']:.2f} | {med['divergences']:.0f} |"
        )
    print(
        f"\nModelPotential vs hand-written energy, energy + gradient at {args.chains} chains "
        "(median ms per call)\n\n| target | model | energy | ratio |\n|---|---|---|---|"
    )
    overhead = {}
    for name in args.targets:
        reps = max(20, args.rounds * 50)
        overhead[name] = potential_overhead(targets[name], args.chains, reps)
        o = overhead[name]
        print(f"| {name} | {o['model'] * 1e3:.3f} | {o['energy'] * 1e3:.3f} | {o['ratio']:.2f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": vars(args) | {"out": str(args.out)},
            "table": table,
            "potential_overhead": overhead,
        }
        (args.out / "samplers.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
