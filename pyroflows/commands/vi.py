r"""``pyroflows vi``: fit an [`AutoFlow`][pyroflows.guides.AutoFlow] guide to a 2-D target.

Trains by SVI on the target's Pyro model (annealed over the first third of the steps, with 64
particles at a learning rate of 0.01, unless the guide recommends its own training), then
prints $\mathrm{KL}(q \,\|\, p) = \mathbb E_q[\log q + U] + \log Z$ estimated from ``--kl-samples``
draws of $q$ (with its standard error) and writes a plot of the true density beside a histogram
of $q$'s samples. The benchmark ``benchmarks/vi.py`` reuses `fit_and_score` and
`plot_vi` for every guide it compares.

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

from pyroflows.cli import (
    add_common_arguments,
    configure_threads,
    int_flag,
    output_dir,
    output_files,
    positive_float,
    resolve_device,
)

TARGETS = ("u1", "u2", "u3", "u4", "banana", "mixture", "gaussian")
WINDOW = (-4.0, 4.0, -4.0, 4.0)  # Rezende & Mohamed's plotting window


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows vi``.

    Args:
        parser: the subcommand's parser.
    """
    add_common_arguments(parser, flow="iaf", steps=2000, steps_help="SVI optimiser steps")
    parser.add_argument("--target", "--data", dest="target", default="u2", choices=TARGETS,
                        metavar="TARGET",
                        help=f"2-D energy target: {', '.join(TARGETS)} (default: u2)")
    parser.add_argument("--num-layers", type=int_flag(1), default=None,
                        help="flow layers (family default; 6 for a spline guide)")
    parser.add_argument("--hidden", type=int_flag(1), nargs="+", default=None,
                        help="hidden widths (family default)")
    parser.add_argument("--particles", type=int_flag(1), default=None,
                        help="ELBO particles per step (default: the guide's recommendation, "
                        "else 64)")
    parser.add_argument("--anneal", type=int_flag(0), default=None,
                        help="annealing steps (default: the guide's recommendation, else "
                        "steps // 3)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="initial Adam learning rate, decayed to a tenth (default: the "
                        "guide's recommendation, else 0.01)")
    parser.add_argument("--kl-samples", type=int_flag(1), default=20_000,
                        help="draws of q for the KL estimate (default: 20000)")


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
    **fit_options: Any,
) -> dict[str, Any]:
    """Train ``make_guide(target.model)`` by [`fit_guide`][pyroflows.guides.fit_guide], then
    score it.

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
        **fit_options: further options of ``fit_guide`` (e.g. ``anneal_from``).

    Returns:
        ``kl``, ``kl_se`` (nats), ``train_seconds``, ``final_loss``, ``restored_step``
        (``fit_guide``'s ``keep_best``: the step whose guide was restored, else ``None``) and
        ``samples``
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
        target.model, guide, num_steps=num_steps, num_particles=num_particles,
        anneal_steps=anneal_steps, lr=lr, progress=progress, num_elbo_samples=0,
        **fit_options,
    )
    seconds = time.perf_counter() - start
    kl, kl_se = reverse_kl(target.model, guide, target.log_normalizer, num_samples=kl_samples)
    with torch.no_grad():
        predictive = Predictive(target.model, guide=guide, num_samples=num_plot_samples,
                                parallel=True)
        samples = predictive()["x"].reshape(-1, 2).cpu()
    result = dict(kl=kl, kl_se=kl_se, train_seconds=seconds,
                  final_loss=history["train_loss"][-1], samples=samples,
                  restored_step=history["restored_step"])
    if hasattr(guide, "diagnose"):  # AutoFlow: PSIS k-hat of the trained guide, and its verdict
        report = guide.diagnose(num_samples=min(kl_samples, 4000))
        result.update(khat=report["khat"], verdict=report["verdict"])
    return result


def plot_vi(
    target: Any,
    samples: dict[str, torch.Tensor],
    path: str | Path,
    bins: int = 100,
    kl: dict[str, float] | None = None,
) -> Path:
    r"""Write [`vi_figure`][pyroflows.commands.vi.vi_figure] to a PNG file.

    Args:
        target: a 2-D energy target with a known ``log_normalizer``.
        samples: guide name -> draws of shape ``(N, 2)``.
        path: PNG file to write.
        bins: histogram bins (and density grid points) per axis.
        kl: guide name -> $\mathrm{KL}(q \,\|\, p)$ in nats, shown in the panel titles.

    Returns:
        ``path``.
    """
    path = Path(path)
    vi_figure(target, samples, bins, kl).savefig(path, dpi=110)
    return path


def vi_figure(
    target: Any,
    samples: dict[str, torch.Tensor],
    bins: int = 100,
    kl: dict[str, float] | None = None,
) -> Any:
    r"""The target's density on Rezende & Mohamed's window beside a 2-D histogram of each
    guide's samples (same window and colour scale, one colour bar).

    Args:
        target: a 2-D energy target with a known ``log_normalizer``.
        samples: guide name -> draws of shape ``(N, 2)``.
        bins: histogram bins (and density grid points) per axis.
        kl: guide name -> $\mathrm{KL}(q \,\|\, p)$ in nats, shown in the panel titles.

    Returns:
        the `matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    from pyroflows.plotting import density_grid

    kl = kl or {}
    panels = 1 + len(samples)
    fig = Figure(figsize=(3.6 * panels + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    xs, ys, dens = density_grid(lambda x: -target.energy(x) - target.log_normalizer, WINDOW,
                                resolution=bins, like=target._anchor)
    vmax = dens.max().item()
    mesh = axes[0].pcolormesh(xs, ys, dens, shading="auto", cmap="viridis", vmin=0, vmax=vmax,
                              rasterized=True)
    axes[0].set_title(f"{target.name}: true density", fontsize=10)
    for ax, (name, pts) in zip(axes[1:], samples.items(), strict=True):
        pts = pts.cpu()
        ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=[WINDOW[:2], WINDOW[2:]],
                  density=True, cmap="viridis", vmin=0, vmax=vmax, rasterized=True)
        score = f"\nKL(q||p) = {kl[name]:.3f} nats" if name in kl else ""
        ax.set_title(f"{name}{score}", fontsize=10)
    for ax in axes:
        ax.set(xlim=WINDOW[:2], ylim=WINDOW[2:], xlabel="$z_1$", ylabel="$z_2$")
        ax.set_aspect("equal")
    fig.colorbar(mesh, ax=list(axes), label="density", shrink=0.85)
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows vi``: train, report the KL, plot.

    Args:
        args: the parsed flags.

    Returns:
        the final metrics (``kl``, ``kl_se`` in nats, ``train_seconds``, ``plot``).
    """
    from pyroflows import energies
    from pyroflows.guides import AutoFlow

    device = resolve_device(args.device)
    out = output_dir(args.out)
    target = energies.get(args.target).to(device)
    # an unknown family fails here, before training; a spline guide recommends its training
    recommended = AutoFlow(target.model, args.flow).fit_defaults(args.steps)
    settings = {"lr": 1e-2, "num_particles": 64, "anneal_steps": args.steps // 3, **recommended}
    given = {"lr": args.lr, "num_particles": args.particles, "anneal_steps": args.anneal}
    settings.update({name: value for name, value in given.items() if value is not None})
    if settings["anneal_steps"] > args.steps:
        raise ValueError(f"--anneal must lie in [0, --steps], got {settings['anneal_steps']}")

    def make_guide(model: Callable) -> AutoFlow:
        return AutoFlow(model, args.flow, num_layers=args.num_layers, hidden_dims=args.hidden)

    # a guide over a 2-D target is small work whatever the flow: one thread unless --threads
    threads = configure_threads(args.threads, 0)
    result = fit_and_score(
        target, make_guide, num_steps=args.steps, kl_samples=args.kl_samples, seed=args.seed,
        progress=not args.quiet, **settings,
    )
    label = f"AutoFlow({args.flow})"
    (path,) = output_files(out, f"vi-{args.target}-{args.flow}", [".png"],
                           overwrite=args.overwrite)
    plot = plot_vi(target, {label: result.pop("samples")}, path, kl={label: result["kl"]})
    metrics = dict(target=args.target, flow=args.flow, steps=args.steps, threads=threads,
                   **result, plot=str(plot))
    if not args.json:
        print(
            f"{label} on {args.target}, {args.steps} steps: KL(q||p) = {result['kl']:.4f} "
            f"± {result['kl_se']:.4f} nats ({args.kl_samples} samples); plot: {plot}"
        )
        print(f"diagnose: {result['verdict']}")
    return metrics
