r"""Importance weights, importance-sampled log-likelihoods (IWAE bounds) and reverse KL.

With a proposal $q(z)$ and an unnormalised target $\tilde p(z)$ ($p(x, z)$ of a model, or
$e^{-U(z)}$ of an energy), the log weights $\log w_k = \log \tilde p(z_k) - \log q(z_k)$,
$z_k \sim q$, give

$$
\mathcal L_K = \mathbb E\Bigl[\log \frac1K \sum_{k=1}^K w_k\Bigr] \;\le\; \log Z,
\qquad
\mathrm{KL}(q \,\|\, p) = \log Z - \mathbb E_q[\log w],
$$

where $\mathcal L_1$ is the ELBO and $\mathcal L_K$ increases with $K$ towards
$\log Z = \log \int \tilde p$ (Burda, Grosse & Salakhutdinov 2016, *Importance Weighted
Autoencoders*).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights

from pyroflows.validation import check_int


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """$\\log \\frac1K \\sum_k e^{\\log w_k}$ along ``dim``, computed stably.

    Args:
        log_w: log weights.
        dim: the dimension of the $K$ samples.
    """
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """$\\log p(x, z_k) - \\log q(z_k)$ for ``num_samples`` draws of ``guide``, in one
    vectorised run, or one run per draw when model and guide do not broadcast over a plate of
    draws (a model written for one draw, as ``X @ beta``).

    Args:
        model: a Pyro model.
        guide: a Pyro guide for it (e.g. an autoguide that has been trained).
        *args: the model's and guide's arguments.
        num_samples: number of draws $K \\ge 1$.
        max_plate_nesting: the model's plate depth (guessed if ``None``).
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        Tensor of shape ``(num_samples,)``.
    """
    check_int(num_samples, "num_samples")
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting(model, guide, args, kwargs)
    try:
        log_w, _, _ = vectorized_importance_weights(
            model,
            guide,
            *args,
            num_samples=num_samples,
            max_plate_nesting=max_plate_nesting,
            normalized=False,
            **kwargs,
        )
    except (RuntimeError, ValueError, IndexError):
        # a model that does not broadcast over the draws' plate; a genuine error in the model
        # or guide raises again from the one-draw runs
        draws = range(num_samples)
        return torch.stack([_one_log_weight(model, guide, args, kwargs) for _ in draws])
    return log_w


def _one_log_weight(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """$\\log p(x, z) - \\log q(z)$ for one draw $z \\sim q$."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace.log_prob_sum() - guide_trace.log_prob_sum()


def _plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Depth of the deepest vectorised plate in one (unvectorised) run of guide and model."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def reverse_kl(
    model: Callable,
    guide: Callable,
    log_normalizer: float,
    *args: Any,
    num_samples: int = 10_000,
    **kwargs: Any,
) -> tuple[float, float]:
    """$\\mathrm{KL}(q \\,\\|\\, p) = \\log Z - \\mathbb E_q[\\log \\tilde p - \\log q]$ and its
    standard error.

    Args:
        model: a Pyro model whose joint density is $\\tilde p$ (e.g. an energy target's
            ``.model``).
        guide: the variational distribution $q$.
        log_normalizer: $\\log Z = \\log \\int \\tilde p$.
        *args: the model's and guide's arguments.
        num_samples: Monte-Carlo draws from $q$.
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        ``(kl, standard_error)`` in nats.
    """
    log_w = log_importance_weights(model, guide, *args, num_samples=num_samples, **kwargs)
    return (log_normalizer - log_w.mean()).item(), (log_w.std() / math.sqrt(num_samples)).item()
