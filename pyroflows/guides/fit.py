"""``fit_guide``: variational inference for any guide, a negative-ELBO closure run by the one
training loop ([`train_loop`][pyroflows.infer.loop.train_loop])."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyroflows.infer.importance import log_importance_weights
from pyroflows.infer.loop import run_generator, train_loop
from pyroflows.validation import check_int, check_number, check_positive


def _latent_dim(guide: Callable, args: tuple, kwargs: dict) -> int:
    """Number of scalar latent values the guide draws (its ``latent_dim`` when it has one)."""
    if getattr(guide, "latent_dim", None) is not None:
        return int(guide.latent_dim)
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return sum(
        site["value"].numel()
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary")  # e.g. AutoNormal's unconstrained twins
        and not site_is_subsample(site)  # a plate's index tensor
    )


def _subsamples(model: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a run of ``model`` subsamples a plate (draws a minibatch)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return any(
        site_is_subsample(site) and site["fn"].subsample_size not in (None, site["fn"].size)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )


def default_particles(dim: int) -> int:
    """ELBO particles per step for a ``dim``-dimensional posterior: ``2 * dim``, within
    ``[32, 64]`` (the gradient's variance grows with the dimension; vectorised particles are
    cheap next to a step, and a less noisy gradient fits the tails that k-hat judges: see
    the "Particles" paragraph in ``docs/guides.md``)."""
    return max(32, min(64, 2 * dim))


# fit_guide's settings for a guide that recommends none (num_particles None: by dimension)
GLOBAL_DEFAULTS: dict[str, Any] = dict(lr=1e-2, num_particles=None, anneal_steps=0,
                                       anneal_from=0.01, anneal_shape="linear",
                                       clip_to_median=None, forward_kl=0.0)
ANNEAL_SHAPES = ("linear", "cosine", "geometric")


def anneal_beta(step: int, anneal_steps: int, anneal_from: float, shape: str = "linear") -> float:
    """The tempering's $\\beta$ at ``step`` (counted from 1): it rises from ``anneal_from`` at
    step 1 towards 1 over ``anneal_steps`` steps, and is 1 from step ``anneal_steps + 1`` on.
    With $t = (\\text{step} - 1) / \\text{anneal\\_steps}$ and $\\beta_0$ = ``anneal_from``:
    ``"linear"`` $\\beta_0 + (1 - \\beta_0) t$, ``"cosine"``
    $\\beta_0 + (1 - \\beta_0)(1 - \\cos \\pi t) / 2$ (slow at both ends),
    ``"geometric"`` $\\beta_0^{1 - t}$ (equal ratios per step: longest near $\\beta_0$)."""
    if step > anneal_steps:
        return 1.0
    if shape == "linear":  # the expression of before, to the last bit
        return anneal_from + (1.0 - anneal_from) * (step - 1) / anneal_steps
    t = (step - 1) / anneal_steps
    if shape == "cosine":
        return anneal_from + (1.0 - anneal_from) * (1.0 - math.cos(math.pi * t)) / 2
    return anneal_from ** (1.0 - t)  # geometric


def fit_guide(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int = 5000,
    lr: float | None = None,
    final_lr: float | None = None,
    num_particles: int | None = None,
    elbo: ELBO | None = None,
    max_grad_norm: float | None = 10.0,
    clip_to_median: float | None = None,
    forward_kl: float | None = None,
    anneal_steps: int | None = None,
    anneal_from: float | None = None,
    anneal_shape: str | None = None,
    eval_every: int = 100,
    patience: int | None = 5,
    cooldown: int = 300,
    keep_best: bool = True,
    num_elbo_samples: int = 2000,
    progress: bool = True,
    seed: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train ``guide`` for ``model`` by stochastic variational inference, stopping when the
    ELBO reaches a plateau (or at the ``num_steps`` budget).

    The guide is called once first (an [`AutoFlow`][pyroflows.guides.AutoFlow] then makes its
    parameters and its warm start); then [`train_loop`][pyroflows.infer.loop.train_loop]
    minimises the negative ELBO over every parameter the model and guide use, with the learning
    rate decaying geometrically from ``lr`` to ``final_lr``. Every ``eval_every`` steps the mean
    loss of the last window is compared with the best so far; ``patience`` windows without an
    improvement beyond twice the window's standard error end the run, after ``cooldown`` more
    steps at a learning rate falling to 0.

    ``lr``, ``num_particles``, ``anneal_steps``, ``anneal_from``, ``anneal_shape``,
    ``clip_to_median`` and ``forward_kl`` left at ``None`` take the guide's recommendation,
    ``guide.fit_defaults(num_steps)`` where the guide has one (a spline
    [`AutoFlow`][pyroflows.guides.AutoFlow]: lr 3e-3, 256 particles, the first 80% of the
    budget tempered from $\\beta = 0.5$ along a half cosine, ``forward_kl=1``; see
    [`AutoFlow.fit_defaults`][pyroflows.guides.AutoFlow.fit_defaults]), else the global default
    named below. An argument given always wins.

    Args:
        model: a Pyro model.
        guide: its guide (any autoguide, [`AutoFlow`][pyroflows.guides.AutoFlow] included).
        *args: the model's and guide's arguments.
        num_steps: the step budget.
        lr: initial learning rate (global default ``1e-2``).
        final_lr: learning rate at the end of the budget (default ``lr / 10``).
        num_particles: vectorised particles per ELBO estimate (global default from the latent
            dimension, [`default_particles`][pyroflows.guides.fit.default_particles]; ignored
            when ``elbo`` is given).
        elbo: the objective; it needs ``differentiable_loss`` (``Trace_ELBO``,
            ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``). Default ``Trace_ELBO`` with
            vectorised particles, or, with a warning, one particle at a time for a model that
            does not broadcast over their plate (written for one draw, as ``X @ beta``).
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        clip_to_median: also clip each step's gradient norm to this multiple of the median
            norm of the last 200 steps ([`train_loop`][pyroflows.infer.loop.train_loop]);
            global default off (``math.inf`` turns off a guide's recommendation).
        forward_kl: weight $\\lambda \\ge 0$ of a mass-covering term: each step's negative
            ELBO gets $\\lambda$ times the self-normalised importance-sampled gradient of
            $\\mathrm{KL}(p \\,\\|\\, q)$ from the same draws
            ([`AutoFlow.forward_kl_surrogate`][pyroflows.guides.AutoFlow.forward_kl_surrogate];
            $p$ is the tempered model while annealing). Both divergences are zero only at
            $q = p$; the added term moves mass that the ELBO's gradient leaves misplaced, and
            its wide draws let it see mass beyond the guide's own draws
            (``docs/splines.md``, ninth pass). It needs an
            [`AutoFlow`][pyroflows.guides.AutoFlow] guide and no ``elbo`` (a recommended
            weight yields to a given ``elbo``), and costs the flow's inverse pass and a quarter
            more model evaluations per step. The recorded loss stays the negative ELBO.
            Global default 0 (off); spline guides recommend 1.
        anneal_steps: temper the model's log-density by $\\beta$ rising from ``anneal_from``
            to 1 over the first ``anneal_steps`` steps (Rezende & Mohamed 2015):
            the guide then fits $p^\\beta$, broad at first, which keeps reverse-KL training from
            dropping modes. No plateau stop happens while annealing. Global default 0 (no
            tempering).
        anneal_from: the first $\\beta$, in $(0, 1]$. The global default 0.01 spreads a guide
            very wide first; spline guides recommend 0.5 (``docs/splines.md``, fourth to sixth
            passes).
        anneal_shape: how $\\beta$ rises, one of ``"linear"`` (the global default),
            ``"cosine"`` and ``"geometric"``: [`anneal_beta`][pyroflows.guides.fit.anneal_beta].
        eval_every: steps per plateau window.
        patience: windows without improvement before stopping (``None``: run the budget).
        cooldown: steps after the plateau with the learning rate falling linearly to 0 (the
            optimiser's noise at a constant rate is what is left of the error there).
        keep_best: a guard against a run that falls apart late (a reverse-KL fit can slide off
            one branch of a multimodal posterior after it had it: ``docs/splines.md``, seventh
            pass). Every ``eval_every`` steps the untempered ELBO is estimated from
            ``max(256, num_particles)`` fresh draws and the parameters of the best estimate
            are kept; if the final ELBO falls short of that best by more than three standard
            errors of the difference, those parameters are restored, with a
            ``RuntimeWarning``. The checks draw inside a forked random state, so the training
            draws what it would without them. They are skipped for an ``elbo`` other than a
            ``Trace_ELBO`` (or subclass, as ``TraceMeanField_ELBO``): a ``TraceEnum_ELBO``
            sums out sites that fresh draws would sample, a different bound with a different
            optimum; for ``distributed`` runs; and for models that subsample a plate (a
            minibatch's ELBO is not comparable across checks).
        num_elbo_samples: guide draws for the final ELBO estimate (0: skip it; the model must
            be vectorisable over a particle plate for it).
        progress: show a tqdm progress bar.
        seed: seed of the run's generator; Pyro's sample statements draw from torch's global
            generator, which is seeded inside a ``fork_rng`` and restored afterwards.
        checkpoint: training checkpoint file (the guide's ``state_dict``, optimiser, random
            states, history; the guide must be an ``nn.Module``, and parameters a model makes
            with ``pyro.param`` are not in it).
        resume: continue from ``checkpoint`` when it exists.
        distributed: average gradients over an initialised ``torch.distributed`` group (every
            rank passes its own data shard; rank 0's guide parameters are broadcast first).
        **kwargs: the model's and guide's keyword arguments.

    Returns:
        The history of [`train_loop`][pyroflows.infer.loop.train_loop] (``train_loss`` is the
        negative ELBO estimate per step, of the tempered model while annealing;
        ``window_loss`` at ``eval_step``), plus ``num_particles``, ``restored_step`` (the step
        whose parameters ``keep_best`` restored, else ``None``) and, unless
        ``num_elbo_samples=0``, ``elbo`` and ``elbo_stderr``: the final ELBO from
        ``num_elbo_samples`` independent draws, and its Monte-Carlo standard error.

    Example:
        >>> from pyroflows import energies
        >>> from pyroflows.guides import AutoFlow
        >>> target = energies.get("banana")
        >>> guide = AutoFlow(target.model, flow="realnvp")
        >>> history = fit_guide(target.model, guide, num_steps=100, progress=False)
    """
    check_int(num_steps, "num_steps")
    recommend = getattr(guide, "fit_defaults", None)
    given = dict(lr=lr, num_particles=num_particles, anneal_steps=anneal_steps,
                 anneal_from=anneal_from, anneal_shape=anneal_shape,
                 clip_to_median=clip_to_median, forward_kl=forward_kl)
    settings = {**GLOBAL_DEFAULTS, **(recommend(num_steps) if callable(recommend) else {})}
    settings.update({key: value for key, value in given.items() if value is not None})
    lr, num_particles = settings["lr"], settings["num_particles"]
    anneal_steps, anneal_from = settings["anneal_steps"], settings["anneal_from"]
    anneal_shape, clip_to_median = settings["anneal_shape"], settings["clip_to_median"]
    forward_kl = check_number(settings["forward_kl"], "forward_kl", low=0.0)
    if forward_kl and elbo is not None:
        if given["forward_kl"] is not None:
            raise ValueError("forward_kl replaces the ELBO's estimator: pass it or elbo, not both")
        forward_kl = 0.0  # the caller's objective wins over the guide's recommendation
    if forward_kl and not hasattr(guide, "forward_kl_surrogate"):
        raise TypeError(
            f"forward_kl needs an AutoFlow guide (it draws from the guide's flow and evaluates "
            f"its density at fixed points), got {type(guide).__name__}"
        )
    if anneal_shape not in ANNEAL_SHAPES:
        raise ValueError(f"anneal_shape must be one of {ANNEAL_SHAPES}, got {anneal_shape!r}")
    check_int(anneal_steps, "anneal_steps", minimum=0)
    check_number(anneal_from, "anneal_from", low=0.0, high=1.0, low_open=True)
    check_int(num_elbo_samples, "num_elbo_samples", minimum=0)
    check_positive(lr, "lr")
    final_lr = lr / 10 if final_lr is None else check_positive(final_lr, "final_lr")
    if elbo is not None and not hasattr(elbo, "differentiable_loss"):
        raise TypeError(
            f"elbo must offer differentiable_loss (e.g. Trace_ELBO), got {type(elbo).__name__}"
        )
    if checkpoint is not None and not isinstance(guide, nn.Module):
        raise TypeError("checkpoint needs the guide to be an nn.Module (e.g. an autoguide)")
    module = guide if isinstance(guide, nn.Module) else nn.Module()
    with run_generator(seed, module) as g:
        guide(*args, **kwargs)  # parameters (and an AutoFlow's warm start) exist from here on
        if num_particles is None:
            num_particles = default_particles(_latent_dim(guide, args, kwargs))
        check_int(num_particles, "num_particles")
        loss = (
            elbo
            if elbo is not None
            else Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
        )
        beta = 1.0

        def tempered(*args: Any, **kwargs: Any) -> Any:
            with poutine.scale(scale=beta):
                return model(*args, **kwargs)

        try:
            with poutine.trace(param_only=True) as params:
                loss.differentiable_loss(tempered, guide, *args, **kwargs)
        except (RuntimeError, ValueError, IndexError) as error:
            if elbo is not None:
                raise
            # a model written for one draw (X @ beta) does not broadcast over the particles'
            # plate: the particles run one at a time; a genuine error raises again from there
            reason = " ".join(str(error).split())[:200]
            warnings.warn(
                f"the model does not run over a plate of ELBO particles ({reason}); fit_guide "
                f"runs its {num_particles} particles one at a time, as many model runs per "
                "step: write the model's sites to broadcast, or pass elbo= to choose",
                RuntimeWarning,
                stacklevel=2,
            )
            loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
            with poutine.trace(param_only=True) as params:
                loss.differentiable_loss(tempered, guide, *args, **kwargs)
        parameters = list(
            {
                id(p): p
                for p in (site["value"].unconstrained() for site in params.trace.nodes.values())
            }.values()
        )

        device = parameters[0].device
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):  # the model's prior draws: not the run's
            guard = (
                keep_best
                and not distributed
                # the checks' importance weights estimate Trace_ELBO's bound, not an enumerated
                # or Renyi one, whose optimum can differ
                and (elbo is None or isinstance(elbo, Trace_ELBO))
                and not _subsamples(model, args, kwargs)
            )
        check_draws = max(256, num_particles)
        best: dict[str, Any] = dict(elbo=-math.inf, stderr=0.0, step=None, values=None)

        def estimate(num_draws: int) -> tuple[float, float]:
            """ELBO and its standard error from fresh draws, leaving the random state as it
            was (the training's stream does not depend on the checks)."""
            with torch.random.fork_rng(devices=forked), torch.no_grad():
                log_w = log_importance_weights(model, guide, *args, num_samples=num_draws, **kwargs)
            return log_w.mean().item(), log_w.std().item() / math.sqrt(num_draws)

        def loss_fn(step: int) -> torch.Tensor:
            nonlocal beta
            if guard and step > 1 and (step - 1) % eval_every == 0:
                elbo_now, stderr = estimate(check_draws)
                if math.isfinite(elbo_now) and elbo_now > best["elbo"]:
                    values = [p.detach().clone() for p in parameters]
                    best.update(elbo=elbo_now, stderr=stderr, step=step - 1, values=values)
            beta = anneal_beta(step, anneal_steps, anneal_from, anneal_shape)
            if forward_kl:
                return guide.forward_kl_surrogate(
                    tempered, *args, num_samples=num_particles, weight=forward_kl, **kwargs
                )
            return loss.differentiable_loss(tempered, guide, *args, **kwargs)

        history = train_loop(
            module,
            loss_fn,
            num_steps=num_steps,
            lr=lr,
            generator=g,
            parameters=parameters,
            schedule="exponential",
            final_lr=final_lr,
            max_grad_norm=max_grad_norm,
            clip_to_median=clip_to_median,
            eval_every=eval_every,
            patience=patience,
            progress=progress,
            kind="fit_guide",
            checkpoint=checkpoint,
            resume=resume,
            distributed=distributed,
            plateau_after=anneal_steps,
            cooldown=cooldown,
        )
        history["num_particles"] = num_particles
        history["restored_step"] = None
        if best["values"] is not None:
            final, stderr = estimate(4 * check_draws)
            gap = best["elbo"] - final
            if not math.isfinite(final) or gap > 3 * math.hypot(best["stderr"], stderr):
                with torch.no_grad():
                    torch._foreach_copy_(parameters, best["values"])
                history["restored_step"] = best["step"]
                warnings.warn(
                    f"fit_guide: the final ELBO ({final:.4g} ± {stderr:.2g}) fell below the "
                    f"best seen ({best['elbo']:.4g} ± {best['stderr']:.2g}, step "
                    f"{best['step']}); the guide of that step is restored. The run was "
                    "unstable late: a lower lr or more particles may help",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if num_elbo_samples:
            with torch.no_grad():
                log_w = log_importance_weights(
                    model, guide, *args, num_samples=num_elbo_samples, **kwargs
                )
            history["elbo"] = log_w.mean().item()
            history["elbo_stderr"] = log_w.std().item() / math.sqrt(num_elbo_samples)
    return history
