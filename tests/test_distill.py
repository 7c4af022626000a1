"""Probability density distillation: the KL falls, the teacher is untouched, bad input is
refused."""

import pytest
import torch
from conftest import default_device_trap

import pyroflows
from pyroflows.datasets import toy
from pyroflows.infer import fit
from pyroflows.infer.distill import distill, kl_estimate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def _teacher(dim=2, context_dim=None, perturb=0.4):
    """A MAF pushed well off the identity: a skewed, correlated density."""
    flow = pyroflows.build_flow(
        "maf", dim, num_layers=2, hidden_dims=(16,), context_dim=context_dim
    )
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn_like(p))
    return flow


def test_identical_flows_have_zero_kl():
    teacher = _teacher()
    student = pyroflows.build_flow("maf", 2, num_layers=2, hidden_dims=(16,))
    student.load_state_dict(teacher.state_dict())
    kl, stderr = kl_estimate(student, teacher, 500)
    assert abs(kl) < 1e-5 and stderr < 1e-5


@pytest.mark.parametrize("noise_pool,anneal", [(None, 0.5), (512, 0.0)])
def test_distill_reduces_kl_and_leaves_teacher_alone(noise_pool, anneal):
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = pyroflows.build_flow("iaf", 2, num_layers=2, hidden_dims=(16,))
    history = distill(
        teacher,
        student,
        num_steps=150,
        batch_size=128,
        lr=5e-3,
        noise_pool=noise_pool,
        anneal=anneal,
        eval_size=2000,
        progress=False,
        seed=0,
    )
    assert history["val_loss"][0] > 0.2  # a real gap to close
    assert history["val_loss"][-1] < 0.3 * history["val_loss"][0]
    assert (
        history["eval_step"][0] == 0
        and history["eval_step"][-1] == 150
        and len(history["train_loss"]) == 150
    )
    assert history["beta"][-1] == 1.0 and (
        history["beta"][0] < 0.05 if anneal else history["beta"][0] == 1.0
    )
    fresh_kl, stderr = kl_estimate(student, teacher, 4000)  # not just the evaluation noise
    assert fresh_kl < 0.3 * history["val_loss"][0] + 3 * stderr
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


def test_conditional_distill_under_the_device_trap():
    teacher = _teacher(context_dim=2, perturb=0.2)
    student = pyroflows.build_flow("iaf", 2, num_layers=2, hidden_dims=(16,), context_dim=2)
    context = torch.randn(64, 2)
    with default_device_trap():
        history = distill(
            teacher, student, num_steps=20, batch_size=32, context=context, progress=False
        )
        kl, _ = kl_estimate(student, teacher, context=context)
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert 0 < kl < history["val_loss"][0]


def test_bad_input():
    teacher, student = _teacher(), pyroflows.build_flow("iaf", 2, hidden_dims=(8,))
    with pytest.raises(TypeError, match="student must be a pyroflows.Flow"):
        distill(teacher, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="same event shape"):
        distill(teacher, pyroflows.build_flow("iaf", 3, hidden_dims=(8,)))
    with pytest.raises(ValueError, match="same context_dim"):
        distill(teacher, pyroflows.build_flow("iaf", 2, hidden_dims=(8,), context_dim=1))
    with pytest.raises(TypeError, match="float64"):
        distill(teacher, pyroflows.build_flow("iaf", 2, hidden_dims=(8,)).double())
    with pytest.raises(ValueError, match="num_steps"):
        distill(teacher, student, num_steps=0)
    with pytest.raises(ValueError, match="noise_pool"):
        distill(teacher, student, noise_pool=-3)
    with pytest.raises(ValueError, match="anneal"):
        distill(teacher, student, anneal=1.5)
    with pytest.raises(ValueError, match="context given"):
        distill(teacher, student, context=torch.randn(4, 2))
    cond = pyroflows.build_flow("iaf", 2, hidden_dims=(8,), context_dim=2)
    with pytest.raises(ValueError, match=r"context must be a tensor of shape \(n, 2\)"):
        distill(_teacher(context_dim=2), cond, context=torch.randn(4, 3))


@pytest.mark.slow
def test_moons_teacher_distils_into_an_iaf_student():
    """The demo of the issue: a MAF fitted to two moons, distilled into an IAF."""
    train, test = toy("moons", 10_000, seed=0), toy("moons", 2_500, seed=1)
    teacher = pyroflows.build_flow("maf", 2, num_layers=5, hidden_dims=(64, 64))
    fit(teacher, train, num_steps=2000, batch_size=256, lr=2e-3, progress=False, seed=0)
    student = pyroflows.build_flow("iaf", 2, num_layers=5, hidden_dims=(64, 64))
    distill(teacher, student, num_steps=2000, batch_size=256, lr=2e-3, progress=False, seed=0)
    kl, stderr = kl_estimate(student, teacher, 20_000)
    with torch.no_grad():
        nll_teacher, nll_student = -teacher.log_prob(test).mean(), -student.log_prob(test).mean()
        own, students = (
            teacher.log_prob(teacher.sample((20_000,))).mean(),
            teacher.log_prob(student.sample((20_000,))).mean(),
        )
    assert kl < 0.1
    assert students > own - 0.1  # the teacher scores the student's samples as well as its own
    assert nll_student < nll_teacher + 0.5
