r"""IAF: inverse autoregressive flow, the sampling direction of an autoregressive layer.

Each layer reads the *noise* side:

$$
x_i = z_i\, e^{s_i(z_{<i})} + t_i(z_{<i}), \qquad \log|\det J| = \sum_i s_i(z_{<i}),
$$

with $s$ soft-clamped ($s = B \tanh(\tilde s / B)$), which bounds each layer's scale the way
the sigmoid gate of Kingma et al. does, and $(\tilde s, t)$ one MADE pass. Sampling and
``rsample_and_log_prob`` ($z \to x$) are one parallel pass per layer with no inversion, which
is what variational inference and distillation need; ``log_prob`` of an external point
($x \to z$) is exact and sequential, $D$ steps per layer.

Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016), *Improved
Variational Inference with Inverse Autoregressive Flow*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("iaf", 4)
    >>> x, log_q = flow.rsample_and_log_prob((10,))
    >>> log_q.shape
    torch.Size([10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyroflows.registry import flow_family
from pyroflows.transforms.autoregressive import (
    Autoregressive,
    affine_autoregressive,
    autoregressive_layers,
)
from pyroflows.transforms.base import FlowTransform


def inverse_autoregressive(input_dim: int, **options: Any) -> Autoregressive:
    """One IAF layer over vectors of ``input_dim`` (sampling in one pass; Pyro-style helper).

    ``options``: ``hidden_dims``, ``context_dim``, ``ordering``, ``scale_bound``, as in
    :func:`~pyroflows.transforms.autoregressive.affine_autoregressive`.
    """
    return affine_autoregressive(input_dim, "forward", **options)


@flow_family(default_layers=5, default_hidden=(128, 128))
def build_iaf(shape: tuple[int, ...], *, num_layers: int, hidden_dims: Sequence[int], **options: Any) -> list[FlowTransform]:
    """IAF: ``num_layers`` affine autoregressive layers, fast sampling, exact sequential density.

    Options (see :func:`~pyroflows.transforms.autoregressive.autoregressive_layers`):
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return autoregressive_layers(shape, "forward", num_layers=num_layers, hidden_dims=hidden_dims, **options)
