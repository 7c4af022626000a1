"""Training and evaluation: maximum likelihood (``fit``) and friends."""

from pyroflows.infer.fit import fit

__all__ = ["fit"]
