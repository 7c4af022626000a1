"""pyroflows' default sampler on the posteriordb reference posteriors: is the answer right?

For every posterior in ``pyroflows.datasets.posteriordb`` (the Pyro translations of the Stan
programs, site names = Stan parameter names), run ``mcmc.sample(HMC(model=...))`` with its
defaults and compare every parameter with the reference summaries (10 long Stan chains):

- ``max|z|``: the largest mean error in Monte-Carlo standard errors (reference sd over the square
  root of our bulk ESS); goal < 4;
- ``sd ratio``: the range of our sd over the reference sd; goal within 10% of 1;
- ``max R-hat`` (rank-normalised split R-hat over all chains); goal < 1.01;
- ``min ESS``, divergences, leapfrog steps per draw (gradient evaluations: ESS per gradient does not
  depend on the machine's load), wall time (warm-up included, and the SVI fit for NeuTra; read times
  on a quiet machine only).

Usage (quality numbers do not depend on the machine's load; times do):

    python benchmarks/posteriors.py                      # all posteriors, 256 chains
    python benchmarks/posteriors.py --chains 64 --samples 200 --warmup 200 --names sblrc-blr
    python benchmarks/posteriors.py --mass diag          # the diagonal mass matrix instead
    python benchmarks/posteriors.py --json               # one JSON line per posterior as well
    python benchmarks/posteriors.py --sampler neutra-hmc # NeuTra (AutoFlow IAF, 2000 SVI steps)
    python benchmarks/posteriors.py --overhead --chains 1024   # potential vs hand-written energy

Needs the posteriordb folder (``$PYROFLOWS_POSTERIORDB`` or ``../shared/posteriordb``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import pyro
import torch

from pyroflows import mcmc
from pyroflows.datasets import posteriordb
from pyroflows.guides import AutoFlow, fit_guide

warnings.filterwarnings("ignore", category=FutureWarning)


def run(name: str, args: argparse.Namespace) -> dict:
    model, data, reference = posteriordb.load(name, dtype=getattr(torch, args.dtype))
    options = dict(
        num_samples=args.samples, warmup_steps=args.warmup, num_chains=args.chains,
        seed=args.seed, progress=args.progress, model_kwargs=data,
    )
    start = time.perf_counter()
    if args.sampler == "hmc":
        idata = mcmc.sample(mcmc.HMC(model=model, mass=args.mass), **options)
    else:  # NeuTra: fit an IAF guide by SVI, then sample in its base space (fit time included)
        pyro.clear_param_store()
        guide = AutoFlow(model, flow="iaf")
        fit_guide(model, guide, num_steps=args.svi_steps, progress=args.progress, seed=args.seed,
                  **data)
        idata = mcmc.neutra(model, guide, kernel=args.sampler.split("-")[1], **options)
    seconds = time.perf_counter() - start
    rows = posteriordb.compare(idata, reference)
    z = np.array([r["z"] for r in rows.values()])
    ratio = np.array([r["sd_ratio"] for r in rows.values()])
    worst = max(rows, key=lambda k: abs(rows[k]["z"]))
    return {
        "posterior": name,
        "max_abs_z": float(np.abs(z).max()),
        "worst": worst,
        "sd_ratio_min": float(ratio.min()),
        "sd_ratio_max": float(ratio.max()),
        "max_rhat": float(max(r["rhat"] for r in rows.values())),
        "min_ess": float(min(r["ess"] for r in rows.values())),
        "divergences": int(idata.sample_stats["diverging"].sum()),
        "steps": float(idata.sample_stats["n_steps"].mean()),
        "seconds": seconds,
        "ok": bool(
            np.abs(z).max() < 4
            and np.abs(ratio - 1).max() < 0.1
            and max(r["rhat"] for r in rows.values()) < 1.01
        ),
        "params": rows,
    }


def eight_schools_energy(data: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eight schools (non-centred) potential written by hand on the same packed vector as
    ``ModelPotential`` (``mu``, ``log tau``, ``theta_trans``): the overhead baseline."""
    y, sigma = data["y"], data["sigma"]
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def energy(u: torch.Tensor) -> torch.Tensor:
        mu, log_tau, z = u[:, 0], u[:, 1], u[:, 2:]
        tau = log_tau.exp()
        theta = mu[:, None] + tau[:, None] * z
        log_p = (
            -0.5 * (mu / 5) ** 2 - math.log(5) - half_log_2pi
            + math.log(2 / (math.pi * 5)) - torch.log1p((tau / 5) ** 2) + log_tau
            + (-0.5 * z**2 - half_log_2pi).sum(-1)
            + (-0.5 * ((y - theta) / sigma) ** 2 - sigma.log() - half_log_2pi).sum(-1)
        )
        return -log_p

    return energy


def overhead(args: argparse.Namespace) -> None:
    """Time one batched energy-and-gradient call: the model's potential against the hand-written
    energy of the same model (interleaved, shuffled rounds; medians)."""
    model, data, _ = posteriordb.load("eight_schools_noncentered", dtype=getattr(torch, args.dtype))
    potential = mcmc.ModelPotential(model, **data)
    energies = {"ModelPotential": potential.energy, "hand-written": eight_schools_energy(data)}
    u = potential.init(args.chains, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(energies["hand-written"](u), potential.energy(u))

    def call(energy: Callable[[torch.Tensor], torch.Tensor]) -> float:
        x = u.clone().requires_grad_(True)  # a fresh tensor every call
        start = time.perf_counter()
        torch.autograd.grad(energy(x).sum(), x)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in energies}
    for _ in range(args.rounds):
        for name in random.sample(list(energies), len(energies)):
            times[name].append(min(call(energies[name]) for _ in range(10)))
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"\neight schools, {args.chains} chains, energy + gradient, ms (median of "
          f"{args.rounds} rounds)\n")
    print("| energy | ms | ratio |\n|---|---|---|")
    for name, ms in median.items():
        print(f"| {name} | {ms:.3f} | {ms / median['hand-written']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", nargs="+", default=posteriordb.names())
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=["hmc", "neutra-hmc", "neutra-mh"], default="hmc",
                        help="HMC(model=...) defaults, or NeuTra after an AutoFlow (IAF) fit")
    parser.add_argument("--mass", choices=["auto", "diag", "dense"], default="auto",
                        help="HMC's mass matrix (auto: dense up to 200 coordinates)")
    parser.add_argument("--svi-steps", type=int, default=2000, help="NeuTra's SVI budget")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--params", action="store_true", help="print every parameter's row")
    parser.add_argument("--json", action="store_true", help="also print one JSON line each")
    parser.add_argument("--overhead", action="store_true",
                        help="time the model potential against a hand-written energy instead")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of --overhead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.overhead:
        overhead(args)
        return
    print(
        f"\n{args.chains} chains x {args.samples} draws ({args.warmup} warm-up), "
        f"sampler {args.sampler}, mass {args.mass}, {args.dtype}\n"
    )
    print("| posterior | max abs(z) (param) | sd ratio | max R-hat | min ESS | divergences "
          "| leapfrog steps / draw | s | goals met |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for name in args.names:  # one row as soon as it is known
        r = run(name, args)
        results.append(r)
        print(
            f"| {r['posterior']} | {r['max_abs_z']:.2f} ({r['worst']}) | "
            f"{r['sd_ratio_min']:.3f}-{r['sd_ratio_max']:.3f} | {r['max_rhat']:.4f} | "
            f"{r['min_ess']:.0f} | {r['divergences']} | {r['steps']:.1f} | {r['seconds']:.0f} | "
            f"{'yes' if r['ok'] else 'no'} |",
            flush=True,
        )
    if args.params:
        for r in results:
            print(f"\n{r['posterior']}\n\n| param | mean | z | sd ratio | R-hat | ESS |")
            print("|---|---|---|---|---|---|")
            for k, p in r["params"].items():
                print(f"| {k} | {p['mean']:.4g} | {p['z']:.2f} | {p['sd_ratio']:.3f} | "
                      f"{p['rhat']:.4f} | {p['ess']:.0f} |")
    if args.json:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "params"}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
