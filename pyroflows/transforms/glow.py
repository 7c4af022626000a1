r"""Glow: ActNorm, invertible 1x1 convolutions and affine couplings in a multi-scale stack.

One *step of flow* is, in the density direction $x \to z$: ActNorm (per-channel affine,
data-initialised), an invertible $1 \times 1$ convolution that mixes the channels, and an affine
coupling with a channel mask whose conditioner's last convolution starts at zero (so every step
starts as the identity). A *level* squeezes $2 \times 2$ patches into channels, runs $K$ steps
and factors half of the channels out to the latent; $L$ levels make the multi-scale
architecture.

The $1 \times 1$ convolution $W \in \mathbb{R}^{C \times C}$ is kept in LU form,

$$
W = P\,L\,\big(U + \operatorname{diag}(\operatorname{sign}(s) \odot e^{\log|s|})\big),
\qquad \log|\det J| = H\,W \sum_c \log|s_c|,
$$

with $P$ a fixed permutation, $L$ unit lower triangular, $U$ strictly upper triangular and the
signs of $s$ fixed at initialisation (a random rotation), so the determinant can never cross zero
and costs $O(C)$, and each direction is one ``einsum``. (Pyro's ``GeneralizedChannelPermute``
learns that diagonal directly, so it can reach 0; ``benchmarks/invconv.py`` compares the two.)

The factored-out half gets a learned prior: a channel-mask affine coupling conditioned on the kept
half, so $z_2 \sim \mathcal{N}(\mu(h_1), \sigma(h_1))$ as in the paper.

``coupling="spline"`` (or ``"additive"``) replaces the affine map of every step's coupling by a
rational-quadratic spline (or a shift, Glow's additive variant); the learned prior stays affine,
since it is the Gaussian prior of the factored-out half.

Reference: Kingma, Dhariwal (2018), *Glow: Generative Flow with Invertible 1x1 Convolutions*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("glow", (1, 8, 8), num_layers=2, hidden_dims=(16,))
    >>> flow.log_prob(torch.rand(4, 1, 8, 8)).shape
    torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyroflows.registry import flow_family
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import FlowTransform, batch_shape_of
from pyroflows.transforms.coupling import Coupling, coupling_mask
from pyroflows.transforms.elementwise import Affine, ElementwiseMap
from pyroflows.transforms.multiscale import (
    FactorOut,
    Squeeze,
    check_image_shape,
    coupling_map,
    scale_count,
)


class InvertibleConv1x1(FlowTransform):
    """Invertible 1x1 convolution ``x[:, h, w] = W z[:, h, w]`` with ``W`` in LU form.

    Args:
        event_shape: ``(C, H, W)``.
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        channels, _, _ = check_image_shape(event_shape, "InvertibleConv1x1")
        super().__init__(tuple(event_shape))
        weight, _ = torch.linalg.qr(torch.randn(channels, channels))
        perm, lower, upper = torch.linalg.lu(weight)
        diag = upper.diagonal()
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", diag.sign())
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_abs_s = nn.Parameter(diag.abs().log())
        self.positions = event_shape[1] * event_shape[2]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(len(self.log_abs_s), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * self.log_abs_s.exp())
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The ``C x C`` matrix ``W = P L U``."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def _log_det(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.log_abs_s.sum() * self.positions).expand(
            batch_shape_of(inputs, self.event_shape)
        )

    def forward_and_log_det(self, z, context=None):
        return torch.einsum("ij,...jhw->...ihw", self.weight(), z), self._log_det(z)

    def inverse_and_log_det(self, x, context=None):
        lower, upper = self._factors()
        # W^{-1} = U^{-1} L^{-1} P^T by two triangular solves: no general matrix inverse
        inv = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        inv = torch.linalg.solve_triangular(upper, inv, upper=True)
        return torch.einsum("ij,...jhw->...ihw", inv, x), self._log_det(x)


def invertible_conv1x1(event_shape: Sequence[int]) -> InvertibleConv1x1:
    """An LU-parameterised invertible 1x1 convolution (Pyro-style helper).

    Args:
        event_shape: ``(C, H, W)``.

    Returns:
        The layer.
    """
    return InvertibleConv1x1(event_shape)


def glow_step(
    event_shape: Sequence[int],
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    parity: int = 0,
    elementwise: str | ElementwiseMap = "affine",
) -> list[FlowTransform]:
    """One Glow step of flow.

    Args:
        event_shape: ``(C, H, W)``.
        hidden_dims: widths of the coupling conditioner.
        context_dim: width of the context, or ``None``.
        parity: which half of the channels the coupling transforms.
        elementwise: the coupling's elementwise map (a name or an object, see
            `pyroflows.transforms.elementwise`).

    Returns:
        Coupling, 1x1 convolution and ActNorm in the sampling order ``z -> x`` (so the density
        direction meets ActNorm first).
    """
    coupling = Coupling(
        coupling_mask(event_shape, "channel", parity), elementwise, hidden_dims, context_dim
    )
    return [coupling, InvertibleConv1x1(event_shape), ActNorm(event_shape)]


def _glow_level(shape, levels, steps, hidden_dims, context_dim, prior, elementwise) -> Squeeze:
    """Squeeze, ``steps`` steps with ``elementwise`` couplings, then (if more levels follow)
    factor out half the channels, with a ``prior`` coupling on them unless it is ``None``."""
    c, h, w = shape
    inner = (4 * c, h // 2, w // 2)
    layers: list[FlowTransform] = []
    if levels > 1:
        kept = (inner[0] // 2, *inner[1:])
        deeper = _glow_level(kept, levels - 1, steps, hidden_dims, context_dim, prior, elementwise)
        layers.append(FactorOut(inner, [deeper], context_dim))
        if prior is not None:  # z_2 | h_1: a coupling of the factored-out half on the kept half
            mask = coupling_mask(inner, "channel", 0)
            layers.append(Coupling(mask, prior, hidden_dims, context_dim))
    for k in reversed(range(steps)):
        layers += glow_step(inner, hidden_dims, context_dim, k % 2, elementwise)
    return Squeeze(shape, layers, context_dim)


@flow_family(vector=False, image=True, default_layers=4, default_hidden=(64,))
def build_glow(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    num_levels: int | None = None,
    learned_prior: bool = True,
    scale_bound: float | None = 3.0,
    coupling: str = "affine",
    bins: int | None = None,
    bound: float | None = None,
) -> list[FlowTransform]:
    """Glow over ``(C, H, W)`` images: ``num_levels`` levels of ``num_layers`` steps each.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        num_levels: number of levels ``L`` (each squeezes once, so ``H`` and ``W`` must be divisible
            by ``2**L``); default: as many as fit, at most 3.
        learned_prior: give each factored-out half a Gaussian prior conditioned on the kept half.
        scale_bound: bound of the affine couplings' (and the learned prior's) soft-clamped
            log-scale (``None``: unclamped).
        coupling: elementwise map of every step's coupling: ``"affine"`` (default),
            ``"additive"`` or ``"spline"`` (rational-quadratic,
            [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline]).
        bins: number of spline bins (default 8); ``coupling="spline"`` only.
        bound: the spline acts on ``[-bound, bound]``, identity outside (default 5);
            ``coupling="spline"`` only.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    c, h, w = check_image_shape(shape, "glow")
    num_levels = scale_count(num_levels, "num_levels", (c, h, w), min_size=1, default=3, offset=0)
    elementwise = coupling_map(coupling, scale_bound, bins, bound)
    # the learned prior is Gaussian whatever the steps' map: an affine coupling
    prior = Affine(scale_bound) if learned_prior else None
    return [
        _glow_level((c, h, w), num_levels, num_layers, hidden_dims, context_dim, prior, elementwise)
    ]
