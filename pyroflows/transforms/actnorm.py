r"""ActNorm: a per-channel affine map with data-dependent initialisation.

$$
x = z \odot \exp(s) + b, \qquad \log|\det J| = H W \sum_c s_c
$$

with one log-scale $s_c$ and shift $b_c$ per channel (the first event dimension), shared over
the spatial positions. The first time the layer sees *data* (the density direction
$x \to z$) it sets $b$ to the per-channel mean and $\exp(s)$ to the per-channel standard
deviation of that batch, so the latent starts out standardised; after that both are ordinary
parameters. Whether that has happened is a buffer (``initialized``), so it travels with
``state_dict()`` and ``.to(device)`` and a restored model is never re-initialised.

Reference: Kingma, Dhariwal (2018), *Glow: Generative Flow with Invertible 1x1 Convolutions*.

Example:
    >>> import torch
    >>> layer = ActNorm((3, 8, 8))
    >>> z, _ = layer.inverse_and_log_det(5 + 2 * torch.randn(64, 3, 8, 8))
    >>> round(z.mean().item(), 3), round(z.std().item(), 2), bool(layer.initialized)
    (0.0, 1.0, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyroflows.transforms.base import FlowTransform, batch_shape_of


class ActNorm(FlowTransform):
    """Per-channel ``x = z * exp(s) + b`` with data-dependent initialisation.

    Works on any event shape: the first event dimension is the channel (the feature, for
    vectors), the rest are positions sharing that channel's scale and shift.

    Args:
        event_shape: ``(C, H, W)`` or ``(D,)``.
        eps: floor of the initial standard deviation (a constant channel gets scale ``eps``).
    """

    def __init__(self, event_shape: Sequence[int], eps: float = 1e-6) -> None:
        super().__init__(tuple(event_shape))
        param_shape = (self.event_shape[0],) + (1,) * (len(self.event_shape) - 1)
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.shift = nn.Parameter(torch.zeros(param_shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps
        self.positions = 1
        for size in self.event_shape[1:]:
            self.positions *= size

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Standardise ``x`` channel-wise: set the shift to its mean and the scale to its std.

        Args:
            x: a batch of data of shape ``(*batch, *event_shape)`` (at least two values per
                channel).
        """
        channels_last = (
            x.reshape(-1, *self.event_shape).transpose(0, 1).reshape(self.event_shape[0], -1)
        )
        if channels_last.shape[1] < 2:  # one value per channel has no spread to standardise
            return
        std, mean = torch.std_mean(channels_last, dim=1, correction=0)
        self.shift.copy_(mean.reshape(self.shift.shape))
        self.log_scale.copy_(std.clamp_min(self.eps).log().reshape(self.log_scale.shape))
        self._mark_initialized()

    def _log_det(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.log_scale.sum() * self.positions).expand(
            batch_shape_of(inputs, self.event_shape)
        )

    def forward_and_log_det(self, z, context=None):
        return z * torch.exp(self.log_scale) + self.shift, self._log_det(z)

    def inverse_and_log_det(self, x, context=None):
        if self._data_init_pending():
            self.initialize(x)
        return (x - self.shift) * torch.exp(-self.log_scale), self._log_det(x)


def actnorm(event_shape: Sequence[int]) -> ActNorm:
    """An ``ActNorm`` layer (Pyro-style helper).

    Args:
        event_shape: ``(C, H, W)`` or ``(D,)``.

    Returns:
        The layer.
    """
    return ActNorm(event_shape)
