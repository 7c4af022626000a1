r"""BNAF: block neural autoregressive flow.

One layer is a small monotone network $N$ applied to all coordinates at once. Each hidden
layer holds $a$ units per coordinate; its weight matrix is block lower-triangular in the
autoregressive ordering, with $a_{out} \times a_{in}$ blocks:

$$
W = \begin{pmatrix} \exp(V_{11}) & & \\ V_{21} & \exp(V_{22}) & \\ \vdots & & \ddots
\end{pmatrix}, \qquad \text{then each row scaled to norm } e^{g_r}
$$

(weight normalisation; diagonal blocks strictly positive). Between layers a ``tanh``. Output
$i$ then depends on $x_{\le i}$ only and is strictly increasing in $x_i$, so the Jacobian is
triangular with positive diagonal, and $\partial N_i / \partial x_i$ is the product of the
diagonal blocks and activation derivatives of coordinate $i$'s path: computed in log space as a
chain of ``logsumexp`` matrix products of the log diagonal blocks (never a full Jacobian). A
learned gate makes the layer onto $\mathbb R$ (``tanh`` alone would bound the output):

$$
y_i = \sigma(\alpha_i)\, x_i + (1 - \sigma(\alpha_i))\, N_i(x_{\le i}), \qquad
\log|\det J| = \sum_i \log\big(\sigma(\alpha_i) + (1 - \sigma(\alpha_i))\,
\partial N_i / \partial x_i\big).
$$

**Directions.** The network is evaluated in one pass in one direction only. By default
(``parallel="inverse"``, the paper's density estimator) it is the density map $x \to z$:
``log_prob`` is one pass. Its inverse, $z \to x$ (``sample``, ``rsample``,
``rsample_and_log_prob``), has no closed form: it is solved numerically, **sequentially** over
the $D$ coordinates, each by Newton steps safeguarded by an exact bracket (since
$|N_i| \le M_i = \sum_j |W_{ij}| + |b_i|$ at the last layer, $x_i$ lies within
$(1 - \sigma)\,M_i / \sigma$ of $y_i / \sigma$; a step that would leave the bracket bisects it
instead) to machine precision (far below 1e-6 in float64), then one Newton step with autograd
on, which gives exact implicit gradients. That costs a few to a few tens of network passes per
coordinate and layer (all $D$ coordinates' network each time): fine for small $D$, expensive
for large $D$. ``parallel="forward"`` swaps the roles (the network is the
sampling map $z \to x$, as in Pyro's ``AutoNormalizingFlow`` guide): ``rsample_and_log_prob``
is one pass, good for VI, and ``log_prob`` of an external point is the iterative solve.

Hidden widths: each entry of ``hidden_dims`` is a total width; a layer gets
$\lceil h / D \rceil$ units per coordinate.

Reference: De Cao, Titov, Aziz (2019), *Block Neural Autoregressive Flow*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("bnaf", 2, hidden_dims=(16, 16))
    >>> flow.log_prob(torch.randn(5, 2)).shape  # one pass
    torch.Size([5])
    >>> flow.sample((3,)).shape  # numerical inverse, sequential over coordinates
    torch.Size([3, 2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.nn.made import check_ordering
from pyroflows.registry import flow_family
from pyroflows.transforms.autoregressive import DIRECTIONS, layer_orderings
from pyroflows.transforms.base import FlowTransform
from pyroflows.validation import check_choice, check_int

LOG2 = math.log(2.0)


class MaskedBlockLinear(nn.Module):
    """A block lower-triangular linear map with positive, weight-normalised diagonal blocks.

    Args:
        dim: number of coordinates ``D`` (blocks along each side).
        in_block: units per coordinate on the input side.
        out_block: units per coordinate on the output side.
    """

    def __init__(self, dim: int, in_block: int, out_block: int) -> None:
        super().__init__()
        self.dim, self.in_block, self.out_block = dim, in_block, out_block
        rows = torch.arange(dim * out_block, device="cpu") // out_block
        cols = torch.arange(dim * in_block, device="cpu") // in_block
        self.weight = nn.Parameter(
            torch.randn(dim * out_block, dim * in_block) / math.sqrt(in_block)
        )
        # Row norm 1/sqrt(a_in): the a_in positive diagonal entries of a row then sum to about
        # 1, so a fresh layer neither stretches nor squashes its coordinate.
        self.log_norm = nn.Parameter(torch.full((dim * out_block, 1), -0.5 * math.log(in_block)))
        self.bias = nn.Parameter(torch.empty(dim * out_block).uniform_(-1, 1) / math.sqrt(in_block))
        device = self.weight.device
        self.register_buffer("diag", (rows[:, None] == cols[None, :]).to(device))
        self.register_buffer(
            "lower", (rows[:, None] >= cols[None, :]).to(device=device, dtype=self.weight.dtype)
        )

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective weight ``(D a_out, D a_in)`` and the log of its diagonal blocks
        ``(D, a_out, a_in)``."""
        v = self.weight
        w = torch.where(self.diag, torch.exp(v), v) * self.lower
        log_sq_norm = torch.log((w * w).sum(-1, keepdim=True))
        weight = torch.exp(self.log_norm - 0.5 * log_sq_norm) * w
        log_w = self.log_norm - 0.5 * log_sq_norm + v  # log of the diagonal entries
        d, a_out, a_in = self.dim, self.out_block, self.in_block
        log_diag = log_w.view(d, a_out, d, a_in).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return weight, log_diag


class BlockNeuralAutoregressive(FlowTransform):
    """One BNAF layer over vectors (see the module docstring for the map and its directions).

    Args:
        input_dim: ``D``.
        hidden_dims: total widths of the hidden layers (``ceil(h / D)`` units per coordinate).
        context_dim: width of a context vector (added to the first hidden layer), or ``None``.
        ordering: permutation of ``0..D-1`` giving the autoregressive order (default identity).
        parallel: ``"inverse"`` (the network is the density map ``x -> z``; sampling is the
            numerical inverse) or ``"forward"`` (the network is the sampling map ``z -> x``;
            ``log_prob`` is the numerical inverse).
        max_iterations: most safeguarded Newton steps per coordinate in the numerical inverse
            (it stops earlier, once a step is below a few ulps).

    Raises:
        ValueError: empty ``hidden_dims``, a bad ordering, an unknown ``parallel``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        ordering: Sequence[int] | torch.Tensor | None = None,
        parallel: str = "inverse",
        max_iterations: int = 100,
    ) -> None:
        input_dim = check_int(input_dim, "input_dim")
        direction = check_choice(parallel, "parallel", DIRECTIONS)
        if not hidden_dims:
            raise ValueError("hidden_dims must not be empty")
        super().__init__((input_dim,), context_dim)
        self.parallel = direction
        self.max_iterations = check_int(max_iterations, "max_iterations")
        blocks = [1] + [-(-check_int(h, "hidden_dims") // input_dim) for h in hidden_dims] + [1]
        self.linears = nn.ModuleList(
            MaskedBlockLinear(input_dim, a, b) for a, b in zip(blocks[:-1], blocks[1:], strict=True)
        )
        self.context_layer = (
            nn.Linear(context_dim, input_dim * blocks[1], bias=False) if context_dim else None
        )
        self.gate = nn.Parameter(torch.zeros(input_dim))
        order = check_ordering(ordering, input_dim)
        device = self.gate.device
        self.register_buffer("ordering", order.to(device))
        self.register_buffer("unorder", torch.argsort(order).to(device))

    # -- the network, in the layer's own (natural) ordering ------------------------------------
    def _network(
        self,
        u: torch.Tensor,
        context: torch.Tensor | None,
        weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = gate * u + (1 - gate) * N(u)`` and ``log dy_i/du_i``, both ``(n, D)``;
        ``weights``: every layer's ``weights()``, when the caller evaluates many times."""
        n, dim = u.shape
        h, log_j = u, None
        last = len(self.linears) - 1
        weights = weights or [linear.weights() for linear in self.linears]
        for i, (linear, (weight, log_diag)) in enumerate(zip(self.linears, weights, strict=True)):
            h = F.linear(h, weight, linear.bias)
            if i == 0:
                if self.context_layer is not None:
                    h = h + self.context_layer(context)
                log_j = log_diag[..., 0].expand(n, -1, -1)  # (n, D, a_1)
            else:  # chain rule on the diagonal blocks, in log space
                log_j = torch.logsumexp(log_diag + log_j[:, :, None, :], dim=-1)
            if i < last:  # tanh, and log tanh'(h) = 2 (log 2 - h - softplus(-2h))
                log_j = log_j + (2 * (LOG2 - h - F.softplus(-2 * h))).view(n, dim, -1)
                h = torch.tanh(h)
        log_n = log_j.squeeze(-1)
        gate = torch.sigmoid(self.gate)
        y = gate * u + (1 - gate) * h
        log_dy = torch.logaddexp(F.logsigmoid(self.gate), F.logsigmoid(-self.gate) + log_n)
        return y, log_dy

    def _bound(self) -> torch.Tensor:
        """``M_i`` with ``|N_i| <= M_i``: the last layer's absolute row sums plus bias."""
        last = self.linears[-1]
        return last.weights()[0].abs().sum(-1) + last.bias.abs()

    def _solve(self, target: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``u`` with ``_network(u)[0] == target``, one coordinate after the other.

        Each coordinate: Newton steps safeguarded by an exact bracket (a step leaving the
        bracket is replaced by bisection, and every evaluation shrinks the bracket), without
        gradients, until a step is below a few ulps; then one Newton step with autograd on,
        which carries the exact implicit gradients to ``target``, ``context``, the coordinates
        solved before and the parameters."""
        n, dim = target.shape
        gate = torch.sigmoid(self.gate).detach()
        tol = 8 * torch.finfo(target.dtype).eps
        weights = [linear.weights() for linear in self.linears]  # once for all evaluations
        solved: list[torch.Tensor] = []
        for k in range(dim):
            rest = target.new_zeros(n, dim - k - 1)

            def evaluate(a: torch.Tensor, k: int = k, rest: torch.Tensor = rest):
                y, log_dy = self._network(
                    torch.cat([*solved, a[:, None], rest], -1), context, weights
                )
                return y[:, k], torch.exp(log_dy[:, k])

            t = target[:, k]
            with torch.no_grad():
                t0 = t.detach()
                reach = (1 - gate[k]) * self._bound()[k] / gate[k] + 1e-3 * (1 + t0.abs())
                lo, hi = t0 / gate[k] - reach, t0 / gate[k] + reach
                a = (t0 / gate[k]).clamp(lo, hi)
                for _ in range(self.max_iterations):
                    y, dy = evaluate(a)
                    above = y > t0
                    hi, lo = torch.where(above, a, hi), torch.where(above, lo, a)
                    step = a - (y - t0) / dy
                    inside = (step >= lo) & (step <= hi)
                    new = torch.where(inside, step, (lo + hi) / 2)
                    converged = bool(((new - a).abs() <= tol * (1 + a.abs())).all())
                    a = new
                    if converged:
                        break
            y, dy = evaluate(a)
            solved.append((a - (y - t) / dy)[:, None])
        return torch.cat(solved, -1)

    # -- FlowTransform -------------------------------------------------------------------------
    def _map(
        self, inputs: torch.Tensor, context: torch.Tensor | None, network_side: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``inputs`` through the network (``network_side``) or its numerical inverse;
        return the output and ``sum_i log dy_i/du_i`` of the network at its input."""
        batch, dim = inputs.shape[:-1], self.event_shape[0]
        u = inputs.reshape(-1, dim)[:, self.ordering]
        ctx = None if context is None else context.expand(*batch, -1).reshape(u.shape[0], -1)
        if network_side:
            out, log_dy = self._network(u, ctx)
        else:
            out = self._solve(u, ctx)
            log_dy = self._network(out, ctx)[1]  # the log-det at the solution, with gradients
        out = out[:, self.unorder].reshape(inputs.shape)
        return out, log_dy.sum(-1).reshape(batch)

    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``log|det dx/dz|``: one pass if ``parallel="forward"``, else the
        sequential numerical inverse."""
        if self.parallel == "forward":
            return self._map(z, context, network_side=True)
        x, log_dz = self._map(z, context, network_side=False)
        return x, -log_dz

    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and the forward ``log|det dx/dz|``: one pass if ``parallel="inverse"``, else
        the sequential numerical inverse."""
        if self.parallel == "inverse":
            z, log_dz = self._map(x, context, network_side=True)
            return z, -log_dz
        return self._map(x, context, network_side=False)

    def extra_repr(self) -> str:
        blocks = [lin.out_block for lin in self.linears[:-1]]
        return f"{super().extra_repr()}, units_per_dim={blocks}, parallel={self.parallel!r}"


def block_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    parallel: str = "inverse",
    ordering: Sequence[int] | torch.Tensor | None = None,
) -> BlockNeuralAutoregressive:
    """One BNAF layer over vectors of ``input_dim`` (Pyro-style helper).

    Args:
        input_dim: ``D``.
        hidden_dims: total hidden widths (``ceil(h / D)`` units per coordinate).
        context_dim: width of a context vector, or ``None``.
        parallel: ``"inverse"`` (density in one pass) or ``"forward"`` (sampling in one pass).
        ordering: permutation of ``0..D-1`` (default identity).
    """
    return BlockNeuralAutoregressive(input_dim, hidden_dims, context_dim, ordering, parallel)


@flow_family(default_layers=2, default_hidden=(64, 64), inverse_atol=1e-5)
def build_bnaf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    parallel: str = "inverse",
    ordering: str | Sequence[int] | torch.Tensor = "reverse",
    max_iterations: int = 100,
) -> list[FlowTransform]:
    """BNAF: ``num_layers`` block neural autoregressive layers with alternating orderings.

    Options:
        parallel: ``"inverse"`` (default: ``log_prob`` in one pass, sampling by the sequential
            numerical inverse) or ``"forward"`` (sampling and ``rsample_and_log_prob`` in one
            pass, for VI; ``log_prob`` of external points by the numerical inverse).
        ordering: ``"reverse"`` (alternate identity / reversed), ``"random"`` or a permutation.
        max_iterations: most safeguarded Newton steps per coordinate in the numerical inverse.
    """
    (dim,) = shape
    return [
        BlockNeuralAutoregressive(dim, hidden_dims, context_dim, order, parallel, max_iterations)
        for order in layer_orderings(dim, num_layers, ordering)
    ]
