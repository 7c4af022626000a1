r"""``AutoFlow``: an autoguide whose posterior is any registered normalizing flow.

Like every [`AutoContinuous`][pyro.infer.autoguide.AutoContinuous] guide, ``AutoFlow`` maps the
model's latent sites to one unconstrained vector $u \in \mathbb R^D$ (ADVI's change of variables)
and puts a distribution on $u$; here that distribution is a flow $T$ of any family in
``pyroflows.available_flows()``, followed by a learnable affine stage and a fixed one:

$$
u = \hat u + A_0 \bigl(\delta + S\, T(\varepsilon)\bigr), \qquad
\varepsilon \sim \mathcal N(0, I_D),
$$

with $S$ lower-triangular (``affine="full"``) or diagonal (``affine="diagonal"``), both
initialised at $\delta = 0$, $S = I$, and the flow's layers at or near the identity. The fixed
map $(\hat u, A_0)$ is the **warm start** (``warm_start="laplace"``, the default): the MAP and
a square root of the Laplace covariance (exact up to 256 dimensions, low-rank plus diagonal
above), found by
[`laplace_warm_start`][pyroflows.guides.warm_start.laplace_warm_start] the first time the guide
runs. Training therefore starts at the Laplace approximation, and everything learnable works in
whitened coordinates where the posterior has unit scale: the flow only has to learn what is not
Gaussian, and one learning rate suits every model however small or correlated its posterior
sds. ``warm_start=None`` uses the init strategy's point and ``init_scale`` instead (training
then starts at ``AutoDiagonalNormal``'s usual initialisation). ``get_transform()`` is the whole
$\varepsilon \mapsto u$ map, a whitening map for
[`NeuTraReparam`][pyro.infer.reparam.NeuTraReparam] (Hoffman et al. 2019).

[`diagnose`][pyroflows.guides.AutoFlow.diagnose] checks a trained guide by Pareto-smoothed
importance sampling (Yao et al. 2018): $\hat k < 0.7$ means the guide's draws, reweighted, are
usable; above it, run NeuTra-HMC with the guide's transform.

The guide's ``log_prob`` at its own samples comes from the forward pass
([`FlowPosterior`][pyroflows.guides.posterior.FlowPosterior]), so inverse-expensive families (IAF,
planar) cost one pass per ELBO evaluation, as in Kingma et al. (2016).

References:
    Kucukelbir et al. (2017), *Automatic Differentiation Variational Inference*, JMLR.
    Rezende & Mohamed (2015), *Variational Inference with Normalizing Flows*, ICML.
    Kingma et al. (2016), *Improved Variational Inference with Inverse Autoregressive Flow*.
    Hoffman et al. (2019), *NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural
    Transport*.
    Yao, Vehtari, Simpson & Gelman (2018), *Yes, but Did It Work?: Evaluating Variational
    Inference*, ICML.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, ComposeTransform, LowerCholeskyAffine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.poutine.runtime import NonlocalExit
from torch.distributions import Transform, biject_to

from pyroflows.guides.posterior import FlowPosterior
from pyroflows.guides.warm_start import (
    LowRankAffine,
    WarmStart,
    laplace_warm_start,
    plate_nesting,
    unconstrained_log_density,
)
from pyroflows.registry import build_flow, get_builder
from pyroflows.validation import check_choice, check_int, check_number, check_positive

WARM_STARTS = ("laplace", "map", None)
AFFINES = ("full", "diagonal", None)


AUTO_TAIL_DF = 7.0  # tail_df="auto"'s start; docs/guides.md has the measurements

# A spline guide's defaults (docs/splines.md, fifth pass): a box of +-10 with 16 bins holds the
# curved posteriors whose Laplace-whitened coordinates reach beyond +-5; a unit init scale lets
# the multimodal start cover both modes at the slower rate of SPLINE_FIT.
SPLINE_OPTIONS: dict[str, Any] = {"direction": "sample", "bound": 10.0, "bins": 16}
SPLINE_INIT_SCALE = 1.0
# Six spline couplings, not the family's four: a hole in the posterior (U3's split wave) is a
# tear of the base that a shallow flow leaves bridged on some seeds (docs/splines.md, tenth pass)
SPLINE_LAYERS = 6
# fit_guide's settings for a spline guide (docs/splines.md, sixth and ninth passes); "anneal"
# is the tempered share of the step budget
SPLINE_FIT: dict[str, Any] = {"lr": 3e-3, "num_particles": 256, "anneal": 0.8,
                              "anneal_from": 0.5, "anneal_shape": "cosine", "forward_kl": 1.0}
# forward_kl_surrogate's defensive draws: one per WIDE_FRACTION draws of the guide, from its
# base widened WIDE_SCALE times (docs/splines.md, ninth pass)
WIDE_SCALE, WIDE_FRACTION = 3.0, 4
# ... and the cap on its gradient's norm, in multiples of the ELBO gradient's norm
COVER_CAP = 10.0


def _norm(grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """The Euclidean norm of a gradient over several tensors (``None``: no gradient)."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None])
    )


def _is_bounded(support: constraints.Constraint) -> bool:
    """Whether ``support`` is bounded on both sides (an interval, a product of intervals, the
    simplex)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return isinstance(support, (constraints.interval, constraints.half_open_interval)) or (
        support is constraints.simplex
    )


class AutoFlow(AutoContinuous):
    """An ``AutoContinuous`` guide with a normalizing-flow posterior over the latent vector.

    Args:
        model: a Pyro model with continuous latent sites (static structure).
        flow: a family in ``pyroflows.available_flows()``.
        num_layers: layers of the flow (the family's default if ``None``; 6 for a spline family).
        hidden_dims: conditioner widths of the flow (the family's default if ``None``).
        affine: the learnable affine stage after the flow: ``"full"`` (lower-triangular),
            ``"diagonal"``, ``None`` (none), or ``True`` for ``"full"`` up to 256 latent
            dimensions and ``"diagonal"`` above.
        warm_start: ``"laplace"`` (MAP and Laplace covariance), ``"map"`` (MAP, with
            ``init_scale``) or ``None`` (the init point, with ``init_scale``).
        num_starts: L-BFGS starts of the MAP search (optimised together).
        warm_start_rank: above 256 latent dimensions, the eigen-directions of the scaled
            Hessian the Laplace start keeps besides its diagonal.
        init_loc_fn: per-site initial point (see Pyro's autoguide initialisation): the first
            MAP start, or the location without a warm start.
        init_scale: scale of the fixed affine map when there is no usable curvature (default
            0.1, and 1 for a spline family).
        tail_df: a heavy-tailed base: independent Student-t coordinates whose degrees of
            freedom start here and are learned (kept above 2); ``None``: the flow's standard
            normal base; ``"auto"``: 7 when a latent site's support is bounded (an interval or
            the simplex), else ``None``. Such a site's log-Jacobian is linear in its
            unconstrained value, so the posterior's tail there can be exponential, beyond a
            normal base's reach; the bounded site keeps finite moments under a heavier tail,
            where a positive site's $e^u$ would not (PSIS $\\hat k$ in docs/guides.md).
        num_quantile_samples: posterior draws behind ``quantiles`` and ``median``.
        **flow_options: further options of the family's builder. The spline families
            (``nsf``, ``nsf_ar``: builders with ``bins``, ``bound`` and ``direction``) default
            here to ``direction="sample"`` (the guide only samples, so the spline formula runs
            on the sampling side), ``bound=10.0`` and ``bins=16``, with 6 layers; options given
            win. A spline guide also recommends its training settings:
            [`fit_defaults`][pyroflows.guides.AutoFlow.fit_defaults].

    Raises:
        ValueError: unknown ``flow``, a bad option, or (at the first call) a discrete latent
            site or a non-finite log-density at the initial point, named in the message.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = AutoFlow(model, flow="realnvp", num_layers=2)
        >>> optim = pyro.optim.Adam({"lr": 1e-2})
        >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
        >>> loss = svi.step(torch.randn(10))
        >>> sorted(guide.quantiles([0.1, 0.9]))
        ['mu']
    """

    def __init__(
        self,
        model: Callable,
        flow: str = "iaf",
        *,
        num_layers: int | None = None,
        hidden_dims: int | Sequence[int] | None = None,
        affine: bool | str | None = True,
        warm_start: str | None = "laplace",
        num_starts: int = 8,
        warm_start_rank: int = 32,
        init_loc_fn: Callable = init_to_median,
        init_scale: float | None = None,
        tail_df: float | str | None = "auto",
        num_quantile_samples: int = 10_000,
        **flow_options: Any,
    ) -> None:
        builder = get_builder(flow)  # unknown names fail here, not at the first SVI step
        options = inspect.signature(builder).parameters
        self._spline = {"bins", "bound", "direction"} <= options.keys()
        if self._spline:
            # direction: a guide runs its flow only noise -> sample, so the spline formula goes
            # there (the density side's inverse trains worse in VI: U1-U4 in docs/splines.md)
            flow_options = {**SPLINE_OPTIONS, **flow_options}
            num_layers = SPLINE_LAYERS if num_layers is None else num_layers
        if init_scale is None:
            init_scale = SPLINE_INIT_SCALE if self._spline else 0.1
        self._init_scale = check_positive(init_scale, "init_scale")
        if isinstance(tail_df, str):
            self._tail_df: float | str | None = check_choice(tail_df, "tail_df", ("auto",))
        else:
            self._tail_df = None if tail_df is None else check_number(
                tail_df, "tail_df", low=2.0, low_open=True
            )
        if affine is not True:
            check_choice(affine if affine is not False else None, "affine", AFFINES)
        self._affine = None if affine is False else affine
        self._warm = check_choice(warm_start, "warm_start", WARM_STARTS)
        self._num_starts = check_int(num_starts, "num_starts")
        self._rank = check_int(warm_start_rank, "warm_start_rank", minimum=0)
        self._flow_name = flow
        self._flow_args = dict(num_layers=num_layers, hidden_dims=hidden_dims, **flow_options)
        self.num_quantile_samples = check_int(num_quantile_samples, "num_quantile_samples")
        self._fixed_latent: torch.Tensor | None = None
        self._vectorizable = True
        self.warm_start: WarmStart | None = None
        self._latest_args: tuple[tuple, dict] = ((), {})
        super().__init__(model, init_loc_fn=init_loc_fn)

    def fit_defaults(self, num_steps: int) -> dict[str, Any]:
        """The training settings this guide recommends to
        [`fit_guide`][pyroflows.guides.fit_guide], which uses each of them for an argument its
        caller leaves unset (``None``).

        A spline guide (``nsf``, ``nsf_ar``) recommends ``lr=3e-3``, ``num_particles=256``,
        tempering over the first 80% of the budget, $\\beta$ rising from 0.5 to 1 along a
        half cosine (``anneal_steps=int(0.8 * num_steps)``, ``anneal_from=0.5``,
        ``anneal_shape="cosine"``), and the forward-KL term at weight 1 (``forward_kl=1.0``;
        not with ``parallel="forward"``, whose density at fixed points is sequential): less
        gradient noise and a gentler tempering than the global defaults, which the spline's
        bounded box needs, and a direct push on mass misplaced along a thin ridge (what they
        buy and cost is measured in ``docs/splines.md``, fifth, sixth and ninth passes).
        Other families recommend nothing: ``fit_guide``'s global defaults apply.

        Args:
            num_steps: ``fit_guide``'s step budget.

        Returns:
            ``fit_guide`` argument name -> value (empty for the non-spline families).
        """
        if not self._spline:
            return {}
        fit = dict(SPLINE_FIT)
        fit["anneal_steps"] = int(num_steps * fit.pop("anneal"))
        if self._flow_args.get("parallel") == "forward":  # log q at fixed points: D passes
            del fit["forward_kl"]
        return fit

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)  # names discrete sites in a ValueError
        loc = self._init_loc()
        dim = self.latent_dim
        self._max_plate_nesting = plate_nesting(self.model, args, kwargs)
        if self._tail_df == "auto":
            self._tail_df = AUTO_TAIL_DF if any(
                _is_bounded(site["fn"].support)
                for _, site in self.prototype_trace.iter_stochastic_nodes()
            ) else None
        if self._warm is None:
            self.warm_start = WarmStart.isotropic(loc, self._init_scale, "init", math.nan)
        else:
            with torch.enable_grad():
                self.warm_start = laplace_warm_start(
                    self,
                    self.model,
                    args,
                    kwargs,
                    init=loc,
                    init_scale=self._init_scale,
                    num_starts=self._num_starts,
                    rank=self._rank,
                    laplace=self._warm == "laplace",
                )
        for name in ("loc", "scale", "directions", "direction_scales"):
            self.register_buffer(f"base_{name}", getattr(self.warm_start, name).detach().clone())
        tril = self.warm_start.scale_tril
        self.register_buffer(  # empty: the low-rank-plus-diagonal map is used
            "base_scale_tril", loc.new_zeros(0, 0) if tril is None else tril.detach().clone()
        )
        # Build on the model's device even under another default device (e.g. the tests' trap).
        with torch.device(loc.device):
            flow = build_flow(self._flow_name, dim, **self._flow_args)
        self.flow = flow.to(dtype=loc.dtype)
        if self._tail_df is not None:
            self.tail_df = PyroParam(
                torch.full_like(loc, self._tail_df), constraints.greater_than(2.0)
            )
        affine = self._affine
        if affine is True:
            affine = "full" if dim <= 256 else "diagonal"
        self._affine_kind = affine
        if affine is not None:
            self.loc = torch.nn.Parameter(torch.zeros_like(loc))
        if affine == "full":
            eye = torch.diag_embed(torch.ones_like(loc))
            self.scale_tril = PyroParam(eye, constraints.softplus_lower_cholesky)
        elif affine == "diagonal":
            self.scale = PyroParam(torch.ones_like(loc), constraints.softplus_positive)
        self._setup_versions = [p._version for p in self.parameters()]

    def _dependent_sites(self) -> set[str]:
        """Latent sites whose support has tensor parameters (``interval(0, 1 - alpha)``):
        their bounds may depend on other sites, so they are looked up at every call."""
        return {
            name
            for name, site in self.prototype_trace.iter_stochastic_nodes()
            if any(isinstance(v, torch.Tensor) for v in vars(site["fn"].support).values())
        }

    def _current_support(
        self, name: str, values: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> constraints.Constraint:
        """The support of site ``name`` given the values of the sites before it: the model is
        run, conditioned on ``values``, up to that site."""
        model = poutine.escape(
            poutine.condition(self.model, data=values), escape_fn=lambda msg: msg["name"] == name
        )
        try:
            with poutine.block():
                model(*args, **kwargs)
        except NonlocalExit as exit:  # the handlers' contexts have unwound: nothing to reset
            return exit.site["fn"].support
        raise RuntimeError(f"site {name!r} was not reached in the model")

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Draw every latent site (Pyro's ``AutoContinuous.forward``, except that a site whose
        support depends on other sites, such as ``beta ~ interval(0, 1 - alpha)``, is
        constrained with its support at the values just drawn, not at the prototype's).

        Returns:
            site name -> value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._latest_args = (args, kwargs)  # for quantiles() of dependent supports
        dependent = self._dependent_sites()
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result: dict[str, torch.Tensor] = {}
        for site, unconstrained in self._unpack_latent(latent):
            name = site["name"]
            support = site["fn"].support
            if name in dependent:
                support = self._current_support(name, result, args, kwargs)
            transform = biject_to(support)
            value = transform(unconstrained)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(
                    log_density, log_density.dim() - value.dim() + site["fn"].event_dim
                )
            delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    def sample_latent(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A draw of $u$ from the posterior, or the fixed latent set by the warm start's
        density evaluations."""
        if self._fixed_latent is not None:
            return pyro.sample(
                f"_{self._pyro_name}_latent",
                dist.Delta(self._fixed_latent, event_dim=1),
                infer={"is_auxiliary": True},
            )
        return super().sample_latent(*args, **kwargs)

    # -- the posterior over the unconstrained latent vector ------------------------------
    def get_base_dist(self) -> dist.Distribution:
        """Independent Student-t coordinates with the learned ``tail_df``, or
        $\\mathcal N(0, I_D)$, the flow's own base, with ``tail_df=None``."""
        if self._tail_df is None:
            return self.flow.base_dist()
        zero = torch.zeros_like(self.base_loc)
        return dist.StudentT(self.tail_df, zero, torch.ones_like(zero)).to_event(1)

    def _transforms(self) -> list[Transform]:
        """The flow's layers, the learnable affine stage, the fixed warm-start map: a flat list
        (nested composes are slow)."""
        layers: list[Transform] = self.flow.layers
        if self._affine_kind == "full":
            layers.append(LowerCholeskyAffine(self.loc, self.scale_tril))
        elif self._affine_kind == "diagonal":
            layers.append(AffineTransform(self.loc, self.scale, event_dim=1))
        if self.base_scale_tril.numel():
            layers.append(LowerCholeskyAffine(self.base_loc, self.base_scale_tril))
        else:
            layers.append(
                LowRankAffine(
                    self.base_loc, self.base_scale, self.base_directions, self.base_direction_scales
                )
            )
        return layers

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        """$\\varepsilon \\mapsto u$, the whole map (independent of the model's arguments)."""
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowPosterior:
        """$q(u)$ as a [`FlowPosterior`][pyroflows.guides.FlowPosterior] (free ``log_prob`` at
        its own samples)."""
        return FlowPosterior(self.get_base_dist(), self._transforms())

    def forward_kl_surrogate(
        self, model: Callable, *args: Any, num_samples: int, weight: float, **kwargs: Any
    ) -> torch.Tensor:
        """The negative ELBO from ``num_samples`` reparameterised draws, plus ``weight`` times
        a term of value zero whose gradient in the guide's parameters estimates that of
        $\\mathrm{KL}(p \\,\\|\\, q)$ by self-normalised importance sampling: the wake-phase
        update of reweighted wake-sleep (Bornschein & Bengio 2015) with a defensive proposal
        (Hesterberg 1995),

        $$
        -\\mathbb E_q[\\log w] \\;-\\; \\lambda \\sum_k \\bar w_k \\log q_\\theta(\\bar u_k),
        \\qquad \\bar w_k \\propto \\frac{p(\\bar u_k)}{r(\\bar u_k)}, \\qquad
        r = (1 - \\alpha)\\, q + \\alpha\\, q_s,
        $$

        with the draws $\\bar u_k$ and the weights held fixed in the second term. The draws are
        the ELBO's own $K$ draws of $q$ and $K/4$ draws of $q_s$, the guide's flow pushed from
        its base widened $s = 3$ times ($\\alpha = 1/5$). Where the guide holds too little
        mass the weights are large and $\\log q$ is pushed up there: a direct signal for mass
        misplaced along a thin ridge, which the ELBO's gradient moves only slowly. The wide
        draws let the weights see mass beyond the guide's own draws; without them the term
        only sees where $q$ draws and cut off the ends of U2's and U4's waves. The second
        term's gradient is capped at 10 times the ELBO gradient's norm (scaled down, same
        direction): a draw where $q$ is nearly empty can take all the weight with a gradient of
        $\\log q$ $10^4$ to $10^8$ times the ELBO's, and would otherwise steer every step.
        ``fit_guide`` uses it with ``forward_kl`` (``docs/splines.md``, ninth and eleventh
        passes).

        Args:
            model: the model ($p$; ``fit_guide`` passes its tempered model while annealing).
            *args: the model's arguments.
            num_samples: draws $K$ of the guide.
            weight: $\\lambda \\ge 0$.
            **kwargs: the model's keyword arguments.

        Returns:
            A scalar: the negative ELBO's value, with both gradients.
        """
        posterior = self.get_posterior()
        base = posterior.base_dist
        noise = base.rsample((num_samples,))
        latent, log_q = posterior.push(noise)
        log_p = unconstrained_log_density(self, model, latent, args, kwargs)[0]
        log_w = log_p - log_q
        with torch.no_grad():
            wide_noise = WIDE_SCALE * base.sample((max(1, num_samples // WIDE_FRACTION),))
            wide, _ = posterior.push(wide_noise)
            wide_log_p = unconstrained_log_density(self, model, wide, args, kwargs)[0]
        fixed = torch.cat([latent.detach(), wide])
        noise = torch.cat([noise.detach(), wide_noise])
        # a fresh posterior evaluates log q at the fixed draws by the inverse pass
        fixed_log_q = self.get_posterior().log_prob(fixed)
        # q_s / q = base(z / s) / (s^D base(z)) at the draw's base point z: same Jacobian
        log_ratio = (
            base.log_prob(noise / WIDE_SCALE)
            - noise.shape[-1] * math.log(WIDE_SCALE)
            - base.log_prob(noise)
        )
        share = len(wide_noise) / len(noise)
        log_r = fixed_log_q.detach() + torch.logaddexp(
            torch.full_like(log_ratio, math.log1p(-share)), math.log(share) + log_ratio
        )
        # held fixed: a Student-t base's learned df would otherwise reach them through log_r
        log_weights = (torch.cat([log_p.detach(), wide_log_p]) - log_r).detach()
        weights = torch.softmax(torch.nan_to_num(log_weights, nan=-math.inf), 0)
        cover = -(weights.nan_to_num(0.0) * fixed_log_q).sum()  # no finite weight: no signal
        loss = -log_w.mean()
        params = [p for p in self.parameters() if p.requires_grad]
        grad_loss = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grad_cover = torch.autograd.grad(cover, params, retain_graph=True, allow_unused=True)
        # a fixed point where q is nearly empty can carry all the weight and a gradient of
        # log q 1e4-1e8 times the ELBO's, which then takes over every step: the cap keeps the
        # term a push on the ELBO (docs/splines.md, eleventh pass)
        ratio = COVER_CAP * _norm(grad_loss) / _norm(grad_cover)
        scale = weight * torch.nan_to_num(ratio, posinf=1.0).clamp(max=1.0)
        push = sum(
            (p * (scale * g)).sum() for p, g in zip(params, grad_cover) if g is not None
        )
        return loss + push - push.detach()

    # -- trust -----------------------------------------------------------------------------
    @torch.no_grad()
    def diagnose(self, *args: Any, num_samples: int = 4000, **kwargs: Any) -> dict[str, Any]:
        """Pareto-smoothed importance sampling of the model against the guide (Yao et al. 2018).

        Draws ``num_samples`` latents from the guide, computes the log importance weights
        $\\log p(x, z) - \\log q(z)$ and smooths them with ``arviz.psislw``.

        Args:
            *args: the model's arguments.
            num_samples: guide draws.
            **kwargs: the model's keyword arguments.

        Returns:
            ``khat`` (Pareto $\\hat k$: below 0.5 good, below 0.7 usable, above unreliable),
            ``ess`` (effective sample size of the smoothed weights), ``verdict`` (one line),
            ``elbo`` and ``elbo_stderr`` (the ELBO from the same draws), ``weights``
            (normalised smoothed weights, ``(num_samples,)``) and ``samples`` (site name ->
            constrained draws ``(num_samples, *site_shape)``, latent sites and, for models
            that vectorise over an outer plate, ``pyro.deterministic`` sites):
            ``(weights * x).sum(0)``
            is the PSIS estimate of a posterior mean, and resampling by ``weights`` gives
            PSIS-reweighted draws.

        Raises:
            RuntimeError: the guide has not been trained yet (no parameter has changed since
                its set-up).
        """
        import arviz as az  # heavy: only the diagnostic needs it

        check_int(num_samples, "num_samples", minimum=2)
        if self.prototype_trace is None or all(
            p._version == v for p, v in zip(self.parameters(), self._setup_versions, strict=True)
        ):
            raise RuntimeError(
                "diagnose() needs a trained guide: run fit_guide(model, guide, ...) (or SVI) first"
            )
        latent = self.get_posterior().sample((num_samples,))
        log_w, trace = unconstrained_log_density(self, self.model, latent, args, kwargs)
        log_q = self.get_posterior().log_prob(latent)
        log_w = (log_w - log_q).double().cpu()
        finite = torch.isfinite(log_w)
        log_w = torch.where(finite, log_w, torch.full_like(log_w, -math.inf))
        smoothed, khat = az.psislw(log_w.numpy().copy())
        weights = torch.from_numpy(smoothed).exp()
        weights = weights / weights.sum()
        khat = float(khat)
        ess = float(1.0 / (weights**2).sum())
        if khat < 0.5:
            verdict = f"good: k-hat {khat:.2f} < 0.5, the guide is close to the posterior"
        elif khat < 0.7:
            verdict = f"usable: k-hat {khat:.2f} < 0.7; prefer the PSIS-reweighted draws"
        else:
            verdict = (
                f"unreliable: k-hat {khat:.2f} >= 0.7; do not trust the guide's draws, "
                "run NeuTra-HMC with its transform"
            )
        ok = log_w[finite]
        samples = self._site_values(latent, args, kwargs, trace if self._vectorizable else None)
        if self._vectorizable:  # the one model trace holds every draw of every site
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and site["infer"].get("_deterministic"):
                    shape = site["value"].shape[1:]
                    while len(shape) > 0 and shape[0] == 1 and len(shape) > site["fn"].event_dim:
                        shape = shape[1:]
                    samples[name] = site["value"].reshape(num_samples, *shape)
        ref = latent
        return dict(
            khat=khat,
            ess=ess,
            verdict=verdict,
            elbo=float(ok.mean()),
            elbo_stderr=float(ok.std() / math.sqrt(max(len(ok), 1))),
            num_nonfinite=int((~finite).sum()),
            weights=weights.to(device=ref.device, dtype=ref.dtype),
            samples=samples,
        )

    def _unpacked(self, latent: torch.Tensor) -> list[tuple[str, dict, torch.Tensor]]:
        """``(name, prototype site, unconstrained value (N, *shape))`` for draws ``(N, D)``."""
        out, pos = [], 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = shape.numel()
            out.append((name, site, latent[:, pos : pos + size].reshape(-1, *shape)))
            pos += size
        return out

    def _site_values(
        self, latent: torch.Tensor, args: tuple, kwargs: dict, trace: Any = None
    ) -> dict[str, torch.Tensor]:
        """Constrained draws ``(N, *site_shape)`` of every latent site for latents ``(N, D)``;
        a site whose support depends on other sites takes it at each draw's values, from a
        model run over the draws (``trace``, when the caller has one)."""
        samples = {
            name: biject_to(site["fn"].support)(value)
            for name, site, value in self._unpacked(latent)
        }
        dependent = self._dependent_sites()
        if not dependent:
            return samples
        if trace is None and self._vectorizable:
            trace = unconstrained_log_density(self, self.model, latent, args, kwargs)[1]
        if self._vectorizable:  # (the run above may have found that the model is not)
            rows, traces = [latent], [trace]
        else:
            rows = list(latent.split(1))
            traces = [unconstrained_log_density(self, self.model, r, args, kwargs)[1] for r in rows]
        for name in dependent:
            shape = self.prototype_trace.nodes[name]["value"].shape
            samples[name] = torch.cat(
                [
                    t.nodes[name]["value"].reshape(len(r), *shape)
                    for t, r in zip(traces, rows, strict=True)
                ]
            )
        return samples

    # -- summaries -----------------------------------------------------------------------
    @torch.no_grad()
    def _constrained_samples(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``num_quantile_samples`` posterior draws of every site, ``(N, *site_shape)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not args and not kwargs:
            args, kwargs = self._latest_args
        latent = self.get_posterior(*args, **kwargs).sample((self.num_quantile_samples,))
        return self._site_values(latent, args, kwargs)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of every latent site, estimated from
        ``num_quantile_samples`` draws (Monte-Carlo error about $\\sqrt{p(1-p)/N} / q(x_p)$).

        A site whose support depends on other sites (``beta ~ Uniform(0, 1 - alpha)``) is
        constrained at each draw's values of those sites, as in
        [`forward`][pyroflows.guides.autoflow.AutoFlow.forward], which takes one vectorised run
        of the model over the draws (one run per draw for a model that does not vectorise);
        other sites need no model run.

        Args:
            quantiles: levels in $[0, 1]$.
            *args: the model's arguments (default: those of the guide's latest call; used to
                set the guide up if it has not run yet, and for dependent supports).
            **kwargs: the model's keyword arguments (likewise).

        Returns:
            site name -> tensor of shape ``(len(quantiles), *site_shape)``.
        """
        samples = self._constrained_samples(*args, **kwargs)
        ref = next(iter(samples.values()))
        levels = torch.as_tensor(quantiles, dtype=ref.dtype, device=ref.device).reshape(-1)
        if not ((levels >= 0) & (levels <= 1)).all():
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        return {name: torch.quantile(value, levels, dim=0) for name, value in samples.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Marginal posterior medians of every latent site (Monte-Carlo, see
        [`quantiles`][pyroflows.guides.autoflow.AutoFlow.quantiles])."""
        return {name: q[0] for name, q in self.quantiles([0.5], *args, **kwargs).items()}
