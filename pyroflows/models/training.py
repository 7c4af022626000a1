"""``fit_vae``: mini-batch training of a [`VAE`][pyroflows.models.VAE] on its ELBO, a loss
closure run by the one training loop ([`train_loop`][pyroflows.infer.loop.train_loop])."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pyroflows.infer.loop import run_generator, train_loop
from pyroflows.models.vae import VAE
from pyroflows.validation import check_int


def fit_vae(
    vae: VAE,
    data: torch.Tensor,
    *,
    num_epochs: int | None = 100,
    num_steps: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    validation: torch.Tensor | None = None,
    patience: int | None = None,
    max_grad_norm: float | None = 100.0,
    schedule: str = "cosine",
    progress: bool = True,
    seed: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Maximise the mean ELBO of ``data`` with Adam on shuffled mini-batches, keeping the
    parameters with the best validation ELBO when ``validation`` is given.

    Args:
        vae: the model, trained in place.
        data: training rows ``(n, x_dim)``, moved to the VAE's device and dtype.
        num_epochs: passes over ``data`` (ignored when ``num_steps`` is given).
        num_steps: optimiser steps (the budget in steps, as for every other trainer).
        batch_size: rows per step.
        lr: peak Adam learning rate.
        validation: held-out rows, evaluated (one-sample ELBO) after every epoch.
        patience: stop after this many epochs without a better validation ELBO.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        schedule: learning-rate schedule (``"cosine"``, ``"exponential"``, ``"constant"``).
        progress: show a tqdm progress bar.
        seed: seed of the shuffling and of the reparameterisation noise (a run-owned
            generator; see [`train_loop`][pyroflows.infer.loop.train_loop]).
        checkpoint: training checkpoint file.
        resume: continue from ``checkpoint`` when it exists.
        distributed: average gradients over an initialised ``torch.distributed`` group; every
            rank passes its own shard of the data.

    Returns:
        The history of [`train_loop`][pyroflows.infer.loop.train_loop]: ``train_loss`` (negative
        mini-batch ELBO per step), ``val_loss`` (negative validation ELBO per epoch) at
        ``eval_step``, ``best_val_loss``, ``best_step``, ``lr``, ...; ``steps_per_epoch``.

    Example:
        >>> vae = VAE(64, 4, hidden_dims=(32,))
        >>> x = torch.bernoulli(torch.full((256, 64), 0.3))
        >>> history = fit_vae(vae, x, num_epochs=2, progress=False)
        >>> len(history["train_loss"])
        4
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a pyroflows.models.VAE, got {type(vae).__name__}")
    check_int(batch_size, "batch_size")
    ref = next(vae.parameters())
    data = vae._check_x(torch.as_tensor(data, device=ref.device).to(ref))
    if validation is not None:
        validation = vae._check_x(torch.as_tensor(validation, device=ref.device).to(ref))
    steps_per_epoch = math.ceil(len(data) / batch_size)
    if num_steps is None:
        if num_epochs is None:
            raise ValueError("fit_vae needs num_epochs or num_steps")
        num_steps = check_int(num_epochs, "num_epochs") * steps_per_epoch

    with run_generator(seed, vae) as g:
        order: dict[str, torch.Tensor] = {}

        def loss_fn(step: int) -> torch.Tensor:
            position = (step - 1) % steps_per_epoch
            if position == 0:  # a fresh shuffle on the CPU: reproducible on any device
                order["perm"] = torch.randperm(len(data), generator=g, device="cpu")
            rows = order["perm"][position * batch_size : (position + 1) * batch_size]
            return -vae.elbo(data[rows.to(data.device)]).mean()

        validate = None
        if validation is not None:

            def validate() -> float:
                return -vae.elbo(validation).mean().item()

        history = train_loop(
            vae,
            loss_fn,
            num_steps=num_steps,
            lr=lr,
            generator=g,
            schedule=schedule,
            final_lr=lr / 100 if schedule == "exponential" else 0.0,
            max_grad_norm=max_grad_norm,
            validate=validate,
            eval_every=steps_per_epoch,
            patience=patience,
            progress=progress,
            kind="fit_vae",
            checkpoint=checkpoint,
            resume=resume,
            distributed=distributed,
            extra_state=(lambda: dict(order), order.update),
        )
    history["steps_per_epoch"] = steps_per_epoch
    return history
