r"""Neural spline flows: monotonic rational-quadratic splines in the coupling (``nsf``) and
autoregressive (``nsf_ar``) mechanisms.

On $[-B, B]$ the map is a monotonic rational-quadratic spline with $K$ bins (Gregory and
Delbourgo, 1982); outside it is the identity (linear tails), and the derivative at $\pm B$ is 1,
so the map is $C^1$ on $\mathbb R$. With knots $(x_k, y_k)$, bin width $w_k$, height $h_k$,
slope $s_k = h_k / w_k$, knot derivatives $\delta_k$ and $\xi = (x - x_k) / w_k \in [0, 1]$
in bin $k$,

$$
y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi (1 - \xi)]}{s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,
\xi (1 - \xi)}, \qquad
\frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1} \xi^2 + 2 s_k \xi (1 - \xi) + \delta_k (1 - \xi)^2]}
{[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi)]^2}.
$$

The inverse is exact: $\xi$ is the root in $[0, 1]$ of $a \xi^2 + b \xi + c = 0$ with
$a = h_k (s_k - \delta_k) + (y - y_k)\,\delta$, $b = h_k \delta_k - (y - y_k)\,\delta$,
$c = -s_k (y - y_k)$, $\delta = \delta_{k+1} + \delta_k - 2 s_k$, taken in the cancellation-free
form $\xi = 2c / (-b - \sqrt{b^2 - 4ac})$ (no bisection).

The network outputs $3K - 1$ numbers per coordinate: widths and heights through a softmax
(each at least ``min_bin_width`` / ``min_bin_height`` times $2B$), interior derivatives as
$\delta = \exp(c \tanh(r / c))$ with $c = \log(1 / \text{min\_derivative})$ (soft-clamped
log-derivatives, like the affine map's log-scale), so a zero output gives $\delta = 1$. The
conditioner's output layer starts at zero, so every spline (and every flow built from them)
starts as the identity.

``nsf`` and ``nsf_ar`` evaluate the spline formula in ``log_prob`` (data to base) and the root
when sampling (``direction="density"``, as zuko and nflows do); ``direction="sample"`` swaps the
two, a different function family (the inverse of a rational-quadratic spline is not one).

Reference: Durkan, Bekasov, Murray, Papamakarios (2019), *Neural Spline Flows*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("nsf", 2)
    >>> x, log_q = flow.rsample_and_log_prob((100,))
    >>> torch.allclose(flow.log_prob(x), log_q, atol=1e-4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyroflows.registry import flow_family
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.autoregressive import Autoregressive, autoregressive_layers
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.coupling import Coupling, coupling_layers, coupling_mask
from pyroflows.transforms.elementwise import ElementwiseMap, Inverse, Params
from pyroflows.transforms.multiscale import check_image_shape
from pyroflows.validation import check_choice, check_int, check_positive


class RationalQuadraticSpline:
    """The monotonic rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Args:
        bins: number of bins ``K`` (``3K - 1`` parameters per coordinate).
        bound: half-width ``B`` of the interval the spline acts on.
        min_bin_width: smallest bin width, as a fraction of ``2B`` (``bins * min_bin_width < 1``).
        min_bin_height: smallest bin height, as a fraction of ``2B`` (same constraint).
        min_derivative: smallest knot derivative, in ``(0, 1)``; the largest is its inverse
            (keeps the map strictly increasing and its slopes finite).

    Raises:
        ValueError: a non-positive ``bins`` or ``bound``, or minimum widths/heights that do not
            fit (``bins * min_bin_width >= 1``), naming the argument.
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        self.bins = check_int(bins, "bins")
        self.bound = check_positive(bound, "bound")
        self.min_bin_width = check_positive(min_bin_width, "min_bin_width", below=1 / self.bins)
        self.min_bin_height = check_positive(min_bin_height, "min_bin_height", below=1 / self.bins)
        self.min_derivative = check_positive(min_derivative, "min_derivative", below=1.0)
        # log-derivatives are soft-clamped to +-log(1 / min_derivative), as the affine map's
        # log-scale is: no overflow, and a zero network output is derivative 1 (the identity).
        self._log_bound = -math.log(self.min_derivative)
        self.num_params = 3 * self.bins - 1

    def __repr__(self) -> str:
        return f"RationalQuadraticSpline(bins={self.bins}, bound={self.bound:g})"

    def _edges(self, raw: torch.Tensor, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin sizes and right edges ``(K, M)`` from raw outputs ``(K, M)``, in units of ``2B``
        measured from ``-B``."""
        k = self.bins
        size = torch.softmax(raw, dim=0).mul(1 - minimum * k).add_(minimum)
        # the cumulative sum along the short bin axis as one small matmul: faster on CPU than
        # cumsum over a non-innermost dimension
        lower = torch.ones(k, k, device=raw.device, dtype=raw.dtype).tril_()
        return size, lower @ size

    def _knots(self, raw: torch.Tensor, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin sizes ``(..., K)`` and knot positions ``(..., K + 1)`` from raw outputs
        ``(..., K)`` (for plots and tests; the evaluation works on the same edges)."""
        flat = raw.reshape(-1, self.bins).T
        size, right = self._edges(flat, minimum)
        knots = torch.cat([torch.zeros_like(right[:1]), right]).T.reshape(*raw.shape[:-1], -1)
        scale = 2 * self.bound
        return scale * size.T.reshape(raw.shape), scale * knots - self.bound

    def _spline(
        self, inputs: torch.Tensor, params: Params, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, bound = self.bins, self.bound
        shape = inputs.shape
        # parameters may broadcast (a coupling's constants): tables stay at their own size M
        pshape = (1,) * (inputs.dim() - params[0].dim()) + tuple(params[0].shape)
        # bins along the rows, (P, M): every per-bin operation runs over contiguous memory
        raw = torch.stack(params).reshape(len(params), -1)
        m = raw.shape[1]
        widths, right_x = self._edges(raw[:k], self.min_bin_width)
        heights, right_y = self._edges(raw[k : 2 * k], self.min_bin_height)
        inside = (inputs > -bound) & (inputs < bound)
        # work in [0, 1] (units of 2B from -B); clamping keeps the discarded branch finite
        u = (inputs.clamp(-bound, bound) + bound) / (2 * bound)
        right = (right_y if inverse else right_x)[:-1].view(k - 1, *pshape)
        idx = (right < u).sum(0, dtype=torch.int32).reshape(-1)
        col = torch.arange(m, device=inputs.device).view(pshape).expand(shape).reshape(-1)
        flat = idx * m + col  # flat index of (bin, parameter column) of every input element

        def take(table: torch.Tensor, offset: int = 0) -> torch.Tensor:
            return table.take(flat + offset).view(shape)

        w_k, h_k = take(widths), take(heights)
        x_k, y_k = take(right_x) - w_k, take(right_y) - h_k
        # knot derivatives: raw 0 (derivative 1) at the two ends, for the identity tails
        edge = raw.new_zeros(1, m)
        raw_d = torch.cat([edge, raw[2 * k :], edge])
        log_d = torch.tanh(torch.stack([take(raw_d), take(raw_d, m)]) / self._log_bound)
        d_k, d_k1 = torch.exp(self._log_bound * log_d).unbind(0)
        s_k = h_k / w_k
        delta = d_k1 + d_k - 2 * s_k
        if inverse:
            dy = u - y_k
            a = h_k * (s_k - d_k) + dy * delta
            b = h_k * d_k - dy * delta
            c = -s_k * dy
            disc = (b * b - 4 * a * c).clamp_min(0)
            xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        else:
            xi = ((u - x_k) / w_k).clamp(0, 1)
        xi1 = xi * (1 - xi)
        denom = s_k + delta * xi1
        if inverse:
            out = x_k + xi * w_k
        else:
            out = y_k + h_k * (s_k * xi * xi + d_k * xi1) / denom
        numer = d_k1 * xi * xi + 2 * s_k * xi1 + d_k * (1 - xi) * (1 - xi)
        log_deriv = torch.log(s_k * s_k * numer / (denom * denom))
        out = out * (2 * bound) - bound
        return torch.where(inside, out, inputs), torch.where(inside, log_deriv, 0.0)

    def forward(self, z: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = f(z)`` and ``log f'(z)``, elementwise; ``params``: ``3K - 1`` tensors shaped
        like ``z`` (raw widths, raw heights, raw interior derivatives)."""
        return self._spline(z, params, inverse=False)

    def inverse(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = f^{-1}(x)`` (analytic) and the forward ``log f'(z)``, elementwise."""
        return self._spline(x, params, inverse=True)


DIRECTIONS = ("density", "sample")


def oriented_spline(direction: str = "density", **spline: Any) -> ElementwiseMap:
    """A rational-quadratic spline whose formula runs in ``direction``.

    Args:
        direction: ``"density"`` (default): the spline formula maps data to base (``x -> z``,
            what ``log_prob`` evaluates, as in zuko, nflows and Durkan et al.'s density
            experiments) and sampling takes the quadratic root; ``"sample"``: the formula maps
            base to data and ``log_prob`` takes the root.
        **spline: options of
            [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline].

    Raises:
        ValueError: an unknown ``direction`` or a bad spline option.
    """
    check_choice(direction, "direction", DIRECTIONS)
    rqs = RationalQuadraticSpline(**spline)
    # layers call ``forward`` when sampling: the density direction is the spline's inverse map
    return Inverse(rqs) if direction == "density" else rqs


def spline_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parity: int = 0,
    mask: str = "half",
    unconditional: bool = True,
    direction: str = "density",
    **spline: Any,
) -> Coupling:
    """One rational-quadratic spline coupling layer over vectors (Pyro-style helper).

    Args:
        input_dim: ``D``.
        hidden_dims: conditioner MLP widths.
        context_dim: width of a context vector, or ``None``.
        parity: 0 or 1: which part is transformed.
        mask: ``"half"`` or ``"alternate"``.
        unconditional: also map the conditioning part with a spline of learned constant
            parameters, so the layer transforms every coordinate.
        direction: which direction evaluates the spline formula (see
            [`oriented_spline`][pyroflows.transforms.spline.oriented_spline]).
        **spline: ``bins``, ``bound``, ``min_bin_width``, ``min_bin_height``,
            ``min_derivative`` of
            [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline].
    """
    return Coupling(
        coupling_mask((input_dim,), mask, parity),
        oriented_spline(direction, **spline),
        hidden_dims,
        context_dim,
        unconditional,
    )


def spline_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parallel: str = "inverse",
    ordering: Sequence[int] | torch.Tensor | None = None,
    direction: str = "density",
    **spline: Any,
) -> Autoregressive:
    """One rational-quadratic spline autoregressive layer (Pyro-style helper).

    Args:
        input_dim: ``D``.
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        parallel: ``"inverse"`` (MAF direction: density in one pass) or ``"forward"`` (IAF
            direction: sampling in one pass).
        ordering: permutation of ``0..D-1`` (default identity).
        direction: which direction evaluates the spline formula (see
            [`oriented_spline`][pyroflows.transforms.spline.oriented_spline]).
        **spline: options of
            [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline].
    """
    return Autoregressive(
        input_dim,
        parallel,
        oriented_spline(direction, **spline),
        hidden_dims,
        context_dim,
        ordering,
    )


@flow_family(image=True, default_layers=4, default_hidden=(64, 64))
def build_nsf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    mask: str | None = None,
    bins: int = 8,
    bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    unconditional: bool = True,
    actnorm: bool = True,
    direction: str = "density",
    nonlinearity: nn.Module | None = None,
) -> list[FlowTransform]:
    """NSF (coupling): ``num_layers`` rational-quadratic spline couplings with alternating masks.

    For images the couplings alternate checkerboard and channel masks (single scale), each
    preceded (in the density direction) by an ActNorm layer when ``actnorm``.

    Options:
        mask: ``"half"`` (vector default) or ``"alternate"``; for images ``"checkerboard"`` or
            ``"channel"`` uses that mask in every layer.
        bins, bound, min_bin_width, min_bin_height, min_derivative: the spline
            ([`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline]).
        unconditional: every coupling also maps its conditioning part with a spline of learned
            constant parameters (as zuko's two-pass NSF and nflows'
            ``apply_unconditional_transform`` do), so each layer transforms every coordinate.
        actnorm: images only: ActNorm before every coupling.
        direction: ``"density"`` (default): ``log_prob`` evaluates the spline formula on the
            data side and sampling takes the quadratic root; ``"sample"``: the other way round
            (see [`oriented_spline`][pyroflows.transforms.spline.oriented_spline]).
        nonlinearity: vectors only: hidden activation of the conditioner MLPs (default ReLU;
            e.g. ``torch.nn.ELU()``).
    """
    spline = oriented_spline(
        direction,
        bins=bins,
        bound=bound,
        min_bin_width=min_bin_width,
        min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    if len(shape) == 1:
        return coupling_layers(
            shape, num_layers, spline, hidden_dims, context_dim, mask, unconditional, nonlinearity
        )
    if nonlinearity is not None:
        raise ValueError("nonlinearity applies to vector nsf flows only (image conditioners use "
                         f"ReLU), got shape {shape}")
    shape = check_image_shape(shape, "nsf")
    alternate = mask is None and shape[0] > 1  # checkerboard, channel, then both flipped
    layers: list[FlowTransform] = []
    for i in range(num_layers):
        kind = ("checkerboard", "channel")[i % 2] if alternate else (mask or "checkerboard")
        parity = (i // 2) % 2 if alternate else i % 2
        cmask = coupling_mask(shape, kind, parity)
        layers.append(Coupling(cmask, spline, hidden_dims, context_dim, unconditional))
        if actnorm:
            layers.append(ActNorm(shape))
    return layers


@flow_family(default_layers=4, default_hidden=(64, 64))
def build_nsf_ar(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    parallel: str = "inverse",
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
    bins: int = 8,
    bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    direction: str = "density",
) -> list[FlowTransform]:
    """NSF (autoregressive): ``num_layers`` rational-quadratic spline MADE layers.

    Options:
        parallel: ``"inverse"`` (default, MAF direction: ``log_prob`` in one pass, exact
            sequential sampling) or ``"forward"`` (IAF direction: sampling and
            ``rsample_and_log_prob`` in one pass, for VI).
        ordering: ``"reverse"``, ``"random"`` or one permutation (see
            [`layer_orderings`][pyroflows.transforms.autoregressive.layer_orderings]).
        bins, bound, min_bin_width, min_bin_height, min_derivative: the spline
            ([`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline]).
        direction: ``"density"`` (default) or ``"sample"``, as for ``nsf``.
    """
    spline = oriented_spline(
        direction,
        bins=bins,
        bound=bound,
        min_bin_width=min_bin_width,
        min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    return autoregressive_layers(
        shape,
        parallel,
        spline,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        ordering=ordering,
    )
