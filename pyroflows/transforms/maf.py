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

import torch

from pyroflows.registry import flow_family
from pyroflows.transforms.autoregressive import Autoregressive, autoregressive_layers
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.elementwise import Affine


def masked_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] = (128, 128),
    context_dim: int | None = None,
    ordering: Sequence[int] | torch.Tensor | None = None,
    scale_bound: float | None = 3.0,
) -> Autoregressive:
    """One MAF layer over vectors of ``input_dim`` (Pyro-style helper; density in one pass)."""
    return Autoregressive(input_dim, "inverse", Affine(scale_bound), hidden_dims, context_dim, ordering)


@flow_family(default_layers=5, default_hidden=(128, 128))
def build_maf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    ordering: str | Sequence[int] = "reverse",
    scale_bound: float | None = 3.0,
) -> list[FlowTransform]:
    """MAF: ``num_layers`` affine autoregressive layers, fast density, sequential sampling.

    Options:
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return autoregressive_layers(shape, num_layers, "inverse", hidden_dims, context_dim, Affine(scale_bound), ordering)
