r"""MintNet: masked invertible convolutions with a triangular Jacobian.

Order the coordinates of a $(C, H, W)$ image by pixel (raster order), then by channel. A
*masked invertible layer* maps data $x$ to $z$ by

$$
a = (M_1 \odot W_1) * x + b_1, \qquad
z = t \odot x + (M_2 \odot W_2) * \operatorname{elu}(a) + b_2,
$$

where $*$ is a $3 \times 3$ convolution, the hidden channels come in one group of $k$ per input
channel, and the masks $M_1, M_2$ let an output see only pixels before its own (for type
``"A"``; after it for type ``"B"``) plus, at its own pixel, channels up to its own. The Jacobian
$\partial z / \partial x$ is then triangular in that order, with diagonal

$$
d_i = t_i + \sum_{j \in \text{group}(c_i)} \big|W_2^{\,c_i j}\big|\,\big|W_1^{\,j c_i}\big|\,
\operatorname{elu}'(a_j) > 0,
$$

(the centre taps of $W_2$ take the sign of the matching $W_1$ tap, and $t = e^{\tau} > 0$), so
$\log|\det \partial z / \partial x| = \sum_i \log d_i$ is exact and cheap, and the map is a
bijection. Alternating types ``"A"`` and ``"B"`` lets information flow both ways across the
image; a squeeze between scales makes the receptive field grow.

**Inverse.** The data -> latent direction (density evaluation, training) is one explicit pass.
The latent -> data direction (sampling) solves $g(x) = z$ by the diagonal Newton iteration
$x \leftarrow x - (g(x) - z) / d(x)$, which converges because the Jacobian is triangular with
a positive diagonal: it stops when $\max|g(x) - z| \le$ ``tol`` (default $10^{-5}$ in float32,
$10^{-10}$ in float64) or after ``max_iter`` iterations (a ``RuntimeWarning`` says so).
Gradients through the solve use implicit differentiation: the adjoint system
$J^\top v = \bar x$ is solved by the same iteration, so backpropagating through a sample costs
no unrolled graph.

Reference: Song, Meng, Ermon (2019), *MintNet: Building Invertible Neural Networks with Masked
Convolutions*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("mintnet", (1, 8, 8), num_layers=2, hidden_dims=(8,))
    >>> x = flow.sample((4,))
    >>> z, _ = flow.inverse_and_log_det(x)
    >>> x.shape, flow.log_prob(x).shape
    (torch.Size([4, 1, 8, 8]), torch.Size([4]))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.registry import flow_family
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.multiscale import Squeeze, check_image_shape, max_halvings, scale_count
from pyroflows.validation import check_choice, check_int, check_positive

ORDERS = ("A", "B")


def masked_conv_mask(
    out_groups: torch.Tensor, in_groups: torch.Tensor, kernel: int, order: str
) -> torch.Tensor:
    """The mask of a convolution that is causal in the pixel-then-channel order.

    Args:
        out_groups: group of each output channel.
        in_groups: group of each input channel.
        kernel: kernel size (odd).
        order: ``"A"``: taps before the centre pixel are free; ``"B"``: taps after it.

    Returns:
        ``(out, in, kernel, kernel)`` 0/1 mask; the centre tap connects group ``i`` to group ``o``
        only if ``i <= o`` (``i >= o`` for ``"B"``).
    """
    check_choice(order, "order", ORDERS)
    position = torch.arange(kernel * kernel).reshape(kernel, kernel)
    centre = kernel * kernel // 2
    before = position < centre if order == "A" else position > centre
    channel_ok = (
        in_groups[None, :] <= out_groups[:, None]
        if order == "A"
        else in_groups[None, :] >= out_groups[:, None]
    )
    mask = before.expand(len(out_groups), len(in_groups), kernel, kernel).clone()
    mask[:, :, kernel // 2, kernel // 2] = channel_ok
    return mask.float()


class MaskedInvertibleConv(FlowTransform):
    """One MintNet masked invertible layer (see the module docs for the map and its inverse).

    The explicit map $g$ goes from data to latent, so ``inverse_and_log_det`` is one
    pass and ``forward_and_log_det`` (sampling) is the iterative solve.

    Args:
        event_shape: ``(C, H, W)``.
        hidden_per_channel: ``k``, hidden channels per input channel.
        order: ``"A"`` (causal in raster order) or ``"B"`` (reverse raster order).
        kernel: odd kernel size of both convolutions.
        tol: stopping tolerance of the inverse iteration on ``max|g(x) - z|`` (default by dtype).
        max_iter: iteration cap of the inverse.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        hidden_per_channel: int = 4,
        order: str = "A",
        kernel: int = 3,
        tol: float | None = None,
        max_iter: int = 200,
    ) -> None:
        channels, _, _ = check_image_shape(event_shape, "MaskedInvertibleConv")
        if check_int(kernel, "kernel") % 2 != 1:
            raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
        if tol is not None:
            check_positive(tol, "tol")
        super().__init__(tuple(event_shape))
        hidden = channels * hidden_per_channel
        self.hidden_per_channel = hidden_per_channel
        self.order, self.tol, self.max_iter = order, tol, max_iter
        in_groups = torch.arange(channels)
        hidden_groups = torch.arange(hidden) // hidden_per_channel
        self.register_buffer("mask1", masked_conv_mask(hidden_groups, in_groups, kernel, order))
        self.register_buffer("mask2", masked_conv_mask(in_groups, hidden_groups, kernel, order))
        # the centre tap (hidden j, its own channel) and (channel c, hidden j of group c)
        self.register_buffer("diag1", (hidden_groups[:, None] == in_groups[None, :]).float())
        fan1, fan2 = channels * kernel * kernel, hidden * kernel * kernel
        self.weight1 = nn.Parameter(torch.randn(hidden, channels, kernel, kernel) / fan1**0.5)
        self.bias1 = nn.Parameter(torch.zeros(hidden))
        self.weight2 = nn.Parameter(torch.randn(channels, hidden, kernel, kernel) * 0.1 / fan2**0.5)
        self.bias2 = nn.Parameter(torch.zeros(channels))
        self.log_t = nn.Parameter(torch.zeros(event_shape))

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked weights, with the centre taps of ``W2`` signed like ``W1``'s, and the
        nonnegative products of matching centre taps, one per hidden channel."""
        k = self.weight1.shape[-1] // 2
        w1 = self.weight1 * self.mask1
        centre1 = (w1[:, :, k, k] * self.diag1).sum(1)  # (hidden,): W1[j, group(j)]
        w2 = self.weight2 * self.mask2
        on_diag = self.diag1.T  # (channels, hidden): W2[group(j), j]
        signed = w2[:, :, k, k].abs() * torch.sign(centre1)[None, :]
        centre2 = torch.where(on_diag.bool(), signed, w2[:, :, k, k])
        w2 = w2.clone()
        w2[:, :, k, k] = centre2
        products = (centre2 * on_diag).sum(0) * centre1  # (hidden,) >= 0
        return w1, w2, products

    def explicit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The explicit (data -> latent) map and its Jacobian diagonal.

        Args:
            x: data of shape ``(*batch, C, H, W)``.

        Returns:
            ``(g(x), d(x))``, both shaped like ``x``.
        """
        w1, w2, products = self._weights()
        batch = x.shape[:-3]
        flat = x.reshape(-1, *self.event_shape)
        pad = w1.shape[-1] // 2
        a = F.conv2d(flat, w1, self.bias1, padding=pad)
        z = torch.exp(self.log_t) * flat + F.conv2d(F.elu(a), w2, self.bias2, padding=pad)
        slope = torch.exp(a.clamp(max=0.0))  # elu'(a)
        channels, height, width = self.event_shape
        spread = (slope * products[:, None, None]).reshape(
            -1, channels, self.hidden_per_channel, height, width
        )
        diag = torch.exp(self.log_t) + spread.sum(2)
        return z.reshape(*batch, *self.event_shape), diag.reshape(*batch, *self.event_shape)

    def _tol(self, dtype: torch.dtype) -> float:
        return self.tol if self.tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)

    def solve(self, z: torch.Tensor) -> torch.Tensor:
        """``x`` with ``g(x) = z``, by diagonal Newton iteration (no gradient).

        Args:
            z: latents of shape ``(*batch, C, H, W)``.

        Returns:
            ``x``; a ``RuntimeWarning`` if ``max_iter`` is reached first.
        """
        tol = self._tol(z.dtype)
        if z.numel() == 0:
            return z.clone()
        with torch.no_grad():
            x = z.clone()
            for _ in range(self.max_iter):
                gx, diag = self.explicit(x)
                residual = gx - z
                if residual.abs().max() <= tol:
                    return x
                x = x - residual / diag
            residual = (self.explicit(x)[0] - z).abs().max().item()
        if not residual <= tol:
            warnings.warn(
                f"MintNet inverse stopped after max_iter={self.max_iter} iterations with max "
                f"residual {residual:.2e} > tol={tol:.0e}",
                RuntimeWarning,
                stacklevel=3,
            )
        return x

    def adjoint_solve(
        self, gx: torch.Tensor, x: torch.Tensor, diag: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        """``v`` with ``J(x)^T v = grad``, by the same iteration.

        Args:
            gx: ``g(x)``, carrying the graph back to ``x``.
            x: the solution point.
            diag: the Jacobian diagonal at ``x``.
            grad: the incoming gradient.

        Returns:
            ``v``, shaped like ``grad``.
        """
        if grad.numel() == 0:
            return grad.clone()
        tol = self._tol(grad.dtype) * max(1.0, grad.abs().max().item())
        v = grad / diag
        for _ in range(self.max_iter):
            (jtv,) = torch.autograd.grad(gx, x, v, retain_graph=True)
            residual = jtv - grad
            if residual.abs().max() <= tol:
                break
            v = v - residual / diag
        return v

    def forward_and_log_det(self, z, context=None):
        params = [p for p in self.parameters() if p.requires_grad]
        x = _ImplicitSolve.apply(self, z, *params)
        _, diag = self.explicit(x)
        return x, -diag.log().sum((-3, -2, -1))

    def inverse_and_log_det(self, x, context=None):
        z, diag = self.explicit(x)
        return z, -diag.log().sum((-3, -2, -1))

    def extra_repr(self) -> str:
        hidden = self.hidden_per_channel
        return f"{super().extra_repr()}, order={self.order!r}, hidden_per_channel={hidden}"


class _ImplicitSolve(torch.autograd.Function):
    """``x = g^{-1}(z)`` with gradients by implicit differentiation:
    ``dL/dz = J^{-T} dL/dx`` and ``dL/dtheta = -(dg/dtheta)^T J^{-T} dL/dx``."""

    @staticmethod
    def forward(
        ctx, layer: MaskedInvertibleConv, z: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        x = layer.solve(z)
        ctx.layer = layer
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            gx, diag = ctx.layer.explicit(x)
            v = ctx.layer.adjoint_solve(gx, x, diag.detach(), grad_x)
            grads = torch.autograd.grad(gx, params, -v, allow_unused=True) if params else ()
        return (None, v, *grads)


def masked_invertible_conv(
    event_shape: Sequence[int], hidden_per_channel: int = 4, order: str = "A"
) -> MaskedInvertibleConv:
    """A MintNet masked invertible layer (Pyro-style helper).

    Args:
        event_shape: ``(C, H, W)``.
        hidden_per_channel: hidden channels per input channel.
        order: mask type, ``"A"`` or ``"B"``.

    Returns:
        The layer.
    """
    return MaskedInvertibleConv(event_shape, hidden_per_channel, order)


def _mintnet_scale(
    shape, scales, num_layers, hidden_per_channel, tol, max_iter
) -> list[FlowTransform]:
    """``num_layers`` (ActNorm, masked layer) pairs alternating "A"/"B", in the sampling order,
    with the coarser scales inside a squeeze."""
    layers: list[FlowTransform] = []
    if scales > 1:
        c, h, w = shape
        inner = (4 * c, h // 2, w // 2)
        layers.append(
            Squeeze(
                shape,
                _mintnet_scale(inner, scales - 1, num_layers, hidden_per_channel, tol, max_iter),
            )
        )
    for i in reversed(range(num_layers)):
        layers += [
            MaskedInvertibleConv(
                shape, hidden_per_channel, ORDERS[i % 2], tol=tol, max_iter=max_iter
            ),
            ActNorm(shape),
        ]
    return layers


@flow_family(
    vector=False,
    image=True,
    conditional=False,
    default_layers=4,
    default_hidden=(16,),
    inverse_atol=1e-4,
)
def build_mintnet(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    num_scales: int | None = None,
    tol: float | None = None,
    max_iter: int = 200,
) -> list[FlowTransform]:
    """MintNet over ``(C, H, W)`` images: ``num_scales`` scales of ``num_layers`` masked layers.

    ``hidden_dims[0]`` is the number of hidden channels of each masked layer, rounded up to a
    multiple of its input channels.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        num_scales: scales (each extra one squeezes once more); default: as many as keep at least 4
            x 4 pixels, at most 2.
        tol: stopping tolerance of the sampling-direction iteration (default by dtype).
        max_iter: iteration cap of the sampling-direction iteration.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    c, h, w = check_image_shape(shape, "mintnet")
    num_scales = scale_count(
        num_scales,
        "num_scales",
        (c, h, w),
        min_size=1,
        default=1 + max_halvings(h, w, 1, min_size=4),
    )
    per_channel = max(1, -(-int(hidden_dims[0]) // c))
    return _mintnet_scale((c, h, w), num_scales, num_layers, per_channel, tol, max_iter)
