"""Argument checks shared by every public entry point.

Each check returns the value it accepted (normalised: an ``int``, a ``float``) or raises with one
message style, ``"<name> must be <what was expected>, got <what was passed>"``: ``TypeError`` when
the argument is not a tensor where one is needed or has the wrong dtype, ``ValueError`` for
everything else (a wrong number, a wrong shape, a non-finite value). ``bool`` is never accepted
as a number, although Python treats it as an int.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "check_choice",
    "check_finite",
    "check_int",
    "check_number",
    "check_positive",
    "check_probability",
    "check_tensor",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` in ``[minimum, maximum]`` (no upper bound by default)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a ``float`` if it is a finite number in the interval from ``low`` to ``high``
    (closed ends unless ``low_open`` / ``high_open``)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        where = (
            "" if (low, high) == (-math.inf, math.inf) else f" in {left}{low:g}, {high:g}{right}"
        )
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_positive(value: Any, name: str, *, below: float | None = None) -> float:
    """``value`` as a ``float`` if it is finite and ``> 0`` (and ``< below`` when given)."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be a positive number < {below:g}, got {value!r}")
    return float(value)


def check_probability(value: Any, name: str, *, closed: bool = False) -> float:
    """``value`` as a ``float`` in ``(0, 1)`` (``[0, 1]`` with ``closed``)."""
    return check_number(value, name, low=0.0, high=1.0, low_open=not closed, high_open=not closed)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_tensor(
    value: Any,
    name: str,
    *,
    event_shape: Sequence[int] | None = None,
    min_batch_dims: int = 0,
    floating: bool = True,
) -> torch.Tensor:
    """``value`` if it is a tensor (floating-point unless ``floating=False``) whose trailing
    dimensions are ``event_shape`` (when given) after at least ``min_batch_dims`` batch dims.

    Finiteness is a separate check (`check_finite`): it costs a host sync, which hot paths
    avoid."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if event_shape is not None:
        event_shape = tuple(int(s) for s in event_shape)
        n = len(event_shape)
        if value.dim() < n + min_batch_dims or tuple(value.shape[value.dim() - n :]) != event_shape:
            batch = ", ".join(["*batch"] if min_batch_dims == 0 else ["batch"] * min_batch_dims)
            want = ", ".join([batch, *map(str, event_shape)])
            raise ValueError(f"{name} must have shape ({want}), got {tuple(value.shape)}")
    return value


def check_finite(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` if it holds no NaN or inf (one host sync: keep it out of per-step code)."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got a tensor containing NaN or inf")
    return value
