r"""Gibbs sampling over a batch of chains: exact coordinate updates for discrete energies,
Metropolis-within-Gibbs for continuous ones, or user-supplied block conditionals.

One :meth:`~pyroflows.mcmc.Gibbs.sample` call is one systematic sweep over the coordinates of
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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pyroflows.mcmc.adapt import Adapter
from pyroflows.mcmc.base import BatchedKernel, Energy, check_positive


class Gibbs(BatchedKernel):
    """Batched Gibbs sampler (see the module docs for the three modes).

    Args:
        energy: batched energy $U$.
        support: 1-D tensor of the values every coordinate takes (discrete mode), or ``None``.
        conditionals: block samplers ``f(x) -> x`` (conditional mode), or ``None``.
        scale: initial random-walk scale of every coordinate (continuous mode).
        adapt_scale: tune the per-coordinate scales during warm-up (continuous mode).

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
    ) -> None:
        if support is not None:
            if not isinstance(support, torch.Tensor) or support.dim() != 1 or len(support) < 2 or not support.is_floating_point():
                raise ValueError("support must be a 1-D floating-point tensor of at least 2 values")
            if not torch.isfinite(support).all() or len(support.unique()) != len(support):
                raise ValueError("support must hold distinct finite values")
        if conditionals is not None:
            if support is not None:
                raise ValueError("give either support or conditionals, not both")
            conditionals = list(conditionals)
            if not conditionals or not all(callable(f) for f in conditionals):
                raise TypeError("conditionals must be a non-empty sequence of callables x -> x")
        check_positive(scale, "scale")
        super().__init__(energy)
        self.support, self.conditionals, self.scale = support, conditionals, float(scale)
        self.adapter = Adapter(float(scale), 0.44, adapt_scale, adapt_variance=False)

    @property
    def mode(self) -> str:
        """``"discrete"``, ``"conditionals"`` or ``"continuous"``."""
        return "conditionals" if self.conditionals else "discrete" if self.support is not None else "continuous"

    def _start(self) -> None:
        if self.mode == "discrete":
            self.support = self.support.to(self.x)
            if not torch.isin(self.x, self.support).all():
                raise ValueError("init must take values in support only")

    def _configure(self) -> None:
        if self.mode == "continuous":
            self.adapter.initial_step_size = torch.full_like(self.x[0].flatten(), self.scale)
            self.adapter.configure(self.warmup_steps, self.x)

    def _step(self) -> dict[str, torch.Tensor]:
        return {"discrete": self._discrete_sweep, "continuous": self._metropolis_sweep, "conditionals": self._conditional_sweep}[self.mode]()

    def _discrete_sweep(self) -> dict[str, Any]:
        num_chains, event = self.x.shape[0], self.x.shape[1:]
        values = self.support
        flat = self.x.reshape(num_chains, -1).clone()
        nonfinite = torch.zeros_like(self.u, dtype=torch.long)
        for i in range(flat.shape[1]):
            candidates = flat[:, None, :].repeat(1, len(values), 1)
            candidates[:, :, i] = values
            u = self.evaluate(candidates.reshape(num_chains, len(values), *event))
            finite = torch.isfinite(u)
            nonfinite += (~finite).sum(1)
            logits = torch.where(finite, -u, -torch.inf)
            gumbel = -torch.log(-torch.log(self.rand(logits).clamp_min(1e-30)))
            k = (logits + gumbel).argmax(1)
            flat[:, i] = values[k]
            self.u = u.gather(1, k[:, None])[:, 0]
        self.x = flat.reshape(self.x.shape)
        return {"nonfinite": nonfinite}

    def _metropolis_sweep(self) -> dict[str, Any]:
        scales = self.adapter.step_size
        flat_shape = (self.x.shape[0], -1)
        accept_probs, nonfinite = [], torch.zeros_like(self.u, dtype=torch.long)
        for i in range(scales.numel()):
            x = self.x.reshape(flat_shape).clone()
            x[:, i] += scales[i] * self.randn(x[:, i])
            x = x.reshape(self.x.shape)
            u = self.evaluate(x)
            accept_prob, _, bad = self.accept(x, u, self.u - u)
            accept_probs.append(accept_prob)
            nonfinite += bad
        accept_prob = torch.stack(accept_probs, 1)
        self.adapter.step(self.x, accept_prob)
        return {"accept_prob": accept_prob.mean(1), "nonfinite": nonfinite, "step_size": scales}

    def _conditional_sweep(self) -> dict[str, Any]:
        x = self.x
        for f in self.conditionals:
            x = f(x)
            if not isinstance(x, torch.Tensor) or x.shape != self.x.shape:
                raise ValueError(f"a conditional must return the chains' shape {tuple(self.x.shape)}, got {getattr(x, 'shape', type(x).__name__)}")
        u = self.evaluate(x)
        _, _, nonfinite = self.accept(x, u, torch.zeros_like(u))
        return {"nonfinite": nonfinite}
