r"""Gibbs sampling over a batch of chains: exact coordinate updates for discrete energies,
Metropolis-within-Gibbs for continuous ones, or user-supplied block conditionals.

One transition is one systematic sweep over the coordinates of
the (flattened) event.

**Discrete** (``support`` given, the $K$ values every coordinate takes). Coordinate $i$ is drawn
from its exact conditional

$$
p(x_i = v \mid x_{-i}) = \frac{e^{-U(x_{-i}, v)}}{\sum_{w} e^{-U(x_{-i}, w)}},
$$

evaluating the energy at all $K$ values of all chains in one batched call of shape
``(num_chains, K, *event)``. A value whose energy is not finite gets probability 0 and is
counted.

**Continuous** (``support=None``): coordinate $i$ moves by a Gaussian random walk of scale
$s_i$ with its own Metropolis accept/reject (Metropolis-within-Gibbs); the per-coordinate scales
are tuned during warm-up by dual averaging towards acceptance 0.44.

**Conditionals** (``conditionals=[f_1, ..., f_B]``): each $f_b(x)$ returns ``x`` with block $b$
redrawn from its exact conditional (e.g. hidden then visible units of an RBM); a sweep applies
them in order. The energy only feeds the statistics (a chain whose new state has a non-finite
energy keeps its old state and is counted).

Reference: Geman & Geman (1984), *Stochastic relaxation, Gibbs distributions, and the Bayesian
restoration of images*; Gilks, Best & Tan (1995) for Metropolis-within-Gibbs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pyroflows.mcmc.adapt import WindowAdaptation
from pyroflows.mcmc.base import BatchedKernel, RunState, Warmup
from pyroflows.mcmc.core import Energy, metropolis, randn_like, select
from pyroflows.validation import check_positive


class GibbsState(NamedTuple):
    """Chains of [`Gibbs`][pyroflows.mcmc.Gibbs]: positions and energies."""

    position: torch.Tensor
    energy: torch.Tensor


class GibbsInfo(NamedTuple):
    """One sweep, per chain: mean acceptance over the coordinates (1 for exact updates), the
    per-coordinate acceptance ``(C, n)`` (Metropolis-within-Gibbs; else ``None``), and the
    number of non-finite values met."""

    accept_prob: torch.Tensor
    coordinate_accept_prob: torch.Tensor | None
    nonfinite: torch.Tensor


class Gibbs(BatchedKernel):
    """Batched Gibbs sampler (see the module docs for the three modes).

    Args:
        energy: batched energy $U$.
        support: 1-D tensor of the values every coordinate takes (discrete mode), or ``None``.
        conditionals: block samplers ``f(x) -> x`` (conditional mode), or ``None``. They draw
            from torch's global generator (they are the user's code).
        scale: initial random-walk scale of every coordinate (continuous mode).
        adapt_scale: tune the per-coordinate scales during warm-up (continuous mode).
        model: not supported (a ``TypeError`` saying which kernels take models).

    Example:
        >>> from pyroflows import energies, mcmc
        >>> ising = energies.get("ising")
        >>> kernel = mcmc.Gibbs(ising, support=torch.tensor([-1.0, 1.0]))
        >>> init = torch.randint(0, 2, (64, 3, 3)).float() * 2 - 1
        >>> idata = mcmc.sample(kernel, init, 200, warmup_steps=50, progress=False)
    """

    def __init__(
        self,
        energy: Energy,
        support: torch.Tensor | None = None,
        conditionals: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
        scale: float = 1.0,
        adapt_scale: bool = True,
        *,
        model: Callable | None = None,
    ) -> None:
        if model is not None:
            raise TypeError(
                "Gibbs does not sample Pyro models: for continuous latent sites use "
                "HMC(model=...), MH(model=...) or SGLD(model=...); discrete latent sites are "
                "not supported by the model path yet"
            )
        if support is not None:
            if (
                not isinstance(support, torch.Tensor)
                or support.dim() != 1
                or len(support) < 2
                or not support.is_floating_point()
            ):
                raise ValueError("support must be a 1-D floating-point tensor of at least 2 values")
            if not torch.isfinite(support).all() or len(support.unique()) != len(support):
                raise ValueError("support must hold distinct finite values")
        if conditionals is not None:
            if support is not None:
                raise ValueError("give either support or conditionals, not both")
            conditionals = list(conditionals)
            if not conditionals or not all(callable(f) for f in conditionals):
                raise TypeError("conditionals must be a non-empty sequence of callables x -> x")
        self.scale = check_positive(scale, "scale")
        super().__init__(energy)
        self.support, self.conditionals, self.adapt_scale = support, conditionals, bool(adapt_scale)

    @property
    def mode(self) -> str:
        """``"discrete"``, ``"conditionals"`` or ``"continuous"``."""
        if self.conditionals:
            return "conditionals"
        return "discrete" if self.support is not None else "continuous"

    # -- pure interface -----------------------------------------------------------------------
    def _init(self, position: torch.Tensor) -> GibbsState:
        if self.mode == "discrete" and not torch.isin(position, self.support.to(position)).all():
            raise ValueError("init must take values in support only")
        return GibbsState(position, self.potential(position, guard=False))

    def default_params(self, state: GibbsState) -> torch.Tensor | None:
        """Continuous mode: every coordinate's random-walk scale (the constructor's)."""
        if self.mode != "continuous":
            return None
        return torch.full_like(state.position[0].flatten(), self.scale)

    def step(
        self, state: GibbsState, generator: torch.Generator, params: torch.Tensor | None = None
    ) -> tuple[GibbsState, GibbsInfo]:
        """One sweep of every chain (see
        [`BatchedKernel.step`][pyroflows.mcmc.base.BatchedKernel.step])."""
        if self.mode == "discrete":
            return self._discrete_sweep(state, generator)
        if self.mode == "conditionals":
            return self._conditional_sweep(state, generator)
        scales = params if params is not None else self.params
        return self._metropolis_sweep(
            state, generator, scales if scales is not None else self.default_params(state)
        )

    def init_warmup(
        self, state: GibbsState, warmup_steps: int, generator: torch.Generator
    ) -> Warmup | None:
        """Continuous mode: per-coordinate scales by dual averaging towards acceptance 0.44."""
        if self.mode != "continuous" or not self.adapt_scale:
            return None
        adapter = WindowAdaptation(warmup_steps, 0.44, True, False)
        scales = self.default_params(state)
        return Warmup(adapter, adapter.init(scales, torch.ones_like(state.position[0])))

    def adapt(
        self,
        warmup: Warmup,
        before: GibbsState,
        after: GibbsState,
        info: GibbsInfo,
        generator: torch.Generator,
    ) -> tuple[Warmup, GibbsState]:
        """One warm-up step of the per-coordinate scales."""
        state, _ = warmup.adapter.update(warmup.state, after.position, info.coordinate_accept_prob)
        return Warmup(warmup.adapter, state), after

    def warmup_params(self, warmup: Warmup, final: bool = False) -> torch.Tensor:
        """The per-coordinate scales now (``final``: for sampling)."""
        return warmup.state.dual.log_avg.exp() if final else warmup.state.step_size

    def _stats(self, run: RunState, info: GibbsInfo) -> dict[str, torch.Tensor]:
        if run.params is None:
            return {}
        u = run.chains.energy
        return {"step_size": run.params.to(u).mean().expand_as(u)}

    # -- sweeps -----------------------------------------------------------------------------
    def _discrete_sweep(
        self, state: GibbsState, generator: torch.Generator
    ) -> tuple[GibbsState, GibbsInfo]:
        x, u = state
        num_chains, event = x.shape[0], x.shape[1:]
        values = self.support.to(x)
        flat = x.reshape(num_chains, -1).clone()
        nonfinite = torch.zeros_like(u, dtype=torch.long)
        for i in range(flat.shape[1]):
            candidates = flat[:, None, :].repeat(1, len(values), 1)
            candidates[:, :, i] = values
            energies = self.potential(candidates.reshape(num_chains, len(values), *event))
            finite = torch.isfinite(energies)
            nonfinite += (~finite).sum(1)
            logits = torch.where(finite, -energies, -math.inf)
            uniform = torch.rand(
                logits.shape, generator=generator, device=x.device, dtype=logits.dtype
            )
            k = (logits - torch.log(-torch.log(uniform.clamp_min(1e-30)))).argmax(1)
            flat[:, i] = values[k]
            u = energies.gather(1, k[:, None])[:, 0]
        return GibbsState(flat.reshape(x.shape), u), GibbsInfo(torch.ones_like(u), None, nonfinite)

    def _metropolis_sweep(
        self, state: GibbsState, generator: torch.Generator, scales: torch.Tensor
    ) -> tuple[GibbsState, GibbsInfo]:
        x, u = state
        flat_shape = (x.shape[0], -1)
        accept_probs, nonfinite = [], torch.zeros_like(u, dtype=torch.long)
        for i in range(scales.numel()):
            proposal = x.reshape(flat_shape).clone()
            proposal[:, i] += scales[i] * randn_like(proposal[:, i], generator)
            proposal = proposal.reshape(x.shape)
            u_new = self.potential(proposal)
            decision = metropolis(generator, proposal, u_new, u - u_new)
            x = select(decision.accepted, proposal, x)
            u = torch.where(decision.accepted, u_new, u)
            accept_probs.append(decision.accept_prob)
            nonfinite += decision.nonfinite
        accept_prob = torch.stack(accept_probs, 1)
        return GibbsState(x, u), GibbsInfo(accept_prob.mean(1), accept_prob, nonfinite)

    def _conditional_sweep(
        self, state: GibbsState, generator: torch.Generator
    ) -> tuple[GibbsState, GibbsInfo]:
        x = state.position
        for f in self.conditionals:
            x = f(x)
            if not isinstance(x, torch.Tensor) or x.shape != state.position.shape:
                got = getattr(x, "shape", type(x).__name__)
                raise ValueError(
                    "a conditional must return the chains' shape "
                    f"{tuple(state.position.shape)}, got {got}"
                )
        u = self.potential(x)
        decision = metropolis(generator, x, u, torch.zeros_like(u))
        new = GibbsState(
            select(decision.accepted, x, state.position),
            torch.where(decision.accepted, u, state.energy),
        )
        return new, GibbsInfo(torch.ones_like(u), None, decision.nonfinite)
