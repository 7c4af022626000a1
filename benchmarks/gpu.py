"""Every flow family, the VAE and batched HMC on a CUDA device: correctness checks and throughput.

For each registered family (default options, vectors of dimension ``--dim``, images
``(3, 16, 16)`` for image-only families) on the device: the round trip ``inv(f(z))``, the
log-density against the same flow on the CPU, and the throughput (events per second, median
of ``--reps`` timed calls, each on a fresh tensor, the device synchronised around each call) of
the sampling pass ``z -> x`` with its log-determinant, the density pass ``x -> z`` and
``Flow.log_prob``. Then one training step of an IAF-posterior VAE (ELBO forward and backward) and
batched-chain HMC on ``banana`` (draws per second over all chains, posterior mean checked against
the exact one). Prints one table; without a CUDA device it says so and exits 0.

    python benchmarks/gpu.py                    # on a GPU machine, about a minute or two
    python benchmarks/gpu.py --device cpu --quick   # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import pyroflows
from pyroflows.registry import family_spec

IMAGE_SHAPE = (3, 16, 16)


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_family(name: str, args, device: torch.device) -> dict[str, object]:
    spec = family_spec(name)
    shape = args.dim if spec.vector else IMAGE_SHAPE
    event = (shape,) if isinstance(shape, int) else shape
    batch = args.batch if spec.vector else max(args.batch // 16, 8)
    torch.manual_seed(0)
    flow = pyroflows.build_flow(name, shape, **spec.test_options)
    x0 = torch.randn(batch, *event) if spec.vector else torch.rand(batch, *event)
    with torch.no_grad():
        flow.log_prob(x0)  # data-dependent initialisation, on the CPU copy
        for p in flow.parameters():
            p.add_(0.01 * torch.randn_like(p))  # off the identity, still well conditioned
        cpu_log_prob = flow.log_prob(x0[:64])
    flow.to(device)
    x = x0.to(device)
    with torch.no_grad():
        z = torch.randn(batch, *event, device=device)
        round_trip = (flow.inverse_and_log_det(flow.forward_and_log_det(z)[0])[0] - z).abs().max()
        log_prob_gap = (flow.log_prob(x[:64]).cpu() - cpu_log_prob).abs().max()
        rates = {}
        for op, fn in [
            ("fwd", lambda: flow.forward_and_log_det(torch.randn_like(z))),
            ("inv", lambda: flow.inverse_and_log_det(x + 0.01 * torch.randn_like(x))),
            ("log_prob", lambda: flow.log_prob(x + 0.01 * torch.randn_like(x))),
        ]:
            rates[op] = batch / timed(fn, device, args.reps)
    ok = bool(round_trip < 1e-2 and log_prob_gap < 1e-2 * max(1.0, float(cpu_log_prob.abs().max())))
    return dict(
        name=name,
        shape=str(tuple(event)),
        batch=batch,
        **rates,
        round_trip=float(round_trip),
        log_prob_gap=float(log_prob_gap),
        ok=ok,
    )


def check_vae(args, device: torch.device) -> dict[str, object]:
    from pyroflows.models import VAE

    torch.manual_seed(0)
    vae = VAE(64, 8, posterior="iaf").to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.bernoulli(torch.full((args.batch, 64), 0.3, device=device))

    def step() -> None:
        optimizer.zero_grad()
        loss = -vae.elbo(x).mean()
        loss.backward()
        optimizer.step()

    seconds = timed(step, device, args.reps)
    elbo = vae.elbo(x).mean().item()
    return dict(
        name="vae (iaf posterior)",
        shape="(64,)",
        batch=args.batch,
        train_step=args.batch / seconds,
        elbo=elbo,
        ok=bool(elbo == elbo),
    )


def check_hmc(args, device: torch.device) -> dict[str, object]:
    from pyroflows import energies, mcmc

    target = energies.get("banana")
    chains, draws = args.chains, args.draws
    init = torch.randn(chains, 2, device=device)
    kernel = mcmc.HMC(target.energy, step_size=0.2, num_steps=10)
    start = time.perf_counter()
    idata = mcmc.sample(kernel, init, draws, warmup_steps=draws, progress=False, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    samples = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    mean_error = float(samples.mean(0).abs().max())  # banana: E[x] = (0, 0)
    # sd(x2) = sqrt(3); allow 4 standard errors at a pessimistic ESS of one draw in ten
    tolerance = 4 * 3**0.5 / (chains * draws / 10) ** 0.5
    return dict(
        name="hmc banana",
        shape="(2,)",
        batch=chains,
        draws_per_s=chains * draws / seconds,
        mean_error=mean_error,
        ok=mean_error < tolerance,
    )


def print_table(rows: list[dict[str, object]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--dim", type=int, default=8, help="event dimension of vector flows")
    parser.add_argument("--batch", type=int, default=4096, help="events per call")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per operation")
    parser.add_argument("--chains", type=int, default=4096, help="HMC chains")
    parser.add_argument("--draws", type=int, default=200, help="HMC draws (and warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--families", nargs="*", default=None, help="default: every family")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.chains, args.draws = 64, 1, 16, 20
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu for a smoke test)")
        return 0
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, pyroflows {pyroflows.__version__}")
    rows = []
    for family in args.families or pyroflows.available_flows():
        try:
            rows.append(check_family(family, args, device))
        except ImportError as err:  # an optional extra (e.g. cnf) not installed
            rows.append(dict(name=family, ok=f"skipped: {err}"))
    for check in (check_vae, check_hmc):
        try:
            rows.append(check(args, device))
        except ImportError as err:
            rows.append(dict(name=check.__name__, ok=f"skipped: {err}"))
    print(
        "events (or chain draws) per second; round_trip = max |inv(f(z)) - z|, "
        "log_prob_gap = max |log p on device - log p on CPU|"
    )
    print_table(rows)
    return (
        0 if all(row["ok"] is True or str(row["ok"]).startswith("skipped") for row in rows) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
