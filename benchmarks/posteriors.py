"""pyroflows' default sampler on the posteriordb reference posteriors: is the answer right?

For every posterior in ``pyroflows.datasets.posteriordb`` (the Pyro translations of the Stan
programs, site names = Stan parameter names), run ``mcmc.sample(HMC(model=...))`` with its
defaults and compare every parameter with the reference summaries (10 long Stan chains):

- ``max|z|``: the largest mean error in Monte-Carlo standard errors (reference sd over the square
  root of our bulk ESS); goal < 4;
- ``sd ratio``: the range of our sd over the reference sd; goal within 10% of 1;
- ``max R-hat`` (rank-normalised split R-hat over all chains); goal < 1.01;
- ``min ESS``, divergences, wall time (warm-up included; read times on a quiet machine only).

Usage (quality numbers do not depend on the machine's load; times do):

    python benchmarks/posteriors.py                      # all posteriors, 256 chains
    python benchmarks/posteriors.py --chains 64 --samples 200 --warmup 200 --names sblrc-blr
    python benchmarks/posteriors.py --json               # one JSON line per posterior as well

Needs the posteriordb folder (``$PYROFLOWS_POSTERIORDB`` or ``../shared/posteriordb``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch

from pyroflows import mcmc
from pyroflows.datasets import posteriordb

warnings.filterwarnings("ignore", category=FutureWarning)


def run(name: str, args: argparse.Namespace) -> dict:
    model, data, reference = posteriordb.load(name, dtype=getattr(torch, args.dtype))
    kernel = mcmc.HMC(model=model)
    start = time.perf_counter()
    idata = mcmc.sample(
        kernel, num_samples=args.samples, warmup_steps=args.warmup, num_chains=args.chains,
        seed=args.seed, progress=args.progress, model_kwargs=data,
    )
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
        "seconds": seconds,
        "ok": bool(
            np.abs(z).max() < 4
            and np.abs(ratio - 1).max() < 0.1
            and max(r["rhat"] for r in rows.values()) < 1.01
        ),
        "params": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", nargs="+", default=posteriordb.names())
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--params", action="store_true", help="print every parameter's row")
    parser.add_argument("--json", action="store_true", help="also print one JSON line each")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"\n{args.chains} chains x {args.samples} draws ({args.warmup} warm-up), "
        f"HMC(model=...) defaults, {args.dtype}\n"
    )
    print("| posterior | max abs(z) (param) | sd ratio | max R-hat | min ESS | divergences "
          "| s | goals met |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for name in args.names:  # one row as soon as it is known
        r = run(name, args)
        results.append(r)
        print(
            f"| {r['posterior']} | {r['max_abs_z']:.2f} ({r['worst']}) | "
            f"{r['sd_ratio_min']:.3f}-{r['sd_ratio_max']:.3f} | {r['max_rhat']:.4f} | "
            f"{r['min_ess']:.0f} | {r['divergences']} | {r['seconds']:.0f} | "
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
