r"""RealNVP: affine coupling layers.

$$
x_a = z_a, \qquad x_b = z_b \odot \exp(s(z_a)) + t(z_a), \qquad
\log|\det J| = \sum_b s_b(z_a)
$$

with the log-scale soft-clamped, $s = B \tanh(\tilde s / B)$, so no layer can overflow.
Masks: ``"half"`` or ``"alternate"`` (even/odd) for vectors, ``"checkerboard"`` or
``"channel"`` for images, alternating parity from layer to layer.

**Images** get the multi-scale architecture of the paper. In the density direction $x \to z$,
each scale applies checkerboard couplings, squeezes $2 \times 2$ patches into channels
($(C, H, W) \to (4C, H/2, W/2)$), applies channel-wise couplings and factors half of the channels
out to the latent; the next scale works on the other half. The last scale applies checkerboard
couplings only. Conditioners are small ResNets (``ConvConditioner``).
See ``pyroflows.transforms.multiscale`` for squeeze and factor-out.

``coupling="spline"`` (or ``"additive"``) replaces the affine map of every coupling by a
rational-quadratic spline (or a shift), keeping the masks and the architecture: a spline coupling
is $x_b = \operatorname{RQS}(z_b;\ \theta(z_a))$ with $3K - 1$ conditioner outputs per transformed
coordinate (see ``pyroflows.transforms.spline``).

Reference: Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("realnvp", 2)
    >>> x, log_q = flow.rsample_and_log_prob((100,))
    >>> x.shape, log_q.shape
    (torch.Size([100, 2]), torch.Size([100]))
    >>> image_flow = pyroflows.build_flow("realnvp", (1, 8, 8), num_layers=2, hidden_dims=(16,))
    >>> image_flow.log_prob(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Sequence

from pyroflows.registry import flow_family
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.coupling import Coupling, coupling_layers, coupling_mask
from pyroflows.transforms.elementwise import Affine, ElementwiseMap
from pyroflows.transforms.multiscale import (
    FactorOut,
    Squeeze,
    check_image_shape,
    coupling_map,
    scale_count,
)


def affine_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parity: int = 0,
    mask: str = "half",
    scale_bound: float | None = 3.0,
) -> Coupling:
    """A RealNVP affine coupling layer over vectors (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: widths of the conditioner.
        context_dim: width of the context, or ``None``.
        parity: which part is transformed.
        mask: ``"half"`` or ``"alternate"``.
        scale_bound: bound of the soft-clamped log-scale (``None``: unclamped).

    Returns:
        The layer.
    """
    return Coupling(
        coupling_mask((input_dim,), mask, parity), Affine(scale_bound), hidden_dims, context_dim
    )


def multiscale_realnvp(
    shape: tuple[int, int, int],
    num_scales: int,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    elementwise: str | ElementwiseMap = "affine",
    actnorm: bool = True,
) -> list[FlowTransform]:
    """The multi-scale RealNVP layers over ``(C, H, W)``.

    Each scale but the last has ``ceil(num_layers / 2)`` checkerboard and ``floor(num_layers / 2)``
    channel couplings around a squeeze and a factor-out; the last has ``floor(num_layers / 2) + 1``
    checkerboard couplings (the paper's 3 + 3 and 4 for 6).

    Args:
        shape: ``(C, H, W)``.
        num_scales: number of scales.
        num_layers: couplings per scale.
        hidden_dims: conditioner widths.
        context_dim: width of the context, or ``None``.
        elementwise: the elementwise map of every coupling (a name or an object, see
            `pyroflows.transforms.elementwise`).
        actnorm: normalise every coupling's input (density direction) with an ``ActNorm`` layer,
            standing in for the paper's batch normalisation without making the density depend on the
            batch.

    Returns:
        The layers, in the sampling order ``z -> x``.
    """
    c, h, w = shape

    def stage(event, count, kind):
        couplings = coupling_layers(event, count, elementwise, hidden_dims, context_dim, kind)
        return [m for cp in couplings for m in ((cp, ActNorm(event)) if actnorm else (cp,))]

    if num_scales == 1:
        return stage(shape, num_layers // 2 + 1, "checkerboard")
    inner = (4 * c, h // 2, w // 2)
    kept = (2 * c, h // 2, w // 2)
    deeper = multiscale_realnvp(
        kept, num_scales - 1, num_layers, hidden_dims, context_dim, elementwise, actnorm
    )
    squeezed = [FactorOut(inner, deeper, context_dim)] + stage(inner, num_layers // 2, "channel")
    return [Squeeze(shape, squeezed, context_dim)] + stage(
        shape, (num_layers + 1) // 2, "checkerboard"
    )


@flow_family(image=True, default_layers=6, default_hidden=(64, 64))
def build_realnvp(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    mask: str | None = None,
    num_scales: int | None = None,
    scale_bound: float | None = 3.0,
    actnorm: bool = True,
    coupling: str = "affine",
    bins: int | None = None,
    bound: float | None = None,
) -> list[FlowTransform]:
    """RealNVP: affine couplings with alternating masks, or the multi-scale architecture.

    Vectors get ``num_layers`` couplings; images the multi-scale architecture with
    ``num_layers`` couplings per scale. ``coupling`` picks the elementwise map of every coupling.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        mask: ``"half"`` (vector default) or ``"alternate"`` for vectors; for images,
            ``"checkerboard"`` or ``"channel"`` gives a single-scale stack of ``num_layers``
            couplings with that mask instead of the multi-scale architecture.
        num_scales: number of scales for images (each but the last squeezes once, so the last works
            on ``H / 2**(num_scales - 1)`` pixels, at least 2 x 2); default: as many as fit, at most
            3.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped); affine
            couplings only.
        actnorm: for the multi-scale architecture, normalise every coupling's input with a data-
            initialised ActNorm layer.
        coupling: ``"affine"`` (default), ``"additive"`` or ``"spline"`` (rational-quadratic,
            [`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline]).
        bins: number of spline bins (default 8); ``coupling="spline"`` only.
        bound: the spline acts on ``[-bound, bound]``, identity outside (default 5);
            ``coupling="spline"`` only.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    elementwise = coupling_map(coupling, scale_bound, bins, bound)
    if len(shape) == 1 or mask is not None:
        if num_scales is not None:
            raise ValueError(
                "num_scales applies to the multi-scale image architecture only "
                "(no mask, image shape)"
            )
        return coupling_layers(shape, num_layers, elementwise, hidden_dims, context_dim, mask)
    shape = check_image_shape(shape, "realnvp")
    num_scales = scale_count(num_scales, "num_scales", shape, min_size=2, default=3)
    return multiscale_realnvp(
        shape, num_scales, num_layers, hidden_dims, context_dim, elementwise, actnorm
    )
