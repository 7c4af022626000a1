r"""``AutoFlow``: an autoguide whose posterior is any registered normalizing flow.

Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide, ``AutoFlow`` maps the model's
latent sites to one unconstrained vector $u \in \mathbb R^D$ (ADVI's change of variables) and
puts a distribution on $u$; here that distribution is a flow $T$ of any family in
:func:`pyroflows.available_flows`, followed by an optional learnable diagonal affine map:

$$
u = \mu + \sigma \odot T(\varepsilon), \qquad \varepsilon \sim \mathcal N(0, I_D), \qquad
\log q(u) = \log \mathcal N(\varepsilon; 0, I) - \log\bigl|\det \tfrac{\partial T}{\partial\varepsilon}\bigr|
  - \textstyle\sum_i \log \sigma_i .
$$

With $T$ the identity this is ``AutoDiagonalNormal`` (so training starts from it: the layers are
initialised at or near the identity, $\mu$ at ``init_loc_fn``'s point and $\sigma$ at
``init_scale``). The affine map comes *after* the flow, so the flow always works on
standardised coordinates: its networks see $O(1)$ inputs whatever the scale and location of the
model's latents, and ``get_transform()`` is a whitening map for
:class:`~pyro.infer.reparam.NeuTraReparam` (Hoffman et al. 2019). ``affine=False`` drops the
affine map (Pyro's ``AutoNormalizingFlow`` layout).

The guide's ``log_prob`` at its own samples comes from the forward pass
(:class:`~pyroflows.guides.posterior.FlowPosterior`), so inverse-expensive families (IAF,
planar) cost one pass per ELBO evaluation, as in Kingma et al. (2016).

References:
    Kucukelbir et al. (2017), *Automatic Differentiation Variational Inference*, JMLR.
    Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*, ICML.
    Kingma et al. (2016), *Improved Variational Inference with Inverse Autoregressive Flow*.
    Hoffman et al. (2019), *NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural
    Transport*.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, ComposeTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch.distributions import Transform, biject_to

from pyroflows.guides.posterior import FlowPosterior
from pyroflows.registry import _positive_int, build_flow, get_builder


class AutoFlow(AutoContinuous):
    """An ``AutoContinuous`` guide with a normalizing-flow posterior over the latent vector.

    Args:
        model: a Pyro model with continuous latent sites (static structure).
        flow: a family in :func:`pyroflows.available_flows`.
        num_layers: layers of the flow (the family's default if ``None``).
        hidden_dims: conditioner widths of the flow (the family's default if ``None``).
        affine: follow the flow with a learnable diagonal affine map $\\mu + \\sigma \\odot\\cdot$.
        init_loc_fn: per-site initialisation of $\\mu$ (see Pyro's autoguide initialisation).
        init_scale: initial $\\sigma$ (with ``affine``).
        num_quantile_samples: posterior draws behind :meth:`quantiles` and :meth:`median`.
        **flow_options: further options of the family's builder.

    Raises:
        ValueError: unknown ``flow``, a non-positive ``init_scale`` / ``num_quantile_samples``,
            or (at the first call) a discrete latent site, named in the message.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = AutoFlow(model, flow="realnvp", num_layers=2)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
        >>> loss = svi.step(torch.randn(10))
        >>> sorted(guide.quantiles([0.1, 0.9]))
        ['mu']
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model: Callable,
        flow: str = "iaf",
        *,
        num_layers: int | None = None,
        hidden_dims: int | Sequence[int] | None = None,
        affine: bool = True,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        num_quantile_samples: int = 10_000,
        **flow_options: Any,
    ) -> None:
        get_builder(flow)  # unknown names fail here, not at the first SVI step
        if not isinstance(init_scale, (int, float)) or isinstance(init_scale, bool) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        self._flow_name = flow
        self._flow_args = dict(num_layers=num_layers, hidden_dims=hidden_dims, **flow_options)
        self._affine = bool(affine)
        self._init_scale = float(init_scale)
        self.num_quantile_samples = _positive_int(num_quantile_samples, "num_quantile_samples")
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)  # names discrete sites in a ValueError
        loc = self._init_loc()
        # Build on the model's device even under another default device (e.g. the tests' trap).
        with torch.device(loc.device):
            flow = build_flow(self._flow_name, self.latent_dim, **self._flow_args)
        self.flow = flow.to(dtype=loc.dtype)
        if self._affine:
            self.loc = torch.nn.Parameter(loc)
            self.scale = PyroParam(torch.full_like(loc, self._init_scale), self.scale_constraint)

    # -- the posterior over the unconstrained latent vector ------------------------------
    def get_base_dist(self) -> dist.Distribution:
        """$\\mathcal N(0, I_D)$, the flow's base (its buffers carry device and dtype)."""
        return self.flow.base_dist()

    def _transforms(self) -> list[Transform]:
        """The flow's layers, then the affine map: a flat list (nested composes are slow)."""
        layers: list[Transform] = self.flow.layers
        if self._affine:
            layers.append(AffineTransform(self.loc, self.scale, event_dim=1))
        return layers

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        """$\\varepsilon \\mapsto \\mu + \\sigma \\odot T(\\varepsilon)$ (independent of the model's arguments)."""
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowPosterior:
        """$q(u)$ as a :class:`FlowPosterior` (free ``log_prob`` at its own samples)."""
        return FlowPosterior(self.get_base_dist(), self._transforms())

    # -- summaries -----------------------------------------------------------------------
    @torch.no_grad()
    def _constrained_samples(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``num_quantile_samples`` posterior draws of every site, ``(N, *site_shape)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.get_posterior(*args, **kwargs).sample((self.num_quantile_samples,))
        samples, pos = {}, 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = shape.numel()
            value = latent[:, pos : pos + size].reshape(-1, *shape)
            samples[name] = biject_to(site["fn"].support)(value)
            pos += size
        return samples

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of every latent site, estimated from
        ``num_quantile_samples`` draws (Monte-Carlo error about $\\sqrt{p(1-p)/N} / q(x_p)$).

        Args:
            quantiles: levels in $[0, 1]$.
            *args: the model's arguments (used only if the guide has not run yet).
            **kwargs: the model's keyword arguments (likewise).

        Returns:
            site name -> tensor of shape ``(len(quantiles), *site_shape)``.
        """
        samples = self._constrained_samples(*args, **kwargs)
        ref = next(iter(samples.values()))
        levels = torch.as_tensor(quantiles, dtype=ref.dtype, device=ref.device).reshape(-1)
        if not ((levels >= 0) & (levels <= 1)).all():
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        return {name: torch.quantile(value, levels, dim=0) for name, value in samples.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Marginal posterior medians of every latent site (Monte-Carlo, see :meth:`quantiles`)."""
        return {name: q[0] for name, q in self.quantiles([0.5], *args, **kwargs).items()}
