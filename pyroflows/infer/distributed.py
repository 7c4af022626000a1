"""Data-parallel training for code that does not call a module's ``forward`` (Pyro's ``SVI``,
[`fit_vae`][pyroflows.models.fit_vae], hand-written loops): ``sync_gradients``.

[`fit`][pyroflows.infer.fit.fit] wraps a flow in ``DistributedDataParallel`` itself
(``fit(..., distributed=True)``). DDP averages gradients only for computations that go through
the wrapper's ``forward``; ``SVI.step`` calls the model and the guide directly, so for guides and
VAEs the gradients are averaged by hooks on the parameters instead, as backward produces them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle


def sync_gradients(module: nn.Module) -> list[RemovableHandle]:
    """Make ``module`` train data-parallel: broadcast rank 0's parameters and buffers to every
    rank, then average each parameter's gradient over the process group during backward.

    Call it once every parameter exists (for an autoguide: after calling the guide once) and
    before training; every rank must then run the same number of backward passes, each touching
    the same parameters. Remove the hooks with ``[h.remove() for h in handles]``.

    Args:
        module: a flow, an [`AutoFlow`][pyroflows.guides.AutoFlow] guide, a
            [`VAE`][pyroflows.models.VAE] or any ``nn.Module``.

    Returns:
        The gradient hooks' handles.

    Example:
        ```python
        dist.init_process_group("gloo")            # in each process started by torchrun
        vae = VAE(64, 8, posterior="iaf")
        sync_gradients(vae)
        fit_vae(vae, my_shard_of_the_data, seed=0)  # every rank: its own shard
        ```
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "sync_gradients needs torch.distributed initialised first (dist.init_process_group)")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    world = dist.get_world_size()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    return [p.register_hook(average) for p in module.parameters() if p.requires_grad]
