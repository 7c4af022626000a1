"""Data-parallel training: 2 gloo processes agree with each other and with one process training
on the same global batches."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyroflows import build_flow
from pyroflows.infer import fit

STEPS, BATCH = 6, 32


def _data():
    return torch.randn(256, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1


def _train(distributed: bool, name: str = "realnvp"):
    torch.manual_seed(0)
    flow = build_flow(name, 3, num_layers=2, hidden_dims=(16,))
    fit(
        flow,
        _data(),
        num_steps=STEPS,
        batch_size=BATCH,
        validation=0,
        progress=False,
        seed=7,
        distributed=distributed,
    )
    return flow.state_dict()


def _worker(rank: int, port: int, out: str) -> None:
    """Every data-parallel scenario in one pair of processes (each spawn re-imports torch and
    Pyro, which costs far more than the tiny trainings themselves)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        states = {
            "fit": _train(distributed=True),
            "sync": _vae_and_autoflow(rank, sync=True),
            "nosync": _vae_and_autoflow(rank, sync=False),
            "trainers": _trainers(rank),
        }
        torch.save(states, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_states(tmp_path_factory):
    """Rank 0's and rank 1's trained states from one 2-process gloo run of `_worker`."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


def test_two_gloo_processes_match_single_process(gloo_states):
    rank0, rank1 = (states["fit"] for states in gloo_states)
    single = _train(distributed=False)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], single[key], atol=1e-5), key
    # and training really moved the parameters
    torch.manual_seed(0)
    fresh = build_flow("realnvp", 3, num_layers=2, hidden_dims=(16,)).state_dict()
    assert any(not torch.allclose(fresh[k], single[k]) for k in fresh)


def test_distributed_without_a_process_group_is_a_clear_error():
    flow = build_flow("nice", 2, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="init_process_group"):
        fit(flow, torch.randn(20, 2), distributed=True, seed=0, progress=False)


@pytest.mark.slow  # three fresh interpreters; the data-parallel training itself is tested above
def test_cli_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "-m",
            "pyroflows.cli",
            "fit",
            "--distributed",
            "--steps",
            "10",
            "--num-samples",
            "256",
            "--json",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    assert "test_nll" in json.loads(lines[0])


def test_cli_distributed_without_torchrun(tmp_path, capsys):
    from pyroflows.cli import main

    assert main(["fit", "--distributed", "--steps", "2", "--quiet", "--out", str(tmp_path)]) == 2
    assert "torchrun" in capsys.readouterr().err


def _vae_and_autoflow(rank: int, sync: bool) -> dict:
    """A VAE by fit_vae and an AutoFlow guide by Pyro's SVI, each rank on its own data, with or
    without sync_gradients."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from pyroflows.guides import AutoFlow
    from pyroflows.infer import sync_gradients
    from pyroflows.models import VAE, fit_vae

    torch.manual_seed(rank)  # different initialisations: sync_gradients must broadcast rank 0's
    data = torch.bernoulli(
        torch.full((64, 6), 0.3, dtype=torch.float32),
        generator=torch.Generator().manual_seed(rank),
    )
    vae = VAE(6, 2, hidden_dims=(8,), posterior="iaf", num_flows=1)
    if sync:
        sync_gradients(vae)
    fit_vae(vae, data, num_epochs=2, batch_size=32, progress=False, seed=rank)

    def model(y):
        loc = pyro.sample("loc", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("n", len(y)):
            pyro.sample("y", pyro.distributions.Normal(loc, 1.0).to_event(1), obs=y)

    pyro.clear_param_store()
    y = torch.randn(20, 2, generator=torch.Generator().manual_seed(10 + rank))
    guide = AutoFlow(model, flow="realnvp", num_layers=2, hidden_dims=(8,))
    guide(y)  # create the parameters
    if sync:
        sync_gradients(guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    return {"vae": vae.state_dict(), "guide": guide.state_dict()}


@pytest.mark.parametrize("sync", [True, False])
def test_sync_gradients_keeps_vae_and_autoflow_ranks_identical(gloo_states, sync):
    a, b = (states["sync" if sync else "nosync"] for states in gloo_states)
    same = all(torch.allclose(a[m][k], b[m][k], atol=1e-6) for m in a for k in a[m])
    assert same == sync  # identical with sync_gradients, different without it


def _trainers(rank: int) -> dict:
    """fit_guide, fit_vae and distill with distributed=True: each rank its own data shard."""
    import pyro

    from pyroflows.guides import AutoFlow, fit_guide
    from pyroflows.infer import distill
    from pyroflows.models import VAE, fit_vae

    torch.manual_seed(rank)  # different initialisations: rank 0's are broadcast
    shard = torch.Generator().manual_seed(rank)
    x = torch.bernoulli(torch.full((32, 6), 0.3), generator=shard)
    vae = VAE(6, 2, hidden_dims=(8,), posterior="iaf", num_flows=1)
    fit_vae(vae, x, num_epochs=2, batch_size=16, progress=False, seed=rank, distributed=True)

    def model(y):
        loc = pyro.sample("loc", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("n", len(y)):
            pyro.sample("y", pyro.distributions.Normal(loc, 1.0).to_event(1), obs=y)

    pyro.clear_param_store()
    y = torch.randn(20, 2, generator=shard)
    guide = AutoFlow(model, flow="realnvp", num_layers=2, hidden_dims=(8,))
    fit_guide(
        model,
        guide,
        y,
        num_steps=5,
        num_elbo_samples=0,
        progress=False,
        seed=rank,
        distributed=True,
    )

    teacher = build_flow("maf", 2, num_layers=1, hidden_dims=(8,))
    student = build_flow("iaf", 2, num_layers=1, hidden_dims=(8,))
    distill(
        teacher, student, num_steps=5, eval_size=16, progress=False, seed=rank, distributed=True
    )
    return {"vae": vae.state_dict(), "guide": guide.state_dict(), "student": student.state_dict()}


def test_guides_vaes_and_distillation_train_data_parallel(gloo_states):
    a, b = (states["trainers"] for states in gloo_states)
    for part in a:
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6), (part, key)
