"""``sample``: run a batched kernel and return an ``arviz.InferenceData``."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pyroflows._optional import require
from pyroflows.mcmc.base import BatchedKernel
from pyroflows.validation import check_int

az = require("arviz")  # the mcmc extra: an ImportError that names it

#: per-draw statistics recorded in ``sample_stats`` (arviz names where arviz has one)
STATS = ("acceptance_rate", "step_size", "diverging", "energy", "lp", "nonfinite", "n_steps")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """The ``torch.Generator`` a run owns, on ``device``: seeded with ``seed``, or (``None``)
    with a seed drawn from torch's global generator, so ``torch.manual_seed`` /
    ``pyro.set_rng_seed`` still make runs repeatable. Never reseeds the global generator."""
    if seed is None:
        seed = int(torch.randint(2**62, (), device="cpu"))
    else:
        seed = check_int(seed, "seed", minimum=0)
    return torch.Generator(device=device).manual_seed(seed)


def run_chains(
    kernel: BatchedKernel,
    init: torch.Tensor,
    num_samples: int,
    *,
    warmup_steps: int,
    thinning: int = 1,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``kernel`` from ``init``: the loop under both paths of [`sample`][pyroflows.mcmc.sample].

    Args:
        kernel: a pyroflows kernel with its energy bound.
        init: starting points ``(num_chains, *event_shape)`` (finite energy at every chain).
        num_samples: draws kept per chain (after warm-up and thinning).
        warmup_steps: adaptation steps, discarded.
        thinning: keep every ``thinning``-th step.
        progress: show a tqdm progress bar.
        generator: the source of every random number of the run (default: one seeded from
            torch's global generator).

    Returns:
        ``draws`` of shape ``(num_samples, num_chains, *event_shape)``; ``stats``: name ->
        ``(num_chains, num_samples)`` tensors (see `STATS`);
        ``attrs``: ``sampling_time`` (seconds, warm-up included), ``num_energy_calls``,
        ``num_energy_evals`` (points, summed over chains), ``warmup_nonfinite``,
        ``warmup_divergences``, ``warmup_diverging_chains``, ``kernel``, ``warmup_steps``,
        ``thinning``.
    """
    if not isinstance(kernel, BatchedKernel):
        raise TypeError(f"kernel must be a pyroflows.mcmc kernel, got {type(kernel).__name__}")
    if kernel.energy is None:
        raise ValueError("the kernel has no energy bound: pass the model through mcmc.sample")
    check_int(num_samples, "num_samples", minimum=1)
    check_int(warmup_steps, "warmup_steps", minimum=0)
    check_int(thinning, "thinning", minimum=1)
    if generator is None:
        device = init.device if isinstance(init, torch.Tensor) else "cpu"
        generator = make_generator(None, device)
    calls, evals = kernel.num_energy_calls, kernel.num_energy_evals
    start = time.perf_counter()
    kernel.plan(warmup_steps + num_samples * thinning)
    run = kernel.start(init, warmup_steps, generator)
    init = run.chains.position
    num_chains = init.shape[0]
    draws = init.new_empty((num_samples, *init.shape))
    stats = {name: init.new_empty((num_samples, num_chains)) for name in STATS}
    stats["diverging"] = init.new_empty((num_samples, num_chains), dtype=torch.bool)
    stats["nonfinite"] = init.new_empty((num_samples, num_chains), dtype=torch.long)
    # warm-up totals per chain: divergences and non-finite rejections
    nonfinite = init.new_zeros(num_chains, dtype=torch.long)
    warmup_totals = {
        name: init.new_zeros(num_chains, dtype=torch.long) for name in ("diverging", "nonfinite")
    }
    total = warmup_steps + num_samples * thinning
    bar = tqdm(
        range(total), disable=not progress, desc="warmup" if warmup_steps else "sample", leave=False
    )
    step: dict[str, torch.Tensor] = {}
    for t in bar:
        run, info = kernel.advance(run, generator)
        step = kernel.stats_of(run, info)
        nonfinite += step["nonfinite"].long()
        if t < warmup_steps:
            warmup_totals["diverging"] += step["diverging"].long()
        if t == warmup_steps - 1:
            warmup_totals["nonfinite"] = nonfinite
            nonfinite = torch.zeros_like(nonfinite)
            bar.set_description("sample")
        kept = t - warmup_steps + 1
        if kept > 0 and kept % thinning == 0:
            i = kept // thinning - 1
            draws[i] = run.chains.position
            _record(stats, i, step, nonfinite)
            nonfinite = torch.zeros_like(nonfinite)
        if progress and t % 100 == 0:
            bar.set_postfix(acc=f"{step['accept_prob'].mean().item():.2f}")
    kernel.run, kernel.params, kernel.stats = run, run.params, step
    attrs = {
        "sampling_time": time.perf_counter() - start,
        "num_energy_calls": kernel.num_energy_calls - calls,
        "num_energy_evals": kernel.num_energy_evals - evals,
        "warmup_nonfinite": int(warmup_totals["nonfinite"].sum()),
        "warmup_divergences": int(warmup_totals["diverging"].sum()),
        "warmup_diverging_chains": int((warmup_totals["diverging"] > 0).sum()),
        "kernel": type(kernel).__name__,
        "warmup_steps": warmup_steps,
        "thinning": thinning,
    }
    return draws, {name: value.T for name, value in stats.items()}, attrs


def sample(
    kernel: BatchedKernel,
    init: Any = None,
    num_samples: int | None = None,
    *,
    warmup_steps: int | None = None,
    num_chains: int | None = None,
    thinning: int = 1,
    progress: bool = True,
    seed: int | None = None,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    vectorize: str = "plate",
    reparam: str | None = "auto",
) -> az.InferenceData:
    """Run ``kernel`` on its energy or its Pyro model; collect ``num_samples`` draws per chain.

    Args:
        kernel: a pyroflows kernel ([`HMC`][pyroflows.mcmc.HMC], [`SGLD`][pyroflows.mcmc.SGLD],
            [`MH`][pyroflows.mcmc.MH], [`Gibbs`][pyroflows.mcmc.Gibbs]).
        init: for an energy, the starting points ``(num_chains, *event_shape)`` (every chain's
            energy finite; the draws live on its device). For a model: a Pyro init strategy, a
            ``{site: value}`` dict, or ``None``.
        num_samples: draws kept per chain (after warm-up and thinning).
        warmup_steps: adaptation steps, discarded (default: ``num_samples``, as Pyro does).
        num_chains: chains to run (a model needs it; an energy takes it from ``init``).
        thinning: keep every ``thinning``-th step.
        progress: show a tqdm progress bar with the running acceptance rate.
        seed: seed of the ``torch.Generator`` the run owns (``None``: drawn from torch's global
            generator, which is never reseeded).
        model_args: positional arguments of the kernel's model.
        model_kwargs: keyword arguments of the kernel's model.
        vectorize: how the model evaluates every chain at once: ``"plate"`` (it broadcasts over
            an outer chain plate) or ``"vmap"`` (a model written for one chain, mapped by
            ``torch.func.vmap``); see [`ModelPotential`][pyroflows.mcmc.ModelPotential].
        reparam: for a model, ``"auto"`` (default) non-centres the elements of hierarchical
            loc-scale sites (a scale that depends on other latent sites) that the data say
            little about, chosen after a short pilot of warm-up
            ([`reparam`][pyroflows.mcmc.reparam]); the draws are still the model's own sites.
            ``None`` samples the model as written. Not for ``vectorize="vmap"`` or a flow
            proposal, which keep the model as written.

    Returns:
        For an energy, ``InferenceData`` with ``posterior["x"]`` of dims ``(chain, draw, x_dim_0,
        ...)`` and ``sample_stats``: ``acceptance_rate`` (the MH acceptance probability, 1 for
        exact updates), ``step_size``, ``diverging``, ``energy`` (the Hamiltonian for HMC, the
        target's $U(x)$ for the other kernels), ``lp`` ($-U(x)$), ``n_steps`` (leapfrog steps)
        and ``nonfinite`` (proposals rejected for a non-finite or invalid energy since the
        previous draw). Its ``attrs`` are those of
        [`run_chains`][pyroflows.mcmc.driver.run_chains]. For a model, every
        latent and deterministic site by name, constrained, with ``log_likelihood`` and
        ``observed_data`` as well.
    """
    if not isinstance(kernel, BatchedKernel):
        raise TypeError(f"kernel must be a pyroflows.mcmc kernel, got {type(kernel).__name__}")
    if num_samples is None:
        raise ValueError("num_samples must be given (an int >= 1)")
    if num_chains is not None:
        check_int(num_chains, "num_chains", minimum=1)
    if getattr(kernel, "model", None) is not None:
        from pyroflows.mcmc.models import sample_model

        return sample_model(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=num_chains,
            init=init,
            seed=seed,
            progress=progress,
            thinning=thinning,
            model_args=model_args,
            model_kwargs=model_kwargs or {},
            vectorize=vectorize,
            reparam=reparam,
        )
    if model_args or model_kwargs or vectorize != "plate":
        raise ValueError(
            "model_args, model_kwargs and vectorize need a kernel built with model=..."
        )
    init = _energy_init(kernel, init, num_chains)
    check_int(num_samples, "num_samples", minimum=1)
    warmup_steps = (
        num_samples if warmup_steps is None else check_int(warmup_steps, "warmup_steps", minimum=0)
    )
    generator = make_generator(seed, init.device)
    draws, stats, attrs = run_chains(
        kernel,
        init,
        num_samples,
        warmup_steps=warmup_steps,
        thinning=thinning,
        progress=progress,
        generator=generator,
    )
    posterior = {kernel.site: np.swapaxes(draws.detach().cpu().numpy(), 0, 1)}
    sample_stats = {name: value.cpu().numpy() for name, value in stats.items()}
    with warnings.catch_warnings():  # arviz warns whenever chains outnumber draws, our usual case
        warnings.filterwarnings("ignore", message="More chains")
        return az.from_dict(posterior=posterior, sample_stats=sample_stats, attrs=attrs)


def _energy_init(kernel: BatchedKernel, init: Any, num_chains: int | None) -> torch.Tensor:
    """The chains' starting points on the energy path: ``init``, or (``None``) uniform draws in
    ``[-2, 2]`` (Stan's default) for an energy with an ``event_shape`` and a ``num_chains``."""
    if init is None:
        event_shape = getattr(kernel.energy, "event_shape", None)
        if event_shape is None or num_chains is None:
            raise ValueError(
                "init must be given (num_chains, *event_shape), or num_chains for an energy "
                "with an event_shape"
            )
        anchor = next(iter(getattr(kernel.energy, "buffers", lambda: iter(()))()), None)
        like = (
            anchor
            if anchor is not None and anchor.is_floating_point()
            else torch.zeros((), device="cpu")
        )
        return 4 * torch.rand((num_chains, *event_shape), device=like.device, dtype=like.dtype) - 2
    if (
        num_chains is not None
        and isinstance(init, torch.Tensor)
        and init.dim() >= 1
        and init.shape[0] != num_chains
    ):
        raise ValueError(
            f"num_chains ({num_chains}) must match init's first dimension ({init.shape[0]})"
        )
    return init


def _record(
    stats: dict[str, torch.Tensor], i: int, step: dict[str, torch.Tensor], nonfinite: torch.Tensor
) -> None:
    """Write one draw's statistics into row ``i`` of the ``(num_samples, C)`` tensors."""
    stats["acceptance_rate"][i] = step["accept_prob"]
    stats["step_size"][i] = step["step_size"]
    stats["diverging"][i] = step["diverging"]
    stats["energy"][i] = step["energy"]
    stats["lp"][i] = -step["potential"]
    stats["n_steps"][i] = step["num_steps"]
    stats["nonfinite"][i] = nonfinite


#: divergent transitions per sampling transition below which the advice calls them rare
RARE_DIVERGENCES = 1e-3


def summarize(idata: az.InferenceData) -> dict[str, Any]:
    """The headline numbers of a run of [`sample`][pyroflows.mcmc.sample], with divergences and
    non-finite energies put in context and an advice string a command line can print.

    Args:
        idata: the result of [`sample`][pyroflows.mcmc.sample] (energy or model path).

    Returns:
        ``min_ess`` (the smallest bulk ESS over every coordinate of every variable),
        ``min_ess_per_second``, ``max_rhat``, ``acceptance_rate``; ``divergences`` (sampling
        transitions that diverged, all chains), ``divergence_rate`` (per sampling transition),
        ``diverging_chains`` (chains with at least one), ``warmup_divergences`` (discarded with the
        warm-up: adaptation tries step sizes that are too large on purpose); ``nonfinite``
        (proposals rejected for a non-finite energy, warm-up included) and ``nonfinite_rate``;
        the energy-evaluation counts; and ``advice``: one or more sentences on whether the numbers
        are a problem and what to do.
    """
    posterior, stats, attrs = idata.posterior, idata.sample_stats, idata.attrs
    num_chains, num_draws = posterior.sizes["chain"], posterior.sizes["draw"]
    ess = float(min(float(v.min()) for v in az.ess(idata).data_vars.values()))
    rhat = float("nan")
    if num_chains > 1:
        rhat = float(max(float(v.max()) for v in az.rhat(idata).data_vars.values()))
    diverging = stats["diverging"].values
    transitions = num_chains * num_draws * int(attrs.get("thinning", 1))
    warmup_transitions = num_chains * int(attrs.get("warmup_steps", 0))
    divergences = int(diverging.sum())
    nonfinite = int(stats["nonfinite"].sum()) + int(attrs.get("warmup_nonfinite", 0))
    out = {
        "min_ess": ess,
        "min_ess_per_second": ess / attrs["sampling_time"],
        "max_rhat": rhat,
        "acceptance_rate": float(stats["acceptance_rate"].mean()),
        "divergences": divergences,
        "divergence_rate": divergences / transitions,
        "diverging_chains": int(diverging.any(axis=1).sum()),
        "warmup_divergences": int(attrs.get("warmup_divergences", 0)),
        "nonfinite": nonfinite,
        "nonfinite_rate": nonfinite / (transitions + warmup_transitions),
        "sampling_time": float(attrs["sampling_time"]),
        "num_energy_evals": int(attrs["num_energy_evals"]),
        "num_energy_calls": int(attrs["num_energy_calls"]),
    }
    out["advice"] = _advice(out, num_chains)
    return out


def _advice(m: dict[str, Any], num_chains: int) -> str:
    """What the numbers of [`summarize`][pyroflows.mcmc.summarize] mean for the user."""
    notes = []
    where = f"in {m['diverging_chains']} of {num_chains} chains"
    rate = f"{100 * m['divergence_rate']:.2g}% of sampling transitions"
    if m["divergences"] == 0:
        notes.append("No divergent transitions after warm-up.")
    elif m["divergence_rate"] < RARE_DIVERGENCES:
        notes.append(
            f"{m['divergences']} divergent transitions ({rate}, {where}): rare, estimates are "
            "probably fine; raise target_accept_prob (e.g. 0.9) to make sure."
        )
    else:
        notes.append(
            f"{m['divergences']} divergent transitions ({rate}, {where}): the sampler misses "
            "regions of high curvature, so estimates may be biased; raise target_accept_prob "
            "(0.9 to 0.95), lengthen the warm-up, or reparameterise (e.g. non-centred)."
        )
    if m["warmup_divergences"]:
        notes.append(
            f"The {m['warmup_divergences']} divergences during warm-up were discarded with it "
            "(adaptation tries large steps on purpose)."
        )
    if m["nonfinite"]:
        notes.append(
            f"{m['nonfinite']} proposals ({100 * m['nonfinite_rate']:.2g}% of all transitions) "
            "met a non-finite or invalid energy and were rejected: harmless when rare; if "
            "frequent, check the energy for overflow or a support constraint."
        )
    if m["max_rhat"] > 1.01:
        notes.append(
            f"Max R-hat {m['max_rhat']:.3f} > 1.01: the chains disagree; run a longer warm-up."
        )
    return " ".join(notes)
