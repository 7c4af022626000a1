r"""Stochastic-gradient Langevin dynamics over a batch of chains.

$$
x_{t+1} = x_t - \frac{\epsilon_t}{2} G_t \nabla \hat U(x_t) + \sqrt{\epsilon_t G_t}\,\xi_t,
\qquad \xi_t \sim \mathcal N(0, I),
$$

with $\nabla \hat U$ the gradient of a possibly stochastic (mini-batch) energy, and no
Metropolis correction (Welling & Teh 2011). The step sizes
$\epsilon_t = \epsilon_0 (1 + t / t_0)^{-\gamma}$ satisfy $\sum_t \epsilon_t = \infty$ and
$\sum_t \epsilon_t^2 < \infty$ for $\gamma \in (\tfrac12, 1]$, which makes the chain's bias vanish
as $t \to \infty$; $\gamma = 0$ gives the constant step used in EBM training, with a bias of
order $\epsilon$. With ``preconditioned=True``, $G_t = \operatorname{diag}(1 / (\lambda +
\sqrt{V_t}))$ where $V_t = \alpha V_{t-1} + (1 - \alpha) \nabla\hat U(x_t)^2$ per chain
(RMSprop; Li et al. 2016's pSGLD, without its small $\Gamma$ correction term).

A step whose new point has a non-finite energy or gradient is not taken (the chain stays) and
is counted; ``accept_prob`` is 1 for steps taken and 0 otherwise. The schedule's step counter is
part of the chain state: every run starts at $\epsilon_0$ and it runs on across warm-up and
sampling.

References: Welling & Teh (2011), *Bayesian learning via stochastic gradient Langevin
dynamics*, ICML; Li, Chen, Carlson & Carin (2016), *Preconditioned stochastic gradient Langevin
dynamics for deep neural networks*, AAAI.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyroflows.mcmc.base import BatchedKernel, RunState
from pyroflows.mcmc.core import Energy, Info, SGLDState, sgld_init, sgld_step
from pyroflows.validation import check_number, check_positive


class SGLD(BatchedKernel):
    """Batched (preconditioned) stochastic-gradient Langevin dynamics.

    Args:
        energy: batched energy $U$, possibly stochastic (a fresh mini-batch estimate per call).
        step_size: $\\epsilon_0$.
        decay: $\\gamma$ of the schedule ($0$: constant; $(\\tfrac12, 1]$: Welling & Teh).
        decay_steps: $t_0$ of the schedule.
        preconditioned: RMSprop preconditioning (pSGLD).
        alpha: RMSprop's decay $\\alpha$.
        eps: RMSprop's damping $\\lambda$.
        model: a Pyro model instead of an energy (keyword only).

    Example:
        >>> from pyroflows import energies, mcmc
        >>> kernel = mcmc.SGLD(energies.get("gaussian"), step_size=0.05, decay=0.55)
        >>> idata = mcmc.sample(kernel, torch.zeros(128, 2), 500, warmup_steps=100, progress=False)
    """

    def __init__(
        self,
        energy: Energy | None = None,
        step_size: float = 1e-2,
        decay: float = 0.55,
        decay_steps: float = 1000.0,
        preconditioned: bool = False,
        alpha: float = 0.99,
        eps: float = 1e-5,
        *,
        model: Callable | None = None,
    ) -> None:
        self.initial_step_size = check_positive(step_size, "step_size")
        self.decay = check_number(decay, "decay", low=0.0, high=1.0)
        self.decay_steps = check_positive(decay_steps, "decay_steps")
        self.eps = check_positive(eps, "eps")
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0, high_open=True)
        self.preconditioned = bool(preconditioned)
        super().__init__(energy, model=model)

    def step_size_at(self, t: int) -> float:
        """$\\epsilon_t$."""
        return self.initial_step_size * (1 + t / self.decay_steps) ** -self.decay

    def _init(self, position: torch.Tensor) -> SGLDState:
        return sgld_init(position, self.potential)

    def step(
        self, state: SGLDState, generator: torch.Generator, params: None = None
    ) -> tuple[SGLDState, Info]:
        """One Langevin step of every chain at $\\epsilon_t$, $t$ = ``state.iteration``."""
        step = self.step_size_at(state.iteration)
        return sgld_step(
            state, generator, self.potential, step, self.preconditioned, self.alpha, self.eps
        )

    def _stats(self, run: RunState, info: Info) -> dict[str, torch.Tensor]:
        u = run.chains.energy
        return {"step_size": torch.full_like(u, self.step_size_at(run.chains.iteration - 1))}
