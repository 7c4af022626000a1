"""Training and evaluation: maximum likelihood (``fit``) and friends."""

from pyroflows.infer.dequantization import (
    DequantizedFlow,
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
)
from pyroflows.infer.distill import distill, kl_estimate
from pyroflows.infer.fit import fit

__all__ = [
    "DequantizedFlow", "UniformDequantizer", "VariationalDequantizer", "bits_per_dim",
    "distill", "fit", "kl_estimate",
]
