r"""Batched-chain MCMC for energy-based targets.

Every kernel is a Pyro ``MCMCKernel`` whose state is a whole batch of chains,
``(num_chains, *event_shape)``: one batched energy (and gradient) evaluation advances all of
them, with a per-chain accept/reject, so thousands of chains cost about as much as a few on a
GPU — or on a CPU, where per-call overhead dominates small energies.

| kernel | needs | use for |
|---|---|---|
| :class:`HMC` (``num_steps=1``: MALA) | $\nabla U$ | smooth continuous targets |
| :class:`SGLD` | $\nabla U$, possibly stochastic | mini-batch energies, EBM training |
| :class:`MH` | $U$ (and a flow, for the independence sampler) | gradient-free targets, flow proposals |
| :class:`Gibbs` | $U$ (and values, or conditionals) | discrete targets, RBMs |

:func:`sample` runs a kernel and returns ``arviz.InferenceData``; ``pyro.infer.MCMC`` runs the
same kernels (see :mod:`pyroflows.mcmc.base` for how chains map).
"""

from pyroflows.mcmc.base import BatchedKernel
from pyroflows.mcmc.driver import sample, summarize
from pyroflows.mcmc.gibbs import Gibbs
from pyroflows.mcmc.hmc import HMC, MALA
from pyroflows.mcmc.mh import MH
from pyroflows.mcmc.potential import ModelPotential
from pyroflows.mcmc.sgld import SGLD

__all__ = ["BatchedKernel", "Gibbs", "HMC", "MALA", "MH", "ModelPotential", "SGLD", "sample", "summarize"]
