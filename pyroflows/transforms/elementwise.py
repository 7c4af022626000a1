"""Elementwise bijections ``x_i = f(z_i; theta_i)``: the pluggable part of the coupling and
autoregressive mechanisms.

An elementwise map is any object with

* ``num_params``: how many parameters it needs per transformed coordinate;
* ``forward(z, params) -> (x, log|df/dz|)`` and ``inverse(x, params) -> (z, log|df/dz|)``,
  where ``params`` is a tuple of ``num_params`` tensors shaped like the input (what the
  conditioner networks produce) or broadcastable to it (a coupling's unconditional part passes
  its learned constants unexpanded, so per-parameter work is not repeated over the batch), and
  the log-derivative is the *forward* one, elementwise (the caller sums over the event; it may
  broadcast to the input's shape).

Every coupling and autoregressive layer takes one, so a new family is a choice of map plus a
builder of a few lines: NICE is the additive map in a coupling, RealNVP the affine one, NSF the
rational-quadratic spline
([`RationalQuadraticSpline`][pyroflows.transforms.spline.RationalQuadraticSpline]); MAF, IAF and
``nsf_ar`` are the same maps in an autoregressive layer.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pyroflows.validation import check_choice, check_positive

Params = tuple[torch.Tensor, ...]


class ElementwiseMap(Protocol):
    """What the coupling and autoregressive mechanisms require of an elementwise bijection."""

    num_params: int

    def forward(self, z: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = f(z)`` and ``log|f'(z)|``, elementwise."""
        ...

    def inverse(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = f^{-1}(x)`` and ``log|f'(z)|``, elementwise."""
        ...


class Additive:
    """``x = z + t`` (NICE): volume preserving, ``log|df/dz| = 0``."""

    num_params = 1

    def forward(self, z: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = z + t``."""
        (shift,) = params
        return z + shift, torch.zeros_like(z)

    def inverse(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = x - t``."""
        (shift,) = params
        return x - shift, torch.zeros_like(x)


class Affine:
    """``x = z * exp(s) + t`` (RealNVP, MAF, IAF) with a soft-clamped log-scale.

    ``s = bound * tanh(raw / bound)`` keeps ``|s| < bound`` so one layer can never scale by more
    than ``exp(bound)``: large raw outputs early in training cannot overflow, and near zero the
    clamp is the identity.

    Args:
        bound: the largest absolute log-scale; ``None`` leaves ``s`` unclamped.
    """

    num_params = 2

    def __init__(self, bound: float | None = 3.0) -> None:
        self.bound = None if bound is None else check_positive(bound, "scale_bound")

    def log_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """The clamped log-scale ``s`` from the network's raw output."""
        return raw if self.bound is None else self.bound * torch.tanh(raw / self.bound)

    def forward(self, z: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = z * exp(s) + t``."""
        raw, shift = params
        s = self.log_scale(raw)
        return z * torch.exp(s) + shift, s

    def inverse(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = (x - t) * exp(-s)``."""
        raw, shift = params
        s = self.log_scale(raw)
        return (x - shift) * torch.exp(-s), s


class Inverse:
    """The inverse of an elementwise map: ``forward`` runs the wrapped map's ``inverse`` and the
    other way round (log-derivatives negated).

    A layer evaluates ``forward`` when sampling and ``inverse`` in ``log_prob``; wrapping a map
    chooses which of its two formulas serves the density. For the rational-quadratic spline,
    ``Inverse(spline)`` makes ``log_prob`` evaluate the spline formula itself on the data side
    (as zuko, nflows and Durkan et al.'s density experiments do) and sampling take the quadratic
    root.

    Args:
        base: the wrapped elementwise map.

    Example:
        >>> spline = Inverse(resolve_elementwise("spline"))
        >>> z = torch.randn(5)
        >>> params = tuple(torch.randn(5) for _ in range(spline.num_params))
        >>> x, log_d = spline.forward(z, params)
        >>> torch.allclose(spline.inverse(x, params)[0], z, atol=1e-5)
        True
    """

    def __init__(self, base: ElementwiseMap) -> None:
        self.base = resolve_elementwise(base)
        self.num_params = self.base.num_params

    def __repr__(self) -> str:
        return f"Inverse({self.base!r})"

    def forward(self, z: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = g^{-1}(z)`` and ``log|dx/dz| = -log|g'(x)|`` for the wrapped map ``g``."""
        x, log_d = self.base.inverse(z, params)
        return x, -log_d

    def inverse(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = g(x)`` and the forward ``log|dx/dz| = -log|g'(x)|``."""
        z, log_d = self.base.forward(x, params)
        return z, -log_d


ELEMENTWISE_NAMES = ("additive", "affine", "spline")


def resolve_elementwise(elementwise: Any) -> ElementwiseMap:
    """An elementwise map from a name (``"additive"``, ``"affine"``, ``"spline"``, each with
    its defaults) or an object with ``num_params``, ``forward`` and ``inverse`` (returned as is).

    Raises:
        ValueError: an unknown name or an object without that interface.
    """
    if isinstance(elementwise, str):
        check_choice(elementwise, "elementwise", ELEMENTWISE_NAMES)
        if elementwise == "spline":  # spline.py builds on the mechanisms that import this module
            from pyroflows.transforms.spline import RationalQuadraticSpline

            return RationalQuadraticSpline()
        return Additive() if elementwise == "additive" else Affine()
    if not all(hasattr(elementwise, a) for a in ("num_params", "forward", "inverse")):
        raise ValueError(
            f"elementwise must be one of {', '.join(map(repr, ELEMENTWISE_NAMES))} or an object "
            f"with num_params, forward and inverse, got {elementwise!r}"
        )
    return elementwise
