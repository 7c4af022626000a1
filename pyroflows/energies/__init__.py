r"""Built-in energy-based targets $p(x) \propto e^{-U(x)}$ with known properties.

Every target has ``.energy(x)`` (batched over leading dimensions; the target is also callable),
``.event_shape``, ``.log_normalizer`` where known ($\log Z$, exact or by quadrature),
``.sample(n)`` for exact draws where ``.has_sampler``, ``.log_prob(x)`` and ``.model`` — the
target as a Pyro model with one latent site ``"x"``.

| name | event | $\log Z$ | exact samples |
|---|---|---|---|
| ``u1`` | 2 | quadrature ($< 10^{-10}$) | - |
| ``u2``, ``u3``, ``u4`` | 2 | exact (with the $z_1$ envelope) | yes |
| ``banana`` | 2 | exact | yes |
| ``funnel`` | ``dim`` (10) | exact | yes |
| ``gaussian`` | ``dim`` (2) | exact | yes |
| ``mixture`` | ``dim`` (2) | exact | yes |
| ``ising`` | ``(size, size)`` (3 x 3) | exact (enumeration) | yes (enumeration) |

Example:
    >>> import torch
    >>> from pyroflows import energies
    >>> target = energies.get("banana")
    >>> target.energy(torch.zeros(5, 2)).shape
    torch.Size([5])
    >>> round(target.log_normalizer, 4)
    1.8379
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyroflows.energies.base import Target, grid_log_normalizer
from pyroflows.energies.gaussian import (
    Banana,
    Funnel,
    Gaussian,
    Mixture,
    banana,
    funnel,
    gaussian,
    mixture,
)
from pyroflows.energies.ising import Ising, ising
from pyroflows.energies.rezende import U1, WaveTarget, u1, u2, u3, u4

_TARGETS: dict[str, Callable[..., Target]] = {
    "u1": u1,
    "u2": u2,
    "u3": u3,
    "u4": u4,
    "banana": banana,
    "funnel": funnel,
    "gaussian": gaussian,
    "mixture": mixture,
    "ising": ising,
}


def available() -> list[str]:
    """Names accepted by [`get`][pyroflows.energies.get].

    Returns:
        the built-in target names.
    """
    return list(_TARGETS)


def get(name: str, **options: Any) -> Target:
    """The built-in target ``name``, built with ``options`` (e.g. ``get("funnel", dim=2)``).

    Args:
        name: one of [`available`][pyroflows.energies.available]`()`.
        **options: the builder's keyword arguments (see each builder).

    Returns:
        the target.
    """
    if name not in _TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(_TARGETS)}")
    return _TARGETS[name](**options)


__all__ = [
    "Banana", "Funnel", "Gaussian", "Ising", "Mixture", "Target", "U1", "WaveTarget",
    "available", "banana", "funnel", "gaussian", "get", "grid_log_normalizer", "ising", "mixture",
    "u1", "u2", "u3", "u4",
]
