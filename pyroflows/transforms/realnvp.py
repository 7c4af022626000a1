r"""RealNVP: affine coupling layers.

$$
x_a = z_a, \qquad x_b = z_b \odot \exp(s(z_a)) + t(z_a), \qquad
\log|\det J| = \sum_b s_b(z_a)
$$

with the log-scale soft-clamped, $s = B \tanh(\tilde s / B)$, so no layer can overflow.
Masks: ``"half"`` or ``"alternate"`` (even/odd) for vectors, ``"checkerboard"`` or
``"channel"`` for images, alternating parity from layer to layer.

Reference: Dinh, Sohl-Dickstein, Bengio (2017), *Density estimation using Real NVP*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("realnvp", 2)
    >>> x, log_q = flow.rsample_and_log_prob((100,))
    >>> x.shape, log_q.shape
    (torch.Size([100, 2]), torch.Size([100]))
"""

from __future__ import annotations

from collections.abc import Sequence

from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.coupling import Coupling, coupling_layers, coupling_mask
from pyroflows.transforms.elementwise import Affine


def affine_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parity: int = 0,
    mask: str = "half",
    scale_bound: float | None = 3.0,
) -> Coupling:
    """A RealNVP affine coupling layer over vectors of ``input_dim`` (Pyro-style helper)."""
    return Coupling(coupling_mask((input_dim,), mask, parity), Affine(scale_bound), hidden_dims, context_dim)


@flow_family(image=True, default_layers=6, default_hidden=(64, 64))
def build_realnvp(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    mask: str | None = None,
    scale_bound: float | None = 3.0,
) -> list[FlowTransform]:
    """RealNVP: ``num_layers`` affine couplings with alternating masks.

    Options:
        mask: ``"half"`` (vector default), ``"alternate"``, ``"checkerboard"`` (image default)
            or ``"channel"``.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return coupling_layers(shape, num_layers, Affine(scale_bound), hidden_dims, context_dim, mask)
