"""The speed benchmark behind ``pyroflows bench`` and ``benchmarks/flows.py``.

The same architecture (``num_layers`` layers, conditioner MLPs with two hidden layers of
``hidden`` units, ReLU, a standard-Normal base) is built in pyroflows and in each peer library
that is installed (``pip install -e ".[bench]"``), and four operations are timed at batch
``batch``. Families: ``maf``, ``iaf`` and ``realnvp`` (affine; Pyro's ``AffineAutoregressive`` /
``AffineCoupling``, zuko, nflows, normflows), ``nsf_ar`` and ``nsf`` (rational-quadratic
splines, 8 bins on [-5, 5] with linear tails, autoregressive MAF-direction and coupling; Pyro's
``SplineAutoregressive`` / ``SplineCoupling``, zuko's ``NSF`` (``passes=2`` for coupling),
nflows' ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` /
``PiecewiseRationalQuadraticCouplingTransform``). The operations:

* ``log_prob`` of a batch and ``sample`` of a batch (no gradient),
* ``train_step``: ``-log_prob(x).mean()``, backward and an Adam step,
* ``floor``: the bare conditioner networks' forward pass (what a layer cannot avoid).

Every timed call gets a freshly drawn tensor (Pyro caches transform outputs by identity); the
calls of one round run in a shuffled order, so drift in the machine's speed hits every
contender alike; the table reports medians over rounds, and the ratios pyroflows / fastest peer
and pyroflows / its own floor. Run with ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824`` (see ``benchmarks/README.md``): glibc otherwise returns
per-call buffers to the OS and re-faults them, which skews whole phases.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pyroflows.validation import check_int

OPS = ("log_prob", "sample", "train_step", "floor")
FAMILIES = ("maf", "iaf", "realnvp", "nsf", "nsf_ar")
COUPLINGS = ("realnvp", "nsf")
BINS, BOUND = 8, 5.0
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


@dataclass
class Contender:
    """One library's flow: callables ``log_prob(x)``, ``sample(n)``, ``floor(x)`` and the
    modules whose parameters a training step updates."""

    library: str
    log_prob: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int], torch.Tensor]
    floor: Callable[[torch.Tensor], object]
    modules: Sequence[torch.nn.Module]
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def train_step(self, x: torch.Tensor) -> None:
        if self.optimizer is None:
            params = [p for m in self.modules for p in m.parameters()]
            self.optimizer = torch.optim.Adam(params, lr=1e-6)  # tiny: time it, don't drift
        self.optimizer.zero_grad(set_to_none=True)
        (-self.log_prob(x).mean()).backward()
        self.optimizer.step()


# -- the contenders ---------------------------------------------------------------------------
def _pyroflows(family: str, dim: int, hidden: int, layers: int) -> Contender:
    from pyroflows import build_flow

    flow = build_flow(family, dim, num_layers=layers, hidden_dims=(hidden, hidden))
    if family in COUPLINGS:
        nets = [layer.conditioner for layer in flow.layers]
        pairs = list(zip(nets, flow.layers, strict=True))
        floor = lambda x: [net(x[..., layer.idx_a]) for net, layer in pairs]  # noqa: E731
    else:
        floor = lambda x: [layer.made(x) for layer in flow.layers]  # noqa: E731
    return Contender("pyroflows", flow.log_prob, lambda n: flow.sample((n,)), floor, [flow])


def _pyro(family: str, dim: int, hidden: int, layers: int) -> Contender:
    import pyro.distributions as dist
    import pyro.distributions.transforms as T
    from pyro.nn import AutoRegressiveNN, DenseNN

    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    if family in ("nsf", "nsf_ar"):
        spline = dict(hidden_dims=[hidden, hidden], count_bins=BINS, bound=BOUND)
        if family == "nsf":
            modules = [T.spline_coupling(dim, **spline) for _ in range(layers)]
            nets = [(m.upper_spline.nn, m.split_dim) for m in modules]
            floor = lambda x: [net(x[..., :k]) for net, k in nets]  # noqa: E731
        else:
            # Pyro's spline_autoregressive helper sizes its network for the linear order only
            arns = [
                AutoRegressiveNN(dim, [hidden, hidden], param_dims=[BINS, BINS, BINS - 1])
                for _ in range(layers)
            ]
            modules = [
                T.SplineAutoregressive(dim, arn, count_bins=BINS, bound=BOUND, order="quadratic")
                for arn in arns
            ]
            floor = lambda x: [m.arn(x) for m in modules]  # noqa: E731
        transforms = []
        for i, m in enumerate(modules):  # Pyro's layers sample in one pass: MAF is the inverse
            transforms.append(m.inv if family == "nsf_ar" else m)
            if i < layers - 1:
                transforms.append(T.Permute(torch.arange(dim - 1, -1, -1)))
        d = dist.TransformedDistribution(base, transforms)
        return Contender("pyro", d.log_prob, lambda n: d.sample((n,)), floor, modules)
    if family == "realnvp":
        split = (dim + 1) // 2
        nets = [DenseNN(split, [hidden, hidden], [dim - split, dim - split]) for _ in range(layers)]
        modules = [T.AffineCoupling(split, net) for net in nets]
        transforms = []
        for i, m in enumerate(modules):
            transforms.append(m)
            if i < layers - 1:
                transforms.append(T.Permute(torch.arange(dim - 1, -1, -1)))
        floor = lambda x: [net(x[..., :split]) for net in nets]  # noqa: E731
    else:
        nets = [AutoRegressiveNN(dim, [hidden, hidden]) for _ in range(layers)]  # random orders
        modules = [T.AffineAutoregressive(net) for net in nets]
        # Pyro's layer is IAF-shaped (sampling in one pass); MAF is its inverse.
        transforms = [m.inv for m in modules] if family == "maf" else modules
        floor = lambda x: [net(x) for net in nets]  # noqa: E731
    d = dist.TransformedDistribution(base, transforms)
    return Contender("pyro", d.log_prob, lambda n: d.sample((n,)), floor, modules)


def _zuko(family: str, dim: int, hidden: int, layers: int) -> Contender:
    import zuko

    if family == "realnvp":
        raise ImportError("zuko has no affine-coupling flow of this shape")
    if family in ("nsf", "nsf_ar"):  # zuko's NSF is a MAF; two passes make it a coupling
        passes = {"passes": 2} if family == "nsf" else {}
        maf = zuko.flows.NSF(
            dim, transforms=layers, bins=BINS, hidden_features=(hidden, hidden), **passes
        )
    else:
        maf = zuko.flows.MAF(dim, transforms=layers, hidden_features=(hidden, hidden))
    parts = list(maf.transform.transforms)
    flow = maf if family != "iaf" else zuko.lazy.Flow([t.inv for t in parts], maf.base)
    floor = lambda x: [t.hyper(x) for t in parts]  # noqa: E731
    return Contender(
        "zuko", lambda x: flow().log_prob(x), lambda n: flow().sample((n,)), floor, [flow]
    )


class _MLP(torch.nn.Sequential):
    """Two ReLU hidden layers; ignores the context argument nflows' couplings pass."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        lin = torch.nn.Linear
        super().__init__(
            lin(n_in, hidden),
            torch.nn.ReLU(),
            lin(hidden, hidden),
            torch.nn.ReLU(),
            lin(hidden, n_out),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def _nflows(family: str, dim: int, hidden: int, layers: int) -> Contender:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        AffineCouplingTransform,
        CompositeTransform,
        InverseTransform,
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        ReversePermutation,
    )

    spline = dict(num_bins=BINS, tails="linear", tail_bound=BOUND)
    if family in COUPLINGS:
        mask = (torch.arange(dim) >= (dim + 1) // 2).int()  # 1 = transformed, 0 = passed through
        nets = []

        def make_net(n_in: int, n_out: int) -> torch.nn.Module:
            nets.append(_MLP(n_in, hidden, n_out))
            return nets[-1]

        if family == "nsf":
            layers_ = [
                PiecewiseRationalQuadraticCouplingTransform(mask, make_net, **spline)
                for _ in range(layers)
            ]
        else:
            layers_ = [AffineCouplingTransform(mask, make_net) for _ in range(layers)]
        identity = (mask == 0).nonzero().flatten()
        floor = lambda x: [net(x[..., identity]) for net in nets]  # noqa: E731
    else:
        made_options = dict(num_blocks=1, use_residual_blocks=False)
        if family == "nsf_ar":
            made = [
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    dim, hidden, **made_options, **spline
                )
                for _ in range(layers)
            ]
        else:
            made = [
                MaskedAffineAutoregressiveTransform(dim, hidden, **made_options)
                for _ in range(layers)
            ]
        layers_ = made if family != "iaf" else [InverseTransform(m) for m in made]
        floor = lambda x: [m.autoregressive_net(x) for m in made]  # noqa: E731
    steps = []
    for i, layer in enumerate(layers_):
        steps.append(layer)
        if i < layers - 1:
            steps.append(ReversePermutation(dim))
    flow = Flow(CompositeTransform(steps), StandardNormal((dim,)))
    return Contender("nflows", flow.log_prob, flow.sample, floor, [flow])


def _normflows(family: str, dim: int, hidden: int, layers: int) -> Contender:
    import normflows as nf

    if family in ("realnvp", "nsf", "nsf_ar"):
        raise ImportError(
            "normflows' coupling and spline layers use a different conditioner layout"
        )
    made = [
        nf.flows.MaskedAffineAutoregressive(dim, hidden, num_blocks=1, use_residual_blocks=False)
        for _ in range(layers)
    ]
    # normflows' layer samples in one pass (IAF-shaped); Reverse makes it a MAF layer.
    flows = []
    for i, m in enumerate(made):
        flows.append(nf.flows.Reverse(m) if family == "maf" else m)
        if i < layers - 1:
            flows.append(nf.flows.Permute(dim, mode="swap"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)
    floor = lambda x: [m.autoregressive_net(x) for m in made]  # noqa: E731
    return Contender("normflows", model.log_prob, lambda n: model.sample(n)[0], floor, [model])


LIBRARIES: dict[str, Callable[[str, int, int, int], Contender]] = {
    "pyroflows": _pyroflows,
    "pyro": _pyro,
    "zuko": _zuko,
    "nflows": _nflows,
    "normflows": _normflows,
}


# -- timing -----------------------------------------------------------------------------------
def _timed(contender: Contender, op: str, batch: int, dim: int) -> float:
    """Seconds of one call of ``op`` on a fresh input (drawn before the clock starts)."""
    x = torch.randn(batch, dim)
    if op == "train_step":
        start = time.perf_counter()
        contender.train_step(x)
        return time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        contender.sample(batch) if op == "sample" else getattr(contender, op)(x)
        return time.perf_counter() - start


def run_benchmark(
    *,
    families: Sequence[str] = ("maf",),
    dims: Sequence[int] = (8,),
    hidden: int = 256,
    layers: int = 5,
    batch: int = 1024,
    rounds: int = 7,
    warmup: int = 1,
    libraries: Sequence[str] = tuple(LIBRARIES),
    ops: Sequence[str] = OPS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every (library, op) for each family and dimension; returns a JSON-able dict.

    Args:
        families: any of ``"maf"``, ``"iaf"``, ``"realnvp"``, ``"nsf"``, ``"nsf_ar"``.
        dims: event dimensions ``D``.
        hidden: width of both hidden layers of every conditioner.
        layers: number of flow layers.
        batch: batch size of every operation.
        rounds: timed rounds (the median is reported); each runs every call once, shuffled.
        warmup: untimed rounds first.
        libraries: which of `LIBRARIES` to try (missing ones are skipped and listed).
        ops: which of `OPS` to time.
        seed: seed of the models and of the shuffling.
        progress: called with a short status line after each round.

    Returns:
        ``{"config", "environment", "skipped", "results": [{family, dim, library, op,
        median_ms, min_ms, rounds}], "ratios": [{family, dim, op, pyroflows_ms, fastest_peer,
        fastest_peer_ms, vs_fastest_peer, vs_floor}]}``.
    """
    for name, values, allowed in (
        ("families", families, FAMILIES),
        ("libraries", libraries, LIBRARIES),
        ("ops", ops, OPS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(
                f"{name} must be a non-empty selection of {', '.join(allowed)}; got {list(values)}"
            )
    for name, value in (
        ("hidden", hidden),
        ("layers", layers),
        ("batch", batch),
        ("rounds", rounds),
    ):
        check_int(value, name)
    if not dims:
        raise ValueError("dims must be a non-empty list of ints >= 2, got []")
    for d in dims:
        check_int(d, "dims", minimum=2)
    if "pyroflows" not in libraries:
        raise ValueError("libraries must include pyroflows (the ratios are relative to it)")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    contenders, skipped = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in families:
            for dim in dims:
                for lib in libraries:
                    try:
                        contenders[family, dim, lib] = LIBRARIES[lib](family, dim, hidden, layers)
                    except ImportError as err:
                        skipped[f"{lib}/{family}"] = str(err)
        calls = [(key, op) for key in contenders for op in ops]
        times: dict = {call: [] for call in calls}
        for r in range(warmup + rounds):
            rng.shuffle(calls)
            for key, op in calls:
                seconds = _timed(contenders[key], op, batch, key[1])
                if r >= warmup:
                    times[key, op].append(seconds)
            if progress:
                progress(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
    results = [
        dict(
            family=f,
            dim=d,
            library=lib,
            op=op,
            median_ms=1e3 * statistics.median(ts),
            min_ms=1e3 * min(ts),
            rounds=len(ts),
        )
        for ((f, d, lib), op), ts in sorted(times.items())
    ]
    return dict(
        config=dict(
            families=list(families),
            dims=list(dims),
            hidden=hidden,
            layers=layers,
            batch=batch,
            rounds=rounds,
            warmup=warmup,
        ),
        environment=dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            machine=platform.machine(),
            processor=platform.processor(),
            malloc_env={k: os.environ.get(k) for k in MALLOC_ENV},
        ),
        skipped=skipped,
        results=results,
        ratios=_ratios(results),
    )


def _ratios(results: list[dict]) -> list[dict]:
    by_key = {(r["family"], r["dim"], r["op"], r["library"]): r["median_ms"] for r in results}
    rows = []
    for family, dim, op, lib in sorted(by_key):
        if lib != "pyroflows":
            continue
        ours = by_key[family, dim, op, lib]
        peers = {
            k[3]: v for k, v in by_key.items() if k[:3] == (family, dim, op) and k[3] != "pyroflows"
        }
        best = min(peers, key=peers.get) if peers else None
        floor = by_key.get((family, dim, "floor", "pyroflows"))
        rows.append(
            dict(
                family=family,
                dim=dim,
                op=op,
                pyroflows_ms=ours,
                fastest_peer=best,
                fastest_peer_ms=peers.get(best),
                vs_fastest_peer=ours / peers[best] if best else None,
                vs_floor=ours / floor if floor and op != "floor" else None,
            )
        )
    return rows


def markdown_table(report: dict) -> str:
    """The report as a markdown table: medians (ms) per library and the two ratios."""
    libs = [lib for lib in LIBRARIES if any(r["library"] == lib for r in report["results"])]
    ms = {(r["family"], r["dim"], r["op"], r["library"]): r["median_ms"] for r in report["results"]}
    head = [
        "family",
        "D",
        "op",
        *[f"{lib} (ms)" for lib in libs],
        "pyroflows / fastest peer",
        "pyroflows / floor",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for row in report["ratios"]:
        key = (row["family"], row["dim"], row["op"])
        cells = [
            row["family"],
            str(row["dim"]),
            row["op"],
            *[fmt(ms.get((*key, lib)), ".2f") for lib in libs],
        ]
        peer = (
            f"{fmt(row['vs_fastest_peer'], '.2f')} ({row['fastest_peer']})"
            if row["fastest_peer"]
            else "-"
        )
        cells += [peer, fmt(row["vs_floor"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
