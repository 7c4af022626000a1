"""Test bits/dim of the image flows on scikit-learn's 8x8 digits (17 levels), against the
uniformly dequantised independent-pixel baseline.

    python benchmarks/digits_bpd.py [--steps 1500] [--json out.json]

Every flow trains with the same budget (steps, batch size, Adam + cosine schedule, lr) through
`pyroflows.infer.fit` on uniformly dequantised data (`DequantizedFlow`); RealNVP and Glow use the
same number of couplings per scale/level and widths chosen for near-equal parameter counts.
Reports test bits/dim (importance-weighted bound, 8 draws), parameters and seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyroflows import build_flow
from pyroflows.datasets import NUM_LEVELS, digits
from pyroflows.infer import DequantizedFlow, bits_per_dim, fit
from pyroflows.infer.dequantization import independent_bits_per_dim

# name -> (family, dequantizer, build options); RealNVP's width matches Glow's parameter count
CONFIGS = {
    "realnvp": ("realnvp", "uniform", dict(num_layers=2, hidden_dims=(41,))),
    "glow": ("glow", "uniform", dict(num_layers=2, hidden_dims=(32,))),
    "mintnet": ("mintnet", "uniform", dict(num_layers=6, hidden_dims=(48,))),
    "glow+vardeq": ("glow", "variational", dict(num_layers=2, hidden_dims=(32,))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = digits()
    baseline = independent_bits_per_dim(train, test, NUM_LEVELS).mean().item()
    rows = [
        dict(
            model="independent pixels",
            bits_per_dim=baseline,
            parameters=NUM_LEVELS * 64,
            seconds_per_epoch=0.0,
        )
    ]
    print(f"{'model':<20} {'test bits/dim':>13} {'parameters':>10} {'s/epoch':>8}")
    print(
        f"{rows[0]['model']:<20} {baseline:>13.3f} {rows[0]['parameters']:>10} {'-':>8}", flush=True
    )
    epochs = args.steps * args.batch_size / len(train)
    for name in args.models:
        family, dequantizer, options = CONFIGS[name]
        torch.manual_seed(args.seed)
        flow = build_flow(family, (1, 8, 8), **options)
        model = DequantizedFlow(flow, NUM_LEVELS, dequantizer)
        start = time.perf_counter()
        fit(
            model,
            train,
            num_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            progress=False,
            seed=args.seed,
            patience=None,
        )
        seconds = time.perf_counter() - start
        torch.manual_seed(args.seed + 1)
        bpd = bits_per_dim(model, test, NUM_LEVELS, num_samples=8).mean().item()
        row = dict(
            model=name,
            bits_per_dim=bpd,
            parameters=sum(p.numel() for p in model.parameters()),
            seconds_per_epoch=seconds / epochs,
        )
        rows.append(row)
        print(
            f"{name:<20} {bpd:>13.3f} {row['parameters']:>10} {row['seconds_per_epoch']:>8.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rows=rows),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
