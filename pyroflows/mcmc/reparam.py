r"""Automatic non-centring of a model's hierarchical sites, chosen per element from the data.

A latent site $x \sim \mathcal N(\mu, \sigma)$ whose scale $\sigma$ depends on other latent sites
makes a funnel: where $\sigma$ is small, $x$ is confined to a neck that no single step size and
metric fit together with the mouth. The non-centred form $x = \mu + \sigma z$,
$z \sim \mathcal N(0, 1)$ removes it when the data say little about $x$, and creates the
mirror-image funnel when they pin $x$ down (Papaspiliopoulos, Roberts & Sköld 2007). Which one
suits an element depends on the ratio of its prior variance to its likelihood variance,

$$
\kappa = \sigma^2 \cdot \Bigl(-\frac{\partial^2}{\partial x^2} \log p(\text{everything else}
\mid x)\Bigr),
$$

the quantity behind the optimal partial centring of a conjugate Gaussian,
$c^\star = \kappa / (1 + \kappa)$ (Gorinova, Moore & Hoffman 2020, "Automatic
reparameterisation of probabilistic programs"). An element is left centred where the median of
$\kappa$ over the chains exceeds 1, and non-centred otherwise.

**How.** [`plan`][pyroflows.mcmc.reparam.plan] traces the model once for all chains at their
current points, finds the loc-scale sites (``Normal``, ``StudentT``, ``Cauchy``, ``Laplace``,
also as ``.to_event``) whose scale depends on another latent site, and estimates each element's
curvature of the rest of the model by one Hutchinson probe per chain (a Rademacher vector
$v$, the diagonal as $v \odot H v$; exact when the elements do not share a child).
[`decentre`][pyroflows.mcmc.reparam.decentre] wraps the model in Pyro's ``poutine.reparam``
with a ``LocScaleReparam`` whose ``centered`` is that 0/1 choice per element, and
[`carry_over`][pyroflows.mcmc.reparam.carry_over] maps the chains' points exactly into the new
parameterisation. [`sample`][pyroflows.mcmc.sample] (``reparam="auto"``, the default) decides
after a short pilot of warm-up (so that $\sigma$ and $x$ are near the posterior, not at their
initial values), skipping the pilot where no candidate site has data below it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam

from pyroflows.mcmc.potential import ModelPotential, _per_chain

__all__ = ["plan", "decentre", "carry_over", "SUFFIX"]

#: the loc-scale families Pyro's ``LocScaleReparam`` decentres exactly
FAMILIES = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)
#: the new latent site of a decentred site ``x`` is ``x + SUFFIX`` (Pyro's name)
SUFFIX = "_decentered"


def _base(fn: Any) -> Any:
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn


def _candidates(sites: dict[str, dict], potential: ModelPotential) -> list[str]:
    """Latent loc-scale sites whose scale is a function of the points being traced."""
    return [
        name for name in potential._latent
        if type(_base(sites[name]["fn"])) in FAMILIES
        and torch.as_tensor(_base(sites[name]["fn"]).scale).requires_grad
    ]


def plan(
    potential: ModelPotential, u: torch.Tensor, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], bool]:
    r"""Which elements of which sites to non-centre, judged at the chains' points ``u``.

    Args:
        potential: the model's potential (``vectorize="plate"``).
        u: the chains' unconstrained points ``(C, D)``.
        generator: the source of the Hutchinson probes.

    Returns:
        ``{site: centred}``, a 0/1 tensor of the site's own shape (1: keep centred), for every
        candidate site; and whether any candidate has data below it (a site without any is
        non-centred whatever the points, so its choice needs no pilot).
    """
    u = u.detach().requires_grad_()
    num_chains = u.shape[0]
    with pyro.validation_enabled(False):
        sites, _ = potential._run(u)
        candidates = _candidates(sites, potential)
        choice: dict[str, torch.Tensor] = {}
        informed = False
        for name in candidates:
            info = potential._latent[name]
            rest = sum(
                (
                    _per_chain(potential._log_prob(site), num_chains)
                    for other, site in sites.items()
                    if other != name and site["type"] == "sample"
                    and not site["infer"].get("_deterministic")
                ),
                u.new_zeros(num_chains),
            )
            span = slice(info.start, info.start + info.unconstrained_numel)
            if not rest.requires_grad:  # nothing else in the model depends on the points
                choice[name] = torch.zeros(info.shape, device=u.device, dtype=u.dtype)
                continue
            (grad,) = torch.autograd.grad(
                rest.sum(), u, create_graph=True, allow_unused=True, materialize_grads=True
            )
            grad = grad[:, span]
            curvature = torch.zeros_like(grad)
            if grad.requires_grad:
                probe = torch.randint(
                    0, 2, grad.shape, generator=generator, device=u.device
                ).to(u.dtype) * 2 - 1
                (hv,) = torch.autograd.grad(
                    (grad * probe).sum(), u, retain_graph=True, allow_unused=True
                )
                if hv is not None:
                    curvature = probe * hv[:, span]
            informed = informed or bool(grad.detach().abs().amax() > 0)
            value = sites[name]["value"]
            scale = torch.broadcast_to(_base(sites[name]["fn"]).scale, value.shape)
            kappa = scale.detach().reshape(num_chains, -1) ** 2 * (-curvature.detach()).clamp(min=0)
            centred = (kappa.median(0).values > 1).to(u.dtype)
            choice[name] = centred.reshape(info.shape)
    return choice, informed


def decentre(model: Callable, choice: dict[str, torch.Tensor]) -> Callable:
    """``model`` with every chosen site non-centred where its ``centred`` entry is 0.

    Args:
        model: the Pyro model.
        choice: ``{site: centred}`` as [`plan`][pyroflows.mcmc.reparam.plan] returns it.

    Returns:
        the reparameterised model (the model itself if every element stays centred): each such
        site ``x`` becomes the latent site ``x_decentered`` and reappears as ``x``, a function
        of it, with the same value and density.
    """
    config = {
        name: LocScaleReparam(centered=centred)
        for name, centred in choice.items() if not bool(centred.all())
    }
    return poutine.reparam(model, config=config) if config else model


def carry_over(
    potential: ModelPotential,
    new: ModelPotential,
    u: torch.Tensor,
    choice: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The chains' points ``u`` of ``potential`` as points of its reparameterisation ``new``
    (the same constrained values: $z = (x - \\mu)\\,\\sigma^{c - 1} + c\\mu$ per element, Pyro's
    ``LocScaleReparam`` inverted).

    Args:
        potential: the original model's potential.
        new: the potential of ``decentre(model, choice)``.
        u: points ``(C, D)`` of ``potential``.
        choice: the plan that built ``new``.

    Returns:
        points ``(C, new.dim)`` of ``new``.
    """
    with torch.no_grad(), pyro.validation_enabled(False):
        sites, _ = potential._run(u)
        values = potential.unpack(u)
        for name, centred in choice.items():
            if name + SUFFIX not in new._latent:
                continue
            fn = _base(sites[name]["fn"])
            x = values.pop(name)
            loc, scale = (
                torch.broadcast_to(p, sites[name]["value"].shape).reshape(x.shape)
                for p in (fn.loc, fn.scale)
            )
            values[name + SUFFIX] = (x - loc) * scale.pow(centred - 1) + centred * loc
    return new.pack(values)
