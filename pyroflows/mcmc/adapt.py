r"""Warm-up adaptation as explicit state: every adapter is a configuration object with
``init(...) -> state`` and ``update(state, ...) -> state`` over `NamedTuple`
states, pooled over the batch of chains. Nothing is kept on the kernel, so a second run starts
exactly where a fresh one would.

**Step size.** Dual averaging (Nesterov 2009; Hoffman & Gelman 2014, section 3.2) on
$\log \epsilon$ drives an acceptance statistic $\bar a$ to a target $\delta$ with
$g_t = \delta - \bar a_t$; the iterate is used during warm-up and the running average after it.
With $C$ chains $\bar a_t$ pools $C$ acceptance probabilities, so it is far less noisy than a
single chain's. The update is elementwise, so the same code tunes one scale per coordinate
(Metropolis-within-Gibbs).

**Variance windows** ([`WindowAdaptation`][pyroflows.mcmc.adapt.WindowAdaptation]). Warm-up is
cut like Stan's: a fast initial buffer (15%), slow windows doubling in length, a terminal buffer
(10%). In each slow window a batched Welford estimator (Chan et al.'s pairwise update, one merge per
step for all chains, straggling chains weighted out) accumulates the chains' states; at the window's
end the diagonal variance, shrunk towards $10^{-3}$ as Stan does, becomes the new inverse mass
matrix (HMC) or proposal variance (random-walk MH), and dual averaging restarts from ten times the
current step. For a dense HMC metric the estimator accumulates cross-products per group of chains,
and the pooled covariance is shrunk towards its diagonal as far as the groups' disagreement says its
off-diagonal entries are noise ([`shrunk_covariance`][pyroflows.mcmc.adapt.shrunk_covariance]).

**ChEES** ([`ChEESAdaptation`][pyroflows.mcmc.adapt.ChEESAdaptation]; Hoffman, Radul &
Sountsov 2021). HMC's trajectory length $T$ is tuned by stochastic gradient ascent on $\log T$
using the *change in the estimator of the expected square*,
$\mathrm{ChEES} = \tfrac14 \mathbb E\bigl[(\|z' - \bar z'\|^2 - \|z - \bar z\|^2)^2\bigr]$,
estimated across the chains in the whitened coordinates $z = M^{1/2} x$ and weighted by the
acceptance probabilities (divergent transitions weigh 0). Its time derivative per chain is
$(\|z'-\bar z'\|^2 - \|z-\bar z\|^2)\,(z'-\bar z')\cdot\dot z'$ at the end of a trajectory
jittered to length $hT$ (the integration time $L\epsilon$ actually run). The objective is
$\log \mathrm{ChEES}(hT) - \tfrac12 \log(hT)$, ChEES discounted by the square root of the
trajectory's cost (a cost-aware variant in the spirit of Sountsov & Hoffman's SGA-HMC): plain
ChEES is nearly flat in long trajectories on curved targets such as the banana, where its noisy
ascent drifts to long, costly trajectories, while ChEES per gradient ($-\log hT$) picks
trajectories too short for per-draw mixing on near-Gaussian posteriors such as eight schools;
measurements in ``docs/mcmc.md``. Its gradient in $\log T$,
$hT\,\partial_t\mathrm{ChEES} / \mathrm{ChEES} - \tfrac12$, is formed from running
averages (decay 0.9) of numerator and denominator, a ratio far less noisy with few chains than
per-step ratios; steps are RMSProp-normalised (squared-gradient decay 0.95,
as in TFP's implementation), clipped to $\pm 0.35$ in $\log T$, and $T$ stays within one and
``max_steps`` leapfrog steps, and within ``max_periods`` periods of a Gaussian as wide as the
chains' widest whitened coordinate ($2\pi \cdot$ ``max_periods`` $\cdot \max(1, \max_i
\mathrm{sd}\, z_i)$). Past a few periods ChEES oscillates in $T$, the gradient is mostly noise
and $T$ wanders without coming back: $T$ grown long while the mass matrix was still poor stayed
long on a regression posterior (kidiq) once the matrix was good, 365 leapfrog steps per
transition where 1.5 do. The step size follows dual averaging on the **harmonic mean** of the
acceptance probabilities (a few chains stuck at low acceptance pull it down, unlike the
arithmetic mean), and the (diagonal or dense) mass matrix comes from the chains' pooled variance
or covariance in the same windows as above; at each new mass matrix only dual averaging
restarts. A **per-chain phase** precedes all this (the first ``initial_fraction`` of a warm-up of
100 steps or more): fixed trajectories of ``initial_num_steps`` leapfrog steps, each chain with its
own step size from dual averaging on its own acceptance, so that chains far from the posterior,
whose energies are orders of magnitude larger, neither pin a shared step size nor dominate a pooled
variance. At its end the mass matrix is the chains' squared median absolute deviation
([`robust_variance`][pyroflows.mcmc.adapt.robust_variance]), the shared step starts from the median
per-chain step, $T$ from ``initial_num_steps`` such steps, and the variance windows follow in the
remaining steps. After warm-up, $T$ is the moving average of $\log T$ with weights $t^{-1/2}$ and
$\epsilon$ the dual-averaging average.

References: Hoffman & Gelman (2014), *The No-U-Turn Sampler*, JMLR; Hoffman, Radul & Sountsov
(2021), *An adaptive MCMC scheme for setting trajectory lengths in Hamiltonian Monte Carlo*,
AISTATS; Sountsov & Hoffman (2021), *Focusing on difficult directions for learning HMC trajectory
lengths* (SGA-HMC); Stan Reference Manual, "HMC algorithm parameters"; Chan, Golub & LeVeque
(1983), *Algorithms for computing the sample variance*.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pyroflows.mcmc.core import (
    Metric,
    dense_metric,
    diagonal_metric,
    expand_as,
    straggling,
)


def window_ends(warmup_steps: int) -> tuple[int, list[int]]:
    """The first slow window's start and the steps (1-based counts) at which the slow variance
    windows of a warm-up end (no windows for a warm-up shorter than 20 steps)."""
    if warmup_steps < 20:
        return 0, []
    init, term, base = 75, 50, 25
    if warmup_steps < init + term + base:
        init, term = int(0.15 * warmup_steps), int(0.1 * warmup_steps)
        base = warmup_steps - init - term
    ends, start, size = [], init, base
    while start + size <= warmup_steps - term:
        end = start + size
        if end + 2 * size > warmup_steps - term:  # the next window would not fit: stretch this one
            end = warmup_steps - term
        ends.append(end)
        start, size = end, 2 * size
    return init, ends


# -- dual averaging ----------------------------------------------------------------------------
class DualAveragingState(NamedTuple):
    """Dual averaging of $\\log \\epsilon$: the iterate, its average, the averaged statistic,
    the step count and the shrinkage point $\\mu$."""

    log_step: torch.Tensor
    log_avg: torch.Tensor
    h_avg: torch.Tensor
    t: int
    prox_center: torch.Tensor


def dual_averaging_init(step_size: torch.Tensor, shrink_to: float = 10.0) -> DualAveragingState:
    """Start dual averaging at ``step_size``, shrinking towards ``shrink_to`` times it (Stan:
    10)."""
    log_step = step_size.log()
    center = log_step + math.log(shrink_to)
    return DualAveragingState(log_step, log_step, torch.zeros_like(log_step), 0, center)


def dual_averaging_update(
    state: DualAveragingState,
    statistic: torch.Tensor,
    gamma: float = 0.05,
    t0: float = 10.0,
    kappa: float = 0.75,
) -> DualAveragingState:
    """One dual-averaging step with ``statistic`` $= \\delta - \\bar a$ (Stan's constants)."""
    t = state.t + 1
    eta = 1.0 / (t + t0)
    h_avg = (1 - eta) * state.h_avg + eta * statistic
    log_step = state.prox_center - math.sqrt(t) / gamma * h_avg
    weight = t**-kappa
    log_avg = weight * log_step + (1 - weight) * state.log_avg
    return DualAveragingState(log_step, log_avg, h_avg, t, state.prox_center)


# -- pooled variance ---------------------------------------------------------------------------
class WelfordState(NamedTuple):
    """Running (weighted) count, mean and sum of squared deviations over a stream of batches."""

    count: torch.Tensor | int
    mean: torch.Tensor | None
    m2: torch.Tensor | None


EMPTY_WELFORD = WelfordState(0, None, None)


def welford_update(
    state: WelfordState, batch: torch.Tensor, weight: torch.Tensor | None = None
) -> WelfordState:
    """Merge ``batch`` (``(n, *shape)``) into ``state`` (Chan et al.'s pairwise update).

    Args:
        state: the running estimate.
        batch: the new rows.
        weight: a 0/1 weight per row (``(n,)``; default all ones): rows of weight 0 are left out.
    """
    if weight is None:
        n = batch.shape[0]
        mean_b = batch.mean(0)
        centred = batch - mean_b
    else:
        n = weight.sum()
        w = expand_as(weight, batch).to(batch.dtype)
        mean_b = (w * batch).sum(0) / n.clamp_min(1)
        centred = w * (batch - mean_b)
    m2_b = centred.square().sum(0)
    if state.mean is None:
        return WelfordState(n, mean_b, m2_b)
    total = state.count + n
    delta = mean_b - state.mean
    mean = state.mean + delta * (n / total)
    m2 = state.m2 + m2_b + delta**2 * (state.count * n / total)
    return WelfordState(total, mean, m2)


def welford_variance(state: WelfordState, regularize: bool = True) -> torch.Tensor:
    """The sample variance, shrunk like Stan's: $\\frac{n}{n+5} s^2 + 10^{-3}\\frac{5}{n+5}$."""
    n = torch.as_tensor(state.count, dtype=state.m2.dtype, device=state.m2.device)
    var = state.m2 / (n - 1).clamp_min(1)
    if not regularize:
        return var
    return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


def robust_variance(position: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the squared normal-consistent median absolute deviation of the chains'
    positions ``(C, *event)``: a spread that the chains still far from the rest cannot inflate;
    ``fallback`` where it is zero or not finite."""
    mad = (position - position.median(0).values).abs().median(0).values
    var = (1.4826 * mad) ** 2
    return torch.where(torch.isfinite(var) & (var > 0), var, fallback)


class CovarianceState(NamedTuple):
    """A dense window estimate kept per group of chains (chain $c$ in group $c \\bmod K$):
    weighted counts ``(K,)``, sums ``(K, D)`` and cross-product sums ``(K, D, D)`` of the
    flattened rows less ``shift`` (the window's first mean, for precision)."""

    shift: torch.Tensor | None
    count: torch.Tensor | None
    total: torch.Tensor | None
    cross: torch.Tensor | None


EMPTY_COVARIANCE = CovarianceState(None, None, None, None)

#: the most groups of chains a dense estimate is split into to measure its own noise
COVARIANCE_GROUPS = 8


def covariance_update(
    state: CovarianceState, batch: torch.Tensor, weight: torch.Tensor | None = None
) -> CovarianceState:
    """Add ``batch`` (``(C, *event)``, one row per chain) to a dense window estimate; rows of
    ``weight`` 0 (``(C,)``, default all ones) are left out. The groups are the largest $K \\le 8$
    dividing $C$."""
    x = batch.flatten(1)
    num = x.shape[0]
    groups = next(k for k in range(min(COVARIANCE_GROUPS, num), 0, -1) if num % k == 0)
    w = torch.ones_like(x[:, 0]) if weight is None else weight.to(x.dtype)
    shift = state.shift
    if shift is None:
        shift = (w[:, None] * x).sum(0) / w.sum().clamp_min(1)
    z = (x - shift).reshape(num // groups, groups, -1).transpose(0, 1)  # (K, C / K, D)
    wg = w.reshape(num // groups, groups).T[..., None]
    count, total = wg.sum((1, 2)), (wg * z).sum(1)
    cross = (wg * z).transpose(1, 2) @ z
    if state.shift is not None:
        count, total, cross = count + state.count, total + state.total, cross + state.cross
    return CovarianceState(shift, count, total, cross)


def shrunk_covariance(state: CovarianceState) -> torch.Tensor:
    """The pooled covariance $S$ of a dense window estimate, shrunk towards its diagonal by the
    Ledoit–Wolf intensity $\\lambda = \\sum_{i \\ne j} \\widehat{\\mathrm{Var}}(S_{ij}) /
    \\sum_{i \\ne j} S_{ij}^2$ (clipped to $[0, 1]$) and regularised like Stan's:
    $\\frac{n}{n+5}\\bigl((1-\\lambda) S + \\lambda \\operatorname{diag} S\\bigr)
    + 10^{-3}\\frac{5}{n+5} I$.

    $\\widehat{\\mathrm{Var}}(S_{ij})$ is the spread of the $K$ groups' own covariances over
    $K$: it measures what autocorrelated, heavy-tailed draws really tell (off-diagonal entries that
    are noise, as on a funnel, are dropped; real correlations, as in a regression, are kept).
    With a single group $\\lambda = D / (n + D)$. The diagonal is always the diagonal estimate's.
    """
    n_k = state.count
    n = n_k.sum()
    mean = state.total.sum(0) / n
    cov = (state.cross.sum(0) - n * torch.outer(mean, mean)) / (n - 1).clamp_min(1)
    dim = cov.shape[0]
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    if n_k.shape[0] > 1:
        m_k = state.total / n_k.clamp_min(1)[:, None]
        outer = m_k[:, :, None] * m_k[:, None, :]
        cov_k = (state.cross - n_k[:, None, None] * outer) / (n_k - 1).clamp_min(1)[:, None, None]
        noise = cov_k.var(0) / n_k.shape[0]
        off = 1 - eye
        lam = ((noise * off).sum() / ((cov.square() * off).sum() + 1e-30)).clamp(0, 1)
    else:
        lam = dim / (n + dim)
    shrunk = (1 - lam) * cov + lam * torch.diag(cov.diagonal())
    return (n / (n + 5.0)) * shrunk + 1e-3 * (5.0 / (n + 5.0)) * eye


def window_update(
    state: WelfordState | CovarianceState,
    batch: torch.Tensor,
    weight: torch.Tensor | None,
    dense: bool,
) -> WelfordState | CovarianceState:
    """[`covariance_update`][pyroflows.mcmc.adapt.covariance_update] or
    [`welford_update`][pyroflows.mcmc.adapt.welford_update]."""
    return (covariance_update if dense else welford_update)(state, batch, weight)


def empty_window(dense: bool) -> WelfordState | CovarianceState:
    """The empty window estimate of that kind."""
    return EMPTY_COVARIANCE if dense else EMPTY_WELFORD


def estimate_metric(state: WelfordState | CovarianceState, dense: bool) -> Metric:
    """The HMC metric of a window's estimate: [`dense_metric`][pyroflows.mcmc.core.dense_metric]
    of [`shrunk_covariance`][pyroflows.mcmc.adapt.shrunk_covariance] or
    [`diagonal_metric`][pyroflows.mcmc.core.diagonal_metric] of
    [`welford_variance`][pyroflows.mcmc.adapt.welford_variance]."""
    if dense:
        return dense_metric(shrunk_covariance(state))
    return diagonal_metric(welford_variance(state))


# -- step size and variance in windows --------------------------------------------------------
class WindowState(NamedTuple):
    """Step size (or per-coordinate scales), the variance estimate (a diagonal variance tensor,
    or HMC's [`Metric`][pyroflows.mcmc.core.Metric]), dual averaging, the current window's
    Welford estimate, and the warm-up steps done."""

    step_size: torch.Tensor
    variance: torch.Tensor | Metric
    dual: DualAveragingState
    welford: WelfordState | CovarianceState
    t: int


class WindowAdaptation:
    """Step-size (dual averaging of the mean acceptance) and windowed variance adaptation for
    one warm-up.

    Args:
        warmup_steps: the warm-up's length.
        target_accept_prob: the $\\delta$ that dual averaging aims at.
        adapt_step_size: tune the step size.
        adapt_variance: tune the variance in windows.
        metric: ``None``: the estimate is a diagonal variance tensor (random-walk MH's
            proposal); ``"diag"`` or ``"dense"``: an HMC [`Metric`][pyroflows.mcmc.core.Metric]
            of that kind.
    """

    def __init__(
        self,
        warmup_steps: int,
        target_accept_prob: float,
        adapt_step_size: bool,
        adapt_variance: bool,
        metric: str | None = None,
    ) -> None:
        self.warmup_steps, self.target_accept_prob = warmup_steps, target_accept_prob
        self.adapt_step_size, self.metric = adapt_step_size, metric
        self.first_start, ends = window_ends(warmup_steps) if adapt_variance else (0, [])
        self.ends, self.last_end = frozenset(ends), max(ends, default=0)

    def init(self, step_size: torch.Tensor, variance: torch.Tensor | Metric) -> WindowState:
        """The state at the start of warm-up."""
        dual, empty = dual_averaging_init(step_size), empty_window(self.metric == "dense")
        return WindowState(step_size, variance, dual, empty, 0)

    def update(
        self,
        state: WindowState,
        position: torch.Tensor,
        accept_prob: torch.Tensor,
        energy: torch.Tensor | None = None,
    ) -> tuple[WindowState, bool]:
        """One warm-up step: ``position`` the chains after the move, ``accept_prob`` their
        acceptance probabilities (``(C,)``, or ``(C, n)`` for per-coordinate scales), ``energy``
        their energies (if given, [`straggling`][pyroflows.mcmc.core.straggling] chains are
        left out of the variance estimate).

        Returns:
            the new state and whether a variance window ended at this step (the caller may then
            search a new step size and [`restart`][pyroflows.mcmc.adapt.WindowAdaptation.restart]).
        """
        t = state.t + 1
        step_size, dual = state.step_size, state.dual
        if self.adapt_step_size:
            dual = dual_averaging_update(dual, self.target_accept_prob - accept_prob.mean(0))
            step_size = (dual.log_avg if t == self.warmup_steps else dual.log_step).exp()
        welford, variance = state.welford, state.variance
        if self.first_start < t <= self.last_end:
            weight = None if energy is None else ~straggling(energy, position[0].numel())
            welford = window_update(welford, position, weight, self.metric == "dense")
        ended = t in self.ends
        if ended:
            if self.metric is None:
                variance = welford_variance(welford)
            else:
                variance = estimate_metric(welford, self.metric == "dense")
            welford = empty_window(self.metric == "dense")
        return WindowState(step_size, variance, dual, welford, t), ended

    def restart(self, state: WindowState, step_size: torch.Tensor) -> WindowState:
        """Restart dual averaging from ``step_size`` (after a variance update)."""
        return state._replace(step_size=step_size, dual=dual_averaging_init(step_size))


# -- ChEES ------------------------------------------------------------------------------------
class ChEESState(NamedTuple):
    """ChEES-HMC warm-up: dual averaging of $\\log \\epsilon$, $\\log T$ with its moving
    average and RMSProp's average squared gradient, the running ChEES moments, the metric, its
    window's estimate, and the steps done."""

    dual: DualAveragingState
    log_trajectory: torch.Tensor
    log_trajectory_avg: torch.Tensor
    mean_square: torch.Tensor
    chees_moments: torch.Tensor
    metric: Metric
    welford: WelfordState | CovarianceState
    t: int


#: ChEES's dual averaging shrinks towards this multiple of the step it (re)starts from; Stan's 10
#: makes the first iterates after every restart about 10x too large, which with thousands of
#: chains means thousands of divergent transitions per restart
SHRINK_TO = 1.0


class ChEESAdaptation:
    """Trajectory length, step size and mass matrix for jittered HMC (see the module docs).

    Args:
        warmup_steps: the warm-up's length.
        target_accept_prob: the harmonic-mean acceptance aimed at.
        learning_rate: the RMSProp learning rate on $\\log T$.
        max_steps: the most leapfrog steps one trajectory may take.
        adapt_mass_matrix: tune the mass matrix in windows.
        decay: the moving average's weights are $t^{-\\text{decay}}$.
        initial_num_steps: the leapfrog steps of the per-chain phase's trajectories (and the
            trajectory length ChEES starts from, in step sizes).
        dense: adapt a dense mass matrix (else diagonal).
    """

    #: RMSProp's decay of the squared gradient, and the largest change of $\log T$ per step
    rms_decay, max_log_update = 0.95, 0.35
    #: decay of the running averages of ChEES and its derivative, whose ratio is the gradient
    moment_decay = 0.9
    #: the objective is log ChEES - cost_exponent * log(hT) (1: ChEES per gradient; see the docs)
    cost_exponent = 0.5
    #: the longest trajectory, in periods of a Gaussian as wide as the widest whitened coordinate
    max_periods = 2.0
    #: the share of warm-up in which every chain tunes its own step size on fixed-length
    #: trajectories, aiming at ``initial_accept_prob``
    initial_fraction, initial_accept_prob = 0.2, 0.8

    def __init__(
        self,
        warmup_steps: int,
        target_accept_prob: float,
        learning_rate: float,
        max_steps: int,
        adapt_mass_matrix: bool,
        decay: float = 0.5,
        initial_num_steps: int = 10,
        dense: bool = False,
    ) -> None:
        self.dense = dense
        self.warmup_steps, self.target_accept_prob = warmup_steps, target_accept_prob
        self.initial_num_steps = initial_num_steps
        self.learning_rate, self.max_steps, self.decay = learning_rate, max_steps, decay
        self.shrink_to = SHRINK_TO
        # the per-chain phase: too short a warm-up (or none to adapt) has none
        self.initial_steps = int(self.initial_fraction * warmup_steps) if warmup_steps >= 100 else 0
        self.adapt_mass_matrix = adapt_mass_matrix
        rest = warmup_steps - self.initial_steps
        first, ends = window_ends(rest) if adapt_mass_matrix else (0, [])
        self.first_start = first + self.initial_steps
        ends = [self.initial_steps + end for end in ends]
        self.ends, self.last_end = frozenset(ends), max(ends, default=0)

    def init(self, step_size: torch.Tensor, metric: Metric, num_chains: int) -> ChEESState:
        """Start with one leapfrog step's trajectory, $T = \\epsilon$, and (with a per-chain
        phase) one step size per chain."""
        log_t = step_size.log()
        start = step_size.expand(num_chains).clone() if self.initial_steps else step_size
        dual = dual_averaging_init(start, self.shrink_to)
        zero = torch.zeros_like(log_t)
        moments = torch.zeros((2,), dtype=log_t.dtype, device=log_t.device)
        empty = empty_window(self.dense)
        return ChEESState(dual, log_t, log_t, zero, moments, metric, empty, 0)

    def in_initial_phase(self, state: ChEESState) -> bool:
        """Whether the next transition belongs to the per-chain phase."""
        return state.t < self.initial_steps

    def step_size(self, state: ChEESState, final: bool = False) -> torch.Tensor:
        """$\\epsilon$: the dual-averaging iterate during warm-up (``(C,)`` in the per-chain
        phase), its average at the end."""
        return (state.dual.log_avg if final else state.dual.log_step).exp()

    def trajectory_length(self, state: ChEESState, final: bool = False) -> torch.Tensor:
        """$T$ (its moving average at the end), within $[\\epsilon, L_{max}\\epsilon]$."""
        step = self.step_size(state, final)
        length = (state.log_trajectory_avg if final else state.log_trajectory).exp()
        return torch.minimum(torch.maximum(length, step), self.max_steps * step)

    def update(
        self,
        state: ChEESState,
        initial: torch.Tensor,
        energy: torch.Tensor,
        proposal: torch.Tensor,
        velocity: torch.Tensor,
        accept_prob: torch.Tensor,
        diverging: torch.Tensor,
        length: torch.Tensor,
    ) -> tuple[ChEESState, bool]:
        """One warm-up step from one jittered HMC transition.

        Args:
            state: the adaptation state the transition ran with.
            initial: the chains before the transition ``(C, *event)``.
            energy: their energies ``(C,)`` ([`straggling`][pyroflows.mcmc.core.straggling]
                chains are left out of the mass-matrix estimate).
            proposal: the trajectories' end points ``(C, *event)``.
            velocity: $M^{-1}p'$ at the end points.
            accept_prob: the transition's acceptance probabilities ``(C,)``.
            diverging: its divergence flags ``(C,)``.
            length: the integration time the transition ran, $L\\epsilon \\approx hT$.

        Returns:
            the new state and whether a mass-matrix window ended (then the caller searches a
            new step size and calls [`restart`][pyroflows.mcmc.adapt.ChEESAdaptation.restart]).
        """
        t = state.t + 1
        ok = ~diverging & torch.isfinite(proposal.flatten(1)).all(1)
        if t <= self.initial_steps:
            return self._initial_update(state, initial, accept_prob, ok, t)
        # harmonic mean of the acceptance probabilities over the non-divergent chains
        inverse = torch.where(ok, 1 / accept_prob.clamp_min(1e-20), 0.0)
        harmonic = torch.nan_to_num(ok.sum() / inverse.sum(), nan=0.0)
        dual = dual_averaging_update(state.dual, self.target_accept_prob - harmonic)
        z0 = state.metric.whiten(initial).flatten(1)  # the chains before, whitened
        moments = self._moments(state, z0, proposal, velocity, accept_prob, ok, length)
        moments = torch.where(torch.isfinite(moments), moments, state.chees_moments)
        moments = self.moment_decay * state.chees_moments + (1 - self.moment_decay) * moments
        # d objective / d log T from the averaged numerator and denominator
        gradient = moments[0] / (moments[1] + 1e-20) - self.cost_exponent
        mean_square = self.rms_decay * state.mean_square + (1 - self.rms_decay) * gradient**2
        unbiased = mean_square / (1 - self.rms_decay**t)
        step = (self.learning_rate * gradient / (unbiased.sqrt() + 1e-20)).clamp(
            -self.max_log_update, self.max_log_update
        )
        finite = torch.isfinite(step)
        log_t = torch.where(finite, state.log_trajectory + step, state.log_trajectory)
        log_step = dual.log_step  # keep T within one and max_steps leapfrog steps
        log_t = torch.minimum(torch.maximum(log_t, log_step), log_step + math.log(self.max_steps))
        log_t = torch.minimum(log_t, self._log_longest(z0))
        mean_square = torch.where(finite, mean_square, state.mean_square)
        weight = t**-self.decay
        log_t_avg = weight * log_t + (1 - weight) * state.log_trajectory_avg
        welford, metric = state.welford, state.metric
        if self.first_start < t <= self.last_end:
            weight = ~straggling(energy, initial[0].numel())
            welford = window_update(welford, initial, weight, self.dense)
        ended = t in self.ends
        if ended:
            metric, welford = estimate_metric(welford, self.dense), empty_window(self.dense)
        new = ChEESState(dual, log_t, log_t_avg, mean_square, moments, metric, welford, t)
        return new, ended

    def _log_longest(self, z: torch.Tensor) -> torch.Tensor:
        """The log of the longest trajectory: ``max_periods`` periods of a Gaussian as wide as
        the widest of the whitened chains ``z`` ``(C, D)`` (at least unit width)."""
        widest = z.var(0).max().clamp_min(1.0) if z.shape[0] > 1 else z.new_tensor(1.0)
        return math.log(2 * math.pi * self.max_periods) + 0.5 * widest.log()

    def _initial_update(
        self,
        state: ChEESState,
        position: torch.Tensor,
        accept_prob: torch.Tensor,
        ok: torch.Tensor,
        t: int,
    ) -> tuple[ChEESState, bool]:
        """A per-chain phase step: dual averaging on each chain's own acceptance, so chains far
        out (where a step small enough for them would stall the rest) do not set everyone's
        step. At its end the robust spread of the chains becomes the (diagonal, or dense with
        that diagonal) mass matrix and the shared
        step size the median of the chains' ones (the caller then searches from it)."""
        target = self.initial_accept_prob - torch.where(ok, accept_prob, 0.0)
        dual = dual_averaging_update(state.dual, target)
        ended = t == self.initial_steps
        new = state._replace(dual=dual, t=t)
        if ended:
            metric = state.metric
            if self.adapt_mass_matrix:
                variance = robust_variance(position, torch.ones_like(position[0]))
                metric = (
                    dense_metric(torch.diag(variance.flatten()))
                    if self.dense
                    else diagonal_metric(variance)
                )
            log_step = dual.log_step.median()
            log_t = log_step + math.log(self.initial_num_steps)
            new = new._replace(
                dual=dual_averaging_init(log_step.exp(), self.shrink_to),
                metric=metric,
                log_trajectory=log_t,
                log_trajectory_avg=log_t,
            )
        return new, ended

    def _moments(
        self,
        state: ChEESState,
        z0: torch.Tensor,
        proposal: torch.Tensor,
        velocity: torch.Tensor,
        accept_prob: torch.Tensor,
        ok: torch.Tensor,
        length: torch.Tensor,
    ) -> torch.Tensor:
        """This transition's acceptance-weighted $hT\\,\\partial_t \\mathrm{ChEES}$ and
        $\\mathrm{ChEES}$, stacked (their ratio minus one is the gradient), from the whitened
        chains before it, ``z0`` ``(C, D)``."""
        whiten = state.metric.whiten
        weight = torch.where(ok, accept_prob, 0.0)
        z1 = torch.where(expand_as(ok, proposal), whiten(proposal), 0.0).flatten(1)
        dz = torch.where(expand_as(ok, velocity), whiten(velocity), 0.0).flatten(1)
        c0 = z0 - z0.mean(0)
        c1 = z1 - (weight[:, None] * z1).sum(0) / (weight.sum() + 1e-20)
        change = c1.square().sum(1) - c0.square().sum(1)
        derivative = torch.where(ok, change * (c1 * dz).sum(1), 0.0)  # d ChEES_i / dt
        chees = torch.where(ok, 0.25 * change**2, 0.0)
        total = weight.sum() + 1e-20
        return torch.stack([length * (weight * derivative).sum(), (weight * chees).sum()]) / total

    def restart(self, state: ChEESState, step_size: torch.Tensor) -> ChEESState:
        """Restart dual averaging from ``step_size`` after a mass-matrix update (the trajectory
        length and its optimiser carry over)."""
        return state._replace(dual=dual_averaging_init(step_size, self.shrink_to))
