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
is counted; ``accept_prob`` is 1 for steps taken and 0 otherwise.

References: Welling & Teh (2011), *Bayesian learning via stochastic gradient Langevin
dynamics*, ICML; Li, Chen, Carlson & Carin (2016), *Preconditioned stochastic gradient Langevin
dynamics for deep neural networks*, AAAI.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyroflows.mcmc.base import BatchedKernel, Energy, check_positive


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
        check_positive(step_size, "step_size")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        check_positive(decay_steps, "decay_steps")
        check_positive(eps, "eps")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
        super().__init__(energy, model=model)
        self.initial_step_size, self.decay, self.decay_steps = float(step_size), float(decay), float(decay_steps)
        self.preconditioned, self.alpha, self.eps = preconditioned, float(alpha), float(eps)
        self._iteration = 0  # the schedule runs on across warm-up and sampling

    def step_size_at(self, t: int) -> float:
        """$\\epsilon_t$."""
        return self.initial_step_size * (1 + t / self.decay_steps) ** -self.decay

    def _start(self) -> None:
        self.u, self.grad = self.evaluate(self.x, grad=True)
        self.square_avg = torch.ones_like(self.x)  # G starts at I: a first gradient of 0 must not explode it

    def _step(self) -> dict[str, torch.Tensor]:
        step = self.step_size_at(self._iteration)
        self._iteration += 1
        if self.preconditioned:
            square_avg = self.alpha * self.square_avg + (1 - self.alpha) * self.grad**2
            precond = 1 / (self.eps + square_avg.sqrt())
        else:
            square_avg, precond = self.square_avg, 1.0
        noise = self.randn(self.x) * (step * precond) ** 0.5
        x = self.x - 0.5 * step * precond * self.grad + noise
        u, grad = self.evaluate(x, grad=True)
        u = torch.where(torch.isfinite(grad.flatten(1)).all(1), u, torch.nan)  # a NaN gradient is not a move
        accept_prob, _, nonfinite, self.grad, self.square_avg = self.accept(
            x, u, torch.zeros_like(u), (self.grad, grad), (self.square_avg, square_avg)
        )
        return {"accept_prob": accept_prob, "nonfinite": nonfinite, "step_size": self.u.new_tensor(step)}
