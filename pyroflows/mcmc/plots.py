"""Plots of MCMC runs (matplotlib ``Figure``, no pyplot: safe in scripts, servers and notebooks)."""

from __future__ import annotations

from pathlib import Path

import arviz as az
import numpy as np
import torch
from matplotlib.figure import Figure


def plot_chains(
    idata: az.InferenceData,
    path: str | Path,
    energy=None,
    max_points: int = 20_000,
    num_traces: int = 4,
    title: str | None = None,
) -> Path:
    """Samples (over the target's density contours when ``energy`` is given and the event is 2-D)
    and traces of the first coordinate of a few chains, under ``title`` (e.g. the target and
    kernel). Returns the PNG path."""
    x = idata.posterior["x"].values
    chains, draws = x.shape[:2]
    flat = x.reshape(chains * draws, -1)
    points = flat[np.random.default_rng(0).permutation(len(flat))[:max_points]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, trace = fig.subplots(1, 2, width_ratios=[1, 1.4])
    if points.shape[1] >= 2:
        lo, hi = np.quantile(points[:, :2], [0.002, 0.998], axis=0)
        pad = 0.1 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        if energy is not None and points.shape[1] == 2:
            xs, ys = (
                torch.linspace(float(lo[i]), float(hi[i]), 200, dtype=torch.float64, device="cpu")
                for i in range(2)
            )
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
            with torch.no_grad():
                dens = torch.exp(-energy(grid.to(torch.float32)).double())
            ax.contour(
                xs.numpy(), ys.numpy(), dens.numpy(), levels=8, cmap="viridis", linewidths=0.8
            )
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.15, color="C3", rasterized=True)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="$x_1$", ylabel="$x_2$")
    else:
        ax.hist(points[:, 0], bins=100, density=True, color="C3", alpha=0.6)
        ax.set(xlabel="$x$", ylabel="density")
    ax.set_title(f"{chains} chains x {draws} draws")
    for c in range(min(num_traces, chains)):
        trace.plot(x[(c, slice(None)) + (0,) * (x.ndim - 2)], lw=0.6)
    trace.set(xlabel="draw", ylabel="first coordinate", title="traces")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
