"""``fit_guide``: the SVI loop the CLI, the benchmark and the tutorials share, for any guide."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

from pyroflows.registry import _positive_int


def fit_guide(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int = 2000,
    lr: float = 1e-2,
    final_lr: float = 1e-3,
    num_particles: int = 64,
    elbo: ELBO | None = None,
    clip_norm: float = 10.0,
    anneal_steps: int = 0,
    progress: bool = True,
    seed: int | None = None,
    **kwargs: Any,
) -> dict[str, list[float]]:
    """Train ``guide`` for ``model`` by SVI with Adam, the learning rate decaying geometrically.

    Args:
        model: a Pyro model.
        guide: its guide (any autoguide, :class:`~pyroflows.guides.AutoFlow` included).
        *args: the model's and guide's arguments.
        num_steps: optimiser steps.
        lr: initial learning rate.
        final_lr: learning rate at the last step.
        num_particles: vectorised particles per ELBO estimate (ignored when ``elbo`` is given).
        elbo: the objective (default ``Trace_ELBO(num_particles, vectorize_particles=True)``);
            e.g. ``RenyiELBO(alpha=0, num_particles=K)`` for the IWAE bound.
        clip_norm: gradient-norm clip of Pyro's ``ClippedAdam``.
        anneal_steps: temper the model's log-density by $\\beta$ rising linearly from 0.01 to 1
            over the first ``anneal_steps`` steps (Rezende & Mohamed 2015): the guide then
            fits $p^\\beta$, broad at first, which keeps reverse-KL training from dropping modes.
        progress: show a tqdm progress bar.
        seed: seed of Pyro's, torch's and numpy's global RNGs.
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        ``{"loss": [...]}``, the negative ELBO estimate at each step (of the tempered model
        during annealing).

    Example:
        >>> from pyroflows import energies
        >>> from pyroflows.guides import AutoFlow
        >>> target = energies.get("banana")
        >>> guide = AutoFlow(target.model, flow="realnvp")
        >>> history = fit_guide(target.model, guide, num_steps=100, progress=False)
    """
    _positive_int(num_steps, "num_steps")
    _positive_int(num_particles, "num_particles")
    if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
        raise ValueError(f"anneal_steps must be a non-negative int, got {anneal_steps!r}")
    for name, value in (("lr", lr), ("final_lr", final_lr), ("clip_norm", clip_norm)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    decay = (final_lr / lr) ** (1 / num_steps)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": clip_norm})
    loss = elbo if elbo is not None else Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    beta = 1.0

    def tempered(*args: Any, **kwargs: Any) -> Any:
        with poutine.scale(scale=beta):
            return model(*args, **kwargs)

    svi = SVI(tempered, guide, optim, loss)
    history: dict[str, list[float]] = {"loss": []}
    bar = tqdm(range(num_steps), disable=not progress, desc="svi", dynamic_ncols=True)
    for step in bar:
        beta = min(1.0, 0.01 + 0.99 * step / anneal_steps) if anneal_steps else 1.0
        value = svi.step(*args, **kwargs)
        history["loss"].append(value)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4f}")
    bar.close()
    return history

