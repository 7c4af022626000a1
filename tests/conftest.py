import contextlib

import pytest
import torch

import pyroflows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


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
