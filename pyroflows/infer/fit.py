"""Maximum-likelihood training of a flow: ``fit``."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
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


def _checked_context(flow: Flow, context: Any, data: torch.Tensor) -> torch.Tensor | None:
    if flow.context_dim is None and context is None:
        return None
    if context is None:
        raise ValueError("context is required to fit a conditional flow")
    if flow.context_dim is None:
        raise ValueError("context given but the flow is unconditional (build it with context_dim)")
    if not isinstance(context, torch.Tensor) or tuple(context.shape) != (len(data), flow.context_dim):
        raise ValueError(f"context must have shape ({len(data)}, {flow.context_dim}), got {tuple(getattr(context, 'shape', ()))}")
    context = context.to(data)
    if not torch.isfinite(context).all():
        raise ValueError("context contains NaN or inf")
    return context


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs torch.distributed initialised first, e.g. "
            "dist.init_process_group('gloo') in each process started by torchrun"
        )
    return dist.get_rank(), dist.get_world_size()


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
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Fit ``flow`` to ``data`` by maximum likelihood with Adam on random mini-batches.

    Args:
        flow: the :class:`~pyroflows.Flow` to train (in place).
        data: ``(n, *event_shape)`` tensor or array; moved to the flow's device and dtype.
        num_steps: number of optimiser steps.
        batch_size: mini-batch size (the *global* batch when ``distributed``).
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
        checkpoint: file written at every evaluation and at the end with everything needed to
            resume (flow, optimiser, schedule, random states, history).
        resume: continue from ``checkpoint`` if it exists; with the same arguments the run
            continues exactly as if it had not been interrupted.
        distributed: train data-parallel with ``DistributedDataParallel`` over an initialised
            ``torch.distributed`` group (gloo on CPU, nccl on GPU; see the docs page). Every
            rank passes the same ``data`` and ``seed``; each step draws one global batch, every
            rank takes its equal share, and gradients are averaged, so the parameters match
            single-process training on the same global batch.

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
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    rank, world = _world() if distributed else (0, 1)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
    if distributed and seed is None:
        raise ValueError("distributed=True needs a seed (every rank must draw the same batches)")
    data = as_data(data, flow)
    context = _checked_context(flow, context, data)
    if seed is not None:
        torch.manual_seed(seed)
    # mini-batch indices come from a CPU generator of their own (seeded from torch's global RNG)
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, (), device="cpu")))

    val_data, val_context = None, None
    if isinstance(validation, torch.Tensor):
        val_data = as_data(validation, flow, "validation")
        if context is not None:
            raise ValueError("a separate validation tensor is not supported with context; pass a fraction")
    elif isinstance(validation, bool) or not (isinstance(validation, (int, float)) and 0 <= validation < 1):
        raise ValueError(f"validation must be a fraction in [0, 1) or a tensor, got {validation!r}")
    elif validation > 0:
        num_val = max(1, int(round(validation * len(data))))
        if num_val >= len(data):
            raise ValueError(f"validation={validation} leaves no training data out of {len(data)} points")
        order = torch.randperm(len(data), generator=g, device="cpu").to(data.device)
        val_data, data = data[order[:num_val]], data[order[num_val:]]
        if context is not None:
            val_context, context = context[order[:num_val]], context[order[num_val:]]

    def draw() -> torch.Tensor:
        return torch.randint(len(data), (batch_size,), generator=g, device="cpu").to(data.device)

    model: torch.nn.Module = flow
    if distributed:
        # data-dependent initialisation (ActNorm, marginal CDFs) on the first *global* batch, so
        # every rank starts identical -- exactly what a single process would see first
        state = g.get_state()
        with torch.no_grad():
            idx = draw()
            flow.log_prob(data[idx], None if context is None else context[idx])
        g.set_state(state)
        device_ids = [data.device.index] if data.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(flow, device_ids=device_ids)

    optimizer = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps) if cosine_schedule else None
    eval_every = eval_every or max(1, num_steps // 20)
    history: dict[str, Any] = dict(
        train_loss=[], val_loss=[], val_step=[], best_val_loss=math.inf, best_step=None,
        stopped_early=False, skipped_steps=0,
    )
    best_state, since_best, first_step = None, 0, 1
    if resume and Path(checkpoint).is_file():
        saved = _load_checkpoint(checkpoint, flow)
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        g.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        history, best_state, since_best = saved["history"], saved["best_state"], saved["since_best"]
        first_step = saved["step"] + 1

    def save(step: int) -> None:
        if checkpoint is not None and rank == 0:
            torch.save(dict(
                format=CHECKPOINT_FORMAT, flow=flow.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=None if scheduler is None else scheduler.state_dict(), generator=g.get_state(),
                torch_rng=torch.get_rng_state(), history=history, best_state=best_state,
                since_best=since_best, step=step,
            ), checkpoint)

    flow.train()
    bar = tqdm(range(first_step, num_steps + 1), disable=not progress or rank != 0, desc="fit", dynamic_ncols=True)
    step = first_step - 1
    for step in bar:
        idx = draw().chunk(world)[rank]
        loss = -model(data[idx], None if context is None else context[idx]).mean()
        value = loss.detach().clone()
        if distributed:  # the global mean, so every rank logs (and skips) the same
            dist.all_reduce(value)
            value /= world
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(value):
            history["skipped_steps"] += 1
            continue
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history["train_loss"].append(value.item())
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
            bar.set_postfix(loss=f"{value.item():.3f}", val=f"{val:.3f}")
            save(step)
            if patience is not None and since_best >= patience:
                history["stopped_early"] = True
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{value.item():.3f}")
    bar.close()
    save(step)
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow.eval()
    return history


CHECKPOINT_FORMAT = "pyroflows.fit/1"


def _load_checkpoint(path: str | Path, flow: Flow) -> dict[str, Any]:
    """A training checkpoint written by :func:`fit`, checked before anything is restored."""
    try:
        saved = torch.load(path, map_location=flow.base_loc.device, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"checkpoint {path} is not readable: {' '.join(str(err).split())}") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a pyroflows fit checkpoint")
    flow.load_state_dict(saved["flow"])  # validated as a whole by Flow.load_state_dict
    return saved
