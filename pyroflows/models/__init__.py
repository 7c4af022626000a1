"""Models with flow-based inference: a [`VAE`][pyroflows.models.VAE] whose posterior is a Gaussian
or a flow, and [`fit_vae`][pyroflows.models.fit_vae] to train it on mini-batches."""

from pyroflows.models.training import fit_vae
from pyroflows.models.vae import VAE

__all__ = ["VAE", "fit_vae"]
