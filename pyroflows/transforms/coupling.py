r"""The coupling mechanism shared by NICE, RealNVP and Glow.

A boolean mask splits the event into a conditioning part $z_a$ (mask ``True``), copied
unchanged, and a transformed part $z_b$:

$$
x_a = z_a, \qquad x_b = f(z_b;\ \theta(z_a, c)), \qquad
\log|\det J| = \sum_b \log|f'(z_b)|
$$

where $\theta$ is a conditioner network of $z_a$ (and an optional context
$c$) and $f$ an elementwise bijection (`pyroflows.transforms.elementwise`) with
``f.num_params`` outputs of the network per transformed coordinate. Both directions cost one
conditioner pass. NICE is the additive $f$, RealNVP the affine one, NSF the rational-quadratic
spline; the mask choice (half, alternating, checkerboard, channel-wise) is a parameter, not a
class.

Reference: Dinh, Krueger, Bengio (2015), *NICE*; Dinh, Sohl-Dickstein, Bengio (2017), *Density
estimation using Real NVP*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyroflows.nn.conv import ConvConditioner
from pyroflows.nn.dense import DenseConditioner
from pyroflows.transforms.base import FlowTransform, expand_context, sum_event
from pyroflows.transforms.elementwise import ElementwiseMap, resolve_elementwise

VECTOR_MASKS = ("half", "alternate")
IMAGE_MASKS = ("checkerboard", "channel")


def coupling_mask(event_shape: Sequence[int], kind: str, parity: int = 0) -> torch.Tensor:
    """Boolean mask (``True`` = conditioning, passed through) for one coupling layer.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        kind: ``"half"`` (first half / second half) or ``"alternate"`` (even / odd) for vectors;
            ``"checkerboard"`` or ``"channel"`` (first half of the channels) for images.
        parity: 0 or 1; odd parity swaps the two parts, so alternating layers cover both.
    """
    event_shape = tuple(event_shape)
    if len(event_shape) == 1:
        (dim,) = event_shape
        if kind not in VECTOR_MASKS:
            raise ValueError(f"mask must be one of {VECTOR_MASKS} for vector flows, got {kind!r}")
        if dim == 1:  # nothing to condition on: every layer transforms the single coordinate
            return torch.zeros(1, dtype=torch.bool)
        idx = torch.arange(dim)
        mask = idx < (dim + 1) // 2 if kind == "half" else idx % 2 == 0
    else:
        channels, height, width = event_shape
        if kind == "checkerboard":
            ij = torch.arange(height)[:, None] + torch.arange(width)[None, :]
            mask = (ij % 2 == 0).expand(channels, height, width)
        elif kind == "channel":
            if channels < 2:
                raise ValueError(
                    f"a channel mask needs at least 2 channels, got shape {event_shape}"
                )
            mask = (torch.arange(channels) < channels // 2)[:, None, None].expand(event_shape)
        else:
            raise ValueError(f"mask must be one of {IMAGE_MASKS} for image flows, got {kind!r}")
    return mask.clone() ^ bool(parity)


class Coupling(FlowTransform):
    """One coupling layer ``x_b = f(z_b; theta(z_a, context))``, ``x_a = z_a``.

    Args:
        mask: boolean tensor of the event shape; ``True`` marks the conditioning part.
        elementwise: ``"additive"``, ``"affine"``, ``"spline"`` or an elementwise map (see
            `pyroflows.transforms.elementwise`).
        hidden_dims: conditioner widths (MLP for vectors; channel width and number of residual
            blocks for images).
        context_dim: width of a context vector, or ``None``.
        unconditional: also transform the conditioning part, with the same elementwise map and
            learned constant parameters (zero-initialised: the identity), so a layer transforms
            every coordinate; the conditioner still reads that part before its map.
        nonlinearity: hidden activation of a vector conditioner (default ReLU); image
            conditioners keep their ReLU.

    Raises:
        ValueError: a ``nonlinearity`` for an image mask.

    Example:
        >>> layer = Coupling(coupling_mask((4,), "half"), "affine", hidden_dims=(16,))
        >>> z = torch.randn(8, 4)
        >>> x, ladj = layer.forward_and_log_det(z)
        >>> torch.allclose(layer.inv(x), z)
        True
    """

    def __init__(
        self,
        mask: torch.Tensor,
        elementwise: str | ElementwiseMap = "affine",
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        unconditional: bool = False,
        nonlinearity: nn.Module | None = None,
    ) -> None:
        super().__init__(tuple(mask.shape), context_dim)
        if nonlinearity is not None and mask.dim() != 1:
            raise ValueError("nonlinearity applies to vector couplings only (image conditioners "
                             f"use ReLU), got a mask of shape {tuple(mask.shape)}")
        self.elementwise = resolve_elementwise(elementwise)
        num_params = self.elementwise.num_params
        self.register_buffer("mask", mask.bool())
        # one (num_params, *part) block of constants: the conditioning part's own map
        shape = (int(mask.sum()),) if mask.dim() == 1 else tuple(mask.shape)
        self.constants = nn.Parameter(torch.zeros(num_params, *shape)) if unconditional else None
        if self.event_dim == 1:
            # Vectors: gather the two parts, so the MLP only sees (and predicts) what it needs.
            idx_a, idx_b = mask.nonzero().flatten(), (~mask).nonzero().flatten()
            self.register_buffer("idx_a", idx_a)
            self.register_buffer("idx_b", idx_b)
            self.register_buffer("merge", torch.argsort(torch.cat([idx_a, idx_b])))
            # a contiguous split ("half" masks) is sliced and concatenated: no gather, no scatter
            dim, k = mask.shape[0], len(idx_a)
            if torch.equal(idx_a, torch.arange(k)):
                self._halves: tuple[slice, slice, bool] | None = (slice(0, k), slice(k, dim), True)
            elif torch.equal(idx_b, torch.arange(dim - k)):
                self._halves = (slice(dim - k, dim), slice(0, dim - k), False)
            else:
                self._halves = None
            self.conditioner = DenseConditioner(
                len(idx_a),
                [len(idx_b)] * num_params,
                hidden_dims,
                context_dim,
                nonlinearity=nonlinearity,
            )
        else:
            # Images: the conv net sees the masked image and predicts every position.
            channels = mask.shape[0]
            self.conditioner = ConvConditioner(
                channels, channels, num_params, hidden_dims, context_dim
            )

    def _transform(
        self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        apply = self.elementwise.inverse if inverse else self.elementwise.forward
        batch = inputs.shape[: inputs.dim() - self.event_dim]
        if self.event_dim == 1:
            if self._halves is None:
                a, b = inputs[..., self.idx_a], inputs[..., self.idx_b]
            else:
                a, b = inputs[..., self._halves[0]], inputs[..., self._halves[1]]
            out_a, ladj = a, 0.0
            if self.constants is not None:  # the conditioner reads z_a: invert x_a first
                out_a, ladj_a = apply(a, tuple(self.constants))
                ladj = ladj_a.sum(-1)
            params = self.conditioner(out_a if inverse else a, expand_context(context, batch))
            out_b, ladj_b = apply(b, params)
            ladj = ladj + ladj_b.sum(-1)
            if self._halves is None:
                return torch.cat([out_a, out_b], dim=-1)[..., self.merge], ladj
            return torch.cat([out_a, out_b] if self._halves[2] else [out_b, out_a], dim=-1), ladj
        mask = self.mask.to(inputs.dtype)
        out_a, ladj_a = inputs, None
        if self.constants is not None:
            out_a, ladj_a = apply(inputs, tuple(self.constants))
        cond = out_a if inverse else inputs
        params = self.conditioner(cond * mask, expand_context(context, batch))
        out, ladj = apply(inputs, params)
        ladj = ladj * (1 - mask) if ladj_a is None else torch.where(self.mask, ladj_a, ladj)
        return torch.where(self.mask, out_a, out), sum_event(ladj, 3)

    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``log|det dx/dz|`` (one conditioner pass)."""
        return self._transform(z, context, inverse=False)

    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and the forward ``log|det dx/dz|`` (one conditioner pass)."""
        return self._transform(x, context, inverse=True)


def coupling_layers(
    event_shape: Sequence[int],
    num_layers: int,
    elementwise: str | ElementwiseMap,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    mask: str | None = None,
    unconditional: bool = False,
    nonlinearity: nn.Module | None = None,
) -> list[Coupling]:
    """``num_layers`` coupling layers whose masks alternate parity, so every coordinate is
    transformed: the builder behind ``nice``, ``realnvp`` and ``nsf``.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        elementwise: the elementwise map every layer uses (a name or an object; one object may
            be shared, it holds no parameters).
        hidden_dims: conditioner widths.
        context_dim: width of a context vector, or ``None``.
        mask: mask kind (see [`coupling_mask`][pyroflows.transforms.coupling.coupling_mask]);
            ``"half"`` for vectors and ``"checkerboard"`` for images by default.
        unconditional: every layer also maps its conditioning part (see
            [`Coupling`][pyroflows.transforms.coupling.Coupling]).
        nonlinearity: hidden activation of the vector conditioners (default ReLU).
    """
    event_shape = tuple(event_shape)
    kind = mask or ("half" if len(event_shape) == 1 else "checkerboard")
    return [
        Coupling(
            coupling_mask(event_shape, kind, i % 2),
            elementwise,
            hidden_dims,
            context_dim,
            unconditional,
            nonlinearity,
        )
        for i in range(num_layers)
    ]
