r"""Discrete likelihoods of a [`VAE`][pyroflows.models.VAE] as probability tables.

An entropy coder needs $P(x_j = k \mid z)$ for every pixel $j$ and every level $k$. The VAE's
decoder gives either Bernoulli logits (binary pixels, ``likelihood="bernoulli"``) or a Normal
mean and scale (``likelihood="normal"``). The Normal becomes a distribution over $L$ levels by
integrating it over bins of width $1/L$ in the model's data space $[0, 1]$,

$$
P(x_j = k \mid z) = \Phi\Bigl(\frac{e_{k+1} - \mu_j}{\sigma_j}\Bigr)
- \Phi\Bigl(\frac{e_k - \mu_j}{\sigma_j}\Bigr), \qquad
e_k = k / L \ (0 < k < L),\quad e_0 = -\infty,\quad e_L = +\infty,
$$

the discretised Gaussian (the open end bins keep every level's mass positive). A Normal VAE is
trained for it on uniformly dequantised data $(k + u) / L$, $u \sim U(0, 1)$
([`dequantize`][pyroflows.compress.dequantize]): $\log P(k) \ge \mathbb E_u[\log p((k+u)/L)]
- \log L$, so its training objective bounds the discrete one. The encoder reads the bin centres
$(k + \tfrac12) / L$.

Every table is mixed with a uniform floor, $\tilde P = (1 - L f) P + f$ with $f = 2^{-24}$:
the entropy coder works with 24-bit fixed-point probabilities and gives every level at least
$2^{-24}$ anyway, so a pixel the decoder rules out (an overconfident Normal puts $10^{-100}$ on
it) costs at most 24 bits, not hundreds. The floored likelihood is the one the codec codes
with, and the one its ELBO and $\log P(x)$ estimates use; where $P$ is not tiny the two agree.

Tables are computed in float64 on the CPU from decoder outputs rounded to a fixed grid, so the
encoder and the decoder of a message compute bit-identical tables (see
[`BitsBackCodec`][pyroflows.compress.BitsBackCodec]).
"""

from __future__ import annotations

import math

import torch

from pyroflows.models import VAE
from pyroflows.validation import check_int, check_tensor

GRID_BITS = 20  # network outputs are rounded to multiples of 2**-GRID_BITS before coding
FLOOR = 2.0**-24  # least probability of a level: the coder's fixed-point resolution


def quantise(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 on the CPU, rounded to multiples of ``2**-GRID_BITS``.

    Rounding makes the coding tables insensitive to last-bit differences between two
    evaluations of the same network (another thread count or BLAS kernel); whatever still
    differs is caught by the message checksum.
    """
    t = t.detach().to(device="cpu", dtype=torch.float64)
    return torch.round(t * 2.0**GRID_BITS) / 2.0**GRID_BITS


def normal_bin_masses(loc: torch.Tensor, scale: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Masses of $\\mathcal N(\\text{loc}, \\text{scale}^2)$ in the bins between consecutive
    ``edges`` (the first and last edges may be infinite).

    Args:
        loc: means, ``(*batch,)``, float64.
        scale: standard deviations, ``(*batch,)``, float64, positive.
        edges: increasing bin edges, ``(num_bins + 1,)``, float64.

    Returns:
        ``(*batch, num_bins)`` masses; the upper tail is taken from the survival function so
        that bins far above the mean keep their (tiny) relative precision.
    """
    t = (edges - loc[..., None]) / scale[..., None]
    cdf, sf = torch.special.ndtr(t), torch.special.ndtr(-t)
    below = cdf[..., 1:] - cdf[..., :-1]
    above = sf[..., :-1] - sf[..., 1:]
    return torch.where(t[..., :-1] > 0, above, below).clamp_min(0.0)


class DiscreteLikelihood:
    """$P(x \\mid z)$ over ``num_levels`` integer levels per pixel, from a VAE's decoder.

    Args:
        vae: the model; ``likelihood="bernoulli"`` gives 2 levels, ``"normal"`` the
            discretised Gaussian over ``num_levels`` levels.
        num_levels: number of pixel levels $L$ (``None``: 2 for Bernoulli; required for Normal).
    """

    def __init__(self, vae: VAE, num_levels: int | None = None) -> None:
        self.vae = vae
        if vae.likelihood == "bernoulli":
            if num_levels not in (None, 2):
                raise ValueError(
                    f"num_levels must be 2 (or None) for a Bernoulli VAE, got {num_levels!r}"
                )
            self.num_levels = 2
        else:
            if num_levels is None:
                raise ValueError("num_levels is required for a VAE with likelihood='normal'")
            self.num_levels = check_int(num_levels, "num_levels", minimum=2, maximum=65536)
        levels = torch.arange(1, self.num_levels, device="cpu", dtype=torch.float64)
        inner = levels / self.num_levels
        inf = torch.tensor([torch.inf], device="cpu", dtype=torch.float64)
        self.edges = torch.cat([-inf, inner, inf])

    @property
    def reference(self) -> torch.Tensor:
        """A parameter of the VAE: the device and dtype its inputs must have."""
        return next(self.vae.parameters())

    def check(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """``x`` as an int64 CPU tensor of shape ``(n, x_dim)`` if every value is a level.

        Args:
            x: ``(n, *shape)`` with ``prod(shape) == vae.x_dim``, integer or floating dtype.
            name: the argument's name in error messages.

        Raises:
            TypeError: not a tensor.
            ValueError: wrong width, no rows, or a value that is not an integer level in
                ``0..num_levels-1``.
        """
        check_tensor(x, name, floating=False)
        if x.dim() < 2 or len(x) == 0 or x[0].numel() != self.vae.x_dim:
            raise ValueError(
                f"{name} must have shape (n, ...) with n >= 1 and {self.vae.x_dim} values per "
                f"row (the VAE's x_dim), got {tuple(x.shape)}"
            )
        flat = x.detach().reshape(len(x), -1).to("cpu")
        levels = flat.to(torch.int64) if flat.is_floating_point() else flat.long()
        ok = (levels >= 0) & (levels < self.num_levels)
        if flat.is_floating_point():
            ok &= torch.isfinite(flat) & (levels.to(flat.dtype) == flat)
        if not bool(ok.all()):
            raise ValueError(
                f"{name} must hold integer levels 0..{self.num_levels - 1} (the likelihood's "
                f"support), got values such as {flat[~ok][:3].tolist()}"
            )
        return levels

    def encoder_input(self, levels: torch.Tensor) -> torch.Tensor:
        """What the encoder reads for integer ``levels`` ``(n, x_dim)``: the levels themselves
        (Bernoulli) or the bin centres $(k + \\frac12) / L$ (Normal), on the VAE's device and
        dtype."""
        ref = self.reference
        x = levels.to(device=ref.device, dtype=ref.dtype)
        return x if self.vae.likelihood == "bernoulli" else (x + 0.5) / self.num_levels

    def log_table(self, z: torch.Tensor) -> torch.Tensor:
        """$\\log \\tilde P(x_j = k \\mid z)$ (floored) for every pixel and level, float64 on
        the CPU.

        Args:
            z: latents ``(*batch, z_dim)`` on the VAE's device and dtype.

        Returns:
            ``(*batch, x_dim, num_levels)``.
        """
        base = self.vae.likelihood_dist(z).base_dist
        if self.vae.likelihood == "bernoulli":
            logits = quantise(base.logits)
            log_p = torch.stack([torch.nn.functional.logsigmoid(-logits),
                                 torch.nn.functional.logsigmoid(logits)], dim=-1)
        else:
            masses = normal_bin_masses(quantise(base.loc), quantise(base.scale), self.edges)
            log_p = masses.clamp_min(torch.finfo(torch.float64).tiny).log()
        # the floored mixture (1 - L f) P + f, in log space
        floor = log_p.new_tensor(math.log(FLOOR))
        return torch.logaddexp(log_p + math.log1p(-self.num_levels * FLOOR), floor)


def dequantize(
    x: torch.Tensor, num_levels: int, *, copies: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly dequantised, rescaled copies $(k + u) / L$ of integer-level data, to train a
    Normal VAE for the discretised Gaussian likelihood.

    Args:
        x: integer levels ``(n, *shape)`` (floating or integer dtype).
        num_levels: $L$.
        copies: independent noise draws stacked along the first dimension (a fixed training
            set for [`fit_vae`][pyroflows.models.fit_vae] that still sees several dequantisations
            of every image).
        generator: a CPU ``torch.Generator`` for the noise (``None``: torch's global one).

    Returns:
        ``(copies * n, *shape)`` floats in $[0, 1)$, ``x``'s dtype if floating (else float32)
        and device.
    """
    check_tensor(x, "x", floating=False)
    num_levels = check_int(num_levels, "num_levels", minimum=2)
    copies = check_int(copies, "copies")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    reps = x.to(dtype).repeat(copies, *([1] * (x.dim() - 1)))
    noise = torch.rand(reps.shape, generator=generator, device="cpu", dtype=dtype)
    return (reps + noise.to(x.device)) / num_levels
