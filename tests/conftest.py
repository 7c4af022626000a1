"""Shared fixtures: seeding, one thread, the default-device trap, the device/dtype options, and
small flows of every registered family.

``pytest --device cuda`` runs every test that takes the ``device`` fixture on that device (skipped
when CUDA is unavailable); ``--dtype float64`` sets the ``dtype`` fixture. Defaults: CPU,
float32.
"""

import contextlib
import math

import pytest
import torch

import pyroflows


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the tests that take the `device` fixture: cpu (default), cuda, cuda:N",
    )
    parser.addoption(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="floating-point dtype of the tests that take the `dtype` fixture",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device chosen by ``--device``; tests are skipped if it is a CUDA device and there
    is none."""
    try:
        chosen = torch.device(request.config.getoption("--device"))
    except RuntimeError as err:
        raise pytest.UsageError(f"--device: {err}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device on this machine")
    return chosen


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    """The floating-point dtype chosen by ``--dtype``."""
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_unrequested_compiles(monkeypatch):
    """``HMC(compile="auto")`` would compile once a run's eager steps took 10 s, which a slow
    CI machine can reach mid-test: seconds of compiling and draws that change with timing.
    Tests that compile ask for it (``compile=True`` or ``compile_after``)."""
    from pyroflows.mcmc import compiled

    cost = compiled._compile_cost
    monkeypatch.setitem(cost, "first", math.inf)
    monkeypatch.setitem(cost, "compiled_before", False)
    monkeypatch.setitem(cost, "per_op", cost["per_op"])  # restored after a compiling test


@pytest.fixture
def one_thread():
    """One torch thread: tiny tensors on a shared CPU otherwise pay for OpenMP oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def default_device_trap():
    """Any tensor created without an explicit device lands on `meta` and the next op fails."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def family_cases(conditional: bool = False):
    """(name, shape) pairs covering every registered family: vectors of dim 1 and 3, and small
    images for image families."""
    cases = []
    for name in pyroflows.available_flows():
        spec = pyroflows.registry.family_spec(name)
        if conditional and not spec.conditional:
            continue
        if spec.vector:
            cases += [(name, d) for d in sorted({max(1, spec.min_dim), max(3, spec.min_dim)})]
        if spec.image:
            cases += [(name, (1, 4, 4)), (name, (2, 4, 4))]
    return cases


def small_flow(name, shape, context_dim=None, perturb=0.1, **options):
    """A small flow of family `name`, its parameters moved off the identity initialisation (and
    any data-dependent initialisation done) so that the checks below test a non-trivial map."""
    spec = pyroflows.registry.family_spec(name)
    hidden = (8,) if isinstance(shape, int) else (4,)
    flow = pyroflows.build_flow(
        name,
        shape,
        num_layers=2,
        hidden_dims=hidden,
        context_dim=context_dim,
        **{**spec.test_options, **options},
    )
    event = (shape,) if isinstance(shape, int) else tuple(shape)
    ctx = torch.randn(16, context_dim) if context_dim else None
    with torch.no_grad():
        flow.log_prob(torch.randn(16, *event), ctx)  # data-dependent initialisation, if any
        for p in flow.parameters():
            p.add_(perturb * torch.randn_like(p))
    return flow
