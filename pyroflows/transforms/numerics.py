"""Numerical building blocks shared by the families whose inverse or log-determinant is not
closed-form: monotone root finding with exact implicit gradients, Jacobians from
vector-Jacobian products, Hutchinson probes, and the choice between an exact computation and
an estimator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyroflows.validation import check_choice

#: Largest event dimension for which a brute-force Jacobian (``D`` vector-Jacobian products per
#: evaluation) is allowed; above it the estimators must be used.
EXACT_MAX_DIM = 64
#: Up to this dimension an ``"auto"`` log-det / trace mode picks the exact computation.
AUTO_EXACT_MAX_DIM = 4

BISECTION_STEPS = 60


def solve_increasing(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dfn: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    steps: int = BISECTION_STEPS,
) -> torch.Tensor:
    """Elementwise root of ``fn(a) = target`` for ``fn`` increasing, bracketed by ``[lo, hi]``.

    Bisection (without gradients) brings the bracket to machine precision; one Newton step
    taken with autograd on then gives the exact first-order derivative of the root with respect
    to ``target`` and to whatever parameters ``fn`` closes over (implicit function theorem:
    ``d root = (d target - d fn) / fn'``), so training through the solve is correct.

    Args:
        fn: increasing elementwise function.
        dfn: its derivative.
        target: right-hand side, broadcastable with ``lo`` and ``hi``.
        lo: lower end of a bracket of the root.
        hi: upper end of a bracket of the root.
        steps: bisection steps (60 halvings reach float64 precision on brackets up to ~1e3).
    """
    with torch.no_grad():
        goal = target.detach()
        lo, hi = lo.detach(), hi.detach()
        for _ in range(steps):
            mid = (lo + hi) / 2
            above = fn(mid) > goal
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        root = (lo + hi) / 2
    return root - (fn(root) - target) / dfn(root)


def jacobian(out: torch.Tensor, inp: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Batched Jacobian of a map acting on the last axis, one event per batch element.

    Args:
        out: outputs ``(..., D)``, computed from ``inp`` with autograd on.
        inp: inputs ``(..., D)``.
        create_graph: keep the graph, to differentiate through the Jacobian.

    Returns:
        ``J[..., i, j] = d out_i / d inp_j``, by one vector-Jacobian product per output coordinate.
    """
    rows = []
    for i in range(out.shape[-1]):
        basis = torch.zeros_like(out)
        basis[..., i] = 1
        rows.append(
            torch.autograd.grad(out, inp, basis, create_graph=create_graph, retain_graph=True)[0]
        )
    return torch.stack(rows, dim=-2)


def rademacher_like(x: torch.Tensor) -> torch.Tensor:
    """A Rademacher (+-1) probe, the lowest-variance Hutchinson probe.

    Args:
        x: the shape, dtype and device to copy.

    Returns:
        A tensor of random signs like ``x``.
    """
    return torch.randint_like(x, 2) * 2 - 1


def exact_or_estimator(
    mode: str, option: str, choices: tuple[str, ...], dim: int, estimator: str
) -> str:
    """Resolve an ``"auto" | "exact" | <estimator>`` option.

    Args:
        mode: the value given.
        option: its name, for error messages.
        choices: the allowed values.
        dim: event dimension.
        estimator: what ``"auto"`` becomes above ``AUTO_EXACT_MAX_DIM``.

    Returns:
        ``mode``, with ``"auto"`` resolved; ``"exact"`` above ``EXACT_MAX_DIM`` is a ``ValueError``.
    """
    check_choice(mode, option, choices)
    if mode == "auto":
        mode = "exact" if dim <= AUTO_EXACT_MAX_DIM else estimator
    if mode == "exact" and dim > EXACT_MAX_DIM:
        others = ", ".join(repr(c) for c in choices if c not in ("auto", "exact"))
        raise ValueError(
            f"{option}='exact' costs {dim} vector-Jacobian products per evaluation; it is allowed "
            f"up to dimension {EXACT_MAX_DIM}, got {dim}: use {others}"
        )
    return mode
