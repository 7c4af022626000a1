r"""``BatchedKernel``: the part every pyroflows kernel shares — a Pyro ``MCMCKernel`` whose state is
a batch of chains, with batched energy evaluation, one Metropolis–Hastings accept/reject, and
per-step statistics.

**How chains map onto Pyro.** A kernel's single site ``"x"`` holds *all* chains, shape
``(num_chains, *event_shape)``. Under ``pyro.infer.MCMC(kernel, num_samples, warmup_steps,
initial_params={"x": init})`` (Pyro's ``num_chains=1``) Pyro therefore sees one chain whose
value carries the chain dimension: ``mcmc.get_samples()["x"]`` has shape
``(num_samples, num_chains, *event_shape)`` and ``arviz.from_pyro(mcmc)`` puts the pyroflows
chains on the variable's first dimension (``x_dim_0``). :func:`pyroflows.mcmc.sample` returns
them as arviz chains directly and records every statistic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.subsample_messenger import _Subsample

Energy = Callable[[torch.Tensor], torch.Tensor]


def check_positive(value: Any, name: str, kind: type = float) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number (an int when ``kind`` is int)."""
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def check_probability(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def log_accept_prob(log_ratio: torch.Tensor) -> torch.Tensor:
    """$\\log \\min(1, r)$, with NaN (a non-finite proposal) mapped to $-\\infty$."""
    return torch.nan_to_num(log_ratio.clamp(max=0.0), nan=-math.inf)


def _reject_model(trace: Any) -> None:
    """Raise ``TypeError`` if ``trace`` (of an "energy" call) holds latent sample sites: the
    callable is a Pyro model, which the kernels take by keyword."""
    sites = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not isinstance(site["fn"], _Subsample)
    ]
    if sites:
        raise TypeError(
            f"the energy looks like a Pyro model (latent sample sites {', '.join(sites[:5])}): "
            "pass it by keyword, e.g. HMC(model=fn), and its arguments as "
            "mcmc.sample(..., model_args=...)"
        )


def _expand_as(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))


class BatchedKernel(MCMCKernel):
    """Base class of the batched-chain kernels.

    Subclasses implement :meth:`_step`, which moves ``self.x`` (``(C, *event)``) and ``self.u``
    (their energies, ``(C,)``) and returns the step's statistics, and may override
    :meth:`_start` (called when the chains are set) and :meth:`_configure` (called by
    :meth:`setup` at the start of a run).

    Args:
        energy: batched energy $U$: ``energy(x)`` over ``x`` of shape ``(*batch, *event)``
            returns shape ``batch``; for example a :mod:`pyroflows.energies` target.
    """

    #: the name of the kernel's single Pyro site
    site = "x"

    def __init__(self, energy: Energy | None = None, *, model: Callable | None = None) -> None:
        if (energy is None) == (model is None):
            raise TypeError("give an energy (positionally) or a Pyro model (model=...), exactly one")
        if model is not None and not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.energy: Energy | None = None
        if energy is not None:
            self.bind(energy)
        self.model = model  # the Pyro model (what Pyro's MCMC and arviz.from_pyro look for)
        self.generator: torch.Generator | None = None
        self.transforms: dict = {}
        self.x: torch.Tensor | None = None
        self.u: torch.Tensor | None = None
        self.warmup_steps = 0
        self.stats: dict[str, torch.Tensor] = {}
        self.num_energy_calls = 0
        self.num_energy_evals = 0
        self._reset_run()

    def bind(self, energy: Energy) -> BatchedKernel:
        """Make ``energy`` the kernel's target (the model path binds its potential here).

        Args:
            energy: batched energy ``energy(x) -> Tensor[batch]``.

        Returns:
            the kernel itself.
        """
        if not callable(energy):
            raise TypeError(f"energy must be callable (x -> Tensor[batch]), got {type(energy).__name__}")
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
        return self

    # -- Pyro's MCMCKernel interface -----------------------------------------------------
    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Start a run whose first ``warmup_steps`` steps adapt (Pyro calls this)."""
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self._reset_run()
        if self.x is not None:
            self._configure()

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        if self.x is None:
            raise ValueError(f"set the chains first: kernel.initial_params = {{'{self.site}': init}} with init of shape (num_chains, *event_shape)")
        return {self.site: self.x}

    @initial_params.setter
    def initial_params(self, params: dict[str, torch.Tensor]) -> None:
        if not isinstance(params, dict) or set(params) != {self.site}:
            raise ValueError(f"initial_params must be a dict with the single key {self.site!r}")
        self.set_chains(params[self.site])

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Advance every chain one step; ``params[site]`` is the ``(num_chains, *event)`` state."""
        x = params[self.site]
        if x is not self.x:  # the caller moved the chains: take them as the new state
            self.set_chains(x, configure=False)
        with torch.no_grad():
            stats = self._step()
        stats.setdefault("accept_prob", torch.ones_like(self.u))
        stats.setdefault("nonfinite", torch.zeros_like(self.u, dtype=torch.bool))
        stats.setdefault("diverging", torch.zeros_like(self.u, dtype=torch.bool))
        stats["energy"] = self.u
        self.stats = stats
        self._t += 1
        sampling = self._t > self.warmup_steps
        self._totals["nonfinite"] += stats["nonfinite"].sum()
        if sampling:
            self._totals["accept_prob"] += stats["accept_prob"].mean()
            self._totals["diverging"].append(stats["diverging"].any())
        return {self.site: self.x}

    def logging(self) -> dict[str, float]:
        """The latest mean acceptance probability and step size (Pyro's progress bar)."""
        out = {"acc. prob": self.stats["accept_prob"].mean().item()} if self.stats else {}
        if "step_size" in self.stats:
            out["step size"] = self.stats["step_size"].float().mean().item()
        return out

    def diagnostics(self) -> dict[str, Any]:
        """After a run: ``divergences`` (sampling steps where some chain diverged, the format
        ``arviz.from_pyro`` reads), ``acceptance rate`` and ``nonfinite rejections``."""
        steps = max(self._t - self.warmup_steps, 1)
        diverging = torch.stack(self._totals["diverging"]).nonzero().flatten().tolist() if self._totals["diverging"] else []
        return {
            "divergences": diverging,
            "acceptance rate": float(self._totals["accept_prob"]) / steps,
            "nonfinite rejections": int(self._totals["nonfinite"]),
        }

    # -- state ---------------------------------------------------------------------------
    def set_chains(self, x: Any, configure: bool = True) -> None:
        """Take ``x`` (``(num_chains, *event_shape)``) as the chains' state, checking it, and
        (with ``configure``) restart the run's adaptation for these chains."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"init must be a torch.Tensor of shape (num_chains, *event_shape), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"init must be a floating-point tensor, got dtype {x.dtype}")
        event_shape = getattr(self.energy, "event_shape", None)
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"init must have shape (num_chains, *event_shape) with num_chains >= 1, got {tuple(x.shape)}")
        if event_shape is not None and x.shape[1:] != torch.Size(event_shape):
            raise ValueError(f"init must have shape (num_chains, {', '.join(map(str, event_shape))}) for this energy, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("init contains NaN or inf")
        x = x.detach()
        if self.generator is None or self.generator.device != x.device:
            # under pyro.infer.MCMC: a generator seeded from torch's, so pyro.set_rng_seed holds
            seed = int(torch.randint(2**62, (), device="cpu"))
            self.generator = torch.Generator(device=x.device).manual_seed(seed)
        self.event_dim = x.dim() - 1
        with poutine.trace() as tracer:  # a Pyro model passed as an energy shows sample sites
            try:
                u = self.evaluate(x)
            except Exception:
                _reject_model(tracer.trace)
                raise
        _reject_model(tracer.trace)
        bad = ~torch.isfinite(u)
        if bad.any():
            chains = bad.nonzero().flatten().tolist()
            raise ValueError(f"init: chains {chains[:10]}{' ...' if len(chains) > 10 else ''} start at a non-finite energy; start them where energy(x) is finite")
        self.x, self.u = x, u
        self._start()
        if configure:
            self._configure()

    def evaluate(self, x: torch.Tensor, grad: bool = False) -> Any:
        """The energy at ``x`` (``(*batch, *event)``), checked to have shape ``batch``; with
        ``grad``, also its gradient. Counts the calls and the points evaluated."""
        batch = x.shape[: x.dim() - self.event_dim]
        if grad:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                u = self._call_energy(xg, batch)
                (g,) = torch.autograd.grad(u.sum(), xg)
            return u.detach(), g
        return self._call_energy(x, batch).detach()

    def _call_energy(self, x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
        u = self.energy(x)
        if not isinstance(u, torch.Tensor) or u.shape != batch:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"energy must return a tensor of shape {tuple(batch)} (one value per chain) for x of shape {tuple(x.shape)}, got {got}")
        self.num_energy_calls += 1
        self.num_energy_evals += batch.numel()
        return u

    def accept(self, x_new: torch.Tensor, u_new: torch.Tensor, log_ratio: torch.Tensor, *extra: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per-chain Metropolis–Hastings: accept ``x_new`` with probability $\\min(1, e^{r})$.

        A proposal whose energy, log-ratio or value is not finite is rejected and flagged, so no
        chain ever holds a non-finite value. Updates ``self.x`` and ``self.u``.

        Args:
            x_new: proposals ``(C, *event)``.
            u_new: their energies ``(C,)``.
            log_ratio: log acceptance ratios ``(C,)``.
            *extra: ``(current, proposed)`` pairs of per-chain caches to select alongside.

        Returns:
            ``accept_prob``, ``accepted``, ``nonfinite`` (each ``(C,)``) and the selected caches.
        """
        finite = torch.isfinite(u_new) & torch.isfinite(x_new.flatten(1)).all(1) & ~torch.isnan(log_ratio)
        log_prob = torch.where(finite, log_accept_prob(log_ratio), -math.inf)
        accepted = self.rand(log_prob).log() < log_prob
        self.x = torch.where(_expand_as(accepted, x_new), x_new, self.x)
        self.u = torch.where(accepted, u_new, self.u)
        chosen = tuple(torch.where(_expand_as(accepted, new), new, old) for old, new in extra)
        return (log_prob.exp(), accepted, ~finite, *chosen)

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal draws shaped like ``like``, from the run's generator."""
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def rand(self, like: torch.Tensor) -> torch.Tensor:
        """Uniform draws in [0, 1) shaped like ``like``, from the run's generator."""
        return torch.rand(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    # -- hooks ---------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self._t = 0
        self._totals: dict[str, Any] = {"accept_prob": 0.0, "nonfinite": 0, "diverging": []}

    @property
    def warming_up(self) -> bool:
        return self._t < self.warmup_steps

    def _start(self) -> None:
        """Called when new chains are set (recompute per-chain caches)."""

    def _configure(self) -> None:
        """Called at the start of a run once the chains are known (start adaptation)."""

    def _step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError
