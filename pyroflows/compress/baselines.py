"""Generic lossless compressors on the same images, as baselines for bits-back coding.

Binary images are bit-packed (8 pixels a byte) before the byte-oriented compressors see them,
other images stored one byte a pixel; PNG gets all images tiled into one grey-level picture
(1-bit for binary data), which spares it the per-file overhead that would dominate 8x8 images.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math

import numpy as np
import torch

from pyroflows.validation import check_int, check_tensor


def _png(images: np.ndarray, num_levels: int) -> bytes:
    from PIL import Image

    n, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    if num_levels == 2:
        picture = Image.fromarray(canvas.astype(bool))
    else:
        picture = Image.fromarray(canvas, mode="L")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def baseline_sizes(x: torch.Tensor, num_levels: int) -> dict[str, float]:
    """Bits per pixel of gzip, bz2, lzma, zstandard and PNG on integer-level images.

    Args:
        x: ``(n, H, W)``, ``(n, 1, H, W)`` or ``(n, D)`` integer levels in ``0..num_levels-1``
            (a flat row is treated as a ``1 x D`` image by PNG).
        num_levels: pixel levels (at most 256).

    Returns:
        ``{"raw": ..., "gzip": ..., "bz2": ..., "lzma": ..., "zstd": ..., "png": ...}`` in bits per
        pixel (``"raw"``: the packed input itself; ``"zstd"`` only when ``zstandard`` is
        installed, ``"png"`` when Pillow is), each with its maximum compression level.
    """
    check_tensor(x, "x", floating=False)
    num_levels = check_int(num_levels, "num_levels", minimum=2, maximum=256)
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    images = x.detach().cpu().reshape(len(x), -1 if x.dim() == 2 else x.shape[1], x.shape[-1])
    images = images.to(torch.int64).numpy()
    if images.min() < 0 or images.max() >= num_levels:
        raise ValueError(f"x must hold integer levels 0..{num_levels - 1}")
    images = images.astype(np.uint8)
    raw = np.packbits(images.ravel()).tobytes() if num_levels == 2 else images.tobytes()
    sizes = dict(
        raw=len(raw),
        gzip=len(gzip.compress(raw, compresslevel=9, mtime=0)),
        bz2=len(bz2.compress(raw, compresslevel=9)),
        lzma=len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    )
    try:
        import zstandard
    except ImportError:
        pass
    else:
        sizes["zstd"] = len(zstandard.ZstdCompressor(level=22).compress(raw))
    try:
        sizes["png"] = len(_png(images, num_levels))
    except ImportError:  # Pillow comes with matplotlib (the "plot" extra)
        pass
    return {name: 8 * size / images.size for name, size in sizes.items()}
