"""Test bits/dim of the image flows on scikit-learn's 8x8 digits (17 levels), against the
uniformly dequantised independent-pixel baseline.

    python benchmarks/digits_bpd.py [--steps 1500] [--seeds 0 1] [--json out.json]
    python benchmarks/digits_bpd.py --models glow --coupling affine spline --match-parameters

Every flow trains with the same budget (steps, batch size, Adam + cosine schedule, lr) through
`pyroflows.infer.fit` on uniformly dequantised data (`DequantizedFlow`); RealNVP and Glow use the
same number of couplings per scale/level and widths chosen for near-equal parameter counts.
``--coupling`` runs RealNVP and Glow once per elementwise map of their couplings (``affine``, the
papers' choice, ``additive``, or the rational-quadratic ``spline`` with ``--bins`` / ``--bound``);
the other models ignore it; ``--match-parameters`` adds, for every other map, a run whose
conditioner width is chosen to match the affine model's parameter count (a spline's conditioners
predict ``3K - 1`` numbers per coordinate, against 2). Reports test bits/dim
(importance-weighted bound, 8 draws) per seed and their mean, parameters and seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pyroflows import build_flow
from pyroflows.datasets import NUM_LEVELS, digits
from pyroflows.infer import DequantizedFlow, bits_per_dim, fit
from pyroflows.infer.dequantization import independent_bits_per_dim
from pyroflows.transforms.multiscale import COUPLING_MAPS

# name -> (family, dequantizer, build options); RealNVP's width matches Glow's parameter count
CONFIGS = {
    "realnvp": ("realnvp", "uniform", dict(num_layers=2, hidden_dims=(41,))),
    "glow": ("glow", "uniform", dict(num_layers=2, hidden_dims=(32,))),
    "mintnet": ("mintnet", "uniform", dict(num_layers=6, hidden_dims=(48,))),
    "glow+vardeq": ("glow", "variational", dict(num_layers=2, hidden_dims=(32,))),
}
# the families whose couplings take the `coupling` option
COUPLING_FAMILIES = ("realnvp", "glow")


def parameter_count(family: str, options: dict) -> int:
    """Parameters of the flow ``build_flow(family, (1, 8, 8), **options)``."""
    return sum(p.numel() for p in build_flow(family, (1, 8, 8), **options).parameters())


def matched_width(family: str, options: dict, target: int) -> int:
    """The conditioner width whose parameter count is closest to ``target``."""
    (width,) = options["hidden_dims"]
    gap = {
        w: abs(parameter_count(family, {**options, "hidden_dims": (w,)}) - target)
        for w in range(1, 2 * width + 1)
    }
    return min(gap, key=gap.get)


def runs(args: argparse.Namespace) -> list[tuple[str, str, str, dict]]:
    """``(row name, family, dequantizer, build options)`` for every model and coupling asked."""
    out = []
    for name in args.models:
        family, dequantizer, options = CONFIGS[name]
        if family not in COUPLING_FAMILIES:
            out.append((name, family, dequantizer, options))
            continue
        target = parameter_count(family, options)
        for coupling in args.coupling:
            extra = dict(coupling=coupling)
            if coupling == "spline":
                extra.update(bins=args.bins, bound=args.bound)
            label = name if coupling == "affine" else f"{name}+{coupling}"
            out.append((label, family, dequantizer, {**options, **extra}))
            if args.match_parameters and coupling != "affine":
                width = matched_width(family, {**options, **extra}, target)
                matched = {**options, **extra, "hidden_dims": (width,)}
                out.append((f"{label} w{width}", family, dequantizer, matched))
    return out


def train_and_score(family, dequantizer, options, train, test, args, seed) -> dict:
    """Train one model with the shared budget; its test bits/dim, parameters and time."""
    torch.manual_seed(seed)
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
        seed=seed,
        patience=None,
    )
    seconds = time.perf_counter() - start
    torch.manual_seed(seed + 1)
    bpd = bits_per_dim(model, test, NUM_LEVELS, num_samples=8).mean().item()
    epochs = args.steps * args.batch_size / len(train)
    parameters = sum(p.numel() for p in model.parameters())
    return dict(bits_per_dim=bpd, parameters=parameters, seconds_per_epoch=seconds / epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--coupling", nargs="+", default=["affine"], choices=COUPLING_MAPS,
        help="elementwise maps of the RealNVP / Glow couplings to compare (default: affine)",
    )  # fmt: skip
    parser.add_argument(
        "--match-parameters", action="store_true",
        help="also run every non-affine coupling at the affine model's parameter count",
    )  # fmt: skip
    parser.add_argument("--bins", type=int, default=8, help="spline bins (default 8)")
    parser.add_argument("--bound", type=float, default=5.0, help="spline bound B (default 5)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
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
            seeds={},
            parameters=NUM_LEVELS * 64,
            seconds_per_epoch=0.0,
        )
    ]
    seeds_header = " ".join(f"{'seed ' + str(s):>8}" for s in args.seeds)
    print(f"{'model':<20} {'bits/dim':>8} {seeds_header} {'parameters':>10} {'s/epoch':>8}")
    print(f"{rows[0]['model']:<20} {baseline:>8.3f} {'':>{9 * len(args.seeds) - 1}} "
          f"{rows[0]['parameters']:>10} {'-':>8}", flush=True)  # fmt: skip
    for label, family, dequantizer, options in runs(args):
        results = {
            seed: train_and_score(family, dequantizer, options, train, test, args, seed)
            for seed in args.seeds
        }
        per_seed = {seed: r["bits_per_dim"] for seed, r in results.items()}
        row = dict(
            model=label,
            options={k: v for k, v in options.items() if k != "hidden_dims"},
            hidden_dims=list(options["hidden_dims"]),
            bits_per_dim=statistics.mean(per_seed.values()),
            seeds=per_seed,
            parameters=results[args.seeds[0]]["parameters"],
            seconds_per_epoch=statistics.mean(r["seconds_per_epoch"] for r in results.values()),
        )
        rows.append(row)
        seeds_text = " ".join(f"{per_seed[s]:>8.3f}" for s in args.seeds)
        print(f"{label:<20} {row['bits_per_dim']:>8.3f} {seeds_text} {row['parameters']:>10} "
              f"{row['seconds_per_epoch']:>8.2f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rows=rows),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
