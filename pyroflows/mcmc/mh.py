r"""Metropolis–Hastings over a batch of chains: adaptive Gaussian random walk, or an independence
sampler whose proposal is a normalizing flow.

**Random walk.** $x' = x + s\,\sigma \odot \xi$, $\xi \sim \mathcal N(0, I)$, accepted with
probability $\min(1, e^{U(x) - U(x')})$. During warm-up the scale $s$ is tuned by dual averaging
towards an acceptance rate of 0.234 (0.44 in one dimension; Roberts, Gelman & Gilks 1997) and
$\sigma^2$ is the chains' pooled diagonal variance, estimated in windows (adaptive Metropolis,
Haario et al. 2001); both are frozen afterwards, so the sampling phase is a valid MH chain.

**Flow independence sampler.** $x' \sim q$ independently of $x$, accepted with probability

$$
\min\Bigl(1, \frac{e^{-U(x')}\, q(x)}{e^{-U(x)}\, q(x')}\Bigr),
$$

using the flow's exact log-density (cached for the current points). It leaves the target
invariant for any $q$ whose support covers it and mixes in one step when $q = p$; a flow fitted to
the target (by ``AutoFlow``, by :func:`pyroflows.infer.distill`, or here: with ``refit_every``
the flow is refitted by maximum likelihood on the chains' recent states during warm-up) makes
a fast sampler whose acceptance rate measures the fit.

References: Hastings (1970); Roberts, Gelman & Gilks (1997), *Weak convergence and optimal
scaling of random walk Metropolis algorithms*; Haario, Saksman & Tamminen (2001), *An adaptive
Metropolis algorithm*; Tierney (1994), *Markov chains for exploring posterior distributions*.
"""

from __future__ import annotations

from collections.abc import Callable

import math
from typing import Any

import torch

from pyroflows.mcmc.adapt import Adapter
from pyroflows.mcmc.base import BatchedKernel, Energy, check_positive, check_probability


class MH(BatchedKernel):
    """Batched Metropolis–Hastings: adaptive random walk, or a flow independence proposal.

    Args:
        energy: batched energy $U$ (no gradient needed).
        proposal: ``None`` for the random walk, or a :class:`~pyroflows.Flow` (any object with
            ``sample(sample_shape)`` and ``log_prob(x)`` works) on the chains' device and dtype.
        scale: the random walk's initial scale $s$ (default $2.38 / \\sqrt{d}$).
        adapt_scale: tune $s$ during warm-up.
        adapt_covariance: tune the diagonal proposal variance during warm-up.
        target_accept_prob: acceptance rate aimed at (default 0.234, or 0.44 in 1-D).
        refit_every: with a flow proposal, refit it every this many warm-up steps on the chains'
            states since the last refit (``None``: never).
        refit_steps: optimiser steps of each refit (:func:`pyroflows.infer.fit`).
        refit_lr: learning rate of each refit.

    Example:
        >>> from pyroflows import energies, mcmc
        >>> kernel = mcmc.MH(energies.get("banana"))
        >>> idata = mcmc.sample(kernel, torch.zeros(256, 2), 500, progress=False)
    """

    def __init__(
        self,
        energy: Energy | None = None,
        proposal: Any = None,
        scale: float | None = None,
        adapt_scale: bool = True,
        adapt_covariance: bool = True,
        target_accept_prob: float | None = None,
        refit_every: int | None = None,
        refit_steps: int = 100,
        refit_lr: float = 1e-3,
        *,
        model: Callable | None = None,
    ) -> None:
        if scale is not None:
            check_positive(scale, "scale")
        if target_accept_prob is not None:
            check_probability(target_accept_prob, "target_accept_prob")
        if proposal is not None and not (callable(getattr(proposal, "sample", None)) and callable(getattr(proposal, "log_prob", None))):
            raise TypeError(f"proposal must be a Flow (or have sample() and log_prob()), got {type(proposal).__name__}")
        if refit_every is not None:
            check_positive(refit_every, "refit_every", int)
            check_positive(refit_steps, "refit_steps", int)
            check_positive(refit_lr, "refit_lr")
            from pyroflows.flow import Flow

            if not isinstance(proposal, Flow):
                raise ValueError("refit_every needs a pyroflows Flow as the proposal")
        super().__init__(energy, model=model)
        self.proposal, self.scale = proposal, scale
        self.refit_every, self.refit_steps, self.refit_lr = refit_every, refit_steps, refit_lr
        self.target_accept_prob = target_accept_prob
        self.adapter = Adapter(1.0, 0.234, adapt_scale, adapt_covariance)

    def _start(self) -> None:
        if self.proposal is not None:
            self.log_q = self._proposal_log_prob(self.x)
            return
        dim = self.x[0].numel()
        self.adapter.initial_step_size = self.scale or 2.38 / math.sqrt(dim)
        self.adapter.target_accept_prob = self.target_accept_prob or (0.44 if dim == 1 else 0.234)

    def _configure(self) -> None:
        self.adapter.configure(self.warmup_steps if self.proposal is None else 0, self.x)
        self._recent: list[torch.Tensor] = []

    def _proposal_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_q = self.proposal.log_prob(x)
        if log_q.shape != x.shape[:1]:
            raise ValueError(f"proposal.log_prob must return shape ({x.shape[0]},) for the chains, got {tuple(log_q.shape)}")
        return log_q

    def _step(self) -> dict[str, torch.Tensor]:
        if self.proposal is None:
            scale = self.adapter.step_size
            x = self.x + scale * self.adapter.variance.sqrt() * self.randn(self.x)
            u = self.evaluate(x)
            accept_prob, _, nonfinite = self.accept(x, u, self.u - u)
            self.adapter.step(self.x, accept_prob)
            return {"accept_prob": accept_prob, "nonfinite": nonfinite, "step_size": scale}
        x = self.proposal.sample((self.x.shape[0],))
        if x.shape != self.x.shape or x.device != self.x.device or x.dtype != self.x.dtype:
            raise ValueError(f"proposal samples are {tuple(x.shape)} {x.dtype} on {x.device}; the chains are {tuple(self.x.shape)} {self.x.dtype} on {self.x.device}")
        u, log_q = self.evaluate(x), self._proposal_log_prob(x)
        accept_prob, _, nonfinite, self.log_q = self.accept(x, u, self.u - u + self.log_q - log_q, (self.log_q, log_q))
        if self.refit_every is not None and self.warming_up:
            self._refit()
        return {"accept_prob": accept_prob, "nonfinite": nonfinite}

    def _refit(self) -> None:
        from pyroflows.infer import fit

        self._recent.append(self.x)
        if len(self._recent) < self.refit_every:
            return
        data, self._recent = torch.cat(self._recent), []
        with torch.enable_grad():
            fit(self.proposal, data, num_steps=self.refit_steps, lr=self.refit_lr, batch_size=min(256, len(data)), validation=0.0, progress=False)
        self.log_q = self._proposal_log_prob(self.x)
