"""Flow guides against Pyro's autoguides on the posteriordb reference posteriors.

For every posterior in ``pyroflows.datasets.posteriordb`` and every guide, trains with
``fit_guide(model, guide, **data)`` at its defaults (the same loop, budget and plateau stop for
every guide), then draws 4000 latents, scores them against the reference (mean error in
reference sds, sd ratios) and computes PSIS k-hat of the importance weights. The work is
reported with the wall time: SVI steps, particles per step (``K``), and for ``AutoFlow`` the
warm start's per-point gradient evaluations (MAP starts times L-BFGS evaluations) and
Hessian-vector products. Prints one table
row per (posterior, guide) as it finishes, and with ``--out`` appends each row to a JSON-lines
file. Wall times are whatever this machine gives (report them with its load).

Usage:
    python benchmarks/vi_posteriors.py                       # all posteriors and guides
    python benchmarks/vi_posteriors.py --posteriors eight_schools_noncentered --guides autoflow
    python benchmarks/vi_posteriors.py --num-steps 50 --num-draws 200   # smoke test
    python benchmarks/vi_posteriors.py --posteriors garch11 --guides autoflow --khat-repeats 10

Needs the posteriordb folder (``$PYROFLOWS_POSTERIORDB`` or ``../shared/posteriordb``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights

from pyroflows.datasets import posteriordb
from pyroflows.guides import AutoFlow, fit_guide
from pyroflows.guides.warm_start import plate_nesting

GUIDES: dict[str, Callable] = {
    "autoflow": lambda model: AutoFlow(model),
    "autoflow-realnvp": lambda model: AutoFlow(model, flow="realnvp"),
    "autoflow-normal": lambda model: AutoFlow(model, tail_df=None),
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
}


def draws_and_weights(model, guide, data, num_draws):
    """Guide draws of every site (``{site: (1, S, ...)}``, deterministic sites included) and
    the log importance weights ``log p(x, z) - log q(z)``, from one vectorised run."""
    nesting = plate_nesting(model, (), data)
    with torch.no_grad():
        log_w, trace, _ = vectorized_importance_weights(
            model, guide, num_samples=num_draws, max_plate_nesting=nesting, **data
        )
    samples = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or (
            site["is_observed"] and not site["infer"].get("_deterministic")
        ):
            continue
        value = site["value"]
        if value.dim() == 0 or value.shape[0] != num_draws:
            continue
        shape = value.shape[1:]
        while len(shape) > 0 and shape[0] == 1:
            shape = shape[1:]
        samples[name] = value.reshape(1, num_draws, *shape).double().cpu().numpy()
    return samples, log_w.double().cpu().numpy()


def score(samples, log_w, reference):
    """max |mean error| / ref sd, sd-ratio range, k-hat; and the same errors PSIS-reweighted."""
    rows = posteriordb.compare(samples, reference)
    finite = np.isfinite(log_w)
    smoothed, khat = az.psislw(np.where(finite, log_w, -np.inf).copy())
    w = np.exp(smoothed - smoothed.max())
    w /= w.sum()
    psis_err, psis_ratio = [], []
    for flat, ref in reference.items():
        site, index = posteriordb._split(flat)
        x = samples[site][(0, slice(None), *index)]
        mean = float((w * x).sum())
        sd = math.sqrt(float((w * (x - mean) ** 2).sum()))
        psis_err.append(abs(mean - ref["mean"]) / ref["sd"])
        psis_ratio.append(sd / ref["sd"])
    return dict(
        max_err=max(abs(r["err_sd"]) for r in rows.values()),
        sd_min=min(r["sd_ratio"] for r in rows.values()),
        sd_max=max(r["sd_ratio"] for r in rows.values()),
        khat=float(khat),
        psis_max_err=max(psis_err),
        psis_sd_min=min(psis_ratio),
        psis_sd_max=max(psis_ratio),
    )


def run(name, guide_name, args):
    model, data, reference = posteriordb.load(name)
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    guide = GUIDES[guide_name](model)
    options = {} if args.num_steps is None else dict(num_steps=args.num_steps)
    if args.num_particles is not None:
        options["num_particles"] = args.num_particles
    history = fit_guide(
        model, guide, **data, progress=False, seed=args.seed, num_elbo_samples=0, **options
    )
    seconds = time.perf_counter() - start
    repeats = args.khat_repeats
    samples, log_w = draws_and_weights(model, guide, data, args.num_draws * repeats)
    # k-hat of independent sets of num_draws: its spread is the estimate's own noise
    khats = [float(az.psislw(w.copy())[1]) for w in np.split(log_w, repeats)]
    samples = {k: v[:, : args.num_draws] for k, v in samples.items()}
    log_w = log_w[: args.num_draws]
    dim = sum(
        int(np.prod(samples[s].shape[2:]))
        for s in samples
        if s in {posteriordb._split(k)[0] for k in reference}
    )
    finite = log_w[np.isfinite(log_w)]
    warm = getattr(guide, "warm_start", None)
    cost = warm.cost if warm is not None else {}
    return dict(
        posterior=name,
        guide=guide_name,
        dim=dim,
        seconds=seconds,
        steps=history["steps"],
        particles=history["num_particles"],
        # per-point gradient evaluations: SVI particles, MAP starts, Hessian-vector products
        svi_gradients=history["steps"] * history["num_particles"],
        map_gradients=cost.get("lbfgs_evaluations", 0) * cost.get("starts", 0),
        hvps=cost.get("hessian_vector_products", 0),
        elbo=float(finite.mean()),
        **score(samples, log_w, reference),
        khat_median=float(np.median(khats)),
        khat_max=max(khats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posteriors", nargs="+", default=posteriordb.names())
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--num-steps", type=int, default=None, help="budget (default: fit_guide's)")
    parser.add_argument("--num-draws", type=int, default=4000)
    parser.add_argument("--num-particles", type=int, default=None, help="default: fit_guide's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--khat-repeats", type=int, default=1, help="k-hat of this many sets of --num-draws"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append each row to this JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (
        f"{'posterior':40s} {'dim':>3s} {'guide':22s} {'sec':>6s} {'steps':>5s} {'K':>3s} "
        f"{'MAP gr':>6s} {'HVP':>4s} {'err/sd':>7s} {'sd ratio':>13s} {'khat':>5s} "
        f"{'psis err':>8s} {'psis sd':>13s}"
    )
    print(header, flush=True)
    for name in args.posteriors:
        for guide_name in args.guides:
            try:
                row = run(name, guide_name, args)
            except Exception as err:  # noqa: BLE001 - a failing guide is a table entry
                row = dict(posterior=name, guide=guide_name, error=f"{type(err).__name__}: {err}")
                print(f"{name:40s}     {guide_name:22s} FAILED {row['error'][:80]}", flush=True)
            else:
                print(
                    f"{name:40s} {row['dim']:3d} {guide_name:22s} {row['seconds']:6.0f} "
                    f"{row['steps']:5d} {row['particles']:3d} {row['map_gradients']:6d} "
                    f"{row['hvps']:4d} {row['max_err']:7.3f} "
                    f"{row['sd_min']:6.3f}..{row['sd_max']:5.3f} {row['khat']:5.2f} "
                    f"{row['psis_max_err']:8.3f} "
                    f"{row['psis_sd_min']:6.3f}..{row['psis_sd_max']:5.3f}"
                    + (
                        f"  k-hat median {row['khat_median']:.2f} max {row['khat_max']:.2f}"
                        if args.khat_repeats > 1
                        else ""
                    ),
                    flush=True,
                )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
