r"""Warm-up adaptation shared by every kernel: step size (or proposal scale) by dual averaging and a
diagonal variance estimate in Stan-style windows, both pooled over the batch of chains.

**Step size.** Dual averaging (Nesterov 2009; Hoffman & Gelman 2014, section 3.2) on
$\log \epsilon$ drives the mean acceptance probability $\bar a$ to a target $\delta$ with the
statistic $g_t = \delta - \bar a_t$; the iterate is used during warm-up and the running average
after it. With $C$ chains $\bar a_t$ averages $C$ acceptance probabilities, so it is far less
noisy than a single chain's. Pyro's ``DualAveraging`` does the arithmetic; it is elementwise, so
the same adapter also tunes one scale per coordinate (Metropolis-within-Gibbs).

**Variance.** Warm-up is cut like Stan's: a fast initial buffer (15%), slow windows doubling in
length, a terminal buffer (10%). In each slow window a batched Welford estimator (Chan et al.'s
pairwise update, one merge per step for all chains — Pyro's ``WelfordCovariance`` takes one
sample at a time) accumulates the chains' states; at the window's end the diagonal variance,
shrunk towards $10^{-3}$ as Stan does, becomes the new inverse mass matrix (HMC) or proposal
variance (random-walk MH), and dual averaging restarts from ten times the current step size.

References: Hoffman & Gelman (2014), *The No-U-Turn Sampler*, JMLR; Stan Reference Manual,
"HMC algorithm parameters"; Chan, Golub & LeVeque (1983), *Algorithms for computing the sample
variance*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.ops.dual_averaging import DualAveraging


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


class BatchWelford:
    """Running mean and variance over a stream of batches ``(batch, *shape)`` (pairwise merge)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, batch: torch.Tensor) -> None:
        n = batch.shape[0]
        mean_b = batch.mean(0)
        m2_b = ((batch - mean_b) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total

    def variance(self, regularize: bool = True) -> torch.Tensor:
        """The sample variance, shrunk like Stan's: $\\frac{n}{n+5} s^2 + 10^{-3}\\frac{5}{n+5}$."""
        var = self.m2 / max(self.count - 1, 1)
        if not regularize:
            return var
        n = self.count
        return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


class Adapter:
    """Step-size and diagonal-variance adaptation for one warm-up.

    Args:
        step_size: initial step size (float, or a tensor for one per coordinate).
        target_accept_prob: the $\\delta$ that dual averaging aims at.
        adapt_step_size: tune the step size.
        adapt_variance: tune the diagonal variance in windows.
        find_step_size: optional ``f(step_size) -> step_size`` run when the variance changes
            (HMC's "reasonable step size" search), or ``None``.
    """

    def __init__(
        self,
        step_size: float | torch.Tensor,
        target_accept_prob: float,
        adapt_step_size: bool = True,
        adapt_variance: bool = True,
        find_step_size: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.initial_step_size = step_size
        self.target_accept_prob = target_accept_prob
        self.adapt_step_size, self.adapt_variance = adapt_step_size, adapt_variance
        self.find_step_size = find_step_size
        self.step_size: torch.Tensor | None = None
        self.variance: torch.Tensor | None = None

    def configure(self, warmup_steps: int, x: torch.Tensor) -> None:
        """Start a warm-up of ``warmup_steps`` for chains like ``x`` (``(C, *event)``)."""
        self.warmup_steps, self._t = warmup_steps, 0
        self._first_start, ends = window_ends(warmup_steps) if self.adapt_variance else (0, [])
        self._ends, self._last_end = set(ends), max(ends, default=0)
        if self.variance is None or self.variance.shape != x.shape[1:]:
            self.variance = torch.ones_like(x[0])
        if self.step_size is None or self.step_size.device != x.device:
            self.step_size = torch.as_tensor(self.initial_step_size, dtype=x.dtype, device=x.device)
        if self.find_step_size is not None and self.adapt_step_size and warmup_steps > 0:
            self.step_size = self.find_step_size(self.step_size)
        self._restart_averaging()
        self._welford = BatchWelford()

    def _restart_averaging(self) -> None:
        self._dual = DualAveraging(prox_center=torch.log(10 * self.step_size))

    @property
    def warming_up(self) -> bool:
        return self._t < self.warmup_steps

    def step(self, x: torch.Tensor, accept_prob: torch.Tensor) -> None:
        """One warm-up step: ``x`` the chains after the move, ``accept_prob`` their acceptance
        probabilities (``(C,)``, or ``(C, n)`` for per-coordinate step sizes)."""
        if not self.warming_up:
            return
        self._t += 1
        if self.adapt_step_size:
            self._dual.step(self.target_accept_prob - accept_prob.mean(0))
            log_step, log_avg = self._dual.get_state()
            self.step_size = torch.exp(log_avg if self._t == self.warmup_steps else log_step)
        if self._first_start < self._t <= self._last_end:
            self._welford.update(x.detach())
        if self._t in self._ends:
            self.variance = self._welford.variance()
            self._welford = BatchWelford()
            if self.find_step_size is not None and self.adapt_step_size:
                self.step_size = self.find_step_size(self.step_size)
            self._restart_averaging()

