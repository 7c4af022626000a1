"""VI benchmark: AutoFlow with every vector flow family against Pyro's autoguides on U1-U4.

Every guide gets the same SVI budget (steps, particles, annealing, learning-rate schedule, seed)
through `pyroflows.commands.vi.fit_and_score`; the score is
KL(q || p) = E_q[log q + U] + log Z from ``--kl-samples`` draws (standard error alongside).
Pyro's baselines: ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` (4 affine
autoregressive layers, hidden [64, 64]) and ``AutoNormalizingFlow`` with two block neural
autoregressive flows (the example of its docstring). Fits run in ``--jobs`` processes.

Writes ``vi.json`` (every score), ``vi.md`` (a KL table, best AutoFlow against best Pyro guide
per target) and ``vi-<target>.png`` (true density beside each guide's samples) to ``--out``.

Usage:
    python benchmarks/vi.py --out benchmarks/results
    python benchmarks/vi.py --targets u1 u2 --flows realnvp maf --steps 1000 --jobs 2
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

PYRO_GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoNormalizingFlow")


def make_guide(name: str, model, num_layers: int | None = None):
    """AutoFlow of family ``name`` (``num_layers``: the family's default if ``None``), or the
    Pyro autoguide of that name."""
    from pyro.distributions.transforms import block_autoregressive, iterated
    from pyro.infer import autoguide

    from pyroflows.guides import AutoFlow

    if name == "AutoIAFNormal":
        return autoguide.AutoIAFNormal(model, hidden_dim=[64, 64], num_transforms=4)
    if name == "AutoNormalizingFlow":
        return autoguide.AutoNormalizingFlow(model, partial(iterated, 2, block_autoregressive))
    if name in PYRO_GUIDES:
        return getattr(autoguide, name)(model)
    return AutoFlow(model, name, num_layers=num_layers)


def run_one(task: tuple[str, str], settings: dict, num_layers: int | None = None) -> dict:
    from pyroflows import energies
    from pyroflows.commands.vi import fit_and_score

    torch.set_num_threads(1)
    target_name, guide_name = task
    result = fit_and_score(
        energies.get(target_name),
        partial(make_guide, guide_name, num_layers=num_layers),
        **settings,
    )
    label = guide_name if guide_name in PYRO_GUIDES else f"AutoFlow({guide_name})"
    print(
        f"{target_name:3s} {label:28s} KL {result['kl']:.4f} ± {result['kl_se']:.4f}  "
        f"({result['train_seconds']:.0f} s)",
        flush=True,
    )
    return dict(target=target_name, guide=label, **result)


def markdown(results: list[dict], targets: list[str], guides: list[str]) -> str:
    score = {(r["target"], r["guide"]): r for r in results}
    lines = ["| guide | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for guide in guides:
        cells = [f"{score[t, guide]['kl']:.3f} ± {score[t, guide]['kl_se']:.3f}" for t in targets]
        lines.append(f"| {guide} | " + " | ".join(cells) + " |")
    for kind, keep in (
        ("best AutoFlow", lambda g: g.startswith("AutoFlow")),
        ("best Pyro guide", lambda g: not g.startswith("AutoFlow")),
    ):
        cells = []
        for t in targets:
            best = min(
                (r for r in results if r["target"] == t and keep(r["guide"])),
                key=lambda r: r["kl"],
                default=None,
            )
            cells.append("-" if best is None else f"**{best['kl']:.3f}** ({best['guide']})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import pyroflows

    vector = [n for n in pyroflows.available_flows() if pyroflows.registry.family_spec(n).vector]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["u1", "u2", "u3", "u4"])
    parser.add_argument(
        "--flows",
        nargs="+",
        default=vector,
        help="AutoFlow families (default: every vector family)",
    )
    parser.add_argument(
        "--num-layers", type=int, default=None, help="layers of every AutoFlow (family defaults)"
    )
    parser.add_argument(
        "--pyro", nargs="*", default=list(PYRO_GUIDES), help="Pyro autoguides to compare"
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--anneal", type=int, default=1500)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--kl-samples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(
        num_steps=args.steps,
        anneal_steps=args.anneal,
        num_particles=args.particles,
        kl_samples=args.kl_samples,
        seed=args.seed,
    )
    guides = list(args.pyro) + list(args.flows)
    tasks = [(t, g) for t in args.targets for g in guides]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(partial(run_one, settings=settings, num_layers=args.num_layers), tasks)
        )

    from pyroflows import energies
    from pyroflows.commands.vi import plot_vi

    for t in args.targets:
        plot_vi(
            energies.get(t),
            {r["guide"]: r["samples"] for r in results if r["target"] == t},
            out / f"vi-{t}.png",
        )
    for r in results:
        r.pop("samples")
    labels = [g if g in PYRO_GUIDES else f"AutoFlow({g})" for g in guides]
    table = markdown(results, args.targets, labels)
    header = (
        f"KL(q || p) in nats (± standard error, {args.kl_samples} draws of q); "
        f"{args.steps} SVI steps, {args.particles} particles, first {args.anneal} annealed, "
        f"seed {args.seed}; AutoFlow layers: "
        f"{args.num_layers or 'family defaults'}.\n\n"
    )
    (out / "vi.md").write_text(header + table)
    (out / "vi.json").write_text(json.dumps(dict(settings=settings, results=results), indent=1))
    print("\n" + header + table)


if __name__ == "__main__":
    main()
