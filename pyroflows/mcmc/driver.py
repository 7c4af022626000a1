"""``sample``: run a batched kernel and return an ``arviz.InferenceData``."""

from __future__ import annotations

import time
import warnings
from typing import Any

import arviz as az
import numpy as np
import torch
from tqdm.auto import tqdm

from pyroflows.mcmc.base import BatchedKernel

#: per-draw statistics recorded in ``sample_stats`` (arviz names where arviz has one)
STATS = ("acceptance_rate", "step_size", "diverging", "energy", "lp", "nonfinite")


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def sample(
    kernel: BatchedKernel,
    init: torch.Tensor,
    num_samples: int,
    *,
    warmup_steps: int | None = None,
    thinning: int = 1,
    progress: bool = True,
    seed: int | None = None,
) -> az.InferenceData:
    """Run ``kernel`` from ``init`` and collect ``num_samples`` draws of every chain.

    Args:
        kernel: a pyroflows kernel (:class:`HMC`, :class:`SGLD`, :class:`MH`, :class:`Gibbs`).
        init: starting points, ``(num_chains, *event_shape)``; every chain's energy must be finite.
            The draws live on ``init``'s device.
        num_samples: draws kept per chain (after warm-up and thinning).
        warmup_steps: adaptation steps, discarded (default: ``num_samples``, as Pyro does).
        thinning: keep every ``thinning``-th step.
        progress: show a tqdm progress bar with the running acceptance rate.
        seed: seed torch's global generator first (``None``: leave it).

    Returns:
        ``InferenceData`` with ``posterior["x"]`` of dims ``(chain, draw, x_dim_0, ...)`` and
        ``sample_stats``: ``acceptance_rate`` (the MH acceptance probability, 1 for exact
        updates), ``step_size``, ``diverging``, ``energy`` (the target's $U(x)$ — not a
        Hamiltonian), ``lp`` ($-U(x)$) and ``nonfinite`` (proposals rejected for a non-finite
        energy since the previous draw). Its ``attrs`` hold ``sampling_time`` (seconds,
        warm-up included), ``num_energy_calls`` (batched calls), ``num_energy_evals`` (points
        evaluated, summed over chains), ``warmup_nonfinite`` and the kernel's name.
    """
    if not isinstance(kernel, BatchedKernel):
        raise TypeError(f"kernel must be a pyroflows.mcmc kernel, got {type(kernel).__name__}")
    _count(num_samples, "num_samples", 1)
    warmup_steps = num_samples if warmup_steps is None else _count(warmup_steps, "warmup_steps", 0)
    _count(thinning, "thinning", 1)
    if seed is not None:
        torch.manual_seed(seed)
    calls, evals = kernel.num_energy_calls, kernel.num_energy_evals
    start = time.perf_counter()
    kernel.setup(warmup_steps)
    kernel.initial_params = {kernel.site: init}
    params = kernel.initial_params
    draws = init.new_empty((num_samples, *init.shape))
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in STATS}
    nonfinite = torch.zeros(init.shape[0], dtype=torch.long, device=init.device)
    warmup_nonfinite = 0
    total = warmup_steps + num_samples * thinning
    bar = tqdm(range(total), disable=not progress, desc="warmup" if warmup_steps else "sample", leave=False)
    for t in bar:
        params = kernel.sample(params)
        nonfinite += kernel.stats["nonfinite"].long()
        if t == warmup_steps - 1:
            warmup_nonfinite = int(nonfinite.sum())
            nonfinite.zero_()
            bar.set_description("sample")
        kept = t - warmup_steps + 1
        if kept > 0 and kept % thinning == 0:
            i = kept // thinning - 1
            draws[i] = params[kernel.site]
            _record(stats, kernel.stats, nonfinite)
            nonfinite = torch.zeros_like(nonfinite)
        if progress and t % 100 == 0:
            bar.set_postfix(acc=f"{kernel.stats['accept_prob'].mean().item():.2f}")
    elapsed = time.perf_counter() - start
    posterior = {kernel.site: np.swapaxes(draws.detach().cpu().numpy(), 0, 1)}
    sample_stats = {name: torch.stack(values, 1).cpu().numpy() for name, values in stats.items()}
    attrs = {
        "sampling_time": elapsed,
        "num_energy_calls": kernel.num_energy_calls - calls,
        "num_energy_evals": kernel.num_energy_evals - evals,
        "warmup_nonfinite": warmup_nonfinite,
        "kernel": type(kernel).__name__,
        "warmup_steps": warmup_steps,
        "thinning": thinning,
    }
    with warnings.catch_warnings():  # arviz warns whenever chains outnumber draws, our usual case
        warnings.filterwarnings("ignore", message="More chains")
        return az.from_dict(posterior=posterior, sample_stats=sample_stats, attrs=attrs)


def _record(stats: dict[str, list[torch.Tensor]], step: dict[str, torch.Tensor], nonfinite: torch.Tensor) -> None:
    energy = step["energy"]
    step_size = step.get("step_size", torch.full_like(energy, float("nan")))
    stats["acceptance_rate"].append(step["accept_prob"].to(energy))
    stats["step_size"].append(step_size.to(energy).flatten().mean().expand_as(energy))
    stats["diverging"].append(step["diverging"])
    stats["energy"].append(energy)
    stats["lp"].append(-energy)
    stats["nonfinite"].append(nonfinite)


def summarize(idata: az.InferenceData) -> dict[str, float]:
    """The headline numbers of a run of :func:`sample`: ``min_ess`` (the smallest bulk ESS over
    the coordinates), ``min_ess_per_second``, ``max_rhat``, ``acceptance_rate``,
    ``divergences``, ``nonfinite`` and the energy-evaluation counts."""
    ess = float(az.ess(idata, var_names=["x"])["x"].min())
    stats, attrs = idata.sample_stats, idata.attrs
    num_chains = idata.posterior.sizes["chain"]
    rhat = float(az.rhat(idata, var_names=["x"])["x"].max()) if num_chains > 1 else float("nan")
    return {
        "min_ess": ess,
        "min_ess_per_second": ess / attrs["sampling_time"],
        "max_rhat": rhat,
        "acceptance_rate": float(stats["acceptance_rate"].mean()),
        "divergences": int(stats["diverging"].sum()),
        "nonfinite": int(stats["nonfinite"].sum()) + int(attrs["warmup_nonfinite"]),
        "sampling_time": float(attrs["sampling_time"]),
        "num_energy_evals": int(attrs["num_energy_evals"]),
        "num_energy_calls": int(attrs["num_energy_calls"]),
    }
