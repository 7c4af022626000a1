r"""Multi-scale building blocks for image flows: squeeze and factor-out.

**Squeeze** (space-to-depth) turns each $2 \times 2$ patch of every channel into four channels,
$(C, H, W) \to (4C, H/2, W/2)$. It is a permutation of the coordinates, so it is exactly
invertible and $\log|\det J| = 0$.

**Factor-out** (split) sends half of the channels straight to the latent and keeps transforming
only the other half, so deeper layers work on fewer, coarser variables:

$$
(h_1, h_2) = \operatorname{split}(h), \qquad
z = \big(f^{-1}(h_1),\ h_2\big), \qquad \log|\det J| = \log|\det J_f|.
$$

Both are wrappers, so every layer of a flow keeps the full event shape $(C, H, W)$ and
``Flow`` still maps a full-size latent: ``Squeeze`` runs its inner layers
on the squeezed tensor and unsqueezes the result, ``FactorOut`` runs its inner layers on
the kept channels only. Nesting them gives the multi-scale architecture of RealNVP and Glow.

The elementwise map of the couplings inside the multi-scale RealNVP and Glow architectures is an
option (`coupling_map`): affine (the papers' choice), additive, or the rational-quadratic spline
of [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline].

Reference: Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*, section 3.6.

Example:
    >>> import torch
    >>> from pyroflows.transforms.multiscale import squeeze, unsqueeze
    >>> x = torch.randn(5, 3, 8, 8)
    >>> squeeze(x).shape, torch.equal(unsqueeze(squeeze(x)), x)
    (torch.Size([5, 12, 4, 4]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.elementwise import Additive, Affine, ElementwiseMap
from pyroflows.validation import check_choice, check_int

COUPLING_MAPS = ("affine", "additive", "spline")


def check_image_shape(
    shape: Sequence[int], name: str, *, even: bool = False, min_channels: int = 1
) -> tuple[int, int, int]:
    """Validate an image event shape.

    Args:
        shape: the shape to check.
        name: what the error message names.
        even: require even ``H`` and ``W``.
        min_channels: smallest allowed ``C``.

    Returns:
        ``(C, H, W)``; a ``ValueError`` naming ``name`` otherwise.
    """
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"{name} works on images: shape must be (C, H, W), got {shape}")
    channels, height, width = shape
    if even and (height % 2 or width % 2):
        raise ValueError(f"{name} squeezes 2x2 patches: H and W must be even, got shape {shape}")
    if channels < min_channels:
        raise ValueError(f"{name} needs at least {min_channels} channels, got shape {shape}")
    return channels, height, width


def coupling_map(
    coupling: str,
    scale_bound: float | None = 3.0,
    bins: int | None = None,
    bound: float | None = None,
) -> ElementwiseMap:
    """The elementwise map of an image architecture's couplings, from its options.

    Args:
        coupling: ``"affine"``, ``"additive"`` or ``"spline"``.
        scale_bound: bound of the affine map's soft-clamped log-scale (``None``: unclamped); used
            by ``"affine"`` only.
        bins: number of spline bins (``None``: the spline's default); ``"spline"`` only.
        bound: half-width ``B`` of the interval the spline acts on (``None``: the spline's
            default); ``"spline"`` only.

    Returns:
        The map, shared by every coupling of the architecture (it holds no parameters).

    Raises:
        ValueError: an unknown ``coupling``, spline options given for another map, or invalid
            spline options, naming the option.
    """
    check_choice(coupling, "coupling", COUPLING_MAPS)
    spline = {k: v for k, v in (("bins", bins), ("bound", bound)) if v is not None}
    if coupling == "spline":
        # spline.py imports this module (check_image_shape): load it when a spline is asked for
        from pyroflows.transforms.spline import RationalQuadraticSpline

        return RationalQuadraticSpline(**spline)
    if spline:
        raise ValueError(
            f"{' and '.join(spline)} apply to coupling='spline' only, got coupling={coupling!r}"
        )
    return Affine(scale_bound) if coupling == "affine" else Additive()


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth.

    Args:
        x: a tensor of shape ``(..., C, H, W)``, ``H`` and ``W`` even.

    Returns:
        ``(..., 4C, H/2, W/2)``; channel ``4c + 2i + j`` holds pixel ``(2h + i, 2w + j)`` of channel
        ``c``.
    """
    *batch, c, h, w = x.shape
    x = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(*batch, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Depth-to-space, the exact inverse of ``squeeze``.

    Args:
        x: a tensor of shape ``(..., 4C, H, W)``.

    Returns:
        ``(..., C, 2H, 2W)``.
    """
    *batch, c, h, w = x.shape
    x = x.reshape(-1, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(*batch, c // 4, 2 * h, 2 * w)


class Nested(FlowTransform):
    """A layer that runs a stack of inner layers on a re-arranged or reduced view of its input.

    Subclasses say how to enter the view (``enter``: input -> inner input plus whatever is
    passed around the inner stack) and how to leave it (``leave``).

    Args:
        event_shape: the outer event shape.
        layers: the inner layers in the sampling direction ``z -> x``.
        context_dim: width of the context passed on to the inner layers.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        layers: Sequence[FlowTransform],
        context_dim: int | None = None,
    ) -> None:
        super().__init__(tuple(event_shape), context_dim)
        self.layers = nn.ModuleList(layers)

    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def leave(self, inner: torch.Tensor, aside: Any) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool):
        h, aside = self.enter(inputs)
        total = inputs.new_zeros(inputs.shape[: inputs.dim() - self.event_dim])
        for layer in reversed(self.layers) if inverse else self.layers:
            h, ladj = (
                layer.inverse_and_log_det(h, context)
                if inverse
                else layer.forward_and_log_det(h, context)
            )
            total = total + ladj
        return self.leave(h, aside), total

    def forward_and_log_det(self, z, context=None):
        return self._run(z, context, inverse=False)

    def inverse_and_log_det(self, x, context=None):
        return self._run(x, context, inverse=True)


class Squeeze(Nested):
    """Squeeze ``(C, H, W) -> (4C, H/2, W/2)``, run ``layers`` there, unsqueeze back.

    With no inner layers it is the identity; the squeeze itself has ``log|det| = 0``.

    Args:
        event_shape: ``(C, H, W)`` with even ``H`` and ``W``.
        layers: inner layers over ``(4C, H/2, W/2)``.
        context_dim: width of the context passed on to the inner layers.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        layers: Sequence[FlowTransform] = (),
        context_dim: int | None = None,
    ) -> None:
        c, h, w = check_image_shape(event_shape, "Squeeze", even=True)
        inner = (4 * c, h // 2, w // 2)
        for layer in layers:
            if tuple(layer.event_shape) != inner:
                raise ValueError(
                    f"Squeeze of {tuple(event_shape)}: inner layers must have event shape {inner}, "
                    f"got {layer.event_shape}"
                )
        super().__init__(event_shape, layers, context_dim)

    def enter(self, x):
        return squeeze(x), None

    def leave(self, inner, aside):
        return unsqueeze(inner)


class FactorOut(Nested):
    """Run ``layers`` on the first ``C // 2`` channels; the others go to the latent unchanged.

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2``.
        layers: inner layers over ``(C // 2, H, W)``.
        context_dim: width of the context passed on to the inner layers.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        layers: Sequence[FlowTransform],
        context_dim: int | None = None,
    ) -> None:
        c, h, w = check_image_shape(event_shape, "FactorOut", min_channels=2)
        self.keep = c // 2
        for layer in layers:
            if tuple(layer.event_shape) != (self.keep, h, w):
                raise ValueError(
                    f"FactorOut of {tuple(event_shape)}: inner layers must have event shape "
                    f"{(self.keep, h, w)}, got {layer.event_shape}"
                )
        super().__init__(event_shape, layers, context_dim)

    def enter(self, x):
        return x[..., : self.keep, :, :], x[..., self.keep :, :, :]

    def leave(self, inner, aside):
        return torch.cat([inner, aside], dim=-3)


def max_halvings(height: int, width: int, limit: int, min_size: int = 1) -> int:
    """How many times an image can be squeezed.

    Args:
        height: ``H``.
        width: ``W``.
        limit: the most to count.
        min_size: smallest side allowed after the squeezes (2 where a checkerboard mask must still
            split the image).

    Returns:
        The number of halvings (at most ``limit``) that keep both sides even before and at least
        ``min_size`` after.
    """
    count = 0
    while (
        count < limit and height % 2 == 0 and width % 2 == 0 and min(height, width) // 2 >= min_size
    ):
        height, width, count = height // 2, width // 2, count + 1
    return count


def scale_count(
    value: Any,
    option: str,
    shape: tuple[int, int, int],
    *,
    min_size: int,
    default: int,
    offset: int = 1,
) -> int:
    """Validate a number of scales or levels of a multi-scale architecture.

    Args:
        value: the number asked for, or ``None``.
        option: the option name the error message uses.
        shape: ``(C, H, W)``.
        min_size: smallest side allowed after the squeezes.
        default: used for ``None``, capped at the most the image allows.
        offset: scales that do not squeeze (the count is ``offset`` plus the squeezes).

    Returns:
        The number.
    """
    most = offset + max_halvings(shape[1], shape[2], 99, min_size)
    if most < 1:
        raise ValueError(
            f"{option}: at least one squeeze of 2x2 patches is needed, so H and W must be even, "
            f"got shape {tuple(shape)}"
        )
    if value is None:
        value = min(default, most)
    # the bound depends on the image: each squeeze halves H and W, which must stay even and
    # at least min_size
    return check_int(value, f"{option} for shape {tuple(shape)}", maximum=most)
