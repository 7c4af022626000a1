"""Models with flow-based inference: a :class:`VAE` whose posterior is a Gaussian or a flow,
and :func:`fit_vae` to train it on mini-batches."""

from pyroflows.models.training import fit_vae
from pyroflows.models.vae import VAE

__all__ = ["VAE", "fit_vae"]
