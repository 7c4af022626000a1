r"""A flow posterior whose density at its own samples costs no inversion.

Variational objectives evaluate $\log q(z)$ only at samples $z$ that $q$ just drew. A
transformed distribution $q = T_\# \mathcal N(0, I)$ knows that density from the forward pass,

$$
z = T(\varepsilon), \qquad \log q(z) = \log \mathcal N(\varepsilon; 0, I)
  - \log\bigl|\det \tfrac{\partial T}{\partial \varepsilon}\bigr|,
$$

but ``torch``'s ``TransformedDistribution.log_prob`` inverts $T$ instead, which for an IAF is
$D$ sequential passes and for a planar flow a root search per layer.
[`FlowPosterior`][pyroflows.guides.posterior.FlowPosterior] remembers the density of the sample it
drew last (matched by tensor identity, never by value) and inverts only for values it did not draw.
The memo lives on the distribution object, which guides build afresh at every call, so nothing
outlives one ELBO evaluation.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from torch.distributions import Transform


class FlowPosterior(dist.TransformedDistribution):
    """``TransformedDistribution`` with a free ``log_prob`` at its own reparameterised samples.

    Args:
        base_distribution: the base, usually a standard Normal ``.to_event(1)``.
        transforms: a transform or a list of them (``pyroflows`` layers, Pyro or torch ones).
        validate_args: check arguments (Pyro's default when ``None``).

    Example:
        >>> import pyroflows
        >>> flow = pyroflows.build_flow("planar", 2)
        >>> q = FlowPosterior(flow.base_dist(), [flow.transform])
        >>> z = q.rsample((5,))
        >>> q.log_prob(z).shape  # the forward pass's density: no root search
        torch.Size([5])
    """

    def __init__(
        self,
        base_distribution: dist.Distribution,
        transforms: Transform | list[Transform],
        validate_args: bool | None = None,
    ) -> None:
        super().__init__(base_distribution, transforms, validate_args=validate_args)

    def push(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base draws through the transforms: ``(samples, log q at them)``, in the forward
        pass (with gradients where ``noise`` or the transforms have them).

        Args:
            noise: draws of the base distribution's event shape (any batch shape).
        """
        x, log_q = noise, self.base_dist.log_prob(noise)
        event_dim = len(self.event_shape)
        for t in self.transforms:
            y = t(x)
            ladj = t.log_abs_det_jacobian(x, y)  # pyroflows layers reuse the pass just made
            log_q = log_q - sum_rightmost(ladj, event_dim - t.codomain.event_dim)
            x = y
        return x, log_q

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        x, log_q = self.push(self.base_dist.rsample(sample_shape))
        self._memo = (x, log_q)
        return x

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        memo = getattr(self, "_memo", None)  # absent on instances made by ``expand``
        if memo is not None and memo[0] is value:
            return memo[1]
        return super().log_prob(value)

    def expand(self, batch_shape: torch.Size, _instance=None) -> FlowPosterior:
        new = self._get_checked_instance(FlowPosterior, _instance)
        return super().expand(batch_shape, _instance=new)
