r"""Warm start of a flow guide: MAP and Laplace approximation in the unconstrained space.

For a model with latent vector $u \in \mathbb R^D$ (ADVI's unconstrained coordinates), the
target of the guide is $\log p(u) = \log p(x, T(u)) + \log|\det J_T(u)|$. The warm start

1. maximises $\log p(u)$ by L-BFGS from several starts at once (one vectorised model run per
   evaluation, the starts in a particle plate): the init strategy's point and jittered copies;
2. takes the Hessian $H = -\nabla^2 \log p(\hat u)$ by autograd and its Cholesky factor, so
   $\mathcal N(\hat u, H^{-1})$ is the Laplace approximation; where $H$ is not positive
   definite, a diagonal $1 / \sqrt{H_{ii}}$ (or the guide's ``init_scale``) replaces it;
3. when starts end on several optima of similar height (a multimodal posterior), keeps the
   init point with the guide's ``init_scale`` instead: a Gaussian around one optimum is a poor
   start there, and training (with annealing) spreads better from a broad one.

[`AutoFlow`][pyroflows.guides.AutoFlow] puts $(\hat u, L)$, $L L^\top = H^{-1}$, in a fixed
affine map after its flow, so the flow and its learnable affine stage work in whitened
coordinates where the posterior has unit scale and little correlation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample


@dataclass
class WarmStart:
    """The result of [`laplace_warm_start`][pyroflows.guides.warm_start.laplace_warm_start].

    Attributes:
        loc: the MAP point $\\hat u$ (or the init point when the MAP failed).
        scale_tril: lower-triangular $L$ with $L L^\\top$ the Laplace covariance.
        kind: ``"full"`` (Cholesky of $H^{-1}$), ``"diagonal"`` (fallback), ``"multimodal"``
            (starts ended on several optima of similar height: the init point with the guide's
            ``init_scale``), ``"map"`` (no Laplace) or ``"init"`` (no usable MAP: the init
            point with the guide's ``init_scale``).
        log_density: $\\log p(\\hat u)$ (unnormalised).
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor
    kind: str
    log_density: float


def _site_slices(guide: Any) -> list[tuple[str, slice]]:
    slices, pos = [], 0
    for name, _ in guide.prototype_trace.iter_stochastic_nodes():
        size = guide._unconstrained_shapes[name].numel()
        slices.append((name, slice(pos, pos + size)))
        pos += size
    return slices


def plate_nesting(model: Callable, args: tuple, kwargs: dict) -> int:
    """Depth of the deepest vectorised plate in one run of ``model`` (observed sites included)."""
    trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    return max(
        (
            -frame.dim
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ),
        default=0,
    )


def unconstrained_log_density(
    guide: Any, model: Callable, u: torch.Tensor, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, Any]:
    """$\\log p(u_k)$ for a batch ``u`` of shape ``(K, D)``: one vectorised model run with the
    batch in a plate outside the model's own (at ``guide._max_plate_nesting``, set by
    [`plate_nesting`][pyroflows.guides.warm_start.plate_nesting]), or one run per row for a
    model that does not broadcast over an outer batch dimension (``guide._vectorizable``
    remembers which).

    Returns:
        ``(log_density of shape (K,), the last model trace)``.
    """
    if getattr(guide, "_vectorizable", True):
        try:
            return _log_density(guide, model, u, args, kwargs, vectorized=True)
        except (ValueError, RuntimeError):
            if len(u) == 1:
                raise
            guide._vectorizable = False
    rows = [_log_density(guide, model, row[None], args, kwargs) for row in u]
    return torch.cat([value for value, _ in rows]), rows[-1][1]


def _log_density(
    guide: Any,
    model: Callable,
    u: torch.Tensor,
    args: tuple,
    kwargs: dict,
    vectorized: bool = False,
) -> tuple[torch.Tensor, Any]:
    nesting = guide._max_plate_nesting
    try:
        # invisible to any trace the caller is running (e.g. SVI's)
        with poutine.block():
            if vectorized:
                guide._fixed_latent = u.reshape(len(u), *([1] * nesting), u.shape[-1])
                log_w, model_trace, _ = vectorized_importance_weights(
                    model,
                    guide,
                    *args,
                    num_samples=len(u),
                    max_plate_nesting=nesting,
                    **kwargs,
                )
                return log_w.reshape(len(u)), model_trace
            guide._fixed_latent = u[0]
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            log_w = sum(_site_log_probs(model_trace).values()) - sum(
                _site_log_probs(guide_trace).values()
            )
            return log_w.reshape(1), model_trace
    finally:
        guide._fixed_latent = None


def _vectorizes(guide: Any, model: Callable, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether the model runs with a batch of two latents in an outer plate."""
    unconstrained_log_density(guide, model, torch.stack([x, x]), args, kwargs)
    return getattr(guide, "_vectorizable", True)


def _density_or_nan(
    guide: Any, model: Callable, x: torch.Tensor, args: tuple, kwargs: dict
) -> torch.Tensor:
    """``log p(x)`` of one point, NaN where the model refuses it (a parameter out of support)."""
    try:
        return _log_density(guide, model, x[None], args, kwargs)[0]
    except (ValueError, RuntimeError):
        return x.new_full((1,), math.nan)


def _site_log_probs(trace: Any) -> dict[str, torch.Tensor]:
    """Each sample site's summed log-density (Pyro's ``compute_log_prob`` validation makes
    tensors on the default device, so it is not used)."""
    return {
        name: site["fn"].log_prob(site["value"]).sum()
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _nonfinite_site(model_trace: Any) -> str | None:
    for name, value in _site_log_probs(model_trace).items():
        if not bool(torch.isfinite(value)):
            return name
    return None


def laplace_warm_start(
    guide: Any,
    model: Callable,
    args: tuple,
    kwargs: dict,
    *,
    init: torch.Tensor,
    init_scale: float,
    num_starts: int = 8,
    jitter: float = 2.0,
    max_iter: int = 100,
    laplace: bool = True,
    max_dense_dim: int = 256,
) -> WarmStart:
    """MAP by batched multi-start L-BFGS, then the Laplace approximation at it.

    Args:
        guide: an ``AutoContinuous`` guide whose prototype is set up, with
            ``_max_plate_nesting`` set and a ``sample_latent`` that honours
            ``guide._fixed_latent``.
        model: the model.
        args: the model's arguments.
        kwargs: the model's keyword arguments.
        init: the init strategy's point (the first start).
        init_scale: the diagonal scale used when no curvature is usable.
        num_starts: starts optimised together (the init point and ``num_starts - 1`` copies
            jittered by uniform noise of half-width ``jitter``).
        jitter: half-width of that noise.
        max_iter: L-BFGS iterations.
        laplace: take the Hessian (else only the MAP, with ``init_scale``).
        max_dense_dim: above this dimension only the Hessian's diagonal is used.

    Returns:
        A [`WarmStart`][pyroflows.guides.warm_start.WarmStart].

    Raises:
        ValueError: the log-density is not finite at the init point (the site is named).

    Warns:
        UserWarning: the MAP runs away (an improper posterior): the sites that diverge are
            named and the init point is used instead.
    """
    dim = init.numel()
    start_density, trace = _log_density(guide, model, init[None], args, kwargs)
    if not bool(torch.isfinite(start_density)):
        site = _nonfinite_site(trace)
        raise ValueError(
            f"the model's log-density is not finite at the initial point (site {site!r}); "
            "check its support and data, or pass another init_loc_fn"
        )
    if not _vectorizes(guide, model, init, args, kwargs):
        num_starts = 1  # one model run per start and per evaluation: the init point only
    noise = 2 * torch.rand((num_starts - 1, dim), dtype=init.dtype, device=init.device) - 1
    starts = torch.cat([init[None], init + jitter * noise])
    u = starts.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=10 * torch.finfo(u.dtype).eps,
        history_size=20,
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        log_p, _ = unconstrained_log_density(guide, model, u, args, kwargs)
        # non-finite starts drop out of the sum instead of poisoning the others
        loss = -torch.where(torch.isfinite(log_p), log_p, log_p.new_zeros(())).sum()
        loss.backward()
        u.grad.nan_to_num_(0.0, 0.0, 0.0)
        return loss

    fallback = WarmStart(
        init.detach(),
        torch.diag_embed(torch.full_like(init, init_scale)),
        "init",
        float(start_density),
    )
    try:
        optimizer.step(objective)
    except (ValueError, RuntimeError):  # a start left the support: keep what is usable
        pass
    with torch.no_grad():
        final = torch.cat([_density_or_nan(guide, model, row, args, kwargs) for row in u])
        ok = torch.isfinite(final) & torch.isfinite(u).all(-1)
        far = ((u - starts).abs() > 50) | ~torch.isfinite(u)  # exp(50): a scale gone to 0 or inf
        if bool(ok.any()):
            best = int(torch.where(ok, final, final.new_full((), -math.inf)).argmax())
            runaway = far[best]
        else:
            best, runaway = 0, far.any(0)
        if bool(runaway.any()):
            sites = [name for name, s in _site_slices(guide) if bool(runaway[s].any())]
            warnings.warn(
                f"the MAP search diverges along site(s) {', '.join(map(repr, sites))}: the "
                "posterior may be improper (a flat prior without enough data?); the warm start "
                "falls back to the init point",
                UserWarning,
                stacklevel=4,
            )
            return fallback
        if not bool(ok.any()):
            return fallback
        loc = u[best].detach().clone()
    if not laplace:
        return WarmStart(loc, fallback.scale_tril, "map", float(final[best]))

    def laplace_at(x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The Laplace scale at ``x``: Cholesky of the inverse Hessian, else diagonal."""

        def neg_log_density(y: torch.Tensor) -> torch.Tensor:
            return -_log_density(guide, model, y[None], args, kwargs)[0][0]

        if dim <= max_dense_dim:
            hessian = torch.autograd.functional.hessian(neg_log_density, x)
            hessian = 0.5 * (hessian + hessian.T)
            precision_tril, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0 and bool(torch.isfinite(precision_tril).all()):
                cov = torch.cholesky_inverse(precision_tril)
                scale_tril, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
                if int(info) == 0:
                    return scale_tril, "full"
            diag = torch.diagonal(hessian)
        else:
            diag = _hessian_diagonal(neg_log_density, x)
        fill = torch.full_like(diag, init_scale)
        return torch.diag_embed(torch.where(diag > 0, diag.clamp(min=1e-30).rsqrt(), fill)), (
            "diagonal")

    scale_tril, kind = laplace_at(loc)
    modes = _other_modes(u.detach(), final, ok, best, scale_tril)
    if modes:
        # several optima of similar height: a Gaussian around one of them is a poor start
        # (and around all of them a degenerate one); start broad at the init point instead
        return WarmStart(fallback.loc, fallback.scale_tril, "multimodal", fallback.log_density)
    return WarmStart(loc, scale_tril, kind, float(final[best]))


def _other_modes(
    u: torch.Tensor, log_p: torch.Tensor, ok: torch.Tensor, best: int, scale_tril: torch.Tensor,
    *, separation: float = 3.0, height: float = 5.0,
) -> list[int]:
    """Starts that ended on other optima than ``best``: more than ``separation`` Laplace sds
    from it and from each other, and within ``height`` nats of its log-density."""
    whiten = torch.linalg.solve_triangular(scale_tril, u.T, upper=False).T
    found: list[int] = [best]
    for k in torch.argsort(log_p, descending=True).tolist():
        if k in found or not bool(ok[k]) or bool(log_p[k] < log_p[best] - height):
            continue
        if all(float((whiten[k] - whiten[j]).norm()) > separation for j in found):
            found.append(k)
    return found[1:]


def _hessian_diagonal(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Diagonal of the Hessian of ``fn`` at ``x`` by one Hessian-vector product per coordinate."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x, create_graph=True)
    rows = [torch.autograd.grad(grad[i], x, retain_graph=True)[0][i] for i in range(len(x))]
    return torch.stack(rows).detach()
