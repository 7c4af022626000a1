"""The ``pyroflows`` command: ``pyroflows fit | vi | sample | bench``.

Every subcommand shares ``--flow --data --steps --seed --device --out --json --quiet`` where it
makes sense, finishes in about a minute on a laptop CPU with its defaults, and turns bad
arguments into one ``pyroflows: error: ...`` line and exit status 2 (no traceback).

Subcommands other than ``fit`` live in :mod:`pyroflows.commands`, one module each exposing
``add_arguments(parser)`` and ``run(args) -> dict`` (the final metrics).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

# name -> (module, one-line help); the module exposes add_arguments(parser) and run(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("pyroflows.cli", "fit a flow to data by maximum likelihood"),
    "vi": ("pyroflows.commands.vi", "fit a flow guide to an energy target by variational inference"),
    "sample": ("pyroflows.commands.sample", "sample an energy target with batched MCMC"),
    "bench": ("pyroflows.commands.bench", "benchmark flows against Pyro, zuko, nflows, normflows"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``pyroflows: error: ...`` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"pyroflows: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class CommandError(Exception):
    """A user error worth one line, no traceback."""


def add_common_arguments(parser: argparse.ArgumentParser, *, flow: str | None = None, data: str | None = None, steps: int | None = None) -> None:
    """The flags shared by the subcommands (``--flow/--data/--steps`` only where given a default)."""
    if flow is not None:
        parser.add_argument("--flow", default=flow, help=f"flow family (default: {flow})")
    if data is not None:
        parser.add_argument("--data", default=data, help=f"built-in dataset or target, or a .npy/.csv file (default: {data})")
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help=f"training / sampling steps (default: {steps})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--out", default="pyroflows-out", help="output folder for plots and results (default: pyroflows-out)")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device``, with a clear error if it is not available here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"unknown device {name!r} (expected e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda requested but CUDA is not available on this machine")
    return device


def output_dir(path: str) -> Path:
    """Create and return the ``--out`` folder."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create output folder {path}: {err.strerror}") from None
    return out


# -- fit ---------------------------------------------------------------------------------
DISCRETE_STEPS = 300  # default training steps on discrete image data (about a minute on a CPU)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows fit``."""
    add_common_arguments(parser, flow="realnvp", data="moons")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default: 2000; {DISCRETE_STEPS} on digits)")
    parser.add_argument("--num-layers", type=int, default=None, help="number of layers (family default)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (family default)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=10_000, help="training points of a toy dataset")
    parser.add_argument("--dequantization", choices=("uniform", "variational"), default="uniform",
                        help="dequantization of discrete image data such as digits (default: uniform)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training; launch with torchrun (gloo on CPU, nccl on CUDA)")


def init_distributed(device: torch.device) -> tuple[torch.device, int]:
    """Join the process group torchrun describes; returns this rank's device and rank."""
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise CommandError("--distributed needs torchrun, e.g. torchrun --nproc_per_node=2 -m pyroflows.cli fit --distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows fit``: train, report held-out NLL, plot data vs samples vs density."""
    from pyroflows import build_flow, datasets
    from pyroflows.infer import DequantizedFlow, bits_per_dim, fit

    device = resolve_device(args.device)
    rank = 0
    if args.distributed:
        device, rank = init_distributed(device)
    out = output_dir(args.out)
    torch.manual_seed(args.seed)
    train, test = datasets.load(args.data, args.num_samples, seed=args.seed)
    shape = tuple(train.shape[1:])
    # discrete data (pixel levels) is modelled through dequantization, and scored in bits/dim
    num_levels = datasets.NUM_LEVELS if args.data == "digits" else None
    steps = args.steps if args.steps is not None else (DISCRETE_STEPS if num_levels else 2000)
    flow = build_flow(args.flow, shape[0] if len(shape) == 1 else shape, num_layers=args.num_layers, hidden_dims=args.hidden)
    model = flow if num_levels is None else DequantizedFlow(flow, num_levels, args.dequantization)
    model.to(device)
    history = fit(model, train, num_steps=steps, batch_size=args.batch_size, lr=args.lr,
                  progress=not args.quiet and rank == 0, seed=args.seed, distributed=args.distributed)
    if args.distributed:
        torch.distributed.destroy_process_group()
        if rank != 0:  # every rank holds the same flow; rank 0 reports
            return {}
    test = test.to(device)
    with torch.no_grad():
        test_nll = -model.log_prob(test).mean().item()
    metrics = dict(flow=args.flow, data=args.data, steps=steps, test_nll=test_nll, best_val_loss=history["best_val_loss"])
    if num_levels is not None:
        metrics["test_bits_per_dim"] = bits_per_dim(model, test, num_levels).mean().item()
    from pyroflows.plotting import plot_density_fit

    metrics["plot"] = str(plot_density_fit(flow, test.cpu(), out / f"fit-{args.flow}-{Path(args.data).stem}.png"))
    if not args.json:
        bpd = f", {metrics['test_bits_per_dim']:.3f} bits/dim" if num_levels is not None else ""
        print(f"{args.flow} on {args.data}: held-out NLL {test_nll:.4f} nats{bpd} ({len(test)} points); plot: {metrics['plot']}")
    return metrics


# -- entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``pyroflows`` argument parser with every available subcommand."""
    parser = _Parser(prog="pyroflows", description="Normalizing flows for Pyro.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:  # a subcommand whose module has not landed yet
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyroflows`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2) and --help (status 0)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        metrics = args.run(args)
    except (CommandError, ValueError, TypeError) as err:
        print(f"pyroflows: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyroflows: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and metrics:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
