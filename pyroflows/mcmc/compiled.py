r"""Compiled leapfrog trajectories: a replayed energy graph and the leapfrog updates fused by
``torch.compile``.

A leapfrog step over thousands of chains runs a few dozen small tensor ops: the half-step of
the momentum, the position update, the energy's graph and its gradient (a model's potential,
replayed as a flat graph of aten ops: `pyroflows.mcmc.replay`), the second half-step. Eagerly
each op is a separate pass over memory with its own dispatch, which on a low-dimensional target
costs far more than the arithmetic.
[`TrajectoryCompiler`][pyroflows.mcmc.compiled.TrajectoryCompiler] hands ``unroll``
consecutive leapfrog steps, energy graph included, to ``torch.compile`` (inductor), which
fuses them into a few loops. A trajectory of $L$ steps then runs as
$\lceil L / \text{unroll} \rceil$ calls; the steps past $L$ in the last call have step size 0,
which leaves position and momentum exactly where they are. Those padding steps cost as much as
real ones, and short trajectories (one to three steps, common on regression posteriors under a
dense mass matrix) are then mostly padding. So the kernel keeps account of the time the padding
takes, and once it reaches what compiling a one-step trajectory is expected to cost (the same
ski rental as below), it compiles one and runs the remainder of each trajectory through it.

**When.** Compiling costs seconds, so it pays only on long runs: on a 2-core CPU about 4 s to load
inductor at a process's first compile (inductor's probe builds of the CPU's vector instruction
sets, another 5–7 s on a cold cache, are skipped: the CPU's own report is trusted, and the
probes run only should the build then fail), then roughly 0.01–0.07 s per op of the energy's
graph and unrolled step (a 44-op funnel unrolled 4 times: 3 s; the 450-op GARCH(1,1) graph,
compiled one step at a time as graphs over 800 unrolled ops are: about half a minute).
[`expected_compile_seconds`][pyroflows.mcmc.compiled.expected_compile_seconds] holds that model,
refined by each compile the process makes. Under ``compile="auto"`` the kernel runs eager leapfrog
steps and compiles once either (a) the time they have taken reaches what a compile is expected to
cost (or ``compile_after`` seconds): the ski-rental rule, under which a run is never more than about
twice as slow as it would be had it known its length in advance; or (b) the run's length is known
(the driver tells it) and the transitions left would take more than twice that long eagerly at the
recent pace: a long run compiles early instead of spending a compile's worth of time eagerly first.
A short run never compiles. Per-chain step sizes (the ChEES warm-up's per-chain phase, a fifth
of warm-up) compile only if that phase's own transitions left would take more than twice the
compile's time eagerly, so a cheap model's phase stays eager. The account is per run (a
kernel's later runs start it at 0; one that has compiled a form, shared or per-chain step sizes,
runs that form compiled from their start). ``compile=True`` compiles at the first eligible
trajectory. Eligible: the energy offers a replayed graph for the chains' shape (a
[`ModelPotential`][pyroflows.mcmc.ModelPotential] does), the step size is one for all chains or
one per chain (``(C, 1)``, as in the ChEES warm-up's per-chain phase; each form compiles its own
trajectory), and the chains' state is flat ``(C, D)``. Should compiling fail (no C++ compiler,
an op inductor cannot lower), one warning says so and the kernel stays eager.

**Reproducibility.** Fused arithmetic rounds differently from eager arithmetic, and chaotic
dynamics amplify the difference, so the draws change (not their distribution) from the
transition where compiled steps start. Under ``"auto"`` that transition depends on timing: pass
``compile=False`` (or ``True``) for draws that repeat bit for bit under a seed.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable

import torch

from pyroflows.mcmc.core import EnergyFunction, Metric, leapfrog, warn_fallback

__all__ = ["TrajectoryCompiler", "expected_compile_seconds"]

#: the cost model of a compile: seconds to load inductor (paid by a process's first compile),
#: seconds every compile takes however small its graph (tracing, the C++ build), then seconds per
#: graph op and unrolled step (a first guess, then the last compile's)
_compile_cost = {"first": 4.0, "each": 0.8, "per_op": 0.03, "compiled_before": False}
#: the least a compile is expected to cost per graph op and unrolled step
_MIN_SECONDS_PER_OP = 1e-3
#: the most graph ops times unrolled steps to compile as one call (compile time grows faster
#: than linearly with graph size, and a large graph's ops gain little from fusion)
_MAX_UNROLLED_OPS = 800


def _inductor_options(trust_isa: bool) -> contextlib.AbstractContextManager:
    """Inductor's configuration for a compile: with ``trust_isa``, the CPU's vector instruction
    set as the CPU reports it, without building and loading a probe library per candidate."""
    if not trust_isa:
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch({"cpp.vec_isa_ok": True})


def _num_ops(graph: Callable) -> int:
    """Ops in a replayed graph (an ``fx.GraphModule``); 50 for another callable."""
    nodes = getattr(getattr(graph, "graph", None), "nodes", None)
    return 50 if nodes is None else sum(node.op == "call_function" for node in nodes)


def expected_compile_seconds(num_ops: int, unroll: int) -> float:
    """What compiling ``unroll`` steps of a graph of ``num_ops`` ops is expected to cost."""
    first = 0.0 if _compile_cost["compiled_before"] else _compile_cost["first"]
    return first + _compile_cost["each"] + _compile_cost["per_op"] * num_ops * unroll


#: the most coordinates for which a dense mass matrix is applied as a fused product-sum
_FUSED_DENSE_DIM = 16


def _trajectory(graph: Callable, dense: bool, dim: int, unroll: int) -> Callable:
    """``unroll`` leapfrog steps through ``graph`` (``graph(x) -> (U, grad U)``), step ``k`` of
    size ``step_sizes[k]``, as one function for ``torch.compile``."""
    small = dim <= _FUSED_DENSE_DIM

    def run(
        x: torch.Tensor,
        p: torch.Tensor,
        grad: torch.Tensor,
        step_sizes: torch.Tensor,
        inverse_mass: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        u = None
        for k in range(unroll):
            eps = step_sizes[k]
            p = p - 0.5 * eps * grad
            if not dense:
                velocity = inverse_mass * p
            elif small:
                # inductor fuses a broadcast product-sum into its loops; for a few coordinates
                # that beats a call to the BLAS matmul (10-D funnel: 43 against 57 us a step)
                velocity = (p.unsqueeze(-1) * inverse_mass).sum(-2)
            else:
                velocity = p @ inverse_mass
            x = x + eps * velocity
            u, grad = graph(x)
            p = p - 0.5 * eps * grad
        return x, p, u, grad

    # dynamo keeps compiled entries per code object, and after 8 it runs a code object eagerly
    # (its recompile limit): each trajectory gets its own copy, so any number of models and
    # kernels in one process run compiled
    return types.FunctionType(run.__code__.replace(), run.__globals__, "run", None, run.__closure__)


def _step_sizes(
    num_steps: int, calls: int, unroll: int, step_size: torch.Tensor
) -> torch.Tensor:
    """The step sizes of ``calls`` calls of ``unroll`` steps, ``(calls, unroll,
    *step_size.shape)``: step ``k`` of the trajectory has size $\\epsilon$ for ``k < num_steps``
    and 0 past the end (a no-op step)."""
    steps = torch.arange(calls * unroll, device=step_size.device) < num_steps
    return steps.to(step_size.dtype).reshape(calls, unroll, *[1] * step_size.dim()) * step_size


class TrajectoryCompiler:
    """When and how an HMC kernel runs its leapfrog trajectories compiled (module docs).

    A kernel holds one; [`integrator`][pyroflows.mcmc.compiled.TrajectoryCompiler.integrator]
    gives the function a transition integrates with. It memoises compiled trajectories (one
    per energy graph, metric form and shapes) and the eager time spent in the current run
    ([`new_run`][pyroflows.mcmc.compiled.TrajectoryCompiler.new_run] starts that account
    over); neither changes what a run computes beyond rounding.

    Args:
        mode: ``"auto"`` (ski rental), ``True`` (at once) or ``False`` (never).
        compile_after: under ``"auto"``, the eager leapfrog seconds after which to compile
            (default: [`expected_compile_seconds`][pyroflows.mcmc.compiled.expected_compile_seconds]
            of the graph).
        unroll: leapfrog steps per compiled call (1 for a graph whose ops times ``unroll``
            exceed 800).
    """

    #: transitions left out of the pace (they trace the graph), then timed before it is trusted
    #: (twice that in all); the weight of the latest transition in the pace
    min_probe, pace_weight = 10, 0.1

    def __init__(
        self, mode: bool | str = "auto", compile_after: float | None = None, unroll: int = 4
    ) -> None:
        self.mode, self.compile_after, self.unroll = mode, compile_after, unroll
        self.failed = False
        self._planned: int | None = None
        self._phase_left: int | None = None
        self.new_run()
        # key -> (graph, {unroll: compiled trajectory, or None after a failure}); the largest
        # unroll runs whole calls, a one-step trajectory (once it pays) the remainders
        self._compiled: dict[tuple, tuple[Callable, dict[int, Callable | None]]] = {}
        # seconds spent on padding steps, per key, towards compiling a one-step trajectory
        self._padding_seconds: dict[tuple, float] = {}

    def plan(self, num_transitions: int) -> None:
        """The next run's length in transitions (the driver knows it; Pyro's ``MCMC`` does
        not tell, and then the rule is plain ski rental)."""
        self._planned = num_transitions

    def plan_phase(self, num_transitions: int | None) -> None:
        """How many more transitions use one step size per chain (the ChEES warm-up's per-chain
        phase tells); ``None``: as many as the run has left."""
        self._phase_left = num_transitions

    def new_run(self) -> None:
        """Start the run's account over (a kernel calls this when it initialises chains)."""
        self.eager_seconds, self.eager_transitions, self.recent_seconds = 0.0, 0, 0.0
        self.horizon, self._planned, self._phase_left = self._planned, None, None

    def _due(self, threshold: float, per_chain: bool) -> bool:
        """Whether to compile now, under ``"auto"``: the eager time spent has reached the
        expected compile time (ski rental), or, with a known horizon, the transitions left would
        take more than twice that eagerly at the recent pace (compiling then pays for a speed-up
        of 2x or more: 2.6–7x measured on small graphs, 1.5x on GARCH's large one). Per-chain
        step sizes in a phase of known length: only that phase's transitions can pay."""
        if per_chain and self._phase_left is not None:
            probed = self.eager_transitions >= 2 * self.min_probe
            return probed and self.recent_seconds * self._phase_left >= 2 * threshold
        if self.eager_seconds >= threshold:
            return True
        if self.horizon is None or self.eager_transitions < 2 * self.min_probe:
            return False
        left = self.horizon - self.eager_transitions
        return self.recent_seconds * left >= 2 * threshold

    def integrator(
        self, energy: EnergyFunction, x: torch.Tensor, step_size: torch.Tensor
    ) -> Callable:
        """The leapfrog integrator for a transition from ``x`` with ``step_size``: compiled when
        eligible and due, else eager (timed, under ``"auto"``); same signature as
        [`leapfrog`][pyroflows.mcmc.core.leapfrog]."""
        # one step size for all chains, or one per chain (the warm-up's per-chain phase)
        shared_or_per_chain = step_size.dim() == 0 or step_size.shape == (x.shape[0], 1)
        if not self.mode or self.failed or not shared_or_per_chain or x.dim() != 2:
            return leapfrog
        graph = energy.traced(x)
        if graph is None:
            return leapfrog
        num_ops = _num_ops(graph)
        threshold = self.compile_after
        if threshold is None:
            threshold = expected_compile_seconds(num_ops, self._unroll_for(num_ops))
        # once this kernel has compiled this form (shared or per-chain step sizes), the cost is
        # paid: later runs go compiled at once
        form = step_size.dim()
        paid = any(key[3] == form for key in self._compiled)
        if self.mode == "auto" and not paid and not self._due(threshold, per_chain=form > 0):
            return self._timed
        return lambda *args: self._compiled_leapfrog(graph, *args)

    def _unroll_for(self, num_ops: int) -> int:
        return self.unroll if num_ops * self.unroll <= _MAX_UNROLLED_OPS else 1

    def _timed(self, *args) -> tuple[torch.Tensor, ...]:
        start = time.perf_counter()
        out = leapfrog(*args)
        seconds = time.perf_counter() - start
        self.eager_seconds += seconds
        self.eager_transitions += 1
        # the recent pace (trajectories lengthen as warm-up adapts them), from after the first
        # transitions, which also trace the energy's graph
        if self.eager_transitions == self.min_probe + 1:
            self.recent_seconds = seconds
        elif self.eager_transitions > self.min_probe:
            self.recent_seconds += self.pace_weight * (seconds - self.recent_seconds)
        return out

    def _compiled_leapfrog(
        self,
        graph: Callable,
        energy: EnergyFunction,
        x: torch.Tensor,
        p: torch.Tensor,
        grad: torch.Tensor,
        step_size: torch.Tensor,
        metric: Metric,
        num_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (id(graph), metric.dense, tuple(x.shape), step_size.dim(), x.dtype, x.device)
        entry = self._compiled.get(key)
        if entry is None or entry[0] is not graph:
            num_ops = _num_ops(graph)
            unroll = self._unroll_for(num_ops)
            entry = (graph, {unroll: self._compile(graph, metric, x, p, grad, step_size, unroll)})
            self._compiled[key], self._padding_seconds[key] = entry, 0.0
        variants = entry[1]
        unroll = max(variants)
        run = variants[unroll]
        if run is None:
            return leapfrog(energy, x, p, grad, step_size, metric, num_steps)
        full, rest = divmod(num_steps, unroll)
        single = variants.get(1)
        padded = rest > 0 and single is None  # the last call also runs unroll - rest no-ops
        calls = full + padded
        sizes = _step_sizes(num_steps, max(calls, 1), unroll, step_size)
        start, began = (x, p, grad), time.perf_counter()
        try:
            for c in range(calls):
                x, p, u, grad = run(x, p, grad, sizes[c], metric.inverse_mass)
            for _ in range(0 if padded else rest):
                x, p, u, grad = single(x, p, grad, sizes[0, :1], metric.inverse_mass)
        except torch.linalg.LinAlgError:
            # some chain's point has no finite density (a matrix the model factors is not
            # positive definite there): the eager trajectory finds and rejects those chains
            return leapfrog(energy, *start, step_size, metric, num_steps)
        if padded:
            seconds = time.perf_counter() - began
            self._padding_seconds[key] += seconds * (unroll - rest) / (calls * unroll)
            if self._padding_seconds[key] >= expected_compile_seconds(_num_ops(graph), 1):
                variants[1] = self._compile(graph, metric, x, p, grad, step_size, 1)
        energy.count(x, num_steps)
        return x, p, u, grad

    def _compile(
        self,
        graph: Callable,
        metric: Metric,
        x: torch.Tensor,
        p: torch.Tensor,
        grad: torch.Tensor,
        step_size: torch.Tensor,
        unroll: int,
    ) -> Callable | None:
        """Compile (and run once, which is when inductor compiles) a trajectory of ``unroll``
        steps; ``None`` after a warning if that fails."""
        num_ops = _num_ops(graph)
        first = 0.0 if _compile_cost["compiled_before"] else _compile_cost["first"]
        start = time.perf_counter()
        # first trusting the CPU's reported vector ISA, which skips inductor's probe builds
        # (seconds, most of a cold compile); should that build fail, again with the probes
        for trust_isa in (x.device.type == "cpu", False):
            try:
                run = torch.compile(
                    _trajectory(graph, metric.dense, x.shape[-1], unroll),
                    fullgraph=True,
                    dynamic=False,
                )
                sizes = _step_sizes(0, 1, unroll, step_size)[0]
                with _inductor_options(trust_isa):
                    run(x, p, grad, sizes, metric.inverse_mass)
                break
            except Exception as error:  # no compiler, an op inductor cannot lower, ...
                if trust_isa:
                    continue
                self.failed = True
                warn_fallback(
                    "compiling the leapfrog trajectory failed",
                    error,
                    "the sampler continues with eager steps",
                    stacklevel=5,
                )
                return None
        seconds = time.perf_counter() - start
        # a compile from warm caches can beat the guess: never expect one to be free
        per_op = (seconds - first - _compile_cost["each"]) / (num_ops * unroll)
        _compile_cost["per_op"] = max(per_op, _MIN_SECONDS_PER_OP)
        _compile_cost["compiled_before"] = True
        return run
