"""Held-out NLL of the non-triangular families (gaussianization, residual, cnf) against RealNVP
and MAF on the 2-D toys, every family trained by `pyroflows.infer.fit` with the same budget
(steps, batch size, learning rate, Adam + cosine schedule, best-validation checkpoint).

    python benchmarks/toy_families.py --data checkerboard rings 8gaussians --steps 1000

One row per (dataset, family): test NLL in nats on 2,500 held-out points, parameters, seconds per
training step (wall clock, this machine, one thread) and the gap to the best of RealNVP / MAF.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyroflows import available_flows, build_flow
from pyroflows.datasets import load
from pyroflows.infer import fit

FAMILIES = ["realnvp", "maf", "gaussianization", "residual", "cnf"]
REFERENCES = ("realnvp", "maf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["checkerboard", "rings", "8gaussians"])
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = [f for f in args.families if f in available_flows()]
    rows = []
    print("| data | family | test NLL | gap to best of RealNVP/MAF | params | s / step |")
    print("|---|---|---|---|---|---|")
    for data_name in args.data:
        train, test = load(data_name, 10_000, seed=args.seed)
        results = {}
        for family in families:
            torch.manual_seed(args.seed)
            flow = build_flow(family, 2)
            start = time.perf_counter()
            history = fit(
                flow,
                train,
                num_steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                progress=False,
                seed=args.seed,
            )
            seconds = (time.perf_counter() - start) / max(1, len(history["train_loss"]))
            with torch.no_grad():
                nll = -flow.log_prob(test).mean().item()
            results[family] = dict(
                data=data_name,
                family=family,
                test_nll=nll,
                seconds_per_step=seconds,
                params=sum(p.numel() for p in flow.parameters()),
            )
        refs = [results[f]["test_nll"] for f in REFERENCES if f in results]
        best = min(refs) if refs else float("nan")
        for row in results.values():
            row["gap"] = row["test_nll"] - best
            rows.append(row)
            print(
                f"| {data_name} | {row['family']} | {row['test_nll']:.3f} | {row['gap']:+.3f} | "
                f"{row['params']} | {row['seconds_per_step']:.4f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
