r"""A variational autoencoder whose amortised posterior is a Gaussian or a conditional flow.

Generative model and guide, for data $x \in \mathbb R^{D}$ and latents $z \in \mathbb R^{d}$:

$$
p(z) = \mathcal N(0, I_d), \quad p_\theta(x \mid z) = \text{Bernoulli}(\sigma(g_\theta(z)))
\ \text{or}\ \mathcal N(\mu_\theta(z), \sigma_\theta(z)^2), \qquad
q_\phi(z \mid x):\ z = T_{h}\bigl(\mu_\phi(x) + \sigma_\phi(x) \odot \varepsilon\bigr),
\ \varepsilon \sim \mathcal N(0, I),
$$

where the encoder outputs $(\mu_\phi, \sigma_\phi, h)$ and $T_h$ is a flow conditioned on the
context $h$ (the identity for ``posterior="gaussian"``). With an IAF this is Kingma et al.
(2016); with planar layers it is the amortised planar flow of Rezende & Mohamed (2015). The
posterior's density comes from the sampling pass, with no inversion:
$\log q(z \mid x) = \log\mathcal N(\varepsilon) - \sum_i \log\sigma_{\phi,i}(x)
- \log|\det \partial T_h|$.

Bounds on $\log p(x)$ from $K$ posterior draws
([`pyroflows.infer.importance`][pyroflows.infer.importance]):

$$
\mathrm{ELBO}(x) = \mathbb E_q\Bigl[\log \frac{p(x, z)}{q(z \mid x)}\Bigr]
\;\le\; \mathcal L_K(x) = \mathbb E\Bigl[\log \frac1K \sum_{k} \frac{p(x, z_k)}{q(z_k \mid x)}\Bigr]
\;\le\; \log p(x),
$$

and $\mathcal L_K \to \log p(x)$ as $K \to \infty$:
[`VAE.log_likelihood`][pyroflows.models.vae.VAE.log_likelihood] with $K = 1000$ measures the model,
the gap $\log p(x) - \mathrm{ELBO}(x) = \mathrm{KL}(q \,\|\, p(z\mid x))$ the posterior's
inexactness (approximation plus amortisation gap; Cremer, Li & Duvenaud 2018).

References:
    Kingma & Welling (2014), *Auto-Encoding Variational Bayes*.
    Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*.
    Kingma et al. (2016), *Improved Variational Inference with Inverse Autoregressive Flow*.
    Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import AffineTransform
from pyro.nn import PyroModule
from torch.distributions import Transform

from pyroflows.guides.posterior import FlowPosterior
from pyroflows.nn.dense import DenseConditioner
from pyroflows.registry import available_flows, build_flow, normalize_hidden
from pyroflows.validation import check_int

LIKELIHOODS = ("bernoulli", "normal")
MIN_SCALE = 1e-3  # floor of the decoder's Normal scale: keeps the density bounded


class VAE(PyroModule):
    """Variational autoencoder with a Gaussian or flow posterior, for Pyro SVI or direct training.

    Args:
        x_dim: data width $D$ (flatten images first).
        z_dim: latent width $d$.
        hidden_dims: encoder widths; the decoder mirrors them.
        likelihood: ``"bernoulli"`` (data in $\\{0, 1\\}$) or ``"normal"`` (real data).
        posterior: ``"gaussian"``, or a flow family of
            [`available_flows`][pyroflows.available_flows] refining the Gaussian, conditioned on an
            encoder context.
        num_flows: layers of that flow (the family's default if ``None``).
        flow_hidden_dims: widths of the flow's networks (the family's default if ``None``).
        context_dim: width of the encoder's context $h$ (default ``hidden_dims[-1]``).
        name: prefix of the networks' names in Pyro's param store (give two VAEs trained by SVI
            in one session different names).
        **flow_options: further options of the flow family's builder.

    Example:
        >>> vae = VAE(64, 4, hidden_dims=(32,), posterior="iaf", num_flows=2)
        >>> x = torch.bernoulli(torch.full((5, 64), 0.3))
        >>> vae.elbo(x).shape, vae.log_likelihood(x, num_samples=10).shape
        (torch.Size([5]), torch.Size([5]))
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        *,
        hidden_dims: int | Sequence[int] = (128, 128),
        likelihood: str = "bernoulli",
        posterior: str = "gaussian",
        num_flows: int | None = None,
        flow_hidden_dims: int | Sequence[int] | None = None,
        context_dim: int | None = None,
        name: str = "vae",
        **flow_options: Any,
    ) -> None:
        super().__init__(name)
        self.x_dim = check_int(x_dim, "x_dim")
        self.z_dim = check_int(z_dim, "z_dim")
        hidden = normalize_hidden(hidden_dims)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.posterior = posterior
        if posterior == "gaussian":
            if num_flows is not None or flow_options:
                raise ValueError("num_flows and flow options need a flow posterior, not 'gaussian'")
            self.context_dim, self.flow = 0, None
        else:
            if not isinstance(posterior, str) or posterior not in available_flows():
                raise ValueError(
                    "posterior must be 'gaussian' or a flow family "
                    f"({', '.join(available_flows())}), got {posterior!r}"
                )
            self.context_dim = check_int(context_dim or hidden[-1], "context_dim")
            self.flow = build_flow(
                posterior,
                self.z_dim,
                num_layers=num_flows,
                hidden_dims=flow_hidden_dims,
                context_dim=self.context_dim,
                **flow_options,
            )
        heads = [self.z_dim, self.z_dim] + ([self.context_dim] if self.context_dim else [])
        self.encoder = DenseConditioner(self.x_dim, heads, hidden, zero_init=False)
        outputs = [self.x_dim] * (2 if likelihood == "normal" else 1)
        self.decoder = DenseConditioner(self.z_dim, outputs, hidden[::-1], zero_init=False)

    # -- validation ----------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.decoder.net.layers[0].weight
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                "x must be a floating-point torch.Tensor, "
                f"got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(
                f"x must have shape (batch, {self.x_dim}) (flatten images first), "
                f"got {tuple(x.shape)}"
            )
        if x.dtype != ref.dtype or x.device != ref.device:
            raise TypeError(
                f"x must be {ref.dtype} on {ref.device} like the VAE, got {x.dtype} on {x.device}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        if self.likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
            raise ValueError(
                "x must be binary (0/1) for likelihood='bernoulli'; "
                "use likelihood='normal' for real data"
            )
        return x

    # -- the distributions ---------------------------------------------------------------
    def prior(self, batch_shape: Sequence[int] = ()) -> dist.Distribution:
        """$p(z) = \\mathcal N(0, I_d)$ with batch shape ``batch_shape``."""
        zero = self.decoder.net.layers[0].weight.new_zeros(())
        return dist.Normal(zero, 1.0).expand([*batch_shape, self.z_dim]).to_event(1)

    def likelihood_dist(self, z: torch.Tensor) -> dist.Distribution:
        """$p(x \\mid z)$, batched over the leading dimensions of ``z``."""
        params = self.decoder(z)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=params[0]).to_event(1)
        return dist.Normal(params[0], F.softplus(params[1]) + MIN_SCALE).to_event(1)

    def posterior_dist(self, x: torch.Tensor) -> FlowPosterior:
        """$q(z \\mid x)$, batched over the rows of ``x`` (its own samples' density is free)."""
        loc, raw_scale, *context = self.encoder(x)
        scale = F.softplus(raw_scale) + 1e-5
        transforms: list[Transform] = [AffineTransform(loc, scale, event_dim=1)]
        if self.flow is not None:
            transforms += [layer.condition(context[0]) for layer in self.flow.layers]
        base = dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
        return FlowPosterior(base, transforms)

    # -- Pyro model and guide ------------------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        """$p(z)\\, p(x \\mid z)$ over a plate of the rows of ``x`` (observed)."""
        x = self._check_x(x)
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        with pyro.plate("data", len(x), device=x.device):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """$q(z \\mid x)$ over the same plate."""
        x = self._check_x(x)
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        if self.flow is not None:
            pyro.module(f"{self._pyro_name}.flow", self.flow)
        with pyro.plate("data", len(x), device=x.device):
            pyro.sample("z", self.posterior_dist(x))

    # -- bounds on log p(x) --------------------------------------------------------------
    def _log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """$\\log p(x, z_k) - \\log q(z_k \\mid x)$, shape ``(num_samples, batch)``."""
        q = self.posterior_dist(x)
        z = q.rsample((num_samples,))
        return self.prior().log_prob(z) + self.likelihood_dist(z).log_prob(x) - q.log_prob(z)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """A one-sample, reparameterised (differentiable) estimate of the ELBO of each row of ``x``.

        Returns:
            Tensor of shape ``(batch,)``; minimise ``-vae.elbo(x).mean()`` to train.
        """
        return self._log_weights(self._check_x(x), 1)[0]

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int = 1000, chunk_size: int = 100
    ) -> torch.Tensor:
        """The importance-sampled estimate $\\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)$
        of $\\log p(x)$ for each row of ``x`` (the IWAE bound, $\\ge$ the ELBO in expectation).

        Args:
            x: data, ``(batch, x_dim)``.
            num_samples: $K \\ge 1$ posterior draws per row.
            chunk_size: draws evaluated at once (bounds memory at ``chunk_size * batch`` rows).

        Returns:
            Tensor of shape ``(batch,)``.
        """
        check_int(num_samples, "num_samples")
        check_int(chunk_size, "chunk_size")
        x = self._check_x(x)
        sizes = [
            min(chunk_size, num_samples - start) for start in range(0, num_samples, chunk_size)
        ]
        # logsumexp of each chunk, then of the chunks: exact, with memory bounded by a chunk
        partial = torch.stack([torch.logsumexp(self._log_weights(x, k), 0) for k in sizes])
        return torch.logsumexp(partial, 0) - math.log(num_samples)

    # -- using the model -----------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean at the encoding of ``x`` (the posterior's base mean pushed through
        the flow): pixel probabilities for Bernoulli data, means for Normal data."""
        q = self.posterior_dist(self._check_x(x))
        z = q.base_dist.mean
        for t in q.transforms:
            z = t(z)
        return self._mean(z)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """``num_samples`` draws from the model, ``(num_samples, x_dim)``: the decoder's mean at
        $z \\sim p(z)$ (``mean=True``), or $x \\sim p(x \\mid z)$."""
        z = self.prior().sample((check_int(num_samples, "num_samples"),))
        return self._mean(z) if mean else self.likelihood_dist(z).sample()

    def _mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood_dist(z).mean

    def extra_repr(self) -> str:
        return (
            f"x_dim={self.x_dim}, z_dim={self.z_dim}, "
            f"likelihood={self.likelihood!r}, posterior={self.posterior!r}"
        )
