"""pyroflows: normalizing flows as first-class citizens of Pyro."""

from pyroflows.flow import Flow
from pyroflows.registry import available_flows, build_flow

__version__ = "0.1.0"

__all__ = ["Flow", "available_flows", "build_flow", "__version__"]
