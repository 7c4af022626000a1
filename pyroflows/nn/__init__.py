"""Conditioner networks: dense (Pyro's DenseNN), convolutional."""

from pyroflows.nn.conv import ConvConditioner
from pyroflows.nn.dense import DenseConditioner, ParamNet

__all__ = ["ConvConditioner", "DenseConditioner", "ParamNet"]
