"""Two-dimensional toy densities, generated on the fly from a seed (no files, no downloads).

The shapes follow the benchmarks of the flow literature (FFJORD, NSF): ``moons``,
``8gaussians``, ``checkerboard``, ``spirals``, ``rings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pyroflows.validation import check_choice, check_int

Generator = torch.Generator


def _moons(n: int, g: Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    t = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], -1) + 0.05 * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 2


def _eight_gaussians(n: int, g: Generator) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=g).double()
    centres = 2.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], -1)
    return (centres + 0.25 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def _checkerboard(n: int, g: Generator) -> torch.Tensor:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g)
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], -1)


def _spirals(n: int, g: Generator) -> torch.Tensor:
    t = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    pts = sign * torch.stack([-torch.cos(t) * t, torch.sin(t) * t], -1) / 3
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _rings(n: int, g: Generator) -> torch.Tensor:
    radius = 0.75 * torch.randint(1, 5, (n,), generator=g).float()
    angle = torch.rand(n, generator=g) * 2 * math.pi
    pts = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return pts + 0.08 * torch.randn(n, 2, generator=g)


TOY: dict[str, Callable[[int, Generator], torch.Tensor]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
    "rings": _rings,
}


def toy_names() -> list[str]:
    """Names accepted by ``toy``.

    Returns:
        The names.
    """
    return list(TOY)


def toy(name: str, num_samples: int, *, seed: int = 0) -> torch.Tensor:
    """``num_samples`` points of the 2-D toy density ``name`` as a float32 ``(n, 2)`` tensor.

    Args:
        name: one of ``moons``, ``8gaussians``, ``checkerboard``, ``spirals``, ``rings``.
        num_samples: number of points (positive).
        seed: the same seed always gives the same points.

    Example:
        >>> toy("moons", 1000).shape
        torch.Size([1000, 2])
    """
    check_choice(name, "name", TOY)
    check_int(num_samples, "num_samples")
    g = torch.Generator().manual_seed(int(seed))
    with torch.device("cpu"):  # the generator is a CPU one, whatever the default device
        return TOY[name](num_samples, g).float()
