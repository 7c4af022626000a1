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
    >>> len(history["loss"])
    50
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from pyroflows.flow import Flow
from pyroflows.infer.fit import _positive


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
        raise ValueError(f"teacher and student must have the same context_dim, got {teacher.context_dim} and {student.context_dim}")
    t, s = teacher.base_loc, student.base_loc
    if (t.device, t.dtype) != (s.device, s.dtype):
        raise TypeError(f"teacher is {t.dtype} on {t.device} but student is {s.dtype} on {s.device}; move one of them")


def _check_context(context: Any, flow: Flow) -> torch.Tensor | None:
    if flow.context_dim is None:
        if context is not None:
            raise ValueError("context given for unconditional flows (build them with context_dim)")
        return None
    ref = flow.base_loc
    if not isinstance(context, torch.Tensor) or context.dim() != 2 or context.shape[1] != flow.context_dim or not len(context):
        raise ValueError(f"context must be a tensor of shape (n, {flow.context_dim}) for conditional flows, got {getattr(context, 'shape', context)!r}")
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
        _positive(num_samples, "num_samples")
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
    cosine_schedule: bool = True,
    progress: bool = True,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train ``student`` (in place) to minimise ``KL(student || teacher)``; the teacher is frozen.

    Args:
        teacher: the trained flow; only its ``log_prob`` is used (its parameters are not
            updated; their ``requires_grad`` flags and its train/eval mode are restored).
        student: the flow to train; only its sampling pass (``z -> x`` with log-det) is used, so
            an IAF student never inverts anything.
        num_steps: number of Adam steps.
        batch_size: student samples per step.
        lr: Adam learning rate (cosine-annealed unless ``cosine_schedule`` is false).
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
        eval_every: steps between evaluations of the KL on a fixed noise set (default
            ``num_steps // 20``).
        eval_size: size of that fixed evaluation set.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        cosine_schedule: anneal the learning rate with a cosine schedule.
        progress: show a tqdm progress bar.
        seed: seed of the noise and of torch's global RNG.

    Returns:
        The history: ``loss`` (the mini-batch KL estimate at each step, at ``beta = 1``;
        ``beta`` holds the weight used in the objective), ``kl`` and
        ``kl_stderr`` (on the fixed evaluation noise, at the steps in ``kl_step``; the first
        entry is before training), ``skipped_steps`` (non-finite losses, not taken).
    """
    _check_pair(teacher, student)
    _positive(num_steps, "num_steps")
    _positive(batch_size, "batch_size")
    _positive(lr, "lr", float)
    _positive(eval_size, "eval_size")
    if eval_every is not None:
        _positive(eval_every, "eval_every")
    if noise_pool is not None:
        _positive(noise_pool, "noise_pool")
    if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal must be a fraction in [0, 1], got {anneal!r}")
    context = _check_context(context, student)
    if seed is not None:
        torch.manual_seed(seed)
    base = student.base_dist()
    eval_noise = base.sample((eval_size,) if context is None else (len(context),))
    pool = base.sample((noise_pool,)) if noise_pool is not None else None
    device = student.base_loc.device

    history: dict[str, Any] = dict(loss=[], beta=[], kl=[], kl_stderr=[], kl_step=[], skipped_steps=0)
    anneal_steps = anneal * num_steps

    def evaluate(step: int) -> None:
        student.eval()
        kl, stderr = kl_estimate(student, teacher, context=context, noise=eval_noise)
        student.train()
        history["kl"].append(kl)
        history["kl_stderr"].append(stderr)
        history["kl_step"].append(step)

    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps) if cosine_schedule else None
    eval_every = eval_every or max(1, num_steps // 20)
    flags, was_training = [p.requires_grad for p in teacher.parameters()], teacher.training
    teacher.eval()
    try:
        teacher.requires_grad_(False)  # gradients flow through the teacher to x, not into it
        evaluate(0)
        bar = tqdm(range(1, num_steps + 1), disable=not progress, desc="distill", dynamic_ncols=True)
        for step in bar:
            rows = None
            if context is not None:
                rows = torch.randint(len(context), (batch_size,), device=device)
            if pool is not None:
                z = pool[torch.randint(len(pool), (batch_size,), device=device)]
            else:
                z = base.rsample((batch_size,))
            log_s, log_t = _student_and_teacher_log_prob(student, teacher, z, None if rows is None else context[rows])
            beta = min(1.0, step / anneal_steps) if anneal_steps else 1.0
            loss = (log_s - beta * log_t).mean()
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                history["skipped_steps"] += 1
                continue
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history["loss"].append((log_s - log_t).mean().item())
            history["beta"].append(beta)
            if step % eval_every == 0 or step == num_steps:
                evaluate(step)
                bar.set_postfix(kl=f"{history['kl'][-1]:.4f}")
        bar.close()
    finally:
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
        teacher.train(was_training)
    student.eval()
    return history
