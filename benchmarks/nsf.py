"""Held-out NLL on the 2-D toys: pyroflows' neural spline flows (``nsf`` coupling, ``nsf_ar``
autoregressive) against zuko's ``NSF`` with the same number of transforms, bins and hidden
widths, and pyroflows' ``bnaf`` and ``realnvp`` for reference.

Every model gets the same training loop: Adam (lr 1e-3), cosine-annealed learning rate, gradient
norm clipped at 10, the same mini-batch indices (batch 256) and the same data (10,000 training
points; NLL in nats on 2,500 held-out points).

    OMP_NUM_THREADS=1 python benchmarks/nsf.py --data 8gaussians --steps 2000 [--json out.json]

Quality, not speed: run one toy per process on a busy machine; the numbers do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from pyroflows import build_flow
from pyroflows.datasets import load

TOYS = ("moons", "8gaussians", "checkerboard", "rings")


def train(
    log_prob: Callable, params, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> None:
    """Maximum likelihood with the loop every model shares."""
    g = torch.Generator().manual_seed(seed)
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        loss = -log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()


def models(transforms: int, bins: int, hidden: tuple[int, ...]) -> dict[str, Callable]:
    """name -> constructor of ``(log_prob, parameters)`` for every contender installed."""

    def ours(name: str, **options):
        def make():
            flow = build_flow(name, 2, num_layers=transforms, hidden_dims=hidden, **options)
            return flow.log_prob, flow.parameters()

        return make

    table = {
        "pyroflows nsf": ours("nsf", bins=bins),
        "pyroflows nsf_ar": ours("nsf_ar", bins=bins),
        "pyroflows bnaf": ours("bnaf"),
        "pyroflows realnvp": ours("realnvp"),
    }
    try:
        import zuko

        def make_zuko():
            flow = zuko.flows.NSF(2, transforms=transforms, bins=bins, hidden_features=hidden)
            return (lambda x: flow().log_prob(x)), flow.parameters()

        table["zuko NSF"] = make_zuko
    except ImportError:
        print("zuko not installed (pip install zuko): pyroflows only")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(TOYS))
    parser.add_argument("--models", nargs="+", default=None, help="default: every contender")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--transforms", type=int, default=3)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = models(args.transforms, args.bins, tuple(args.hidden))
    chosen = args.models or list(table)
    rows = []
    print("| data | model | test NLL | params | seconds |\n|---|---|---|---|---|")
    for data_name in args.data:
        train_set, test_set = load(data_name, 10_000, seed=args.seed)
        for label in chosen:
            torch.manual_seed(args.seed)
            log_prob, params = table[label]()
            params = list(params)
            start = time.perf_counter()
            train(log_prob, params, train_set, args.steps, args.batch_size, args.lr, args.seed)
            with torch.no_grad():
                nll = -log_prob(test_set).mean().item()
            seconds = time.perf_counter() - start
            rows.append(
                dict(
                    data=data_name,
                    model=label,
                    test_nll=nll,
                    params=sum(p.numel() for p in params),
                    seconds=seconds,
                )
            )
            print(
                f"| {data_name} | {label} | {nll:.3f} | {rows[-1]['params']} | {seconds:.0f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
