r"""Residual flow (invertible ResNet): blocks $z = x + g(x)$ with a contractive $g$.

In the data direction ($x \to z$) a block is

$$
z = x + g(x), \qquad \operatorname{Lip}(g) \le c < 1,
$$

which is invertible because $x = z - g(x)$ is a contraction in $x$ (Banach): the sampling
direction $z \to x$ is the fixed-point iteration $x_{k+1} = z - g(x_k)$, stopped when
$\max|x_{k+1} - x_k| \le$ ``tol`` (error then at most $\tfrac{c}{1-c}\,$``tol``) or after
``max_iter`` steps.

**Contractivity.** $g$ is an MLP of spectrally normalised linear layers and ``tanh``
activations (1-Lipschitz and smooth, with slope 1 at 0, so $J_g$ has useful gradients).
Each weight is divided by $\max(1, \hat\sigma / c_\ell)$, where $\hat\sigma = u^\top W v$ is
the power-iteration estimate of its largest singular value, $c_\ell = 1$ for hidden layers and
$c_\ell = c$ (``lipschitz``) for the last, so $\operatorname{Lip}(g) \le c$ (up to the
power-iteration error, which underestimates $\sigma$ slightly; keep $c$ a little below the
contraction you need). The power iteration is warm-started and run ``power_iterations`` times
whenever the weight has changed since the last run, so between optimiser steps the map is a
deterministic function of the parameters (both directions see the same $g$; unlike
``torch.nn.utils.parametrizations.spectral_norm``, which iterates on every training-mode call).

**Log-determinant.** $\log|\det(I + J_g)| = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k}
\operatorname{tr}(J_g^k)$, with each trace estimated by Hutchinson's
$\operatorname{tr}(A) = \mathbb E[v^\top A v]$ (Rademacher $v$), $v^\top J_g^k$ built by $k$
vector-Jacobian products. ``log_det`` chooses:

- ``"series"`` (i-ResNet): the first ``num_terms`` terms; biased by the truncation
  ($\le D\,c^{n+1}/((n+1)(1-c))$).
- ``"roulette"`` (Residual Flows): unbiased Russian-roulette estimator, the first
  ``exact_terms`` terms always, then $N \sim$ Geometric(``roulette_p``) more, term $k$ weighted by
  $1/P(N \ge k)$. Its variance is finite only if $1 - p > c^2$, hence the default $p = 0.1$
  (9 extra terms on average) rather than the paper's $0.5$, which at $c = 0.9$ is heavy-tailed.
- ``"exact"``: the full Jacobian by $D$ vector-Jacobian products and ``slogdet`` — exact and,
  for $D \le$ ``num_terms``, also cheapest; allowed up to $D = 64$.
- ``"auto"`` (default): ``"exact"`` for $D \le 4$, ``"roulette"`` above.

Gradients: the estimators are differentiated through (``create_graph``). The fixed-point
direction gets exact implicit gradients: one step $x = z - g(x^\ast)$ is taken with autograd
on, and a hook turns its incoming gradient $u$ into $(I + J_g)^{-\top} u$ by the contracting
iteration $w \leftarrow u - J_g^\top w$ (higher-order gradients through the fixed point are
not supported).

An ``ActNorm`` layer sits before every block (in the data direction) and standardises its input
at the first batch, since each block alone can change scale by at most $1 \pm c$.
Conditional form: the context enters $g$'s first layer through an unconstrained linear map
($\operatorname{Lip}$ is only needed in $x$).

References: Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen (2019), *Invertible Residual Networks*;
Chen, Behrmann, Duvenaud, Jacobsen (2019), *Residual Flows for Invertible Generative Modeling*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("residual", 2, num_layers=4)
    >>> flow.log_prob(torch.randn(10, 2)).shape
    torch.Size([10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.registry import flow_family
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.numerics import exact_or_estimator, jacobian, rademacher_like
from pyroflows.validation import check_int, check_positive

LOG_DET_MODES = ("auto", "exact", "series", "roulette")
ROULETTE_MAX_TERMS = 100


# A checkpoint holds the singular vectors of its own weights: refresh them before saving, and
# trust them after loading (module-level functions, so modules stay picklable).
def _refresh_before_saving(module: SpectralLinear, *args) -> None:
    module.refresh()


def _trust_loaded_vectors(module: SpectralLinear, *args) -> None:
    module._seen = module._key()


class SpectralLinear(nn.Module):
    """A linear layer whose weight is scaled to spectral norm at most ``coeff``.

    Args:
        in_features: input width.
        out_features: output width.
        coeff: bound on the spectral norm.
        power_iterations: power-iteration steps each time the weight has changed.
    """

    def __init__(
        self, in_features: int, out_features: int, coeff: float = 1.0, power_iterations: int = 5
    ) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        # orthogonal: every singular value is 1, so normalising by the largest one does not
        # shrink the other directions (a Gaussian init would start g far below its Lipschitz budget)
        nn.init.orthogonal_(linear.weight)
        self.weight, self.bias = linear.weight, linear.bias
        self.coeff = coeff
        self.power_iterations = power_iterations
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))
        self._seen: tuple | None = None
        self._power_iterate(50)  # a converged start
        self.register_state_dict_pre_hook(_refresh_before_saving)
        self.register_load_state_dict_post_hook(_trust_loaded_vectors)

    def _key(self) -> tuple:
        return (self.weight.data_ptr(), self.weight._version)

    @torch.no_grad()
    def _power_iterate(self, steps: int) -> None:
        w, u, v = self.weight, self.u, self.v
        for _ in range(steps):
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)
        self._seen = self._key()

    def refresh(self) -> None:
        """Update the singular-vector estimates if the weight changed since the last update."""
        if self._seen != self._key():
            self._power_iterate(self.power_iterations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.refresh()
        sigma = self.u @ self.weight @ self.v  # gradient flows through W only, as in Miyato et al.
        return F.linear(x, self.weight / torch.clamp(sigma / self.coeff, min=1.0), self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, coeff={self.coeff}"


class ContractiveMLP(nn.Module):
    """``g(x[, context])`` with ``Lip_x(g) <= lipschitz``: spectral-normalised layers, tanh.

    Args:
        dim: input and output width.
        hidden_dims: hidden widths.
        lipschitz: the bound ``c`` on ``Lip(g)`` in ``x``.
        context_dim: width of a context added (unconstrained) to the first hidden layer.
        power_iterations: see ``SpectralLinear``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        lipschitz: float,
        context_dim: int | None = None,
        power_iterations: int = 5,
    ) -> None:
        super().__init__()
        widths = [dim, *hidden_dims, dim]
        coeffs = [1.0] * len(hidden_dims) + [lipschitz]
        self.linears = nn.ModuleList(
            SpectralLinear(a, b, c, power_iterations)
            for a, b, c in zip(widths[:-1], widths[1:], coeffs, strict=True)
        )
        self.activations = nn.ModuleList(nn.Tanh() for _ in hidden_dims)
        self.context_layer = nn.Linear(context_dim, widths[1]) if context_dim else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linears[0](x)
        if self.context_layer is not None:
            h = h + self.context_layer(context)
        for act, linear in zip(self.activations, self.linears[1:], strict=True):
            h = linear(act(h))
        return h


class ResidualBlock(FlowTransform):
    """One invertible residual block, ``z = x + g(x)`` in the data direction.

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: hidden widths of ``g``.
        context_dim: width of a context vector, or ``None``.
        lipschitz: ``c = Lip(g)``, in ``(0, 1)``.
        log_det: ``"auto"``, ``"exact"``, ``"series"`` or ``"roulette"`` (module docs).
        num_terms: terms of the truncated series (``"series"``).
        exact_terms: terms always evaluated by ``"roulette"``.
        roulette_p: success probability of the roulette's geometric number of extra terms.
        tol: fixed-point tolerance of the sampling direction (and of its gradient solve).
        max_iter: cap on fixed-point iterations.
        power_iterations: power-iteration steps per weight update.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        lipschitz: float = 0.9,
        log_det: str = "auto",
        num_terms: int = 10,
        exact_terms: int = 2,
        roulette_p: float = 0.1,
        tol: float = 1e-6,
        max_iter: int = 200,
        power_iterations: int = 5,
    ) -> None:
        super().__init__((input_dim,), context_dim)
        self.lipschitz = check_positive(lipschitz, "lipschitz", below=1.0)
        self.log_det = exact_or_estimator(log_det, "log_det", LOG_DET_MODES, input_dim, "roulette")
        self.num_terms = check_int(num_terms, "num_terms")
        self.exact_terms = check_int(exact_terms, "exact_terms", minimum=0)
        self.roulette_p = check_positive(roulette_p, "roulette_p", below=1.0)
        self.tol = check_positive(tol, "tol")
        self.max_iter = check_int(max_iter, "max_iter")
        check_int(power_iterations, "power_iterations")
        self.g = ContractiveMLP(
            input_dim, hidden_dims, self.lipschitz, context_dim, power_iterations
        )

    # -- log|det(I + J_g)| ---------------------------------------------------------------
    def _term_weights(self) -> list[float]:
        """Weight of each series term ``(-1)^(k+1) tr(J^k) / k`` for the chosen estimator."""
        if self.log_det == "series":
            return [1.0] * self.num_terms
        # roulette: N = exact_terms + Geometric(p) extra terms; term k weighted by 1 / P(N >= k)
        # drawn on the host: the number of terms is host control flow, and a draw on the
        # inputs' device would cost a device-to-host sync per call
        u = max(torch.rand((), device="cpu", dtype=torch.float64).item(), 1e-300)
        extra = min(int(math.log(u) / math.log1p(-self.roulette_p)), ROULETTE_MAX_TERMS)
        keep = 1 - self.roulette_p
        return [1.0] * self.exact_terms + [keep ** -(m + 1) for m in range(extra)]

    def _g_and_log_det(self, x, context):
        """``g(x)`` and ``log|det(I + J_g(x))|`` (differentiable when grad mode is on)."""
        needs_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # an alias, so that gradient hooks on x (the fixed-point direction's) are not applied
            # to these vector-Jacobian products
            x_in = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
            gx = self.g(x_in, context)
            if self.log_det == "exact":
                jac = jacobian(gx, x_in, create_graph=needs_graph)
                eye = torch.eye(self.event_shape[0], device=x.device, dtype=x.dtype)
                log_det = torch.linalg.slogdet(eye + jac)[1]
            else:
                probe = rademacher_like(x)
                vjp, log_det = probe, torch.zeros_like(x[..., 0])
                for k, weight in enumerate(self._term_weights(), start=1):
                    vjp = torch.autograd.grad(
                        gx, x_in, vjp, create_graph=needs_graph, retain_graph=True
                    )[0]
                    log_det = log_det + (-1) ** (k + 1) * weight / k * (vjp * probe).sum(-1)
        if not needs_graph:
            return gx.detach(), log_det.detach()
        return gx, log_det

    # -- directions ----------------------------------------------------------------------
    def inverse_and_log_det(self, x, context=None):
        gx, log_det = self._g_and_log_det(x, context)
        return x + gx, -log_det

    def _fixed_point(self, rhs, start, step):
        """Iterate ``w <- rhs - step(w)`` from ``start`` to ``tol`` (no gradients)."""
        w = start
        for _ in range(self.max_iter):
            w_next = rhs - step(w)
            done = bool((w_next - w).abs().max() <= self.tol)
            w = w_next
            if done:
                break
        return w

    def _implicit_grad(self, x_star, context):
        """Hook mapping the gradient ``u`` of the one-step ``x`` to ``(I + J_g)^{-T} u``."""
        with torch.enable_grad():  # the graph the hook differentiates
            probe_in = x_star.detach().requires_grad_()
            probe_out = self.g(probe_in, context)

        def vjp(w):
            return torch.autograd.grad(probe_out, probe_in, w, retain_graph=True)[0]

        return lambda grad: self._fixed_point(grad, grad, vjp)

    def forward_and_log_det(self, z, context=None):
        with torch.no_grad():
            x_star = self._fixed_point(z, z, lambda x: self.g(x, context))
        # one step with gradients on gives d x = d z - d_theta g; the hook corrects it to the
        # implicit-function derivative (I + J_g)^{-1} (d z - d_theta g)
        x = z - self.g(x_star, context)
        _, log_det = self._g_and_log_det(x, context)
        if x.requires_grad:
            x.register_hook(self._implicit_grad(x_star, context))
        return x, -log_det

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lipschitz={self.lipschitz}, log_det={self.log_det!r}"


def residual(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int | None = None,
    **options,
) -> ResidualBlock:
    """An invertible residual block (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        hidden_dims: widths of the contractive MLP.
        context_dim: width of the context, or ``None``.
        **options: as in ``ResidualBlock``.

    Returns:
        The block.
    """
    return ResidualBlock(input_dim, hidden_dims, context_dim, **options)


@flow_family(
    default_layers=8, default_hidden=(64, 64, 64), test_options=dict(log_det="exact", tol=1e-10)
)
def build_residual(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    **options: Any,
) -> list[FlowTransform]:
    """``num_layers`` residual blocks, each preceded (data side) by an ``ActNorm``.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        **options: of ``ResidualBlock``: ``lipschitz`` (0.9), ``log_det`` ("auto"), ``num_terms``
            (10), ``exact_terms`` (2), ``roulette_p`` (0.1), ``tol`` (1e-6), ``max_iter`` (200),
            ``power_iterations`` (5).

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    layers: list[FlowTransform] = []
    for _ in range(num_layers):
        layers += [ResidualBlock(shape[0], hidden_dims, context_dim, **options), ActNorm(shape)]
    return layers
