r"""Bits-back ANS (BB-ANS) lossless compression with a trained [`VAE`][pyroflows.models.VAE].

Townsend, Bird & Barber (2019) turn a latent-variable model into a codec whose net cost per
datapoint is the negative ELBO. With an ANS stack (a last-in-first-out entropy coder; here
`constriction`'s ``AnsCoder``), each image $x$ is encoded by

1. **popping** a discretised latent $\bar z$ off the stack with the posterior $Q(\bar z \mid x)$
   (this *decodes* bits already there: it removes $-\log_2 Q(\bar z \mid x)$ bits),
2. **pushing** $x$ with the likelihood $P(x \mid \bar z)$,
3. **pushing** $\bar z$ with the prior $P(\bar z)$,

so the stack grows by $-\log_2 P(x \mid \bar z) - \log_2 P(\bar z) + \log_2 Q(\bar z \mid x)$
bits, whose average over the popped $\bar z$ is the negative ELBO of the discretised model.
Decoding runs the three steps backwards (pop $\bar z$ with the prior, pop $x$, push $\bar z$
back with the posterior, which restores the bits the encoder borrowed), images in reverse order.

**Latent discretisation.** Each coordinate of $z$ is cut into $B = 2^{\text{precision}}$ buckets
of equal mass under the standard normal prior, edges $\Phi^{-1}(k / B)$, each represented by
its prior median $\Phi^{-1}((k + \frac12) / B)$; the prior on bucket indices is uniform
($\log_2 B$ bits a coordinate).

**Posterior over buckets.** A Gaussian posterior gives each bucket its exact mass under
$\mathcal N(\mu_i, \sigma_i^2)$, coordinate by coordinate. A flow posterior made of affine
autoregressive layers (``iaf``, ``maf``) that share one ordering is triangular: in that order,
each layer maps coordinate $i$ affinely, $y_i = a_i y^{\text{in}}_i + b_i$, with $(a_i, b_i)$
computed from coordinates already fixed. Coordinates are popped one at a time in that order:
with the earlier ones fixed at their bucket centres, $z_i = A_i u_i + B_i$ with
$u_i \sim \mathcal N(\mu_i, \sigma_i^2)$ is Gaussian, so its buckets get exact masses; after the
pop, $z_i$ is set to the bucket centre and every layer's coordinate $i$ is recovered by
inverting the affine maps. The decoder, knowing all $\bar z$, recomputes the same conditionals
in the same order and pushes them back in reverse: the scheme is exactly invertible. (It is
the chain rule with each conditional taken at the earlier bucket centres; it tends to the
flow posterior's bucket masses as the buckets shrink.)

**Determinism.** Encoder and decoder must compute identical probability tables. Networks are
evaluated one image at a time on both sides (identical shapes, identical arithmetic); their
outputs are rounded to a fixed grid and turned into float64 tables that `constriction` maps to
fixed-point (24-bit) categorical models. A header carries a CRC-32 of the images, of the
payload and of the model's parameters: a corrupted or truncated message, or a different
model, raises ``ValueError`` instead of returning a wrong image.

**Initial bits.** The first pop needs bits on the stack; the coder starts from a fixed,
pseudo-random block of ``initial_words`` 32-bit words (enough for one latent), which decoding
recovers exactly and checks. ``rate`` reports the cost with and without them.

Reference: Townsend, Bird & Barber (2019), *Practical lossless compression with latent
variables using bits back coding*; Bamler (2022), *Understanding entropy coding with
asymmetric numeral systems (ANS): a statistician's perspective* (`constriction`).
"""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pyroflows.compress.likelihood import GRID_BITS, DiscreteLikelihood, normal_bin_masses, quantise
from pyroflows.models import VAE
from pyroflows.transforms.autoregressive import Autoregressive
from pyroflows.transforms.elementwise import Additive, Affine
from pyroflows.validation import check_int

try:
    import constriction
except ImportError as err:  # pragma: no cover - the "compress" extra
    raise ImportError(
        "pyroflows.compress needs constriction: pip install 'pyroflows[compress]'"
    ) from err

__all__ = ["BitsBackCodec"]

MAGIC, VERSION = b"PFBB", 1
_HEAD = struct.Struct("<4sBBIBI")  # magic, version, precision, num_levels, ndim, count
_TAIL = struct.Struct("<5I")  # initial words, payload words, data / payload / model CRC-32
# chooses bucket indices for the coordinates `dims` given their tables (m, B): pops or replays
Choose = Callable[[list[int], np.ndarray], np.ndarray]


def _valid_bits(words: np.ndarray) -> int:
    """Bits of information on an ANS stack made of ``words`` (the top word's leading zeros
    excluded): the stack's size at a resolution finer than whole words."""
    return constriction.stream.stack.AnsCoder(words).num_valid_bits()


def _initial_words(num: int) -> np.ndarray:
    """``num`` fixed pseudo-random uint32 words (SHA-256 in counter mode: stable everywhere)."""
    blocks = [hashlib.sha256(b"pyroflows-bbans" + i.to_bytes(4, "little")).digest()
              for i in range(math.ceil(num / 8))]
    return np.frombuffer(b"".join(blocks), dtype="<u4")[:num].astype(np.uint32)


class BitsBackCodec:
    """Lossless BB-ANS codec for batches of discrete images under a trained VAE.

    Args:
        vae: a trained [`VAE`][pyroflows.models.VAE] (Bernoulli: binary pixels; Normal: the
            discretised Gaussian over ``num_levels`` levels, see
            [`DiscreteLikelihood`][pyroflows.compress.likelihood.DiscreteLikelihood]). Its
            posterior is ``"gaussian"`` or a stack of affine autoregressive layers (``iaf``,
            ``maf``) sharing one ordering, e.g. ``VAE(..., posterior="iaf",
            ordering=list(range(z_dim)))``.
        num_levels: pixel levels (``None`` for Bernoulli; e.g. 17 for the grey-level digits).
        latent_precision: bits per latent coordinate: $2^{\\text{precision}}$ buckets of equal
            prior mass (1..14; 12 by default).
        initial_words: 32-bit words of initial bits (default: enough for one latent,
            ``ceil(z_dim * latent_precision / 32) + 2``).

    Raises:
        ValueError: an unsupported posterior flow or bad settings.

    Example:
        >>> codec = BitsBackCodec(vae)
        >>> message = codec.encode(images)
        >>> torch.equal(codec.decode(message, len(images)), images)
        True
    """

    def __init__(
        self,
        vae: VAE,
        *,
        num_levels: int | None = None,
        latent_precision: int = 12,
        initial_words: int | None = None,
    ) -> None:
        if not isinstance(vae, VAE):
            raise TypeError(f"vae must be a pyroflows.models.VAE, got {type(vae).__name__}")
        self.vae = vae
        self.likelihood = DiscreteLikelihood(vae, num_levels)
        self.num_levels = self.likelihood.num_levels
        self.latent_precision = check_int(latent_precision, "latent_precision", maximum=14)
        default_words = math.ceil(vae.z_dim * self.latent_precision / 32) + 2
        self.initial_words = check_int(
            default_words if initial_words is None else initial_words, "initial_words", minimum=0
        )
        self._layers = self._flow_layers(vae)
        buckets = 2**self.latent_precision
        k = torch.arange(buckets + 1, device="cpu", dtype=torch.float64)
        self._edges = torch.special.ndtri(k / buckets)  # -inf .. +inf
        self._centres = torch.special.ndtri((k[:-1] + 0.5) / buckets)
        self._categorical = constriction.stream.model.Categorical(perfect=False)
        self._prior = constriction.stream.model.Uniform(buckets)

    @staticmethod
    def _flow_layers(vae: VAE) -> list[Autoregressive]:
        """The posterior flow's layers, checked to be affine autoregressive with one ordering."""
        if vae.flow is None:
            return []
        layers = list(vae.flow.layers)
        supported = all(
            isinstance(layer, Autoregressive) and isinstance(layer.elementwise, (Affine, Additive))
            for layer in layers
        )
        if not supported:
            raise ValueError(
                f"vae's posterior must be 'gaussian' or affine autoregressive layers (iaf, maf) "
                f"for bits-back coding, got posterior={vae.posterior!r}"
            )
        first = layers[0].made.ordering
        if any(not torch.equal(layer.made.ordering, first) for layer in layers):
            raise ValueError(
                "vae's posterior flow layers must share one ordering (a triangular flow), e.g. "
                "VAE(..., posterior='iaf', ordering=list(range(z_dim))); got layers with "
                "different orderings"
            )
        return layers

    # -- the three coding steps -----------------------------------------------------------
    @torch.no_grad()
    def _posterior(self, x_in: torch.Tensor, choose: Choose) -> tuple[np.ndarray, np.ndarray]:
        """Walk the posterior over latent buckets for one image, calling ``choose`` for the
        bucket of each coordinate given its table.

        Returns:
            The chosen bucket indices and their tables ``(z_dim, B)``, both in the order the
            coordinates were chosen (pushing them back with ``encode_reverse`` undoes the pops).
        """
        q = self.vae.posterior_dist(x_in)
        loc = quantise(q.transforms[0].loc)[0]
        scale = quantise(q.transforms[0].scale)[0]
        if not self._layers:
            tables = self._bucket_masses(loc, scale).numpy()
            return choose(list(range(len(loc))), tables), tables
        bound = q.transforms[1:]  # the flow layers, conditioned on this image's context
        order = self._layers[0].made.ordering.tolist()
        ys = [x_in.new_zeros(1, len(loc)) for _ in range(len(bound) + 1)]  # each layer's values
        chosen, tables = [], []
        for j in order:
            coeffs = []  # (a, b) of each layer at coordinate j: y_out = a * y_in + b
            total_a, total_b = 1.0, 0.0
            for i, t in enumerate(bound):
                layer = t.layer
                reads = ys[i] if layer.parallel == "forward" else ys[i + 1]  # IAF: in, MAF: out
                params = tuple(p[:, j : j + 1] for p in layer.made(reads, t.context))
                shift, log_a = layer.elementwise.forward(reads.new_zeros(1, 1), params)
                a, b = math.exp(log_a.item()), shift.item()
                coeffs.append((a, b))
                total_a, total_b = a * total_a, a * total_b + b
            mean = quantise(loc.new_tensor([total_a * float(loc[j]) + total_b]))
            std = quantise(loc.new_tensor([total_a * float(scale[j])]))
            table = self._bucket_masses(mean, std).numpy()
            (index,) = choose([j], table)
            chosen.append(index)
            tables.append(table[0])
            value = float(self._centres[index])
            ys[-1][0, j] = value
            for i in reversed(range(len(bound))):  # invert the layers at coordinate j
                a, b = coeffs[i]
                value = (value - b) / a
                ys[i][0, j] = value
        return np.asarray(chosen, dtype=np.int32), np.stack(tables)

    def _bucket_masses(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Masses of the latent buckets under $\\mathcal N(\\text{loc}, \\text{scale}^2)$."""
        return normal_bin_masses(loc, scale.clamp_min(2.0**-GRID_BITS), self._edges)

    def _likelihood_table(self, buckets: np.ndarray) -> np.ndarray:
        """$P(x_j = k \\mid \\bar z)$ at the bucket centres, ``(x_dim, num_levels)``."""
        ref = self.likelihood.reference
        z = self._centres[torch.as_tensor(buckets, device="cpu").long()]
        z = z.to(device=ref.device, dtype=ref.dtype)[None]
        return self.likelihood.log_table(z)[0].exp().numpy()

    # -- public API ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> bytes:
        """Compress a batch of discrete images into one message.

        Args:
            x: ``(n, *shape)`` integer levels (any dtype, any device) with
                ``prod(shape) == vae.x_dim``.

        Returns:
            The message: a header (count, shape, checksums) and the ANS words.

        Raises:
            ValueError: values outside the likelihood's support or the wrong width.
        """
        levels = self.likelihood.check(x)
        coder = constriction.stream.stack.AnsCoder(_initial_words(self.initial_words))
        def pop(dims: list[int], table: np.ndarray) -> np.ndarray:
            return coder.decode(self._categorical, table)

        for row in levels:
            x_in = self.likelihood.encoder_input(row[None])
            buckets, _ = self._posterior(x_in, pop)
            # _posterior pops in its own order; the prior and likelihood need dimension order
            z_buckets = self._dimension_order(buckets)
            symbols = row.numpy().astype(np.int32)
            coder.encode_reverse(symbols, self._categorical, self._likelihood_table(z_buckets))
            coder.encode_reverse(z_buckets, self._prior)
        payload = coder.get_compressed().astype("<u4").tobytes()
        message = self._header(levels, tuple(x.shape[1:]), payload) + payload
        net = 32 * (len(payload) // 4 - self.initial_words) / levels.numel()
        if net >= math.log2(self.num_levels):
            warnings.warn(
                f"the VAE compresses these images to {net:.3f} bits/dim, no better than storing "
                f"raw {self.num_levels}-level pixels ({math.log2(self.num_levels):.3f}): is it "
                "trained?",
                UserWarning,
                stacklevel=3,
            )
        return message

    def _dimension_order(self, chosen: np.ndarray) -> np.ndarray:
        """Bucket indices in coordinate order, from the posterior's choice order."""
        if not self._layers:
            return chosen
        out = np.empty_like(chosen)
        out[self._layers[0].made.ordering.cpu().numpy()] = chosen
        return out

    @torch.no_grad()
    def decode(self, message: bytes, num: int | None = None) -> torch.Tensor:
        """Decompress a message made by [`encode`][pyroflows.compress.BitsBackCodec.encode].

        Args:
            message: the bytes ``encode`` returned.
            num: the number of images expected (checked against the header when given).

        Returns:
            The images, bit-exact, with the shape they were encoded with, as floats of the
            VAE's dtype on its device.

        Raises:
            ValueError: a message that is truncated, corrupted, not a BB-ANS message, made
                with another model or settings, or holding a different number of images.
        """
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise TypeError(f"message must be bytes, got {type(message).__name__}")
        message = bytes(message)
        count, shape, payload, data_crc = self._parse(message)
        if num is not None and check_int(num, "num", minimum=0) != count:
            raise ValueError(f"num must match the message, which holds {count} images, got {num}")
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        rows = []
        for _ in range(count):
            z_buckets = coder.decode(self._prior, self.vae.z_dim)
            symbols = coder.decode(self._categorical, self._likelihood_table(z_buckets))
            row = torch.as_tensor(symbols.astype(np.int64), device="cpu")
            x_in = self.likelihood.encoder_input(row[None])
            replay = self._replay(z_buckets)
            buckets, tables = self._posterior(x_in, replay)
            coder.encode_reverse(buckets, self._categorical, tables)
            rows.append(row)
        levels = torch.stack(rows[::-1]) if rows else torch.empty(0, self.vae.x_dim, device="cpu")
        rest = coder.get_compressed()
        intact = np.array_equal(rest, _initial_words(self.initial_words))
        if not intact or zlib.crc32(levels.to(torch.int64).numpy().tobytes()) != data_crc:
            raise ValueError(
                "message failed its checksum after decoding: it was corrupted, or encoded on a "
                "machine whose arithmetic differs from this one"
            )
        ref = self.likelihood.reference
        return levels.to(device=ref.device, dtype=ref.dtype).reshape(count, *shape)

    @staticmethod
    def _replay(z_buckets: np.ndarray) -> Choose:
        """A ``choose`` that returns the known buckets of the requested coordinates."""
        return lambda dims, table: z_buckets[dims].astype(np.int32)

    # -- header -------------------------------------------------------------------------------
    def _model_crc(self) -> int:
        crc = zlib.crc32(f"{self.vae.likelihood}/{self.vae.posterior}".encode())
        for name, tensor in self.vae.state_dict().items():
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), crc)
        return crc

    def _header(self, levels: torch.Tensor, shape: tuple[int, ...], payload: bytes) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, self.latent_precision, self.num_levels, len(shape),
                          len(levels))
        dims = struct.pack(f"<{len(shape)}I", *shape)
        tail = _TAIL.pack(self.initial_words, len(payload) // 4,
                          zlib.crc32(levels.numpy().tobytes()), zlib.crc32(payload),
                          self._model_crc())
        return head + dims + tail

    def _parse(self, message: bytes) -> tuple[int, tuple[int, ...], bytes, int]:
        """Check the header against this codec; returns count, shape, payload and data CRC."""
        if len(message) < _HEAD.size or message[:4] != MAGIC:
            raise ValueError("message is not a pyroflows BB-ANS message (bad magic or too short)")
        magic, version, precision, levels, ndim, count = _HEAD.unpack_from(message)
        end = _HEAD.size + 4 * ndim + _TAIL.size
        if version != VERSION or len(message) < end:
            raise ValueError(f"message is truncated or of another version ({version})")
        shape = struct.unpack_from(f"<{ndim}I", message, _HEAD.size)
        initial, words, data_crc, payload_crc, model_crc = _TAIL.unpack_from(
            message, end - _TAIL.size
        )
        payload = message[end:]
        if len(payload) != 4 * words:
            raise ValueError(
                f"message is truncated or padded: header says {4 * words} payload bytes, "
                f"got {len(payload)}"
            )
        if zlib.crc32(payload) != payload_crc:
            raise ValueError("message is corrupted (payload checksum mismatch)")
        if math.prod(shape) != self.vae.x_dim:
            raise ValueError(
                f"message holds images of shape {tuple(shape)}, which does not match the VAE's "
                f"x_dim {self.vae.x_dim}"
            )
        settings = (precision, levels, initial)
        ours = (self.latent_precision, self.num_levels, self.initial_words)
        if settings != ours:
            raise ValueError(
                f"message was encoded with latent_precision, num_levels, initial_words = "
                f"{settings}, this codec uses {ours}"
            )
        if model_crc != self._model_crc():
            raise ValueError("message was encoded with a different model (parameter checksum)")
        return count, tuple(shape), payload, data_crc

    # -- rates --------------------------------------------------------------------------------
    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """$\\log P(x \\mid z_k) + \\log p(z_k) - \\log q(z_k \\mid x)$ under the discrete
        likelihood the codec uses, for $z_k \\sim q(z \\mid x)$ (continuous latents).

        Args:
            x: ``(n, *shape)`` integer levels.
            num_samples: draws $K$ per image.

        Returns:
            float64 tensor ``(K, n)`` on the CPU: its mean over $K$ estimates the ELBO, its
            log-mean-exp the importance-sampled $\\log P(x)$.
        """
        levels = self.likelihood.check(x)
        num_samples = check_int(num_samples, "num_samples")
        x_in = self.likelihood.encoder_input(levels)
        # draws per chunk: keep the (draws, n, x_dim, levels) table near 4M float64 numbers
        chunk = max(1, 4_000_000 // (levels.numel() * self.num_levels))
        out = []
        for start in range(0, num_samples, chunk):
            q = self.vae.posterior_dist(x_in)
            z = q.rsample((min(chunk, num_samples - start),))
            log_q = q.log_prob(z)
            log_prior = self.vae.prior().log_prob(z)
            table = self.likelihood.log_table(z)  # (k, n, x_dim, levels)
            log_lik = table.gather(-1, levels.expand(*table.shape[:-1])[..., None])
            out.append(log_lik.sum((-2, -1)) + (log_prior - log_q).to("cpu", torch.float64))
        return torch.cat(out)

    def rate(
        self,
        x: torch.Tensor,
        *,
        message: bytes | None = None,
        num_samples: int = 100,
        importance_samples: int | None = None,
    ) -> dict[str, Any]:
        """Encode ``x`` and compare the message's real size with the model's bounds.

        Args:
            x: ``(n, *shape)`` integer levels.
            message: ``encode(x)`` if already made (it is not encoded again).
            num_samples: posterior draws per image for the ELBO estimate.
            importance_samples: draws per image for the importance-sampled $-\\log_2 P(x)$
                (``None``: skipped).

        Returns:
            A dict of bits per dimension (pixel): ``"bits_per_dim"`` (the whole message:
            header, initial bits and payload), ``"amortised_bits_per_dim"`` (the stack's
            growth over the initial bits, counted in bits rather than whole words: the cost of
            the initial bits and the header amortised away), ``"elbo_bits_per_dim"``
            ($-$ELBO), ``"sampling_se_bits_per_dim"`` (the standard deviation of the amortised
            rate around $-$ELBO that random latent draws alone would cause), ``"overhead"``
            (amortised over $-$ELBO, minus 1), ``"nll_bits_per_dim"``
            (with ``importance_samples``), and the sizes ``"message_bytes"``,
            ``"header_bits"``, ``"initial_bits"``, ``"num_images"``, ``"num_dims"``.
        """
        message = self.encode(x) if message is None else bytes(message)
        count, _, payload, _ = self._parse(message)
        if count != len(x):
            raise ValueError(f"message must hold the {len(x)} images of x, it holds {count}")
        dims = count * self.vae.x_dim
        bits = 1 / (dims * math.log(2))  # nats -> bits per dim, over all images
        weights = self.log_weights(x, num_samples)
        elbo = -weights.mean(0).sum().item() * bits
        # spread of the coded rate around -ELBO if the popped latents were exact draws of Q
        spread = math.sqrt(weights.var(0).sum().item()) * bits if num_samples > 1 else math.nan
        out = dict(
            bits_per_dim=8 * len(message) / dims,
            amortised_bits_per_dim=(
                _valid_bits(np.frombuffer(payload, "<u4").astype(np.uint32))
                - _valid_bits(_initial_words(self.initial_words))
            ) / dims,
            elbo_bits_per_dim=elbo,
            sampling_se_bits_per_dim=spread,
        )
        out["overhead"] = out["amortised_bits_per_dim"] / elbo - 1
        if importance_samples is not None:
            k = check_int(importance_samples, "importance_samples")
            log_px = torch.logsumexp(self.log_weights(x, k), 0) - math.log(k)
            out["nll_bits_per_dim"] = -log_px.sum().item() * bits
        out.update(message_bytes=len(message), header_bits=8 * (len(message) - len(payload)),
                   initial_bits=32 * self.initial_words, num_images=count, num_dims=dims)
        return out
