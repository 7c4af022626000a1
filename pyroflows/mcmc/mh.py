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
the target (by ``AutoFlow``, by `pyroflows.infer.distill`, or here: with ``refit_every``
the flow is refitted by maximum likelihood on the chains' recent states during warm-up) makes
a fast sampler whose acceptance rate measures the fit.

References: Hastings (1970); Roberts, Gelman & Gilks (1997), *Weak convergence and optimal
scaling of random walk Metropolis algorithms*; Haario, Saksman & Tamminen (2001), *An adaptive
Metropolis algorithm*; Tierney (1994), *Markov chains for exploring posterior distributions*.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pyroflows.mcmc.adapt import WindowAdaptation
from pyroflows.mcmc.base import BatchedKernel, RunState, Warmup
from pyroflows.mcmc.core import (
    Energy,
    Info,
    MHState,
    draw_with,
    independence_step,
    random_walk_step,
)
from pyroflows.validation import check_int, check_positive, check_probability


class MHParams(NamedTuple):
    """The random walk's scale $s$ and diagonal variance $\\sigma^2$ (proposal sd $s\\sigma$)."""

    scale: torch.Tensor
    variance: torch.Tensor


class RefitState(NamedTuple):
    """Flow-proposal warm-up: the chains' states since the last refit, and the steps done."""

    recent: tuple
    t: int


class MH(BatchedKernel):
    """Batched Metropolis–Hastings: adaptive random walk, or a flow independence proposal.

    Args:
        energy: batched energy $U$ (no gradient needed).
        proposal: ``None`` for the random walk, or a [`Flow`][pyroflows.Flow] (any object with
            ``sample(sample_shape)`` and ``log_prob(x)`` works) on the chains' device and dtype.
            A `Flow` draws from the run's generator; other objects draw from torch's global one.
        scale: the random walk's initial scale $s$ (default $2.38 / \\sqrt{d}$).
        adapt_scale: tune $s$ during warm-up.
        adapt_covariance: tune the diagonal proposal variance during warm-up.
        target_accept_prob: acceptance rate aimed at (default 0.234, or 0.44 in 1-D).
        refit_every: with a flow proposal, refit it every this many warm-up steps on the chains'
            states since the last refit (``None``: never). The refit trains the flow in place.
        refit_steps: optimiser steps of each refit ([`fit`][pyroflows.infer.fit.fit]).
        refit_lr: learning rate of each refit.
        model: a Pyro model instead of an energy (keyword only).

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
        has = lambda name: callable(getattr(proposal, name, None))  # noqa: E731
        if proposal is not None and not (has("sample") and has("log_prob")):
            raise TypeError(
                "proposal must be a Flow (or have sample() and log_prob()), "
                f"got {type(proposal).__name__}"
            )
        if refit_every is not None:
            check_int(refit_every, "refit_every")
            check_int(refit_steps, "refit_steps")
            check_positive(refit_lr, "refit_lr")
            from pyroflows.flow import Flow

            if not isinstance(proposal, Flow):
                raise ValueError("refit_every needs a pyroflows Flow as the proposal")
        super().__init__(energy, model=model)
        self.proposal, self.scale = proposal, scale
        self.refit_every, self.refit_steps, self.refit_lr = refit_every, refit_steps, refit_lr
        self.target_accept_prob = target_accept_prob
        self.adapt_scale, self.adapt_covariance = bool(adapt_scale), bool(adapt_covariance)

    # -- pure interface -----------------------------------------------------------------------
    def _init(self, position: torch.Tensor) -> MHState:
        u = self.potential(position, guard=False)
        log_q = self._proposal_log_prob(position) if self.proposal is not None else None
        return MHState(position, u, log_q)

    def default_params(self, state: MHState) -> MHParams | None:
        """The constructor's scale (default $2.38/\\sqrt d$) and unit variances."""
        if self.proposal is not None:
            return None
        x = state.position
        scale = self.scale or 2.38 / math.sqrt(x[0].numel())
        return MHParams(
            torch.as_tensor(scale, dtype=x.dtype, device=x.device), torch.ones_like(x[0])
        )

    def step(
        self, state: MHState, generator: torch.Generator, params: MHParams | None = None
    ) -> tuple[MHState, Info]:
        """One MH transition of every chain (see
        [`BatchedKernel.step`][pyroflows.mcmc.base.BatchedKernel.step])."""
        if self.proposal is not None:
            return independence_step(state, generator, self.potential, self._propose)
        params = params or self.params or self.default_params(state)
        return random_walk_step(
            state, generator, self.potential, params.scale * params.variance.sqrt()
        )

    def init_warmup(
        self, state: MHState, warmup_steps: int, generator: torch.Generator
    ) -> Warmup | None:
        """Scale and variance windows (random walk), or the refit schedule (flow proposal)."""
        if self.proposal is not None:
            if self.refit_every is None:
                return None
            return Warmup(_RefitSchedule(warmup_steps), RefitState((), 0))
        dim = state.position[0].numel()
        target = self.target_accept_prob or (0.44 if dim == 1 else 0.234)
        adapter = WindowAdaptation(warmup_steps, target, self.adapt_scale, self.adapt_covariance)
        params = self.default_params(state)
        return Warmup(adapter, adapter.init(params.scale, params.variance))

    def adapt(
        self,
        warmup: Warmup,
        before: MHState,
        after: MHState,
        info: Info,
        generator: torch.Generator,
    ) -> tuple[Warmup, MHState]:
        """One warm-up step (see
        [`BatchedKernel.adapt`][pyroflows.mcmc.base.BatchedKernel.adapt])."""
        if isinstance(warmup.adapter, WindowAdaptation):
            state, _ = warmup.adapter.update(warmup.state, after.position, info.accept_prob)
            return Warmup(warmup.adapter, state), after
        recent, t = (*warmup.state.recent, after.position), warmup.state.t + 1
        if len(recent) == self.refit_every:
            self._refit(torch.cat(recent))
            after, recent = after._replace(log_q=self._proposal_log_prob(after.position)), ()
        return Warmup(warmup.adapter, RefitState(recent, t)), after

    def warmup_params(self, warmup: Warmup, final: bool = False) -> MHParams | None:
        """The random walk's scale and variance now (``final``: for sampling)."""
        if not isinstance(warmup.adapter, WindowAdaptation):
            return None
        state = warmup.state
        scale = (
            state.dual.log_avg.exp()
            if final and warmup.adapter.adapt_step_size
            else state.step_size
        )
        return MHParams(scale, state.variance)

    def _stats(self, run: RunState, info: Info) -> dict[str, torch.Tensor]:
        if run.params is None:
            return {}
        u = run.chains.energy
        return {"step_size": run.params.scale.to(u).expand_as(u)}

    # -- the proposal ---------------------------------------------------------------------------
    def _propose(
        self, like: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pyroflows.flow import Flow

        flow = self.proposal
        with torch.no_grad():
            if isinstance(flow, Flow):
                shape = (like.shape[0], *flow.event_shape)
                loc = flow.base_loc
                noise = torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)
                z = loc + flow.base_scale * noise
                x, ladj = flow.forward_and_log_det(z)
                log_q = flow.base_dist().log_prob(z) - ladj
            else:  # any object with sample() draws from the global generator: fork it
                x = draw_with(generator, lambda: flow.sample((like.shape[0],)), like.device)
                log_q = self._proposal_log_prob(x)
        if x.shape != like.shape or x.dtype != like.dtype or x.device != like.device:
            raise ValueError(
                f"proposal samples are {tuple(x.shape)} {x.dtype} on {x.device}; the chains are "
                f"{tuple(like.shape)} {like.dtype} on {like.device}"
            )
        return x, log_q

    def _proposal_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_q = self.proposal.log_prob(x)
        if log_q.shape != x.shape[:1]:
            raise ValueError(
                f"proposal.log_prob must return shape ({x.shape[0]},) for the chains, "
                f"got {tuple(log_q.shape)}"
            )
        return log_q

    def _refit(self, data: torch.Tensor) -> None:
        from pyroflows.infer import fit

        with torch.enable_grad():
            fit(
                self.proposal,
                data,
                num_steps=self.refit_steps,
                lr=self.refit_lr,
                batch_size=min(256, len(data)),
                validation=0.0,
                progress=False,
            )


class _RefitSchedule:
    """The flow proposal's warm-up configuration: its length (the state counts refits)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
