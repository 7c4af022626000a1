r"""Dequantization: continuous flows as models of discrete data, and bits per dimension.

Discrete data $x \in \{0, \dots, K-1\}^D$ (e.g. pixel levels) has no density, so a flow models
the continuous $y = (x + u) / K \in [0, 1)^D$ instead. The discrete model it implies,
$P(x) = \int_{[0,1)^D} p(\tfrac{x + u}{K})\,K^{-D}\,du$, is bounded by Jensen's inequality for any
dequantization distribution $q(u \mid x)$ on the unit cube:

$$
\log P(x) \;\ge\; \mathbb{E}_{u \sim q(u \mid x)}\Big[\log p\big(\tfrac{x+u}{K}\big)
- D \log K - \log q(u \mid x)\Big].
$$

* **Uniform dequantization**: $q(u \mid x) = 1$, the bound $\log p(y) - D \log K$.
* **Variational dequantization** (Ho et al. 2019, *Flow++*): $q(u \mid x)$ is a conditional
  flow, $u = \sigma(v)$ with $v$ from a flow conditioned on $x$, trained jointly with the model;
  the bound tightens as $q$ approaches the model's posterior over the cell.

Training maximises the bound with [`fit`][pyroflows.infer.fit.fit], drawing fresh noise every step:
[`DequantizedFlow`][pyroflows.infer.dequantization.DequantizedFlow] wraps a flow so that its
``log_prob`` on discrete data *is* a one-sample estimate of the bound.
[`bits_per_dim`][pyroflows.infer.dequantization.bits_per_dim] reports $-\log_2 P(x) / D$ from above,
with an importance-weighted bound over ``num_samples`` draws (tighter as it grows, never below the
truth in expectation).

Reference: Theis, van den Oord, Bethge (2016), *A note on the evaluation of generative models*;
Ho, Chen, Srinivas, Duan, Abbeel (2019), *Flow++*.

Example:
    >>> import pyroflows
    >>> from pyroflows.datasets import digits
    >>> from pyroflows.infer import DequantizedFlow, bits_per_dim, fit
    >>> train, test = digits()
    >>> glow = pyroflows.build_flow("glow", (1, 8, 8), num_layers=2, hidden_dims=(16,))
    >>> model = DequantizedFlow(glow, 17)
    >>> history = fit(model, train, num_steps=20, progress=False)
    >>> bits_per_dim(model, test, 17).mean() > 0
    tensor(True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.flow import Flow
from pyroflows.validation import check_int


def _check_num_levels(num_levels: Any) -> int:
    return check_int(num_levels, "num_levels", minimum=2)


def check_levels(x: torch.Tensor, num_levels: int, name: str = "x") -> None:
    """``ValueError`` unless ``x`` holds integer levels ``0 .. num_levels - 1``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        return
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; expected integer levels 0..{num_levels - 1}")
    low, high = x.min().item(), x.max().item()
    if (
        low < 0
        or high > num_levels - 1
        or (x.is_floating_point() and not torch.equal(x, x.round()))
    ):
        raise ValueError(
            f"{name} must hold integer levels 0..{num_levels - 1} (num_levels={num_levels}), "
            f"got values in [{low:g}, {high:g}]"
            f"{'' if torch.equal(x, x.round()) else ' that are not all integers'}"
        )


class UniformDequantizer(nn.Module):
    """``u ~ Uniform[0, 1)^D``, ``log q(u | x) = 0``."""

    def forward(self, x: torch.Tensor, event_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise ``u`` shaped like ``x`` and ``log q(u | x)`` of shape ``x``'s batch shape."""
        return torch.rand_like(x), x.new_zeros(x.shape[: x.dim() - event_dim])


class VariationalDequantizer(nn.Module):
    """``u = sigmoid(v)``, ``v ~ q(v | x)`` a conditional flow whose context is the whole
    (rescaled, flattened) discrete input.

    Args:
        flow: a conditional [`Flow`][pyroflows.Flow] over the data's event shape with
            ``context_dim`` equal to the number of dimensions ``D``.
        num_levels: ``K``, to rescale the levels to ``[-1, 1]`` for the context.

    Build one with [`build`][pyroflows.infer.dequantization.VariationalDequantizer.build].
    """

    def __init__(self, flow: Flow, num_levels: int) -> None:
        super().__init__()
        dim = math.prod(flow.event_shape)
        if flow.context_dim != dim:
            raise ValueError(
                f"the dequantization flow needs context_dim = {dim} (the flattened data), "
                f"got {flow.context_dim}"
            )
        self.flow = flow
        self.num_levels = _check_num_levels(num_levels)

    @classmethod
    def build(
        cls,
        shape: tuple[int, ...],
        num_levels: int,
        *,
        num_layers: int = 4,
        hidden_dims: tuple[int, ...] = (32,),
    ) -> VariationalDequantizer:
        """A default ``q(u | x)``: ``num_layers`` affine couplings (checkerboard for images)."""
        from pyroflows.registry import build_flow

        mask = "checkerboard" if len(shape) == 3 else None
        flow = build_flow(
            "realnvp",
            shape if len(shape) == 3 else shape[0],
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            context_dim=math.prod(shape),
            mask=mask,
        )
        return cls(flow, num_levels)

    def forward(self, x: torch.Tensor, event_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw ``u ~ q(u | x)`` shaped like ``x`` and ``log q(u | x)``."""
        context = (2 * x / (self.num_levels - 1) - 1).flatten(x.dim() - event_dim)
        v, log_q = self.flow.rsample_and_log_prob((), context)
        # u = sigmoid(v): log|du/dv| = log sigmoid(v) + log sigmoid(-v)
        log_dudv = -(F.softplus(-v) + F.softplus(v))
        return torch.sigmoid(v), log_q - log_dudv.flatten(v.dim() - event_dim).sum(-1)


class DequantizedFlow(Flow):
    """A model of discrete data: the continuous flow ``model`` over ``y = (x + u) / K``.

    ``log_prob(x)`` takes integer levels ``x`` and returns a one-sample estimate of the lower
    bound on ``log P(x)`` (fresh noise every call), so [`fit`][pyroflows.infer.fit.fit] trains the
    model (and a variational dequantizer) by maximising it. ``sample`` returns discrete levels.
    The layers, base distribution, ``forward_and_log_det`` and ``inverse_and_log_det`` are the
    model's (the map between the latent and ``y``); ``model`` is the continuous flow itself,
    trained in place.

    Args:
        flow: an unconditional [`Flow`][pyroflows.Flow] over the data's event shape.
        num_levels: ``K``, the number of levels (``x`` takes values ``0 .. K - 1``).
        dequantizer: ``"uniform"``, ``"variational"`` (a default
            [`VariationalDequantizer`][pyroflows.infer.dequantization.VariationalDequantizer]) or a
            dequantizer module.

    Example:
        >>> import pyroflows
        >>> model = DequantizedFlow(pyroflows.build_flow("realnvp", (1, 8, 8)), 17, "variational")
        >>> model.log_prob(torch.randint(17, (5, 1, 8, 8)).float()).shape
        torch.Size([5])
    """

    def __init__(
        self, flow: Flow, num_levels: int, dequantizer: str | nn.Module = "uniform"
    ) -> None:
        if not isinstance(flow, Flow) or isinstance(flow, DequantizedFlow):
            raise TypeError(
                f"flow must be a pyroflows.Flow over continuous data, got {type(flow).__name__}"
            )
        if flow.context_dim is not None:
            raise ValueError(
                "DequantizedFlow models unconditional discrete data: "
                "flow must have context_dim=None"
            )
        nn.Module.__init__(self)
        self.model = flow
        self.event_shape = flow.event_shape
        self.context_dim = None
        self.num_levels = _check_num_levels(num_levels)
        if dequantizer == "uniform":
            dequantizer = UniformDequantizer()
        elif dequantizer == "variational":
            dequantizer = VariationalDequantizer.build(tuple(flow.event_shape), num_levels)
        elif not isinstance(dequantizer, nn.Module):
            raise ValueError(
                f"dequantizer must be 'uniform', 'variational' or an nn.Module, got {dequantizer!r}"
            )
        self.dequantizer = dequantizer
        self.to(flow.base_loc)
        self.config = dict(
            flow.config, num_levels=num_levels, dequantizer=type(dequantizer).__name__
        )

    # the continuous model's parts, so every inherited Flow method sees them
    @property
    def transform(self):  # type: ignore[override]
        return self.model.transform

    @property
    def base_loc(self) -> torch.Tensor:  # type: ignore[override]
        return self.model.base_loc

    @property
    def base_scale(self) -> torch.Tensor:  # type: ignore[override]
        return self.model.base_scale

    def dequantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = (x + u) / K`` with ``u ~ q(u | x)``, and ``log q(y | x)`` (a density on ``y``)."""
        u, log_q = self.dequantizer(x, self.event_dim)
        return (x + u) / self.num_levels, log_q + math.prod(self.event_shape) * math.log(
            self.num_levels
        )

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """A one-sample estimate of the lower bound on ``log P(x)`` for integer levels ``x``."""
        self._check_context(context)
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool:
            x = x.to(self.base_loc.dtype)
        self._check_x(x)
        check_levels(x, self.num_levels)
        y, log_q = self.dequantize(x)
        return self.model.log_prob(y) - log_q

    @torch.no_grad()
    def sample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Discrete samples: levels ``floor(K y)`` of model samples ``y``, clamped to
        ``0 .. K-1``."""
        y = self.model.sample(sample_shape, context)
        return (y * self.num_levels).floor().clamp(0, self.num_levels - 1)

    def rsample(self, sample_shape=(), context=None):
        raise NotImplementedError(
            "discrete samples have no reparameterisation; use .model.rsample for y"
        )

    def rsample_and_log_prob(self, sample_shape=(), context=None):
        raise NotImplementedError(
            "discrete samples have no reparameterisation; use .model.rsample_and_log_prob for y"
        )

    def dist(self, context=None):
        raise NotImplementedError(
            "DequantizedFlow is a discrete model; .model.dist() is the continuous flow over y"
        )


def bits_per_dim(
    flow: Flow, x: torch.Tensor, num_levels: int, *, num_samples: int = 1
) -> torch.Tensor:
    """An upper bound on ``-log2 P(x) / D``, the discrete model's bits per dimension.

    ``flow`` is either a [`DequantizedFlow`][pyroflows.infer.dequantization.DequantizedFlow] (its
    dequantizer is used) or a continuous flow over ``y = (x + u) / K`` (uniform dequantization).
    With ``num_samples = S`` the bound is the importance-weighted ``-log(1/S sum_s P(x, u_s) / q(u_s
    | x))``, tighter as ``S`` grows.

    Args:
        flow: the model.
        x: ``(n, *event_shape)`` integer levels ``0 .. num_levels - 1``.
        num_levels: ``K``.
        num_samples: dequantization draws per point.

    Returns:
        Bits per dimension of each point, shape ``(n,)`` (``.mean()`` is the usual number).
    """
    num_levels = _check_num_levels(num_levels)
    check_int(num_samples, "num_samples")
    if isinstance(flow, DequantizedFlow):
        if flow.num_levels != num_levels:
            raise ValueError(
                f"num_levels={num_levels} but the model was built for {flow.num_levels} levels"
            )
        model = flow
    elif isinstance(flow, Flow):
        model = DequantizedFlow(flow, num_levels)
    else:
        raise TypeError(f"flow must be a pyroflows.Flow, got {type(flow).__name__}")
    was_training = flow.training
    model.eval()
    try:
        with torch.no_grad():
            log_w = torch.stack([model.log_prob(x) for _ in range(num_samples)])
    finally:
        flow.train(was_training)
    bound = torch.logsumexp(log_w, 0) - math.log(num_samples)
    return -bound / (math.prod(model.event_shape) * math.log(2))


def independent_bits_per_dim(
    train: torch.Tensor, test: torch.Tensor, num_levels: int, *, smoothing: float = 1.0
) -> torch.Tensor:
    """The independent-pixel baseline: each dimension its own categorical over the ``K`` levels
    (counts from ``train`` plus ``smoothing``), i.e. uniformly dequantised histograms. Returns
    the bits per dimension of each ``test`` point, to compare with
    [`bits_per_dim`][pyroflows.infer.dequantization.bits_per_dim].

    Args:
        train: ``(n, *event_shape)`` integer levels the histograms are counted on.
        test: ``(m, *event_shape)`` integer levels to score.
        num_levels: ``K``.
        smoothing: pseudo-count added to every level (``> 0`` keeps unseen levels finite).
    """
    num_levels = _check_num_levels(num_levels)
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing!r}")
    check_levels(train, num_levels, "train")
    check_levels(test, num_levels, "test")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(
            "train and test must share the event shape, got "
            f"{tuple(train.shape[1:])} and {tuple(test.shape[1:])}"
        )
    train, test = train.long().flatten(1), test.long().flatten(1)
    counts = F.one_hot(train, num_levels).sum(0).double() + smoothing  # (D, K)
    log_probs = counts.log() - counts.sum(-1, keepdim=True).log()
    picked = log_probs.gather(1, test.T)  # (D, m)
    return (-picked.mean(0) / math.log(2)).float()
