"""Plots the CLI and tutorials share (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, safe in notebooks and servers

from pyroflows.flow import Flow


def density_grid(log_density, limits: tuple[float, float, float, float], resolution: int = 200, like: torch.Tensor | None = None):
    """``(X, Y, density)`` of ``exp(log_density)`` on a regular grid over ``limits``."""
    x0, x1, y0, y1 = limits
    kw = {} if like is None else dict(device=like.device, dtype=like.dtype)
    xs = torch.linspace(x0, x1, resolution, **kw)
    ys = torch.linspace(y0, y1, resolution, **kw)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    with torch.no_grad():
        dens = log_density(grid.reshape(-1, 2)).exp().reshape(resolution, resolution)
    return xs.cpu(), ys.cpu(), dens.cpu()


def _limits(data: torch.Tensor, pad: float = 0.1) -> tuple[float, float, float, float]:
    lo, hi = data.min(0).values, data.max(0).values
    span = hi - lo
    lo, hi = lo - pad * span, hi + pad * span
    return lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item()


def plot_density_fit(flow: Flow, data: torch.Tensor, path: str | Path, num_samples: int = 5000) -> Path:
    """Data | flow samples | learned density (2-D), or data vs samples on the first two
    coordinates (other vectors), or a grid of samples (images). Returns the PNG path."""
    path = Path(path)
    ref = flow.base_loc
    with torch.no_grad():
        samples = flow.sample((min(num_samples, 64) if flow.event_dim == 3 else num_samples,)).cpu()
    if flow.event_dim == 3:
        fig = Figure(figsize=(6, 6))
        axes = fig.subplots(8, 8)
        for ax, img in zip(axes.flat, samples):
            ax.imshow(img[0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        fig.suptitle("flow samples")
    else:
        data = data.cpu()
        if data.shape[1] == 1:
            data, samples = torch.cat([data, torch.zeros_like(data)], 1), torch.cat([samples, torch.zeros_like(samples)], 1)
        limits = _limits(data[:, :2])
        panels = 3 if flow.event_shape[0] == 2 else 2
        fig = Figure(figsize=(4 * panels, 4))
        axes = fig.subplots(1, panels)
        for ax, pts, title in [(axes[0], data, "data"), (axes[1], samples, "flow samples")]:
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set(xlim=limits[:2], ylim=limits[2:], title=title)
        if panels == 3:
            xs, ys, dens = density_grid(flow.log_prob, limits, like=ref)
            axes[2].pcolormesh(xs, ys, dens, shading="auto", cmap="viridis")
            axes[2].set(xlim=limits[:2], ylim=limits[2:], title="learned density")
        for ax in axes:
            ax.set_aspect("equal", adjustable="box")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
