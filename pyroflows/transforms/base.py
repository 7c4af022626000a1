"""The base class every pyroflows layer derives from.

A layer implements two methods, both returning the log-absolute-determinant of the Jacobian of
the *forward* map ``z -> x`` summed over the event dimensions:

* ``forward_and_log_det(z, context) -> (x, log|det dx/dz|)``
* ``inverse_and_log_det(x, context) -> (z, log|det dx/dz|)``

From those two, the class derives Pyro's whole interface: ``_call``, ``_inverse``,
``log_abs_det_jacobian`` (a :class:`~pyro.distributions.torch_transform.TransformModule`) and
``condition(context)`` (a :class:`~pyro.distributions.conditional.ConditionalTransform`), so one
class serves both the unconditional and the conditional case: a layer built with a
``context_dim`` reads the context, a layer built without one ignores it.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.util import is_validation_enabled
from torch.distributions import Transform, constraints


class FlowTransform(TransformModule, ConditionalTransform):
    """A bijective layer ``z -> x`` over events of shape ``event_shape``.

    Args:
        event_shape: shape of one event, ``(D,)`` for vectors or ``(C, H, W)`` for images.
        context_dim: width of the context vector the layer is conditioned on, or ``None``.

    Subclasses implement :meth:`forward_and_log_det` and :meth:`inverse_and_log_det`. The log
    determinant that Pyro asks for after a call is taken from that call (matched by tensor
    identity, never by value), so ``TransformedDistribution.log_prob`` costs one pass; and
    inverting the very tensor the layer just produced returns its input, so scoring a
    distribution's own sample (``pyro.sample`` of ``flow.dist()``) never runs a sequential
    inverse. Only that one tensor object is remembered: a new tensor is always recomputed.
    """

    bijective = True

    def __init__(self, event_shape: tuple[int, ...], context_dim: int | None = None) -> None:
        super().__init__(cache_size=0)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.context_dim = context_dim
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- what a family implements -------------------------------------------------------
    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``z -> x``; return ``x`` and ``log|det dx/dz|`` of shape ``z``'s batch shape."""
        raise NotImplementedError

    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``x -> z``; return ``z`` and the *forward* ``log|det dx/dz|`` at that ``z``."""
        raise NotImplementedError

    # -- Pyro / torch.distributions interface -------------------------------------------
    @property
    def event_dim(self) -> int:  # type: ignore[override]
        return len(self.event_shape)

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.event_shape))

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return self._call_with_context(z, None, inverse=False)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._call_with_context(x, None, inverse=True)

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._ladj_with_context(z, x, None)

    def condition(self, context: torch.Tensor) -> Transform:
        """The layer bound to ``context``: a plain ``Transform`` for Pyro's conditional API."""
        return BoundTransform(self, context)

    def _call_with_context(self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool) -> torch.Tensor:
        if is_validation_enabled():
            self._validate(inputs, context)
        if inverse:
            last = self._last
            if last is not None and last[1] is inputs:  # inverting this layer's own output
                return last[0]
            z, ladj = self.inverse_and_log_det(inputs, context)
            self._last = (z, inputs, ladj)
            return z
        x, ladj = self.forward_and_log_det(inputs, context)
        self._last = (inputs, x, ladj)
        return x

    def _ladj_with_context(self, z: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] is z and last[1] is x:
            return last[2]
        return self.forward_and_log_det(z, context)[1]

    def _validate(self, inputs: torch.Tensor, context: torch.Tensor | None) -> None:
        """Input checks of the Pyro interface, run only under ``pyro.enable_validation(True)``
        (the default); ``Flow`` checks once per call and then uses the unchecked methods."""
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise TypeError(f"{type(self).__name__}: input must be a floating-point tensor")
        n = self.event_dim
        if inputs.dim() < n or tuple(inputs.shape[inputs.dim() - n:]) != self.event_shape:
            raise ValueError(f"{type(self).__name__}: input must have shape (..., {', '.join(map(str, self.event_shape))}), got {tuple(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError(f"{type(self).__name__}: input contains NaN or inf")
        if self.context_dim and (context is None or context.shape[-1:] != (self.context_dim,)):
            raise ValueError(f"{type(self).__name__}: context of shape (..., {self.context_dim}) is required, got {None if context is None else tuple(context.shape)}")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_last"] = None  # never pickle a per-call intermediate
        return state

    def extra_repr(self) -> str:
        ctx = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"event_shape={self.event_shape}{ctx}"


class BoundTransform(Transform):
    """A :class:`FlowTransform` with its context fixed (what ``condition(context)`` returns)."""

    bijective = True

    def __init__(self, layer: FlowTransform, context: torch.Tensor) -> None:
        super().__init__(cache_size=0)
        self.layer = layer
        self.context = context

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.layer.domain

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.layer.codomain

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer._call_with_context(z, self.context, inverse=False)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer._call_with_context(x, self.context, inverse=True)

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.layer._ladj_with_context(z, x, self.context)


def batch_shape_of(x: torch.Tensor, event_shape: tuple[int, ...]) -> torch.Size:
    """Leading (batch) dimensions of ``x`` for events of ``event_shape``."""
    return x.shape[: x.dim() - len(event_shape)]


def sum_event(t: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Sum the rightmost ``event_dim`` dimensions of ``t``."""
    return t.sum(tuple(range(-event_dim, 0))) if event_dim else t


def expand_context(context: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor | None:
    """Broadcast ``context`` of shape ``(*c, context_dim)`` to ``(*batch_shape, context_dim)``."""
    if context is None:
        return None
    return context.expand(*batch_shape, context.shape[-1])
