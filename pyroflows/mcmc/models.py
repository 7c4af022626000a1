r"""The model path of [`sample`][pyroflows.mcmc.sample]: a Pyro model in, ``InferenceData`` out.

A kernel built with ``model=`` (``HMC(model=fn)``) is bound to the model's
[`ModelPotential`][pyroflows.mcmc.ModelPotential] energy, every chain starts from the init
strategy (one model execution for all of them), the kernel runs on the unconstrained vector, and
the draws are mapped back to the model's sites — constrained, in their own shapes, named after the
model's plates — together with the deterministic sites, the pointwise log-likelihood of every
observed site (for ``arviz.loo`` / ``arviz.waic`` / ``arviz.compare``) and the observed data.

The posterior feeds Pyro's posterior predictive after flattening ``(chain, draw)``::

    samples = {k: torch.as_tensor(v.values).flatten(0, 1) for k, v in idata.posterior.items()}
    predictive = pyro.infer.Predictive(model, posterior_samples=samples)(*model_args)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from pyroflows._optional import require
from pyroflows.mcmc.potential import InitStrategy, ModelPotential
from pyroflows.mcmc.reparam import carry_over, decentre, plan
from pyroflows.validation import check_choice, check_int

az = require("arviz")  # the mcmc extra: an ImportError that names it

__all__ = ["sample_model", "to_inference_data"]

#: draws x chains evaluated per model execution when mapping draws back to the sites
CHUNK = 4096
#: largest pointwise log-likelihood (entries over all draws) stored without being asked
MAX_LOG_LIKELIHOOD = 50_000_000
#: most warm-up steps spent in the pilot that decides ``reparam="auto"`` (at most a fifth)
PILOT = 100
#: fewest pilot steps worth running (fewer warm-up steps: decide at the initial points)
MIN_PILOT = 10


def sample_model(
    kernel: Any,
    *,
    num_samples: int,
    warmup_steps: int | None = None,
    num_chains: int | None = None,
    init: InitStrategy = None,
    seed: int | None = None,
    progress: bool = True,
    thinning: int = 1,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    log_likelihood: bool | None = None,
    vectorize: str = "plate",
    reparam: str | None = "auto",
) -> az.InferenceData:
    """Run ``kernel`` (built with ``model=``) on its model; users call
    [`sample`][pyroflows.mcmc.sample], which lands here.

    Args:
        kernel: a pyroflows kernel whose ``model`` is a Pyro model.
        num_samples: draws kept per chain.
        warmup_steps: adaptation steps, discarded (default: ``num_samples``).
        num_chains: chains run at once (default 4).
        init: a Pyro init strategy, a ``{site: value}`` dict, or ``None`` (``init_to_uniform``);
            see [`ModelPotential.init`][pyroflows.mcmc.ModelPotential.init].
        seed: seed of the run's ``torch.Generator`` (init and kernel); ``None`` draws one from
            torch's global generator.
        progress: show a progress bar.
        thinning: keep every ``thinning``-th step.
        model_args: the model's positional arguments.
        model_kwargs: the model's keyword arguments.
        log_likelihood: store the pointwise log-likelihood (default: when it has at most
            ``MAX_LOG_LIKELIHOOD`` entries; many chains times large data can need gigabytes).
        vectorize: ``"plate"`` or ``"vmap"``, as in
            [`ModelPotential`][pyroflows.mcmc.ModelPotential].
        reparam: ``"auto"``: non-centre the hierarchical sites' elements that the data say
            little about, decided after a pilot of at most ``PILOT`` warm-up steps (see
            `pyroflows.mcmc.reparam`); ``None``: sample the model as written.

    Returns:
        ``InferenceData`` (see [`to_inference_data`][pyroflows.mcmc.models.to_inference_data]).
    """
    from pyroflows.mcmc.driver import make_generator, run_chains

    check_int(num_samples, "num_samples", minimum=1)
    warmup_steps = num_samples if warmup_steps is None else check_int(
        warmup_steps, "warmup_steps", minimum=0
    )
    num_chains = 4 if num_chains is None else check_int(num_chains, "num_chains", minimum=1)
    potential = ModelPotential(
        kernel.model, *model_args, vectorize=vectorize, **(model_kwargs or {})
    )
    check_choice(reparam, "reparam", ("auto", None))
    generator = make_generator(seed, potential._device)
    start = potential.init(num_chains, init, generator)
    pilot: dict[str, Any] = {}
    hide: set[str] = set()
    if reparam == "auto" and vectorize == "plate" and getattr(kernel, "proposal", None) is None:
        potential, start, pilot, hide = _auto_reparam(
            kernel, potential, start, warmup_steps, generator, progress, model_args,
            model_kwargs or {},
        )
    kernel.bind(potential)
    draws, stats, attrs = run_chains(
        kernel, start, num_samples, warmup_steps=warmup_steps - pilot.get("warmup_steps", 0),
        thinning=thinning, progress=progress, generator=generator,
    )
    for key in ("sampling_time", "num_energy_calls", "num_energy_evals", "warmup_nonfinite",
                "warmup_divergences", "warmup_steps"):
        if key in pilot:
            attrs[key] += pilot[key]
    if "reparam" in pilot:
        attrs["reparam"] = pilot["reparam"]
    return to_inference_data(
        potential, draws, stats, attrs, log_likelihood=log_likelihood, hide=hide
    )


def _auto_reparam(
    kernel: Any,
    potential: ModelPotential,
    start: torch.Tensor,
    warmup_steps: int,
    generator: torch.Generator,
    progress: bool,
    model_args: tuple,
    model_kwargs: dict[str, Any],
) -> tuple[ModelPotential, torch.Tensor, dict[str, Any], set[str]]:
    """Non-centre what `pyroflows.mcmc.reparam.plan` chooses: the potential to sample, the
    chains' points in it, what the pilot cost (added to the run's ``attrs``) and the latent
    sites the reparameterisation added."""
    from pyroflows.mcmc.driver import run_chains

    choice, informed = plan(potential, start, generator)
    if not choice:
        return potential, start, {}, set()
    pilot: dict[str, Any] = {}
    if informed and warmup_steps >= 5 * MIN_PILOT:
        steps = min(PILOT, warmup_steps // 5)
        kernel.bind(potential)
        draws, _, pilot = run_chains(
            kernel, start, 1, warmup_steps=steps - 1, progress=progress, generator=generator
        )
        pilot["warmup_steps"] = steps
        start = draws[0]
        choice, _ = plan(potential, start, generator)
    pilot["reparam"] = ", ".join(
        f"{name}: {int((c == 0).sum())} of {c.numel()} non-centred" for name, c in choice.items()
    )
    model = decentre(potential.model, choice)
    if model is potential.model:
        return potential, start, pilot, set()
    try:
        new = ModelPotential(model, *model_args, vectorize="plate", **model_kwargs)
    except ValueError as err:  # kept as written rather than failed: the choice is ours
        warnings.warn(f"reparam='auto' kept the model as written: {err}", stacklevel=4)
        return potential, start, {**pilot, "reparam": "none (failed)"}, set()
    added = set(new._latent) - set(potential._latent)
    return new, carry_over(potential, new, start, choice), pilot, added


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def to_inference_data(
    potential: ModelPotential,
    draws: torch.Tensor,
    stats: dict[str, torch.Tensor] | None = None,
    attrs: dict[str, Any] | None = None,
    *,
    log_likelihood: bool | None = None,
    hide: set[str] | frozenset[str] = frozenset(),
) -> az.InferenceData:
    """Map unconstrained draws of a model back to its sites, as ``arviz.InferenceData``.

    Args:
        potential: the model's potential.
        draws: unconstrained draws ``(num_samples, num_chains, D)``.
        stats: sampler statistics, name -> ``(num_chains, num_samples)``.
        attrs: run attributes stored on the result.
        log_likelihood: store the pointwise log-likelihood (``None``: when it has at most
            ``MAX_LOG_LIKELIHOOD`` entries).
        hide: latent sites left out of ``posterior`` (those an automatic reparameterisation
            added).

    Returns:
        ``posterior``: every latent and deterministic site by name, constrained, dims
        ``(chain, draw, *site dims)`` (plate names where a plate indexes a dimension);
        ``log_likelihood``: per observed site, pointwise; ``observed_data``; ``sample_stats``
        (the statistics given, plus ``lp`` $= -U$).
    """
    num_samples, num_chains, dim = draws.shape
    flat = draws.reshape(-1, dim)
    obs_sizes = sum(s["fn"].batch_shape.numel() for s in potential._observed.values())
    if log_likelihood is None:
        log_likelihood = flat.shape[0] * obs_sizes <= MAX_LOG_LIKELIHOOD
        if not log_likelihood:
            warnings.warn(
                f"log_likelihood not stored: {flat.shape[0] * obs_sizes:,} entries (pass "
                "log_likelihood=True to force it, or run fewer chains or draws)",
                stacklevel=3,
            )
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in flat.split(CHUNK):
        latent, deterministic, loglik = potential._constrained(chunk)
        values = {**latent, **deterministic, **(loglik if log_likelihood else {})}
        for name, value in values.items():
            parts.setdefault(name, []).append(value)

    def chains_first(name: str) -> np.ndarray:
        value = torch.cat(parts[name]).reshape(num_samples, num_chains, *parts[name][0].shape[1:])
        return _numpy(value.transpose(0, 1))

    dims = potential.dims()
    # an observed site's name serves both groups: give its batch (plate) dims, and arviz names
    # the event dims of observed_data "<site>_dim_<i>", as dims() does
    for name, site in potential._observed.items():
        dims[name] = dims[name][: len(site["fn"].batch_shape)]
    posterior = {name: chains_first(name) for name in potential.shapes() if name not in hide}
    groups: dict[str, Any] = {"posterior": posterior}
    if log_likelihood and potential._observed:
        groups["log_likelihood"] = {name: chains_first(name) for name in potential._observed}
    if potential._observed:
        groups["observed_data"] = {k: _numpy(v) for k, v in potential.observed_data().items()}
    if stats:
        sample_stats = {name: _numpy(value) for name, value in stats.items()}
        if "energy" in sample_stats:
            sample_stats["lp"] = -sample_stats["energy"]
        groups["sample_stats"] = sample_stats
    with warnings.catch_warnings():  # arviz warns whenever chains outnumber draws, our usual case
        warnings.filterwarnings("ignore", message="More chains")
        return az.from_dict(**groups, dims=dims, attrs=attrs or {})
