r"""The energy-target interface shared by every built-in, and grid quadrature for 2-D normalizers.

A target is an unnormalised density $p(x) = e^{-U(x)} / Z$ over events of a fixed shape. It is an
``nn.Module`` so that ``target(x)`` is ``target.energy(x)`` and ``target.to(device)`` moves the
few buffers it has; every energy also adopts the device and dtype of the ``x`` it is given, so a
CPU-built target evaluates GPU chains unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyroflows.validation import check_int, check_tensor


class Target(nn.Module):
    """Base class of the energy targets: subclasses implement ``_energy``.

    Attributes:
        event_shape: shape of one point ``x``.
        log_normalizer: $\\log Z = \\log \\int e^{-U(x)}\\,dx$ (a sum for discrete targets), or
            ``None`` where it is not known.
        model_scale: scale of the Normal carrier of `model` (where its prior mass lies).
    """

    #: whether `sample` draws exact samples
    has_sampler: bool = False
    model_scale: float = 1.0

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.event_shape = torch.Size(event_shape)
        # device/dtype anchor for tensors made without an input (samples, the model's carrier)
        self.register_buffer("_anchor", torch.zeros((), device="cpu"), persistent=False)

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    @property
    def log_normalizer(self) -> float | None:
        return None

    def _check(self, x: Any) -> torch.Tensor:
        return check_tensor(x, "x", event_shape=self.event_shape)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """$U(x)$ of shape ``x.shape[:-event_dim]`` (any leading batch dimensions)."""
        return self._energy(self._check(x))

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `energy`, so a target is itself an energy callable."""
        return self.energy(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised log-density $-U(x) - \\log Z$ (needs a known normalizer)."""
        if self.log_normalizer is None:
            raise ValueError(f"{self.name} has no known log-normalizer; use -energy(x) instead")
        return -self.energy(x) - self.log_normalizer

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` exact draws, shape ``(num_samples, *event_shape)``, on the target's
        device."""
        check_int(num_samples, "num_samples", minimum=0)
        if not self.has_sampler:
            raise NotImplementedError(f"{self.name} has no exact sampler; use pyroflows.mcmc")
        return self._sample(num_samples)

    def _sample(self, num_samples: int) -> torch.Tensor:
        raise NotImplementedError

    def model(self) -> torch.Tensor:
        """The target as a Pyro model with one latent site ``"x"``, the energy's ``x``.

        The site is a Normal of scale `model_scale` with its log-density masked out
        (``.mask(False)``, so it contributes nothing), and ``pyro.factor("energy", -U(x))`` adds
        the target: the model's joint log-density is exactly $-U(x)$. The Normal only makes the
        site samplable (for autoguide initialisation and ``init_to_sample``); running the model
        without a guide does **not** draw from the target. Works with ``AutoNormal``,
        ``AutoMultivariateNormal``, ``AutoIAFNormal``, ``AutoFlow`` and NUTS, with vectorised
        particles, on the device the target was moved to.

        Returns:
            the latent ``x`` of shape ``(*batch, *event_shape)``.
        """
        carrier = dist.Normal(self._anchor, self._anchor + self.model_scale)
        x = pyro.sample("x", carrier.expand(self.event_shape).to_event(self.event_dim).mask(False))
        pyro.factor("energy", -self.energy(x))
        return x

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}"


def grid_log_normalizer(
    energy: Callable[[torch.Tensor], torch.Tensor], box: tuple[float, float, float, float], num: int
) -> float:
    r"""$\log \int e^{-U(x)}\,dx$ over a 2-D box by the midpoint rule on a ``num x num`` grid.

    For a smooth density that is negligible at the box's edges the midpoint rule converges
    faster than any power of the grid spacing, so a fine grid is exact to about float64 accuracy
    (the built-ins check this against closed forms in the tests). Evaluated in float64 on the CPU,
    in row chunks to bound memory.

    Args:
        energy: batched energy over points of shape ``(..., 2)``.
        box: ``(x_lo, x_hi, y_lo, y_hi)``.
        num: grid points per axis.
    """
    x_lo, x_hi, y_lo, y_hi = box
    hx, hy = (x_hi - x_lo) / num, (y_hi - y_lo) / num
    xs = x_lo + hx * (torch.arange(num, dtype=torch.float64, device="cpu") + 0.5)
    ys = y_lo + hy * (torch.arange(num, dtype=torch.float64, device="cpu") + 0.5)
    chunks = []
    for rows in xs.split(256):
        grid = torch.stack(torch.meshgrid(rows, ys, indexing="ij"), -1)
        chunks.append(torch.logsumexp(-energy(grid).flatten(), 0))
    return (torch.logsumexp(torch.stack(chunks), 0) + math.log(hx * hy)).item()
