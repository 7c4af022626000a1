r"""NICE: additive coupling layers and a learnable diagonal rescaling.

$$
x_b = z_b + m(z_a), \qquad \log|\det J| = 0
$$

for each coupling layer (alternating partitions), followed by the diagonal rescaling
$x = z \odot \exp(s)$, $\log|\det J| = \sum_i s_i$, which lets the otherwise volume
preserving flow change scale.

Reference: Dinh, Krueger, Bengio (2015), *NICE: Non-linear Independent Components Estimation*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("nice", 4, num_layers=4)
    >>> flow.log_prob(torch.randn(10, 4)).shape
    torch.Size([10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyroflows.nn.dense import ParamNet
from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform, sum_event
from pyroflows.transforms.coupling import Coupling, coupling_layers, coupling_mask


class Rescale(FlowTransform):
    """Diagonal rescaling ``x = z * exp(s)`` with a learnable (or context-predicted) log-scale.

    Args:
        event_shape: shape of one event.
        context_dim: if given, ``s`` is predicted from the context by a small MLP.
        hidden_dims: that MLP's widths.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        context_dim: int | None = None,
        hidden_dims: Sequence[int] = (64,),
    ) -> None:
        super().__init__(tuple(event_shape), context_dim)
        self.params = ParamNet(
            {"log_scale": self.event_shape}, context_dim, hidden_dims, init_std=0.0
        )

    def _scale(self, inputs: torch.Tensor, context: torch.Tensor | None, sign: float):
        s = self.params(context)["log_scale"]  # (*context batch, *event) broadcasts with inputs
        batch = inputs.shape[: inputs.dim() - self.event_dim]
        return inputs * torch.exp(sign * s), sum_event(s, self.event_dim).expand(batch)

    def forward_and_log_det(self, z, context=None):
        return self._scale(z, context, 1.0)

    def inverse_and_log_det(self, x, context=None):
        return self._scale(x, context, -1.0)


def additive_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parity: int = 0,
) -> Coupling:
    """A NICE additive coupling layer over vectors (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: widths of the conditioner.
        context_dim: width of the context, or ``None``.
        parity: which half is transformed.

    Returns:
        The layer.
    """
    return Coupling(
        coupling_mask((input_dim,), "half", parity), "additive", hidden_dims, context_dim
    )


@flow_family(image=True, default_layers=4, default_hidden=(128, 128))
def build_nice(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    mask: str | None = None,
) -> list[FlowTransform]:
    """NICE: ``num_layers`` additive couplings with alternating partitions, then a rescaling.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        mask: ``"half"`` (default) or ``"alternate"`` (even/odd coordinates); ``"checkerboard"`` or
            ``"channel"`` for images.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    layers: list[FlowTransform] = coupling_layers(
        shape, num_layers, "additive", hidden_dims, context_dim, mask
    )
    return layers + [Rescale(shape, context_dim, hidden_dims)]
