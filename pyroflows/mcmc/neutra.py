r"""NeuTra: MCMC on a model in the latent space of a flow fitted by variational inference.

A guide fitted by SVI — [`AutoFlow`][pyroflows.guides.AutoFlow], or any Pyro
``AutoContinuous`` guide — gives a bijection $T$ from its base space ($\varepsilon$ drawn from
``guide.get_base_dist()``: $\mathcal N(0, I_D)$, or independent Student-t coordinates for an
``AutoFlow`` with heavy tails) to the model's unconstrained latent vector $u$
(``guide.get_transform()``).
Sampling $\varepsilon$ from the pulled-back target

$$
U_\varepsilon(\varepsilon) = U\bigl(T(\varepsilon)\bigr)
  - \log\bigl|\det \partial T / \partial \varepsilon\bigr|
$$

and mapping the draws through $T$ is exact MCMC on the model for any $T$; when $q$ fits the
posterior, $U_\varepsilon$ is close to the base's energy, so HMC needs few, large steps through
geometry (funnels, strong correlations, scales) that defeats it in $u$ (Hoffman et al. 2019).
With ``kernel="mh"`` the flow is an independence proposal: in $\varepsilon$ space the proposal is
the guide's base distribution, which is $q$ itself in $u$ space, and the acceptance rate
measures the fit.

Unlike Pyro's ``NeuTraReparam`` (one chain per run, a model rewritten by a reparameterizer), this
runs every chain in one batched call on the model's
[`ModelPotential`][pyroflows.mcmc.ModelPotential], with $T$ evaluated once per batch.

Reference: Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan (2019), *NeuTra-lizing Bad
Geometry in Hamiltonian Monte Carlo Using Neural Transport*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import arviz as az
import torch
from torch.distributions.transforms import ComposeTransform, Transform

from pyroflows.mcmc.core import draw_with
from pyroflows.mcmc.models import to_inference_data
from pyroflows.mcmc.potential import ModelPotential, finite_start
from pyroflows.validation import check_choice, check_int

__all__ = ["NeuTraPotential", "neutra"]


class NeuTraPotential:
    """The energy $U_\\varepsilon$ of a model's potential pulled back through a guide's
    transform, as a batched energy over ``(C, D)`` (usable by every pyroflows kernel).

    Args:
        potential: the model's [`ModelPotential`][pyroflows.mcmc.ModelPotential].
        transform: $T$, from base space to the potential's unconstrained space (with
            ``event_dim`` 1 or elementwise parts).
        dtype: the dtype ``transform`` computes in (the guide's; the chains keep the
            potential's).
    """

    def __init__(
        self, potential: ModelPotential, transform: Transform, dtype: torch.dtype | None = None
    ) -> None:
        self.potential = potential
        self.parts = (
            list(transform.parts) if isinstance(transform, ComposeTransform) else [transform]
        )
        self.event_shape = potential.event_shape
        self._dtype = potential._dtype if dtype is None else dtype

    def to_unconstrained(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """$u = T(\\varepsilon)$ and $\\log|\\det \\partial T/\\partial\\varepsilon|$ ``(C,)``,
        in one pass through the parts (each flow layer remembers its own pass)."""
        x = eps.to(self._dtype)
        log_det = x.new_zeros(x.shape[0])
        for part in self.parts:
            y = part(x)
            log_det = log_det + part.log_abs_det_jacobian(x, y).reshape(x.shape[0], -1).sum(1)
            x = y
        return x.to(eps.dtype), log_det.to(eps.dtype)

    def __call__(self, eps: torch.Tensor) -> torch.Tensor:
        """$U_\\varepsilon$ at ``eps`` ``(C, D)``: ``(C,)``."""
        u, log_det = self.to_unconstrained(eps)
        return self.potential.energy(u) - log_det


class _BaseProposal:
    """The guide's base distribution as an independence proposal drawing from the run's
    generator (through [`draw_with`][pyroflows.mcmc.core.draw_with]: torch distributions take
    no generator)."""

    def __init__(
        self,
        base: torch.distributions.Distribution,
        like: torch.Tensor,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> None:
        self.base, self.like, self.generator, self.dtype = base, like, generator, dtype

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        draw = lambda: self.base.sample(sample_shape).to(self.like)  # noqa: E731
        return draw_with(self.generator, draw, self.like.device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(x.to(self.dtype)).to(x.dtype)


def _check_guide(guide: Any, potential: ModelPotential) -> Transform:
    if not callable(getattr(guide, "get_transform", None)):
        raise TypeError(
            "guide must be an AutoFlow (or another AutoContinuous guide with get_transform()), "
            f"got {type(guide).__name__}"
        )
    trace = getattr(guide, "prototype_trace", None)
    if trace is None:
        raise ValueError("guide has not been fitted: run SVI (e.g. guides.fit_guide) first")
    names = [name for name, _ in trace.iter_stochastic_nodes()]
    if names != list(potential._latent) or guide.latent_dim != potential.dim:
        raise ValueError(
            f"guide's latent sites {names} (dimension {guide.latent_dim}) do not match the "
            f"model's {list(potential._latent)} (dimension {potential.dim})"
        )
    return guide.get_transform()


def neutra(
    model: Callable,
    guide: Any,
    *,
    num_samples: int,
    warmup_steps: int | None = None,
    num_chains: int = 4,
    kernel: str = "hmc",
    seed: int | None = None,
    progress: bool = True,
    thinning: int = 1,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    log_likelihood: bool | None = None,
    vectorize: str = "plate",
    **kernel_options: Any,
) -> az.InferenceData:
    """Sample a model by NeuTra: HMC (or a flow independence sampler) in a fitted guide's base
    space, draws returned in the model's constrained space.

    Args:
        model: the Pyro model the guide was fitted to.
        guide: a fitted [`AutoFlow`][pyroflows.guides.AutoFlow] (or another ``AutoContinuous``
            guide).
        num_samples: draws kept per chain.
        warmup_steps: adaptation steps (default: ``num_samples``).
        num_chains: chains run at once; they start at independent draws of the guide.
        kernel: ``"hmc"`` ([`HMC`][pyroflows.mcmc.HMC] on $U_\\varepsilon$) or ``"mh"``
            ([`MH`][pyroflows.mcmc.MH] with the flow as independence proposal).
        seed: seed of the run's generator (starts, proposals, accept/reject).
        progress: show a progress bar.
        thinning: keep every ``thinning``-th step.
        model_args: the model's positional arguments.
        model_kwargs: the model's keyword arguments.
        log_likelihood: store the pointwise log-likelihood (see
            [`to_inference_data`][pyroflows.mcmc.models.to_inference_data]).
        vectorize: ``"plate"`` or ``"vmap"`` (a model written for one chain), as in
            [`ModelPotential`][pyroflows.mcmc.ModelPotential].
        **kernel_options: options of the kernel (``HMC(step_size=..., adapt=...)``, ...); HMC
            keeps an identity mass matrix unless ``adapt_mass_matrix=True``.

    Returns:
        ``InferenceData`` as [`sample`][pyroflows.mcmc.sample] returns for a model (every site by
        name, constrained); ``attrs["neutra"]`` names the kernel.

    Raises:
        ValueError: an unfitted guide, a guide of another model, bad counts or kernel name.

    Example:
        >>> guide = AutoFlow(model, flow="iaf")  # doctest: +SKIP
        >>> fit_guide(model, guide, data)  # doctest: +SKIP
        >>> idata = neutra(model, guide, model_args=(data,), num_samples=500, num_chains=256)
        ...     # doctest: +SKIP
    """
    from pyroflows.mcmc.driver import make_generator, run_chains
    from pyroflows.mcmc.hmc import HMC
    from pyroflows.mcmc.mh import MH

    check_choice(kernel, "kernel", ("hmc", "mh"))
    check_int(num_samples, "num_samples", minimum=1)
    check_int(num_chains, "num_chains", minimum=1)
    warmup_steps = (
        num_samples if warmup_steps is None else check_int(warmup_steps, "warmup_steps", minimum=0)
    )
    potential = ModelPotential(
        model, *model_args, vectorize=vectorize, **(model_kwargs or {})
    )
    transform = _check_guide(guide, potential)
    guide_dtype = next((p.dtype for p in guide.parameters()), None)
    energy = NeuTraPotential(potential, transform, guide_dtype)
    generator = make_generator(seed, potential._device)
    like = torch.zeros(potential.dim, device=potential._device, dtype=potential._dtype)
    base = _BaseProposal(guide.get_base_dist(), like, generator, energy._dtype)
    # chains start at independent draws of the guide where the model's density is finite
    start = finite_start(energy, lambda: base.sample((num_chains,)), generator)
    if kernel == "hmc":
        # the flow whitens the posterior: an identity mass matrix is NeuTra's point
        sampler = HMC(energy, **{"adapt_mass_matrix": False, **kernel_options})
    else:
        sampler = MH(energy, proposal=base, **kernel_options)
    eps, stats, attrs = run_chains(
        sampler,
        start,
        num_samples,
        warmup_steps=warmup_steps,
        thinning=thinning,
        progress=progress,
        generator=generator,
    )
    with torch.no_grad():
        chunks = eps.flatten(0, 1).split(4096)
        u = torch.cat([energy.to_unconstrained(chunk)[0] for chunk in chunks])
    attrs = {**attrs, "neutra": kernel}
    return to_inference_data(
        potential, u.reshape(eps.shape), stats, attrs, log_likelihood=log_likelihood
    )
