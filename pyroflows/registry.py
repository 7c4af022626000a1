"""The flow families: name -> builder. The single place that lists them.

A family is a builder function ``build(shape, *, num_layers, hidden_dims, context_dim,
**options) -> list[FlowTransform]`` decorated with ``flow_family``, and one line in
``_FAMILIES`` below. Registering is all it takes for ``build_flow``, the CLI, the docs page
and the conformance test suite to pick a family up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyroflows.validation import check_int

if TYPE_CHECKING:  # the flow module loads at call time (light imports); here for the annotation
    from pyroflows.flow import Flow

# name -> "module:builder"; imported lazily, so an unused family costs nothing at import time.
_FAMILIES: dict[str, str] = {
    "planar": "pyroflows.transforms.planar:build_planar",
    "radial": "pyroflows.transforms.radial:build_radial",
    "nice": "pyroflows.transforms.nice:build_nice",
    "realnvp": "pyroflows.transforms.realnvp:build_realnvp",
    "glow": "pyroflows.transforms.glow:build_glow",
    "mintnet": "pyroflows.transforms.mintnet:build_mintnet",
    "maf": "pyroflows.transforms.autoregressive:build_maf",
    "iaf": "pyroflows.transforms.autoregressive:build_iaf",
    "gaussianization": "pyroflows.transforms.gaussianization:build_gaussianization",
    "residual": "pyroflows.transforms.residual:build_residual",
    "cnf": "pyroflows.transforms.cnf:build_cnf",
    "nsf": "pyroflows.transforms.spline:build_nsf",
    "nsf_ar": "pyroflows.transforms.spline:build_nsf_ar",
    "bnaf": "pyroflows.transforms.bnaf:build_bnaf",
}


@dataclass(frozen=True)
class FamilySpec:
    """What a family supports, and how the conformance suite should exercise it.

    Attributes:
        vector: accepts ``shape = D``.
        image: accepts ``shape = (C, H, W)``.
        conditional: accepts ``context_dim``.
        default_layers: ``num_layers`` when the user gives none.
        default_hidden: ``hidden_dims`` when the user gives none.
        test_options: extra options the test suite passes (e.g. an exact log-det mode).
        inverse_atol: absolute tolerance of the round trip (iterative inverses are approximate).
        min_dim: smallest vector dimension the family supports.
    """

    vector: bool = True
    image: bool = False
    conditional: bool = True
    default_layers: int = 4
    default_hidden: tuple[int, ...] = (64, 64)
    test_options: dict[str, Any] = field(default_factory=dict)
    inverse_atol: float = 1e-4
    min_dim: int = 1


def flow_family(**spec: Any) -> Callable[[Callable], Callable]:
    """Decorator attaching a ``FamilySpec`` to a builder function.

    Args:
        **spec: the fields of ``FamilySpec``.

    Returns:
        The decorator; the builder it returns carries ``.spec``.
    """

    def attach(builder: Callable) -> Callable:
        builder.spec = FamilySpec(**spec)
        return builder

    return attach


def available_flows() -> list[str]:
    """Names of every registered flow family, in registration order."""
    return list(_FAMILIES)


def get_builder(name: str) -> Callable:
    """The builder of family ``name``.

    Args:
        name: one of [`available_flows`][pyroflows.available_flows]; anything else is a
            ``ValueError`` listing the families.

    Returns:
        The builder function, with its [`FamilySpec`][pyroflows.registry.FamilySpec] as ``.spec``.
    """
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"unknown flow {name!r}; available flows: {', '.join(_FAMILIES)}")
    module, attr = _FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def family_spec(name: str) -> FamilySpec:
    """The ``FamilySpec`` of a family.

    Args:
        name: one of ``available_flows()``.

    Returns:
        What the family supports and how the tests exercise it.
    """
    return get_builder(name).spec


def normalize_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """The event shape as a tuple.

    Args:
        shape: ``D`` for vectors or ``(C, H, W)`` for images, every size a positive int.

    Returns:
        ``(D,)`` or ``(C, H, W)``.
    """
    dims = (shape,) if isinstance(shape, int) else shape
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) not in (1, 3):
        raise ValueError(f"shape must be an int D or a tuple (C, H, W), got {shape!r}")
    return tuple(check_int(s, "shape") for s in dims)


def normalize_hidden(hidden_dims: int | Sequence[int]) -> tuple[int, ...]:
    """The conditioner widths as a tuple.

    Args:
        hidden_dims: one positive int, or a non-empty sequence of them.

    Returns:
        ``(h,)`` for an int, else the widths as a tuple.
    """
    dims = (hidden_dims,) if isinstance(hidden_dims, int) else hidden_dims
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise ValueError(
            "hidden_dims must be a positive int or a non-empty sequence of them, "
            f"got {hidden_dims!r}"
        )
    return tuple(check_int(h, "hidden_dims") for h in dims)


def build_flow(
    name: str,
    shape: int | Sequence[int],
    *,
    num_layers: int | None = None,
    hidden_dims: int | Sequence[int] | None = None,
    context_dim: int | None = None,
    **family_options: Any,
) -> Flow:
    """Build a normalizing flow of family ``name`` over events of ``shape``.

    Args:
        name: one of ``available_flows``.
        shape: ``D`` for vectors, ``(C, H, W)`` for images.
        num_layers: number of layers (family default if ``None``).
        hidden_dims: widths of the conditioner networks (if ``None``: the family default, each
            width raised to at least ``2 * D`` for ``D``-dimensional vectors, so MADE-style
            networks can connect every output).
        context_dim: width of a context vector for a conditional flow ``p(x | context)``.
        **family_options: options of the family's builder (see its docs).

    Returns:
        A ``pyroflows.Flow`` on a standard-Normal base.

    Example:
        >>> flow = build_flow("realnvp", 2)
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """
    from pyroflows.flow import Flow

    builder = get_builder(name)
    spec: FamilySpec = builder.spec
    shape = normalize_shape(shape)
    if len(shape) == 1 and not spec.vector:
        raise ValueError(f"flow {name!r} works on images: shape must be (C, H, W), got {shape}")
    if len(shape) == 3 and not spec.image:
        raise ValueError(f"flow {name!r} works on vectors: shape must be an int D, got {shape}")
    if len(shape) == 1 and shape[0] < spec.min_dim:
        raise ValueError(f"flow {name!r} needs shape >= {spec.min_dim}, got {shape[0]}")
    num_layers = check_int(spec.default_layers if num_layers is None else num_layers, "num_layers")
    if (
        hidden_dims is None
    ):  # the family default, widened so networks over D inputs stay wide enough
        hidden_dims = (
            tuple(max(h, 2 * shape[0]) for h in spec.default_hidden)
            if len(shape) == 1
            else spec.default_hidden
        )
    hidden = normalize_hidden(hidden_dims)
    if context_dim is not None:
        check_int(context_dim, "context_dim")
        if not spec.conditional:
            raise ValueError(f"flow {name!r} has no conditional form: context_dim must be None")
    layers = builder(
        shape, num_layers=num_layers, hidden_dims=hidden, context_dim=context_dim, **family_options
    )
    config = dict(
        name=name,
        shape=shape,
        num_layers=num_layers,
        hidden_dims=hidden,
        context_dim=context_dim,
        **family_options,
    )
    return Flow(shape, layers, context_dim=context_dim, config=config)
