r"""Targets built from Gaussians, with exact normalizers and exact samples.

- ``gaussian``: $\mathcal N(\mu, \Sigma)$ (default: 2-D, unit variances, correlation 0.9) — the
  reference for samplers' means and covariances.
- ``banana``: $x_1 \sim \mathcal N(0, 1)$, $x_2 \mid x_1 \sim \mathcal N(x_1^2 - 1, 1)$, so
  $U(x) = \tfrac12 x_1^2 + \tfrac12 (x_2 - x_1^2 + 1)^2$ and $Z = 2\pi$; mean 0, variances 1 and 3.
- ``funnel``: Neal's funnel in $d$ dimensions, $v \sim \mathcal N(0, 3^2)$,
  $x_i \mid v \sim \mathcal N(0, e^{v})$ for $i < d$:
  $U = v^2 / 18 + \sum_i \bigl(\tfrac12 x_i^2 e^{-v} + v / 2\bigr)$, $Z = 3 (2\pi)^{d/2}$.
- ``mixture``: $\sum_k \pi_k \mathcal N(\mu_k, \sigma_k^2 I)$, normalised ($Z = 1$).

Every constant an energy needs (the Cholesky factor, the log-determinant, the mixture's log
weights and normalising terms) is computed once at construction; a call does only the work that
depends on ``x``.

Reference: Neal (2003), *Slice sampling*, Annals of Statistics (the funnel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pyroflows.energies.base import Target
from pyroflows.validation import check_int, check_number, check_positive


def _as_float64(value: Any, name: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a number, a sequence of numbers or a tensor, got {value!r}"
        ) from None
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite")
    return out


class Gaussian(Target):
    """A multivariate Normal $\\mathcal N(\\mu, \\Sigma)$ as an energy.

    The energy is $\\tfrac12 \\|L^{-1}(x - \\mu)\\|^2$ with $\\Sigma = L L^\\top$ factored once.
    A dense covariance costs one triangular solve of the whole ``(N, D)`` batch against the
    cached factor (never a copy of the factor per point); a diagonal one is an elementwise
    division.

    Args:
        loc: mean, shape ``(D,)``.
        covariance: a positive-definite ``(D, D)`` matrix, or ``(D,)`` positive variances for a
            diagonal covariance.
    """

    has_sampler = True

    def __init__(
        self, loc: Sequence[float] | torch.Tensor, covariance: Sequence | torch.Tensor
    ) -> None:
        loc, cov = _as_float64(loc, "loc"), _as_float64(covariance, "covariance")
        dim = loc.shape[0] if loc.dim() == 1 else -1
        if loc.dim() != 1 or cov.shape not in ((dim,), (dim, dim)):
            raise ValueError(
                f"loc must be (D,) and covariance (D, D) or (D,), "
                f"got {tuple(loc.shape)} and {tuple(cov.shape)}"
            )
        if cov.dim() == 1:
            if (cov <= 0).any():
                raise ValueError("covariance must hold positive variances")
            factor = cov.sqrt()
        else:
            factor, info = torch.linalg.cholesky_ex(cov)
            if info != 0 or not torch.allclose(cov, cov.T):
                raise ValueError("covariance must be symmetric positive definite")
        super().__init__(loc.shape)
        self.register_buffer("loc", loc.float())
        # standard deviations (diagonal) or the lower Cholesky factor (dense)
        self.register_buffer("factor", factor.float())
        # from the stored (float32) factor, so that it normalises the energy as evaluated
        scales = self.factor.double()
        scales = scales.diagonal() if scales.dim() == 2 else scales
        self._log_z = 0.5 * dim * math.log(2 * math.pi) + scales.log().sum().item()

    @property
    def is_diagonal(self) -> bool:
        """Whether the covariance was given as a diagonal (variances)."""
        return self.factor.dim() == 1

    @property
    def scale_tril(self) -> torch.Tensor:
        """The lower Cholesky factor $L$ of the covariance, ``(D, D)``."""
        return self.factor.diag_embed() if self.is_diagonal else self.factor

    @property
    def covariance(self) -> torch.Tensor:
        """$\\Sigma = L L^\\top$, ``(D, D)``."""
        return self.scale_tril @ self.scale_tril.T

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        diff = x - self.loc.to(x)
        factor = self.factor.to(x)  # no copy when x already has the buffers' dtype and device
        if factor.dim() == 1:
            white = diff / factor
        else:
            # W L^T = diff for the whole flattened batch: one triangular solve, factor shared
            flat = diff.reshape(-1, factor.shape[0])
            white = torch.linalg.solve_triangular(factor.T, flat, upper=True, left=False)
        return 0.5 * white.pow(2).sum(-1).reshape(x.shape[:-1])

    @property
    def log_normalizer(self) -> float:
        return self._log_z

    def _sample(self, n: int) -> torch.Tensor:
        noise = torch.randn(n, len(self.loc), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (noise * self.factor if self.is_diagonal else noise @ self.factor.T)


class Banana(Target):
    """The banana: $x_1 \\sim \\mathcal N(0, 1)$, $x_2 \\mid x_1 \\sim \\mathcal N(x_1^2 - 1, 1)$;
    $Z = 2\\pi$."""

    has_sampler = True
    model_scale = 2.0

    def __init__(self) -> None:
        super().__init__((2,))

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., 0], x[..., 1]
        return 0.5 * x1**2 + 0.5 * (x2 - x1**2 + 1) ** 2

    @property
    def log_normalizer(self) -> float:
        return math.log(2 * math.pi)

    def _sample(self, n: int) -> torch.Tensor:
        x1 = torch.randn(n, dtype=self._anchor.dtype, device=self._anchor.device)
        return torch.stack([x1, x1**2 - 1 + torch.randn_like(x1)], -1)


class Funnel(Target):
    """Neal's funnel: $v \\sim \\mathcal N(0, 3^2)$ (coordinate 0), $x_i \\mid v \\sim
    \\mathcal N(0, e^v)$.

    Args:
        dim: total dimension $d \\ge 2$ (``v`` plus ``d - 1`` coordinates); Neal used 10.
    """

    has_sampler = True
    model_scale = 3.0

    def __init__(self, dim: int = 10) -> None:
        super().__init__((check_int(dim, "dim", minimum=2),))

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        v, rest = x[..., 0], x[..., 1:]
        return v**2 / 18 + 0.5 * (rest**2).sum(-1) * torch.exp(-v) + 0.5 * rest.shape[-1] * v

    @property
    def log_normalizer(self) -> float:
        return math.log(3) + 0.5 * self.event_shape[0] * math.log(2 * math.pi)

    def _sample(self, n: int) -> torch.Tensor:
        ref = self._anchor
        v = 3 * torch.randn(n, 1, dtype=ref.dtype, device=ref.device)
        noise = torch.randn(n, self.event_shape[0] - 1, dtype=ref.dtype, device=ref.device)
        return torch.cat([v, torch.exp(v / 2) * noise], -1)


class Mixture(Target):
    """An isotropic Gaussian mixture $\\sum_k \\pi_k \\mathcal N(\\mu_k, \\sigma_k^2 I)$
    (normalised).

    Args:
        locs: component means, ``(K, D)`` (or ``(K,)`` for a 1-D mixture).
        scales: component standard deviations, ``(K,)`` or a single number.
        weights: mixing weights (normalised here), ``(K,)``; equal by default.
    """

    has_sampler = True

    def __init__(
        self,
        locs: Sequence | torch.Tensor,
        scales: Sequence[float] | float | torch.Tensor = 1.0,
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        locs = _as_float64(locs, "locs")
        if locs.dim() == 1:
            locs = locs[:, None]
        if locs.dim() != 2 or len(locs) == 0:
            raise ValueError(f"locs must have shape (K, D) or (K,), got {tuple(locs.shape)}")
        scales = _as_float64(scales, "scales").expand(len(locs))
        weights = _as_float64([1.0] * len(locs) if weights is None else weights, "weights")
        if (scales <= 0).any():
            raise ValueError("scales must be positive")
        if weights.shape != (len(locs),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"weights must be {len(locs)} non-negative numbers with a positive sum"
            )
        super().__init__(locs.shape[1:])
        dim = locs.shape[1]
        weights = weights / weights.sum()
        self.register_buffer("locs", locs.float())
        self.register_buffer("scales", scales.float().clone())
        self.register_buffer("weights", weights.float())
        # per-component constants of log pi_k N(x; mu_k, s_k^2 I), once, from the stored
        # (float32) parameters and kept in float64 so float64 inputs lose nothing
        weights, scales = self.weights.double(), self.scales.double()
        log_coef = weights.log() - dim * scales.log() - 0.5 * dim * math.log(2 * math.pi)
        self.register_buffer("_log_coef", log_coef, persistent=False)
        self.register_buffer("_half_precision", 0.5 / scales**2, persistent=False)
        self.model_scale = float((locs.abs().max() + scales.max()).item())

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        sq = (x[..., None, :] - self.locs.to(x)).pow(2).sum(-1)
        return -torch.logsumexp(self._log_coef.to(x) - self._half_precision.to(x) * sq, -1)

    @property
    def log_normalizer(self) -> float:
        return 0.0

    def _sample(self, n: int) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True)
        noise = torch.randn(
            n, self.event_shape[0], dtype=self.locs.dtype, device=self.locs.device
        )
        return self.locs[k] + self.scales[k, None] * noise


def gaussian(dim: int = 2, correlation: float = 0.9) -> Gaussian:
    """A zero-mean Gaussian with unit variances and constant pairwise ``correlation``.

    Args:
        dim: dimension $D \\ge 1$.
        correlation: the off-diagonal entry, in $(-1/(D-1), 1)$ so the matrix is positive
            definite.

    Returns:
        the target, with a dense covariance.
    """
    dim = check_int(dim, "dim")
    correlation = check_number(
        correlation, "correlation", low=-1 / max(dim - 1, 1), high=1.0, low_open=True,
        high_open=True,
    )
    cov = torch.full((dim, dim), correlation, dtype=torch.float64, device="cpu")
    cov.fill_diagonal_(1.0)
    return Gaussian([0.0] * dim, cov)


def banana() -> Banana:
    """The banana: $x_1 \\sim \\mathcal N(0, 1)$, $x_2 \\mid x_1 \\sim \\mathcal N(x_1^2 - 1, 1)$.

    Returns:
        the target.
    """
    return Banana()


def funnel(dim: int = 10) -> Funnel:
    """Neal's funnel in ``dim`` dimensions.

    Args:
        dim: total dimension (at least 2).

    Returns:
        the target.
    """
    return Funnel(dim)


def mixture(dim: int = 2, separation: float = 4.0, scale: float = 0.7) -> Mixture:
    """Two equal-weight modes at $\\pm$``separation``/2 along the first axis, in ``dim``
    dimensions. For other mixtures build [`Mixture`][pyroflows.energies.gaussian.Mixture]
    directly.

    Args:
        dim: dimension (at least 1).
        separation: distance between the two means.
        scale: standard deviation of each component.

    Returns:
        the target.
    """
    dim = check_int(dim, "dim")
    separation = check_number(separation, "separation")
    scale = check_positive(scale, "scale")
    locs = torch.zeros(2, dim, dtype=torch.float64, device="cpu")
    locs[:, 0] = torch.tensor(
        [-separation / 2, separation / 2], dtype=torch.float64, device="cpu"
    )
    return Mixture(locs, scale)
