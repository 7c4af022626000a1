"""Flow layers: one family per module, each a Pyro ``TransformModule``."""

from pyroflows.transforms.actnorm import ActNorm, actnorm
from pyroflows.transforms.autoregressive import (
    Autoregressive,
    inverse_autoregressive,
    masked_autoregressive,
)
from pyroflows.transforms.base import BoundTransform, FlowTransform
from pyroflows.transforms.bnaf import BlockNeuralAutoregressive, block_autoregressive
from pyroflows.transforms.cnf import ContinuousFlow, cnf
from pyroflows.transforms.coupling import Coupling, coupling_mask
from pyroflows.transforms.gaussianization import (
    HouseholderRotation,
    MarginalGaussianization,
    gaussianization,
)
from pyroflows.transforms.glow import InvertibleConv1x1, invertible_conv1x1
from pyroflows.transforms.mintnet import MaskedInvertibleConv, masked_invertible_conv
from pyroflows.transforms.multiscale import FactorOut, Squeeze
from pyroflows.transforms.nice import Rescale, additive_coupling
from pyroflows.transforms.planar import Planar, planar
from pyroflows.transforms.radial import Radial, radial
from pyroflows.transforms.realnvp import affine_coupling
from pyroflows.transforms.residual import ResidualBlock, residual
from pyroflows.transforms.spline import (
    RationalQuadraticSpline,
    spline_autoregressive,
    spline_coupling,
)

__all__ = [
    "BoundTransform", "Coupling", "FlowTransform", "Planar", "Radial", "Rescale",
    "additive_coupling", "affine_coupling", "coupling_mask", "planar", "radial",
    "Autoregressive", "inverse_autoregressive", "masked_autoregressive",
    "ActNorm", "FactorOut", "InvertibleConv1x1", "MaskedInvertibleConv", "Squeeze",
    "actnorm", "invertible_conv1x1", "masked_invertible_conv",
    "ContinuousFlow", "HouseholderRotation", "MarginalGaussianization", "ResidualBlock",
    "cnf", "gaussianization", "residual",
    "RationalQuadraticSpline", "spline_autoregressive", "spline_coupling",
    "BlockNeuralAutoregressive", "block_autoregressive",
]
