r"""Radial flow with a closed-form inverse.

$$
x = z + \beta\, h(\alpha, r)\,(z - z_0), \quad r = \|z - z_0\|, \quad h = \frac{1}{\alpha + r},
$$

$$
\log|\det J| = (D - 1)\log(1 + \beta h) + \log\bigl(1 + \beta\alpha h^2\bigr)
$$

with $\alpha = \mathrm{softplus}(\tilde\alpha) > 0$ and
$\beta = -\alpha + \mathrm{softplus}(\tilde\beta) > -\alpha$ (invertibility).
**Inverse** (absent from Pyro's ``Radial``): the radius obeys
$r_x = r\,(1 + \beta / (\alpha + r))$, a quadratic
$r^2 + (\alpha + \beta - r_x)\,r - \alpha r_x = 0$ whose positive root is taken in the
cancellation-free form; then $z - z_0 = (x - z_0) / (1 + \beta h(r))$.

Reference: Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("radial", 2, num_layers=8)
    >>> flow.sample((4,)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pyroflows.nn.dense import ParamNet
from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform


class Radial(FlowTransform):
    """Radial layer ``x = z + beta * (z - z0) / (alpha + |z - z0|)`` over vectors.

    Args:
        input_dim: event dimension ``D``.
        context_dim: if given, ``z0, alpha, beta`` are predicted from the context.
        hidden_dims: widths of that hyper-network.
    """

    def __init__(
        self, input_dim: int, context_dim: int | None = None, hidden_dims: Sequence[int] = (64,)
    ) -> None:
        super().__init__((input_dim,), context_dim)
        shapes = {"z0": (input_dim,), "alpha": (), "beta": ()}
        self.params = ParamNet(shapes, context_dim, hidden_dims, init_std=1.0 / input_dim**0.5)

    def _params(self, context):
        p = self.params(context)
        alpha = F.softplus(p["alpha"])
        return p["z0"], alpha[..., None], (F.softplus(p["beta"]) - alpha)[..., None]

    def _log_det(self, r, alpha, beta):
        h = 1 / (alpha + r)
        dim = self.event_shape[0]
        return ((dim - 1) * torch.log1p(beta * h) + torch.log1p(beta * alpha * h * h)).squeeze(-1)

    def forward_and_log_det(self, z, context=None):
        z0, alpha, beta = self._params(context)
        d = z - z0
        r = d.norm(dim=-1, keepdim=True)
        return z + beta * d / (alpha + r), self._log_det(r, alpha, beta)

    def inverse_and_log_det(self, x, context=None):
        z0, alpha, beta = self._params(context)
        d = x - z0
        rx = d.norm(dim=-1, keepdim=True)
        q = alpha + beta - rx
        disc = torch.sqrt(q * q + 4 * alpha * rx)
        # both forms of the positive root, each used where it does not cancel
        r = torch.where(q > 0, 2 * alpha * rx / (q + disc), (disc - q) / 2)
        return z0 + d / (1 + beta / (alpha + r)), self._log_det(r, alpha, beta)


def radial(
    input_dim: int, context_dim: int | None = None, hidden_dims: Sequence[int] = (64,)
) -> Radial:
    """A radial layer (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        context_dim: width of the context: its parameters then come from a hyper-network.
        hidden_dims: widths of that hyper-network.

    Returns:
        The layer.
    """
    return Radial(input_dim, context_dim, hidden_dims)


@flow_family(default_layers=16, default_hidden=(64,))
def build_radial(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
) -> list[FlowTransform]:
    """``num_layers`` radial layers.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    return [Radial(shape[0], context_dim, hidden_dims) for _ in range(num_layers)]
