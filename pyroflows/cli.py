"""The ``pyroflows`` command: ``pyroflows fit | vi | sample | bench``.

Every subcommand shares ``--seed --device --threads --out --overwrite --json --quiet`` (and
``--flow --data --steps`` where they make sense), finishes in about a minute on a 2-core CPU with
its defaults, and turns bad arguments into one ``pyroflows: error: ...`` line naming the flag,
with exit status 2 (no traceback). Output files are named after the run and never replace an
earlier run's files unless ``--overwrite`` is given. Small work runs on one CPU thread (see
``configure_threads``): extra OpenMP threads only cost time on tiny tensors.

Subcommands other than ``fit`` live in `pyroflows.commands`, one module each exposing
``add_arguments(parser)`` and ``run(args) -> dict`` (the final metrics).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyroflows.validation import check_int, check_positive

# name -> (module, one-line help); the module exposes add_arguments(parser) and run(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("pyroflows.cli", "fit a flow to data by maximum likelihood"),
    "vi": ("pyroflows.commands.vi", "fit a flow guide to an energy target by VI"),
    "sample": ("pyroflows.commands.sample", "sample an energy target with batched MCMC"),
    "bench": ("pyroflows.commands.bench", "benchmark flows against Pyro, zuko, nflows, normflows"),
    "compress": ("pyroflows.commands.compress", "bits-back compression of digits with a VAE"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``pyroflows: error: ...`` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"pyroflows: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class CommandError(Exception):
    """A user error worth one line, no traceback."""


def int_flag(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type`` accepting an int ``>= minimum``; argparse names the flag on error.

    Args:
        minimum: the smallest value accepted.

    Returns:
        the converter.
    """

    def parse(text: str) -> int:
        try:
            value: Any = int(text)
        except ValueError:
            value = text  # check_int rejects it with the standard message
        try:
            return check_int(value, "value", minimum=minimum)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type`` accepting a finite number ``> 0``.

    Args:
        text: the command-line value.

    Returns:
        the number.
    """
    try:
        return check_positive(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    flow: str | None = None,
    data: str | None = None,
    data_help: str = "",
    steps: int | None = None,
    steps_help: str = "training steps",
    threads: str = "1 for small work, more for large models, at most the cores torch sees",
) -> None:
    """The flags shared by every subcommand (``--flow``, ``--data`` and ``--steps`` only where
    given a default).

    Args:
        parser: the subcommand's parser.
        flow: default ``--flow``, or ``None`` for no such flag.
        data: default ``--data``, or ``None`` for no such flag.
        data_help: what ``--data`` accepts (the default is appended).
        steps: default ``--steps``, or ``None`` for no such flag.
        steps_help: what one step is (the default is appended).
        threads: how ``--threads`` is chosen when not given (for its help text).
    """
    if flow is not None:
        parser.add_argument("--flow", default=flow, help=f"flow family (default: {flow})")
    if data is not None:
        parser.add_argument("--data", default=data, help=f"{data_help} (default: {data})")
    if steps is not None:
        parser.add_argument("--steps", type=int_flag(1), default=steps,
                            help=f"{steps_help} (default: {steps})")
    parser.add_argument("--seed", type=int_flag(0), default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int_flag(1), default=None,
                        help=f"torch CPU threads (default: {threads})")
    parser.add_argument("--out", default="pyroflows-out",
                        help="output folder for plots and results (default: pyroflows-out)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier output files of the same name (default: a new "
                             "numbered name)")
    parser.add_argument("--json", action="store_true",
                        help="print the final metrics as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# multiply-adds per step (estimated: parameters x batch x pixels) that make one more thread pay
# for its synchronisation. Below it extra OpenMP threads gain little on a quiet machine and cost
# 5-10x on a busy one; Glow and RealNVP on 8x8 digits (2-4e10) still get one thread.
WORK_PER_THREAD = 100_000_000_000


def configure_threads(requested: int | None, work: float) -> int:
    """Set torch's intra-op thread count and return it.

    Args:
        requested: ``--threads``, or ``None`` to choose from ``work``: one thread per
            ``WORK_PER_THREAD`` multiply-adds per step, at least 1, at most the threads torch
            would use by default.
        work: rough multiply-adds of one step (parameters x batch, or chains x dimension).

    Returns:
        the thread count now in effect.
    """
    if requested is None:
        requested = max(1, min(torch.get_num_threads(), int(work // WORK_PER_THREAD)))
    torch.set_num_threads(requested)
    return requested


def resolve_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device``, with a clear error if it is not available here.

    Args:
        name: the ``--device`` value.

    Returns:
        the device.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"unknown device {name!r} (expected e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda requested but CUDA is not available on this machine")
    return device


def output_dir(path: str) -> Path:
    """Create and return the ``--out`` folder.

    Args:
        path: the ``--out`` value.

    Returns:
        the folder.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create output folder {path}: {err.strerror}") from None
    return out


def output_files(
    out: Path, stem: str, suffixes: Sequence[str], *, overwrite: bool = False
) -> list[Path]:
    """Paths ``out/stem<suffix>`` for a run's output files, never replacing earlier ones.

    Without ``overwrite``, an existing file of the same name moves the whole set to the first
    free ``stem-2``, ``stem-3``, ... (all suffixes share one number).

    Args:
        out: the output folder.
        stem: the file name without suffix, named after the run (command, flow, data).
        suffixes: e.g. ``[".png"]`` or ``[".json", ".md"]``.
        overwrite: reuse ``stem`` even if its files exist.

    Returns:
        one path per suffix.
    """
    run = 1
    while True:
        name = stem if run == 1 else f"{stem}-{run}"
        paths = [out / f"{name}{suffix}" for suffix in suffixes]
        if overwrite or not any(p.exists() for p in paths):
            return paths
        run += 1


# -- fit ---------------------------------------------------------------------------------
DISCRETE_STEPS = 300  # default training steps on discrete image data (about a minute on a CPU)
FIT_STEPS = 2000  # default training steps on vector data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows fit``.

    Args:
        parser: the subcommand's parser.
    """
    from pyroflows.datasets import toy_names

    add_common_arguments(
        parser, flow="realnvp", data="moons",
        data_help=f"a 2-D toy ({', '.join(toy_names())}), digits (scikit-learn's 8x8 images), "
                  "or a .npy/.csv file holding an (n, D) array",
    )
    parser.add_argument("--steps", type=int_flag(1), default=None,
                        help=f"training steps, one mini-batch each (default: {FIT_STEPS}; "
                             f"{DISCRETE_STEPS} on digits)")
    parser.add_argument("--num-layers", type=int_flag(1), default=None,
                        help="number of layers (family default)")
    parser.add_argument("--hidden", type=int_flag(1), nargs="+", default=None,
                        help="hidden widths (family default)")
    parser.add_argument("--batch-size", type=int_flag(1), default=256,
                        help="training points per step (default: 256)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="Adam learning rate (default: 0.001)")
    parser.add_argument("--num-samples", type=int_flag(2), default=10_000,
                        help="training points drawn from a toy (default: 10000; a quarter as "
                             "many held out)")
    parser.add_argument("--dequantization", choices=("uniform", "variational"), default="uniform",
                        help="dequantization of discrete image data such as digits "
                             "(default: uniform)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training; launch with torchrun (gloo on CPU, nccl on "
                             "CUDA)")


def init_distributed(device: torch.device) -> tuple[torch.device, int]:
    """Join the process group torchrun describes.

    Args:
        device: the ``--device`` asked for.

    Returns:
        this rank's device and rank.
    """
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise CommandError(
            "--distributed needs torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m pyroflows.cli fit --distributed"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows fit``: train, report held-out NLL, plot data vs samples vs density.

    Args:
        args: the parsed flags.

    Returns:
        the final metrics (``test_nll``, and ``test_bits_per_dim`` on digits).
    """
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
    steps = args.steps or (DISCRETE_STEPS if num_levels else FIT_STEPS)
    flow = build_flow(args.flow, shape[0] if len(shape) == 1 else shape,
                      num_layers=args.num_layers, hidden_dims=args.hidden)
    model = flow if num_levels is None else DequantizedFlow(flow, num_levels, args.dequantization)
    model.to(device)
    # convolutions reuse each weight at every pixel
    pixels = shape[1] * shape[2] if len(shape) == 3 else 1
    params = sum(p.numel() for p in model.parameters())
    threads = configure_threads(args.threads, params * args.batch_size * pixels)
    history = fit(model, train, num_steps=steps, batch_size=args.batch_size, lr=args.lr,
                  progress=not args.quiet and rank == 0, seed=args.seed,
                  distributed=args.distributed)
    if args.distributed:
        torch.distributed.destroy_process_group()
        if rank != 0:  # every rank holds the same flow; rank 0 reports
            return {}
    test = test.to(device)
    with torch.no_grad():
        test_nll = -model.log_prob(test).mean().item()
    metrics = dict(flow=args.flow, data=args.data, steps=steps, threads=threads,
                   test_nll=test_nll, best_val_loss=history["best_val_loss"])
    title = (f"{args.flow} on {Path(args.data).name}, {steps} steps: "
             f"held-out NLL {test_nll:.3f} nats")
    if num_levels is not None:
        metrics["test_bits_per_dim"] = bits_per_dim(model, test, num_levels).mean().item()
        title += f" ({metrics['test_bits_per_dim']:.3f} bits/dim)"
    from pyroflows.plotting import plot_density_fit

    (path,) = output_files(out, f"fit-{args.flow}-{Path(args.data).stem}", [".png"],
                           overwrite=args.overwrite)
    metrics["plot"] = str(plot_density_fit(flow, test.cpu(), path, title=title))
    if not args.json:
        bpd = f", {metrics['test_bits_per_dim']:.3f} bits/dim" if num_levels is not None else ""
        print(f"{args.flow} on {args.data}: held-out NLL {test_nll:.4f} nats{bpd} "
              f"({len(test)} points); plot: {metrics['plot']}")
    return metrics


# -- entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``pyroflows`` argument parser with every available subcommand.

    Returns:
        the parser.
    """
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
    """Run the ``pyroflows`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit status: 0, 2 for a usage or input error, 130 when interrupted.
    """
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
