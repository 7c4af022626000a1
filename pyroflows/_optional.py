"""Optional dependencies, imported where they are used, with an error naming the extra.

``import pyroflows`` needs only torch, Pyro, numpy and tqdm; each optional part of the package
imports its dependency through ``require``, so a missing one says
which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> the extra of ``pyproject.toml`` that installs it
EXTRAS: dict[str, str] = {
    "matplotlib": "plot",
    "torchdiffeq": "cnf",
    "sklearn": "data",
    "arviz": "mcmc",
    "constriction": "compress",
    "zstandard": "compress",
    "zuko": "bench",
    "nflows": "bench",
    "normflows": "bench",
    "numpyro": "bench",
    "blackjax": "bench",
    "jax": "bench",
}


def require(module: str) -> ModuleType:
    """Import ``module``, or fail with the ``pip install`` command that provides it.

    Args:
        module: a dotted module name whose top-level package is listed in ``EXTRAS``.

    Returns:
        The imported module.

    Raises:
        ImportError: the package is not installed; the message names the extra, e.g.
            ``pip install "pyroflows[cnf]"``.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.partition(".")[0] != top:
            raise  # the package is there but something it needs is broken: show that
        extra = EXTRAS.get(top, "all")
        raise ImportError(
            f"{module} is not installed; it comes with the {extra!r} extra: "
            f'pip install "pyroflows[{extra}]"'
        ) from err
