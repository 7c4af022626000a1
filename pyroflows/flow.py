"""``Flow``: a standard-Normal base distribution pushed through a stack of transforms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransformedDistribution,
)
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.util import is_validation_enabled
from torch import nn

from pyroflows.transforms.base import FlowTransform
from pyroflows.validation import check_finite, check_int, check_tensor

SampleShape = int | Sequence[int] | torch.Size
FLOW_FORMAT = "pyroflows.Flow/1"


def _sample_shape(sample_shape: SampleShape) -> torch.Size:
    dims = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise ValueError(f"sample_shape must be an int or a tuple of ints, got {sample_shape!r}")
    return torch.Size(check_int(s, "sample_shape", minimum=0) for s in dims)


class Flow(nn.Module):
    """A normalizing flow ``x = T(z)``, ``z ~ N(0, I)``, optionally conditioned on a context.

    The base distribution's location and scale are buffers, so ``flow.to(device)``,
    ``flow.double()`` and ``state_dict()`` carry everything. Density evaluation walks the layers
    backwards once (``x -> z``), sampling walks them forwards once (``z -> x``); neither goes
    through Pyro's transform caches.

    Args:
        shape: event shape, ``(D,)`` or ``(C, H, W)``.
        transforms: the layers, each a ``FlowTransform``, in the
            sampling direction ``z -> x``.
        context_dim: width of the context vector of a conditional flow, or ``None``.
        config: the options the flow was built with (kept for checkpoints and ``repr``).

    Build flows with ``pyroflows.build_flow`` rather than by hand.
    """

    def __init__(
        self,
        shape: Sequence[int],
        transforms: Sequence[FlowTransform],
        context_dim: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.event_shape = torch.Size(shape)
        self.context_dim = context_dim
        self.config = dict(config or {})
        for t in transforms:
            if not isinstance(t, FlowTransform):
                raise TypeError(f"transforms must be FlowTransform layers, got {type(t).__name__}")
            if tuple(t.event_shape) != tuple(self.event_shape):
                raise ValueError(
                    f"layer {type(t).__name__} has event shape {t.event_shape}, "
                    f"expected {tuple(self.event_shape)}"
                )
        compose = ConditionalComposeTransformModule if context_dim else ComposeTransformModule
        #: the ``z -> x`` transform (Pyro's compose module, conditional when ``context_dim``)
        self.transform = compose(list(transforms))
        self.register_buffer("base_loc", torch.zeros(self.event_shape))
        self.register_buffer("base_scale", torch.ones(self.event_shape))

    # -- structure -----------------------------------------------------------------------
    @property
    def layers(self) -> list[FlowTransform]:
        """The layers in the sampling direction ``z -> x``."""
        return list(nn.ModuleList.__iter__(self.transform))

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def base_dist(self, batch_shape: Sequence[int] = ()) -> dist.Distribution:
        """The standard-Normal base distribution.

        Args:
            batch_shape: its batch shape.

        Returns:
            A ``Normal(base_loc, base_scale).to_event(event_dim)`` over the flow's buffers.
        """
        # validate_args=False: inputs are checked once by the flow; z is produced internally
        base = dist.Normal(self.base_loc, self.base_scale, validate_args=False).to_event(
            self.event_dim
        )
        return base.expand(torch.Size(batch_shape)) if len(batch_shape) else base

    # -- validation ----------------------------------------------------------------------
    def _param_like(self) -> torch.Tensor:
        return self.base_loc

    def _check_like_flow(self, value: Any, name: str, event_shape: Sequence[int]) -> None:
        ref = self._param_like()
        check_tensor(value, name, event_shape=event_shape)
        if value.dtype != ref.dtype:
            raise TypeError(f"{name} must have the flow's dtype {ref.dtype}, got {value.dtype}")
        if value.device != ref.device:
            raise ValueError(
                f"{name} must be on the flow's device {ref.device}, got {value.device}"
            )
        if is_validation_enabled():  # one host sync per call, never per layer
            check_finite(value, name)

    def _check_x(self, x: Any, name: str = "x") -> None:
        self._check_like_flow(x, name, self.event_shape)

    def _check_context(self, context: Any) -> torch.Size:
        """Validate ``context`` and return its batch shape."""
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    "context must be None for an unconditional flow "
                    "(build the flow with context_dim)"
                )
            return torch.Size()
        if context is None:
            raise ValueError(
                f"context must be a tensor of shape (*batch, {self.context_dim}) "
                "for this conditional flow, got None"
            )
        self._check_like_flow(context, "context", (self.context_dim,))
        return context.shape[:-1]

    # -- densities and samples -----------------------------------------------------------
    def inverse_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = T^{-1}(x)`` and the forward log-determinant, without input checks.

        Args:
            x: points of shape ``(*batch, *event_shape)``.
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            ``z`` and ``log|det dT/dz|`` at ``z`` summed over layers, of shape ``batch``.
        """
        total = 0.0
        for layer in reversed(self.layers):
            x, ladj = layer.inverse_and_log_det(x, context)
            total = total + ladj
        return x, total

    def forward_and_log_det(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = T(z)`` and its log-determinant, without input checks.

        Args:
            z: base points of shape ``(*batch, *event_shape)``.
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            ``x`` and ``log|det dT/dz|`` summed over layers, of shape ``batch``.
        """
        total = 0.0
        for layer in self.layers:
            z, ladj = layer.forward_and_log_det(z, context)
            total = total + ladj
        return z, total

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(x | context)``, of shape ``x.shape[:-event_dim]`` (broadcast with the context).

        Args:
            x: points of shape ``(*batch, *event_shape)``, the flow's dtype and device.
            context: context of shape ``(*batch, context_dim)`` for a conditional flow.

        Returns:
            The log-density, of shape ``batch`` (broadcast with the context's batch).
        """
        self._check_x(x)
        ctx_batch = self._check_context(context)
        batch = x.shape[: x.dim() - self.event_dim]
        if context is not None and torch.broadcast_shapes(batch, ctx_batch) != batch:
            x = x.expand(torch.broadcast_shapes(batch, ctx_batch) + self.event_shape)
        z, ladj = self.inverse_and_log_det(x, context)
        return self.base_dist().log_prob(z) - ladj

    def rsample_and_log_prob(
        self, sample_shape: SampleShape = (), context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample and its log-density in one forward pass (no inversion).

        Args:
            sample_shape: leading shape of the draws (an int or a tuple of ints).
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            ``(x, log_q)``: ``x`` of shape ``sample_shape + context batch + event_shape``, ``log_q``
            without the event dims.
        """
        shape = _sample_shape(sample_shape) + self._check_context(context)
        base = self.base_dist()
        z = base.rsample(shape)
        x, ladj = self.forward_and_log_det(z, context)
        return x, base.log_prob(z) - ladj

    def rsample(
        self, sample_shape: SampleShape = (), context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A reparameterised sample.

        Args:
            sample_shape: leading shape of the draws (an int or a tuple of ints).
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            A tensor of shape ``sample_shape + context batch + event_shape``.
        """
        shape = _sample_shape(sample_shape) + self._check_context(context)
        return self.forward_and_log_det(self.base_dist().rsample(shape), context)[0]

    @torch.no_grad()
    def sample(
        self, sample_shape: SampleShape = (), context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A sample, without gradient.

        Args:
            sample_shape: leading shape of the draws (an int or a tuple of ints).
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            A tensor of shape ``sample_shape + context batch + event_shape``.
        """
        return self.rsample(sample_shape, context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same as ``log_prob``, so ``flow(x)`` works in ``nn`` code (and under DDP).

        Args:
            x: points of shape ``(*batch, *event_shape)``.
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            The log-density, of shape ``batch``.
        """
        return self.log_prob(x, context)

    # -- Pyro integration ----------------------------------------------------------------
    def dist(self, context: torch.Tensor | None = None) -> dist.TransformedDistribution:
        """The flow as a Pyro distribution, for ``pyro.sample``.

        Scoring its own fresh sample reuses the sampling pass: no inverse is run (see
        ``FlowTransform``).

        Args:
            context: context of shape ``(*batch, context_dim)`` for a conditional flow, else
                ``None``.

        Returns:
            A ``TransformedDistribution`` with batch shape ``context.shape[:-1]`` (``()`` without a
            context).
        """
        batch = self._check_context(context)
        transform = self.transform.condition(context) if self.context_dim else self.transform
        return dist.TransformedDistribution(self.base_dist(batch), [transform])

    def conditional_dist(self) -> ConditionalTransformedDistribution:
        """The conditional flow as Pyro's ``ConditionalTransformedDistribution``."""
        if self.context_dim is None:
            raise ValueError("conditional_dist() needs a flow built with context_dim")
        return ConditionalTransformedDistribution(self.base_dist(), [self.transform])

    # -- checkpoints -----------------------------------------------------------------------
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Like ``nn.Module.load_state_dict``, but all or nothing.

        A mismatched ``state_dict`` (missing or unexpected keys, wrong shapes) raises ``ValueError``
        *before* anything is copied, so a failed load never leaves the flow half-loaded.

        Args:
            state_dict: parameters and buffers, as from ``state_dict()``.
            strict: require exactly this flow's keys.
            assign: assign the tensors instead of copying into the existing ones.

        Returns:
            The missing and unexpected keys (empty when ``strict``).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        own = self.state_dict()
        if strict:
            missing, unexpected = (
                sorted(set(own) - set(state_dict)),
                sorted(set(state_dict) - set(own)),
            )
            if missing or unexpected:
                raise ValueError(
                    f"state_dict does not match this flow: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        for key, value in state_dict.items():
            if key in own and (
                not isinstance(value, torch.Tensor) or value.shape != own[key].shape
            ):
                got = (
                    tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                )
                raise ValueError(
                    f"state_dict[{key!r}] has shape {got}, expected {tuple(own[key].shape)}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save(self, path: str | Path) -> None:
        """Save the flow so that ``Flow.load`` restores it exactly.

        Saves the build options and every parameter and buffer, data-dependent initialisation
        included. Only flows made by ``build_flow`` can be saved this way.

        Args:
            path: the file to write.
        """
        if "name" not in self.config:
            raise ValueError(
                "only flows made by build_flow can be saved with save(); use state_dict()"
            )
        torch.save(
            {"format": FLOW_FORMAT, "config": self.config, "state_dict": self.state_dict()}, path
        )

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = None) -> Flow:
        """Rebuild a flow saved by ``save``.

        Args:
            path: the file.
            map_location: device to load onto (default: the CPU, then left there).

        Returns:
            The flow. A corrupted or mismatched file raises ``ValueError`` (a missing one
            ``FileNotFoundError``) and returns nothing half-built.
        """
        from pyroflows.registry import build_flow

        try:
            saved = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ValueError(
                f"{path} is not a readable pyroflows checkpoint: {' '.join(str(err).split())[:200]}"
            ) from None
        if not isinstance(saved, dict) or saved.get("format") != FLOW_FORMAT:
            raise ValueError(f"{path} is not a pyroflows flow checkpoint")
        config = dict(saved["config"])
        flow = build_flow(config.pop("name"), config.pop("shape"), **config)
        flow.load_state_dict(saved["state_dict"])
        return flow.to(map_location) if map_location is not None else flow

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not None)
