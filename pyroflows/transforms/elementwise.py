"""Elementwise bijections ``x_i = f(z_i; theta_i)`` shared by the coupling and autoregressive
mechanisms. Each takes its parameters as a tuple of tensors shaped like its input and returns the
output together with the *elementwise* ``log|df/dz|`` (the caller sums over the event).

A new elementwise family (e.g. a spline) is one more class with ``num_params``, ``forward`` and
``inverse``; every coupling and autoregressive layer can then use it.
"""

from __future__ import annotations

import torch


class Additive:
    """``x = z + t`` (NICE): volume preserving, ``log|df/dz| = 0``."""

    num_params = 1

    def forward(self, z: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        (shift,) = params
        return z + shift, torch.zeros_like(z)

    def inverse(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        (shift,) = params
        return x - shift, torch.zeros_like(x)


class Affine:
    """``x = z * exp(s) + t`` (RealNVP) with a soft-clamped log-scale.

    ``s = bound * tanh(raw / bound)`` keeps ``|s| < bound`` so one layer can never scale by more
    than ``exp(bound)``: large raw outputs early in training cannot overflow, and near zero the
    clamp is the identity.

    Args:
        bound: the largest absolute log-scale; ``None`` leaves ``s`` unclamped.
    """

    num_params = 2

    def __init__(self, bound: float | None = 3.0) -> None:
        if bound is not None and not bound > 0:
            raise ValueError(f"scale_bound must be positive or None, got {bound}")
        self.bound = bound

    def log_scale(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.bound is None else self.bound * torch.tanh(raw / self.bound)

    def forward(self, z: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = params
        s = self.log_scale(raw)
        return z * torch.exp(s) + shift, s

    def inverse(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = params
        s = self.log_scale(raw)
        return (x - shift) * torch.exp(-s), s


ELEMENTWISE = {"additive": Additive, "affine": Affine}
