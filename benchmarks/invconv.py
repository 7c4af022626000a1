"""Invertible 1x1 convolution: pyroflows' `InvertibleConv1x1` against Pyro's
`GeneralizedChannelPermute`, both directions, same channels and input.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/invconv.py

Interleaved, shuffled rounds; a fresh input for every timed call (Pyro caches transform
outputs); medians in milliseconds and the ratio Pyro / pyroflows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from pyro.distributions.transforms import GeneralizedChannelPermute

from pyroflows.transforms.glow import InvertibleConv1x1


def timings(shape: tuple[int, int, int], batch: int, rounds: int) -> dict[tuple[str, str], float]:
    """Median seconds of each (direction, implementation) on ``(batch, *shape)`` inputs."""
    ours, pyro = InvertibleConv1x1(shape), GeneralizedChannelPermute(shape[0])
    calls = {
        ("forward", "ours"): lambda z: ours.forward_and_log_det(z),
        ("forward", "pyro"): lambda z: (pyro(z), pyro.log_abs_det_jacobian(z, z)),
        ("inverse", "ours"): lambda x: ours.inverse_and_log_det(x),
        ("inverse", "pyro"): lambda x: pyro.inv(x),
    }
    times: dict = {key: [] for key in calls}
    with torch.no_grad():
        for _ in range(rounds):
            keys = list(calls)
            random.shuffle(keys)
            for key in keys:
                inputs = torch.randn(batch, *shape)
                start = time.perf_counter()
                calls[key](inputs)
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["16x8x8", "48x16x16"], help="CxHxW")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'shape':<10} {'direction':<9} {'pyroflows ms':>12} {'pyro ms':>9} {'pyro/ours':>9}")
    for text in args.shapes:
        shape = tuple(int(s) for s in text.split("x"))
        medians = timings(shape, args.batch, args.rounds)
        for direction in ("forward", "inverse"):
            a, b = medians[(direction, "ours")] * 1e3, medians[(direction, "pyro")] * 1e3
            print(f"{text:<10} {direction:<9} {a:>12.3f} {b:>9.3f} {b / a:>9.2f}")


if __name__ == "__main__":
    main()
