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
which leaves position and momentum exactly where they are.

**When.** Compiling costs seconds (about 10 s for the first graph of a process on a 2-core CPU,
less for later ones), so it pays only on long runs. ``compile="auto"`` follows the ski-rental
rule: the kernel runs eager leapfrog steps until the time they have taken reaches what a compile
is expected to cost (``compile_after`` seconds, refined by the compiles this process has done),
then compiles, so a run is never more than about twice as slow as it would be had it known its
length in advance, and a short run never compiles. The account is per run (a kernel's later
runs start it at 0; one that has compiled runs compiled from their start). ``compile=True``
compiles at the first eligible trajectory. Eligible: the energy offers a replayed graph for the
chains' shape (a [`ModelPotential`][pyroflows.mcmc.ModelPotential] does), one step size is
shared by all chains, and the chains' state is flat ``(C, D)``. Should compiling fail (no C++
compiler, an op inductor cannot lower), one warning says so and the kernel stays eager.

**Reproducibility.** Fused arithmetic rounds differently from eager arithmetic, and chaotic
dynamics amplify the difference, so the draws change (not their distribution) from the
transition where compiled steps start. Under ``"auto"`` that transition depends on timing: pass
``compile=False`` (or ``True``) for draws that repeat bit for bit under a seed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from pyroflows.mcmc.core import EnergyFunction, Metric, leapfrog

__all__ = ["TrajectoryCompiler"]

#: seconds the next compile is expected to take: a first guess, then the last compile measured
_expected_compile_seconds = [10.0]


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

    return run


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
            (default: what the last compile of this process took, 10 s before any).
        unroll: leapfrog steps per compiled call.
    """

    def __init__(
        self, mode: bool | str = "auto", compile_after: float | None = None, unroll: int = 4
    ) -> None:
        self.mode, self.compile_after, self.unroll = mode, compile_after, unroll
        self.eager_seconds = 0.0
        self.failed = False
        self._compiled: dict[tuple, tuple[Callable, Callable]] = {}

    def new_run(self) -> None:
        """Start the eager-time account over (a kernel calls this when it initialises chains)."""
        self.eager_seconds = 0.0

    def integrator(
        self, energy: EnergyFunction, x: torch.Tensor, step_size: torch.Tensor
    ) -> Callable:
        """The leapfrog integrator for a transition from ``x`` with ``step_size``: compiled when
        eligible and due, else eager (timed, under ``"auto"``); same signature as
        [`leapfrog`][pyroflows.mcmc.core.leapfrog]."""
        if not self.mode or self.failed or step_size.dim() != 0 or x.dim() != 2:
            return leapfrog
        graph = energy.traced(x)
        if graph is None:
            return leapfrog
        threshold = self.compile_after
        if threshold is None:
            threshold = _expected_compile_seconds[0]
        # once this kernel has compiled, the cost is paid: later runs go compiled at once
        if self.mode == "auto" and self.eager_seconds < threshold and not self._compiled:
            return self._timed
        return lambda *args: self._compiled_leapfrog(graph, *args)

    def _timed(self, *args) -> tuple[torch.Tensor, ...]:
        start = time.perf_counter()
        out = leapfrog(*args)
        self.eager_seconds += time.perf_counter() - start
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
        key = (id(graph), metric.dense, tuple(x.shape), x.dtype, x.device)
        entry = self._compiled.get(key)
        if entry is None or entry[0] is not graph:
            entry = (graph, self._compile(graph, metric.dense, x, p, grad, step_size, metric))
            self._compiled[key] = entry
        run = entry[1]
        if run is None:
            return leapfrog(energy, x, p, grad, step_size, metric, num_steps)
        calls = -(-num_steps // self.unroll)
        # step k of the trajectory has size eps for k < L and 0 past the end (a no-op step)
        sizes = (torch.arange(calls * self.unroll, device=x.device) < num_steps).to(x.dtype)
        sizes = (sizes * step_size).reshape(calls, self.unroll)
        u = None
        for c in range(calls):
            x, p, u, grad = run(x, p, grad, sizes[c], metric.inverse_mass)
        energy.count(x, num_steps)
        return x, p, u, grad

    def _compile(
        self,
        graph: Callable,
        dense: bool,
        x: torch.Tensor,
        p: torch.Tensor,
        grad: torch.Tensor,
        step_size: torch.Tensor,
        metric: Metric,
    ) -> Callable | None:
        """Compile (and run once, which is when inductor compiles) a trajectory; ``None``
        after a warning if that fails."""
        start = time.perf_counter()
        try:
            run = torch.compile(
                _trajectory(graph, dense, x.shape[-1], self.unroll), fullgraph=True, dynamic=False
            )
            sizes = torch.zeros(self.unroll, dtype=x.dtype, device=x.device) + 0 * step_size
            run(x, p, grad, sizes, metric.inverse_mass)
        except Exception as error:  # no compiler, an op inductor cannot lower, ...
            self.failed = True
            reason = " ".join(str(error).split())[:200]
            warnings.warn(
                f"compiling the leapfrog trajectory failed ({type(error).__name__}: {reason}); "
                "the sampler continues with eager steps",
                RuntimeWarning,
                stacklevel=5,
            )
            return None
        _expected_compile_seconds[0] = time.perf_counter() - start
        return run
