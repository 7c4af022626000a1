"""Flow guides for variational inference: [`AutoFlow`][pyroflows.guides.AutoFlow] (an SVI
autoguide), the [`FlowPosterior`][pyroflows.guides.FlowPosterior] distribution that amortised
(conditional) flow guides such as [`VAE`][pyroflows.models.VAE] share, and
[`fit_guide`][pyroflows.guides.fit_guide], an SVI loop for any guide."""

from pyroflows.guides.autoflow import AutoFlow
from pyroflows.guides.fit import fit_guide
from pyroflows.guides.posterior import FlowPosterior

__all__ = ["AutoFlow", "FlowPosterior", "fit_guide"]
