"""``pyroflows sample``: sample a built-in energy target with a batched MCMC kernel.

Prints the smallest effective sample size over the coordinates, ESS per second, the largest
R-hat, the acceptance rate and the energy-evaluation count, and writes a plot of the samples
(over the density contours for 2-D targets) with a few traces, titled with the target and the
kernel.

Example:
    pyroflows sample --target u2 --kernel hmc --chains 1024
    pyroflows sample --target ising --kernel gibbs --json
"""

from __future__ import annotations

import argparse
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

KERNELS = ("hmc", "mala", "mh", "sgld", "gibbs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows sample``.

    Args:
        parser: the subcommand's parser.
    """
    from pyroflows import energies

    targets = energies.available()
    add_common_arguments(parser, steps=1000, steps_help="draws kept per chain, after warm-up")
    parser.add_argument("--target", "--data", dest="target", default="u2", choices=targets,
                        metavar="TARGET",
                        help=f"energy target: {', '.join(targets)} (default: u2)")
    parser.add_argument("--kernel", default="hmc", choices=KERNELS,
                        help="sampler (default: hmc; gibbs is exact on ising, "
                             "Metropolis-within-Gibbs otherwise)")
    parser.add_argument("--chains", type=int_flag(1), default=256,
                        help="chains run together as one batch (default: 256)")
    parser.add_argument("--warmup", type=int_flag(0), default=500,
                        help="adaptation steps per chain, discarded (default: 500)")
    parser.add_argument("--step-size", type=positive_float, default=0.1,
                        help="initial step size of hmc/mala (adapted during warm-up) or the "
                             "sgld step (default: 0.1)")
    parser.add_argument("--num-steps", type=int_flag(1), default=None,
                        help="leapfrog steps per hmc transition (default: trajectory length "
                             "adapted by ChEES with 16 or more chains, else 10)")
    parser.add_argument("--target-accept", type=positive_float, default=None,
                        help="acceptance rate the hmc/mala step-size adaptation aims at, below 1; "
                             "raise it (0.9-0.95) against divergences (default: the kernel's)")
    parser.add_argument("--thinning", type=int_flag(1), default=1,
                        help="keep every n-th draw (default: 1)")


def _kernel(name: str, target: Any, args: argparse.Namespace) -> Any:
    from pyroflows import mcmc

    accept = {} if args.target_accept is None else {"target_accept_prob": args.target_accept}
    if name == "hmc":
        return mcmc.HMC(target, step_size=args.step_size, num_steps=args.num_steps, **accept)
    if name == "mala":
        return mcmc.MALA(target, step_size=args.step_size, **accept)
    if name == "mh":
        return mcmc.MH(target)
    if name == "sgld":
        return mcmc.SGLD(target, step_size=args.step_size)
    support = target.states().new_tensor([-1.0, 1.0]) if target.name == "ising" else None
    return mcmc.Gibbs(target, support=support)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows sample``: run, summarise, plot.

    Args:
        args: the parsed flags.

    Returns:
        the final metrics ([`summarize`][pyroflows.mcmc.summarize]'s numbers and ``plot``).
    """
    from pyroflows import energies, mcmc
    from pyroflows.mcmc.plots import plot_chains

    if args.target_accept is not None and not args.target_accept < 1:
        raise ValueError(f"--target-accept must lie in (0, 1), got {args.target_accept}")
    device = resolve_device(args.device)
    out = output_dir(args.out)
    target = energies.get(args.target).to(device)
    if target.name == "ising" and args.kernel != "gibbs":
        raise ValueError("--target ising is discrete: use --kernel gibbs")
    # work per step: every chain's event, once per leapfrog step: small, so one thread
    threads = configure_threads(args.threads, args.chains * target.event_shape.numel()
                                * (args.num_steps or 10))
    torch.manual_seed(args.seed)
    shape = (args.chains, *target.event_shape)
    if target.name == "ising":
        init = torch.randint(0, 2, shape, device=device).float() * 2 - 1
    else:
        init = 0.5 * torch.randn(shape, device=device)
    kernel = _kernel(args.kernel, target, args)
    idata = mcmc.sample(kernel, init, args.steps, warmup_steps=args.warmup,
                        thinning=args.thinning, progress=not args.quiet, seed=args.seed)
    metrics = dict(target=args.target, kernel=args.kernel, chains=args.chains, steps=args.steps,
                   threads=threads, **mcmc.summarize(idata))
    (path,) = output_files(out, f"sample-{args.target}-{args.kernel}", [".png"],
                           overwrite=args.overwrite)
    title = (f"{args.kernel.upper()} on {args.target}: {args.chains} chains x {args.steps} draws, "
             f"min ESS {metrics['min_ess']:.0f}")
    energy = target if len(target.event_shape) == 1 else None
    metrics["plot"] = str(plot_chains(idata, path, energy=energy, title=title))
    if not args.json:
        print(
            f"{args.kernel} on {args.target}, {args.chains} chains x {args.steps} draws: "
            f"min ESS {metrics['min_ess']:.0f} ({metrics['min_ess_per_second']:.0f}/s), "
            f"max R-hat {metrics['max_rhat']:.3f}, acceptance {metrics['acceptance_rate']:.2f}, "
            f"{metrics['num_energy_evals']} energy evaluations in "
            f"{metrics['sampling_time']:.1f} s; plot: {metrics['plot']}"
        )
        # divergences and rejected proposals, put in context by summarize (what they mean,
        # what to do); the CLI's name for target_accept_prob is --target-accept
        advice = metrics.get("advice") or (
            f"divergences {metrics['divergences']}, non-finite {metrics['nonfinite']}"
        )
        print(advice.replace("target_accept_prob", "--target-accept"))
    return metrics
