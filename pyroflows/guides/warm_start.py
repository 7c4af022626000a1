r"""Warm start of a flow guide: MAP and Laplace approximation in the unconstrained space.

For a model with latent vector $u \in \mathbb R^D$ (ADVI's unconstrained coordinates), the
target of the guide is $\log p(u) = \log p(x, T(u)) + \log|\det J_T(u)|$. The warm start

1. maximises $\log p(u)$ by L-BFGS from several starts at once (one vectorised model run per
   evaluation, the starts in a particle plate): the init strategy's point and jittered copies,
   in antithetic pairs (so that two modes on either side of the init point are both reached);
2. takes the curvature $H = -\nabla^2 \log p(\hat u)$ by Hessian-vector products (batched as
   particles of one model run) and, with $s = \operatorname{diag}(H)^{-1/2}$, the
   eigen-decomposition of $\operatorname{diag}(s) H \operatorname{diag}(s)$: all of it up to
   ``max_dense_dim`` dimensions, so $\mathcal N(\hat u, H^{-1})$ is the Laplace approximation
   (used through the Cholesky factor of $H^{-1}$, after narrowing any eigen-direction along
   which the log-density falls by over 50 nats at one Laplace sd, a quartic or flatter mode,
   to the distance at which it falls by 1/2);
   above, the diagonal plus the ``rank`` eigen-directions (by Lanczos iteration) that matter
   most, a low-rank-plus-diagonal Laplace approximation. Directions of non-positive curvature
   keep the diagonal scale (or the guide's ``init_scale`` where $H_{ii} \le 0$);
3. when starts end on several optima of similar height (a multimodal posterior; a start counts
   only where its gradient is small at the posterior's scale, so unconverged starts on the
   slope of the same optimum do not), keeps the init point with the guide's ``init_scale``
   instead: a Gaussian around one optimum is a poor
   start there, and training (with annealing) spreads better from a broad one.

[`AutoFlow`][pyroflows.guides.AutoFlow] puts $u = \hat u + A x$, $A A^\top \approx H^{-1}$ (a
[`LowRankAffine`][pyroflows.guides.warm_start.LowRankAffine]), in a fixed map after its flow,
so the flow and its learnable affine stage work in whitened coordinates where the posterior
has unit scale and little correlation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.transforms import LowerCholeskyAffine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample
from torch.distributions import Transform, constraints


class LowRankAffine(Transform):
    """$u = \\mu + s \\odot (x + Q((\\sigma - 1) \\odot Q^\\top x))$ with $Q$ ``(D, k)``
    orthonormal: a diagonal scale after a symmetric map that stretches the $k$ directions $Q$ by
    $\\sigma$ (``k = D``: any symmetric positive-definite square root; ``k = 0``: diagonal).

    Its inverse and log-determinant cost $O(Dk)$ too:
    $\\log|\\det| = \\sum_i \\log s_i + \\sum_j \\log \\sigma_j$.

    Args:
        loc: $\\mu$, ``(D,)``.
        scale: $s$, ``(D,)``, positive.
        directions: $Q$, ``(D, k)`` with orthonormal columns.
        direction_scales: $\\sigma$, ``(k,)``, positive.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        directions: torch.Tensor,
        direction_scales: torch.Tensor,
    ) -> None:
        super().__init__()
        self.loc, self.scale = loc, scale
        self.directions, self.direction_scales = directions, direction_scales

    def _stretch(self, x: torch.Tensor, power: float) -> torch.Tensor:
        coef = (x @ self.directions) * (self.direction_scales**power - 1)
        return x + coef @ self.directions.T

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + self.scale * self._stretch(x, 1.0)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._stretch((y - self.loc) / self.scale, -1.0)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_det = self.scale.log().sum() + self.direction_scales.log().sum()
        return log_det.expand(x.shape[:-1])

    def matrix(self) -> torch.Tensor:
        """The dense $D \\times D$ matrix $A$ of the map $x \\mapsto A x + \\mu$."""
        eye = torch.diag_embed(torch.ones_like(self.scale))
        return self._stretch(eye, 1.0).T * self.scale[:, None]


@dataclass
class WarmStart:
    """The result of [`laplace_warm_start`][pyroflows.guides.warm_start.laplace_warm_start]:
    $\\mathcal N(\\hat u, A A^\\top)$ with $A$ the
    [`LowRankAffine`][pyroflows.guides.warm_start.LowRankAffine] of ``scale``, ``directions``
    and ``direction_scales``.

    Attributes:
        loc: the MAP point $\\hat u$ (or the init point when the MAP failed).
        scale: $1 / \\sqrt{H_{ii}}$, the Laplace scale of each coordinate alone (or the guide's
            ``init_scale`` where there is no usable curvature), ``(D,)``.
        directions: eigenvectors $Q$ of the scaled Hessian $\\operatorname{diag}(s) H
            \\operatorname{diag}(s)$ kept, ``(D, k)``.
        direction_scales: $\\lambda^{-1/2}$ for their eigenvalues $\\lambda$, ``(k,)``.
        kind: ``"full"`` (every direction: $A A^\\top = H^{-1}$ exactly), ``"lowrank"`` (the
            ``rank`` directions whose eigenvalues are furthest from 1 plus the diagonal, or the
            positive-definite part of $H$), ``"diagonal"`` (no usable direction),
            ``"multimodal"`` (starts ended on several optima of similar height: the init point
            with the guide's ``init_scale``), ``"map"`` (no Laplace) or ``"init"`` (no usable
            MAP: the init point with the guide's ``init_scale``).
        log_density: $\\log p(\\hat u)$ (unnormalised).
        cost: what the search took: ``"starts"``, ``"lbfgs_evaluations"`` (vectorised
            log-density and gradient evaluations, each of every start at once),
            ``"hessian_vector_products"`` and, in the dense case, ``"secant_evaluations"``
            (log-densities of the flat-direction check).
        scale_tril: up to ``max_dense_dim`` dimensions, the Cholesky factor of $A A^\\top$
            with its flat directions narrowed to the secant scale (where the log-density
            falls by over 50 nats at one Laplace sd; see ``_secant_covariance``), which is
            then the map used (a triangular factor keeps the whitened coordinates aligned
            with the model's sites, where flows find non-Gaussianity most easily); ``None``
            above.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    directions: torch.Tensor
    direction_scales: torch.Tensor
    kind: str
    log_density: float
    cost: dict[str, int] = field(default_factory=dict)
    scale_tril: torch.Tensor | None = None

    @classmethod
    def isotropic(
        cls,
        loc: torch.Tensor,
        scale: float,
        kind: str,
        log_density: float,
        cost: dict[str, int] | None = None,
    ) -> WarmStart:
        """$\\mathcal N(\\text{loc}, \\text{scale}^2 I)$."""
        return cls(
            loc, torch.full_like(loc, scale), loc.new_zeros(len(loc), 0), loc.new_zeros(0),
            kind, log_density, {} if cost is None else cost,
        )

    def transform(self) -> Transform:
        """$x \\mapsto \\hat u + A x$ (with $A$ = ``scale_tril`` where there is one)."""
        if self.scale_tril is not None:
            return LowerCholeskyAffine(self.loc, self.scale_tril)
        return LowRankAffine(self.loc, self.scale, self.directions, self.direction_scales)

    def covariance(self) -> torch.Tensor:
        """$A A^\\top$, dense ``(D, D)``."""
        a = LowRankAffine(self.loc, self.scale, self.directions, self.direction_scales).matrix()
        return a @ a.T


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
    rank: int = 32,
) -> WarmStart:
    """MAP by batched multi-start L-BFGS, then the Laplace approximation at it.

    The Hessian $H$ at the MAP comes from Hessian-vector products, each batch of them one
    vectorised model run (double backward through the particle plate). With $s_i = H_{ii}^{-1/2}$
    the eigen-decomposition $\\operatorname{diag}(s) H \\operatorname{diag}(s) = Q \\Lambda
    Q^\\top$ gives $H^{-1} = A A^\\top$, $A = \\operatorname{diag}(s)\\, Q \\Lambda^{-1/2}
    Q^\\top$. Up to ``max_dense_dim`` dimensions every eigenpair is computed (dense $H$);
    above, the diagonal comes from $D$ batched products and the ``rank`` eigenpairs by Lanczos
    iteration (about ``3 * rank`` sequential products) whose eigenvalues are furthest from 1
    by $\\lambda - 1 - \\log\\lambda$ (each one's share of
    $\\mathrm{KL}$ between the diagonal and the full Laplace approximation): strongly correlated
    coordinates (ridges, $\\lambda \\ll 1$) and tightly coupled ones ($\\lambda \\gg 1$).
    Directions of non-positive curvature keep the diagonal scale.

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
            jittered by uniform noise of half-width ``jitter``, the last half of them the
            mirror images of the first half through the init point).
        jitter: half-width of that noise.
        max_iter: L-BFGS iterations.
        laplace: take the Hessian (else only the MAP, with ``init_scale``).
        max_dense_dim: up to this dimension the whole Hessian is decomposed.
        rank: eigen-directions kept above ``max_dense_dim``.

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
    # antithetic pairs: the last starts mirror the first ones through the init point, so a
    # basin boundary through it (two modes either side of it) is crossed whatever the draws
    pairs = (num_starts - 1) // 2
    noise[num_starts - 1 - pairs :] = -noise[:pairs]
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

    cost = {"starts": num_starts, "lbfgs_evaluations": 0, "hessian_vector_products": 0}

    def objective() -> torch.Tensor:
        cost["lbfgs_evaluations"] += 1
        optimizer.zero_grad()
        log_p, _ = unconstrained_log_density(guide, model, u, args, kwargs)
        # non-finite starts drop out of the sum instead of poisoning the others
        loss = -torch.where(torch.isfinite(log_p), log_p, log_p.new_zeros(())).sum()
        loss.backward()
        u.grad.nan_to_num_(0.0, 0.0, 0.0)
        return loss

    fallback = WarmStart.isotropic(
        init.detach(), init_scale, "init", float(start_density), cost
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
        return WarmStart.isotropic(loc, init_scale, "map", float(final[best]), cost)

    def hvp(vectors: torch.Tensor) -> torch.Tensor:
        cost["hessian_vector_products"] += len(vectors)
        return _hvp(guide, model, loc, vectors, args, kwargs)

    scale, directions, direction_scales = _laplace(
        hvp,
        loc,
        init_scale=init_scale,
        rank=dim if dim <= max_dense_dim else min(rank, dim),
        dense=dim <= max_dense_dim,
    )
    k = len(direction_scales)
    kind = "full" if k == dim else "lowrank" if k else "diagonal"
    start = WarmStart(loc, scale, directions, direction_scales, kind, float(final[best]), cost)
    if dim <= max_dense_dim:
        covariance = start.covariance()

        def log_density(points: torch.Tensor) -> torch.Tensor:
            cost["secant_evaluations"] = cost.get("secant_evaluations", 0) + len(points)
            return unconstrained_log_density(guide, model, points, args, kwargs)[0]

        forked = [loc.device] if loc.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=forked):  # the run's draws as before
            covariance = _secant_covariance(log_density, loc, 0.5 * (covariance + covariance.T))
        start.scale_tril = torch.linalg.cholesky(covariance)
    stationary = _stationary(guide, model, u, ok, start, args, kwargs)
    if _other_modes(u.detach(), final, stationary, best, start.transform()):
        # several optima of similar height: a Gaussian around one of them is a poor start
        # (and around all of them a degenerate one); start broad at the init point instead
        return WarmStart.isotropic(
            init.detach(), init_scale, "multimodal", fallback.log_density, cost
        )
    return start


def _secant_covariance(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    loc: torch.Tensor,
    covariance: torch.Tensor,
    *,
    limit: float = 50.0,
    halvings: int = 30,
) -> torch.Tensor:
    """The Laplace covariance with its flat directions narrowed to the posterior's real width.

    Along an eigen-direction $v_j$ of the covariance with sd $\\sigma_j$, a Gaussian's
    log-density falls by $\\tfrac12$ at $\\hat u \\pm \\sigma_j v_j$ (the mean of the two sides,
    so a MAP that is not quite converged does not count). Where it falls by more than
    ``limit`` nats (or leaves the support), the curvature at the mode understates the width's
    inverse by over an order of magnitude: a quartic or flatter mode (a ring's tangent, as in
    $U_1$), whose Laplace sd can be a hundred times the posterior's. There $\\sigma_j$ becomes
    the secant scale, the distance at which the log-density has fallen by $\\tfrac12$, found by
    halving $\\sigma_j$ (one vectorised evaluation of every halving of every such direction)
    and interpolating the fall as a power of the distance between the last two halvings.
    Directions within ``limit`` are untouched, so a near-Gaussian posterior keeps its Laplace
    approximation exactly.
    """
    variances, vectors = torch.linalg.eigh(covariance)
    sds = variances.clamp(min=0).sqrt()
    axes = (vectors * sds).T  # row j: sigma_j v_j
    dim = len(loc)

    def symmetric_fall(steps: torch.Tensor) -> torch.Tensor:
        """Mean fall of the log-density at loc +- each row of ``steps``, +inf off the support."""
        values = log_density(torch.cat([loc[None], loc + steps, loc - steps]))
        fall = values[0] - 0.5 * (values[1 : len(steps) + 1] + values[len(steps) + 1 :])
        return torch.where(torch.isfinite(fall), fall, fall.new_full((), math.inf))

    flat = (symmetric_fall(axes) > limit).nonzero().flatten()
    if len(flat) == 0:
        return covariance
    factors = 0.5 ** torch.arange(halvings + 1, dtype=loc.dtype, device=loc.device)
    steps = (factors[:, None, None] * axes[flat][None]).reshape(-1, dim)
    falls = symmetric_fall(steps).reshape(len(factors), len(flat))  # (halving, direction)
    for column, j in enumerate(flat.tolist()):
        fall = falls[:, column]
        within = (fall <= 0.5).nonzero().flatten()
        if len(within) == 0:  # narrower than 2^-halvings of the Laplace sd: keep the last
            sds[j] = sds[j] * factors[-1]
            continue
        k = int(within[0])  # the widest halving where the fall is at most 1/2
        factor = factors[k]
        if k > 0 and bool(torch.isfinite(fall[k - 1])) and float(fall[k]) > 0:
            power = math.log2(float(fall[k - 1] / fall[k]))  # fall ~ distance^power locally
            if power > 0:
                factor = factor * min(2.0, (0.5 / float(fall[k])) ** (1 / power))
        sds[j] = sds[j] * factor
    covariance = (vectors * sds**2) @ vectors.T
    return 0.5 * (covariance + covariance.T)


def _hvp(
    guide: Any, model: Callable, x: torch.Tensor, vectors: torch.Tensor, args: tuple, kwargs: dict
) -> torch.Tensor:
    """$H v$ for each row $v$ of ``vectors`` ``(m, D)``, $H = -\\nabla^2 \\log p(x)$: the rows
    are batched as particles of one vectorised model run, differentiated twice."""
    u = x.detach().expand(len(vectors), -1).clone().requires_grad_(True)
    log_p, _ = unconstrained_log_density(guide, model, u, args, kwargs)
    (grad,) = torch.autograd.grad(log_p.sum(), u, create_graph=True)
    (hv,) = torch.autograd.grad((grad * vectors).sum(), u)
    return -hv


def _laplace(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    init_scale: float,
    rank: int,
    dense: bool,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, directions, direction_scales)`` of the Laplace approximation from
    Hessian-vector products ``hvp(V) = V H`` (see
    [`laplace_warm_start`][pyroflows.guides.warm_start.laplace_warm_start])."""
    dim = len(x)
    eye = torch.diag_embed(torch.ones_like(x))
    if dense:
        hessian = torch.cat([hvp(eye[i : i + chunk]) for i in range(0, dim, chunk)])
        hessian = 0.5 * (hessian + hessian.T)
        diag = torch.diagonal(hessian)
    else:  # the diagonal only, a block of columns at a time
        diag = torch.cat(
            [hvp(eye[i : i + chunk])[:, i : i + chunk].diagonal() for i in range(0, dim, chunk)]
        )
    usable = torch.isfinite(diag) & (diag > 0)
    scale = torch.where(usable, diag.clamp(min=1e-300).rsqrt(), torch.full_like(x, init_scale))
    # the scaled Hessian on the usable coordinates (identity on the others)
    keep = usable.to(x.dtype)

    def scaled(v: torch.Tensor) -> torch.Tensor:
        return hvp(v * keep * scale) * keep * scale + v * (1 - keep)

    if dense:
        matrix = hessian * (keep * scale)[:, None] * (keep * scale) + torch.diag_embed(1 - keep)
        values, vectors = torch.linalg.eigh(matrix)
    else:
        values, vectors = _lanczos(scaled, x, min(dim, 3 * rank + 10))
    # directions of clearly positive curvature, by their share of the KL to the diagonal
    positive = torch.isfinite(values) & (values > dim * torch.finfo(x.dtype).eps ** 0.5)
    gain = torch.where(positive, values - 1 - values.clamp(min=1e-300).log(), -values.new_ones(()))
    order = torch.argsort(gain, descending=True)[:rank]
    order = order[positive[order]]
    return scale, vectors[:, order], values[order].rsqrt()


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs ``(values (m,), vectors (D, m))`` of a symmetric operator after ``steps``
    Lanczos iterations from a random start, with full reorthogonalisation (the extreme
    eigenvalues at both ends converge first)."""
    dim = len(like)
    basis = like.new_zeros(steps, dim)
    alpha, beta = like.new_zeros(steps), like.new_zeros(steps)
    v = torch.randn(dim, dtype=like.dtype, device=like.device)
    v = v / v.norm()
    m = steps
    for j in range(steps):
        basis[j] = v
        w = matvec(v[None])[0]
        alpha[j] = w @ v
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # full reorthogonalisation, twice
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta[j] = w.norm()
        if j + 1 == steps or beta[j] <= 1e-10 * alpha[: j + 1].abs().max():
            m = j + 1  # an invariant subspace: its Ritz pairs are exact
            break
        v = w / beta[j]
    tridiagonal = torch.diag_embed(alpha[:m]) + torch.diag_embed(beta[: m - 1], 1)
    tridiagonal = tridiagonal + torch.diag_embed(beta[: m - 1], -1)
    values, ritz = torch.linalg.eigh(tridiagonal)
    return values, basis[:m].T @ ritz


def _stationary(
    guide: Any,
    model: Callable,
    u: torch.Tensor,
    ok: torch.Tensor,
    start: WarmStart,
    args: tuple,
    kwargs: dict,
    tolerance: float = 1.0,
) -> torch.Tensor:
    """Which finite starts ended where the gradient is small at the posterior's scale,
    $\\lVert A^\\top \\nabla \\log p(u_k) \\rVert < $ ``tolerance`` (a point $r$ Laplace sds
    down the slope of the same optimum has about $r$): optima, not unconverged points."""
    x = torch.where(ok[:, None], u.detach(), start.loc).requires_grad_(True)
    with torch.enable_grad():
        log_p, _ = unconstrained_log_density(guide, model, x, args, kwargs)
        (grad,) = torch.autograd.grad(log_p.sum(), x)
    if start.scale_tril is not None:
        whitened = grad @ start.scale_tril
    else:
        whitened = start.transform()._stretch(grad * start.scale, 1.0)
    return ok & (whitened.norm(dim=-1) < tolerance)


def _other_modes(
    u: torch.Tensor, log_p: torch.Tensor, ok: torch.Tensor, best: int, whitening: Transform,
    *, separation: float = 3.0, height: float = 5.0,
) -> list[int]:
    """Starts that ended on other optima than ``best`` (``ok``: at an optimum): more than
    ``separation`` Laplace sds from it and from each other, and within ``height`` nats of its
    log-density."""
    whiten = whitening.inv(u)
    found: list[int] = [best]
    for k in torch.argsort(log_p, descending=True).tolist():
        if k in found or not bool(ok[k]) or bool(log_p[k] < log_p[best] - height):
            continue
        if all(float((whiten[k] - whiten[j]).norm()) > separation for j in found):
            found.append(k)
    return found[1:]
