"""Flow guides for variational inference: :class:`AutoFlow` (an SVI autoguide), the
:class:`FlowPosterior` distribution that amortised (conditional) flow guides such as
:class:`pyroflows.models.VAE` share, and :func:`fit_guide`, an SVI loop for any guide."""

from pyroflows.guides.autoflow import AutoFlow
from pyroflows.guides.fit import fit_guide
from pyroflows.guides.posterior import FlowPosterior

__all__ = ["AutoFlow", "FlowPosterior", "fit_guide"]
