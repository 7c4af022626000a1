"""Plots the CLI and tutorials share (matplotlib, no display needed).

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, no pyplot), so
no global backend is selected and nothing leaks between calls in notebooks or servers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pyroflows._optional import require
from pyroflows.flow import Flow

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def density_grid(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    limits: tuple[float, float, float, float],
    resolution: int = 200,
    like: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """$e^{\\log p}$ on a regular 2-D grid, for ``pcolormesh``.

    Args:
        log_density: batched log-density over points of shape ``(N, 2)``.
        limits: ``(x_lo, x_hi, y_lo, y_hi)``.
        resolution: grid points per axis.
        like: a tensor whose device and dtype the grid takes (default: CPU, float32).

    Returns:
        ``(xs, ys, density)`` on the CPU, the density of shape ``(resolution, resolution)``
        indexed ``[y, x]``.
    """
    x0, x1, y0, y1 = limits
    kw = dict(device="cpu") if like is None else dict(device=like.device, dtype=like.dtype)
    xs = torch.linspace(x0, x1, resolution, **kw)
    ys = torch.linspace(y0, y1, resolution, **kw)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    with torch.no_grad():
        dens = log_density(grid.reshape(-1, 2)).exp().reshape(resolution, resolution)
    return xs.cpu(), ys.cpu(), dens.cpu()


def _limits(data: torch.Tensor, pad: float = 0.1) -> tuple[float, float, float, float]:
    # robust to a few outliers: 0.5% and 99.5% quantiles, padded
    lo, hi = data.quantile(0.005, dim=0), data.quantile(0.995, dim=0)
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item()


def plot_density_fit(
    flow: Flow,
    data: torch.Tensor,
    path: str | Path,
    num_samples: int = 5000,
    title: str | None = None,
) -> Path:
    """Write [`density_fit_figure`][pyroflows.plotting.density_fit_figure] to a PNG file.

    Args:
        flow: the trained flow.
        data: held-out points (CPU), shape ``(N, *flow.event_shape)``.
        path: PNG file to write.
        num_samples: flow samples to draw (64 for images).
        title: figure title, e.g. the flow, the data and the held-out NLL.

    Returns:
        ``path``.
    """
    path = Path(path)
    density_fit_figure(flow, data, num_samples, title).savefig(path, dpi=110)
    return path


def density_fit_figure(
    flow: Flow, data: torch.Tensor, num_samples: int = 5000, title: str | None = None
) -> Figure:
    """The data beside the flow's samples, and for 2-D data the learned density.

    2-D data: data | samples | density (with a colour bar), panels shaped to the data's aspect
    ratio so no empty bands appear. 1-D data: histograms of data and samples with the learned
    density on top. Other vectors: the first two coordinates of data and samples. Images: an
    8 x 8 grid of samples.

    Args:
        flow: the trained flow.
        data: held-out points (CPU), shape ``(N, *flow.event_shape)``.
        num_samples: flow samples to draw (64 for images).
        title: figure title, e.g. the flow, the data and the held-out NLL.

    Returns:
        the figure.
    """
    Figure = require("matplotlib.figure").Figure  # noqa: N806 - the plot extra, on first use
    image = flow.event_dim == 3
    with torch.no_grad():
        samples = flow.sample((64 if image else num_samples,)).cpu()
    if image:
        fig = Figure(figsize=(6, 6.4), layout="constrained")
        for ax, img in zip(fig.subplots(8, 8).flat, samples, strict=False):
            ax.imshow(img[0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        fig.suptitle(title or "flow samples")
    elif flow.event_shape[0] == 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        data = data.cpu()[:, 0]
        lo, hi = data.quantile(0.005).item(), data.quantile(0.995).item()
        lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
        bins = torch.linspace(lo, hi, 60, device="cpu").numpy()
        ax.hist(data.numpy(), bins=bins, density=True, alpha=0.5, label="data")
        ax.hist(samples[:, 0].numpy(), bins=bins, density=True, alpha=0.5, label="flow samples")
        xs = torch.linspace(lo, hi, 400, device=flow.base_loc.device, dtype=flow.base_loc.dtype)
        with torch.no_grad():
            dens = flow.log_prob(xs[:, None]).exp().cpu()
        ax.plot(xs.cpu().numpy(), dens.numpy(), color="k", lw=1.2, label="learned density")
        ax.set(xlabel="$x$", ylabel="density", xlim=(lo, hi))
        ax.legend()
        fig.suptitle(title or "")
    else:
        data = data.cpu()
        limits = _limits(data[:, :2])
        density = flow.event_shape[0] == 2
        panels = 3 if density else 2
        # panel height follows the data's aspect ratio (equal axes, no empty bands)
        aspect = (limits[3] - limits[2]) / (limits[1] - limits[0])
        width = 3.6
        height = min(max(width * aspect, 1.6), 2 * width)
        fig = Figure(
            figsize=(width * panels + (0.8 if density else 0), height + 0.9), layout="constrained"
        )
        axes = fig.subplots(1, panels)
        suffix = "" if density else " (first two coordinates)"
        for ax, pts, name in [(axes[0], data, "held-out data"), (axes[1], samples, "flow samples")]:
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, rasterized=True)
            ax.set_title(name + suffix, fontsize=10)
        if density:
            xs, ys, dens = density_grid(flow.log_prob, limits, like=flow.base_loc)
            mesh = axes[2].pcolormesh(xs, ys, dens, shading="auto", cmap="viridis", rasterized=True)
            fig.colorbar(mesh, ax=axes[2], label="density", shrink=0.9)
            axes[2].set_title("learned density", fontsize=10)
        for ax in axes:
            ax.set(xlim=limits[:2], ylim=limits[2:], xlabel="$x_1$", ylabel="$x_2$")
            ax.set_aspect("equal", adjustable="box")
        if title:
            fig.suptitle(title)
    return fig
