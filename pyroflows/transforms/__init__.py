"""Flow layers: one family per module, each a Pyro ``TransformModule``.

The names below are imported on first use (module ``__getattr__``), so
``import pyroflows.transforms`` loads no family module and no optional dependency such as
``torchdiffeq``. A family adds its public names to ``_NAMES``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> the module (under pyroflows.transforms) that defines it
_NAMES: dict[str, str] = {
    "BoundTransform": "base",
    "FlowTransform": "base",
    "ActNorm": "actnorm",
    "actnorm": "actnorm",
    "Autoregressive": "autoregressive",
    "inverse_autoregressive": "autoregressive",
    "masked_autoregressive": "autoregressive",
    "BlockNeuralAutoregressive": "bnaf",
    "block_autoregressive": "bnaf",
    "ContinuousFlow": "cnf",
    "cnf": "cnf",
    "Coupling": "coupling",
    "coupling_mask": "coupling",
    "HouseholderRotation": "gaussianization",
    "MarginalGaussianization": "gaussianization",
    "gaussianization": "gaussianization",
    "InvertibleConv1x1": "glow",
    "invertible_conv1x1": "glow",
    "MaskedInvertibleConv": "mintnet",
    "masked_invertible_conv": "mintnet",
    "FactorOut": "multiscale",
    "Squeeze": "multiscale",
    "Rescale": "nice",
    "additive_coupling": "nice",
    "Planar": "planar",
    "planar": "planar",
    "Radial": "radial",
    "radial": "radial",
    "affine_coupling": "realnvp",
    "ResidualBlock": "residual",
    "residual": "residual",
    "RationalQuadraticSpline": "spline",
    "spline_autoregressive": "spline",
    "spline_coupling": "spline",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package under its own name, which would hide the
    function of that name (``cnf``, ``planar``, ...): bind the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _NAMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
