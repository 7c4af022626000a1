r"""The four 2-D test energies of Rezende & Mohamed (2015), Table 1.

With $w_1(z) = \sin(2\pi z_1 / 4)$, $w_2(z) = 3 e^{-\frac12((z_1 - 1)/0.6)^2}$ and
$w_3(z) = 3\,\sigma((z_1 - 1)/0.3)$:

$$
\begin{aligned}
U_1(z) &= \tfrac12\Bigl(\tfrac{\|z\| - 2}{0.4}\Bigr)^2
          - \log\Bigl(e^{-\frac12((z_1 - 2)/0.6)^2} + e^{-\frac12((z_1 + 2)/0.6)^2}\Bigr) \\
U_2(z) &= \tfrac12\Bigl(\tfrac{z_2 - w_1}{0.4}\Bigr)^2 + E(z_1) \\
U_3(z) &= -\log\Bigl(e^{-\frac12((z_2 - w_1)/0.35)^2}
          + e^{-\frac12((z_2 - w_1 + w_2)/0.35)^2}\Bigr) + E(z_1) \\
U_4(z) &= -\log\Bigl(e^{-\frac12((z_2 - w_1)/0.4)^2}
          + e^{-\frac12((z_2 - w_1 + w_3)/0.35)^2}\Bigr) + E(z_1)
\end{aligned}
$$

**The envelope.** As the paper writes them, $U_2$–$U_4$ do not depend on $z_1$ except through
$w_i$, so $e^{-U}$ is not integrable (it is flat in $z_1$; the paper only plots the window
$[-4, 4]^2$). The built-ins add $E(z_1) = z_1^2 / (2 \cdot 2^2)$, a $\mathcal N(0, 2^2)$
envelope that keeps about 95% of $z_1$'s mass inside $[-4, 4]$ and leaves the shapes in the window
essentially as drawn. With it, $U_2$–$U_4$ are "$z_1 \sim \mathcal N(0, 2^2)$, then $z_2 \mid z_1$
a mixture of Gaussians", so their normalizers are exact, $Z = 4\pi \sum_k \sigma_k$ (the
$\sigma_k$ being the component widths above), and so are their samples.
$U_1$ (a ring cut by two bumps) is already integrable; its normalizer comes from a
$1000 \times 1000$ midpoint grid on $[-6, 6]^2$, accurate to better than $10^{-10}$ in $\log Z$
(the same grid reproduces the closed forms of $U_2$–$U_4$ to that accuracy; see the tests).

Reference: Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*, ICML.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from pyroflows.energies.base import Target, grid_log_normalizer
from pyroflows.validation import check_positive

ENVELOPE_SCALE = 2.0


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def _w2(z1: torch.Tensor) -> torch.Tensor:
    return 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1: torch.Tensor) -> torch.Tensor:
    return 3 * torch.sigmoid((z1 - 1) / 0.3)


class U1(Target):
    """Rezende & Mohamed's $U_1$: a ring of radius 2 cut into two arcs (see the module docs)."""

    model_scale = 2.0

    def __init__(self) -> None:
        super().__init__((2,))

    def _energy(self, z: torch.Tensor) -> torch.Tensor:
        z1 = z[..., 0]
        ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
        bumps = torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2], -1)
        return ring - torch.logsumexp(bumps, -1)

    @property
    def log_normalizer(self) -> float:
        return _u1_log_normalizer()

    @property
    def name(self) -> str:
        return "u1"


@functools.cache
def _u1_log_normalizer() -> float:
    return grid_log_normalizer(U1()._energy, (-6.0, 6.0, -6.0, 6.0), 1000)


class WaveTarget(Target):
    r"""$U_2$–$U_4$: $z_1 \sim \mathcal N(0, 2^2)$ and $z_2 \mid z_1$ a mixture of Gaussians.

    Component $k$ has centre $w_1(z_1) - s_k(z_1)$ and width $\sigma_k$, and (as in the paper,
    where each enters the energy as $e^{-\frac12 ((z_2 - \cdot)/\sigma_k)^2}$) weight
    proportional to $\sigma_k$.

    Args:
        name: ``"u2"``, ``"u3"`` or ``"u4"``.
        shifts: one function $s_k(z_1)$ per component, or ``None`` for $s_k = 0$.
        scales: the widths $\sigma_k$.
    """

    has_sampler = True
    model_scale = 2.0

    def __init__(
        self,
        name: str,
        shifts: Sequence[Callable[[torch.Tensor], torch.Tensor] | None],
        scales: Sequence[float],
    ) -> None:
        super().__init__((2,))
        self._name, self.shifts = name, tuple(shifts)
        self.scales = tuple(check_positive(s, "scales") for s in scales)
        if len(self.shifts) != len(self.scales) or not self.scales:
            raise ValueError(f"shifts and scales must be non-empty and of one length, got "
                             f"{len(self.shifts)} and {len(self.scales)}")

    def _offsets(self, z1: torch.Tensor) -> list[torch.Tensor]:
        """$w_1(z_1) - s_k(z_1)$ per component (the component centres)."""
        w1 = _w1(z1)
        return [w1 if s is None else w1 - s(z1) for s in self.shifts]

    def _energy(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[..., 0], z[..., 1]
        envelope = 0.5 * (z1 / ENVELOPE_SCALE) ** 2
        # widths stay Python floats: scalar operands, no tensor to build or move per call
        pairs = zip(self._offsets(z1), self.scales, strict=True)
        halves = [0.5 * ((z2 - c) / w) ** 2 for c, w in pairs]
        if len(halves) == 1:
            return envelope + halves[0]
        return envelope - torch.logsumexp(-torch.stack(halves, -1), -1)

    @property
    def log_normalizer(self) -> float:
        return math.log(2 * math.pi * ENVELOPE_SCALE * sum(self.scales))

    def _sample(self, n: int) -> torch.Tensor:
        ref = self._anchor
        z1 = ENVELOPE_SCALE * torch.randn(n, dtype=ref.dtype, device=ref.device)
        scales = ref.new_tensor(self.scales)
        k = torch.multinomial(scales, n, replacement=True)
        centre = torch.stack(self._offsets(z1), -1).gather(-1, k[:, None])[:, 0]
        z2 = centre + scales[k] * torch.randn_like(z1)
        return torch.stack([z1, z2], -1)

    @property
    def name(self) -> str:
        return self._name


def u1() -> U1:
    """$U_1$: a ring of radius 2 with two arcs; normalizer by quadrature."""
    return U1()


def u2() -> WaveTarget:
    """$U_2$: a sine wave, $z_2 \\mid z_1 \\sim \\mathcal N(w_1, 0.4^2)$, with the $z_1$
    envelope."""
    return WaveTarget("u2", [None], [0.4])


def u3() -> WaveTarget:
    """$U_3$: the sine wave split by a bump $w_2$ around $z_1 = 1$, with the $z_1$ envelope."""
    return WaveTarget("u3", [None, _w2], [0.35, 0.35])


def u4() -> WaveTarget:
    """$U_4$: the sine wave and a sigmoid-shifted copy $w_3$, with the $z_1$ envelope."""
    return WaveTarget("u4", [None, _w3], [0.4, 0.35])
