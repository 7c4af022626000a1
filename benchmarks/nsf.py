"""Spline and BNAF quality: density estimation on the 2-D toys against zuko, and VI on U1-U4
against Pyro's block neural autoregressive guide.

``density`` (the default): held-out NLL of pyroflows' neural spline flows (``nsf`` coupling,
``nsf_ar`` autoregressive) and zuko's ``NSF`` with the same number of transforms, bins and hidden
widths (``bnaf`` and ``realnvp`` for reference). Every model gets the same training loop: Adam
(lr 1e-3), cosine-annealed learning rate, gradient norm clipped at 10, the same mini-batch
indices (batch 256) and the same data (10,000 training points; NLL in nats on 2,500 held-out
points).

``vi``: KL(q || p) of ``AutoFlow`` guides (``flow[:option=value,...]``) and Pyro's
``AutoNormalizingFlow`` with two BNAF layers, trained with the budget and scored by the KL
estimate of ``benchmarks/vi.py`` (``pyroflows.commands.vi.fit_and_score``: ``--kl-samples`` fresh
draws of q, printed with its Monte-Carlo standard error, and an ``AutoFlow``'s PSIS k-hat from
``diagnose``, and the step ``fit_guide``'s ``keep_best`` restored, if it did), one row per
``--seeds`` entry (the seed also decides the warm start's jitter and every SVI draw).
``--library-defaults`` trains with ``fit_guide``'s own defaults instead of the script's (for a
spline guide, what ``AutoFlow.fit_defaults`` recommends): what a user gets from ``AutoFlow(model,
flow="nsf")`` and ``fit_guide(model, guide, num_steps=3000)``. A spline guide is built with
``AutoFlow``'s spline defaults (6 layers, box 10, 16 bins, ``init_scale=1.0``) unless its spec
says otherwise; the guide of the first four passes of ``docs/splines.md`` is
``nsf:num_layers=4,bound=5.0,bins=8,init_scale=0.1``. ``--plot`` draws each trained guide
and its log-density error on a grid (``docs/img/u3_depth.png``).

    OMP_NUM_THREADS=1 python benchmarks/nsf.py density --data 8gaussians --steps 2000
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --targets u1 --guides nsf bnaf:parallel=forward \
        AutoNormalizingFlow --steps 3000
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --targets u3 --guides nsf \
        nsf:warm_start=None,init_scale=1.0 --anneal 0 --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --targets u1 --guides nsf:init_scale=1.0 \
        --seeds 0 1 2 --vi-lr 3e-3
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --guides nsf:bound=10.0,bins=16,init_scale=1.0 \
        --seeds 0 1 2 3 4 --vi-lr 3e-3 --particles 256 --anneal-from 0.3
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --guides nsf --seeds 5 6 7 8 9 \
        --library-defaults
    OMP_NUM_THREADS=1 python benchmarks/nsf.py vi --targets u3 --guides nsf:num_layers=4 nsf \
        --seeds 120 --library-defaults --plot docs/img/u3_depth.png

Quality, not speed: run one task per process on a busy machine; the numbers do not depend on
load.
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
        # the spline formula on the sampling side (the default before direction existed)
        "pyroflows nsf sample": ours("nsf", bins=bins, direction="sample"),
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


def parse_guide(spec: str) -> tuple[str, dict]:
    """``"bnaf:parallel=forward,init_scale=1.0,warm_start=None"`` -> ``("bnaf", {...})``: ints,
    floats, ``None``, ``True`` and ``False`` parsed, anything else kept as a string."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for parse in (int, float):
            try:
                options[key] = parse(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"None": None, "True": True, "False": False}.get(value, value)
    return name, options


def run_vi(args: argparse.Namespace) -> list[dict]:
    """KL(q || p) of each guide on each target (one process, one after the other)."""
    from functools import partial

    from vi import PYRO_GUIDES, make_guide

    from pyroflows import energies
    from pyroflows.commands.vi import fit_and_score
    from pyroflows.guides import AutoFlow

    settings = dict(
        num_steps=args.steps,
        anneal_steps=args.anneal,
        num_particles=args.particles,
        kl_samples=args.kl_samples,
        seed=args.seed,
        num_plot_samples=40_000 if args.plot else 1,
        lr=args.vi_lr,
        anneal_from=args.anneal_from,
        anneal_shape=args.anneal_shape or "linear",
        clip_to_median=args.clip_to_median,
        forward_kl=args.forward_kl,
    )
    if args.library_defaults:  # None: the guide's recommendation, else fit_guide's default
        settings.update(num_particles=None, anneal_steps=None, lr=None, anneal_from=None,
                        anneal_shape=args.anneal_shape)
    rows, panels = [], []
    print("| target | guide | seed | KL (nats) | ± | k-hat | restored | seconds |\n"
          "|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        for spec in args.guides:
            name, options = parse_guide(spec)
            if name in PYRO_GUIDES:
                make = partial(make_guide, name)
            else:
                make = partial(AutoFlow, flow=name, **options)
            for seed in args.seeds or [args.seed]:
                made = []  # the trained guide, for the plot

                def keep(model, make=make, made=made):
                    made.append(make(model))
                    return made[-1]

                energy = energies.get(target)
                result = fit_and_score(energy, keep, **{**settings, "seed": seed})
                samples = result.pop("samples")
                if args.plot:
                    panels.append((f"{target}, {spec}, seed {seed}: KL {result['kl']:.3f}",
                                   energy, made[-1], samples))
                rows.append(dict(target=target, guide=spec, seed=seed, **result))
                # AutoFlow's PSIS k-hat: a run that misplaced mass shows here without log Z
                khat = f"{result['khat']:.2f}" if "khat" in result else "-"
                print(
                    f"| {target} | {spec} | {seed} | {result['kl']:.4f} | {result['kl_se']:.4f} "
                    f"| {khat} | {result['restored_step'] or '-'} "
                    f"| {result['train_seconds']:.0f} |",
                    flush=True,
                )
    if args.plot:
        vi_figure(panels, args.plot)
    return rows


def vi_figure(panels: list, path: str, extent: float = 5.0, size: int = 240) -> None:
    """Per trained guide, a histogram of its draws and $\\log q - \\log p$ on a grid (where
    either density is above $e^{-6}$): where a guide puts mass the target lacks, and the
    reverse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.8 * len(panels)), squeeze=False)
    grid = torch.linspace(-extent, extent, size)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    for (title, target, guide, samples), (hist, ratio) in zip(panels, axes, strict=True):
        hist.hist2d(*samples.T.numpy(), bins=150, range=[[-extent, extent]] * 2, cmap="viridis")
        hist.set(title=title, xlabel="$z_1$", ylabel="$z_2$")
        with torch.no_grad():
            log_p = target.log_prob(points)
            log_q = guide.get_posterior().log_prob(points)
        shown = (log_p > -6) | (log_q > -6)
        diff = torch.where(shown, log_q - log_p, torch.nan).reshape(size, size)
        image = ratio.imshow(diff.numpy(), origin="lower", extent=[-extent, extent] * 2,
                             cmap="RdBu_r", vmin=-1.5, vmax=1.5)
        ratio.set(title="$\\log q - \\log p$ (red: q has too much mass)", xlabel="$z_1$")
        fig.colorbar(image, ax=ratio)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_density(args: argparse.Namespace) -> list[dict]:
    """Held-out NLL of each model on each toy."""
    table = models(args.transforms, args.bins, tuple(args.hidden))
    rows = []
    print("| data | model | test NLL | params | seconds |\n|---|---|---|---|---|")
    for data_name in args.data:
        train_set, test_set = load(data_name, 10_000, seed=args.seed)
        for label in args.models or list(table):
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
    return rows


def spline_figure(path: str, seed: int = 3) -> None:
    """Plot one rational-quadratic spline (K = 6, B = 3) and its derivative to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyroflows.transforms.spline import RationalQuadraticSpline

    torch.manual_seed(seed)
    spline = RationalQuadraticSpline(bins=6, bound=3.0)
    raw = torch.randn(spline.num_params, dtype=torch.float64)
    x = torch.linspace(-4.5, 4.5, 1801, dtype=torch.float64)
    params = tuple(r.expand_as(x) for r in raw)
    y, log_d = spline.forward(x, params)
    _, xs = spline._knots(raw[: spline.bins], spline.min_bin_width)
    _, ys = spline._knots(raw[spline.bins : 2 * spline.bins], spline.min_bin_height)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax.plot(x, y, label="spline $f$")
    ax.plot(x, x, ":", color="gray", label="identity (tails)")
    ax.plot(xs, ys, "o", color="C3", label="knots $(x_k, y_k)$")
    ax.axvspan(-3, 3, color="C0", alpha=0.06)
    ax.set(xlabel="$z$", ylabel="$x = f(z)$", title="Rational-quadratic spline, K = 6, B = 3")
    ax.legend(loc="upper left", fontsize=8)
    bx.plot(x, torch.exp(log_d), color="C1")
    bx.plot(
        xs, torch.exp(spline.forward(xs, tuple(r.expand_as(xs) for r in raw))[1]), "o", color="C3"
    )
    bx.set(xlabel="$z$", ylabel="$f'(z)$", title="derivative: continuous, 1 outside $[-B, B]$")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="density", choices=("density", "vi", "figure"))
    parser.add_argument("--data", nargs="+", default=list(TOYS), help="density: toys")
    parser.add_argument(
        "--models", nargs="+", default=None, help="density: default every contender"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 2000 (density), 3000 (vi)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--transforms", type=int, default=3)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument(
        "--targets", nargs="+", default=["u1", "u2", "u3", "u4"], help="vi: targets"
    )
    parser.add_argument(
        "--guides", nargs="+", default=["nsf", "bnaf:parallel=forward", "AutoNormalizingFlow"]
    )
    parser.add_argument("--anneal", type=int, default=1500, help="vi: annealed steps")
    parser.add_argument("--anneal-from", type=float, default=0.01, help="vi: first beta")
    parser.add_argument(
        "--anneal-shape", default=None, choices=("linear", "cosine", "geometric"),
        help="vi: how beta rises (default linear; with --library-defaults the guide's "
        "recommendation)",
    )
    parser.add_argument(
        "--clip-to-median", type=float, default=None,
        help="vi: clip gradient norms to this multiple of the recent median (default: off; "
        "with --library-defaults the guide's recommendation; inf turns that off)",
    )
    parser.add_argument(
        "--forward-kl", type=float, default=None,
        help="vi: weight of fit_guide's forward-KL term (default: fit_guide's, the guide's "
        "recommendation; 0 turns it off)",
    )
    parser.add_argument("--particles", type=int, default=64, help="vi: ELBO particles")
    parser.add_argument("--vi-lr", type=float, default=1e-2, help="vi: initial learning rate")
    parser.add_argument(
        "--library-defaults",
        action="store_true",
        help="vi: fit_guide's defaults (the guide's recommendation) instead of --particles, "
        "--anneal, --anneal-from, --anneal-shape (unless given) and --vi-lr",
    )
    parser.add_argument("--kl-samples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="vi: several seeds")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--plot", default=None,
        help="vi: figure of each trained guide's draws and log q - log p, to this path",
    )
    parser.add_argument("--out", default="docs/img/rq_spline.png", help="figure: output path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "figure":
        spline_figure(args.out)
        return
    if args.mode == "vi":
        args.steps = args.steps or 3000
        args.anneal = min(args.anneal, args.steps)
        rows = run_vi(args)
    else:
        args.steps = args.steps or 2000
        rows = run_density(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
