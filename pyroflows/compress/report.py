"""One measured comparison: a [`BitsBackCodec`][pyroflows.compress.BitsBackCodec] message
written to disk, read back, decoded and verified, its size against the model's bounds and the
generic compressors of [`baseline_sizes`][pyroflows.compress.baseline_sizes]."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pyroflows.compress.baselines import baseline_sizes
from pyroflows.compress.codec import BitsBackCodec


def evaluate(
    codec: BitsBackCodec,
    x: torch.Tensor,
    *,
    path: str | Path | None = None,
    num_samples: int = 100,
    importance_samples: int | None = None,
) -> dict[str, Any]:
    """Compress ``x``, write and re-read the message, decompress, verify, and compare sizes.

    Args:
        codec: the codec.
        x: ``(n, *shape)`` integer-level images.
        path: file to write the message to (``None``: kept in memory).
        num_samples: posterior draws per image for the ELBO.
        importance_samples: draws per image for the importance-sampled $-\\log_2 P(x)$
            (``None``: skipped).

    Returns:
        The keys of [`BitsBackCodec.rate`][pyroflows.compress.BitsBackCodec.rate], plus
        ``"roundtrip_ok"`` (decoded images equal to ``x``, bit for bit), ``"<name>_bits_per_dim"``
        for every baseline (raw, gzip, bz2, lzma, zstd, png), ``"encode_seconds"`` and
        ``"decode_seconds"`` (wall clock, for orientation only), and ``"path"``.
    """
    start = time.perf_counter()
    message = codec.encode(x)
    encode_seconds = time.perf_counter() - start
    if path is not None:
        Path(path).write_bytes(message)
        message = Path(path).read_bytes()
    start = time.perf_counter()
    decoded = codec.decode(message, len(x))
    decode_seconds = time.perf_counter() - start
    ok = decoded.shape == x.shape and torch.equal(decoded.cpu(), x.detach().cpu().to(decoded))
    out = codec.rate(x, message=message, num_samples=num_samples,
                     importance_samples=importance_samples)
    out["roundtrip_ok"] = bool(ok)
    for name, bits in baseline_sizes(x, codec.num_levels).items():
        out[f"{name}_bits_per_dim"] = bits
    out.update(encode_seconds=encode_seconds, decode_seconds=decode_seconds,
               path=None if path is None else str(path))
    return out
