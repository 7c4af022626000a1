"""Maximum-likelihood training of a flow: ``fit``."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pyroflows.flow import Flow


def _positive(value: Any, name: str, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


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
        raise ValueError(f"{name} must have shape (n, {', '.join(map(str, event))}), got {tuple(data.shape)}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    data = data.to(device=ref.device, dtype=ref.dtype)
    if not torch.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or inf")
    return data


def _mean_nll(flow: Flow, data: torch.Tensor, context: torch.Tensor | None, chunk: int = 4096) -> float:
    with torch.no_grad():
        total = 0.0
        for start in range(0, len(data), chunk):
            ctx = None if context is None else context[start : start + chunk]
            total += -flow.log_prob(data[start : start + chunk], ctx).sum().item()
    return total / len(data)


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
    cosine_schedule: bool = True,
    progress: bool = True,
    seed: int | None = None,
) -> dict[str, Any]:
    """Fit ``flow`` to ``data`` by maximum likelihood with Adam on random mini-batches.

    Args:
        flow: the :class:`~pyroflows.Flow` to train (in place).
        data: ``(n, *event_shape)`` tensor or array; moved to the flow's device and dtype.
        num_steps: number of optimiser steps.
        batch_size: mini-batch size.
        lr: Adam learning rate (annealed to 0 by a cosine schedule unless ``cosine_schedule``
            is false).
        context: ``(n, context_dim)`` contexts of a conditional flow, row-aligned with ``data``.
        validation: fraction of ``data`` held out for validation (0 for none), or a separate
            validation tensor.
        eval_every: steps between validation evaluations (default ``num_steps // 20``).
        patience: stop after this many evaluations without improvement (``None``: never);
            the parameters with the best validation loss are restored at the end.
        weight_decay: Adam weight decay.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        cosine_schedule: anneal the learning rate with a cosine schedule.
        progress: show a tqdm progress bar.
        seed: seed of the split, the mini-batches and torch's global RNG.

    Returns:
        The history: ``train_loss`` (mean NLL per step), ``val_loss`` and ``val_step`` (at each
        evaluation), ``best_val_loss``, ``best_step``, ``stopped_early``, ``skipped_steps``
        (steps whose loss was not finite and were not taken).

    Example:
        >>> from pyroflows import build_flow
        >>> from pyroflows.datasets import toy
        >>> flow = build_flow("realnvp", 2)
        >>> history = fit(flow, toy("moons", 2000), num_steps=200, progress=False)
        >>> history["val_loss"][-1] < history["val_loss"][0]
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyroflows.Flow, got {type(flow).__name__}")
    _positive(num_steps, "num_steps")
    _positive(batch_size, "batch_size")
    _positive(lr, "lr", float)
    if eval_every is not None:
        _positive(eval_every, "eval_every")
    if patience is not None:
        _positive(patience, "patience")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    data = as_data(data, flow)
    if flow.context_dim is not None or context is not None:
        if context is None:
            raise ValueError("context is required to fit a conditional flow")
        if not isinstance(context, torch.Tensor) or context.shape != (len(data), flow.context_dim or -1):
            raise ValueError(f"context must have shape ({len(data)}, {flow.context_dim}), got {getattr(context, 'shape', None)}")
        context = context.to(data)
    if seed is not None:
        torch.manual_seed(seed)
    # mini-batch indices come from a CPU generator of their own (seeded from torch's global RNG)
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, (), device="cpu")))

    val_data, val_context = None, None
    if isinstance(validation, torch.Tensor):
        val_data = as_data(validation, flow, "validation")
        if context is not None:
            raise ValueError("a separate validation tensor is not supported with context; pass a fraction")
    elif not (isinstance(validation, (int, float)) and 0 <= validation < 1):
        raise ValueError(f"validation must be a fraction in [0, 1) or a tensor, got {validation!r}")
    elif validation > 0:
        num_val = max(1, int(round(validation * len(data))))
        if num_val >= len(data):
            raise ValueError(f"validation={validation} leaves no training data out of {len(data)} points")
        order = torch.randperm(len(data), generator=g, device="cpu").to(data.device)
        val_data, data = data[order[:num_val]], data[order[num_val:]]
        if context is not None:
            val_context, context = context[order[:num_val]], context[order[num_val:]]

    optimizer = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps) if cosine_schedule else None
    eval_every = eval_every or max(1, num_steps // 20)
    history: dict[str, Any] = dict(
        train_loss=[], val_loss=[], val_step=[], best_val_loss=math.inf, best_step=None,
        stopped_early=False, skipped_steps=0,
    )
    best_state, since_best = None, 0
    flow.train()
    bar = tqdm(range(1, num_steps + 1), disable=not progress, desc="fit", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g, device="cpu").to(data.device)
        loss = -flow.log_prob(data[idx], None if context is None else context[idx]).mean()
        if not torch.isfinite(loss):
            history["skipped_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history["train_loss"].append(loss.item())
        if val_data is not None and (step % eval_every == 0 or step == num_steps):
            flow.eval()
            val = _mean_nll(flow, val_data, val_context)
            flow.train()
            history["val_loss"].append(val)
            history["val_step"].append(step)
            if val < history["best_val_loss"]:
                history["best_val_loss"], history["best_step"], since_best = val, step, 0
                best_state = copy.deepcopy(flow.state_dict())
            else:
                since_best += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
            if patience is not None and since_best >= patience:
                history["stopped_early"] = True
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow.eval()
    return history
