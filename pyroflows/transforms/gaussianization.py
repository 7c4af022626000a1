r"""Gaussianization flow: learned marginal Gaussianization alternating with learned rotations.

In the data direction ($x \to z$) every coordinate is mapped through its own monotone
*marginal Gaussianization*

$$
z_i = \Phi^{-1}\bigl(F_i(x_i)\bigr), \qquad
F_i(x) = \sum_{k=1}^K w_{ik}\, \sigma\!\Bigl(\frac{x - \mu_{ik}}{s_{ik}}\Bigr), \qquad
\log\Bigl|\frac{dz_i}{dx_i}\Bigr| = \log f_i(x_i) - \log \varphi(z_i),
$$

with $F_i$ a mixture of $K$ logistic CDFs (density $f_i$), $\Phi$/$\varphi$ the standard-Normal
CDF/density. The Jacobian is diagonal. Between marginal layers an orthogonal *rotation*
$Q = H_1 \cdots H_m$, a product of Householder reflections
$H_j = I - 2 v_j v_j^\top / \|v_j\|^2$, mixes the coordinates at zero log-determinant
($|\det Q| = 1$); it reuses Pyro's ``ConditionedHouseholder``.

**Tails.** $F_i$ and $1 - F_i$ are both kept in log space
($\log F = \mathrm{logsumexp}_k(\log w_k + \log\sigma(u_k))$, likewise with $-u_k$), and
$\Phi^{-1}$ is evaluated on the smaller of the two: from $\log p$ directly by
``ndtri(exp(log p))`` where that is accurate and, below $\log p = -60$, by the asymptotic
expansion of $\log\Phi$ refined by Newton steps on ``log_ndtr``. So $z$ stays finite (about
$\sqrt{2|x|/s}$ in the logistic tails) and no $\Phi^{-1}(0)$ or $\Phi^{-1}(1)$ ever occurs.

**Sampling direction** ($z \to x$) inverts $F_i$: the root of the increasing equation
$\operatorname{logit} F_i(x) = \operatorname{logit} \Phi(z)$ is bracketed by the component
quantiles $\min_k / \max_k\, (\mu_{ik} + s_{ik} \operatorname{logit}\Phi(z))$ (a mixture CDF
lies between its components'), bisected to machine precision, and finished by one autograd
Newton step, which makes the gradients of samples exact (implicit function theorem).

**Data-dependent initialisation** (``data_init=True``): on its first density evaluation each
marginal layer places its logistic means at $K$ quantiles of the batch it receives and sets
each scale to half the local spacing of those quantiles, so training starts from a good
per-coordinate Gaussianization. Whether that has happened is the ``initialized`` buffer, part
of ``state_dict``.

Conditional form: a hyper-network adds context-dependent offsets to the mixture parameters and
predicts the Householder vectors.

Reference: Meng, Song, Song, Ermon (2020), *Gaussianization Flows*.

Example:
    >>> import pyroflows
    >>> flow = pyroflows.build_flow("gaussianization", 2, num_layers=6)
    >>> flow.log_prob(torch.randn(10, 2)).shape
    torch.Size([10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.transforms.householder import ConditionedHouseholder
from torch import nn

from pyroflows.nn.dense import ParamNet
from pyroflows.registry import flow_family
from pyroflows.transforms.base import FlowTransform
from pyroflows.transforms.numerics import solve_increasing
from pyroflows.validation import check_int

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# below this log-probability ndtri(exp(.)) loses accuracy in float32; use the asymptotic branch
_NDTRI_EXP_SWITCH = -60.0


def ndtri_exp(log_p: torch.Tensor) -> torch.Tensor:
    """The standard-Normal quantile of ``exp(log_p)``, without underflow.

    Args:
        log_p: log-probabilities ``<= log(1/2)``, any magnitude.

    Returns:
        ``Phi^{-1}(exp(log_p))``, finite and accurate for any ``log_p``.
    """
    direct = torch.special.ndtri(torch.exp(log_p.clamp_min(_NDTRI_EXP_SWITCH)))
    # log Phi(z) ~ -z^2/2 - log(-z) - log(2 pi)/2 as z -> -inf; refine on log_ndtr
    deep = log_p.clamp_max(_NDTRI_EXP_SWITCH)
    z = -torch.sqrt(-2 * deep - torch.log(-2 * deep) - 2 * _HALF_LOG_2PI)
    for _ in range(3):
        log_cdf = torch.special.log_ndtr(z)
        z = z - (log_cdf - deep) * torch.exp(log_cdf - log_normal_density(z))
    return torch.where(log_p > _NDTRI_EXP_SWITCH, direct, z)


def log_normal_density(z: torch.Tensor) -> torch.Tensor:
    """The standard-Normal log-density.

    Args:
        z: points.

    Returns:
        ``log phi(z)``, elementwise.
    """
    return -0.5 * z * z - _HALF_LOG_2PI


class MarginalGaussianization(FlowTransform):
    """Dimension-wise ``x_i = F_i^{-1}(Phi(z_i))`` with ``F_i`` a mixture of logistics.

    The density direction ``x -> z`` is closed-form; sampling inverts ``F_i`` by bisection and
    one Newton step (to machine precision).

    Args:
        input_dim: event dimension ``D``.
        num_components: logistic components ``K`` per coordinate.
        context_dim: if given, a hyper-network adds context-dependent offsets to the mixture
            parameters.
        hidden_dims: widths of that hyper-network.
        data_init: initialise the mixtures from the first batch of data (see module docs).
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 8,
        context_dim: int | None = None,
        hidden_dims: Sequence[int] = (64,),
        data_init: bool = True,
    ) -> None:
        super().__init__((input_dim,), context_dim)
        k = check_int(num_components, "num_components")
        self.num_components = k
        self.loc = nn.Parameter(torch.linspace(-2.0, 2.0, k).expand(input_dim, k).clone())
        self.log_scale = nn.Parameter(torch.full((input_dim, k), math.log(2.0 / k)))
        self.logits = nn.Parameter(torch.zeros(input_dim, k))
        shapes = {name: (input_dim, k) for name in ("loc", "log_scale", "logits")}
        self.offsets = (
            ParamNet(shapes, context_dim, hidden_dims, init_std=0.01) if context_dim else None
        )
        self.register_buffer("initialized", torch.tensor(not data_init))

    def _mixture(self, context):
        loc, log_scale, logits = self.loc, self.log_scale, self.logits
        if self.offsets is not None:
            off = self.offsets(context)
            loc, log_scale, logits = (
                loc + off["loc"],
                log_scale + off["log_scale"],
                logits + off["logits"],
            )
        return loc, log_scale, F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """Means at ``K`` quantiles of the batch, scales half their local spacing (per
        coordinate): adapts to multi-modal marginals, where one global bandwidth cannot."""
        flat = x.detach().reshape(-1, self.event_shape[0])
        k = self.num_components
        levels = torch.linspace(0.5 / k, 1 - 0.5 / k, k, device=x.device, dtype=x.dtype)
        loc = torch.quantile(flat, levels, dim=0).T
        floor = 1e-3 * flat.std(dim=0, unbiased=False)[:, None].clamp_min(1e-3)
        if k > 1:
            gaps = loc.diff(dim=-1)
            spacing = torch.cat(
                [gaps[:, :1], (gaps[:, 1:] + gaps[:, :-1]) / 2, gaps[:, -1:]], dim=-1
            )
        else:
            spacing = 2 * flat.std(dim=0, unbiased=False)[:, None]
        if torch.isfinite(loc).all():
            self.loc.copy_(loc)
            self.log_scale.copy_(torch.log(torch.maximum(spacing / 2, floor)))
            self.logits.zero_()
        self._mark_initialized()

    def _log_cdfs(self, x, loc, log_scale, log_w):
        """``log F``, ``log(1 - F)`` and ``log f`` at ``x`` (shape ``(..., D)``)."""
        u = (x[..., None] - loc) * torch.exp(-log_scale)
        lower, upper = F.logsigmoid(u), F.logsigmoid(-u)
        log_cdf = torch.logsumexp(log_w + lower, dim=-1)
        log_sf = torch.logsumexp(log_w + upper, dim=-1)
        log_pdf = torch.logsumexp(log_w + lower + upper - log_scale, dim=-1)
        return log_cdf, log_sf, log_pdf

    def inverse_and_log_det(self, x, context=None):
        if self._data_init_pending() and x[..., 0].numel() > 1:  # one point has no spread
            self._initialize(x)
        log_cdf, log_sf, log_pdf = self._log_cdfs(x, *self._mixture(context))
        tail = ndtri_exp(torch.minimum(log_cdf, log_sf))  # <= 0: the smaller tail's quantile
        z = torch.where(log_cdf <= log_sf, tail, -tail)
        # forward log|dx/dz| = log phi(z) - log f(x)
        return z, (log_normal_density(z) - log_pdf).sum(-1)

    def forward_and_log_det(self, z, context=None):
        loc, log_scale, log_w = self._mixture(context)
        target = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)  # logit Phi(z)
        quantiles = loc + torch.exp(log_scale) * target[..., None]

        def logit_cdf(x):
            log_cdf, log_sf, _ = self._log_cdfs(x, loc, log_scale, log_w)
            return log_cdf - log_sf

        def dlogit_cdf(x):
            log_cdf, log_sf, log_pdf = self._log_cdfs(x, loc, log_scale, log_w)
            return torch.exp(log_pdf - log_cdf - log_sf)

        x = solve_increasing(logit_cdf, dlogit_cdf, target, quantiles.amin(-1), quantiles.amax(-1))
        log_pdf = self._log_cdfs(x, loc, log_scale, log_w)[2]
        return x, (log_normal_density(z) - log_pdf).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_components={self.num_components}"


class HouseholderRotation(FlowTransform):
    """Orthogonal ``x = H_1 ... H_m z`` by Householder reflections (``log|det| = 0``).

    Reuses Pyro's ``ConditionedHouseholder`` for the reflections; this class adds the
    pyroflows layer interface and a context-predicted form.

    Args:
        input_dim: event dimension ``D``.
        num_reflections: ``m``; ``D`` reflections reach every orthogonal matrix.
        context_dim: if given, the reflection vectors are predicted from the context.
        hidden_dims: widths of that hyper-network.
    """

    def __init__(
        self,
        input_dim: int,
        num_reflections: int | None = None,
        context_dim: int | None = None,
        hidden_dims: Sequence[int] = (64,),
    ) -> None:
        super().__init__((input_dim,), context_dim)
        m = check_int(input_dim if num_reflections is None else num_reflections, "num_reflections")
        self.params = ParamNet({"v": (m, input_dim)}, context_dim, hidden_dims, init_std=1.0)

    def _reflect(self, inputs, context, inverse):
        householder = ConditionedHouseholder(self.params(context)["v"])
        out = householder._inverse(inputs) if inverse else householder._call(inputs)
        return out, out.new_zeros(out.shape[:-1])

    def forward_and_log_det(self, z, context=None):
        return self._reflect(z, context, inverse=False)

    def inverse_and_log_det(self, x, context=None):
        return self._reflect(x, context, inverse=True)


def gaussianization(
    input_dim: int,
    num_components: int = 8,
    num_reflections: int | None = None,
    context_dim: int | None = None,
    hidden_dims: Sequence[int] = (64,),
    data_init: bool = True,
) -> list[FlowTransform]:
    """One Gaussianization block (Pyro-style helper).

    Args:
        input_dim: event dimension ``D``.
        num_components: logistic components per coordinate.
        num_reflections: Householder reflections of the rotation (default ``D``).
        context_dim: width of the context, or ``None``.
        hidden_dims: widths of the hyper-network.
        data_init: initialise the marginals from the first batch.

    Returns:
        A rotation then, towards the data, a marginal Gaussianization, in the sampling direction ``z
        -> x``.
    """
    marginal = MarginalGaussianization(
        input_dim, num_components, context_dim, hidden_dims, data_init
    )
    if input_dim == 1:  # nothing to rotate
        return [marginal]
    return [HouseholderRotation(input_dim, num_reflections, context_dim, hidden_dims), marginal]


@flow_family(default_layers=8, default_hidden=(64,))
def build_gaussianization(
    shape: tuple[int, ...],
    *,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int | None = None,
    num_components: int = 8,
    num_reflections: int | None = None,
    data_init: bool = True,
) -> list[FlowTransform]:
    """Marginal Gaussianization layers with rotations between them.

    A rotation sits between consecutive marginal layers only: one next to the Normal base would be
    wasted.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        num_layers: number of layers.
        hidden_dims: widths of the conditioner networks.
        context_dim: width of the context of a conditional flow, or ``None``.
        num_components: logistic components per coordinate and layer.
        num_reflections: Householder reflections per rotation (default ``D``).
        data_init: initialise the marginals from the first batch.

    Returns:
        The layers, in the sampling direction ``z -> x``.
    """
    blocks = [
        gaussianization(
            shape[0], num_components, num_reflections, context_dim, hidden_dims, data_init
        )
        for _ in range(num_layers)
    ]
    blocks[0] = blocks[0][-1:]  # drop the rotation next to the base
    return [layer for block in blocks for layer in block]
