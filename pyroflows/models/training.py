"""``fit_vae``: mini-batch training of a :class:`~pyroflows.models.VAE` on its ELBO."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from pyroflows.models.vae import VAE
from pyroflows.registry import _positive_int


def fit_vae(
    vae: VAE,
    data: torch.Tensor,
    *,
    num_epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    validation: torch.Tensor | None = None,
    max_grad_norm: float | None = 100.0,
    progress: bool = True,
    seed: int | None = None,
) -> dict[str, Any]:
    """Maximise the mean ELBO of ``data`` with Adam on shuffled mini-batches (cosine-annealed
    learning rate), keeping the parameters with the best validation ELBO when ``validation`` is
    given.

    Args:
        vae: the model, trained in place.
        data: training rows ``(n, x_dim)``, moved to the VAE's device and dtype.
        num_epochs: passes over ``data``.
        batch_size: rows per step.
        lr: initial Adam learning rate.
        validation: held-out rows, evaluated (one-sample ELBO) after every epoch.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        progress: show a tqdm progress bar over epochs.
        seed: seed of the shuffling and of torch's global RNG.

    Returns:
        The history: ``train_elbo`` (mean per epoch), ``val_elbo`` (per epoch, with
        ``validation``), ``best_epoch``.

    Example:
        >>> vae = VAE(64, 4, hidden_dims=(32,))
        >>> x = torch.bernoulli(torch.full((256, 64), 0.3))
        >>> history = fit_vae(vae, x, num_epochs=2, progress=False)
        >>> len(history["train_elbo"])
        2
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a pyroflows.models.VAE, got {type(vae).__name__}")
    _positive_int(num_epochs, "num_epochs")
    _positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    ref = next(vae.parameters())
    data = vae._check_x(torch.as_tensor(data, device=ref.device).to(ref))
    if validation is not None:
        validation = vae._check_x(torch.as_tensor(validation, device=ref.device).to(ref))
    if seed is not None:
        torch.manual_seed(seed)
    g = torch.Generator(device="cpu")  # the shuffling stays on the CPU: reproducible on any device
    g.manual_seed(seed) if seed is not None else g.seed()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_epochs * steps_per_epoch)
    history: dict[str, Any] = dict(train_elbo=[], val_elbo=[], best_epoch=None)
    best, best_state = -math.inf, None
    bar = tqdm(range(num_epochs), disable=not progress, desc="vae", dynamic_ncols=True)
    for epoch in bar:
        vae.train()
        total = 0.0
        for idx in torch.randperm(len(data), generator=g, device="cpu").to(data.device).split(batch_size):
            loss = -vae.elbo(data[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            total -= loss.item() * len(idx)
        history["train_elbo"].append(total / len(data))
        postfix = {"elbo": f"{history['train_elbo'][-1]:.2f}"}
        if validation is not None:
            vae.eval()
            with torch.no_grad():
                val = vae.elbo(validation).mean().item()
            history["val_elbo"].append(val)
            postfix["val"] = f"{val:.2f}"
            if val > best:
                best, best_state, history["best_epoch"] = val, copy.deepcopy(vae.state_dict()), epoch
        bar.set_postfix(postfix)
    bar.close()
    if best_state is not None:
        vae.load_state_dict(best_state)
    vae.eval()
    return history
