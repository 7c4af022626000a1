"""The base class every pyroflows layer derives from.

A layer implements two methods, both returning the log-absolute-determinant of the Jacobian of
the *forward* map ``z -> x`` summed over the event dimensions:

* ``forward_and_log_det(z, context) -> (x, log|det dx/dz|)``
* ``inverse_and_log_det(x, context) -> (z, log|det dx/dz|)``

From those two, the class derives Pyro's whole interface: ``_call``, ``_inverse``,
``log_abs_det_jacobian`` (a Pyro ``TransformModule``) and ``condition(context)`` (a Pyro
``ConditionalTransform``), so one class serves both the unconditional and the conditional case:
a layer built with a ``context_dim`` reads the context, a layer built without one ignores it.

Pyro asks for a map and its log-determinant in separate calls, while every layer computes both in
one pass. The layer therefore remembers its last pass (input, output, log-determinant) and
answers a later call from it only when that call is provably about the same computation: the
same input or output tensor *object*, the same context object, and no in-place change to any
of them or to any parameter or buffer since (tensor ``_version`` counters). Anything else
recomputes. A pass recorded without gradients (``sample()`` runs under ``no_grad``) and asked
for where gradients are wanted is replayed: the values come from memory, and the backward pass
recomputes the layer, so gradients are exact and paid for only when used.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.util import is_validation_enabled
from torch.autograd.function import once_differentiable
from torch.distributions import Transform, constraints

from pyroflows.validation import check_int, check_tensor


def _versions(tensors: tuple[torch.Tensor | None, ...]) -> tuple[int, ...] | None:
    """The in-place modification counters of ``tensors`` (``None`` entries count as 0), or
    ``None`` when one is an inference tensor, which keeps no counter and so cannot be trusted."""
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tuple(0 if t is None else t._version for t in tensors)


def _same(given: torch.Tensor, remembered: torch.Tensor) -> bool:
    """``given`` is ``remembered``, or the gradient-carrying replay of it (see `_Replay`)."""
    return given is remembered or getattr(given, "_pyroflows_replay_of", None) is remembered


@dataclass(eq=False)
class _Pass:
    """One remembered evaluation ``inputs -> outputs`` of a layer (see the module docstring)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    log_det: torch.Tensor
    context: torch.Tensor | None
    state: tuple[torch.Tensor, ...]  # the layer's parameters and buffers, by identity
    versions: tuple[int, ...]
    with_grad: bool

    def valid(self, layer: FlowTransform, context: torch.Tensor | None) -> bool:
        """Whether this pass still describes ``layer`` at ``context`` right now."""
        if context is not self.context:
            return False
        state = layer._state_tensors()
        # a parameter replaced (e.g. by load_state_dict(assign=True)) is another parameter
        if len(state) != len(self.state) or any(map(operator.is_not, state, self.state)):
            return False
        return _versions((self.inputs, self.outputs, self.context, *state)) == self.versions


class _Replay(torch.autograd.Function):
    """A pass recorded without gradients, replayed where gradients are wanted.

    The values come from memory, so scoring a sample drawn under ``no_grad`` still needs no
    (sequential) inverse; ``backward`` recomputes the pass with autograd on, so gradients are
    exact and the recomputation is paid only when someone differentiates.
    """

    @staticmethod
    def forward(ctx, layer, inverse, memory, context, inputs, *state):  # type: ignore[override]
        ctx.layer, ctx.inverse, ctx.has_context = layer, inverse, context is not None
        ctx.save_for_backward(inputs, *(() if context is None else (context,)), *state)
        outputs, log_det = memory
        return outputs.detach(), log_det.detach()

    @staticmethod
    @once_differentiable  # second derivatives through a replay raise instead of being 0
    def backward(ctx, grad_outputs, grad_log_det):  # type: ignore[override]
        inputs, *rest = ctx.saved_tensors
        context = rest.pop(0) if ctx.has_context else None
        need_context, need_inputs, *need_state = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            inputs = inputs.detach().requires_grad_(need_inputs)
            if context is not None:
                context = context.detach().requires_grad_(need_context)
            layer = ctx.layer
            run = layer.inverse_and_log_det if ctx.inverse else layer.forward_and_log_det
            outputs, log_det = run(inputs, context)
            wrt = [context, inputs, *rest]
            needs = [need_context, need_inputs, *need_state]
            needed = [t for t, need in zip(wrt, needs, strict=True) if need]
            grads = iter(
                torch.autograd.grad(
                    (outputs, log_det), needed, (grad_outputs, grad_log_det), allow_unused=True
                )
            )
        return (None, None, None) + tuple(
            next(grads) if need else None for need in (need_context, need_inputs, *need_state)
        )


def _forget_mirror(module: FlowTransform, incompatible_keys: object) -> None:
    module._initialized_mirror = None  # a loaded state may hold another `initialized`


class FlowTransform(TransformModule, ConditionalTransform):
    """A bijective layer ``z -> x`` over events of shape ``event_shape``.

    Args:
        event_shape: shape of one event, ``(D,)`` for vectors or ``(C, H, W)`` for images.
        context_dim: width of the context vector the layer is conditioned on, or ``None``.

    Subclasses implement ``forward_and_log_det`` and ``inverse_and_log_det``. Through
    Pyro's interface a layer reuses its last pass where that is exact (module docstring):
    ``TransformedDistribution.log_prob`` costs one pass per layer, and scoring a distribution's
    own fresh sample (``flow.dist().sample()`` then ``.log_prob``) never runs a sequential
    inverse; if that score is differentiated, the backward pass recomputes the layer.
    """

    bijective = True

    def __init__(self, event_shape: tuple[int, ...], context_dim: int | None = None) -> None:
        super().__init__(cache_size=0)
        self.event_shape = tuple(check_int(s, "event_shape") for s in event_shape)
        self.context_dim = None if context_dim is None else check_int(context_dim, "context_dim")
        self._pass: _Pass | None = None
        self._initialized_mirror: bool | None = None
        self.register_load_state_dict_post_hook(_forget_mirror)

    # -- what a family implements -------------------------------------------------------
    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``z -> x``.

        Args:
            z: input of shape ``(*batch, *event_shape)``.
            context: context of shape ``(*batch, context_dim)`` for a conditional layer.

        Returns:
            ``x`` and ``log|det dx/dz|`` of shape ``batch``.
        """
        raise NotImplementedError

    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``x -> z``.

        Args:
            x: input of shape ``(*batch, *event_shape)``.
            context: context of shape ``(*batch, context_dim)`` for a conditional layer.

        Returns:
            ``z`` and the *forward* ``log|det dx/dz|`` at that ``z``, of shape ``batch``.
        """
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
        """The layer bound to ``context``.

        Args:
            context: the context, of shape ``(*batch, context_dim)``.

        Returns:
            A plain ``Transform`` for Pyro's conditional API.
        """
        return BoundTransform(self, context)

    # -- data-dependent initialisation ---------------------------------------------------
    def _data_init_pending(self) -> bool:
        """Whether a layer with an ``initialized`` buffer still has to initialise from data.

        The buffer (which travels with ``state_dict``) is read from its device once and then
        mirrored on the host, so calls on a GPU do not wait on a device read every time.
        """
        if self._initialized_mirror is None:
            self._initialized_mirror = bool(self.initialized)
        return not self._initialized_mirror

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized_mirror = True

    # -- the remembered pass ---------------------------------------------------------------
    def _state_tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.parameters(), *self.buffers())

    def _remember(
        self, z: torch.Tensor, x: torch.Tensor, log_det: torch.Tensor, context: torch.Tensor | None
    ) -> _Pass | None:
        state = self._state_tensors()
        versions = _versions((z, x, context, *state))
        grad = torch.is_grad_enabled()
        self._pass = (
            None if versions is None else _Pass(z, x, log_det, context, state, versions, grad)
        )
        return self._pass

    def _recall(self, given: torch.Tensor, context: torch.Tensor | None, inverse: bool):
        """``(other side, log_det)`` of a remembered pass that ``given`` enters from the output
        side (``inverse``) or the input side, or ``None`` when there is none that is exact."""
        last = self._pass
        if last is None or not _same(given, last.outputs if inverse else last.inputs):
            return None
        if not last.valid(self, context):
            return None
        other = last.inputs if inverse else last.outputs
        if not torch.is_grad_enabled() or last.with_grad:
            return other, last.log_det
        state = [t for t in last.state if t.requires_grad]
        if not (given.requires_grad or state or (context is not None and context.requires_grad)):
            return other, last.log_det
        other_grad, log_det = _Replay.apply(
            self, inverse, (other, last.log_det), context, given, *state
        )
        other_grad._pyroflows_replay_of = other  # the next layer's memory still matches it
        z, x = (other_grad, given) if inverse else (given, other_grad)
        self._remember(z, x, log_det, context)
        return other_grad, log_det

    def _call_with_context(
        self, inputs: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> torch.Tensor:
        if is_validation_enabled():
            self._validate(inputs, context)
        recalled = self._recall(inputs, context, inverse)
        if recalled is not None:
            return recalled[0]
        if inverse:
            z, log_det = self.inverse_and_log_det(inputs, context)
            self._remember(z, inputs, log_det, context)
            return z
        x, log_det = self.forward_and_log_det(inputs, context)
        self._remember(inputs, x, log_det, context)
        return x

    def _ladj_with_context(
        self, z: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        last = self._pass
        if last is not None and _same(x, last.outputs):
            recalled = self._recall(z, context, inverse=False)
            if recalled is not None:
                return recalled[1]
        return self.forward_and_log_det(z, context)[1]

    def _validate(self, inputs: torch.Tensor, context: torch.Tensor | None) -> None:
        """Type and shape checks of the Pyro interface, under ``pyro.enable_validation(True)``
        (the default). No finiteness check here: it would cost a host sync per layer; the
        distribution checks its value once, and [`Flow`][pyroflows.Flow] checks its inputs."""
        name = type(self).__name__
        check_tensor(inputs, f"{name} input", event_shape=self.event_shape)
        if self.context_dim:
            if context is None:
                raise ValueError(
                    f"{name} context must be a tensor of shape "
                    f"(*batch, {self.context_dim}), got None"
                )
            check_tensor(context, f"{name} context", event_shape=(self.context_dim,))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pass"] = None  # never pickle or deep-copy a per-call intermediate
        return state

    def extra_repr(self) -> str:
        ctx = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"event_shape={self.event_shape}{ctx}"


class BoundTransform(Transform):
    """A ``FlowTransform`` with its context fixed (what ``condition(context)`` returns)."""

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
    """Leading (batch) dimensions of ``x`` for events of ``event_shape``.

    Args:
        x: a tensor of shape ``(*batch, *event_shape)``.
        event_shape: the event shape.

    Returns:
        ``batch``.
    """
    return x.shape[: x.dim() - len(event_shape)]


def sum_event(t: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Sum the rightmost ``event_dim`` dimensions of ``t``.

    Args:
        t: any tensor.
        event_dim: how many trailing dimensions to sum (0: none).

    Returns:
        The sum.
    """
    return t.sum(tuple(range(-event_dim, 0))) if event_dim else t


def expand_context(context: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor | None:
    """Broadcast a context to a batch shape.

    Args:
        context: ``None`` or a tensor of shape ``(*c, context_dim)``, ``c`` broadcastable to
            ``batch_shape``.
        batch_shape: the batch shape to broadcast to.

    Returns:
        ``None``, or a view of shape ``(*batch_shape, context_dim)``.
    """
    if context is None:
        return None
    return context.expand(*batch_shape, context.shape[-1])
