r"""MADE: a masked dense network whose output $i$ depends only on the inputs before $i$.

Every input $j$ gets a *degree* $m(j) \in \{1, \dots, D\}$, its position in the ``ordering``;
every hidden unit gets a degree $m(u)$ in $\{1, \dots, D-1\}$ (from $0$ when a context is
given: degree-0 units see the context only). A weight from unit $v$ to hidden unit $u$ is kept
when $m(u) \ge m(v)$, a weight to output $i$ when $m(i) > m(v)$. Output $i$ (one per
parameter of the elementwise map) is then a function of $x_{<i}$ (and the context) only,
so the Jacobian of the map it parameterises is triangular in the ordering.

Reference: Germain, Gregor, Murray, Larochelle (2015), *MADE: Masked Autoencoder for
Distribution Estimation*; Paige and Wood (2016) for the context input.

Why not Pyro's `pyro.nn.AutoRegressiveNN`: inverting an autoregressive layer with it
takes $D$ full passes. Here hidden units are stored sorted by degree, so
[`MADE.autoregress`][pyroflows.nn.made.MADE.autoregress] computes each unit exactly *once* while the
outputs are generated one after the other: a sequential inversion costs about one network pass of
arithmetic (in $D$ small steps) instead of $D$ passes; ``benchmarks/flows.py`` measures it against
Pyro, zuko, nflows and normflows (see ``docs/benchmarks.md``). The parallel pass is the same masked
MLP as Pyro's.

Example:
    >>> made = MADE(4, num_params=2, hidden_dims=(16, 16))
    >>> raw, shift = made(torch.randn(8, 4))
    >>> raw.shape
    torch.Size([8, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.validation import check_int

Elementwise = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


def check_ordering(ordering: Sequence[int] | torch.Tensor | None, dim: int) -> torch.Tensor:
    """``ordering`` as a LongTensor permutation of ``0..dim-1`` (``None``: the identity).

    ``ordering[k]`` is the input that comes ``k``-th in the autoregressive factorisation.
    """
    if ordering is None:
        return torch.arange(dim, device="cpu")
    try:
        order = torch.as_tensor(ordering, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"ordering must be a permutation of 0..{dim - 1}, got {ordering!r}"
        ) from None
    if (
        order.dim() != 1
        or order.is_floating_point()
        or order.dtype == torch.bool
        or len(order) != dim
        or not torch.equal(order.sort().values, torch.arange(dim, device="cpu"))
    ):
        raise ValueError(f"ordering must be a permutation of 0..{dim - 1}, got {ordering!r}")
    return order.long()


def _hidden_degrees(low: int, high: int, width: int) -> torch.Tensor:
    """``width`` degrees spread evenly over ``low..high``, sorted (every value appears when
    ``width >= high - low + 1``)."""
    return torch.linspace(low, high, width, device="cpu").round().long()


class MADE(nn.Module):
    """A masked autoregressive MLP ``(x, context) -> num_params tensors shaped like x``.

    Args:
        input_dim: ``D``, the width of ``x``.
        num_params: number of outputs per input dimension (e.g. 2: log-scale and shift).
        hidden_dims: widths of the hidden layers; each must be at least the number of hidden
            degrees (``D - 1``, or ``D`` with a context) so every output sees all its
            predecessors.
        context_dim: width of a context vector every unit may see, or ``None``.
        ordering: permutation of ``0..D-1``: ``ordering[k]`` is the ``k``-th variable
            (default: the identity).
        zero_init: zero the output layer, so a layer built on it starts as the identity map.

    Raises:
        ValueError: an ordering that is not a permutation, or a hidden layer too narrow.
    """

    def __init__(
        self,
        input_dim: int,
        num_params: int,
        hidden_dims: Sequence[int],
        context_dim: int | None = None,
        ordering: Sequence[int] | torch.Tensor | None = None,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        check_int(input_dim, "input_dim")
        hidden_dims = [int(h) for h in hidden_dims]
        if not hidden_dims:
            raise ValueError("hidden_dims must not be empty")
        self.input_dim, self.num_params, self.context_dim = input_dim, int(num_params), context_dim
        order = check_ordering(ordering, input_dim)
        # Degree-0 units see only the context; without one they are constants (useful at D == 1).
        low = 0 if context_dim or input_dim == 1 else 1
        needed = input_dim - low
        if any(h < needed for h in hidden_dims):
            raise ValueError(
                f"hidden_dims must all be >= {needed} for MADE to connect every output of a "
                f"{input_dim}-dim input{' with context' if context_dim else ''} to all inputs "
                f"before it, got {tuple(hidden_dims)}"
            )
        # Masks are built on the CPU, then follow the weights (torch's default device).
        in_degree = torch.empty(input_dim, dtype=torch.long, device="cpu")
        in_degree[order] = torch.arange(1, input_dim + 1, device="cpu")
        degrees = [in_degree] + [_hidden_degrees(low, input_dim - 1, h) for h in hidden_dims]
        out_degree = in_degree.repeat(self.num_params)

        widths = [input_dim] + hidden_dims + [input_dim * self.num_params]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        masks = [
            d_out[:, None] >= d_in[None, :]
            for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True)
        ]
        masks.append(out_degree[:, None] > degrees[-1][None, :])
        device = self.layers[0].weight.device
        for i, mask in enumerate(masks):
            self.register_buffer(f"mask{i}", mask.float().to(device))
        self.context_layer = (
            nn.Linear(context_dim, hidden_dims[0], bias=False) if context_dim else None
        )
        self.register_buffer("ordering", order.to(device))
        # Per-layer unit counts by degree low..D-1 (hidden degrees are sorted): the step sizes of
        # ``autoregress``. They depend on the widths only, never on the ordering.
        self._counts = [torch.bincount(d - low, minlength=needed).tolist() for d in degrees[1:]]
        self._low = low
        if zero_init:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def masked_weights(self) -> list[torch.Tensor]:
        """The weight matrices with the autoregressive masks applied."""
        return [layer.weight * getattr(self, f"mask{i}") for i, layer in enumerate(self.layers)]

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """All outputs in one pass: ``num_params`` tensors of ``x``'s shape."""
        weights = self.masked_weights()
        h = F.linear(x, weights[0], self.layers[0].bias)
        if self.context_layer is not None:
            h = h + self.context_layer(context)
        for weight, layer in zip(weights[1:], self.layers[1:], strict=True):
            h = F.linear(F.relu(h, inplace=True), weight, layer.bias)  # h is this pass's own tensor
        return h.split(self.input_dim, dim=-1)

    def autoregress(
        self, inputs: torch.Tensor, fn: Elementwise, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``y_i = fn(inputs_i; params_i(y_{<i}))`` for ``y``, one variable at a time.

        This inverts the map ``y -> fn(...)`` whose parameters the network predicts from its own
        output. Each hidden unit is computed once, when the last input it sees is known: the
        pre-activations of the units still pending are updated with one rank-``n`` product per
        newly finished group of ``n`` units.

        Args:
            inputs: ``(..., D)``.
            fn: the elementwise map, ``fn(u, params) -> (y, log|dy/du| or its inverse's)``.
            context: ``(..., context_dim)`` broadcast to ``inputs``' batch shape, or ``None``.

        Returns:
            ``y`` of ``inputs``' shape and the sum over ``i`` of ``fn``'s elementwise log-det.
        """
        batch, dim, low = inputs.shape[:-1], self.input_dim, self._low
        u = inputs.reshape(-1, dim)
        n = u.shape[0]
        weights = [w.t() for w in self.masked_weights()]  # (in, out), rows picked per step
        order = self.ordering
        # output columns sorted by degree: the num_params outputs of ordering[k] come k-th
        out_cols = (
            order[:, None] + dim * torch.arange(self.num_params, device=order.device)
        ).reshape(-1)
        weights[-1] = weights[-1][:, out_cols]
        pending = [layer.bias.expand(n, -1) for layer in self.layers]
        pending[-1] = pending[-1][:, out_cols]
        if self.context_layer is not None:
            pending[0] = pending[0] + self.context_layer(context.expand(*batch, -1).reshape(n, -1))
        # starts[l]: index of the first unit of layer l's still-pending degrees
        starts = [0] * len(self.layers)
        ys, ladj = [], 0.0
        order_list = order.tolist()  # python ints: plain views, not gathers, in the loop
        for k in range(dim):  # find variable order[k], of degree k + 1
            if k >= 1:  # variable order[k - 1] was just found: feed it to the first layer
                pending[0] = torch.addmm(
                    pending[0], ys[-1][:, None], weights[0][order_list[k - 1], starts[0] :][None, :]
                )
            for i in range(len(self.layers) - 1 if k >= low else 0):
                count = self._counts[i][k - low]  # units of degree k: they see variables <= k
                if count == 0:
                    continue
                done = F.relu(pending[i][:, :count])
                pending[i] = pending[i][:, count:]
                rows = slice(starts[i], starts[i] + count)
                starts[i] += count
                pending[i + 1] = torch.addmm(
                    pending[i + 1], done, weights[i + 1][rows, starts[i + 1] :]
                )
            params = pending[-1][:, : self.num_params].unbind(-1)
            pending[-1] = pending[-1][:, self.num_params :]
            starts[-1] += self.num_params
            y, ladj_k = fn(u[:, order_list[k]], params)
            ys.append(y)
            ladj = ladj + ladj_k
        y = torch.stack(ys, dim=-1)[:, torch.argsort(order)]
        return y.reshape(inputs.shape), ladj.reshape(batch)
