"""One batched energy gradient of every built-in target against the same formula in plain torch.

A sampler's inner loop is ``grad U(x)`` over all chains at once, so this is the cost that sets
HMC/MALA/SGLD speed. For each target in ``pyroflows.energies`` (and the dense 100-D Gaussian of
issue 17) and each batch size (1, 64, 1024 points by default), one timed call draws a fresh
``x``, evaluates ``U(x).sum()`` and its gradient by autograd. The contender is the same formula
written directly in torch with the target's own constants (the "direct" column): the floor a
built-in energy can reach. The table shows medians over interleaved, shuffled rounds and the
ratio pyroflows / direct (goal: at most 1.3 at 1024 points).

Run on a quiet machine, one thread, with glibc's allocator kept from returning buffers:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/energies.py --out benchmarks/results

A smoke run (seconds): ``python benchmarks/energies.py --sizes 1 8 --rounds 2 --calls 2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pyroflows import energies

Energy = Callable[[torch.Tensor], torch.Tensor]


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(0.5 * math.pi * z1)


def _wave(shift: Callable[[torch.Tensor], torch.Tensor] | None, widths: tuple) -> Energy:
    def energy(z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[:, 0], z[:, 1]
        first = -0.5 * ((z2 - _w1(z1)) / widths[0]) ** 2
        if shift is None:
            return z1**2 / 8 - first
        second = -0.5 * ((z2 - _w1(z1) + shift(z1)) / widths[1]) ** 2
        return z1**2 / 8 - torch.logsumexp(torch.stack([first, second], -1), -1)

    return energy


def _u1(z: torch.Tensor) -> torch.Tensor:
    z1 = z[:, 0]
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    bumps = torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2], -1)
    return ring - torch.logsumexp(bumps, -1)


def _banana(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x[:, 0] ** 2 + 0.5 * (x[:, 1] - x[:, 0] ** 2 + 1) ** 2


def _funnel(x: torch.Tensor) -> torch.Tensor:
    v, rest = x[:, 0], x[:, 1:]
    return v**2 / 18 + 0.5 * (rest**2).sum(-1) * torch.exp(-v) + 0.5 * rest.shape[1] * v


def _gaussian(target: energies.Gaussian) -> Energy:
    loc, tril = target.loc, target.scale_tril

    def energy(x: torch.Tensor) -> torch.Tensor:
        white = torch.linalg.solve_triangular(tril, (x - loc).T, upper=False)
        return 0.5 * white.pow(2).sum(0)

    return energy


def _mixture(target: energies.Mixture) -> Energy:
    locs, scales, weights = target.locs, target.scales, target.weights
    d = locs.shape[1]
    log_coef = weights.log() - d * scales.log() - 0.5 * d * math.log(2 * math.pi)

    def energy(x: torch.Tensor) -> torch.Tensor:
        sq = ((x[:, None, :] - locs) ** 2).sum(-1)
        return -torch.logsumexp(log_coef - 0.5 * sq / scales**2, -1)

    return energy


def _ising(target: energies.Ising) -> Energy:
    def energy(s: torch.Tensor) -> torch.Tensor:
        bonds = (s[:, :, 1:] * s[:, :, :-1]).sum((1, 2)) + (s[:, 1:, :] * s[:, :-1, :]).sum((1, 2))
        return -target.coupling * bonds - target.field * s.sum((1, 2))

    return energy


def cases() -> dict[str, tuple[energies.Target, Energy]]:
    """name -> (built-in target, the same energy written directly in torch)."""
    gauss100 = energies.get("gaussian", dim=100, correlation=0.5)
    built = {name: energies.get(name) for name in energies.available()}
    direct: dict[str, Energy] = {
        "u1": _u1,
        "u2": _wave(None, (0.4,)),
        "u3": _wave(lambda z1: 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2), (0.35, 0.35)),
        "u4": _wave(lambda z1: 3 * torch.sigmoid((z1 - 1) / 0.3), (0.4, 0.35)),
        "banana": _banana,
        "funnel": _funnel,
        "gaussian": _gaussian(built["gaussian"]),
        "mixture": _mixture(built["mixture"]),
        "ising": _ising(built["ising"]),
    }
    missing = set(built) - set(direct)
    if missing:
        raise SystemExit(f"no direct formula for the new built-in(s) {sorted(missing)}: add one")
    out = {name: (built[name], direct[name]) for name in built}
    out["gaussian dense D=100"] = (gauss100, _gaussian(gauss100))
    return out


def time_gradient(energy: Energy, shape: tuple[int, ...], calls: int) -> float:
    """Seconds per call of ``grad(energy(x).sum(), x)``, each on a fresh ``x``."""
    xs = [torch.randn(shape).requires_grad_() for _ in range(calls)]
    start = time.perf_counter()
    for x in xs:
        torch.autograd.grad(energy(x).sum(), x)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a markdown table, optionally write ``energies.{json,md}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024], help="points per call")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians)")
    p.add_argument("--calls", type=int, default=20, help="calls averaged within one timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for energies.json and energies.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    targets = cases()
    configs = [(name, n, who) for name in targets for n in args.sizes
               for who in ("pyroflows", "direct")]
    for target, direct in targets.values():  # same numbers, and one untimed warm-up
        x = torch.randn(4, *target.event_shape)
        torch.testing.assert_close(target.energy(x), direct(x), rtol=1e-4, atol=1e-4)
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            name, n, who = config
            target, direct = targets[name]
            fn = target.energy if who == "pyroflows" else direct
            times[config].append(time_gradient(fn, (n, *target.event_shape), args.calls))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    lines = ["| target | points | pyroflows (us) | direct (us) | pyroflows / direct |",
             "|---|---|---|---|---|"]
    rows = []
    for name in targets:
        for n in args.sizes:
            ours = statistics.median(times[(name, n, "pyroflows")]) * 1e6
            theirs = statistics.median(times[(name, n, "direct")]) * 1e6
            rows.append(dict(target=name, points=n, pyroflows_us=ours, direct_us=theirs,
                             ratio=ours / theirs))
            lines.append(f"| {name} | {n} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    report = dict(rows=rows, table="\n".join(lines), args=vars(args), malloc_env=env,
                  torch=torch.__version__)
    print(report["table"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "energies.json").write_text(json.dumps(report, indent=1))
        (out / "energies.md").write_text(report["table"] + "\n")
    return report


if __name__ == "__main__":
    main()
