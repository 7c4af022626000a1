r"""Replay: a batched energy (and its gradient) traced once into a flat graph of tensor ops.

Evaluating a Pyro model costs far more in Python than in arithmetic: every call runs the
effect handlers, builds each site's distribution, broadcasts its arguments and checks shapes,
and autograd then records all of it. For a model with static structure none of that changes
between calls, only the numbers do. [`Replay`][pyroflows.mcmc.replay.Replay] records the
tensor operations of one evaluation with ``torch.fx`` (``make_fx`` over ``torch.func``'s
``grad_and_value`` and ``functionalize``, so the gradient is part of the same graph and no op
mutates its input), simplifies the graph and runs it on later inputs of the same shape:

1. **constant folding**: every op that does not depend on the input's values (the data's
   transforms, ``log(scale)`` of fixed scales, ``zeros_like`` of a log-Jacobian that is
   identically 0) is evaluated once at trace time;
2. **no-op removal**: a view, expand, copy or clone whose result has its input's shape, strides
   and dtype, and multiplications by 1 and additions of 0;
3. **solves against constant matrices as products**: a triangular solve whose matrix is a
   constant (a ``MultivariateNormal``'s fixed Cholesky factor, in the log-density and again,
   transposed, in its gradient) becomes a product with the factor's inverse, computed once: a
   matrix product costs a fraction of a solve over thousands of right-hand sides;
4. **common subexpressions** are computed once; dead ops are dropped;
5. **two peepholes**: ``log(exp(y))`` is ``y`` (a scale written ``exp(y)`` puts it in every
   log-density), and the gradient of the packed vector, a sum of one zero-padded
   ``slice_backward`` per site, becomes one concatenation.

**When a graph is used.** Only for an input shape, dtype and device seen twice (one-off shapes,
such as subsets of chains, are not worth a trace); only if tracing succeeds; only if the graph
reproduces the eager result at the trace input; and only if no op that depends on the input
reads values back to Python or has a value-dependent output shape (``.item()``, ``nonzero``,
boolean indexing): those make a recorded graph valid only at its trace input. Otherwise the
energy is evaluated eagerly, as before. A graph is retraced when a tensor it captured (the
model's data, a ``pyro.param``) changes in place, which its ``_version`` counter shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.func import functionalize, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from pyroflows.mcmc.core import is_rejectable, warn_fallback

__all__ = ["Replay"]

aten = torch.ops.aten

#: ops whose value depends only on their inputs' shapes, never on their values
_SHAPE_ONLY = {
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default, aten.new_empty.default, aten.zeros.default, aten.ones.default,
    aten.full.default, aten.empty.memory_format, aten.arange.default, aten.arange.start,
    aten.arange.start_step, aten.scalar_tensor.default,
}
#: ops that return their input unchanged when the result has the input's layout
_NO_OP_WHEN_SAME = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.alias.default, aten.clone.default, aten.detach.default, aten._to_copy.default,
    aten.lift_fresh_copy.default, aten.contiguous.default, aten.permute.default,
    aten.t.default, aten.squeeze.dim, aten.unsqueeze.default,
}
_IDENTITY_OPERAND = {
    aten.pow.Tensor_Scalar: 1, aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1,
    aten.div.Scalar: 1, aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0,
    aten.sub.Scalar: 0,
}
#: ops whose graph is only valid at the traced values when they depend on the input
_VALUE_DEPENDENT = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten.unique_dim.default,
    aten._unique2.default, aten.unique_consecutive.default,
}


def _random(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and (
        torch.Tag.nondeterministic_seeded in target.tags
    )


def _value_dependent(node: fx.Node, values: dict, constant: set) -> bool:
    """Whether ``node`` reads values back to Python or has a value-dependent output shape."""
    if node.target in _VALUE_DEPENDENT:
        return True
    masks = node.args[1] if node.target is aten.index.Tensor else ()
    return any(  # boolean-mask indexing by a computed mask
        isinstance(m, fx.Node) and m not in constant and values[m].dtype == torch.bool
        for m in masks
    )


def _equals(operand: Any, identity: float, values: dict) -> bool:
    """Whether ``operand`` (a number, or a folded constant) is ``identity`` everywhere."""
    if isinstance(operand, fx.Node):
        value = values.get(operand) if operand.op == "get_attr" else None
        return isinstance(value, torch.Tensor) and bool((value == identity).all())
    return isinstance(operand, int | float) and operand == identity


def _identity_source(node: fx.Node, values: dict) -> fx.Node | None:
    """The operand ``node`` returns unchanged, if any: a view, copy or clone with its input's
    layout; ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, ``x ** 1`` (also by an all-0 or all-1
    folded constant) whose result has ``x``'s shape and dtype, where ``x`` is contiguous or
    only pointwise ops read the result."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target in _NO_OP_WHEN_SAME:
        source = node.args[0]
        return source if _same_layout(values[node], values[source]) else None
    identity = _IDENTITY_OPERAND.get(node.target)
    if identity is None or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    commutes = node.target in (aten.add.Tensor, aten.mul.Tensor)
    source = a if _equals(b, identity, values) else None
    if source is None and commutes and _equals(a, identity, values):
        source = b
    if not isinstance(source, fx.Node):
        return None
    out, value = values[node], values[source]
    same = _same_layout(out, value) or (
        isinstance(value, torch.Tensor)
        and (out.shape, out.dtype, out.device) == (value.shape, value.dtype, value.device)
        # pointwise users read any layout alike (a slice of the input, an expanded scale)
        and (value.is_contiguous() or all(_pointwise(user) for user in node.users))
    )
    return source if same else None


def _pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and (
        torch.Tag.pointwise in node.target.tags
    )


def _same_layout(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)
    )


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value (shapes and constants for the passes)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        self.values[node] = out
        return out


def _solves_as_products(module: fx.GraphModule, values: dict) -> None:
    """Replace each triangular solve against a folded constant matrix by a product with that
    matrix's inverse (the graph is checked against an execution before it is used)."""
    for index, node in enumerate(list(module.graph.nodes)):
        if node.target is not aten.linalg_solve_triangular.default:
            continue
        matrix, rhs = node.args[:2]
        if matrix.op != "get_attr":
            continue
        upper = node.kwargs.get("upper", node.args[2] if len(node.args) > 2 else None)
        left = node.kwargs.get("left", True)
        unit = node.kwargs.get("unitriangular", False)
        value = values[matrix]
        eye = torch.eye(value.shape[-1], dtype=value.dtype, device=value.device)
        inverse = torch.linalg.solve_triangular(value, eye, upper=upper, unitriangular=unit)
        name = f"_inverse_{index}"
        module.register_buffer(name, inverse.contiguous(), persistent=False)
        with module.graph.inserting_before(node):
            attr = module.graph.get_attr(name)
            operands = (attr, rhs) if left else (rhs, attr)
            product = module.graph.call_function(aten.matmul.default, operands)
        node.replace_all_uses_with(product)
        module.graph.erase_node(node)
        values[attr] = inverse
        values[product] = torch.matmul(*(values.get(n, n) for n in operands))


def _log_of_exp(graph: fx.Graph) -> None:
    """``log(exp(y))`` as ``y``, also through an ``expand`` between them: a scale written as
    ``exp(y)`` has ``log(scale)`` in its log-density."""
    for node in list(graph.nodes):
        if node.target is not aten.log.default or not isinstance(node.args[0], fx.Node):
            continue
        inner, expand = node.args[0], None
        if inner.target is aten.expand.default and isinstance(inner.args[0], fx.Node):
            inner, expand = inner.args[0], inner.args[1]
        if inner.target is not aten.exp.default:
            continue
        source = inner.args[0]
        if expand is not None:
            with graph.inserting_before(node):
                source = graph.call_function(aten.expand.default, (source, expand))
        node.replace_all_uses_with(source)
        graph.erase_node(node)


def _gradient_as_concatenation(graph: fx.Graph, values: dict) -> None:
    """A sum of ``slice_backward`` pieces that tile one dimension (the gradient of a packed
    vector, one piece per site) as one ``cat``: no zero-filled copies, no additions."""

    def pieces(node: fx.Node) -> list[fx.Node]:
        if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs and all(
            isinstance(a, fx.Node) and len(a.users) == 1 for a in node.args
        ):
            return [p for a in node.args for p in pieces(a)]
        return [node]

    for node in reversed(list(graph.nodes)):
        if node.target is not aten.add.Tensor or node not in graph.nodes:
            continue
        parts = pieces(node)
        if len(parts) < 2 or any(p.target is not aten.slice_backward.default for p in parts):
            continue
        shape, dim = parts[0].args[1], parts[0].args[2]
        spans = sorted((p.args[3], p.args[4], p) for p in parts)
        tiles = all(p.args[1] == shape and p.args[2] == dim and p.args[5] == 1 for p in parts)
        ends = [0] + [end for _, end, _ in spans]
        if not tiles or [start for start, _, _ in spans] != ends[:-1] or ends[-1] != shape[dim]:
            continue
        with graph.inserting_before(node):
            cat = graph.call_function(aten.cat.default, ([p.args[0] for _, _, p in spans], dim))
        values[cat] = values[node]
        node.replace_all_uses_with(cat)


def simplify(module: fx.GraphModule, *example: torch.Tensor) -> fx.GraphModule:
    """Constant-fold, drop no-ops, deduplicate and prune a functional graph (in place).

    Raises:
        ValueError: an op that depends on the input reads values back to Python or has a
            value-dependent output shape.
    """
    recorder = _Recorder(module)
    recorder.run(*example)
    values, graph = recorder.values, module.graph
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and not _random(node.target):
            inputs = node.all_input_nodes
            if node.target in _SHAPE_ONLY or all(n in constant for n in inputs):
                constant.add(node)
        if node not in constant and _value_dependent(node, values, constant):
            raise ValueError(f"{node.target} depends on the input's values")
    for index, node in enumerate(list(graph.nodes)):
        if node not in constant or node.op != "call_function":
            continue
        value = values[node]
        if value is None:  # a check on constants (it ran at trace time)
            graph.erase_node(node)
        elif isinstance(value, torch.Tensor) and any(u not in constant for u in node.users):
            if not value.is_contiguous() and 0 not in value.stride():
                value = value.contiguous()  # a transposed factor slows the ops that read it
            name = f"_folded_{index}"
            module.register_buffer(name, value, persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            node.replace_all_uses_with(attr)
            values[attr] = value
    graph.eliminate_dead_code()
    _solves_as_products(module, values)
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        source = _identity_source(node, values)
        if source is not None:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            continue
        if _random(node.target):
            continue
        key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        if key in seen:  # node names are unique, so equal reprs mean equal operands
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
    _log_of_exp(graph)
    _gradient_as_concatenation(graph, values)
    graph.eliminate_dead_code()
    module.recompile()
    return module


class _Graph:
    """One traced graph, with the tensors it captured and their versions at trace time."""

    def __init__(self, module: fx.GraphModule, captured: list[torch.Tensor]) -> None:
        self.module = module
        self.captured = [(t, t._version) for t in captured]

    def stale(self) -> bool:
        return any(t._version != version for t, version in self.captured)


class Replay:
    """Traced graphs of a batched energy, one per input shape, dtype, device and derivative order.

    Args:
        energy: ``energy(x) -> Tensor[C]`` for ``x`` of shape ``(C, D)``, free of Python side
            effects that matter between calls.
        name: what to call the energy in the warning when it cannot be replayed.

    Example:
        >>> replay = Replay(lambda x: (x**2).sum(-1))
        >>> x = torch.randn(100, 3)
        >>> replay.lookup(x, with_grad=True) is None  # first sight of this shape: no trace
        True
        >>> value, grad = replay.lookup(x, with_grad=True)(x)
        >>> torch.allclose(grad, 2 * x)
        True
    """

    def __init__(self, energy: Callable[[torch.Tensor], torch.Tensor], name: str = "energy"):
        self.energy, self.name = energy, name
        self._graphs: dict[tuple, _Graph | None] = {}
        self._seen: dict[tuple, int] = {}
        self._trace_at: dict[tuple, int] = {}  # the call at which to trace a shape
        self._warned = False

    def lookup(self, x: torch.Tensor, with_grad: bool) -> Callable | None:
        """The graph for inputs like ``x``: ``graph(x) -> (U(x), grad U(x))`` with ``with_grad``,
        else ``(U(x),)``; ``None`` where there is none (not seen twice yet, or not replayable)."""
        key = (tuple(x.shape), x.dtype, x.device, with_grad)
        graph = self._graphs.get(key)
        if graph is not None and not graph.stale():
            return graph.module
        if key in self._graphs and graph is None:
            return None  # this shape cannot be replayed
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen < self._trace_at.get(key, 2):
            return None
        try:
            graph = self._trace(x.detach(), with_grad)
        except (ValueError, RuntimeError):
            # some input row has no density: trace at a later call, backing off so that a run
            # of such inputs does not pay a trace each
            self._trace_at[key] = 2 * seen
            return None
        self._graphs[key] = graph
        return None if graph is None else graph.module

    def _function(self, with_grad: bool) -> Callable:
        def value(x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.energy(x),)

        def value_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            def total(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                u = self.energy(y)
                return u.sum(), u

            grad, (_, u) = grad_and_value(total, has_aux=True)(x)
            return u, grad

        return value_and_grad if with_grad else value

    def _trace(self, x: torch.Tensor, with_grad: bool) -> _Graph | None:
        fn = self._function(with_grad)
        try:
            module = make_fx(functionalize(fn, remove="mutations"))(x)
            captured = [
                getattr(module, n.target) for n in module.graph.nodes if n.op == "get_attr"
            ]
            simplify(module, x)
            with torch.no_grad():
                replayed, expected = module(x), fn(x)
            for a, b in zip(replayed, expected, strict=True):
                if not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
                    raise ValueError("the graph does not reproduce the eager result")
        except Exception as error:  # anything tracing cannot follow: evaluate eagerly
            if is_rejectable(error):  # not the graph's fault: some input row has no density
                raise
            self._warn(error)
            return None
        return _Graph(module, [t for t in captured if isinstance(t, torch.Tensor)])

    def _warn(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            warn_fallback(
                f"the {self.name} cannot be replayed as a traced graph",
                error,
                "it is evaluated eagerly, which is slower",
                stacklevel=4,
            )
