r"""``pyroflows compress``: lossless compression of the digits test split by bits-back coding.

Trains a [`VAE`][pyroflows.models.VAE] on the training split (or loads one saved by an earlier
run, ``--load``), compresses the test split with
[`BitsBackCodec`][pyroflows.compress.BitsBackCodec] into a file under ``--out``, reads it back,
decompresses and verifies it bit for bit, and prints the real bits per pixel next to the
model's $-$ELBO, the importance-sampled $-\log_2 P(x)$ and gzip, bz2, lzma, zstandard and PNG
on the same images (or, with ``--json``, one line with ``bits_per_dim``, ``elbo_bits_per_dim``,
``gzip_bits_per_dim``, ``lzma_bits_per_dim``, ``roundtrip_ok`` and the rest).

``--levels 2`` codes binarised digits with a Bernoulli decoder, ``--levels 17`` the grey levels
with a discretised Gaussian (the VAE trained on dequantised data). The benchmark
``benchmarks/compress.py`` and the compression tutorial reuse `train_digits_vae`.

Example:
    pyroflows compress
    pyroflows compress --posterior iaf --json
    pyroflows compress --levels 17 --steps 3000
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from pyroflows.cli import (
    CommandError,
    add_common_arguments,
    configure_threads,
    int_flag,
    output_dir,
    output_files,
    resolve_device,
)
from pyroflows.models import VAE
from pyroflows.validation import check_choice, check_int

POSTERIORS = ("gaussian", "iaf")
LEVELS = (2, 17)
BATCH = 128
DEQUANTIZATION_COPIES = 4  # noise draws per grey-level training image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows compress``.

    Args:
        parser: the subcommand's parser.
    """
    add_common_arguments(parser)
    parser.add_argument("--posterior", default="gaussian", choices=POSTERIORS,
                        help="VAE posterior: gaussian, or iaf (a flow) (default: gaussian)")
    parser.add_argument("--levels", type=int, default=2, choices=LEVELS,
                        help="2: binarised digits (Bernoulli); 17: grey levels (discretised "
                             "Gaussian) (default: 2)")
    parser.add_argument("--steps", type=int_flag(1), default=1500,
                        help="training optimiser steps, rounded to whole epochs (default: 1500)")
    parser.add_argument("--z-dim", type=int_flag(1), default=8,
                        help="latent width (default: 8)")
    parser.add_argument("--latent-precision", type=int_flag(1), default=12,
                        help="bits per latent coordinate: 2**p buckets (default: 12)")
    parser.add_argument("--importance-samples", type=int_flag(0), default=200,
                        help="draws per image for -log2 p(x); 0 skips it (default: 200)")
    parser.add_argument("--load", default=None,
                        help="a VAE saved by an earlier run (vae-*.pt) instead of training")


def train_digits_vae(
    posterior: str = "gaussian",
    num_levels: int = 2,
    *,
    num_steps: int = 1500,
    z_dim: int = 8,
    hidden_dims: tuple[int, ...] = (128, 128),
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> VAE:
    """A VAE trained on the digits training split, ready for
    [`BitsBackCodec`][pyroflows.compress.BitsBackCodec].

    The flow posterior is 2 IAF layers sharing one ordering (the triangular flow the codec
    needs). Grey levels are modelled by a Normal decoder trained on dequantised copies of the
    images ([`dequantize`][pyroflows.compress.dequantize]). A tenth of the
    training split is held out: [`fit_vae`][pyroflows.models.fit_vae] keeps the parameters with
    its best ELBO.

    Args:
        posterior: ``"gaussian"`` or ``"iaf"``.
        num_levels: 2 (binarised, Bernoulli) or 17 (grey levels, discretised Gaussian).
        num_steps: optimiser steps (rounded to whole epochs, at least one).
        z_dim: latent width.
        hidden_dims: encoder widths (the decoder mirrors them).
        seed: seed of the initialisation, the dequantisation noise and the shuffling.
        device: where to train.
        progress: show a progress bar.

    Returns:
        The trained VAE in eval mode.
    """
    from pyroflows.compress import dequantize
    from pyroflows.datasets import digits
    from pyroflows.models import fit_vae

    check_choice(posterior, "posterior", POSTERIORS)
    check_choice(num_levels, "num_levels", LEVELS)
    num_steps = check_int(num_steps, "num_steps")
    z_dim = check_int(z_dim, "z_dim")
    train, _ = digits(binarize=num_levels == 2)
    train = train.reshape(len(train), -1)
    num_val = len(train) // 10
    train, val = train[num_val:], train[:num_val]
    torch.manual_seed(seed)
    if num_levels == 2:
        likelihood = "bernoulli"
    else:
        likelihood = "normal"
        noise = torch.Generator(device="cpu").manual_seed(seed)
        train = dequantize(train, num_levels, copies=DEQUANTIZATION_COPIES, generator=noise)
        val = dequantize(val, num_levels, generator=noise)
    options = {} if posterior == "gaussian" else dict(
        num_flows=2, flow_hidden_dims=(128,), ordering=list(range(z_dim))
    )
    vae = VAE(64, z_dim, hidden_dims=hidden_dims, likelihood=likelihood, posterior=posterior,
              **options).to(device)
    epochs = max(1, round(num_steps / math.ceil(len(train) / BATCH)))
    fit_vae(vae, train.to(device), num_epochs=epochs, batch_size=BATCH, lr=2e-3,
            validation=val.to(device), progress=progress, seed=seed)
    return vae.eval()


def _load(path: str, device: torch.device) -> VAE:
    try:
        vae = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise CommandError(f"cannot load --load {path}: {err}") from None
    if not isinstance(vae, VAE):
        raise CommandError(f"--load {path} holds a {type(vae).__name__}, not a pyroflows VAE")
    return vae.eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows compress``: train or load, compress, decompress, verify, compare.

    Args:
        args: the parsed arguments.

    Returns:
        The metrics (see [`evaluate`][pyroflows.compress.evaluate]).
    """
    from pyroflows.compress import BitsBackCodec, evaluate
    from pyroflows.datasets import digits

    device = resolve_device(args.device)
    configure_threads(args.threads, 0)
    out = output_dir(args.out)
    stem = f"compress-{args.posterior}-{args.levels}"
    message_path, model_path = output_files(out, stem, [".bbans", ".pt"],
                                            overwrite=args.overwrite)
    if args.load is not None:
        vae = _load(args.load, device)
    else:
        vae = train_digits_vae(args.posterior, args.levels, num_steps=args.steps,
                               z_dim=args.z_dim, seed=args.seed, device=device,
                               progress=not args.quiet)
        torch.save(vae, model_path)
    _, test = digits(binarize=args.levels == 2)
    torch.manual_seed(args.seed)
    codec = BitsBackCodec(vae, num_levels=None if args.levels == 2 else args.levels,
                          latent_precision=args.latent_precision)
    metrics = evaluate(codec, test, path=message_path,
                       importance_samples=args.importance_samples or None)
    metrics.update(posterior=vae.posterior, levels=args.levels,
                   model=str(args.load or model_path), num_test=len(test))
    if not args.json:
        print(format_table(metrics))
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The text table of ``pyroflows compress``: one line per method, bits per pixel.

    Args:
        metrics: what [`evaluate`][pyroflows.compress.evaluate] returned.

    Returns:
        The table.
    """
    rows = [
        ("bits-back ANS (whole file)", metrics["bits_per_dim"]),
        ("bits-back ANS (initial bits amortised)", metrics["amortised_bits_per_dim"]),
        ("-ELBO (theory)", metrics["elbo_bits_per_dim"]),
    ]
    if "nll_bits_per_dim" in metrics:
        rows.append(("-log2 p(x), importance sampled", metrics["nll_bits_per_dim"]))
    rows += [(name, metrics[f"{name}_bits_per_dim"])
             for name in ("gzip", "bz2", "lzma", "zstd", "png", "raw")
             if f"{name}_bits_per_dim" in metrics]
    width = max(len(name) for name, _ in rows)
    lines = [f"{metrics['num_test']} test digits, {metrics['levels']} levels, "
             f"{metrics['posterior']} posterior: bits per pixel"]
    lines += [f"  {name:<{width}}  {bits:.4f}" for name, bits in rows]
    verdict = "bit-exact" if metrics["roundtrip_ok"] else "FAILED"
    spread = 100 * metrics["sampling_se_bits_per_dim"] / metrics["elbo_bits_per_dim"]
    lines.append(f"  overhead over -ELBO {100 * metrics['overhead']:+.2f}% (random latents alone: "
                 f"+-{spread:.2f}%); round trip "
                 f"{verdict}; file {metrics['path']} ({metrics['message_bytes']} bytes)")
    return "\n".join(lines)
