"""Replay of a model's log-density as a traced graph: the same energies and gradients as
executing the model, on inputs other than the trace's, retraced when captured data changes,
eager where a graph would be wrong, and exact higher derivatives."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import default_device_trap
from test_potential import eight_schools, kidiq_like, mixture, regression

from pyroflows.datasets import posteriordb as pdb
from pyroflows.mcmc import ModelPotential
from pyroflows.mcmc.replay import Replay

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def garch():
    gen = torch.Generator().manual_seed(3)
    y = 5 + torch.randn(15, generator=gen, dtype=F64)
    return pdb.garch11, dict(T=15, y=y, sigma1=torch.tensor(0.5, dtype=F64))


def replayed_and_executed(potential, u):
    """Energy and gradient through the replay path (after two calls) and by executing."""

    def value_and_grad():
        x = u.clone().requires_grad_(True)
        value = potential.energy(x)
        return value.detach(), torch.autograd.grad(value.sum(), x)[0]

    potential.replay = True
    for _ in range(2):
        value_and_grad()
    replayed = value_and_grad(), potential.value_and_grad(u)
    potential.replay = False
    executed = value_and_grad()
    potential.replay = True
    return replayed, executed


@pytest.mark.parametrize("case", [eight_schools, regression, mixture, kidiq_like, garch])
def test_replay_equals_execution_on_new_points(case):
    model, data = case()
    potential = ModelPotential(model, **data)
    gen = torch.Generator().manual_seed(0)
    (via_energy, fused), (value, grad) = replayed_and_executed(
        potential, torch.randn(6, potential.dim, generator=gen, dtype=F64)
    )
    assert potential._replay._graphs, "no graph was traced"
    assert all(graph is not None for graph in potential._replay._graphs.values())
    # points the graph was not traced at: the graph is a function, not a memo
    u = 2 * torch.randn(6, potential.dim, generator=gen, dtype=F64)
    (via_energy, fused), (value, grad) = replayed_and_executed(potential, u)
    for replayed_value, replayed_grad in (via_energy, fused):
        assert torch.allclose(replayed_value, value, rtol=1e-10, atol=1e-10)
        assert torch.allclose(replayed_grad, grad, rtol=1e-9, atol=1e-9)


def test_replay_after_data_change_in_place():
    y = torch.tensor([1.0, 2.0, 3.0], dtype=F64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", 3, dim=-1):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    potential = ModelPotential(model)
    u = torch.zeros(4, 1, dtype=F64)
    for _ in range(3):
        before = potential.energy(u)
    y.add_(1.0)  # e.g. new data copied into the same tensor
    after = potential.energy(u)
    assert torch.allclose(after - before, torch.full_like(before, 0.5 * (29 - 14)))


def masked(u):
    return (u[u > 0] ** 2).sum() + (u**2).sum(-1)


def branching(u):
    return (u**2).sum(-1) if u.sum() > 0 else (u**4).sum(-1)


@pytest.mark.parametrize("energy", [masked, branching])
def test_value_dependent_energy_is_executed_with_a_warning(energy):
    """Boolean indexing by the input's values has a value-dependent shape, and a Python branch
    on them reads a value back: a graph traced at one point would be wrong at others, so the
    energy is executed every time."""
    replay = Replay(energy)
    u = torch.randn(5, 3, dtype=F64)
    assert replay.lookup(u, True) is None  # first sight of the shape
    with pytest.warns(RuntimeWarning, match="cannot be replayed"):
        assert replay.lookup(u, True) is None
    assert replay.lookup(u, True) is None  # decided once per shape, warned once


def test_second_derivatives_execute_the_model():
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    u = torch.randn(3, potential.dim, dtype=F64)
    for _ in range(3):
        potential.energy(u.clone().requires_grad_(True))

    def total(x):
        return potential.energy(x).sum()

    hessian = torch.autograd.functional.hessian(total, u[:1])
    potential.replay = False
    expected = torch.autograd.functional.hessian(total, u[:1])
    assert torch.allclose(hessian, expected, rtol=1e-9, atol=1e-9)


def test_graph_is_simplified():
    """Constant parts are folded: no op of the replayed graph has only constant operands, and
    the all-real model's log-Jacobian (identically 0) leaves no zeros behind."""
    model, data = eight_schools()
    potential = ModelPotential(model, **data)
    u = torch.randn(8, potential.dim, dtype=F64)
    for _ in range(2):
        potential.value_and_grad(u)
    (graph,) = [g.module for g in potential._replay._graphs.values()]
    constants = {n for n in graph.graph.nodes if n.op == "get_attr"}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.all_input_nodes:
            assert not all(n in constants for n in node.all_input_nodes), node.format_node()
    assert "zeros_like" not in graph.code


def funnel():
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=F64), 3.0))
    with pyro.plate("i", 9):
        pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=F64), torch.exp(v / 2)))


def test_peepholes_log_of_exp_and_the_gradient_as_one_concatenation():
    """The funnel's log(exp(v / 2)) is gone, and so are the gradient's zero-padded slices and
    the no-ops whose readers are pointwise (x - 0 on a slice of the input, s ** 1 on an
    expanded scale); energy and gradient are still the executed ones, on new points."""
    potential = ModelPotential(funnel)
    u = 2 * torch.randn(32, 10, generator=torch.Generator().manual_seed(0), dtype=F64)
    (via_energy, fused), (value, grad) = replayed_and_executed(potential, u)
    for replayed_value, replayed_grad in (via_energy, fused):
        assert torch.allclose(replayed_value, value, rtol=1e-10, atol=1e-10)
        assert torch.allclose(replayed_grad, grad, rtol=1e-10, atol=1e-10)
    (graph,) = [g.module for key, g in potential._replay._graphs.items() if key[-1]]
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert aten.log.default not in targets and aten.slice_backward.default not in targets
    assert aten.cat.default in targets
    assert not any(
        n.target is aten.pow.Tensor_Scalar and n.args[1] == 1 for n in graph.graph.nodes
    )
    other = 2 * torch.randn(32, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    replayed = graph(other)
    potential.replay = False
    executed = potential.value_and_grad(other)
    for a, b in zip(replayed, executed, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def correlated_gaussian(loc, scale_tril):
    pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def test_solves_against_a_constant_factor_become_products():
    """A MultivariateNormal with a fixed, ill-conditioned factor (condition number 1e4 of the
    covariance): no triangular solve is left in the graph, and the products with the factor's
    inverse give the executed energy and gradient."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=F64))
    cov = q @ torch.diag(torch.logspace(-2, 2, 12, dtype=F64)) @ q.T
    loc = torch.randn(12, generator=gen, dtype=F64)
    potential = ModelPotential(correlated_gaussian, loc, torch.linalg.cholesky(cov))
    u = 3 * torch.randn(16, 12, generator=gen, dtype=F64)
    (via_energy, fused), (value, grad) = replayed_and_executed(potential, u)
    graphs = [graph.module.code for graph in potential._replay._graphs.values()]
    assert graphs and not any("solve_triangular" in code for code in graphs)
    for replayed_value, replayed_grad in (via_energy, fused):
        assert torch.allclose(replayed_value, value, rtol=1e-10, atol=1e-10)
        assert torch.allclose(replayed_grad, grad, rtol=1e-9, atol=1e-9)
    exact = torch.linalg.solve(cov, (u - loc).T).T  # the gradient, -grad log N(u; loc, cov)
    assert torch.allclose(grad, exact, rtol=1e-8, atol=1e-8)


def test_replay_under_the_default_device_trap():
    """Tracing and replay create no tensor without a device (a model whose own plates do,
    as Pyro's plates without ``device=``, is executed instead under the trap)."""
    loc = torch.tensor([1.0, -1.0], dtype=F64)

    def model():
        x = pyro.sample("x", dist.Normal(loc, 1.0).to_event(1))
        pyro.sample("s", dist.LogNormal(x.sum(-1), 0.5))

    potential = ModelPotential(model)
    u = torch.randn(4, potential.dim, dtype=F64)
    expected = potential.value_and_grad(u)
    with default_device_trap():
        for _ in range(3):
            value, grad = potential.value_and_grad(u)
    assert all(graph is not None for graph in potential._replay._graphs.values())
    assert torch.allclose(value, expected[0]) and torch.allclose(grad, expected[1])
