r"""Probability density distillation (Parallel WaveNet): train a student flow to match a teacher.

The student $s$ is fitted to the teacher $t$ by minimising the reverse KL divergence with the
student's own reparameterised samples $x = T_s(z)$, $z \sim \mathcal N(0, I)$:

$$
\mathrm{KL}(s \,\|\, t) = \mathbb E_{z}\big[\log s(T_s(z)) - \log t(T_s(z))\big]
\ \ge 0 .
$$

The noise $z$ is kept ("cached") alongside the sample, so $\log s$ comes from the same forward
pass as $x$, without inverting the student, and $\log t$ is one density pass of the teacher.
A MAF teacher (fast density) and an IAF student (fast sampling) therefore make every step
parallel in both models, which is the point of the method: the student then samples in one pass
what the teacher can only sample in $D$ sequential steps.

The reverse KL is mode-seeking. By default the first half of training minimises
$\mathbb E_s[\log s - \beta \log t]$ with $\beta$ rising linearly to 1 (a tempered, flatter
target first), which keeps the student from settling on a subset of a multi-modal teacher's
modes; on the two-moons toy this took the student from dropping a moon in some seeds to
matching the teacher (see ``tutorials/maf_iaf.ipynb``).

Reference: van den Oord et al. (2018), *Parallel WaveNet: Fast High-Fidelity Speech Synthesis*.

Example:
    >>> from pyroflows import build_flow
    >>> teacher, student = build_flow("maf", 2), build_flow("iaf", 2)
    >>> history = distill(teacher, student, num_steps=50, progress=False)
    >>> len(history["train_loss"])
    50
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pyroflows.flow import Flow
from pyroflows.infer.loop import run_generator, train_loop
from pyroflows.validation import check_int, check_number


def _check_pair(teacher: Any, student: Any) -> None:
    for name, flow in (("teacher", teacher), ("student", student)):
        if not isinstance(flow, Flow):
            raise TypeError(f"{name} must be a pyroflows.Flow, got {type(flow).__name__}")
    if teacher.event_shape != student.event_shape:
        raise ValueError(
            f"teacher and student must have the same event shape, got {tuple(teacher.event_shape)} "
            f"and {tuple(student.event_shape)}"
        )
    if teacher.context_dim != student.context_dim:
        raise ValueError(
            "teacher and student must have the same context_dim, got "
            f"{teacher.context_dim} and {student.context_dim}"
        )
    t, s = teacher.base_loc, student.base_loc
    if (t.device, t.dtype) != (s.device, s.dtype):
        raise TypeError(
            f"teacher is {t.dtype} on {t.device} but student is {s.dtype} on {s.device}; "
            "move one of them"
        )


def _check_context(context: Any, flow: Flow) -> torch.Tensor | None:
    if flow.context_dim is None:
        if context is not None:
            raise ValueError("context given for unconditional flows (build them with context_dim)")
        return None
    ref = flow.base_loc
    if (
        not isinstance(context, torch.Tensor)
        or context.dim() != 2
        or context.shape[1] != flow.context_dim
        or not len(context)
    ):
        raise ValueError(
            f"context must be a tensor of shape (n, {flow.context_dim}) for conditional flows, "
            f"got {getattr(context, 'shape', context)!r}"
        )
    return context.to(device=ref.device, dtype=ref.dtype)


def _student_and_teacher_log_prob(
    student: Flow, teacher: Flow, z: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log s(x)`` and ``log t(x)`` at the student's samples ``x = T_s(z)`` of the noise ``z``."""
    x, ladj = student.forward_and_log_det(z, context)
    return student.base_dist().log_prob(z) - ladj, teacher.log_prob(x, context)


def kl_estimate(
    student: Flow,
    teacher: Flow,
    num_samples: int = 10_000,
    *,
    context: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Monte-Carlo estimate of ``KL(student || teacher)`` in nats, and its standard error.

    Args:
        student: the flow whose samples are scored.
        teacher: the flow scoring them.
        num_samples: number of student samples (ignored when ``noise`` is given).
        context: ``(n, context_dim)`` contexts of conditional flows; one sample per row.
        noise: base noise ``(n, *event_shape)`` to push through the student (e.g. a fixed
            evaluation set), instead of fresh draws.

    Returns:
        ``(mean, standard error)`` of ``log s(x) - log t(x)`` over the samples.
    """
    _check_pair(teacher, student)
    context = _check_context(context, student)
    if noise is None:
        check_int(num_samples, "num_samples")
        n = len(context) if context is not None else num_samples
        noise = student.base_dist().sample((n,))
    with torch.no_grad():
        log_s, log_t = _student_and_teacher_log_prob(student, teacher, noise, context)
        terms = log_s - log_t
    return terms.mean().item(), terms.std().item() / math.sqrt(max(len(terms) - 1, 1))


def distill(
    teacher: Flow,
    student: Flow,
    *,
    num_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    context: torch.Tensor | None = None,
    noise_pool: int | None = None,
    anneal: float = 0.5,
    eval_every: int | None = None,
    eval_size: int = 4096,
    max_grad_norm: float | None = 10.0,
    schedule: str = "cosine",
    progress: bool = True,
    seed: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Train ``student`` (in place) to minimise ``KL(student || teacher)``; the teacher is frozen.

    Runs [`train_loop`][pyroflows.infer.loop.train_loop] (non-finite steps, checkpoints,
    distributed training and the history are described there); the validation loss is the KL
    estimate on a fixed noise set, and the student with the lowest one is kept.

    Args:
        teacher: the trained flow; only its ``log_prob`` is used (its parameters are not
            updated; their ``requires_grad`` flags and its train/eval mode are restored).
        student: the flow to train; only its sampling pass (``z -> x`` with log-det) is used, so
            an IAF student never inverts anything.
        num_steps: number of Adam steps.
        batch_size: student samples per step (per rank when ``distributed``).
        lr: peak Adam learning rate.
        context: ``(n, context_dim)`` contexts for conditional flows; each step draws
            ``batch_size`` rows.
        noise_pool: if given, draw this many base-noise vectors once and take every batch
            from them (cached noise: a fixed objective, common random numbers across steps);
            ``None`` draws fresh noise each step.
        anneal: fraction of ``num_steps`` over which the teacher's weight ``beta`` in the
            objective ``E[log s(x) - beta log t(x)]`` rises linearly to 1 (0: the plain KL from
            the start). The reverse KL is mode-seeking: an identity-initialised student facing
            the sharp teacher at once tends to settle on some of its modes; the flatter
            tempered targets ``t^beta`` keep it spread over all of them while it takes shape.
        eval_every: steps between evaluations of the KL on the fixed noise set (default
            ``num_steps // 20``).
        eval_size: size of that fixed evaluation set.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        schedule: learning-rate schedule (``"cosine"``, ``"exponential"``, ``"constant"``).
        progress: show a tqdm progress bar.
        seed: seed of the run's generator (noise, context rows).
        checkpoint: training checkpoint file (see ``train_loop``).
        resume: continue from ``checkpoint`` when it exists.
        distributed: average gradients over an initialised ``torch.distributed`` group.

    Returns:
        The history: ``train_loss`` (the mini-batch KL estimate at each step, at ``beta = 1``
        whatever the weight in the objective), ``beta`` (that weight at each step),
        ``val_loss`` and ``val_stderr`` (KL on the
        fixed evaluation noise, at ``eval_step``; the first entry, at step 0, is before
        training) and the rest of ``train_loop``'s keys.
    """
    _check_pair(teacher, student)
    check_int(batch_size, "batch_size")
    check_int(eval_size, "eval_size")
    if noise_pool is not None:
        check_int(noise_pool, "noise_pool")
    check_number(anneal, "anneal", low=0.0, high=1.0)
    context = _check_context(context, student)
    ref = student.base_loc
    anneal_steps = anneal * num_steps

    with run_generator(seed, student) as g:

        def noise(n: int) -> torch.Tensor:
            z = torch.randn((n, *student.event_shape), generator=g, device="cpu", dtype=ref.dtype)
            return student.base_loc + student.base_scale * z.to(ref.device)

        def rows(n: int, size: int) -> torch.Tensor:
            return torch.randint(n, (size,), generator=g, device="cpu").to(ref.device)

        eval_noise = noise(eval_size if context is None else len(context))
        pool = noise(noise_pool) if noise_pool is not None else None
        stderr: list[float] = []

        def loss_fn(step: int) -> torch.Tensor:
            ctx = None if context is None else context[rows(len(context), batch_size)]
            z = pool[rows(len(pool), batch_size)] if pool is not None else noise(batch_size)
            log_s, log_t = _student_and_teacher_log_prob(student, teacher, z, ctx)
            beta = min(1.0, step / anneal_steps) if anneal_steps else 1.0
            return (log_s - beta * log_t).mean() + (beta - 1) * log_t.detach().mean()

        def validate() -> float:
            kl, se = kl_estimate(student, teacher, context=context, noise=eval_noise)
            stderr.append(se)
            return kl

        flags, was_training = [p.requires_grad for p in teacher.parameters()], teacher.training
        teacher.eval()
        try:
            teacher.requires_grad_(False)  # gradients flow through the teacher to x, not into it
            start = kl_estimate(student, teacher, context=context, noise=eval_noise)
            history = train_loop(
                student,
                loss_fn,
                num_steps=num_steps,
                lr=lr,
                generator=g,
                schedule=schedule,
                final_lr=lr / 100 if schedule == "exponential" else 0.0,
                max_grad_norm=max_grad_norm,
                validate=validate,
                eval_every=eval_every,
                progress=progress,
                kind="distill",
                checkpoint=checkpoint,
                resume=resume,
                distributed=distributed,
            )
        finally:
            for p, flag in zip(teacher.parameters(), flags, strict=True):
                p.requires_grad_(flag)
            teacher.train(was_training)
    history["val_loss"].insert(0, start[0])
    history["eval_step"].insert(0, 0)
    history["val_stderr"] = [start[1], *stderr]
    history["beta"] = [
        min(1.0, s / anneal_steps) if anneal_steps else 1.0 for s in range(1, history["steps"] + 1)
    ]
    return history
