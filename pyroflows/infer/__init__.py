"""Training and evaluation: maximum likelihood (``fit``), distillation, the one training loop
they (and ``fit_guide``, ``fit_vae``) run on, importance sampling and dequantization."""

from pyroflows.infer.dequantization import (
    DequantizedFlow,
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
)
from pyroflows.infer.distill import distill, kl_estimate
from pyroflows.infer.distributed import sync_gradients
from pyroflows.infer.fit import fit
from pyroflows.infer.importance import log_importance_weights, log_mean_exp, reverse_kl
from pyroflows.infer.loop import TrainingDiverged, train_loop

__all__ = [
    "DequantizedFlow",
    "TrainingDiverged",
    "UniformDequantizer",
    "VariationalDequantizer",
    "bits_per_dim",
    "distill",
    "fit",
    "kl_estimate",
    "log_importance_weights",
    "log_mean_exp",
    "reverse_kl",
    "sync_gradients",
    "train_loop",
]
