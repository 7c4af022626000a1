"""Lossless compression with latent-variable models: bits-back ANS coding
([`BitsBackCodec`][pyroflows.compress.BitsBackCodec]) with a trained VAE, the discrete
likelihoods it codes with, and the generic compressors it is measured against
([`baseline_sizes`][pyroflows.compress.baseline_sizes], [`evaluate`][pyroflows.compress.evaluate]).

Needs the ``compress`` extra (``constriction``; ``zstandard`` for that baseline).
"""

from pyroflows.compress.baselines import baseline_sizes
from pyroflows.compress.codec import BitsBackCodec
from pyroflows.compress.likelihood import DiscreteLikelihood, dequantize
from pyroflows.compress.report import evaluate

__all__ = ["BitsBackCodec", "DiscreteLikelihood", "baseline_sizes", "dequantize", "evaluate"]
