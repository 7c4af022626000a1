r"""Hamiltonian Monte Carlo over a batch of chains (MALA is the one-step case).

Each step draws a momentum $p \sim \mathcal N(0, M)$, runs $L$ leapfrog steps of size
$\epsilon$ on $H(x, p) = U(x) + \tfrac12 p^\top M^{-1} p$,

$$
p_{\frac12} = p - \tfrac{\epsilon}{2}\nabla U(x), \quad
x' = x + \epsilon M^{-1} p_{\frac12}, \quad
p' = p_{\frac12} - \tfrac{\epsilon}{2}\nabla U(x'),
$$

and accepts the end point per chain with probability $\min(1, e^{H(x, p) - H(x', p')})$. All
chains share $\epsilon$ and $M$, so one leapfrog step is one batched energy-and-gradient
evaluation. A transition whose energy error exceeds ``max_energy_error`` (or is not finite) is
flagged divergent and rejected.

**Warm-up.** Two adaptations (see `pyroflows.mcmc.adapt`), chosen by ``adapt``:

- ``"chees"`` (the default with 16 or more chains and no ``num_steps``): ChEES-HMC (Hoffman,
  Radul & Sountsov 2021). The trajectory length $T$ is tuned by Adam on the ChEES criterion
  across chains, every transition runs $L = \lceil h_t T / \epsilon \rceil$ leapfrog steps with
  $h_t$ from a Halton sequence in $(0, 1)$ (jittered lengths, no periodicity, the same for all
  chains so they stay one batched call), $\epsilon$ follows dual averaging on the harmonic mean
  of the acceptance probabilities, and $M^{-1}$ is the chains' pooled covariance (or variance)
  in Stan-style windows. The trajectories stay jittered after warm-up. A per-chain phase comes
  first (the first 20% of a warm-up of 100 steps or more): fixed 10-step trajectories with one step
  size per chain, each tuned on its own acceptance, so chains started far out do not pin a shared
  step; at its end chains whose energy is far above the rest restart from other chains' positions
  (`pyroflows.mcmc.core.restart_stragglers`), the mass matrix is the chains' robust spread, and the
  shared $\epsilon$ starts from the median per-chain one.
- ``"fixed"``: $L$ = ``num_steps`` (default 10), $\epsilon$ by dual averaging of the mean
  acceptance probability, $M^{-1}$ in the same windows.

**Mass matrix.** ``mass="dense"`` adapts a full $M^{-1}$, the chains' pooled covariance shrunk
towards its diagonal (`pyroflows.mcmc.adapt.shrunk_covariance`), which undoes linear correlations
between coordinates; ``mass="diag"`` only their scales. ``"auto"`` (the default) is dense when the
mass matrix is adapted, 16 or more chains run (their pooled draws estimate a $D \times D$
covariance; one chain's window would not) and the flattened event has at most 200 coordinates (a
dense metric costs two $(C, D) \times (D, D)$ products per leapfrog step, small next to an
energy's gradient at that size). A dense metric keeps its Cholesky factor $L$ ($LL^\top =
M^{-1}$) and $L^{-1}$, computed once per window: momenta are $L^{-\top}\xi$, the kinetic energy
$\tfrac12\lVert L^\top p\rVert^2$, with no factorisation inside a transition. Chains whose
energy lies far above the rest ([`straggling`][pyroflows.mcmc.core.straggling]) are left out of
the window estimates, so a few stragglers cannot inflate them.

Both start each window with a doubling/halving search for a "reasonable" $\epsilon$ (Hoffman &
Gelman 2014, Algorithm 4). During ChEES warm-up the number of leapfrog steps is read back from the
adapted $T / \epsilon$ once per transition (one scalar sync); after warm-up no transition reads
anything back.

With ``num_steps=1`` this is the Metropolis-adjusted Langevin algorithm,
$x' = x - \tfrac{\epsilon^2}{2} M^{-1}\nabla U(x) + \epsilon M^{-1/2}\xi$ with its MH correction
(Roberts & Tweedie 1996); its default target acceptance is then 0.574 (Roberts & Rosenthal
1998) instead of 0.8 (Stan's and Pyro's default; the asymptotic optimum for HMC is 0.65, Beskos et
al. 2013, but on targets with varying curvature such as the banana or the funnel a smaller step
diverges less often). ``jitter`` draws each chain's step size uniformly in
$\epsilon (1 \pm j)$ per transition, which breaks the periodicity of fixed-length trajectories.

Why not Pyro's ``HMC``: Pyro's kernel advances one chain (one potential evaluation per leapfrog
step per chain, through Pyro's model tracing); this one advances thousands per tensor operation —
``benchmarks/mcmc.py`` measures the difference in effective samples per second.

References: Neal (2011), *MCMC using Hamiltonian dynamics*; Hoffman & Gelman (2014), *The
No-U-Turn Sampler*, JMLR; Hoffman, Radul & Sountsov (2021), *An adaptive MCMC scheme for
setting trajectory lengths in Hamiltonian Monte Carlo*, AISTATS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from pyroflows.mcmc.adapt import ChEESAdaptation, WindowAdaptation
from pyroflows.mcmc.base import BatchedKernel, RunState, Warmup
from pyroflows.mcmc.compiled import TrajectoryCompiler
from pyroflows.mcmc.core import (
    Energy,
    HMCInfo,
    HMCState,
    Metric,
    dense_metric,
    diagonal_metric,
    halton,
    hmc_init,
    hmc_step,
    leapfrog,
    log_accept_prob,
    restart_stragglers,
)
from pyroflows.validation import (
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_probability,
)

#: the fewest chains with which ``adapt="auto"`` picks ChEES (and ``mass="auto"`` a dense metric)
CHEES_MIN_CHAINS = 16
#: the largest (flattened) event size for which ``mass="auto"`` picks a dense metric
MAX_DENSE_DIM = 200


class HMCParams(NamedTuple):
    """What one HMC transition needs besides the chains: $\\epsilon$, the mass matrix, the
    (un-jittered) number of leapfrog steps $T / \\epsilon$, and whether trajectories are
    jittered."""

    step_size: torch.Tensor
    metric: Metric
    num_steps: float
    jittered: bool


class HMC(BatchedKernel):
    """Batched-chain HMC with ChEES or fixed-length warm-up (see the module docs).

    Args:
        energy: batched energy $U$ (e.g. a `pyroflows.energies` target); must be
            differentiable.
        step_size: leapfrog step size $\\epsilon$ (the starting value when adapted).
        num_steps: leapfrog steps per transition $L$ (fixed-length HMC; 1: MALA); with ChEES,
            the initial trajectory length is ``num_steps * step_size`` (default: one step).
        adapt_step_size: tune $\\epsilon$ during warm-up.
        adapt_mass_matrix: tune the inverse mass matrix during warm-up.
        target_accept_prob: the acceptance aimed at (default: 0.651 for the harmonic mean
            with ChEES, 0.8 for fixed-length HMC, 0.574 for MALA).
        max_energy_error: an energy error $H' - H$ above this is a divergence.
        jitter: per-chain, per-transition relative step-size jitter $j \\in [0, 1)$.
        adapt: ``"chees"``, ``"fixed"``, or ``"auto"``: ChEES with at least 16 chains unless
            ``num_steps`` is given.
        learning_rate: ChEES's Adam learning rate on $\\log T$.
        max_steps: the most leapfrog steps a ChEES trajectory may take.
        mass: ``"diag"``, ``"dense"``, or ``"auto"``: dense when the mass matrix is adapted,
            at least 16 chains run and the flattened event has at most 200 coordinates.
        compile: run leapfrog trajectories compiled by ``torch.compile`` (energy graph and
            updates fused): ``"auto"`` once the run has spent as long in eager steps as a
            compile is expected to take, or earlier when the run is known to be long enough to
            repay it; ``True`` as soon as eligible; ``False`` never. Only an energy with a
            replayed graph (a Pyro model's potential) is eligible; see
            `pyroflows.mcmc.compiled`.
        model: a Pyro model instead of an energy (keyword only).

    Example:
        >>> from pyroflows import energies, mcmc
        >>> kernel = mcmc.HMC(energies.get("banana"))
        >>> idata = mcmc.sample(kernel, torch.zeros(256, 2), 200, warmup_steps=200, progress=False)
        >>> idata.posterior["x"].shape
        (256, 200, 2)
    """

    def __init__(
        self,
        energy: Energy | None = None,
        step_size: float = 0.1,
        num_steps: int | None = None,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        target_accept_prob: float | None = None,
        max_energy_error: float = 1000.0,
        jitter: float = 0.0,
        *,
        adapt: str = "auto",
        learning_rate: float = 0.025,
        max_steps: int = 1000,
        mass: str = "auto",
        compile: bool | str = "auto",
        model: Callable | None = None,
    ) -> None:
        self.mass = check_choice(mass, "mass", ("auto", "diag", "dense"))
        self.compiler = TrajectoryCompiler(check_choice(compile, "compile", ("auto", True, False)))
        self.initial_step_size = check_positive(step_size, "step_size")
        self.num_steps = None if num_steps is None else check_int(num_steps, "num_steps")
        self.max_energy_error = check_positive(max_energy_error, "max_energy_error")
        self.jitter = check_number(jitter, "jitter", low=0.0, high=1.0, high_open=True)
        self.adapt_mode = check_choice(adapt, "adapt", ("auto", "chees", "fixed"))
        if target_accept_prob is not None:
            check_probability(target_accept_prob, "target_accept_prob")
        self.target_accept_prob = target_accept_prob
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        self.max_steps = check_int(max_steps, "max_steps")
        self.adapt_step_size, self.adapt_mass_matrix = (
            bool(adapt_step_size),
            bool(adapt_mass_matrix),
        )
        super().__init__(energy, model=model)

    @property
    def step_size(self) -> torch.Tensor | None:
        """$\\epsilon$ of the last run's sampling phase."""
        return None if self.params is None else self.params.step_size

    @property
    def inverse_mass_matrix(self) -> torch.Tensor | None:
        """$M^{-1}$ of the last run's sampling phase: its diagonal (shape ``event_shape``), or
        the ``(D, D)`` matrix over the flattened event when dense."""
        return None if self.params is None else self.params.metric.inverse_mass

    def uses_chees(self, num_chains: int) -> bool:
        """Whether a run of ``num_chains`` chains adapts by ChEES."""
        if self.adapt_mode == "auto":
            return self.num_steps is None and num_chains >= CHEES_MIN_CHAINS
        return self.adapt_mode == "chees"

    def uses_dense_mass(self, num_chains: int, event_size: int) -> bool:
        """Whether a run of ``num_chains`` chains with ``event_size`` coordinates each adapts a
        dense mass matrix: the pooled covariance of many chains estimates one well and costs
        $O(D^2)$ per leapfrog step, small next to an energy evaluation up to a few hundred
        coordinates."""
        if self.mass == "auto":
            return (
                self.adapt_mass_matrix
                and num_chains >= CHEES_MIN_CHAINS
                and event_size <= MAX_DENSE_DIM
            )
        return self.mass == "dense"

    def _target(self, chees: bool) -> float:
        if self.target_accept_prob is not None:
            return self.target_accept_prob
        return 0.651 if chees else 0.574 if self.num_steps == 1 else 0.8

    # -- pure interface -----------------------------------------------------------------------
    def plan(self, num_transitions: int) -> None:
        """Pass the run's length to the trajectory compiler (``compile="auto"``)."""
        self.compiler.plan(num_transitions)

    def _init(self, position: torch.Tensor) -> HMCState:
        self.compiler.new_run()  # when to compile is decided per run (pyroflows.mcmc.compiled)
        return hmc_init(position, self.potential)

    def default_params(self, state: HMCState) -> HMCParams:
        """The constructor's $\\epsilon$ and $L$ (10 if not given), unit mass matrix (dense or
        diagonal as the run adapts it)."""
        x = state.position
        step = torch.as_tensor(self.initial_step_size, dtype=x.dtype, device=x.device)
        chees = self.uses_chees(x.shape[0])
        if self.uses_dense_mass(x.shape[0], x[0].numel()):
            metric = dense_metric(torch.eye(x[0].numel(), dtype=x.dtype, device=x.device))
        else:
            metric = diagonal_metric(torch.ones_like(x[0]))
        return HMCParams(step, metric, float(self.num_steps or 10), chees)

    def step(
        self, state: HMCState, generator: torch.Generator, params: HMCParams | None = None
    ) -> tuple[HMCState, HMCInfo]:
        """One HMC transition of every chain (see
        [`BatchedKernel.step`][pyroflows.mcmc.base.BatchedKernel.step])."""
        params = params or self.params or self.default_params(state)
        fraction = halton(state.iteration + 1) if params.jittered else 1.0
        num_steps = max(1, min(self.max_steps, math.ceil(fraction * params.num_steps - 1e-9)))
        step_size = params.step_size
        if step_size.dim() == 1:  # one per chain
            step_size = step_size.reshape((-1,) + (1,) * (state.position.dim() - 1))
        if self.jitter:
            u = torch.rand(
                state.energy.shape,
                generator=generator,
                device=step_size.device,
                dtype=step_size.dtype,
            )
            shape = (-1,) + (1,) * (state.position.dim() - 1)
            step_size = step_size * (1 + self.jitter * (2 * u - 1)).reshape(shape)
        return hmc_step(
            state,
            generator,
            self.potential,
            step_size,
            params.metric,
            num_steps,
            self.max_energy_error,
            self.compiler.integrator(self.potential, state.position, step_size),
        )

    def init_warmup(self, state: HMCState, warmup_steps: int, generator: torch.Generator) -> Warmup:
        """ChEES or windowed adaptation (module docs), starting from a searched $\\epsilon$."""
        params = self.default_params(state)
        step = params.step_size
        if self.adapt_step_size:
            step = self._find_step_size(state, generator, step, params.metric)
        dense = params.metric.dense
        if self.uses_chees(state.position.shape[0]):
            adapter = ChEESAdaptation(
                warmup_steps,
                self._target(True),
                self.learning_rate,
                self.max_steps,
                self.adapt_mass_matrix,
                initial_num_steps=self.num_steps or 10,
                dense=dense,
            )
            adapt_state = adapter.init(step, params.metric, state.position.shape[0])
            self.compiler.plan_phase(adapter.initial_steps)
            if self.num_steps is not None:
                adapt_state = adapt_state._replace(
                    log_trajectory=(step * self.num_steps).log(),
                    log_trajectory_avg=(step * self.num_steps).log(),
                )
            return Warmup(adapter, adapt_state)
        adapter = WindowAdaptation(
            warmup_steps,
            self._target(False),
            self.adapt_step_size,
            self.adapt_mass_matrix,
            metric="dense" if dense else "diag",
        )
        return Warmup(adapter, adapter.init(step, params.metric))

    def adapt(
        self,
        warmup: Warmup,
        before: HMCState,
        after: HMCState,
        info: HMCInfo,
        generator: torch.Generator,
    ) -> tuple[Warmup, HMCState]:
        """One warm-up step (see
        [`BatchedKernel.adapt`][pyroflows.mcmc.base.BatchedKernel.adapt])."""
        adapter = warmup.adapter
        if isinstance(adapter, ChEESAdaptation):
            length = info.num_steps * adapter.step_size(warmup.state)
            state, ended = adapter.update(
                warmup.state,
                before.position,
                before.energy,
                info.proposal,
                info.velocity,
                info.accept_prob,
                info.diverging,
                length,
            )
            step = adapter.step_size(state)
            metric = state.metric
            # the trajectory compiler weighs compiling per-chain steps against this phase only
            left = adapter.initial_steps - state.t
            self.compiler.plan_phase(left if left > 0 else None)
        else:
            state, ended = adapter.update(
                warmup.state, after.position, info.accept_prob, after.energy
            )
            step, metric = state.step_size, state.variance
        if isinstance(adapter, ChEESAdaptation) and state.t == adapter.initial_steps:
            after = restart_stragglers(after, generator)
        if ended and self.adapt_step_size:
            state = adapter.restart(state, self._find_step_size(after, generator, step, metric))
        return Warmup(adapter, state), after

    def warmup_params(self, warmup: Warmup, final: bool = False) -> HMCParams:
        """The parameters the warm-up gives now (``final``: for sampling)."""
        adapter, state = warmup.adapter, warmup.state
        if isinstance(adapter, ChEESAdaptation):
            step = adapter.step_size(state, final)
            if adapter.in_initial_phase(state):  # per-chain steps, fixed length
                return HMCParams(step, state.metric, float(adapter.initial_num_steps), False)
            steps = float(adapter.trajectory_length(state, final) / step)  # one scalar read-back
            return HMCParams(step, state.metric, steps, True)
        step = state.step_size
        if final and adapter.adapt_step_size:
            step = state.dual.log_avg.exp()
        return HMCParams(step, state.variance, float(self.num_steps or 10), False)

    def _stats(self, run: RunState, info: HMCInfo) -> dict[str, torch.Tensor]:
        u = info.hamiltonian
        return {
            "diverging": info.diverging,
            "energy": info.hamiltonian,
            "step_size": run.params.step_size.to(u).expand_as(u),
            "num_steps": torch.full_like(u, info.num_steps),
        }

    def _find_step_size(
        self,
        state: HMCState,
        generator: torch.Generator,
        step_size: torch.Tensor,
        metric: Metric,
    ) -> torch.Tensor:
        """Double or halve $\\epsilon$ until one leapfrog step's mean acceptance crosses 1/2."""

        def mean_accept(eps: torch.Tensor) -> float:
            p = metric.momentum(state.position, generator)
            _, p1, u1, _ = leapfrog(self.potential, state.position, p, state.grad, eps, metric, 1)
            delta = u1 + metric.kinetic(p1) - state.energy - metric.kinetic(p)
            return log_accept_prob(-delta).exp().mean().item()

        direction = 1.0 if mean_accept(step_size) > 0.5 else -1.0
        for _ in range(60):
            new = step_size * 2.0**direction
            if (mean_accept(new) > 0.5) != (direction > 0) or not 1e-10 < new.item() < 1e10:
                break
            step_size = new
        return step_size


def MALA(energy: Energy | None = None, step_size: float = 0.1, **options) -> HMC:  # noqa: N802 - reads as a class
    """The Metropolis-adjusted Langevin algorithm: [`HMC`][pyroflows.mcmc.HMC] with
    ``num_steps=1`` and fixed-length warm-up (options as for HMC, ``model=`` included)."""
    return HMC(energy, step_size=step_size, num_steps=1, adapt="fixed", **options)
