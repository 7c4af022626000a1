"""Lossless compression of the digits test split by bits-back ANS with VAEs, against the ELBO,
the importance-sampled log-likelihood and generic compressors (quality, not speed).

    python benchmarks/compress.py [--levels 2 17] [--posteriors gaussian iaf] [--steps 6000]
        [--importance-samples 1000] [--json out.json]

Every VAE is trained by `pyroflows.commands.compress.train_digits_vae` (the model of
`pyroflows compress`) with the same budget and seed; `pyroflows.compress.evaluate` writes the
message to a file, reads it back, decodes and verifies it, and measures the file against
gzip, bz2, lzma, zstandard (bit-packed images) and PNG (one tiled picture). All numbers are bits
per pixel over the 359 test digits; "amortised" leaves out the initial bits and the header;
"s.e." is the spread of the amortised rate around -ELBO that random latent draws alone cause.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pyroflows.commands.compress import LEVELS, POSTERIORS, train_digits_vae
from pyroflows.compress import BitsBackCodec, evaluate
from pyroflows.datasets import digits

COLUMNS = [("amortised", "amortised_bits_per_dim"), ("file", "bits_per_dim"),
           ("-ELBO", "elbo_bits_per_dim"), ("-log p", "nll_bits_per_dim"),
           ("gzip", "gzip_bits_per_dim"), ("bz2", "bz2_bits_per_dim"),
           ("lzma", "lzma_bits_per_dim"), ("zstd", "zstd_bits_per_dim"),
           ("PNG", "png_bits_per_dim")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), choices=POSTERIORS)
    parser.add_argument("--steps", type=int, default=6000, help="training steps per VAE")
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--importance-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ["levels", "posterior"] + [name for name, _ in COLUMNS]
    header += ["overhead", "overhead / s.e.", "round trip"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for levels in args.levels:
            _, test = digits(binarize=levels == 2)
            for posterior in args.posteriors:
                vae = train_digits_vae(posterior, levels, num_steps=args.steps, z_dim=args.z_dim,
                                       seed=args.seed, progress=False)
                codec = BitsBackCodec(vae, num_levels=None if levels == 2 else levels)
                torch.manual_seed(args.seed + 1)
                row = evaluate(codec, test, path=Path(tmp) / "message.bbans",
                               importance_samples=args.importance_samples)
                row.update(levels=levels, posterior=posterior, steps=args.steps, path=None)
                rows.append(row)
                cells = [str(levels), posterior]
                cells += [f"{row.get(key, float('nan')):.4f}" for _, key in COLUMNS]
                excess = row["amortised_bits_per_dim"] - row["elbo_bits_per_dim"]
                cells += [f"{100 * row['overhead']:+.2f}%",
                          f"{excess / row['sampling_se_bits_per_dim']:+.1f}",
                          "bit-exact" if row["roundtrip_ok"] else "FAILED"]
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
