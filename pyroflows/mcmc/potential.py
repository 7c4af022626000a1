r"""``ModelPotential``: a Pyro model as a batched energy on the unconstrained space.

The potential of a model with continuous latent sites $x_1, \dots, x_K$ (each mapped to
$\mathbb R^{d_k}$ by $T_k$ = ``biject_to(site.support)``) at the packed vector
$u = (u_1, \dots, u_K) \in \mathbb R^D$ is

$$
U(u) = -\log p\bigl(T_1(u_1), \dots, T_K(u_K), y\bigr)
       - \sum_k \log\bigl|\det \partial T_k / \partial u_k\bigr| ,
$$

the energy HMC samples (Stan's and Pyro's change of variables).

**How.** One trace of the model (at construction) finds the latent, observed and deterministic
sites, their shapes, supports and plates. Every later evaluation runs the model **once for all
chains**: inside an extra plate of size ``num_chains`` at ``dim = -(max_plate_nesting + 1)``
(beyond every plate and batch dimension of the model, as Pyro's vectorized ELBO particles), each
latent site receives its slice of ``u`` mapped through the bijection of the support it has *in
that execution* — so a support that depends on another parameter (Stan's
``real<upper=1 - a> b``) is transformed correctly — and the log-densities are summed per chain.
A model works when its sites broadcast over outer batch dimensions: plates with ``dim=`` set,
vector-valued sites declared with ``.to_event``. Construction checks that two chains evaluated
together give each chain the density it has alone, and names the site where they do not.
A model written for one chain at a time (``X @ beta``, a Cholesky factor of a kernel matrix built
from a parameter, the style Pyro's own NUTS runs) takes ``vectorize="vmap"`` instead: the model
is then executed for a single chain and ``torch.func.vmap`` maps that execution over the chains
(still one execution for all of them, and replayed and compiled as the plate's is); only Python
control flow on a latent value (``if x > 0``, ``.item()``) cannot be mapped. A site
that ``poutine.reparam`` replaced (observed through a ``Delta`` at its new value) is reported
like a deterministic site.

**Replay.** Executing the model costs mostly Python (handlers, distribution construction,
broadcasting), not arithmetic. From the second call with a given shape on, the energy and its
gradient come from a graph of tensor ops traced from one execution and simplified
(`pyroflows.mcmc.replay`), which runs at the speed of a hand-written energy. A model whose
execution cannot be traced faithfully is executed every time, with a warning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from pyroflows.mcmc.core import EnergyFunction, is_rejectable
from pyroflows.mcmc.replay import Replay
from pyroflows.validation import check_choice, check_int, check_tensor

__all__ = ["ModelPotential"]

_CHAINS = "_pyroflows_chains"
#: how one execution evaluates every chain (``ModelPotential(vectorize=...)``)
VECTORIZE = ("plate", "vmap")

InitStrategy = Callable[[dict], torch.Tensor] | Mapping[str, Any] | None


def _reparameterized(site: dict) -> bool:
    """Whether a site is a latent that a Pyro reparameterizer (``poutine.reparam``, e.g.
    ``LocScaleReparam``) replaced by a function of new latent sites: it is then observed through
    a ``Delta`` at that function's value. Its value is reported like a deterministic site's, not
    as data; its log-density (a Jacobian term, if any) stays in the potential."""
    fn = site["fn"]
    return site["is_observed"] and isinstance(getattr(fn, "base_dist", fn), Delta)


@dataclass(frozen=True)
class _Latent:
    shape: torch.Size  # the site's own value shape
    unconstrained_numel: int  # entries of u per chain
    start: int  # offset in u


def _per_chain(x: torch.Tensor, num_chains: int | None) -> torch.Tensor:
    """Sum everything but the leading chain dimension (a tensor without one is broadcast);
    with ``num_chains=None`` (one chain's execution, under ``vmap``) sum everything."""
    if num_chains is None:
        return x.sum()
    if x.dim() == 0:
        x = x.reshape(1)
    if x.shape[0] != num_chains:
        x = x.expand(num_chains, *x.shape[1:])
    if x.dim() == 1:  # one value per chain already (spares a replayed graph two ops per site)
        return x
    return x.reshape(num_chains, -1).sum(1)


class _Record(Messenger):
    """Collects the sites of one execution (a lighter trace: no copies of the messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[str, dict] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        if not site_is_subsample(msg):
            self.sites[msg["name"]] = msg


class _SetLatents(Messenger):
    """Gives every latent site its value: ``choose(name, msg) -> (value, log|J| or None)``."""

    def __init__(self, choose: Callable[[str, dict], tuple[torch.Tensor, torch.Tensor | None]]):
        super().__init__()
        self.choose = choose
        self.log_det: list[torch.Tensor] = []

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        value, log_det = self.choose(msg["name"], msg)
        msg["value"] = value
        if log_det is not None:
            self.log_det.append(log_det)


def finite_start(
    energy: Callable[[torch.Tensor], torch.Tensor],
    draw: Callable[[], torch.Tensor],
    generator: torch.Generator,
    *,
    max_tries: int = 100,
) -> torch.Tensor:
    """Starting points ``(C, D)`` where ``energy`` is finite: chains at a non-finite energy are
    redrawn (``draw()`` gives fresh candidates for all chains) up to ``max_tries`` times; the few
    that never find one copy chains that did.

    Raises:
        ValueError: no chain found a finite energy.
    """
    u = draw()
    for _ in range(max_tries):
        with torch.no_grad():
            bad = ~torch.isfinite(energy(u))
        if not bad.any():
            return u
        u = torch.where(bad[:, None], draw(), u)
    good = (~bad).nonzero().flatten()
    if len(good) == 0:
        raise ValueError(
            f"every chain starts at a non-finite energy (after {max_tries} tries of the init "
            "strategy): the model's density is -inf or NaN there; give init values inside "
            "its support"
        )
    pick = torch.randint(len(good), (int(bad.sum()),), generator=generator, device=u.device)
    u = u.clone()
    u[bad] = u[good[pick]]
    return u


class _Replayed(torch.autograd.Function):
    """$U(u)$ from a replayed graph, whose gradient the graph computed in the same pass."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, graph: Callable, execute: Callable) -> torch.Tensor:
        value, grad = graph(u)
        ctx.execute = execute
        ctx.save_for_backward(u, grad)
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        u, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate an execution instead
            (grad,) = torch.autograd.grad(ctx.execute(u).sum(), u, create_graph=True)
        return grad_output[:, None] * grad, None, None


class ModelPotential:
    """Batched potential energy of a Pyro model on the unconstrained space of its latent sites.

    Args:
        model: a Pyro model with continuous latent sites and static structure (the same sites
            and shapes at every execution) whose sites broadcast over outer batch dimensions
            (or, with ``vectorize="vmap"``, any such model written for one chain).
        *args: the model's positional arguments (bound for every evaluation).
        vectorize: how one execution evaluates every chain: ``"plate"`` (an outer plate over
            the chains; the model must broadcast over it) or ``"vmap"`` (the model runs for a
            single chain and ``torch.func.vmap`` maps it over the chains). Not passed to the
            model.
        **kwargs: the model's keyword arguments.

    Raises:
        ValueError: naming the site, for a model with no latent sites, a discrete latent site,
            a support without a bijection to $\\mathbb R^d$, a subsampling plate, a site that
            does not broadcast over the chain plate (``"plate"``), or a model ``vmap`` cannot
            map (``"vmap"``).

    Example:
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
        ...     sigma = pyro.sample("sigma", dist.HalfNormal(y.new_tensor(1.0)))
        ...     with pyro.plate("data", len(y), dim=-1):
        ...         pyro.sample("y", dist.Normal(mu, sigma), obs=y)
        >>> potential = ModelPotential(model, torch.randn(20))
        >>> u = potential.init(num_chains=100)  # (100, 2)
        >>> potential.energy(u).shape, potential.unpack(u)["sigma"].shape
        (torch.Size([100]), torch.Size([100]))
    """

    def __init__(
        self, model: Callable, *args: Any, vectorize: str = "plate", **kwargs: Any
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.model, self.args, self.kwargs = model, args, kwargs
        self.vectorize = check_choice(vectorize, "vectorize", VECTORIZE)
        self._discover(self._discovery_trace())
        if self.vectorize == "plate":
            self._check_broadcast()
        else:
            self._check_vmap()
        #: replay the traced log-density after the first calls (``False``: always execute)
        self.replay = True
        self._replay = Replay(self._execute, name="model's log-density")

    # -- discovery -----------------------------------------------------------------------
    def _discovery_trace(self, max_tries: int = 100) -> dict[str, dict]:
        """The sites of one execution at a draw from the prior, redrawn (as Pyro's and Stan's
        initialisation do) while the model has no density there (a matrix it factors is not
        positive definite)."""
        for _ in range(max_tries - 1):
            try:
                return self._record_execution()
            except (ValueError, RuntimeError) as err:
                if not is_rejectable(err):
                    raise
        return self._record_execution()

    def _record_execution(self) -> dict[str, dict]:
        record = _Record()
        with poutine.block(), record, _SetLatents(self._discovery_value):
            self.model(*self.args, **self.kwargs)
        return record.sites

    def _discovery_value(self, name: str, msg: dict) -> tuple[torch.Tensor, None]:
        fn = msg["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(fn).__name__}): the gradient samplers "
                "need continuous latent sites (marginalize it, or use the Gibbs kernel)"
            )
        try:
            biject_to(fn.support)
        except NotImplementedError:
            raise ValueError(
                f"latent site {name!r} has support {fn.support} with no bijection to R^d "
                "(torch.distributions.biject_to has none registered)"
            ) from None
        try:
            return fn.sample().detach(), None
        except NotImplementedError:  # improper priors (Pyro's ImproperUniform): a feasible point
            t = biject_to(fn.support)
            ref = self._reference_tensor()
            zeros = torch.zeros(t.inverse_shape(fn.shape()), device=ref.device, dtype=ref.dtype)
            return t(zeros), None

    def _reference_tensor(self) -> torch.Tensor:
        """A floating tensor among the model's arguments (device and dtype of made-up points)."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        return torch.zeros((), device="cpu")

    def _discover(self, sites: dict[str, dict]) -> None:
        self._latent: dict[str, _Latent] = {}
        self._observed: dict[str, dict] = {}
        self._deterministic: dict[str, torch.Size] = {}
        self._frames: dict[str, list] = {}
        nesting, start = 0, 0
        for name, site in sites.items():
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
                    full = getattr(frame, "full_size", None)
                    if full is not None and full > frame.size:
                        raise ValueError(
                            f"site {name!r} is in plate {frame.name!r} that subsamples "
                            f"({frame.size} of {full}): a potential needs the "
                            "full data"
                        )
            self._frames[name] = [f for f in site["cond_indep_stack"] if f.vectorized]
            nesting = max(nesting, len(fn.batch_shape))
            if site["infer"].get("_deterministic") or _reparameterized(site):
                self._deterministic[name] = site["value"].shape
            elif site["is_observed"]:
                if not site["infer"].get("is_auxiliary"):  # pyro.factor sites are not data
                    self._observed[name] = site
            else:
                value = site["value"]
                numel = biject_to(fn.support).inverse_shape(value.shape).numel()
                self._latent[name] = _Latent(value.shape, numel, start)
                start += numel
        if not self._latent:
            raise ValueError("the model has no latent sample sites: there is nothing to sample")
        self.max_plate_nesting = nesting
        self.dim = start
        self.event_shape = (start,)
        first = sites[next(iter(self._latent))]["value"]
        self._device, self._dtype = first.device, first.dtype

    def _check_points(self, check: Callable[[torch.Tensor], None]) -> None:
        """Run ``check`` at two points in $[-2, 2]^D$, or, where the model has no density there
        (a matrix it factors is not positive definite), at two points near 0; a model with no
        density there either is left to the sampler's rejections, unchecked."""
        gen = torch.Generator(device=self._device).manual_seed(0)
        for radius in (2.0, 0.1):
            u = torch.rand((2, self.dim), generator=gen, device=self._device, dtype=self._dtype)
            try:
                return check(radius * (2 * u - 1))
            except (ValueError, RuntimeError) as err:
                if not is_rejectable(err):
                    raise
        return None

    def _check_broadcast(self) -> None:
        """Two chains run together must each get the density they get alone."""
        self._check_points(self._check_broadcast_at)

    def _check_broadcast_at(self, u: torch.Tensor) -> None:
        try:
            together = self._site_log_probs(u)
        except Exception as err:
            if is_rejectable(err):
                raise
            raise ValueError(
                "the model does not run under an outer chain plate "
                f"(dim={-(self.max_plate_nesting + 1)}): {' '.join(str(err).split())}. Write "
                "its plates with dim= set and vector-valued sites with .to_event(1), so that "
                "every site broadcasts over extra batch dimensions on the left, or pass "
                "vectorize='vmap' for a model written for one chain"
            ) from err
        alone = [self._site_log_probs(u[i : i + 1]) for i in range(2)]
        for name, lp in together.items():
            single = torch.cat([a[name] for a in alone])
            if not torch.allclose(lp, single, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise ValueError(
                    f"site {name!r} is not chain-broadcastable: its log-density for one chain "
                    "changes when other chains are evaluated alongside (the model mixes batch "
                    "dimensions, e.g. a sum, reshape or .item() over a parameter). Use plates "
                    "with dim= set and .to_event for vector-valued sites, or pass "
                    "vectorize='vmap' for a model written for one chain"
                )

    def _check_vmap(self) -> None:
        """The one-chain execution must map over chains (no Python branch on a value)."""
        self._check_points(self._check_vmap_at)

    def _check_vmap_at(self, u: torch.Tensor) -> None:
        try:
            self._execute(u)
        except Exception as err:
            if is_rejectable(err):
                raise
            message = " ".join(str(err).split())
            # vmap cannot write a chain's value into a tensor made without the chain dimension
            # (Pyro's OrderedLogistic fills its probabilities so); branches on values fail too
            hint = (
                "an in-place write of a latent value into a new tensor (in the model or in a "
                "distribution it uses) cannot be vectorized: write the model for the chain "
                "plate (vectorize='plate') or build the tensor out of place"
                if "inplace" in message
                else "Python control flow on a latent value (if x > 0, .item(), float(x)) "
                "cannot be vectorized: write it with torch.where"
            )
            raise ValueError(
                f"the model cannot be mapped over chains by torch.func.vmap: {message}. {hint}"
            ) from err

    # -- one execution for all chains --------------------------------------------------------
    def _run(self, u: torch.Tensor) -> tuple[dict[str, dict], torch.Tensor]:
        """Execute the model once for the ``C`` chains of ``u`` ``(C, D)`` under the chain
        plate, or for one chain ``(D,)`` (a ``vmap``-ed execution): its sites, and the summed
        log-Jacobian per chain ``(C,)`` (a scalar for one chain)."""
        num_chains = u.shape[0] if u.dim() == 2 else None

        def choose(name: str, msg: dict) -> tuple[torch.Tensor, torch.Tensor]:
            info = self._latent[name]
            t = biject_to(msg["fn"].support)
            shape = t.inverse_shape(msg["fn"].shape())
            free = u[..., info.start : info.start + info.unconstrained_numel].reshape(shape)
            value = t(free)
            return value, _per_chain(t.log_abs_det_jacobian(free, value), num_chains)

        record, latents = _Record(), _SetLatents(choose)
        # blocked: the internal execution (and the plate's own subsample site, created with
        # the plate) never shows its sites to the caller's handlers
        with poutine.block(), record, latents, self._chain_plate(num_chains, u.device):
            self.model(*self.args, **self.kwargs)
        missing = set(self._latent) - set(record.sites)
        if missing:
            raise ValueError(f"latent site(s) {sorted(missing)} did not appear: the model's "
                             "structure must be static")
        log_det = sum(latents.log_det, u.new_zeros(num_chains or ()))
        return record.sites, log_det

    def _chain_plate(self, num_chains: int | None, device: torch.device) -> Any:
        """The plate over chains beyond the model's own (none for one chain's execution)."""
        if num_chains is None:
            return contextlib.nullcontext()
        dim = -(self.max_plate_nesting + 1)
        return pyro.plate(_CHAINS, num_chains, dim=dim, device=device)

    def _over_chains(self, fn: Callable, *inputs: Any, randomness: str = "error") -> Any:
        """``fn`` of every chain's inputs (leading dimension): one call under the chain plate,
        or ``fn`` of one chain mapped by ``torch.func.vmap``."""
        if self.vectorize == "plate":
            return fn(*inputs)
        return torch.func.vmap(fn, randomness=randomness)(*inputs)

    @staticmethod
    def _log_prob(site: dict) -> torch.Tensor:
        lp = site["fn"].log_prob(site["value"])
        return scale_and_mask(lp, site["scale"], site["mask"])

    def _site_log_probs(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        sites, _ = self._run(u)
        return {
            name: _per_chain(self._log_prob(site), u.shape[0])
            for name, site in sites.items()
            if site["type"] == "sample" and not site["infer"].get("_deterministic")
        }

    def _flat(self, u: torch.Tensor) -> torch.Tensor:
        check_tensor(u, "u", event_shape=(self.dim,), min_batch_dims=1)
        return u.reshape(-1, self.dim)

    # -- public interface ---------------------------------------------------------------------
    def energy(self, u: torch.Tensor) -> torch.Tensor:
        """$U(u)$ for every chain, in one model execution.

        After the first calls with a given shape the model is not executed any more: its
        log-density and gradient are replayed from a traced graph of tensor ops (see
        `pyroflows.mcmc.replay`; set ``replay = False`` to always execute the model). Gradients
        of any order are exact; second derivatives execute the model.

        Args:
            u: unconstrained points ``(C, D)`` (any leading batch shape works).

        Returns:
            ``(C,)``: minus the model's log joint density at the constrained point, minus the
            log-Jacobian of the map from ``u``. Points where the model's density is not finite
            give ``inf`` or ``NaN`` there (the samplers reject them).
        """
        flat = self._flat(u)
        value = None
        if self.replay:
            with_grad = torch.is_grad_enabled() and flat.requires_grad
            graph = self._replay.lookup(flat, with_grad)
            if graph is not None:
                value = _Replayed.apply(flat, graph, self._execute) if with_grad else graph(flat)[0]
        if value is None:
            value = self._execute(flat)
        return value.reshape(u.shape[:-1])

    def value_and_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """$U(u)$ and $\\nabla U(u)$ for every chain (what a gradient sampler needs per step).

        Args:
            u: unconstrained points ``(C, D)``.

        Returns:
            ``(C,)`` energies and ``(C, D)`` gradients, detached.
        """
        flat = self._flat(u).detach()
        graph = self._replay.lookup(flat, True) if self.replay else None
        if graph is not None:
            value, grad = graph(flat)
        else:
            with torch.enable_grad():
                x = flat.requires_grad_(True)
                value = self._execute(x)
                (grad,) = torch.autograd.grad(value.sum(), x)
            value = value.detach()
        return value.reshape(u.shape[:-1]), grad.reshape(u.shape)

    def traced(self, u: torch.Tensor) -> Callable | None:
        """The replayed graph of $U$ and $\\nabla U$ for points shaped like ``u`` (``(C, D)``):
        ``graph(u) -> (U(u), grad U(u))``, pure tensor ops that ``torch.compile`` can fuse;
        ``None`` while there is none (see [`energy`][pyroflows.mcmc.ModelPotential.energy])."""
        if not self.replay or u.dim() != 2:
            return None
        return self._replay.lookup(u.detach(), True)

    def _execute(self, flat: torch.Tensor) -> torch.Tensor:
        """$U$ of ``(C, D)`` points by executing the model."""
        return self._over_chains(self._energy, flat)

    def _energy(self, u: torch.Tensor) -> torch.Tensor:
        """$U$ of ``(C, D)`` points under the chain plate, or of one chain's ``(D,)``."""
        num_chains = u.shape[0] if u.dim() == 2 else None
        with pyro.validation_enabled(False):  # support checks would cost a host sync per site
            sites, log_det = self._run(u)
            log_p = log_det
            for site in sites.values():
                if site["type"] == "sample" and not site["infer"].get("_deterministic"):
                    log_p = log_p + _per_chain(self._log_prob(site), num_chains)
        return -log_p

    __call__ = energy

    @staticmethod
    def _own_shape(value: torch.Tensor, shape: torch.Size, num_chains: int | None) -> torch.Tensor:
        """``(C, *shape)`` from a value with the chain plate's dims, or from a constant
        (``shape`` itself for one chain's execution)."""
        if num_chains is None:
            return value.reshape(shape)
        if value.numel() == num_chains * shape.numel():
            return value.reshape(num_chains, *shape)
        return value.reshape(shape).expand(num_chains, *shape)

    def _constrained(self, u: torch.Tensor) -> tuple[dict, dict, dict]:
        with torch.no_grad():
            return self._over_chains(self._site_values, self._flat(u))

    def _site_values(self, u: torch.Tensor) -> tuple[dict, dict, dict]:
        """Latent, deterministic and pointwise log-likelihood values at ``(C, D)`` points, or
        at one chain's ``(D,)``."""
        num_chains = u.shape[0] if u.dim() == 2 else None
        with pyro.validation_enabled(False):
            sites, _ = self._run(u)
            latent = {
                name: self._own_shape(sites[name]["value"], info.shape, num_chains)
                for name, info in self._latent.items()
            }
            deterministic = {
                name: self._own_shape(sites[name]["value"], shape, num_chains)
                for name, shape in self._deterministic.items()
            }
            loglik = {
                name: self._own_shape(
                    self._log_prob(sites[name]), site["fn"].batch_shape, num_chains
                )
                for name, site in self._observed.items()
            }
        return latent, deterministic, loglik

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The latent sites at ``u`` ``(C, D)``, constrained, each ``(C, *site_shape)``."""
        return self._constrained(u)[0]

    def deterministic(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's ``pyro.deterministic`` sites at ``u`` ``(C, D)``, each ``(C, *shape)``."""
        return self._constrained(u)[1]

    def log_likelihood(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pointwise log-likelihood of every observed site at ``u`` ``(C, D)``: each
        ``(C, *batch_shape)`` (one entry per plate element, as ``arviz.loo`` needs)."""
        return self._constrained(u)[2]

    def observed_data(self) -> dict[str, torch.Tensor]:
        """The observed sites' values, as the model received them."""
        return {name: site["value"].detach() for name, site in self._observed.items()}

    def shapes(self) -> dict[str, torch.Size]:
        """The own shape of every latent and deterministic site."""
        shapes = {name: info.shape for name, info in self._latent.items()}
        return {**shapes, **self._deterministic}

    def dims(self) -> dict[str, list[str]]:
        """arviz dimension names of every latent and deterministic site's own shape, and of every
        observed site's value (its pointwise ``log_likelihood`` takes the leading, batch ones):
        a plate's name where a plate indexes the dimension, else ``"<site>_dim_<i>"``."""
        shapes = {**self.shapes(), **{n: s["value"].shape for n, s in self._observed.items()}}
        events = {n: len(s["fn"].event_shape) for n, s in self._observed.items()}
        dims = {}
        for name, shape in shapes.items():
            by_dim = {f.dim: f for f in self._frames.get(name, [])}
            names: list[str] = []
            for i, size in enumerate(shape):
                # an observed site's plates index its batch dims, left of the event dims
                frame = by_dim.get(i - len(shape) + events.get(name, 0))
                named = frame is not None and frame.size == size and frame.name not in names
                names.append(frame.name if named else f"{name}_dim_{i}")
            dims[name] = names
        return dims

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The unconstrained vector ``(C, D)`` of constrained site values ``(C, *site_shape)``
        (the inverse of [`unpack`][pyroflows.mcmc.ModelPotential.unpack])."""
        num_chains = len(next(iter(values.values())))
        return self._init_chains(num_chains, dict(values), torch.Generator(device=self._device))

    # -- initialisation ----------------------------------------------------------------------
    def init(
        self,
        num_chains: int,
        strategy: InitStrategy = None,
        generator: torch.Generator | None = None,
        *,
        max_tries: int = 100,
    ) -> torch.Tensor:
        """Starting points ``(num_chains, D)`` for all chains at once.

        Args:
            num_chains: how many chains.
            strategy: a Pyro init strategy (``init_to_uniform`` — the default —,
                ``init_to_median``, ``init_to_sample``, ``init_to_mean``, ``init_to_feasible``,
                ``init_to_value(values=...)``), or a dict ``{site: value}`` (value of the site's
                own shape, or ``(num_chains, *shape)`` for one per chain; other sites
                ``init_to_uniform``). A strategy applies to every chain's site at once, so random
                strategies give every chain its own point.
            generator: the source of randomness (Pyro's strategies draw from torch's global
                generator, forked and seeded from this one, so the global state is left as it was).
            max_tries: redraws of the chains whose energy is not finite.

        Returns:
            unconstrained points, on the device and dtype of the model's latent values.

        Raises:
            ValueError: ``num_chains < 1``; a dict naming a site the model lacks, or a value of
                the wrong shape; every chain still at a non-finite energy after ``max_tries``.
        """
        check_int(num_chains, "num_chains", minimum=1)
        check_int(max_tries, "max_tries", minimum=1)
        if strategy is not None and not callable(strategy) and not isinstance(strategy, Mapping):
            raise TypeError(
                "init must be a Pyro init strategy, a {site: value} dict or None, got "
                f"{type(strategy).__name__}"
            )
        if isinstance(strategy, Mapping):
            self._check_values(strategy, num_chains)
        if generator is None:
            generator = torch.Generator(device=self._device)
            generator.manual_seed(int(torch.randint(2**62, (), device="cpu")))
        return finite_start(  # guarded: a chain's point without a density has energy NaN
            EnergyFunction(self.energy, 1),
            lambda: self._init_chains(num_chains, strategy, generator),
            generator,
            max_tries=max_tries,
        )

    def _check_values(self, values: Mapping[str, Any], num_chains: int) -> None:
        for name, value in values.items():
            if name not in self._latent:
                raise ValueError(
                    f"init names site {name!r}, which is not a latent site of the model "
                    f"(latent sites: {', '.join(self._latent)})"
                )
            shape = self._latent[name].shape
            got = tuple(torch.as_tensor(value).shape)
            if got not in (tuple(shape), (num_chains, *shape)):
                raise ValueError(
                    f"init value of site {name!r} must have shape {tuple(shape)} or "
                    f"{(num_chains, *shape)}, got {got}"
                )

    def _init_chains(
        self, num_chains: int, strategy: InitStrategy, generator: torch.Generator
    ) -> torch.Tensor:
        """One execution for all chains, each latent site initialised by ``strategy``."""
        values = {
            name: torch.as_tensor(value, device=self._device, dtype=self._dtype)
            .reshape(-1, *self._latent[name].shape)
            .expand(num_chains, *self._latent[name].shape)
            for name, value in (strategy.items() if isinstance(strategy, Mapping) else ())
        }
        site_init = strategy if callable(strategy) else init_to_uniform
        # Pyro's strategies draw from the global generator: fork it, seeded from ours
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            chains = torch.empty(num_chains, device=self._device)  # what vmap maps over
            plate = num_chains if self.vectorize == "plate" else None
            try:
                return self._over_chains(
                    lambda _, given: self._initial_point(given, site_init, plate),
                    chains, values, randomness="different",
                )
            except (ValueError, RuntimeError) as err:
                if self.vectorize == "plate" and not is_rejectable(err):
                    raise
            # One chain at a time, once: vmap cannot draw from some priors (samplers that fill a
            # new tensor in place, as torch's Cauchy does), and a chain whose point has no
            # density must not stop the others (its row is NaN: finite_start redraws it).
            return torch.cat([
                self._initial_row({n: v[i : i + 1] for n, v in values.items()}, site_init)
                for i in range(num_chains)
            ])

    def _initial_row(self, values: dict[str, torch.Tensor], site_init: Callable) -> torch.Tensor:
        """One chain's starting point ``(1, D)``, NaN where the model has no density there."""
        try:
            point = self._initial_point(values, site_init, 1 if self.vectorize == "plate" else None)
        except (ValueError, RuntimeError) as err:
            if not is_rejectable(err):
                raise
            return torch.full((1, self.dim), math.nan, device=self._device, dtype=self._dtype)
        return point.reshape(1, self.dim)

    def _initial_point(
        self, values: dict[str, torch.Tensor], site_init: Callable, chains: int | None
    ) -> torch.Tensor:
        """Unconstrained starting points ``(C, D)`` from one execution under a plate of
        ``chains`` (or one chain's ``(D,)`` with ``None``): given ``values``, else
        ``site_init``."""
        free_values: dict[str, torch.Tensor] = {}

        def choose(name: str, msg: dict) -> tuple[torch.Tensor, None]:
            fn = msg["fn"]
            t = biject_to(fn.support)
            if name in values:
                value = values[name].reshape(fn.shape())
            else:
                try:
                    value = site_init(msg).detach()
                except NotImplementedError:  # a prior that cannot sample: Pyro's uniform rule
                    free = torch.rand(
                        t.inverse_shape(fn.shape()), device=self._device, dtype=self._dtype
                    )
                    value = t(4 * free - 2)
                value = value.expand(fn.shape())  # strategies may give the site's own shape
            free_values[name] = t.inv(value).reshape(*([chains] if chains else []), -1)
            return value.to(self._dtype), None

        with poutine.block(), _SetLatents(choose), self._chain_plate(chains, self._device):
            self.model(*self.args, **self.kwargs)
        return torch.cat([free_values[name] for name in self._latent], -1)

