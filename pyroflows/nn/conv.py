"""Convolutional conditioner networks for flows over ``(C, H, W)`` images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """``h + conv(relu(norm(conv(relu(norm(h))))))`` with 3x3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(1, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


class ConvConditioner(nn.Module):
    """A small ResNet ``(image, context) -> params``, each param an image of ``out_channels``.

    ``hidden_dims`` gives the channel width (its first entry) and the number of residual blocks
    (its length). A context vector is broadcast over the image and appended as channels. The
    output convolution is zero-initialised so the flow starts as the identity map.

    Args:
        in_channels: channels of the conditioning image.
        out_channels: channels of each output parameter.
        num_params: number of output parameters.
        hidden_dims: e.g. ``(64, 64)`` = width 64, two residual blocks.
        context_dim: width of an extra context vector, or ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_params: int,
        hidden_dims: Sequence[int],
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        width = int(hidden_dims[0])
        self.context_dim = context_dim
        self.out_channels = out_channels
        self.num_params = num_params
        self.stem = nn.Conv2d(in_channels + (context_dim or 0), width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in hidden_dims])
        self.head = nn.Sequential(
            nn.GroupNorm(1, width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels * num_params, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, inputs: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        batch = inputs.shape[:-3]
        h = inputs.reshape(-1, *inputs.shape[-3:])
        if self.context_dim:
            c = context.reshape(-1, context.shape[-1])[:, :, None, None]
            h = torch.cat([h, c.expand(-1, -1, *h.shape[-2:])], dim=1)
        out = self.head(self.blocks(self.stem(h)))
        out = out.reshape(*batch, *out.shape[-3:])
        return out.chunk(self.num_params, dim=-3)
