r"""Batched-chain MCMC for energy-based targets and Pyro models.

Every kernel is a Pyro ``MCMCKernel`` whose state is a whole batch of chains,
``(num_chains, *event_shape)``: one batched energy (and gradient) evaluation advances all of
them, with a per-chain accept/reject, so thousands of chains cost about as much as a few on a
GPU — or on a CPU, where per-call overhead dominates small energies.

| kernel | needs | use for |
|---|---|---|
| `HMC` (``num_steps=1``: MALA) | $\nabla U$ | smooth continuous targets |
| `SGLD` | $\nabla U$, possibly stochastic | mini-batch energies, EBM training |
| `MH` | $U$ (and a flow, for an independence sampler) | gradient-free targets, flows |
| `Gibbs` | $U$ (and values, or conditionals) | discrete targets, RBMs |

[`sample`][pyroflows.mcmc.sample] runs a kernel on an energy, or on a Pyro model given as
``HMC(model=fn)``, and returns ``arviz.InferenceData``; ``pyro.infer.MCMC`` runs the same kernels
(see `pyroflows.mcmc.base` for how chains map). Under the kernel classes is a pure core of
explicit states and transitions (`pyroflows.mcmc.core`, `pyroflows.mcmc.adapt`).
"""

from pyroflows.mcmc.base import BatchedKernel, RunState
from pyroflows.mcmc.driver import sample, summarize
from pyroflows.mcmc.gibbs import Gibbs
from pyroflows.mcmc.hmc import HMC, MALA
from pyroflows.mcmc.mh import MH
from pyroflows.mcmc.neutra import neutra
from pyroflows.mcmc.potential import ModelPotential
from pyroflows.mcmc.sgld import SGLD

__all__ = [
    "BatchedKernel",
    "RunState",
    "Gibbs",
    "HMC",
    "MALA",
    "MH",
    "ModelPotential",
    "SGLD",
    "sample",
    "neutra",
    "summarize",
]
