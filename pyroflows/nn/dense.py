"""Dense conditioner networks built on Pyro's ``pyro.nn.DenseNN``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import nn


def _zero_last_layer(net: nn.Module) -> None:
    """Zero the output layer so that the layer built on ``net`` starts as the identity."""
    last = net.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class DenseConditioner(nn.Module):
    """An MLP ``(inputs, context) -> params``, one tensor per entry of ``param_dims``.

    Wraps Pyro's ``DenseNN`` (or ``ConditionalDenseNN`` when ``context_dim`` is given), with the
    last layer zero-initialised so a freshly built flow is the identity map.

    Args:
        input_dim: width of the conditioning input (may be 0: the output is then a learnable
            constant, or a function of the context only).
        param_dims: width of each output.
        hidden_dims: widths of the hidden layers.
        context_dim: width of an extra context input, or ``None``.
        nonlinearity: hidden activation (default ReLU, Pyro's default).
    """

    def __init__(
        self,
        input_dim: int,
        param_dims: Sequence[int],
        hidden_dims: Sequence[int],
        context_dim: int | None = None,
        zero_init: bool = True,
        nonlinearity: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.param_dims = [int(p) for p in param_dims]
        self.context_dim = context_dim
        # Always ask Pyro for a flat output and split it here: DenseNN squeezes single outputs.
        out = [sum(self.param_dims)]
        with warnings.catch_warnings():  # input_dim == 0 (1-D coupling) is legitimate
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            act = {} if nonlinearity is None else {"nonlinearity": nonlinearity}
            if context_dim:
                self.net = ConditionalDenseNN(input_dim, context_dim, list(hidden_dims), out, **act)
            else:
                self.net = DenseNN(input_dim, list(hidden_dims), out, **act)
        if zero_init:
            _zero_last_layer(self.net)

    def forward(
        self, inputs: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        h = self.net(inputs, context) if self.context_dim else self.net(inputs)
        return h.split(self.param_dims, dim=-1)


class ParamNet(nn.Module):
    """Named parameters of fixed shapes, free or predicted from a context by an MLP.

    Without a context they are plain learnable tensors (initialised by ``init``); with a
    ``context_dim`` an MLP maps the context to them, giving them the context's batch shape.

    Args:
        shapes: name -> shape of each parameter.
        context_dim: width of the context, or ``None`` for free parameters.
        hidden_dims: hidden widths of the hyper-network (conditional case only).
        init_std: standard deviation of the initial values / of the hyper-network's output bias.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        context_dim: int | None = None,
        hidden_dims: Sequence[int] = (64,),
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.context_dim = context_dim
        sizes = [int(torch.Size(s).numel()) for s in self.shapes.values()]
        if context_dim:
            self.net = DenseNN(context_dim, list(hidden_dims), [sum(sizes)])
            nn.init.normal_(self.net.layers[-1].weight, std=init_std)
            nn.init.normal_(self.net.layers[-1].bias, std=init_std)
        else:
            self.params = nn.ParameterDict(
                {k: nn.Parameter(torch.randn(s) * init_std) for k, s in self.shapes.items()}
            )
        self._sizes = sizes

    def forward(self, context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.context_dim:
            return dict(self.params)
        flat = self.net(context).split(self._sizes, dim=-1)
        batch = tuple(context.shape[:-1])
        return {
            k: f.reshape(batch + s) for (k, s), f in zip(self.shapes.items(), flat, strict=True)
        }
