r"""Hamiltonian Monte Carlo over a batch of chains (MALA is the one-step case).

Each step draws a momentum $p \sim \mathcal N(0, M)$ with a diagonal mass matrix $M$, runs
$L$ leapfrog steps of size $\epsilon$ on $H(x, p) = U(x) + \tfrac12 p^\top M^{-1} p$,

$$
p_{\frac12} = p - \tfrac{\epsilon}{2}\nabla U(x), \quad
x' = x + \epsilon M^{-1} p_{\frac12}, \quad
p' = p_{\frac12} - \tfrac{\epsilon}{2}\nabla U(x'),
$$

and accepts the end point per chain with probability $\min(1, e^{H(x, p) - H(x', p')})$. All
chains share $\epsilon$ and $M$, so one leapfrog step is one batched energy-and-gradient
evaluation. A transition whose energy error exceeds ``max_energy_error`` (or is not finite) is
flagged divergent and rejected. During warm-up, $\epsilon$ is tuned by dual averaging of the
acceptance probability averaged over the chains and $M^{-1}$ is set to the chains' pooled
variance in Stan-style windows (see :mod:`pyroflows.mcmc.adapt`); a doubling/halving search for a
"reasonable" $\epsilon$ (Hoffman & Gelman 2014, Algorithm 4) starts each window.

With ``num_steps=1`` this is the Metropolis-adjusted Langevin algorithm,
$x' = x - \tfrac{\epsilon^2}{2} M^{-1}\nabla U(x) + \epsilon M^{-1/2}\xi$ with its MH correction
(Roberts & Tweedie 1996); its default target acceptance is then 0.574 (Roberts & Rosenthal
1998) instead of 0.8 (Stan's and Pyro's default; the asymptotic optimum for HMC is 0.65, Beskos et
al. 2013, but on targets with varying curvature such as the banana or the funnel a smaller step
diverges less often). ``jitter`` draws each chain's step size uniformly in
$\epsilon (1 \pm j)$ per transition, which breaks the periodicity of fixed-length trajectories.

Why not Pyro's ``HMC``: Pyro's kernel advances one chain (one potential evaluation per leapfrog
step per chain, through Pyro's model tracing); this one advances thousands per tensor operation —
``benchmarks/mcmc.py`` measures the difference in effective samples per second.

References: Neal (2011), *MCMC using Hamiltonian dynamics*; Hoffman & Gelman (2014), *The
No-U-Turn Sampler*, JMLR.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyroflows.mcmc.adapt import Adapter
from pyroflows.mcmc.base import (
    BatchedKernel,
    Energy,
    check_positive,
    check_probability,
    log_accept_prob,
)


class HMC(BatchedKernel):
    """Batched-chain HMC with step-size and diagonal mass-matrix adaptation.

    Args:
        energy: batched energy $U$ (e.g. a :mod:`pyroflows.energies` target); must be
            differentiable.
        step_size: leapfrog step size $\\epsilon$ (the starting value when adapted).
        num_steps: leapfrog steps per transition $L$ (1: MALA).
        adapt_step_size: tune $\\epsilon$ by dual averaging during warm-up.
        adapt_mass_matrix: tune the diagonal inverse mass matrix during warm-up.
        target_accept_prob: the acceptance rate aimed at (default 0.8, or 0.574 for MALA).
        max_energy_error: an energy error $H' - H$ above this is a divergence.
        jitter: per-chain, per-transition relative step-size jitter $j \\in [0, 1)$.

    Example:
        >>> from pyroflows import energies, mcmc
        >>> target = energies.get("banana")
        >>> kernel = mcmc.HMC(target, step_size=0.1, num_steps=10)
        >>> idata = mcmc.sample(kernel, torch.zeros(256, 2), 200, warmup_steps=200, progress=False)
        >>> idata.posterior["x"].shape
        (256, 200, 2)
    """

    def __init__(
        self,
        energy: Energy | None = None,
        step_size: float = 0.1,
        num_steps: int = 10,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        target_accept_prob: float | None = None,
        max_energy_error: float = 1000.0,
        jitter: float = 0.0,
        *,
        model: Callable | None = None,
    ) -> None:
        check_positive(step_size, "step_size")
        check_positive(num_steps, "num_steps", int)
        check_positive(max_energy_error, "max_energy_error")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a number in [0, 1), got {jitter!r}")
        if target_accept_prob is None:
            target_accept_prob = 0.574 if num_steps == 1 else 0.8
        check_probability(target_accept_prob, "target_accept_prob")
        super().__init__(energy, model=model)
        self.num_steps, self.max_energy_error, self.jitter = num_steps, float(max_energy_error), jitter
        self.adapter = Adapter(step_size, target_accept_prob, adapt_step_size, adapt_mass_matrix, self._find_step_size)

    @property
    def step_size(self) -> torch.Tensor | None:
        return self.adapter.step_size

    @property
    def inverse_mass_matrix(self) -> torch.Tensor | None:
        """The diagonal of $M^{-1}$, shape ``event_shape``."""
        return self.adapter.variance

    def _start(self) -> None:
        self.u, self.grad = self.evaluate(self.x, grad=True)

    def _configure(self) -> None:
        self.adapter.configure(self.warmup_steps, self.x)

    def _kinetic(self, p: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.adapter.variance * p**2).flatten(1).sum(1)

    def _leapfrog(self, step_size: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, ...]:
        """From the current chains with fresh momenta: ``(x', u', grad', delta_H)``."""
        inv_mass = self.adapter.variance
        p = self.randn(self.x) / inv_mass.sqrt()
        h0 = self.u + self._kinetic(p)
        x, grad = self.x, self.grad
        for _ in range(num_steps):
            p = p - 0.5 * step_size * grad
            x = x + step_size * inv_mass * p
            u, grad = self.evaluate(x, grad=True)
            p = p - 0.5 * step_size * grad
        return x, u, grad, u + self._kinetic(p) - h0

    def _find_step_size(self, step_size: torch.Tensor) -> torch.Tensor:
        """Double or halve $\\epsilon$ until one leapfrog step's mean acceptance crosses 1/2."""

        def mean_accept(eps):
            with torch.no_grad():
                return log_accept_prob(-self._leapfrog(eps, 1)[3]).exp().mean().item()

        direction = 1.0 if mean_accept(step_size) > 0.5 else -1.0
        for _ in range(60):
            new = step_size * 2.0**direction
            if (mean_accept(new) > 0.5) != (direction > 0) or not 1e-10 < new.item() < 1e10:
                break
            step_size = new
        return step_size

    def _step(self) -> dict[str, torch.Tensor]:
        step_size = self.adapter.step_size
        if self.jitter:
            step_size = step_size * (1 + self.jitter * (2 * self.rand(self.u) - 1)).reshape((-1,) + (1,) * self.event_dim)
        x, u, grad, delta = self._leapfrog(step_size, self.num_steps)
        accept_prob, _, nonfinite, self.grad = self.accept(x, u, -delta, (self.grad, grad))
        diverging = ~(delta < self.max_energy_error)
        self.adapter.step(self.x, accept_prob)
        return {"accept_prob": accept_prob, "nonfinite": nonfinite, "diverging": diverging, "step_size": self.adapter.step_size}


def MALA(energy: Energy, step_size: float = 0.1, **options) -> HMC:  # noqa: N802 - reads as a class
    """The Metropolis-adjusted Langevin algorithm: :class:`HMC` with ``num_steps=1``."""
    return HMC(energy, step_size=step_size, num_steps=1, **options)

