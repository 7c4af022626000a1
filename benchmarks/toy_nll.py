"""Held-out NLL on the 2-D toys: pyroflows' RealNVP (as `pyroflows fit` trains it) against zuko's
RealNVP and NSF trained with the same budget (steps, batch size, Adam + cosine schedule, lr).

    python benchmarks/toy_nll.py --data moons --steps 2000 [--json out.json]

Quality, not speed: one row per (dataset, model), test NLL in nats on 2,500 held-out points.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyroflows import build_flow
from pyroflows.datasets import load
from pyroflows.infer import fit


def train_zuko(flow, data, steps, batch_size, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        loss = -flow().log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        sched.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["moons"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for data_name in args.data:
        train, test = load(data_name, 10_000, seed=args.seed)
        models = {"pyroflows realnvp": None}
        try:
            import zuko

            models["zuko RealNVP"] = lambda: zuko.flows.RealNVP(
                2, transforms=6, hidden_features=(64, 64)
            )
            models["zuko NSF"] = lambda: zuko.flows.NSF(2, transforms=3, hidden_features=(64, 64))
        except ImportError:
            print("zuko not installed (pip install -e '.[bench]'): pyroflows only")
        for label, make in models.items():
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            if make is None:
                flow = build_flow("realnvp", 2)
                fit(
                    flow,
                    train,
                    num_steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    progress=False,
                    seed=args.seed,
                )
                with torch.no_grad():
                    nll = -flow.log_prob(test).mean().item()
            else:
                flow = make()
                train_zuko(flow, train, args.steps, args.batch_size, args.lr, args.seed)
                with torch.no_grad():
                    nll = -flow().log_prob(test).mean().item()
            params = sum(p.numel() for p in flow.parameters())
            rows.append(
                dict(
                    data=data_name,
                    model=label,
                    test_nll=nll,
                    params=params,
                    seconds=time.perf_counter() - start,
                )
            )
            print(
                f"| {data_name} | {label} | {nll:.3f} | {params} | {rows[-1]['seconds']:.1f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
