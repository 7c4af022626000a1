"""Training and evaluation: maximum likelihood (``fit``) and friends."""

from pyroflows.infer.distill import distill, kl_estimate
from pyroflows.infer.fit import fit

__all__ = ["distill", "fit", "kl_estimate"]
