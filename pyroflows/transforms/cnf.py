r"""Continuous normalizing flow (FFJORD): an ODE $\dot z = f(z, t[, c])$ integrated over $[0, 1]$.

The sample $x = z(1)$ of the flow solves

$$
\frac{dz}{dt} = f_\theta(z(t), t, c), \qquad z(0) = z \sim \mathcal N(0, I),
$$

and the instantaneous change of variables gives the log-determinant alongside:

$$
\frac{d}{dt} \log\Bigl|\det\frac{\partial z(t)}{\partial z(0)}\Bigr| =
\operatorname{tr}\Bigl(\frac{\partial f_\theta}{\partial z}(z(t), t)\Bigr), \qquad
\log\Bigl|\det\frac{\partial x}{\partial z}\Bigr|
    = \int_0^1 \operatorname{tr}\frac{\partial f}{\partial z}\,dt .
$$

Both are integrated together, as one augmented ODE, by ``torchdiffeq`` (``method``, ``rtol``,
``atol``; ``adjoint=True`` uses the adjoint method, memory constant in the number of solver
steps). The inverse $x \to z$ integrates the same ODE backwards from $t = 1$ to $0$.
``trace`` chooses how $\operatorname{tr}(\partial f/\partial z)$ is computed:

- ``"exact"``: $D$ vector-Jacobian products per evaluation of $f$; allowed up to $D = 64$
  (a ``ValueError`` above).
- ``"hutchinson"``: $\varepsilon^\top (\partial f/\partial z)\, \varepsilon$ with one Rademacher
  probe $\varepsilon$ drawn per solve and held fixed along it (FFJORD): one vector-Jacobian
  product, an unbiased estimate of the log-density.
- ``"auto"`` (default): ``"exact"`` for $D \le 4$, ``"hutchinson"`` above.

**Round-trip tolerance.** Forward and backward solves are each accurate to the solver
tolerance, so $\|f^{-1}(f(z)) - z\|_\infty$ is of the order of
$\max(\mathrm{rtol}\,|z|, \mathrm{atol})$ times the flow's condition.
Tolerances under $10\,\epsilon$ of the tensors' dtype cannot be met and are raised to it
(float32: $1.2\cdot 10^{-6}$).

$f$ is an MLP of $[z, t]$ (and the context) with ``tanh`` activations (a smooth right-hand side
keeps adaptive solvers efficient), its last layer zero-initialised so a new flow is the
identity.

References: Chen, Rubanova, Bettencourt, Duvenaud (2018), *Neural Ordinary Differential
Equations*; Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud (2019), *FFJORD: Free-form
Continuous Dynamics for Scalable Reversible Generative Models*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("cnf", 2)
    >>> flow.log_prob(torch.randn(10, 2)).shape
    torch.Size([10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyroflows._optional import require
from pyroflows.nn.dense import DenseConditioner
from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform, expand_context
from pyroflows.transforms.numerics import exact_or_estimator, jacobian, rademacher_like
from pyroflows.validation import check_choice, check_int, check_positive

TRACE_MODES = ("auto", "exact", "hutchinson")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED_METHODS = ("rk4", "midpoint", "euler")


class ContinuousFlow(FlowTransform):
    """A continuous flow ``x = z(1)``, ``dz/dt = f(z, t[, context])``, ``z(0) = z``.

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: hidden widths of ``f``.
        context_dim: width of a context vector, or ``None``.
        trace: ``"auto"``, ``"exact"`` or ``"hutchinson"`` (module docs).
        method: a ``torchdiffeq`` solver: adaptive ``"dopri5"``, ``"dopri8"``, ``"bosh3"``,
            ``"adaptive_heun"``, ``"fehlberg2"``, or fixed-step ``"rk4"``, ``"midpoint"``,
            ``"euler"``.
        rtol: relative tolerance of adaptive solvers.
        atol: absolute tolerance of adaptive solvers.
        step_size: step of fixed-step solvers.
        adjoint: backpropagate with the adjoint method (constant memory, one more solve).
        max_num_steps: cap on adaptive steps per solve (a ``RuntimeError`` beyond it).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        trace: str = "auto",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float = 0.05,
        adjoint: bool = False,
        max_num_steps: int = 10_000,
    ) -> None:
        require("torchdiffeq")  # the cnf extra: fail when building, not at the first solve
        super().__init__((input_dim,), context_dim)
        self.trace = exact_or_estimator(trace, "trace", TRACE_MODES, input_dim, "hutchinson")
        self.method = check_choice(method, "method", ADAPTIVE_METHODS + FIXED_METHODS)
        self.rtol = check_positive(rtol, "rtol")
        self.atol = check_positive(atol, "atol")
        self.step_size = check_positive(step_size, "step_size", below=1.0 + 1e-12)
        self.adjoint = bool(adjoint)
        self.max_num_steps = check_int(max_num_steps, "max_num_steps")
        self.net = DenseConditioner(
            input_dim + 1, [input_dim], hidden_dims, context_dim, nonlinearity=nn.Tanh()
        )

    def _dynamics(self, t, state, context, probe):
        """``(dz/dt, d log|det|/dt)`` at time ``t``; differentiable when grad mode is on."""
        z = state[0]
        needs_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = z.view_as(z) if z.requires_grad else z.detach().requires_grad_()
            batch = z.shape[:-1]
            inputs = torch.cat([z_in, t.to(z).expand(*batch, 1)], dim=-1)
            (dz,) = self.net(inputs, expand_context(context, batch))
            if probe is None:
                jac = jacobian(dz, z_in, create_graph=needs_graph)
                trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
            else:
                vjp = torch.autograd.grad(
                    dz, z_in, probe, create_graph=needs_graph, retain_graph=True
                )[0]
                trace = (vjp * probe).sum(-1)
        if not needs_graph:
            return dz.detach(), trace.detach()
        return dz, trace

    def _solve(self, start, context, t0, t1):
        """Integrate ``(z, log|det|)`` from ``(start, 0)`` at ``t0`` to ``t1``."""
        probe = rademacher_like(start) if self.trace == "hutchinson" else None
        floor = 10 * torch.finfo(start.dtype).eps
        kwargs = dict(rtol=max(self.rtol, floor), atol=max(self.atol, floor), method=self.method)
        if self.method in FIXED_METHODS:
            kwargs["options"] = dict(step_size=self.step_size)
        else:
            kwargs["options"] = dict(max_num_steps=self.max_num_steps)
        state = (start, start.new_zeros(start.shape[:-1]))
        times = start.new_tensor([t0, t1])

        def func(t, s):
            return self._dynamics(t, s, context, probe)

        if self.adjoint:
            params = [p for p in self.parameters() if p.requires_grad]
            if context is not None and context.requires_grad:
                params.append(context)
            kwargs["adjoint_params"] = tuple(params)
        torchdiffeq = require("torchdiffeq")
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        # torchdiffeq makes some tensors without a device: pin them to the inputs' device
        with torch.device(start.device):
            try:
                out, log_det = solve(func, state, times, **kwargs)
            except AssertionError as err:  # torchdiffeq's step cap
                raise RuntimeError(
                    f"CNF solve did not finish within max_num_steps={self.max_num_steps} ({err}); "
                    "the dynamics may be stiff: raise max_num_steps or loosen rtol/atol"
                ) from err
        return out[-1], log_det[-1]

    def forward_and_log_det(self, z, context=None):
        return self._solve(z, context, 0.0, 1.0)

    def inverse_and_log_det(self, x, context=None):
        z, log_det = self._solve(x, context, 1.0, 0.0)
        return z, -log_det

    def extra_repr(self) -> str:
        options = f"trace={self.trace!r}, method={self.method!r}, adjoint={self.adjoint}"
        return f"{super().extra_repr()}, {options}"


def cnf(
    input_dim: int, hidden_dims: Sequence[int] = (64, 64), context_dim: int | None = None, **options
) -> ContinuousFlow:
    """A continuous flow layer (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: widths of the MLP ``f``.
        context_dim: width of the context, or ``None``.
        **options: as in ``ContinuousFlow``.

    Returns:
        The layer.
    """
    return ContinuousFlow(input_dim, hidden_dims, context_dim, **options)


@flow_family(
    default_layers=1,
    default_hidden=(64, 64, 64),
    test_options=dict(trace="exact", rtol=1e-10, atol=1e-10),
    inverse_atol=1e-5,
)
def build_cnf(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    **options: Any,
) -> list[FlowTransform]:
    """``num_layers`` continuous flows in sequence.

    One is usually enough: the ODE is already free-form.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        **options: of ``ContinuousFlow``: ``trace`` ("auto"), ``method`` ("dopri5"), ``rtol`` /
            ``atol`` (1e-5), ``step_size`` (0.05, fixed-step methods), ``adjoint`` (False),
            ``max_num_steps`` (10000).

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    return [
        ContinuousFlow(shape[0], hidden_dims, context_dim, **options) for _ in range(num_layers)
    ]
