r"""``BatchedKernel``: what every pyroflows kernel shares — the pure interface the driver runs,
and a thin Pyro ``MCMCKernel`` layer over it.

**Pure interface** (BlackJAX style; see `pyroflows.mcmc.core`). A kernel holds only its
hyper-parameters. ``kernel.init(position) -> state`` evaluates the chains;
``kernel.step(state, generator, params) -> (state, info)`` is one transition of every chain with
explicit parameters (step size, mass matrix, ...); warm-up is its own state, made by
``kernel.init_warmup`` and advanced by ``kernel.adapt``.
[`start`][pyroflows.mcmc.base.BatchedKernel.start] and
[`advance`][pyroflows.mcmc.base.BatchedKernel.advance] combine them into one
[`RunState`][pyroflows.mcmc.base.RunState], which is all a run needs: two runs from the same
chains and the same seeded generator give the same draws, and a second run of a kernel starts
where a fresh kernel would.

**How chains map onto Pyro.** A kernel's single site ``"x"`` holds *all* chains, shape
``(num_chains, *event_shape)``. Under ``pyro.infer.MCMC(kernel, num_samples, warmup_steps,
initial_params={"x": init})`` (Pyro's ``num_chains=1``) Pyro therefore sees one chain whose
value carries the chain dimension: ``mcmc.get_samples()["x"]`` has shape
``(num_samples, num_chains, *event_shape)`` and ``arviz.from_pyro(mcmc)`` puts the pyroflows
chains on the variable's first dimension (``x_dim_0``). There the kernel keeps the run state
itself and draws from a generator seeded from torch's global one (so ``pyro.set_rng_seed``
holds). [`pyroflows.mcmc.sample`][pyroflows.mcmc.sample] returns the chains as arviz chains
directly and records every statistic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.subsample_messenger import _Subsample

from pyroflows.mcmc.core import Energy, EnergyFunction
from pyroflows.validation import check_finite, check_int, check_tensor


class Warmup(NamedTuple):
    """A warm-up in progress: its configuration (fixed for the run) and its state."""

    adapter: Any
    state: Any


class RunState(NamedTuple):
    """Everything a run carries from one transition to the next.

    Attributes:
        chains: the kernel's chain state (``position`` is ``(C, *event)``).
        warmup: the warm-up in progress, or ``None`` once it is over.
        params: the parameters the next transition uses.
        t: transitions done.
    """

    chains: Any
    warmup: Warmup | None
    params: Any
    t: int


def _reject_model(trace: Any) -> None:
    """Raise ``TypeError`` if ``trace`` (of an "energy" call) holds latent sample sites: the
    callable is a Pyro model, which the kernels take by keyword."""
    sites = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
    ]
    if sites:
        raise TypeError(
            f"the energy looks like a Pyro model (latent sample sites {', '.join(sites[:5])}): "
            "pass it by keyword, e.g. HMC(model=fn), and its arguments as "
            "mcmc.sample(..., model_args=...)"
        )


class BatchedKernel(MCMCKernel):
    """Base class of the batched-chain kernels.

    Subclasses implement ``_init`` (the chain state at checked positions), ``step``,
    ``_stats`` and, if they adapt, ``init_warmup``, ``adapt`` and ``warmup_params``.

    Args:
        energy: batched energy $U$: ``energy(x)`` over ``x`` of shape ``(*batch, *event)``
            returns shape ``batch``; for example a `pyroflows.energies` target.
        model: a Pyro model instead of an energy (keyword only); [`sample`][pyroflows.mcmc.sample]
            builds its potential and [`bind`][pyroflows.mcmc.base.BatchedKernel.bind]s it.
    """

    #: the name of the kernel's single Pyro site
    site = "x"

    def __init__(self, energy: Energy | None = None, *, model: Callable | None = None) -> None:
        if (energy is None) == (model is None):
            raise TypeError(
                "give an energy (positionally) or a Pyro model (model=...), exactly one"
            )
        if model is not None and not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.energy: Energy | None = None
        self.potential: EnergyFunction | None = None
        if energy is not None:
            self.bind(energy)
        self.model = model  # the Pyro model (what Pyro's MCMC and arviz.from_pyro look for)
        self.transforms: dict = {}
        self.generator: torch.Generator | None = None
        self.run: RunState | None = None
        self.params: Any = None  # the parameters of the last run's sampling phase
        self.warmup_steps = 0
        self.stats: dict[str, torch.Tensor] = {}
        self._reset_totals()

    def bind(self, energy: Energy) -> BatchedKernel:
        """Make ``energy`` the kernel's target (the model path binds its potential here).

        Args:
            energy: batched energy ``energy(x) -> Tensor[batch]``.

        Returns:
            the kernel itself.
        """
        if not callable(energy):
            raise TypeError(
                f"energy must be callable (x -> Tensor[batch]), got {type(energy).__name__}"
            )
        try:
            inspect.signature(energy).bind(None)
        except TypeError:
            raise TypeError(
                "energy must be callable with one argument x (x -> Tensor[batch]); "
                "a Pyro model goes in by keyword: model=..."
            ) from None
        except ValueError:  # no signature to inspect (some builtins): checked at first call
            pass
        self.energy = energy
        calls, evals = (
            (self.potential.num_calls, self.potential.num_evals) if self.potential else (0, 0)
        )
        self.potential = EnergyFunction(energy, 1)
        self.potential.num_calls, self.potential.num_evals = calls, evals
        return self

    @property
    def num_energy_calls(self) -> int:
        """Batched energy calls made so far (all runs)."""
        return self.potential.num_calls if self.potential else 0

    @property
    def num_energy_evals(self) -> int:
        """Points at which the energy was evaluated so far, summed over chains (all runs)."""
        return self.potential.num_evals if self.potential else 0

    # -- the pure interface -------------------------------------------------------------------
    def init(self, position: Any) -> Any:
        """The chain state at ``position`` (``(num_chains, *event_shape)``), checked: a tensor
        of finite floats, of the energy's event shape, at a finite energy for every chain.

        Raises:
            TypeError: ``position`` is not a floating-point tensor, or the energy is a Pyro model.
            ValueError: wrong shape, NaN or inf, or chains at a non-finite energy.
        """
        if self.potential is None:
            raise ValueError(
                "the kernel has no energy bound: run a model kernel through mcmc.sample"
            )
        position = check_tensor(position, "init")
        event_shape = getattr(self.energy, "event_shape", None)
        if position.dim() < 1 or position.shape[0] == 0:
            raise ValueError(
                "init must have shape (num_chains, *event_shape) with num_chains >= 1, "
                f"got {tuple(position.shape)}"
            )
        if event_shape is not None and position.shape[1:] != torch.Size(event_shape):
            want = ", ".join(map(str, event_shape))
            raise ValueError(
                f"init must have shape (num_chains, {want}) for this energy, "
                f"got {tuple(position.shape)}"
            )
        check_finite(position, "init")
        position = position.detach()
        self.potential.event_dim = position.dim() - 1
        with poutine.trace() as tracer:  # a Pyro model passed as an energy shows sample sites
            try:
                state = self._init(position)
            except Exception:
                _reject_model(tracer.trace)
                raise
        _reject_model(tracer.trace)
        bad = ~torch.isfinite(state.energy)
        if bad.any():
            chains = bad.nonzero().flatten().tolist()
            more = " ..." if len(chains) > 10 else ""
            raise ValueError(
                f"init: chains {chains[:10]}{more} start at a non-finite energy; "
                "start them where energy(x) is finite"
            )
        return state

    def _init(self, position: torch.Tensor) -> Any:
        raise NotImplementedError

    def step(self, state: Any, generator: torch.Generator, params: Any = None) -> tuple[Any, Any]:
        """One transition of every chain (pure: the result depends only on the arguments and
        the generator's draws).

        Args:
            state: the chain state.
            generator: the source of every random number of the transition.
            params: the transition's parameters (default: the kernel's current ones).

        Returns:
            the new state and the transition's info (per-chain acceptance, flags, ...).
        """
        raise NotImplementedError

    def default_params(self, state: Any) -> Any:
        """The parameters a transition uses without warm-up (the constructor's values)."""
        return None

    def init_warmup(
        self, state: Any, warmup_steps: int, generator: torch.Generator
    ) -> Warmup | None:
        """The warm-up for ``warmup_steps`` steps from ``state`` (``None``: nothing to adapt)."""
        return None

    def adapt(
        self, warmup: Warmup, before: Any, after: Any, info: Any, generator: torch.Generator
    ) -> tuple[Warmup, Any]:
        """One warm-up step after the transition ``before -> after``; returns the new warm-up and
        the chain state (which a refitted proposal may have changed)."""
        return warmup, after

    def warmup_params(self, warmup: Warmup, final: bool = False) -> Any:
        """The parameters of the next warm-up transition (``final``: of the sampling phase)."""
        raise NotImplementedError

    def plan(self, num_transitions: int) -> None:
        """Told by the driver before ``start`` how many transitions the run will make (a kernel
        that trades a fixed cost for faster transitions, as HMC's trajectory compiler does,
        weighs it against them); by default ignored."""

    def start(self, position: Any, warmup_steps: int, generator: torch.Generator) -> RunState:
        """A run's state: chains at ``position``, a fresh warm-up of ``warmup_steps`` steps."""
        chains = self.init(position)
        warmup = self.init_warmup(chains, warmup_steps, generator) if warmup_steps else None
        params = self.warmup_params(warmup) if warmup is not None else self.default_params(chains)
        return RunState(chains, warmup, params, 0)

    def advance(self, run: RunState, generator: torch.Generator) -> tuple[RunState, Any]:
        """One transition of a run, with its warm-up step while warm-up lasts."""
        chains, info = self.step(run.chains, generator, run.params)
        warmup, params = run.warmup, run.params
        if warmup is not None:
            warmup, chains = self.adapt(warmup, run.chains, chains, info, generator)
            done = warmup.state.t >= warmup.adapter.warmup_steps
            params = self.warmup_params(warmup, final=done)
            if done:
                warmup = None
        return RunState(chains, warmup, params, run.t + 1), info

    def stats_of(self, run: RunState, info: Any) -> dict[str, torch.Tensor]:
        """Per-chain statistics of the transition that produced ``run`` (all ``(C,)``):
        ``accept_prob``, ``nonfinite``, ``diverging``, ``energy`` (the Hamiltonian for HMC, else
        $U$), ``potential`` ($U$), ``step_size`` and ``num_steps``."""
        u = run.chains.energy
        stats = {
            "accept_prob": info.accept_prob,
            "nonfinite": info.nonfinite,
            "diverging": torch.zeros_like(u, dtype=torch.bool),
            "energy": u,
            "potential": u,
            "step_size": torch.full_like(u, float("nan")),
            "num_steps": torch.ones_like(u),
        }
        stats.update(self._stats(run, info))
        return stats

    def _stats(self, run: RunState, info: Any) -> dict[str, torch.Tensor]:
        return {}

    # -- Pyro's MCMCKernel interface -----------------------------------------------------------
    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Start a run whose first ``warmup_steps`` steps adapt (Pyro calls this)."""
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
        if self.energy is None:
            raise ValueError(
                "a kernel built with model= runs through pyroflows.mcmc.sample(kernel, "
                "num_chains=..., num_samples=...), which builds and binds the model's potential"
            )
        self._reset_totals()
        if self.run is not None:
            self.set_chains(self.run.chains.position)

    @property
    def x(self) -> torch.Tensor | None:
        """The chains' current positions ``(num_chains, *event_shape)`` (``None`` before a run)."""
        return None if self.run is None else self.run.chains.position

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        if self.run is None:
            raise ValueError(
                f"set the chains first: kernel.initial_params = {{'{self.site}': init}} "
                "with init of shape (num_chains, *event_shape)"
            )
        return {self.site: self.x}

    @initial_params.setter
    def initial_params(self, params: dict[str, torch.Tensor]) -> None:
        if not isinstance(params, dict) or set(params) != {self.site}:
            raise ValueError(f"initial_params must be a dict with the single key {self.site!r}")
        self.set_chains(params[self.site])

    def set_chains(self, x: Any) -> None:
        """Start the kernel's own run (the Pyro path) from ``x``; on bad input nothing changes."""
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        generator = self.generator
        if generator is None or generator.device != device:
            # seeded from torch's global generator, so pyro.set_rng_seed makes runs repeatable
            seed = int(torch.randint(2**62, (), device="cpu"))
            generator = torch.Generator(device=device).manual_seed(seed)
        self.run = self.start(x, self.warmup_steps, generator)
        self.generator = generator
        if self.run.warmup is None:
            self.params = self.run.params

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Advance every chain one step; ``params[site]`` is the ``(num_chains, *event)`` state."""
        x = params[self.site]
        if self.run is None:
            self.set_chains(x)
        elif x is not self.x:  # the caller moved the chains: keep the warm-up, take the chains
            self.run = self.run._replace(chains=self.init(x))
        was_warming = self.run.warmup is not None
        self.run, info = self.advance(self.run, self.generator)
        if was_warming and self.run.warmup is None:
            self.params = self.run.params
        self.stats = stats = self.stats_of(self.run, info)
        self._totals["nonfinite"] += stats["nonfinite"].sum()
        if self.run.t > self.warmup_steps:
            self._totals["accept_prob"] += stats["accept_prob"].mean()
            self._totals["diverging"].append(stats["diverging"].any())
        return {self.site: self.x}

    def logging(self) -> dict[str, float]:
        """The latest mean acceptance probability and step size (Pyro's progress bar)."""
        if not self.stats:
            return {}
        return {
            "acc. prob": self.stats["accept_prob"].mean().item(),
            "step size": self.stats["step_size"].float().mean().item(),
        }

    def diagnostics(self) -> dict[str, Any]:
        """After a run: ``divergences`` (sampling steps where some chain diverged, the format
        ``arviz.from_pyro`` reads), ``acceptance rate`` and ``nonfinite rejections``."""
        steps = max((self.run.t if self.run else 0) - self.warmup_steps, 1)
        flags = self._totals["diverging"]
        diverging = torch.stack(flags).nonzero().flatten().tolist() if flags else []
        return {
            "divergences": diverging,
            "acceptance rate": float(self._totals["accept_prob"]) / steps,
            "nonfinite rejections": int(self._totals["nonfinite"]),
        }

    def _reset_totals(self) -> None:
        self._totals: dict[str, Any] = {"accept_prob": 0.0, "nonfinite": 0, "diverging": []}
