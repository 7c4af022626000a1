"""Maximum-likelihood training of a flow: ``fit``, a loss closure run by the one training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyroflows.flow import Flow
from pyroflows.infer.loop import _world, run_generator, train_loop
from pyroflows.validation import check_int, check_number


def as_data(data: Any, flow: Flow, name: str = "data") -> torch.Tensor:
    """``data`` as a tensor on the flow's device and dtype, checked against its event shape."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(data).__name__}")
    if data.dtype == torch.bool or data.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {data.dtype}")
    ref = flow.base_loc
    event = tuple(flow.event_shape)
    if data.dim() != len(event) + 1 or tuple(data.shape[1:]) != event:
        raise ValueError(
            f"{name} must have shape (n, {', '.join(map(str, event))}), got {tuple(data.shape)}"
        )
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    data = data.to(device=ref.device, dtype=ref.dtype)
    if not torch.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or inf")
    return data


def _mean_nll(
    flow: Flow, data: torch.Tensor, context: torch.Tensor | None, chunk: int = 4096
) -> float:
    with torch.no_grad():
        total = 0.0
        for start in range(0, len(data), chunk):
            ctx = None if context is None else context[start : start + chunk]
            total += -flow.log_prob(data[start : start + chunk], ctx).sum().item()
    return total / len(data)


def _checked_context(flow: Flow, context: Any, data: torch.Tensor) -> torch.Tensor | None:
    if flow.context_dim is None and context is None:
        return None
    if context is None:
        raise ValueError("context is required to fit a conditional flow")
    if flow.context_dim is None:
        raise ValueError("context given but the flow is unconditional (build it with context_dim)")
    if not isinstance(context, torch.Tensor) or tuple(context.shape) != (
        len(data),
        flow.context_dim,
    ):
        raise ValueError(
            f"context must have shape ({len(data)}, {flow.context_dim}), "
            f"got {tuple(getattr(context, 'shape', ()))}"
        )
    context = context.to(data)
    if not torch.isfinite(context).all():
        raise ValueError("context contains NaN or inf")
    return context


def fit(
    flow: Flow,
    data: torch.Tensor,
    *,
    num_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    context: torch.Tensor | None = None,
    validation: float | torch.Tensor = 0.1,
    eval_every: int | None = None,
    patience: int | None = 10,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 10.0,
    schedule: str = "cosine",
    progress: bool = True,
    seed: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Fit ``flow`` to ``data`` by maximum likelihood with Adam on random mini-batches.

    Runs [`train_loop`][pyroflows.infer.loop.train_loop] (non-finite steps, checkpoints,
    distributed training and the history are described there) on the mean negative
    log-likelihood of each mini-batch.

    Args:
        flow: the [`Flow`][pyroflows.Flow] to train (in place).
        data: ``(n, *event_shape)`` tensor or array; moved to the flow's device and dtype.
        num_steps: number of optimiser steps.
        batch_size: mini-batch size (the *global* batch when ``distributed``).
        lr: peak Adam learning rate.
        context: ``(n, context_dim)`` contexts of a conditional flow, row-aligned with ``data``.
        validation: fraction of ``data`` held out for validation (0 for none), or a separate
            validation tensor.
        eval_every: steps between validation evaluations (default ``num_steps // 20``).
        patience: stop after this many evaluations without improvement (``None``: never);
            the parameters with the best validation loss are restored at the end.
        weight_decay: Adam weight decay.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        schedule: learning-rate schedule, ``"cosine"`` (to 0), ``"exponential"`` (to
            ``lr / 100``) or ``"constant"``.
        progress: show a tqdm progress bar.
        seed: seed of the run's generator (split, mini-batches, and stochastic layers).
        checkpoint: file written at every evaluation and at the end with everything needed to
            resume.
        resume: continue from ``checkpoint`` if it exists; with the same arguments the run
            continues exactly as if it had not been interrupted.
        distributed: train data-parallel over an initialised ``torch.distributed`` group (gloo
            on CPU, nccl on GPU; see the docs page). Every rank passes the same ``data`` and
            ``seed``; each step draws one global batch, every rank takes its equal share, and
            gradients are averaged, so the parameters match single-process training on the
            same global batch.

    Returns:
        The history of [`train_loop`][pyroflows.infer.loop.train_loop]: ``train_loss`` (mean
        NLL per step), ``val_loss`` at ``eval_step``, ``best_val_loss``, ``best_step``,
        ``stopped_early``, ``skipped_steps``, ``lr``.

    Example:
        ```python
        from pyroflows import build_flow
        from pyroflows.datasets import toy

        flow = build_flow("realnvp", 2)
        history = fit(flow, toy("moons", 2000), num_steps=200, progress=False)
        print(history["val_loss"][0], "->", history["best_val_loss"])
        ```
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyroflows.Flow, got {type(flow).__name__}")
    check_int(batch_size, "batch_size")
    rank, world = _world(distributed)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
    if distributed and seed is None:
        raise ValueError("distributed=True needs a seed (every rank must draw the same batches)")
    data = as_data(data, flow)
    context = _checked_context(flow, context, data)
    if isinstance(validation, torch.Tensor):
        if context is not None:
            raise ValueError(
                "a separate validation tensor is not supported with context; pass a fraction"
            )
        val_data, val_context = as_data(validation, flow, "validation"), None
    else:
        check_number(validation, "validation", low=0.0, high=1.0, high_open=True)
        val_data = val_context = None
    final_lr = lr / 100 if schedule == "exponential" else 0.0
    with run_generator(seed, flow) as g:
        if not isinstance(validation, torch.Tensor) and validation > 0:
            num_val = max(1, int(round(validation * len(data))))
            if num_val >= len(data):
                raise ValueError(
                    f"validation={validation} leaves no training data out of {len(data)} points"
                )
            order = torch.randperm(len(data), generator=g, device="cpu").to(data.device)
            val_data, data = data[order[:num_val]], data[order[num_val:]]
            if context is not None:
                val_context, context = context[order[:num_val]], context[order[num_val:]]

        def draw() -> torch.Tensor:
            return torch.randint(len(data), (batch_size,), generator=g, device="cpu").to(
                data.device
            )

        if distributed:
            # data-dependent initialisation (ActNorm, marginal CDFs) on the first *global*
            # batch, so every rank starts where a single process would
            state = g.get_state()
            with torch.no_grad():
                idx = draw()
                flow.log_prob(data[idx], None if context is None else context[idx])
            g.set_state(state)

        def loss_fn(step: int) -> torch.Tensor:
            idx = draw().chunk(world)[rank]
            return -flow(data[idx], None if context is None else context[idx]).mean()

        validate = None
        if val_data is not None:

            def validate() -> float:
                return _mean_nll(flow, val_data, val_context)

        return train_loop(
            flow,
            loss_fn,
            num_steps=num_steps,
            lr=lr,
            generator=g,
            schedule=schedule,
            final_lr=final_lr,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            validate=validate,
            eval_every=eval_every,
            patience=patience,
            progress=progress,
            kind="fit",
            checkpoint=checkpoint,
            resume=resume,
            distributed=distributed,
        )
