"""Compiled leapfrog trajectories: the same trajectory as eager steps up to rounding (padding
steps included), the right posterior when sampling, the ski-rental rule, and an eager fallback
with a warning when compiling fails."""

import math
import shutil
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import mcmc
from pyroflows.mcmc import ModelPotential
from pyroflows.mcmc import compiled as compiled_module
from pyroflows.mcmc.compiled import TrajectoryCompiler, expected_compile_seconds
from pyroflows.mcmc.core import EnergyFunction, dense_metric, diagonal_metric, leapfrog

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
    reason="torch.compile needs a C++ compiler on CPU",
)


def funnel(scale: torch.Tensor) -> None:
    v = pyro.sample("v", dist.Normal(0.0 * scale, 3.0 * scale))
    with pyro.plate("i", 4):
        pyro.sample("x", dist.Normal(0.0 * scale, torch.exp(v / 2)))


def lognormal_and_gaussians(loc: torch.Tensor) -> None:
    """The posterior is the prior: s ~ LogNormal(0.5, 0.4), z ~ N(loc, 1) in 3 dims."""
    pyro.sample("s", dist.LogNormal(loc.new_tensor(0.5), 0.4))
    with pyro.plate("d", 3):
        pyro.sample("z", dist.Normal(loc, 1.0))


def traced_energy(num_chains: int) -> tuple[EnergyFunction, torch.Tensor]:
    potential = ModelPotential(funnel, torch.tensor(1.0, dtype=F64))
    energy = EnergyFunction(potential, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_chains, potential.dim, generator=gen, dtype=F64)
    for _ in range(2):  # the replay traces on the second sight of a shape
        energy.value_and_grad(x)
    assert energy.traced(x) is not None
    return energy, x


@needs_compiler
@pytest.mark.parametrize("per_chain", [False, True], ids=["shared step", "per-chain steps"])
@pytest.mark.parametrize("metric_form", ["diagonal", "dense", "dense_matmul"])
def test_compiled_trajectory_equals_eager_steps(metric_form, per_chain, monkeypatch):
    if metric_form == "dense_matmul":  # the form for many coordinates, on this small target
        monkeypatch.setattr(compiled_module, "_FUSED_DENSE_DIM", 0)
    dense = metric_form != "diagonal"
    energy, x = traced_energy(32)
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(x.shape, generator=gen, dtype=F64)
    _, grad = energy.value_and_grad(x)
    d = x.shape[1]
    metric = (
        dense_metric(torch.eye(d, dtype=F64) + 0.3)
        if dense
        else diagonal_metric(torch.linspace(0.5, 2.0, d, dtype=F64))
    )
    step = torch.tensor(0.05, dtype=F64)
    if per_chain:  # the warm-up's per-chain phase: one step size per chain, (C, 1)
        step = torch.linspace(0.01, 0.08, x.shape[0], dtype=F64).unsqueeze(-1)
    compiler = TrajectoryCompiler(True, unroll=4)
    calls = energy.num_calls
    integrate = compiler.integrator(energy, x, step)
    assert integrate is not leapfrog
    for num_steps in (7, 8, 1):  # padded with size-0 steps, exact multiple, shorter than unroll
        compiled = integrate(energy, x, p, grad, step, metric, num_steps)
        eager = leapfrog(energy, x, p, grad, step, metric, num_steps)
        for a, b in zip(compiled, eager, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert energy.num_calls - calls == 2 * (7 + 8 + 1)  # compiled steps are counted too
    assert len(compiler._compiled) == 1  # one compile serves every trajectory length


@needs_compiler
def test_remainders_go_through_a_one_step_trajectory_once_the_padding_has_cost_its_compile(
    monkeypatch,
):
    energy, x = traced_energy(32)
    p = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, grad = energy.value_and_grad(x)
    metric = dense_metric(torch.eye(x.shape[1], dtype=F64) + 0.3)
    step = torch.tensor(0.05, dtype=F64)
    compiler = TrajectoryCompiler(True, unroll=4)
    integrate = compiler.integrator(energy, x, step)
    cost = {"seconds": 3600.0}  # what compiling the one-step trajectory is expected to cost
    monkeypatch.setattr(compiled_module, "expected_compile_seconds", lambda *_: cost["seconds"])
    integrate(energy, x, p, grad, step, metric, 7)  # padded: 1 no-op step, far below a compile
    ((key, (_, variants)),) = compiler._compiled.items()
    assert list(variants) == [4] and 0 < compiler._padding_seconds[key]
    cost["seconds"] = 0.0  # a compile that costs nothing is paid for by the next padding step
    integrate(energy, x, p, grad, step, metric, 7)
    assert sorted(variants) == [1, 4]
    calls = energy.num_calls
    for num_steps in (7, 1, 4, 6):  # one call and three single steps, single steps only, ...
        compiled = integrate(energy, x, p, grad, step, metric, num_steps)
        eager = leapfrog(energy, x, p, grad, step, metric, num_steps)
        for a, b in zip(compiled, eager, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert energy.num_calls - calls == 2 * (7 + 1 + 4 + 6)


@needs_compiler
def test_sampling_with_compiled_trajectories_gets_the_posterior():
    kernel = mcmc.HMC(model=lognormal_and_gaussians, compile=True)
    loc = torch.tensor(1.5, dtype=F64)
    idata = mcmc.sample(
        kernel,
        num_chains=256,
        num_samples=300,
        warmup_steps=300,
        seed=0,
        progress=False,
        model_args=(loc,),
    )
    assert kernel.compiler._compiled, "the trajectories were not compiled"
    s = torch.as_tensor(idata.posterior["s"].values).flatten()
    z = torch.as_tensor(idata.posterior["z"].values).reshape(-1, 3)
    mean_s = math.exp(0.5 + 0.4**2 / 2)
    sd_s = mean_s * math.sqrt(math.expm1(0.4**2))
    # chains are many and nearly independent draws: a generous ESS of a quarter of the draws
    se = 1 / math.sqrt(s.numel() / 4)
    assert abs(s.mean().item() - mean_s) < 4 * sd_s * se
    assert abs(s.std().item() / sd_s - 1) < 0.1
    assert torch.allclose(z.mean(0), loc.expand(3), atol=4 * se)
    assert torch.allclose(z.std(0), torch.ones(3, dtype=F64), atol=0.1)


def test_auto_compiles_only_after_its_eager_budget():
    energy, x = traced_energy(8)
    step = torch.tensor(0.1, dtype=F64)
    compiler = TrajectoryCompiler("auto", compile_after=3600.0)
    integrate = compiler.integrator(energy, x, step)
    p = torch.zeros_like(x)
    _, grad = energy.value_and_grad(x)
    out = integrate(energy, x, p, grad, step, diagonal_metric(torch.ones(x.shape[1], dtype=F64)), 3)
    assert compiler.eager_seconds > 0 and not compiler._compiled
    assert torch.isfinite(out[2]).all()
    # ineligible: per-coordinate step sizes, or an energy without a replayed graph
    assert compiler.integrator(energy, x, step.expand(8, x.shape[1])) is leapfrog
    plain = EnergyFunction(lambda y: (y**2).sum(-1), 1)
    assert TrajectoryCompiler(True).integrator(plain, x, step) is leapfrog
    assert TrajectoryCompiler(False).integrator(energy, x, step) is leapfrog


def test_large_graphs_are_compiled_one_step_at_a_time_and_cost_more(monkeypatch):
    monkeypatch.setitem(compiled_module._compile_cost, "compiled_before", True)
    compiler = TrajectoryCompiler("auto", unroll=4)
    assert compiler._unroll_for(44) == 4  # the funnel's graph
    assert compiler._unroll_for(450) == 1  # GARCH(1,1)'s
    small, large = expected_compile_seconds(44, 4), expected_compile_seconds(450, 1)
    assert 0 < small < large
    energy, x = traced_energy(8)
    assert compiled_module._num_ops(energy.traced(x)) > 10


@pytest.mark.parametrize("horizon, due", [(10**12, True), (20, False), (None, False)])
def test_auto_compiles_early_when_the_run_is_known_to_be_long(horizon, due):
    """With the run's length known, the transitions left at the recent pace decide; without
    it (Pyro's MCMC), or for a short run, only the spent eager time does."""
    energy, x = traced_energy(8)
    step = torch.tensor(0.1, dtype=F64)
    metric = diagonal_metric(torch.ones(x.shape[1], dtype=F64))
    _, grad = energy.value_and_grad(x)
    p = torch.zeros_like(x)
    compiler = TrajectoryCompiler("auto", compile_after=3600.0)
    if horizon is not None:
        compiler.plan(horizon)
    compiler.new_run()
    for _ in range(2 * compiler.min_probe):
        integrate = compiler.integrator(energy, x, step)
        assert integrate == compiler._timed
        integrate(energy, x, p, grad, step, metric, 2)
    assert (compiler.integrator(energy, x, step) != compiler._timed) is due
    compiler.new_run()  # the plan was for one run only
    assert compiler.horizon is None


def test_per_chain_steps_compile_only_if_their_phase_can_pay():
    """The warm-up's per-chain phase is short: its own transitions left, at the recent pace,
    must take twice the compile eagerly (a cheap model's phase stays eager)."""
    energy, x = traced_energy(8)
    per_chain = torch.full((8, 1), 0.1, dtype=F64)
    compiler = TrajectoryCompiler("auto", compile_after=1.0)
    compiler.eager_transitions, compiler.recent_seconds = 2 * compiler.min_probe, 0.01
    compiler.plan_phase(100)  # 1 s eagerly: less than twice the compile
    assert compiler.integrator(energy, x, per_chain) == compiler._timed
    compiler.plan_phase(1000)  # 10 s eagerly
    assert compiler.integrator(energy, x, per_chain) not in (leapfrog, compiler._timed)
    # the shared step's rule is the run's (no horizon here, 0 s spent): still eager
    assert compiler.integrator(energy, x, torch.tensor(0.1, dtype=F64)) == compiler._timed
    compiler.new_run()  # the phase was this run's
    assert compiler._phase_left is None


@needs_compiler
def test_auto_compiles_once_the_budget_is_spent_and_per_run():
    energy, x = traced_energy(8)
    step = torch.tensor(0.1, dtype=F64)
    metric = diagonal_metric(torch.ones(x.shape[1], dtype=F64))
    _, grad = energy.value_and_grad(x)
    p = torch.ones_like(x)
    compiler = TrajectoryCompiler("auto", compile_after=1e-9)
    first = compiler.integrator(energy, x, step)
    first(energy, x, p, grad, step, metric, 2)  # eager, timed: spends the budget
    assert compiler.eager_seconds > 0 and not compiler._compiled
    out = compiler.integrator(energy, x, step)(energy, x, p, grad, step, metric, 2)
    assert compiler._compiled  # compiled on the call after the budget was spent
    expected = leapfrog(energy, x, p, grad, step, metric, 2)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(out, expected))
    compiler.new_run()  # a new run: its eager account starts at 0, the compile stays paid
    assert compiler.eager_seconds == 0.0
    assert compiler.integrator(energy, x, step) not in (leapfrog, compiler._timed)


def test_failed_compile_warns_once_and_stays_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    energy, x = traced_energy(8)
    step = torch.tensor(0.1, dtype=F64)
    compiler = TrajectoryCompiler(True)
    metric = diagonal_metric(torch.ones(x.shape[1], dtype=F64))
    _, grad = energy.value_and_grad(x)
    p = torch.ones_like(x)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = compiler.integrator(energy, x, step)(energy, x, p, grad, step, metric, 5)
    expected = leapfrog(energy, x, p, grad, step, metric, 5)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
    assert compiler.integrator(energy, x, step) is leapfrog


@needs_compiler
def test_a_build_failing_with_the_trusted_vector_isa_is_retried_with_inductors_probes(
    monkeypatch,
):
    tried = []
    real_options = compiled_module._inductor_options

    def options(trust_isa):
        tried.append(trust_isa)
        if trust_isa:
            raise RuntimeError("the C++ compiler rejects -mavx512f")
        return real_options(trust_isa)

    monkeypatch.setattr(compiled_module, "_inductor_options", options)
    energy, x = traced_energy(8)
    step = torch.tensor(0.1, dtype=F64)
    metric = diagonal_metric(torch.ones(x.shape[1], dtype=F64))
    _, grad = energy.value_and_grad(x)
    p = torch.ones_like(x)
    compiler = TrajectoryCompiler(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the retry succeeds: no warning
        out = compiler.integrator(energy, x, step)(energy, x, p, grad, step, metric, 8)
    assert tried == [True, False] and not compiler.failed
    expected = leapfrog(energy, x, p, grad, step, metric, 8)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(out, expected))


@needs_compiler
def test_each_compiled_trajectory_is_its_own_code_object_so_none_is_a_recompile(monkeypatch):
    # dynamo runs a code object eagerly after 8 recompiles; with errors on any recompile, two
    # graphs compiled in one process must both compile cleanly
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    step = torch.tensor(0.1, dtype=F64)
    for num_chains in (8, 16):  # two shapes: two graphs
        energy, x = traced_energy(num_chains)
        metric = diagonal_metric(torch.ones(x.shape[1], dtype=F64))
        _, grad = energy.value_and_grad(x)
        compiler = TrajectoryCompiler(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            integrate = compiler.integrator(energy, x, step)
            integrate(energy, x, torch.ones_like(x), grad, step, metric, 3)
        assert not compiler.failed


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile"):
        mcmc.HMC(model=funnel, compile="sometimes")
