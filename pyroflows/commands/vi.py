r"""``pyroflows vi``: fit an :class:`~pyroflows.guides.AutoFlow` guide to a 2-D energy target.

Trains by SVI on the target's Pyro model (annealed over the first third of the steps), then
prints $\mathrm{KL}(q \,\|\, p) = \mathbb E_q[\log q + U] + \log Z$ estimated from ``--kl-samples``
draws of $q$ (with its standard error) and writes a plot of the true density beside a histogram
of $q$'s samples. The benchmark ``benchmarks/vi.py`` reuses :func:`fit_and_score` and
:func:`plot_vi` for every guide it compares.

Example:
    pyroflows vi --target u2 --flow iaf
    pyroflows vi --target u1 --flow realnvp --steps 4000 --json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyroflows.cli import add_common_arguments, output_dir, resolve_device

TARGETS = ("u1", "u2", "u3", "u4", "banana", "mixture", "gaussian")
WINDOW = (-4.0, 4.0, -4.0, 4.0)  # Rezende & Mohamed's plotting window


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows vi``."""
    add_common_arguments(parser, flow="iaf", steps=2000)
    parser.add_argument("--target", "--data", dest="target", default="u2", choices=TARGETS, help="2-D energy target (default: u2)")
    parser.add_argument("--num-layers", type=int, default=None, help="flow layers (family default)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (family default)")
    parser.add_argument("--particles", type=int, default=64, help="ELBO particles per step (default: 64)")
    parser.add_argument("--anneal", type=int, default=None, help="annealing steps (default: steps // 3)")
    parser.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (default: 0.01)")
    parser.add_argument("--kl-samples", type=int, default=20_000, help="draws of q for the KL estimate (default: 20000)")


def fit_and_score(
    target: Any,
    make_guide: Callable[[Callable], Callable],
    *,
    num_steps: int,
    anneal_steps: int,
    num_particles: int,
    kl_samples: int,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    num_plot_samples: int = 20_000,
) -> dict[str, Any]:
    """Train ``make_guide(target.model)`` by :func:`~pyroflows.guides.fit_guide`, then score it.

    Args:
        target: an energy target with ``.model`` and ``.log_normalizer``.
        make_guide: builds the guide from the model (any autoguide).
        num_steps: SVI steps.
        anneal_steps: tempered steps at the start (see ``fit_guide``).
        num_particles: vectorised ELBO particles per step.
        kl_samples: draws of $q$ for the KL estimate.
        lr: initial learning rate.
        seed: seed of Pyro's and torch's RNGs.
        progress: show a progress bar.
        num_plot_samples: draws of $q$ returned for plots.

    Returns:
        ``kl``, ``kl_se`` (nats), ``train_seconds``, ``final_loss`` and ``samples``
        (``(num_plot_samples, 2)`` on the CPU).
    """
    import pyro
    from pyro.infer import Predictive

    from pyroflows.guides import fit_guide
    from pyroflows.infer.importance import reverse_kl

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(target.model)
    start = time.perf_counter()
    history = fit_guide(
        target.model, guide, num_steps=num_steps, num_particles=num_particles, anneal_steps=anneal_steps,
        lr=lr, progress=progress,
    )
    seconds = time.perf_counter() - start
    kl, kl_se = reverse_kl(target.model, guide, target.log_normalizer, num_samples=kl_samples)
    with torch.no_grad():
        samples = Predictive(target.model, guide=guide, num_samples=num_plot_samples, parallel=True)()["x"]
    return dict(kl=kl, kl_se=kl_se, train_seconds=seconds, final_loss=history["loss"][-1], samples=samples.reshape(-1, 2).cpu())


def plot_vi(target: Any, samples: dict[str, torch.Tensor], path: str | Path, bins: int = 100) -> Path:
    """The target's density on Rezende & Mohamed's window beside a 2-D histogram of each guide's
    samples (same window and colour scale). Returns the PNG path."""
    import matplotlib.pyplot as plt

    from pyroflows.plotting import density_grid  # also selects the Agg backend

    path = Path(path)
    panels = 1 + len(samples)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.8), squeeze=False)
    xs, ys, dens = density_grid(lambda x: -target.energy(x) - target.log_normalizer, WINDOW, resolution=bins, like=target._anchor)
    axes[0, 0].pcolormesh(xs, ys, dens, shading="auto", cmap="viridis")
    axes[0, 0].set_title(f"{target.name}: true density")
    for ax, (name, pts) in zip(axes[0, 1:], samples.items()):
        pts = pts.cpu()
        ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=[WINDOW[:2], WINDOW[2:]], density=True, cmap="viridis", vmax=dens.max().item())
        ax.set_title(name)
    for ax in axes.flat:
        ax.set(xlim=WINDOW[:2], ylim=WINDOW[2:], xticks=[], yticks=[])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows vi``: train, report the KL, plot."""
    from pyroflows import energies
    from pyroflows.guides import AutoFlow

    for name in ("steps", "particles", "kl_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    anneal = args.steps // 3 if args.anneal is None else args.anneal
    if not 0 <= anneal <= args.steps:
        raise ValueError(f"--anneal must lie in [0, --steps], got {anneal}")
    device = resolve_device(args.device)
    out = output_dir(args.out)
    target = energies.get(args.target).to(device)
    AutoFlow(target.model, args.flow)  # unknown family: a one-line error before training

    def make_guide(model):
        return AutoFlow(model, args.flow, num_layers=args.num_layers, hidden_dims=args.hidden)

    result = fit_and_score(
        target, make_guide, num_steps=args.steps, anneal_steps=anneal, num_particles=args.particles,
        kl_samples=args.kl_samples, lr=args.lr, seed=args.seed, progress=not args.quiet,
    )
    plot = plot_vi(target, {f"AutoFlow({args.flow})": result.pop("samples")}, out / f"vi-{args.target}-{args.flow}.png")
    metrics = dict(target=args.target, flow=args.flow, steps=args.steps, **result, plot=str(plot))
    if not args.json:
        print(
            f"AutoFlow({args.flow}) on {args.target}, {args.steps} steps: KL(q||p) = {result['kl']:.4f} "
            f"± {result['kl_se']:.4f} nats ({args.kl_samples} samples); plot: {plot}"
        )
    return metrics
