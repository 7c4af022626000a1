r"""A small Ising model on an $L \times L$ lattice, exactly enumerable.

$$
U(s) = -J \sum_{\langle i j \rangle} s_i s_j - h \sum_i s_i, \qquad s_i \in \{-1, +1\},
$$

the first sum over nearest-neighbour bonds (open boundaries, or periodic ones). With
$n = L^2 \le 20$ spins all $2^n$ states are enumerated, which gives the exact log-normalizer
$\log Z = \log \sum_s e^{-U(s)}$, the exact distribution and exact samples: the reference for
discrete samplers (``Gibbs`` with ``support=[-1., 1.]``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyroflows.energies.base import Target
from pyroflows.validation import check_int, check_number

MAX_ENUMERATED_SPINS = 20


class Ising(Target):
    """Ising model with coupling $J$ and field $h$ on an $L \\times L$ lattice, event shape
    ``(L, L)``.

    Args:
        size: lattice side $L \\ge 2$.
        coupling: $J$ (positive: ferromagnetic).
        field: $h$.
        periodic: wrap the lattice into a torus (needs $L \\ge 3$ so no bond is counted twice).
    """

    def __init__(
        self, size: int = 3, coupling: float = 0.4, field: float = 0.1, periodic: bool = False
    ) -> None:
        size = check_int(size, "size", minimum=3 if periodic else 2)
        super().__init__((size, size))
        self.coupling = check_number(coupling, "coupling")
        self.field = check_number(field, "field")
        self.periodic = bool(periodic)

    @property
    def num_spins(self) -> int:
        return self.event_shape.numel()

    @property
    def has_sampler(self) -> bool:
        return self.num_spins <= MAX_ENUMERATED_SPINS

    def _energy(self, s: torch.Tensor) -> torch.Tensor:
        if self.periodic:
            bonds = (s * s.roll(1, -1)).sum((-2, -1)) + (s * s.roll(1, -2)).sum((-2, -1))
        else:
            rows = (s[..., :, 1:] * s[..., :, :-1]).sum((-2, -1))
            bonds = rows + (s[..., 1:, :] * s[..., :-1, :]).sum((-2, -1))
        return -self.coupling * bonds - self.field * s.sum((-2, -1))

    def states(self) -> torch.Tensor:
        """All $2^n$ configurations, shape ``(2**n, L, L)``, values $\\pm 1$ (state $k$ has spin
        $i$ up iff bit $i$ of $k$ is set)."""
        if not self.has_sampler:
            raise ValueError(
                f"{self.num_spins} spins are too many to enumerate "
                f"(at most {MAX_ENUMERATED_SPINS})"
            )
        device = self._anchor.device
        codes = torch.arange(2**self.num_spins, device=device)[:, None]
        bits = (codes >> torch.arange(self.num_spins, device=device)) & 1
        return (2 * bits - 1).to(self._anchor.dtype).reshape(-1, *self.event_shape)

    def probs(self) -> torch.Tensor:
        """The exact probabilities of `states`."""
        return torch.softmax(-self._energy(self.states()).double(), 0)

    @property
    def log_normalizer(self) -> float | None:
        if not self.has_sampler:
            return None
        return torch.logsumexp(-self._energy(self.states()).double(), 0).item()

    def _sample(self, n: int) -> torch.Tensor:
        states = self.states()
        return states[torch.multinomial(self.probs().to(states), n, replacement=True)]

    def model(self) -> torch.Tensor:
        """A Pyro model over the spins: ``"s" ~ Bernoulli(1/2)`` per site, ``x = 2 s - 1``, and
        ``pyro.factor("energy", -U(x))``; its joint over ``s`` is $\\propto e^{-U(2s - 1)}$.

        Returns:
            the spins ``x`` in $\\{-1, +1\\}$.
        """
        half = dist.Bernoulli(probs=self._anchor + 0.5)
        s = pyro.sample("s", half.expand(self.event_shape).to_event(2))
        x = 2 * s - 1
        pyro.factor("energy", -self.energy(x))
        return x

    @property
    def name(self) -> str:
        return "ising"

    def extra_repr(self) -> str:
        return (
            f"size={self.event_shape[0]}, coupling={self.coupling}, field={self.field}, "
            f"periodic={self.periodic}"
        )


def ising(
    size: int = 3, coupling: float = 0.4, field: float = 0.1, periodic: bool = False
) -> Ising:
    """An $L \\times L$ Ising model (default $3 \\times 3$, $J = 0.4$, $h = 0.1$, open
    boundaries).

    Args:
        size: lattice side $L$ (at least 2; at least 3 when ``periodic``).
        coupling: $J$.
        field: $h$.
        periodic: wrap the lattice into a torus.

    Returns:
        the target.
    """
    return Ising(size, coupling, field, periodic)
