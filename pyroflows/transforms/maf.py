r"""MAF: masked autoregressive flow, the density-estimation direction of an autoregressive layer.

Each layer reads the *data* side:

$$
x_i = z_i\, e^{s_i(x_{<i})} + t_i(x_{<i}), \qquad
z_i = \big(x_i - t_i(x_{<i})\big)\, e^{-s_i(x_{<i})}, \qquad
\log|\det J| = \sum_i s_i(x_{<i}),
$$

with $s$ soft-clamped ($s = B \tanh(\tilde s / B)$) and $(\tilde s, t)$ one MADE pass.
``log_prob`` ($x \to z$) is one parallel pass per layer; ``sample`` ($z \to x$) is exact and
sequential, $D$ steps per layer (each step computes only the hidden units that became
computable, so the whole inversion costs about one pass of arithmetic). Orderings alternate
between layers (identity, reversed) unless ``ordering="random"`` or an explicit permutation.

Reference: Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density
Estimation*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("maf", 4)
    >>> flow.log_prob(torch.randn(10, 4)).shape
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


def masked_autoregressive(input_dim: int, **options: Any) -> Autoregressive:
    """One MAF layer over vectors of ``input_dim`` (density in one pass; Pyro-style helper).

    ``options``: ``hidden_dims``, ``context_dim``, ``ordering``, ``scale_bound``, as in
    :func:`~pyroflows.transforms.autoregressive.affine_autoregressive`.
    """
    return affine_autoregressive(input_dim, "inverse", **options)


@flow_family(default_layers=5, default_hidden=(128, 128))
def build_maf(shape: tuple[int, ...], *, num_layers: int, hidden_dims: Sequence[int], **options: Any) -> list[FlowTransform]:
    """MAF: ``num_layers`` affine autoregressive layers, fast density, exact sequential sampling.

    Options (see :func:`~pyroflows.transforms.autoregressive.autoregressive_layers`):
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return autoregressive_layers(shape, "inverse", num_layers=num_layers, hidden_dims=hidden_dims, **options)
