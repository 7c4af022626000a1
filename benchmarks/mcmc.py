"""Effective samples per second: pyroflows' batched HMC and MH against Pyro's NUTS, HMC and
RandomWalkKernel.

For each target (``banana``, ``u2``, ``funnel``) and sampler, one run = warm-up + draws; the score
is the smallest bulk ESS over the coordinates (arviz, all chains pooled) divided by the run's wall
time, warm-up included. pyroflows' kernels run 1, 64 and 1024 chains in one tensor program; Pyro's
run one chain the way Pyro runs them (``potential_fn`` for NUTS/HMC, a model for
``RandomWalkKernel``, which has no ``potential_fn``). Every sampler sees the same energy, wrapped
to count the points it is evaluated at (a batched call over 1024 chains counts 1024).

Rounds are interleaved and shuffled (each round runs every configuration once, in a random
order) and the table shows medians over rounds, so a slow phase of a shared machine hits all
contenders alike. Run with one thread and glibc's allocator kept from returning buffers:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/mcmc.py --rounds 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import HMC as PyroHMC
from pyro.infer import MCMC, NUTS, RandomWalkKernel

from pyroflows import energies, mcmc

warnings.filterwarnings("ignore", category=FutureWarning)


class Counted:
    """An energy that counts the points it is evaluated at."""

    def __init__(self, target: energies.Target) -> None:
        self.target, self.event_shape, self.points = target, target.event_shape, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = self.target.energy(x)
        self.points += max(u.numel(), 1)
        return u


def run_pyroflows(kind: str, energy: Counted, chains: int, args) -> tuple[np.ndarray, float]:
    if kind == "HMC":
        kernel = mcmc.HMC(
            energy, step_size=0.1, num_steps=args.num_steps, target_accept_prob=args.target_accept
        )
    else:
        kernel = mcmc.MH(energy)
    init = 0.5 * torch.randn(chains, *energy.event_shape)
    idata = mcmc.sample(kernel, init, args.samples, warmup_steps=args.warmup, progress=False)
    return idata.posterior["x"].values, idata.attrs["sampling_time"]


def run_pyro(kind: str, energy: Counted, args) -> tuple[np.ndarray, float]:
    if kind == "RandomWalk":

        def model():
            carrier = dist.Normal(0.0, 1.0).expand(energy.event_shape).to_event(1).mask(False)
            x = pyro.sample("x", carrier)
            pyro.factor("energy", -energy(x))

        kernel = RandomWalkKernel(model)
        init = None
    else:

        def potential(params):
            return energy(params["x"])

        kernel = (
            NUTS(potential_fn=potential)
            if kind == "NUTS"
            else PyroHMC(potential_fn=potential, step_size=0.1, num_steps=args.num_steps)
        )
        init = {"x": 0.5 * torch.randn(energy.event_shape)}
    draws, warmup = (args.pyro_samples, args.pyro_warmup)
    start = time.perf_counter()
    m = MCMC(
        kernel, num_samples=draws, warmup_steps=warmup, initial_params=init, disable_progbar=True
    )
    m.run()
    elapsed = time.perf_counter() - start
    return m.get_samples(group_by_chain=True)["x"].numpy(), elapsed


def min_ess(x: np.ndarray) -> float:
    return float(min(az.ess(np.ascontiguousarray(x[..., i])) for i in range(x.shape[-1])))


def configurations(args) -> list[tuple[str, str, int]]:
    ours = [(f"pyroflows {k}", k, c) for k in ("HMC", "MH") for c in args.chains]
    theirs = [(f"pyro {k}", k, 1) for k in args.pyro]
    return [(t, *c) for t in args.targets for c in ours + theirs]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["banana", "u2", "funnel"])
    p.add_argument("--funnel-dim", type=int, default=10)
    p.add_argument("--chains", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument(
        "--pyro",
        nargs="+",
        default=["NUTS", "HMC", "RandomWalk"],
        choices=["NUTS", "HMC", "RandomWalk"],
    )
    p.add_argument("--samples", type=int, default=1000, help="pyroflows draws per chain")
    p.add_argument("--warmup", type=int, default=300, help="pyroflows warm-up steps")
    p.add_argument("--pyro-samples", type=int, default=1000)
    p.add_argument("--pyro-warmup", type=int, default=500)
    p.add_argument(
        "--num-steps", type=int, default=10, help="HMC leapfrog steps (pyroflows and Pyro)"
    )
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for mcmc.json and mcmc.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    configs = configurations(args)
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            target_name, label, kind, chains = config
            target = energies.get(
                target_name, **({"dim": args.funnel_dim} if target_name == "funnel" else {})
            )
            energy = Counted(target)
            torch.manual_seed(args.seed + r)
            pyro.set_rng_seed(args.seed + r)
            if label.startswith("pyroflows"):
                x, elapsed = run_pyroflows(kind, energy, chains, args)
            else:
                x, elapsed = run_pyro(kind, energy, args)
            ess = min_ess(x)
            row = dict(
                min_ess=ess,
                seconds=elapsed,
                ess_per_s=ess / elapsed,
                evals=energy.points,
                draws=int(x.shape[0] * x.shape[1]),
            )
            results[config].append(row)
            print(
                f"round {r}: {target_name:7s} {label:20s} chains={chains:5d} "
                f"min-ESS {ess:9.0f} in {elapsed:6.1f} s = {ess / elapsed:9.1f}/s, "
                f"{energy.points} evals",
                file=sys.stderr,
                flush=True,
            )
    report = summarize(results, args)
    print(report["table"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mcmc.json").write_text(json.dumps(report, indent=1))
        (out / "mcmc.md").write_text(report["table"] + "\n")
    return report


def summarize(results: dict, args) -> dict:
    rows, lines = (
        [],
        [
            "| target | sampler | chains | draws | min ESS | seconds | min-ESS/s "
            "| energy evals | evals / ESS | x Pyro NUTS |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ],
    )
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    for (target, label, _kind, chains), m in med.items():
        nuts = med.get((target, "pyro NUTS", "NUTS", 1))
        ratio = m["ess_per_s"] / nuts["ess_per_s"] if nuts else float("nan")
        rows.append(dict(target=target, sampler=label, chains=chains, **m, ratio_vs_nuts=ratio))
        lines.append(
            f"| {target} | {label} | {chains} | {m['draws']:.0f} | {m['min_ess']:.0f} "
            f"| {m['seconds']:.1f} | {m['ess_per_s']:.1f} | {m['evals']:.3g} "
            f"| {m['evals'] / max(m['min_ess'], 1e-9):.3g} | {ratio:.1f} |"
        )
    env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    return dict(
        rows=rows,
        table="\n".join(lines),
        args=vars(args),
        malloc_env=env,
        torch=torch.__version__,
        pyro=pyro.__version__,
    )


if __name__ == "__main__":
    main()
