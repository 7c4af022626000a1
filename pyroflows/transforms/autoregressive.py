r"""The autoregressive mechanism shared by MAF and IAF.

One layer is an elementwise bijection $f$ (:mod:`pyroflows.transforms.elementwise`) whose
parameters a MADE network (:class:`pyroflows.nn.made.MADE`) predicts from the variables
*before* $i$ in an ordering, on one side of the map:

$$
\text{IAF:}\quad x_i = f\big(z_i;\ \theta_i(z_{<i}, c)\big), \qquad
\text{MAF:}\quad x_i = f\big(z_i;\ \theta_i(x_{<i}, c)\big),
\qquad \log|\det J| = \sum_i \log|f'(z_i)|.
$$

The Jacobian is triangular, so the log-determinant is a sum either way. The side the network
reads is known in one direction only, and that direction costs one parallel MADE pass:
$z \to x$ (sampling) for IAF, $x \to z$ (density) for MAF. The other direction solves for the
variables one at a time, exactly, with :meth:`MADE.autoregress` ($D$ small steps that compute
every hidden unit once). MAF and IAF are therefore the *same* layer with ``parallel`` set to
``"inverse"`` or ``"forward"``.

With the default soft-clamped affine map, $f(z; s, t) = z\, e^{B \tanh(s/B)} + t$, no layer
scales by more than $e^{B}$, and a freshly built layer is the identity (zero-initialised output).

Reference: Kingma et al. (2016), *Improved Variational Inference with Inverse Autoregressive
Flow*; Papamakarios, Pavlakou, Murray (2017), *Masked Autoregressive Flow for Density
Estimation*.

Example:
    >>> layer = Autoregressive(4, parallel="inverse", hidden_dims=(16,))  # a MAF layer
    >>> z = torch.randn(8, 4)
    >>> x, ladj = layer.forward_and_log_det(z)  # sequential
    >>> torch.allclose(layer.inverse_and_log_det(x)[0], z, atol=1e-5)  # one pass
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyroflows.nn.made import MADE, check_ordering
from pyroflows.transforms.base import FlowTransform, expand_context
from pyroflows.transforms.elementwise import ELEMENTWISE, Affine

DIRECTIONS = ("forward", "inverse")


class Autoregressive(FlowTransform):
    """One autoregressive layer ``x_i = f(z_i; theta_i(w_{<i}, context))`` over vectors.

    Args:
        input_dim: ``D``.
        parallel: ``"forward"`` (IAF: the network reads ``z``, sampling is one pass) or
            ``"inverse"`` (MAF: the network reads ``x``, density is one pass).
        elementwise: ``"affine"`` (default), ``"additive"`` or an elementwise-bijection object.
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: permutation of ``0..D-1`` giving the autoregressive order (default identity).
    """

    def __init__(
        self,
        input_dim: int,
        parallel: str = "inverse",
        elementwise: str | object = "affine",
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        ordering: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        if parallel not in DIRECTIONS:
            raise ValueError(f"parallel must be one of {DIRECTIONS}, got {parallel!r}")
        if isinstance(elementwise, str) and elementwise not in ELEMENTWISE:
            raise ValueError(f"elementwise must be one of {tuple(ELEMENTWISE)} or an object, got {elementwise!r}")
        super().__init__((input_dim,), context_dim)
        self.parallel = parallel
        self.elementwise = ELEMENTWISE[elementwise]() if isinstance(elementwise, str) else elementwise
        self.made = MADE(input_dim, self.elementwise.num_params, hidden_dims, context_dim, ordering)

    def _transform(
        self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        apply = self.elementwise.inverse if inverse else self.elementwise.forward
        if inverse == (self.parallel == "inverse"):  # the network reads the inputs: one pass
            params = self.made(inputs, expand_context(context, inputs.shape[:-1]))
            out, ladj = apply(inputs, params)
            return out, ladj.sum(-1)
        return self.made.autoregress(inputs, apply, context)

    def forward_and_log_det(self, z, context=None):
        return self._transform(z, context, inverse=False)

    def inverse_and_log_det(self, x, context=None):
        return self._transform(x, context, inverse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parallel={self.parallel!r}"


def layer_orderings(dim: int, num_layers: int, ordering: str | Sequence[int] | torch.Tensor = "reverse") -> list[torch.Tensor]:
    """The orderings of a stack of ``num_layers`` layers.

    Args:
        dim: ``D``.
        num_layers: number of layers.
        ordering: ``"reverse"`` (identity and reversed, alternating), ``"random"`` (a random
            permutation per layer, drawn from torch's global RNG; saved in the ``state_dict``), or
            one permutation of ``0..D-1`` used by every layer.
    """
    if isinstance(ordering, str):
        if ordering == "reverse":
            base = torch.arange(dim, device="cpu")
            return [base if i % 2 == 0 else base.flip(0) for i in range(num_layers)]
        if ordering == "random":
            return [torch.randperm(dim, device="cpu") for _ in range(num_layers)]
        raise ValueError(f"ordering must be 'reverse', 'random' or a permutation of 0..{dim - 1}, got {ordering!r}")
    return [check_ordering(ordering, dim)] * num_layers


def affine_autoregressive(
    input_dim: int,
    parallel: str,
    hidden_dims: Sequence[int] = (128, 128),
    context_dim: int | None = None,
    ordering: Sequence[int] | torch.Tensor | None = None,
    scale_bound: float | None = 3.0,
) -> Autoregressive:
    """One affine autoregressive layer with a soft-clamped log-scale (the MAF / IAF helpers).

    Args:
        input_dim: ``D``.
        parallel: ``"inverse"`` (MAF) or ``"forward"`` (IAF).
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: permutation of ``0..D-1`` (default identity).
        scale_bound: bound ``B`` of the log-scale ``B tanh(s / B)`` (``None``: unclamped).
    """
    return Autoregressive(input_dim, parallel, Affine(scale_bound), hidden_dims, context_dim, ordering)


def autoregressive_layers(
    shape: Sequence[int],
    parallel: str,
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
    scale_bound: float | None = 3.0,
) -> list[Autoregressive]:
    """``num_layers`` affine autoregressive layers over vectors of ``shape = (D,)``: the builder
    behind ``maf`` (``parallel="inverse"``) and ``iaf`` (``parallel="forward"``).

    Args:
        shape: ``(D,)``.
        parallel: which direction is one pass, as in :class:`Autoregressive`.
        num_layers: number of layers.
        hidden_dims: MADE widths, each at least ``D - 1`` (``D`` with a context).
        context_dim: width of a context vector, or ``None``.
        ordering: ``"reverse"`` (identity and reversed, alternating), ``"random"`` or one
            permutation for every layer (see :func:`layer_orderings`).
        scale_bound: bound ``B`` of the soft-clamped log-scale (``None``: unclamped).
    """
    (dim,) = shape
    return [
        affine_autoregressive(dim, parallel, hidden_dims, context_dim, order, scale_bound)
        for order in layer_orderings(dim, num_layers, ordering)
    ]
