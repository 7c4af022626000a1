r"""The autoregressive mechanism: MAF, IAF and the autoregressive spline flow are one layer.

One layer is an elementwise bijection $f$ (`pyroflows.transforms.elementwise`: affine,
additive, rational-quadratic spline, ...) whose ``f.num_params`` parameters per coordinate a
MADE network ([`MADE`][pyroflows.nn.made.MADE]) predicts from the variables *before* $i$ in an
ordering, on one side of the map:

$$
\text{IAF:}\quad x_i = f\big(z_i;\ \theta_i(z_{<i}, c)\big), \qquad
\text{MAF:}\quad x_i = f\big(z_i;\ \theta_i(x_{<i}, c)\big),
\qquad \log|\det J| = \sum_i \log|f'(z_i)|.
$$

The Jacobian is triangular, so the log-determinant is a sum either way. The side the network
reads is known in one direction only, and that direction costs one parallel MADE pass:
$z \to x$ (sampling) for IAF, $x \to z$ (density) for MAF. The other direction solves for the
variables one at a time, exactly, with [`MADE.autoregress`][pyroflows.nn.made.MADE.autoregress]
($D$ small steps that compute every hidden unit once). MAF and IAF are therefore the *same*
layer with ``parallel`` set to ``"inverse"`` or ``"forward"``; ``maf`` and ``iaf`` are the
affine map, ``nsf_ar`` the spline (`pyroflows.transforms.spline`).

**MAF** (``"maf"``): ``log_prob`` is one pass per layer, ``sample`` exact and sequential.
**IAF** (``"iaf"``): ``sample`` and ``rsample_and_log_prob`` are one pass per layer (what VI and
distillation need), ``log_prob`` of an external point exact and sequential. Orderings alternate
between layers (identity, reversed) unless ``ordering="random"`` or an explicit permutation.
With the default soft-clamped affine map, $f(z; s, t) = z\, e^{B \tanh(s/B)} + t$, no layer
scales by more than $e^{B}$, and a freshly built layer is the identity (zero-initialised output).

References: Kingma et al. (2016), *Improved Variational Inference with Inverse Autoregressive
Flow*; Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density
Estimation*.

Example:
    >>> import pyroflows
    >>> layer = Autoregressive(4, parallel="inverse", hidden_dims=(16,))  # a MAF layer
    >>> z = torch.randn(8, 4)
    >>> x, ladj = layer.forward_and_log_det(z)  # sequential
    >>> torch.allclose(layer.inverse_and_log_det(x)[0], z, atol=1e-5)  # one pass
    True
    >>> x, log_q = pyroflows.build_flow("iaf", 4).rsample_and_log_prob((10,))  # one pass
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pyroflows.nn.made import MADE, check_ordering
from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform, expand_context
from pyroflows.transforms.elementwise import Affine, ElementwiseMap, resolve_elementwise
from pyroflows.validation import check_choice

DIRECTIONS = ("forward", "inverse")


class Autoregressive(FlowTransform):
    """One autoregressive layer ``x_i = f(z_i; theta_i(w_{<i}, context))`` over vectors.

    Args:
        input_dim: ``D``.
        parallel: ``"forward"`` (IAF: the network reads ``z``, sampling is one pass) or
            ``"inverse"`` (MAF: the network reads ``x``, density is one pass).
        elementwise: ``"affine"`` (default), ``"additive"``, ``"spline"`` or an elementwise map
            (see `pyroflows.transforms.elementwise`).
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: permutation of ``0..D-1`` giving the autoregressive order (default identity).

    Raises:
        ValueError: an unknown ``parallel`` or ``elementwise``, a bad ordering or too narrow
            ``hidden_dims``.
    """

    def __init__(
        self,
        input_dim: int,
        parallel: str = "inverse",
        elementwise: str | ElementwiseMap = "affine",
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        ordering: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        direction = check_choice(parallel, "parallel", DIRECTIONS)
        elementwise = resolve_elementwise(elementwise)
        super().__init__((input_dim,), context_dim)
        self.parallel = direction
        self.elementwise = elementwise
        self.made = MADE(input_dim, elementwise.num_params, hidden_dims, context_dim, ordering)

    def _transform(
        self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        apply = self.elementwise.inverse if inverse else self.elementwise.forward
        if inverse == (self.parallel == "inverse"):  # the network reads the inputs: one pass
            params = self.made(inputs, expand_context(context, inputs.shape[:-1]))
            out, ladj = apply(inputs, params)
            return out, ladj.sum(-1)
        return self.made.autoregress(inputs, apply, context)

    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``log|det dx/dz|``: one pass for IAF, sequential for MAF."""
        return self._transform(z, context, inverse=False)

    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and the forward ``log|det dx/dz|``: one pass for MAF, sequential for IAF."""
        return self._transform(x, context, inverse=True)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, parallel={self.parallel!r}, elementwise={self.elementwise!r}"
        )


def layer_orderings(
    dim: int, num_layers: int, ordering: str | Sequence[int] | torch.Tensor = "reverse"
) -> list[torch.Tensor]:
    """The orderings of a stack of ``num_layers`` layers.

    Args:
        dim: ``D``.
        num_layers: number of layers.
        ordering: ``"reverse"`` (identity and reversed, alternating), ``"random"`` (a random
            permutation per layer, drawn from torch's global RNG; saved in the ``state_dict``), or
            one permutation of ``0..D-1`` used by every layer.

    Returns:
        ``num_layers`` CPU LongTensor permutations.
    """
    if isinstance(ordering, str):
        if ordering == "reverse":
            base = torch.arange(dim, device="cpu")
            return [base if i % 2 == 0 else base.flip(0) for i in range(num_layers)]
        if ordering == "random":
            return [torch.randperm(dim, device="cpu") for _ in range(num_layers)]
        raise ValueError(
            f"ordering must be 'reverse', 'random' or a permutation of 0..{dim - 1}, "
            f"got {ordering!r}"
        )
    return [check_ordering(ordering, dim)] * num_layers


def autoregressive_layers(
    shape: Sequence[int],
    parallel: str,
    elementwise: str | ElementwiseMap,
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
) -> list[Autoregressive]:
    """``num_layers`` autoregressive layers over vectors of ``shape = (D,)``: the builder behind
    ``maf``, ``iaf`` and ``nsf_ar``.

    Args:
        shape: ``(D,)``.
        parallel: which direction is one pass, as in
            [`Autoregressive`][pyroflows.transforms.autoregressive.Autoregressive].
        elementwise: the elementwise map every layer uses (a name or an object).
        num_layers: number of layers.
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: ``"reverse"`` (identity and reversed, alternating), ``"random"`` or one
            permutation for every layer (see
            [`layer_orderings`][pyroflows.transforms.autoregressive.layer_orderings]).
    """
    (dim,) = shape
    return [
        Autoregressive(dim, parallel, elementwise, hidden_dims, context_dim, order)
        for order in layer_orderings(dim, num_layers, ordering)
    ]


def affine_autoregressive(
    input_dim: int,
    parallel: str,
    hidden_dims: Sequence[int] = (128, 128),
    context_dim: int | None = None,
    ordering: Sequence[int] | torch.Tensor | None = None,
    scale_bound: float | None = 3.0,
) -> Autoregressive:
    """One affine autoregressive layer with a soft-clamped log-scale.

    Args:
        input_dim: ``D``.
        parallel: ``"inverse"`` (MAF) or ``"forward"`` (IAF).
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: permutation of ``0..D-1`` (default identity).
        scale_bound: bound ``B`` of the log-scale ``B tanh(s / B)`` (``None``: unclamped).
    """
    return Autoregressive(
        input_dim, parallel, Affine(scale_bound), hidden_dims, context_dim, ordering
    )


def masked_autoregressive(input_dim: int, **options: Any) -> Autoregressive:
    """One MAF layer over vectors of ``input_dim`` (density in one pass; Pyro-style helper).

    Args:
        input_dim: ``D``.
        **options: ``hidden_dims``, ``context_dim``, ``ordering``, ``scale_bound``, as in
            [`affine_autoregressive`][pyroflows.transforms.autoregressive.affine_autoregressive].
    """
    return affine_autoregressive(input_dim, "inverse", **options)


def inverse_autoregressive(input_dim: int, **options: Any) -> Autoregressive:
    """One IAF layer over vectors of ``input_dim`` (sampling in one pass; Pyro-style helper).

    Args:
        input_dim: ``D``.
        **options: ``hidden_dims``, ``context_dim``, ``ordering``, ``scale_bound``, as in
            [`affine_autoregressive`][pyroflows.transforms.autoregressive.affine_autoregressive].
    """
    return affine_autoregressive(input_dim, "forward", **options)


@flow_family(default_layers=5, default_hidden=(128, 128))
def build_maf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
    scale_bound: float | None = 3.0,
) -> list[FlowTransform]:
    """MAF: ``num_layers`` affine autoregressive layers, density in one pass, exact sequential
    sampling.

    Options:
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return autoregressive_layers(
        shape,
        "inverse",
        Affine(scale_bound),
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        ordering=ordering,
    )


@flow_family(default_layers=5, default_hidden=(128, 128))
def build_iaf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
    scale_bound: float | None = 3.0,
) -> list[FlowTransform]:
    """IAF: ``num_layers`` affine autoregressive layers, sampling in one pass, exact sequential
    density.

    Options:
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    return autoregressive_layers(
        shape,
        "forward",
        Affine(scale_bound),
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        ordering=ordering,
    )
