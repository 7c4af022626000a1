r"""The pure core of the samplers: explicit chain states and transitions, BlackJAX style.

A transition is a function ``(state, generator, ...) -> (state, info)`` over
`NamedTuple` states whose tensors hold **all** chains (leading dimension
``C``). It draws random numbers only from the ``torch.Generator`` it is given, changes nothing
outside its return value, and never reads a tensor back to the host: acceptance, divergence and
non-finite flags stay tensors, so a transition queues work on an accelerator without waiting
for it. The kernel classes ([`HMC`][pyroflows.mcmc.HMC], [`MH`][pyroflows.mcmc.MH],
[`SGLD`][pyroflows.mcmc.SGLD], [`Gibbs`][pyroflows.mcmc.Gibbs]) bind these functions to their
hyper-parameters and adapt them (see `pyroflows.mcmc.adapt`); Pyro's ``MCMCKernel`` interface is
a thin layer on top.

**Energies that raise.** A proposal far in the tails can make an energy built from
``torch.distributions`` fail its argument validation (``ValueError: Expected parameter loc ...
to satisfy the constraint Real()``). [`EnergyFunction`][pyroflows.mcmc.core.EnergyFunction]
treats such a proposal like one with a non-finite energy. On that error the batch is evaluated
once more with validation switched off for that one call (``pyro.validation_enabled(False)``;
the user's setting is restored at once): rows it makes non-finite are the failing chains. The
remaining rows are evaluated again with validation on; should one of them still raise (an
invalid parameter that happened to give a finite value), halving the batch isolates it. Failing
chains get energy NaN, so the accept step rejects and counts them. This costs two extra calls in
the usual case, only on the step where it happens. The starting points are evaluated without
this guard, so a systematic error surfaces with its own message.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pyro
import torch

Energy = Callable[[torch.Tensor], torch.Tensor]

#: phrases of torch's and Pyro's distribution argument / support validation errors
_VALIDATION_PHRASES = ("to satisfy the constraint", "to be within the support")


def warn_fallback(failure: str, error: Exception, consequence: str, stacklevel: int) -> None:
    """One ``RuntimeWarning``: ``failure`` (with the error's type and first 200 characters),
    then what the sampler does instead; ``stacklevel`` counts from the caller."""
    reason = " ".join(str(error).split())[:200]
    warnings.warn(
        f"{failure} ({type(error).__name__}: {reason}); {consequence}",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def is_validation_error(error: BaseException) -> bool:
    """Whether ``error`` is a ``torch.distributions`` argument or support validation error."""
    return isinstance(error, ValueError) and any(p in str(error) for p in _VALIDATION_PHRASES)


def is_rejectable(error: BaseException) -> bool:
    """Whether ``error`` says some chain's point has no finite density (a proposal to reject):
    a validation error, or a linear-algebra failure (a Cholesky factor of a matrix that is not
    positive definite there; Stan rejects such a point too)."""
    return is_validation_error(error) or isinstance(error, torch.linalg.LinAlgError)


class EnergyFunction:
    """A batched energy with its shape check, call counters and the validation-error guard.

    Args:
        energy: ``energy(x) -> Tensor[batch]`` for ``x`` of shape ``(*batch, *event)``; when it
            has a ``value_and_grad(x) -> (U, grad U)`` method (as
            [`ModelPotential`][pyroflows.mcmc.ModelPotential]), gradients come from that.
        event_dim: the number of event dimensions of ``x``.
    """

    def __init__(self, energy: Energy, event_dim: int) -> None:
        self.energy, self.event_dim = energy, event_dim
        # an energy object with its own value_and_grad (a model's potential) fuses the two
        self._fused = getattr(energy, "value_and_grad", None)
        self.num_calls = 0
        self.num_evals = 0

    def __call__(self, x: torch.Tensor, *, guard: bool = True) -> torch.Tensor:
        """$U(x)$, shape ``x.shape[:-event_dim]``; rows whose evaluation fails validation: NaN."""
        return self._guarded(x, False, guard)

    def value_and_grad(
        self, x: torch.Tensor, *, guard: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """$U(x)$ and $\\nabla U(x)$ (NaN for rows whose evaluation fails validation)."""
        return self._guarded(x, True, guard)

    def traced(self, x: torch.Tensor) -> Callable | None:
        """The energy's replayed graph for inputs like ``x``, ``graph(x) -> (U, grad U)``, where
        the energy offers one (a model's potential: `pyroflows.mcmc.replay`), else ``None``."""
        traced = getattr(self.energy, "traced", None)
        return None if traced is None else traced(x)

    def count(self, x: torch.Tensor, calls: int) -> None:
        """Record ``calls`` evaluations at points shaped like ``x`` made outside this object
        (a compiled trajectory runs the energy's graph itself)."""
        self.num_calls += calls
        self.num_evals += calls * x.shape[: x.dim() - self.event_dim].numel()

    def _evaluate(self, x: torch.Tensor, with_grad: bool):
        if not with_grad:
            with torch.no_grad():
                return self._checked(x)
        if self._fused is not None:  # the energy computes both in one pass
            u, g = self._fused(x)
            self._count(x, u)
            return u, g
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = self._checked(xg)
            (g,) = torch.autograd.grad(u.sum(), xg)
        return u.detach(), g

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        u = self.energy(x)
        self._count(x, u)
        return u

    def _count(self, x: torch.Tensor, u: torch.Tensor) -> None:
        batch = x.shape[: x.dim() - self.event_dim]
        if not isinstance(u, torch.Tensor) or u.shape != batch:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(
                f"energy must return a tensor of shape {tuple(batch)} (one value per chain) "
                f"for x of shape {tuple(x.shape)}, got {got}"
            )
        self.num_calls += 1
        self.num_evals += batch.numel()

    def _guarded(self, x: torch.Tensor, with_grad: bool, guard: bool):
        try:
            return self._evaluate(x, with_grad)
        except (ValueError, RuntimeError) as error:
            if not guard or not is_rejectable(error):
                raise
        # Find the failing rows: one evaluation with validation off marks the rows it makes
        # non-finite; the rest are re-evaluated with validation on, bisecting if one still fails
        # (all rows when the failure is not a validation error).
        try:
            with pyro.validation_enabled(False):
                out = self._evaluate(x, with_grad)
            u = out[0] if with_grad else out
            good = torch.isfinite(u.reshape(u.shape[0], -1)).all(1)
        except torch.linalg.LinAlgError:
            good = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        result = self._fill(x, with_grad)
        if good.any():
            index = good.nonzero().flatten()
            values = self._bisect(x[index], with_grad)
            for full, part in zip(result, values if with_grad else (values,), strict=True):
                full[index] = part
        return result if with_grad else result[0]

    def _fill(self, x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, ...]:
        u = x.new_full(x.shape[: x.dim() - self.event_dim], math.nan)
        return (u, torch.full_like(x, math.nan)) if with_grad else (u,)

    def _bisect(self, x: torch.Tensor, with_grad: bool):
        try:
            return self._evaluate(x, with_grad)
        except (ValueError, RuntimeError) as error:
            if not is_rejectable(error):
                raise
        if x.shape[0] == 1:  # this chain's point has no finite density: a non-finite energy
            fill = self._fill(x, with_grad)
            return fill if with_grad else fill[0]
        half = x.shape[0] // 2
        parts = [self._bisect(x[:half], with_grad), self._bisect(x[half:], with_grad)]
        if with_grad:
            return tuple(torch.cat(pair) for pair in zip(*parts, strict=True))
        return torch.cat(parts)


def expand_as(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` (``(C,)`` or ``(C, n)``) with trailing singleton dims to broadcast against ``x``."""
    return mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))


def log_accept_prob(log_ratio: torch.Tensor) -> torch.Tensor:
    """$\\log \\min(1, r)$, with NaN (a non-finite proposal) mapped to $-\\infty$."""
    return torch.nan_to_num(log_ratio.clamp(max=0.0), nan=-math.inf)


class Decision(NamedTuple):
    """A per-chain Metropolis–Hastings decision (each ``(C,)``)."""

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    nonfinite: torch.Tensor


def metropolis(
    generator: torch.Generator,
    x_new: torch.Tensor,
    u_new: torch.Tensor,
    log_ratio: torch.Tensor,
) -> Decision:
    """Accept each chain's proposal with probability $\\min(1, e^{r})$.

    A proposal whose energy, log-ratio or value is not finite is rejected and flagged, so no
    chain ever moves to a non-finite value.

    Args:
        generator: the source of the uniform draws.
        x_new: proposals ``(C, *event)``.
        u_new: their energies ``(C,)``.
        log_ratio: log acceptance ratios ``(C,)``.
    """
    finite = (
        torch.isfinite(u_new) & torch.isfinite(x_new.flatten(1)).all(1) & ~torch.isnan(log_ratio)
    )
    log_prob = torch.where(finite, log_accept_prob(log_ratio), -math.inf)
    uniform = torch.rand(
        log_prob.shape, generator=generator, device=log_prob.device, dtype=log_prob.dtype
    )
    return Decision(log_prob.exp(), uniform.log() < log_prob, ~finite)


def select(accepted: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per chain: ``new`` where ``accepted``, else ``old``."""
    return torch.where(expand_as(accepted, new), new, old)


def draw_with(
    generator: torch.Generator, draw: Callable[[], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Run ``draw`` (which samples from torch's global generator, as torch and Pyro
    distributions and ``.sample()`` methods do) under a forked global generator seeded from
    ``generator``: reproducible from the run's generator, the global state left untouched."""
    device = torch.device(device)
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return draw()


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal draws shaped like ``x`` from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def halton(index: int, base: int = 2) -> float:
    """The ``index``-th (from 1) element of the van der Corput sequence in ``base``: a
    low-discrepancy sequence in (0, 1) that jitters trajectory lengths more evenly than uniform
    draws (Hoffman, Radul & Sountsov 2021); computed on the host, it needs no device sync."""
    out, scale = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        out += digit * scale
        scale /= base
    return out


# -- Hamiltonian Monte Carlo ----------------------------------------------------------------
class HMCState(NamedTuple):
    """Chains of [`HMC`][pyroflows.mcmc.HMC]: positions, energies, energy gradients, and the
    number of transitions taken (it indexes the trajectory-length jitter)."""

    position: torch.Tensor
    energy: torch.Tensor
    grad: torch.Tensor
    iteration: int


class HMCInfo(NamedTuple):
    """What one HMC transition did, per chain.

    ``proposal`` and ``velocity`` (the end point and its $M^{-1}p$) feed ChEES adaptation;
    ``hamiltonian`` is $H$ at the state kept; ``energy_error`` is $H' - H$ of the proposal.
    """

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    nonfinite: torch.Tensor
    diverging: torch.Tensor
    hamiltonian: torch.Tensor
    energy_error: torch.Tensor
    proposal: torch.Tensor
    velocity: torch.Tensor
    num_steps: int


def hmc_init(position: torch.Tensor, energy: EnergyFunction) -> HMCState:
    """The HMC state at ``position`` (``(C, *event)``), evaluated without the guard."""
    u, grad = energy.value_and_grad(position, guard=False)
    return HMCState(position, u, grad, 0)


def straggling(energy: torch.Tensor, dim: int, threshold: float = 10.0) -> torch.Tensor:
    """Which chains straggle: $U > \\mathrm{median}(U) + k\\,s$ (or $U$ not finite), with $s$
    the larger of the finite energies' normal-consistent median absolute deviation and
    $\\sqrt{d/2}$ (the standard deviation of $U$ on a $d$-dimensional Gaussian), $k$ =
    ``threshold``. Tensor operations only: no host read-back.

    Args:
        energy: the chains' energies ``(C,)``.
        dim: the dimension $d$ of one chain's state.
        threshold: $k$.
    """
    finite = torch.isfinite(energy)
    # NaN-aware medians over the finite energies (all non-finite: every chain straggles)
    masked = torch.where(finite, energy, math.nan)
    median = masked.nanmedian()
    mad = (masked - median).abs().nanmedian()
    spread = torch.clamp_min(1.4826 * mad, (dim / 2) ** 0.5)
    return ~finite | ~(energy <= median + threshold * spread)


def restart_stragglers(
    state: HMCState, generator: torch.Generator, threshold: float = 10.0
) -> HMCState:
    """Move the [`straggling`][pyroflows.mcmc.core.straggling] chains (energy far above the
    others') onto the positions of randomly drawn other chains (a warm-up move: chains stuck in
    a distant or degenerate region, such as a mixture whose components coincide, would otherwise
    stay there)."""
    u = state.energy
    far = straggling(u, state.position[0].numel(), threshold)
    keep = (~far).nonzero().flatten()
    if keep.numel() == 0 or not bool(far.any()):
        return state
    draw = torch.randint(keep.numel(), u.shape, generator=generator, device=u.device)
    source = torch.where(far, keep[draw], torch.arange(u.shape[0], device=u.device))
    return HMCState(state.position[source], u[source], state.grad[source], state.iteration)


class Metric(NamedTuple):
    """HMC's mass matrix $M$, given by its inverse $\\Sigma = M^{-1}$ (the covariance the chains
    are preconditioned with), diagonal or dense.

    Diagonal: ``inverse_mass`` has the event shape and ``factor`` is its square root. Dense:
    ``inverse_mass`` is ``(D, D)`` over the flattened event ($D$ its size), ``factor`` the
    lower Cholesky factor $L$ ($LL^\\top = \\Sigma$) and ``whitener`` $L^{-1}$, both computed
    once when the metric is built, so a transition only multiplies by them. Build one with
    [`diagonal_metric`][pyroflows.mcmc.core.diagonal_metric] or
    [`dense_metric`][pyroflows.mcmc.core.dense_metric].
    """

    inverse_mass: torch.Tensor
    factor: torch.Tensor
    whitener: torch.Tensor | None

    @property
    def dense(self) -> bool:
        """Whether $M$ is dense."""
        return self.whitener is not None

    def _rows(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """``x`` (``(C, *event)``) with each chain's flattened event multiplied by
        ``matrix`` from the right."""
        return (x.flatten(1) @ matrix).reshape(x.shape)

    def momentum(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """$p \\sim \\mathcal N(0, M)$ per chain: $p = L^{-\\top}\\xi$."""
        xi = randn_like(like, generator)
        return self._rows(xi, self.whitener) if self.dense else xi / self.factor

    def velocity(self, p: torch.Tensor) -> torch.Tensor:
        """$M^{-1} p$ per chain."""
        return self._rows(p, self.inverse_mass) if self.dense else self.inverse_mass * p

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        """$\\tfrac12 p^\\top M^{-1} p = \\tfrac12\\lVert L^\\top p\\rVert^2$ per chain."""
        scaled = self._rows(p, self.factor) if self.dense else self.factor * p
        return 0.5 * scaled.square().flatten(1).sum(1)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """$L^{-1} x$ per chain: coordinates in which $\\Sigma$ is the identity."""
        return self._rows(x, self.whitener.T) if self.dense else x / self.factor


def diagonal_metric(variance: torch.Tensor) -> Metric:
    """The diagonal metric with $M^{-1}$ = ``variance`` (event-shaped)."""
    return Metric(variance, variance.sqrt(), None)


def dense_metric(covariance: torch.Tensor) -> Metric:
    """The dense metric with $M^{-1}$ = ``covariance`` (``(D, D)``, symmetric positive
    definite). Should its Cholesky factorisation fail in the working precision, the diagonal
    alone is used (still in dense form). Reads one flag back from the device."""
    covariance = 0.5 * (covariance + covariance.T)
    factor, info = torch.linalg.cholesky_ex(covariance)
    if bool(info != 0):
        covariance = torch.diag(covariance.diagonal())
        factor = covariance.sqrt()
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    whitener = torch.linalg.solve_triangular(factor, eye, upper=False)
    return Metric(covariance, factor, whitener)


def leapfrog(
    energy: EnergyFunction,
    x: torch.Tensor,
    p: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    metric: Metric,
    num_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_steps`` leapfrog steps from ``(x, p)``: ``(x', p', U(x'), grad U(x'))``."""
    half = 0.5 * step_size
    u = None
    for _ in range(num_steps):
        p = p - half * grad
        x = x + step_size * metric.velocity(p)
        u, grad = energy.value_and_grad(x)
        p = p - half * grad
    return x, p, u, grad


def hmc_step(
    state: HMCState,
    generator: torch.Generator,
    energy: EnergyFunction,
    step_size: torch.Tensor,
    metric: Metric,
    num_steps: int,
    max_energy_error: float,
    integrator: Callable = leapfrog,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition of every chain: fresh momenta, ``num_steps`` leapfrog steps, a
    per-chain accept/reject; a proposal whose energy error exceeds ``max_energy_error`` (or is
    not finite) is a divergence.

    Args:
        state: the chains.
        generator: the source of the momenta and the uniform draws.
        energy: the potential $U$.
        step_size: $\\epsilon$, a scalar or per-chain ``(C, 1, ...)`` tensor.
        metric: the mass matrix.
        num_steps: leapfrog steps $L \\ge 1$.
        max_energy_error: the divergence threshold on $H' - H$.
        integrator: [`leapfrog`][pyroflows.mcmc.core.leapfrog] or a function with its
            signature and result (a compiled trajectory: `pyroflows.mcmc.compiled`).
    """
    x0 = state.position
    p0 = metric.momentum(x0, generator)
    h0 = state.energy + metric.kinetic(p0)
    x, p, u, grad = integrator(energy, x0, p0, state.grad, step_size, metric, num_steps)
    h = u + metric.kinetic(p)
    delta = h - h0
    decision = metropolis(generator, x, u, -delta)
    accepted = decision.accepted
    new = HMCState(
        select(accepted, x, x0),
        torch.where(accepted, u, state.energy),
        select(accepted, grad, state.grad),
        state.iteration + 1,
    )
    info = HMCInfo(
        decision.accept_prob,
        accepted,
        decision.nonfinite,
        ~(delta < max_energy_error),
        torch.where(accepted, h, h0),
        delta,
        x,
        metric.velocity(p),
        num_steps,
    )
    return new, info


# -- random-walk and independence Metropolis–Hastings -----------------------------------------
class MHState(NamedTuple):
    """Chains of [`MH`][pyroflows.mcmc.MH]; ``log_q`` is the independence proposal's density at
    the positions (``None`` for the random walk)."""

    position: torch.Tensor
    energy: torch.Tensor
    log_q: torch.Tensor | None


class Info(NamedTuple):
    """What one transition of a gradient-free kernel (or SGLD) did, per chain."""

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    nonfinite: torch.Tensor


def random_walk_step(
    state: MHState, generator: torch.Generator, energy: EnergyFunction, scale: torch.Tensor
) -> tuple[MHState, Info]:
    """One Gaussian random-walk Metropolis transition, $x' = x + s \\odot \\xi$.

    Args:
        state: the chains.
        generator: the source of the proposals and uniform draws.
        energy: the potential $U$.
        scale: the proposal's standard deviation, broadcastable to ``event_shape``.
    """
    x = state.position + scale * randn_like(state.position, generator)
    u = energy(x)
    decision = metropolis(generator, x, u, state.energy - u)
    accepted = decision.accepted
    new = MHState(select(accepted, x, state.position), torch.where(accepted, u, state.energy), None)
    return new, Info(*decision)


def independence_step(
    state: MHState,
    generator: torch.Generator,
    energy: EnergyFunction,
    propose: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[MHState, Info]:
    """One independence-sampler transition with proposal $q$.

    Args:
        state: the chains, with ``log_q`` at their positions.
        generator: the source of the proposals and uniform draws.
        energy: the potential $U$.
        propose: ``propose(position, generator) -> (x', log q(x'))``, ``x'`` shaped like
            ``position``.
    """
    x, log_q = propose(state.position, generator)
    u = energy(x)
    decision = metropolis(generator, x, u, state.energy - u + state.log_q - log_q)
    accepted = decision.accepted
    new = MHState(
        select(accepted, x, state.position),
        torch.where(accepted, u, state.energy),
        torch.where(accepted, log_q, state.log_q),
    )
    return new, Info(*decision)


# -- stochastic-gradient Langevin dynamics ------------------------------------------------------
class SGLDState(NamedTuple):
    """Chains of [`SGLD`][pyroflows.mcmc.SGLD]: positions, energies, gradients, the RMSprop
    average of squared gradients, and the step counter of the step-size schedule."""

    position: torch.Tensor
    energy: torch.Tensor
    grad: torch.Tensor
    square_avg: torch.Tensor
    iteration: int


def sgld_init(position: torch.Tensor, energy: EnergyFunction) -> SGLDState:
    """The SGLD state at ``position``: the schedule starts at step 0 and $G = I$."""
    u, grad = energy.value_and_grad(position, guard=False)
    return SGLDState(position, u, grad, torch.ones_like(position), 0)


def sgld_step(
    state: SGLDState,
    generator: torch.Generator,
    energy: EnergyFunction,
    step_size: float,
    preconditioned: bool,
    alpha: float,
    eps: float,
) -> tuple[SGLDState, Info]:
    """One (preconditioned) Langevin step of every chain; a new point with a non-finite energy
    or gradient is not taken (``accept_prob`` 0, counted)."""
    if preconditioned:
        square_avg = alpha * state.square_avg + (1 - alpha) * state.grad**2
        precond = 1 / (eps + square_avg.sqrt())
    else:
        square_avg, precond = state.square_avg, 1.0
    noise = randn_like(state.position, generator) * (step_size * precond) ** 0.5
    x = state.position - 0.5 * step_size * precond * state.grad + noise
    u, grad = energy.value_and_grad(x)
    ok = (
        torch.isfinite(u)
        & torch.isfinite(x.flatten(1)).all(1)
        & torch.isfinite(grad.flatten(1)).all(1)
    )
    new = SGLDState(
        select(ok, x, state.position),
        torch.where(ok, u, state.energy),
        select(ok, grad, state.grad),
        select(ok, square_avg, state.square_avg),
        state.iteration + 1,
    )
    return new, Info(ok.to(u.dtype), ok, ~ok)
