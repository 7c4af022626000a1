r"""Pyro models of posteriors from the posterior database, and checks against their references.

The posterior database (stan-dev/posteriordb) pairs Stan programs with data and reference
posterior summaries from long Stan runs. A copy of a few of them lives outside the package (the
default root is ``$PYROFLOWS_POSTERIORDB``, else ``../shared/posteriordb`` next to the
repository), one folder ``<data>-<model>`` each with ``model.stan``, ``data.json`` and
``reference.json``. This module holds a Pyro translation of each Stan program:

- site names are the Stan parameter names (transformed parameters are ``pyro.deterministic``
  sites), vector parameters are one site (``.to_event(1)``);
- constrained parameters get the matching support (``<lower=0>`` a half distribution or
  [`Flat`][pyroflows.datasets.posteriordb.Flat] on ``positive``, ``ordered`` the
  [`OrderedIID`][pyroflows.datasets.posteriordb.OrderedIID] support), and a parameter with no
  ``~`` statement keeps Stan's improper flat prior ([`Flat`][pyroflows.datasets.posteriordb.Flat]);
- every model vectorizes over outer batch dimensions: its plates have ``dim=`` set and
  global sites broadcast against them, so all chains run in one model execution under an extra
  chain plate.

[`load`][pyroflows.datasets.posteriordb.load] returns ``(model, data, reference)``, the model
called as ``model(**data)``; [`compare`][pyroflows.datasets.posteriordb.compare] scores draws
against the reference parameter by parameter (Stan-flattened, 0-based names like ``"theta[0]"``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import transform_to

__all__ = ["Flat", "OrderedIID", "compare", "default_root", "load", "models", "names"]


# -- distributions the Stan programs need --------------------------------------------------
class Flat(TorchDistribution):
    """Stan's improper flat prior on ``support`` (log-density 0 everywhere on it).

    Unlike Pyro's ``ImproperUniform`` its ``log_prob`` is created on the value's device, and
    ``sample`` returns a fixed feasible point (the image of 0 under ``transform_to(support)``), so
    that Pyro's initialisation strategies that need a draw (``init_to_uniform``) work; the point is
    not a draw from anything.

    Args:
        support: the parameter's constraint (``constraints.real``, ``positive``,
            ``interval(0, upper)`` with tensor bounds, ...).
        batch_shape: batch shape (also taken from tensor bounds of ``support`` by the caller).
        event_shape: event shape (``(D,)`` for a Stan ``vector[D]``).
        device: device of the points ``sample`` returns.
        dtype: dtype of the points ``sample`` returns.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        support: constraints.Constraint,
        batch_shape: tuple[int, ...] = (),
        event_shape: tuple[int, ...] = (),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._support = support
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._dtype = torch.get_default_dtype() if dtype is None else dtype
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Any, _instance: Any = None) -> Flat:
        new = self._get_checked_instance(Flat, _instance)
        new._support, new._device, new._dtype = self._support, self._device, self._dtype
        super(Flat, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch = value.shape[: value.dim() - len(self.event_shape)]
        return value.new_zeros(torch.broadcast_shapes(batch, self.batch_shape))

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        t = transform_to(self._support)
        shape = self._extended_shape(torch.Size(sample_shape))
        zeros = torch.zeros(t.inverse_shape(shape), device=self._device, dtype=self._dtype)
        return t(zeros)


class OrderedIID(TorchDistribution):
    r"""An ordered vector of ``n`` i.i.d. draws of ``base`` (their order statistics).

    This is Stan's ``ordered[n] x; x ~ base;``: the density is $n! \prod_i p(x_i)$ on
    $x_1 < \dots < x_n$ (Stan drops the constant $n!$), the support is
    ``constraints.ordered_vector`` and ``biject_to`` maps it to $\mathbb R^n$ the way Stan does.

    Args:
        base: a univariate distribution (any batch shape).
        n: the vector's length.
    """

    arg_constraints: dict = {}
    support = constraints.ordered_vector

    def __init__(self, base: dist.Distribution, n: int) -> None:
        if base.event_shape != ():
            raise ValueError(f"base must be univariate, got event_shape {tuple(base.event_shape)}")
        self.base, self.n = base, int(n)
        super().__init__(base.batch_shape, torch.Size([self.n]), validate_args=False)

    def expand(self, batch_shape: Any, _instance: Any = None) -> OrderedIID:
        new = self._get_checked_instance(OrderedIID, _instance)
        new.base, new.n = self.base.expand(batch_shape), self.n
        batch_shape = torch.Size(batch_shape)
        super(OrderedIID, new).__init__(batch_shape, self.event_shape, validate_args=False)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        points = self.base.log_prob(value.movedim(-1, 0)).movedim(0, -1)
        return points.sum(-1) + math.lgamma(self.n + 1)

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        draws = self.base.sample(torch.Size(sample_shape) + torch.Size([self.n]))
        return draws.movedim(len(sample_shape), -1).sort(-1).values


# -- the models (site names = Stan parameter names) ----------------------------------------
def eight_schools_noncentered(J: int, y: torch.Tensor, sigma: torch.Tensor) -> None:
    """Eight schools, non-centred: ``theta = mu + tau * theta_trans`` (a deterministic site).

    ``y=None`` draws the effects (posterior predictive)."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("school", J, dim=-1):
        theta_trans = pyro.sample("theta_trans", dist.Normal(sigma.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", theta_trans * tau + mu)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def kidscore_interaction(
    N: int, kid_score: torch.Tensor, mom_iq: torch.Tensor, mom_hs: torch.Tensor
) -> None:
    """Kid's IQ regression with a mother's-IQ x high-school interaction; flat prior on ``beta``.

    ``kid_score=None`` draws the scores (posterior predictive)."""
    like = dict(device=mom_iq.device, dtype=mom_iq.dtype)
    beta = pyro.sample("beta", Flat(constraints.real, (), (4,), **like))
    sigma = pyro.sample("sigma", dist.HalfCauchy(mom_iq.new_tensor(2.5)))
    b = beta.unbind(-1)
    loc = b[0] + b[1] * mom_hs + b[2] * mom_iq + b[3] * (mom_hs * mom_iq)
    with pyro.plate("child", N, dim=-1):
        pyro.sample("kid_score", dist.Normal(loc, sigma), obs=kid_score)


def blr(N: int, D: int, X: torch.Tensor, y: torch.Tensor) -> None:
    """Bayesian linear regression: N(0, 10) priors on ``beta``, half-N(0, 10) on ``sigma``.

    ``y=None`` draws the responses (posterior predictive)."""
    beta = pyro.sample("beta", dist.Normal(X.new_tensor(0.0), 10.0).expand([D]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
    # beta has batch shape (..., 1) outside the plate: (..., 1, D) * (N, D) summed over D
    loc = (beta * X).sum(-1)
    with pyro.plate("obs", N, dim=-1):
        pyro.sample("y", dist.Normal(loc, sigma), obs=y)


def _linear_recurrence(a: torch.Tensor, b: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``v`` with ``v[..., 0] = v1`` and ``v[..., t] = a[..., t - 1] + b * v[..., t - 1]``.

    Computed in blocks of 16 steps, each one matrix product with the powers ``b^(i - j)``
    (``b`` in ``(0, 1)`` keeps them bounded): a handful of tensor operations per block instead
    of a few per step, which is what a batched model pays for at every evaluation."""
    size = 16
    steps = torch.arange(size, device=a.device)
    lag = (steps[:, None] - steps[None, :]).to(a.dtype)
    b = b[..., None, None]
    within = torch.where(lag >= 0, b ** lag.clamp(min=0), torch.zeros_like(lag))
    carry = b[..., 0, :] ** (steps + 1).to(a.dtype)  # b^(i + 1): the previous block's last term
    values, last = [v1.expand(a.shape[:-1]).unsqueeze(-1)], v1.expand(a.shape[:-1])
    for block in a.split(size, -1):
        n = block.shape[-1]
        v = (within[..., :n, :n] @ block.unsqueeze(-1)).squeeze(-1) + carry[..., :n] * last[
            ..., None
        ]
        values.append(v)
        last = v[..., -1]
    return torch.cat(values, -1)


def garch11(T: int, y: torch.Tensor, sigma1: torch.Tensor) -> None:
    """GARCH(1, 1) with flat priors; ``beta1`` is bounded by ``1 - alpha1`` (a dependent support).

    The series is one observation (``.to_event(1)``): its terms are not exchangeable, so there
    is no pointwise log-likelihood for leave-one-out here.
    """
    like = dict(device=y.device, dtype=y.dtype)
    mu = pyro.sample("mu", Flat(constraints.real, **like))
    alpha0 = pyro.sample("alpha0", Flat(constraints.positive, **like))
    alpha1 = pyro.sample("alpha1", Flat(constraints.unit_interval, **like))
    upper = 1 - alpha1
    beta1 = pyro.sample("beta1", Flat(constraints.interval(0.0, upper), upper.shape, **like))
    # sigma[t]^2 = alpha0 + alpha1 * (y[t-1] - mu)^2 + beta1 * sigma[t-1]^2, sigma[1] = sigma1
    shocks = alpha0[..., None] + alpha1[..., None] * (y[:-1] - mu[..., None]) ** 2
    variance = _linear_recurrence(shocks, beta1, sigma1**2 + 0 * mu)
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), variance.sqrt()).to_event(1), obs=y)


def low_dim_gauss_mix(N: int, y: torch.Tensor) -> None:
    """Two-component normal mixture with ordered locations ``mu`` and mixing weight ``theta``."""
    mu = pyro.sample("mu", OrderedIID(dist.Normal(y.new_tensor(0.0), 2.0), 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(y.new_tensor(2.0)).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(y.new_tensor(5.0), 5.0))
    weights = torch.stack([theta, 1 - theta], -1)
    with pyro.plate("obs", N, dim=-1):
        mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(mu, sigma))
        pyro.sample("y", mixture, obs=y)


_MODELS: dict[str, Callable[..., None]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "sblrc-blr": blr,
    "kidiq-kidscore_interaction": kidscore_interaction,
    "garch-garch11": garch11,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
}


def names() -> list[str]:
    """Names of the posteriors that have a Pyro model here (posteriordb's ``<data>-<model>``)."""
    return list(_MODELS)


def models() -> dict[str, Callable[..., None]]:
    """Posterior name -> its Pyro model (called as ``model(**data)``)."""
    return dict(_MODELS)


def default_root() -> Path:
    """``$PYROFLOWS_POSTERIORDB`` if set, else ``../shared/posteriordb`` beside the repository."""
    env = os.environ.get("PYROFLOWS_POSTERIORDB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "posteriordb"


def _resolve(name: str) -> str:
    if name in _MODELS:
        return name
    by_model = {key.split("-", 1)[1]: key for key in _MODELS}
    if name in by_model:
        return by_model[name]
    raise ValueError(f"name must be one of {', '.join(map(repr, _MODELS))}, got {name!r}")


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Callable[..., None], dict[str, Any], dict[str, dict[str, float]]]:
    """A posterior's Pyro model, its data and its reference summaries.

    Args:
        name: a posterior in [`names`][pyroflows.datasets.posteriordb.names]
            (``"eight_schools-eight_schools_noncentered"``), or just its model part
            (``"eight_schools_noncentered"``).
        root: the folder holding the posteriors (default:
            [`default_root`][pyroflows.datasets.posteriordb.default_root]).
        dtype: floating dtype of the data tensors (the samplers take theirs from the data).
        device: device of the data tensors.

    Returns:
        ``(model, data, reference)``: call ``model(**data)``; ``data`` maps the Stan data names to
        Python ints (sizes) and tensors; ``reference`` maps Stan-flattened 0-based parameter names
        (``"theta[0]"``, ``"tau"``) to ``{"mean", "sd", "q05", "q50", "q95", ..., "draws"}``
        (``draws``: how many reference draws the summaries come from).

    Raises:
        ValueError: unknown ``name``, or the posterior's folder is missing under ``root``.

    Example:
        >>> model, data, reference = load("eight_schools_noncentered")  # doctest: +SKIP
        >>> round(reference["tau"].get("mean"), 1)  # doctest: +SKIP
        3.6
    """
    key = _resolve(name)
    folder = Path(root) if root is not None else default_root()
    folder = folder / key
    if not folder.is_dir():
        raise ValueError(
            f"posterior {key!r} not found under {folder.parent} (set root= or the "
            "PYROFLOWS_POSTERIORDB environment variable to the posteriordb folder)"
        )
    raw = json.loads((folder / "data.json").read_text())
    model = _MODELS[key]
    wanted = inspect.signature(model).parameters  # data.json may carry fields the model ignores
    data = {
        k: v if isinstance(v, int) else torch.as_tensor(np.asarray(v), dtype=dtype, device=device)
        for k, v in raw.items()
        if k in wanted
    }
    summary = json.loads((folder / "reference.json").read_text())
    info = summary.get("reference_draws", {})
    size = info.get("num_chains", 0) * info.get("draws_per_chain", 0)
    reference = {k: {**v, "draws": size} if size else v for k, v in summary["params"].items()}
    return model, data, reference


# -- comparison against a reference ---------------------------------------------------------
def _split(flat_name: str) -> tuple[str, tuple[int, ...]]:
    if not flat_name.endswith("]"):
        return flat_name, ()
    site, index = flat_name[:-1].split("[", 1)
    return site, tuple(int(i) for i in index.split(","))


def _draws(samples: Any) -> Mapping[str, np.ndarray]:
    posterior = getattr(samples, "posterior", None)
    if posterior is not None:  # arviz InferenceData
        return {k: np.asarray(v) for k, v in posterior.data_vars.items()}
    return {
        k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for k, v in samples.items()
    }


def compare(
    samples: Any, reference: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Score draws against reference summaries, parameter by parameter.

    Args:
        samples: an ``arviz.InferenceData`` whose ``posterior`` has the reference's sites, or a
            dict ``{site: array (chain, draw, *site_shape)}``.
        reference: the third value of [`load`][pyroflows.datasets.posteriordb.load].

    Returns:
        flat name -> ``mean``, ``sd`` (of the draws), ``ess`` (bulk), ``rhat`` (rank-normalised
        split R-hat), ``mcse`` (the reference sd over the square root of the draws' ESS),
        ``ref_se`` (the reference mean's own Monte-Carlo error: its sd over the square root of
        its number of draws, which posteriordb thins to near-independence; 0 when unknown),
        ``z`` (mean error over the combined error ``hypot(mcse, ref_se)``:
        with hundreds of thousands of draws the reference's error is the larger one),
        ``err_sd`` (mean error in reference-sd units) and ``sd_ratio`` (draws' sd over the
        reference sd).

    Raises:
        ValueError: a reference parameter whose site is missing from ``samples``.
    """
    import arviz as az  # arviz is heavy: only the comparison needs it

    draws = _draws(samples)
    rows: dict[str, dict[str, float]] = {}
    for flat_name, ref in reference.items():
        site, index = _split(flat_name)
        if site not in draws:
            raise ValueError(f"samples has no site {site!r} (needed for {flat_name!r})")
        x = draws[site][(slice(None), slice(None), *index)].astype(np.float64)
        ess = float(az.ess(x, method="bulk"))
        rhat = float(az.rhat(x)) if x.shape[0] > 1 else float("nan")
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        mcse = ref["sd"] / math.sqrt(ess)
        ref_se = ref["sd"] / math.sqrt(ref["draws"]) if ref.get("draws") else 0.0
        rows[flat_name] = {
            "mean": mean,
            "sd": sd,
            "ess": ess,
            "rhat": rhat,
            "mcse": mcse,
            "ref_se": ref_se,
            "z": (mean - ref["mean"]) / math.hypot(mcse, ref_se),
            "err_sd": (mean - ref["mean"]) / ref["sd"],
            "sd_ratio": sd / ref["sd"],
        }
    return rows
