"""Checkpoints: Flow.save/Flow.load restore exactly; fit resumes exactly; bad files fail cleanly."""

import pytest
import torch

import pyroflows
from pyroflows import Flow, build_flow
from pyroflows.datasets import toy
from pyroflows.infer import fit


@pytest.mark.parametrize(
    "name,shape", [("realnvp", 2), ("nice", 3), ("planar", 2), ("realnvp", (1, 4, 4))]
)
def test_save_load_exact(name, shape, tmp_path):
    flow = build_flow(name, shape, num_layers=2, hidden_dims=(8,))
    event = (shape,) if isinstance(shape, int) else shape
    with torch.no_grad():
        flow.log_prob(torch.randn(32, *event) * 2 + 1)  # data-dependent init where there is one
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow.save(tmp_path / "flow.pt")
    loaded = Flow.load(tmp_path / "flow.pt")
    x = torch.randn(5, *event)
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    assert loaded.config == flow.config


def test_data_dependent_init_state_survives(tmp_path):
    if "glow" not in pyroflows.available_flows():
        pytest.skip("glow not registered")
    flow = build_flow("glow", (1, 4, 4), hidden_dims=(8,))
    data = torch.randn(64, 1, 4, 4) * 3 + 5
    flow.log_prob(data)
    flow.save(tmp_path / "glow.pt")
    loaded = Flow.load(tmp_path / "glow.pt")
    # the restored flow must not re-initialise on new data
    other = torch.randn(64, 1, 4, 4)
    assert torch.equal(loaded.log_prob(other), flow.log_prob(other))


def test_corrupted_and_mismatched_checkpoints(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        Flow.load(tmp_path / "garbage.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyroflows"):
        Flow.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        Flow.load(tmp_path / "missing.pt")
    # a state dict from a different architecture: error, and the flow is untouched
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,))
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    wrong = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        flow.load_state_dict(wrong)
    fewer = build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,)).state_dict()
    with pytest.raises(ValueError, match="missing"):
        flow.load_state_dict(fewer)
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in before.items())


def test_fit_resumes_exactly(tmp_path):
    data = toy("moons", 1000)
    kwargs = dict(num_steps=40, batch_size=64, eval_every=10, progress=False, seed=3)

    torch.manual_seed(0)
    straight = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,))
    full = fit(straight, data, **kwargs)

    torch.manual_seed(0)
    interrupted = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,))
    ckpt = tmp_path / "run.pt"
    # the same 40-step run, interrupted during step 21 (last checkpoint: step 20)
    history = _fit_until(interrupted, data, ckpt, stop_after=20, **kwargs)
    assert len(history["train_loss"]) == 20
    torch.manual_seed(123)  # a different global state must not matter after resuming
    resumed_flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(16,))
    resumed = fit(resumed_flow, data, checkpoint=ckpt, resume=True, **kwargs)
    assert resumed["train_loss"] == full["train_loss"]
    x = torch.randn(7, 2)
    assert torch.equal(resumed_flow.log_prob(x), straight.log_prob(x))


def _fit_until(flow, data, ckpt, stop_after, **kwargs):
    """Run fit with a checkpoint and interrupt it (KeyboardInterrupt) after `stop_after` steps."""
    calls = {"n": 0}
    original = flow.forward

    def counting_forward(*args, **kw):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return original(*args, **kw)

    flow.forward = counting_forward
    try:
        fit(flow, data, checkpoint=ckpt, **kwargs)
    except KeyboardInterrupt:
        pass
    finally:
        del flow.forward
    return torch.load(ckpt, weights_only=False)["history"]


def test_resume_needs_a_path():
    flow = build_flow("nice", 2, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="checkpoint"):
        fit(flow, torch.randn(20, 2), resume=True, progress=False)
