r"""The one training loop behind [`fit`][pyroflows.infer.fit.fit],
[`fit_guide`][pyroflows.guides.fit_guide], [`fit_vae`][pyroflows.models.fit_vae] and
[`distill`][pyroflows.infer.distill.distill].

Each of them builds a loss closure ``loss_fn(step) -> Tensor`` and hands it to
[`train_loop`][pyroflows.infer.loop.train_loop], which owns everything else: Adam, the
learning-rate schedule, gradient clipping, non-finite steps, validation and early stopping,
checkpoint/resume, the progress bar and data-parallel gradient averaging. So the four share
option names (``num_steps``, ``lr``, ``max_grad_norm``, ``progress``, ``seed``, ``checkpoint``,
``resume``, ``distributed``) and history keys (``train_loss``, ``lr``, ``val_loss``,
``eval_step``, ``best_val_loss``, ``best_step``, ``stopped_early``, ``skipped_steps``).

**Non-finite steps.** A step whose loss or gradient norm is not finite is not taken: the
gradient is dropped and the learning rate is multiplied by ``backoff`` (it grows back by the same
factor over the next 50 finite steps). After ``max_failures``
consecutive such steps (or as soon as the parameters themselves are non-finite) the parameters
of the last finite step are restored and [`TrainingDiverged`][pyroflows.infer.loop.TrainingDiverged]
is raised, naming the step, the loss and the learning rate.

**Gradient spikes.** Besides the fixed ``max_grad_norm``, ``clip_to_median`` clips each
step's gradient norm to that multiple of the median norm of the last 200 steps (from the 50th
step on; AutoClip, Seetharaman et al. 2020, which takes a percentile of the whole history): a
step whose gradient is an outlier, as when a few particles land where the model's
log-density is steep, moves the parameters no further than a typical step does.

**Randomness.** ``seed`` seeds a ``torch.Generator`` owned by the run (mini-batches, noise the
caller draws itself) *and*, because Pyro's sample statements and stochastic layers draw from
torch's global generator, the global generator inside ``torch.random.fork_rng``: the caller's
global state is restored when the run ends, so a seeded run neither depends on nor disturbs it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pyroflows.validation import check_choice, check_int, check_number, check_positive

__all__ = ["TrainingDiverged", "run_generator", "train_loop"]

CHECKPOINT_FORMAT = "pyroflows.train/1"
SCHEDULES = ("cosine", "exponential", "constant")


class TrainingDiverged(RuntimeError):
    """Training met only non-finite losses or gradients and could not recover; the parameters of
    the last finite step have been restored."""


def _world(distributed: bool) -> tuple[int, int]:
    """``(rank, world_size)``: of the initialised process group, or ``(0, 1)``."""
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs torch.distributed initialised first, e.g. "
            "dist.init_process_group('gloo') in each process started by torchrun"
        )
    return dist.get_rank(), dist.get_world_size()


def _cuda_devices(module: nn.Module) -> list[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def run_generator(seed: int | None, module: nn.Module) -> Iterator[torch.Generator]:
    """The run's CPU generator; with a ``seed``, also torch's global generators seeded inside a
    ``fork_rng`` that restores the caller's state on exit.

    Args:
        seed: the run's seed (``None``: drawn from torch's global generator, nothing forked).
        module: the trained module (its CUDA devices are forked too).

    Yields:
        A CPU ``torch.Generator`` for the caller's own draws (mini-batches, noise).
    """
    if seed is None:
        start = int(torch.randint(2**62, (), device="cpu"))
        yield torch.Generator(device="cpu").manual_seed(start)
        return
    seed = check_int(seed, "seed", minimum=0)
    with torch.random.fork_rng(devices=_cuda_devices(module)):
        torch.manual_seed(seed)
        yield torch.Generator(device="cpu").manual_seed(seed)


def _schedule(kind: str, step: int, num_steps: int, lr: float, final_lr: float) -> float:
    """The learning rate before step ``step`` (0-based) of ``num_steps``."""
    frac = step / num_steps
    if kind == "cosine":
        return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * frac))
    if kind == "exponential":
        return lr * (final_lr / lr) ** frac
    return lr


def _rng_state(module: nn.Module) -> dict[str, Any]:
    devices = _cuda_devices(module)
    return dict(cpu=torch.get_rng_state(), cuda=[torch.cuda.get_rng_state(d) for d in devices])


def _set_rng_state(module: nn.Module, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    for device, cuda_state in zip(_cuda_devices(module), state["cuda"], strict=True):
        torch.cuda.set_rng_state(cuda_state, device)


def _load_checkpoint(path: Path, module: nn.Module, kind: str) -> dict[str, Any]:
    """A checkpoint of this loop for a run of ``kind``, checked before anything is restored."""
    ref = next(iter([*module.parameters(), *module.buffers()]), None)
    where = ref.device if ref is not None else "cpu"
    try:
        saved = torch.load(path, map_location=where, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        msg = " ".join(str(err).split())
        raise ValueError(f"checkpoint {path} is not readable: {msg}") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a pyroflows training checkpoint")
    if saved.get("kind") != kind:
        raise ValueError(f"checkpoint {path} was written by {saved.get('kind')!r}, not {kind!r}")
    module.load_state_dict(saved["module"])
    return saved


def train_loop(
    module: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    *,
    num_steps: int,
    lr: float,
    generator: torch.Generator,
    parameters: Sequence[nn.Parameter] | None = None,
    schedule: str = "cosine",
    final_lr: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 10.0,
    clip_to_median: float | None = None,
    validate: Callable[[], float] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    plateau_after: int = 0,
    cooldown: int = 0,
    backoff: float = 0.5,
    max_failures: int = 10,
    progress: bool = True,
    kind: str = "train",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    distributed: bool = False,
    extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
) -> dict[str, Any]:
    """Minimise ``loss_fn`` over ``module``'s parameters with Adam.

    Args:
        module: what is trained; its ``state_dict`` is what checkpoints and the best-validation
            snapshot hold (put in train mode during the run, eval mode at the end).
        loss_fn: ``step -> scalar loss`` (``step`` counts from 1), differentiable in
            ``parameters``. With ``distributed``, each rank's loss on its share of the batch.
        num_steps: the step budget.
        lr: peak learning rate.
        generator: the run's generator (from [`run_generator`][pyroflows.infer.loop.run_generator]);
            saved in checkpoints so that a resumed run draws what the uninterrupted one would.
        parameters: the parameters to train (default: every ``module`` parameter with
            ``requires_grad``).
        schedule: ``"cosine"`` (from ``lr`` to ``final_lr``), ``"exponential"`` (geometric
            from ``lr`` to ``final_lr``) or ``"constant"``.
        final_lr: learning rate at the last step (``> 0`` for ``"exponential"``).
        weight_decay: Adam weight decay.
        max_grad_norm: gradient-norm clip (``None``: no clipping).
        clip_to_median: also clip the gradient norm to this multiple of the median norm of
            the last 200 steps, from the 50th step on (``None``: no such clip).
        validate: ``() -> float`` evaluated every ``eval_every`` steps and at the end (in eval
            mode, without gradients); the parameters with the lowest value are restored at the
            end. Without it and with ``patience``, the mean training loss of each window of
            ``eval_every`` steps is monitored instead (a plateau stop; nothing is restored).
        eval_every: steps between evaluations (default ``num_steps // 20``).
        patience: stop after this many evaluations without an improvement (``None``: never).
            Without ``validate``, an improvement must exceed twice the window mean's standard
            error, so Monte-Carlo noise alone does not keep a run going.
        min_delta: smallest decrease that counts as an improvement.
        cooldown: once patience runs out, train this many more steps with the learning rate
            falling linearly to 0 before stopping (averages out the optimiser's stationary
            noise, which at a plateau is what is left of the error).
        plateau_after: evaluations up to this step never count against ``patience`` (e.g. while
            the objective itself changes, as under annealing).
        backoff: learning-rate factor after a non-finite step (undone over 50 finite steps).
        max_failures: consecutive non-finite steps before giving up.
        progress: show a tqdm progress bar.
        kind: the caller's name, shown on the bar and checked when resuming.
        checkpoint: file written at every evaluation and at the end with everything needed to
            resume (module, optimiser, learning-rate state, random states, history).
        resume: continue from ``checkpoint`` when it exists.
        distributed: average gradients (and the logged loss) over the initialised
            ``torch.distributed`` group; rank 0's parameters and buffers are broadcast first.
        extra_state: ``(get, set)`` of further state for checkpoints (e.g. Pyro's param store).

    Returns:
        The history: ``train_loss`` and ``lr`` (per step taken), ``val_loss`` (or
        ``window_loss`` for a plateau stop) at ``eval_step``, ``best_val_loss``, ``best_step``,
        ``stopped_early``, ``skipped_steps``, ``steps`` (steps run, taken or not).

    Raises:
        TrainingDiverged: ``max_failures`` consecutive non-finite steps, or non-finite
            parameters; the last finite parameters are restored first.
    """
    num_steps = check_int(num_steps, "num_steps")
    lr = check_positive(lr, "lr")
    check_choice(schedule, "schedule", SCHEDULES)
    final_lr = check_number(final_lr, "final_lr", low=0.0)
    if schedule == "exponential":
        check_positive(final_lr, "final_lr")
    check_number(weight_decay, "weight_decay", low=0.0)
    if max_grad_norm is not None:
        check_positive(max_grad_norm, "max_grad_norm")
    if clip_to_median is not None:
        check_positive(clip_to_median, "clip_to_median")
    if eval_every is not None:
        check_int(eval_every, "eval_every")
    if patience is not None:
        check_int(patience, "patience")
    check_number(min_delta, "min_delta", low=0.0)
    check_int(plateau_after, "plateau_after", minimum=0)
    check_int(cooldown, "cooldown", minimum=0)
    check_number(backoff, "backoff", low=0.0, high=1.0, low_open=True, high_open=True)
    check_int(max_failures, "max_failures")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    rank, world = _world(distributed)
    params = (
        list(parameters)
        if parameters is not None
        else [p for p in module.parameters() if p.requires_grad]
    )
    if not params:
        raise ValueError(f"{kind}: nothing to train (no parameter requires grad)")
    eval_every = eval_every or max(1, num_steps // 20)
    if distributed:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history: dict[str, Any] = dict(
        train_loss=[],
        lr=[],
        val_loss=[],
        window_loss=[],
        eval_step=[],
        best_val_loss=math.inf,
        best_step=None,
        stopped_early=False,
        skipped_steps=0,
        steps=0,
    )
    state = dict(
        scale=1.0, failures=0, since_best=0, best=math.inf, best_state=None, window=0,
        cooldown_from=None, norms=[],
    )
    first_step = 1
    if resume and Path(checkpoint).is_file():
        saved = _load_checkpoint(Path(checkpoint), module, kind)
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        _set_rng_state(module, saved["rng"])
        history, state = saved["history"], saved["state"]
        if extra_state is not None:
            extra_state[1](saved["extra"])
        first_step = history["steps"] + 1

    def save() -> None:
        if checkpoint is None or rank != 0:
            return
        torch.save(
            dict(
                format=CHECKPOINT_FORMAT,
                kind=kind,
                module=module.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                rng=_rng_state(module),
                history=history,
                state=state,
                extra=None if extra_state is None else extra_state[0](),
            ),
            checkpoint,
        )

    good = [p.detach().clone() for p in params]  # parameters of the last finite step

    def restore_good() -> None:
        with torch.no_grad():
            torch._foreach_copy_(params, good)

    def evaluate(step: int) -> bool:
        """Record an evaluation; ``True`` when patience has run out."""
        if validate is not None:
            module.eval()
            with torch.no_grad():
                value = float(validate())
            module.train()
            history["val_loss"].append(value)
            threshold = 0.0
        else:
            window = torch.tensor(
                history["train_loss"][state["window"] :], dtype=torch.float64, device="cpu"
            )
            state["window"] = len(history["train_loss"])
            if len(window) == 0:
                return False
            value = float(window.mean())
            spread = float(window.std()) if len(window) > 1 else 0.0
            threshold = 2 * spread / math.sqrt(len(window))
            history["window_loss"].append(value)
        history["eval_step"].append(step)
        if step <= plateau_after:
            state["best"], state["since_best"] = math.inf, 0
        elif value < state["best"] - max(min_delta, threshold):
            state["best"], state["since_best"] = value, 0
            if validate is not None:
                history["best_val_loss"], history["best_step"] = value, step
                state["best_state"] = copy.deepcopy(module.state_dict())
        else:
            state["since_best"] += 1
        return patience is not None and state["since_best"] >= patience

    module.train()
    bar = tqdm(
        range(first_step, num_steps + 1),
        disable=not progress or rank != 0,
        desc=kind,
        dynamic_ncols=True,
    )
    step = first_step - 1
    for step in bar if not history["stopped_early"] else ():
        current = state["scale"] * _schedule(schedule, step - 1, num_steps, lr, final_lr)
        if state["cooldown_from"] is not None:
            start = state["cooldown_from"]
            current *= max(0.0, 1 - (step - start) / (cooldown + 1))
        for group in optimizer.param_groups:
            group["lr"] = current
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        value = loss.detach().clone()
        if distributed:  # the global mean: every rank logs and skips the same
            dist.all_reduce(value)
            value /= world
        finite = bool(torch.isfinite(value))
        if finite:
            loss.backward()
            if distributed:
                for p in params:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    dist.all_reduce(grad)
                    p.grad = grad / world
            limit = max_grad_norm if max_grad_norm is not None else math.inf
            norms = state.setdefault("norms", [])  # (absent from older checkpoints)
            if clip_to_median is not None and len(norms) >= 50:
                limit = min(limit, clip_to_median * statistics.median(norms))
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
            finite = bool(torch.isfinite(norm))
            if finite and clip_to_median is not None:
                norms.append(float(norm))  # the norm before clipping
                del norms[:-200]
        history["steps"] = step
        if finite:
            with torch.no_grad():
                torch._foreach_copy_(good, [p.detach() for p in params])
            optimizer.step()
            state["failures"] = 0
            # a backed-off learning rate recovers over ~50 finite steps per halving
            state["scale"] = min(1.0, state["scale"] * backoff ** (-1 / 50))
            history["train_loss"].append(value.item())
            history["lr"].append(current)
        else:
            optimizer.zero_grad(set_to_none=True)
            history["skipped_steps"] += 1
            state["failures"] += 1
            state["scale"] *= backoff
            broken = not all(bool(torch.isfinite(p).all()) for p in params)
            if broken or state["failures"] >= max_failures:
                restore_good()
                bar.close()
                why = (
                    "the parameters became non-finite"
                    if broken
                    else (
                        f"{state['failures']} consecutive steps had a non-finite loss or gradient"
                    )
                )
                raise TrainingDiverged(
                    f"{kind} diverged at step {step}: loss {value.item():.4g} at learning rate "
                    f"{current:.3g} ({why}); the parameters of the last finite step were "
                    "restored. Try a smaller lr or max_grad_norm."
                )
        if state["cooldown_from"] is not None:
            if step >= state["cooldown_from"] + cooldown:
                history["stopped_early"] = True
                break
        elif step % eval_every == 0 or step == num_steps:
            stop = evaluate(step)
            if validate is not None:
                bar.set_postfix(
                    loss=f"{history['train_loss'][-1]:.4g}" if history["train_loss"] else "nan",
                    val=f"{history['val_loss'][-1]:.4g}",
                )
            if stop and cooldown and step < num_steps:
                state["cooldown_from"], stop = step, False
            save()
            if stop:
                history["stopped_early"] = True
                break
        elif step % 10 == 0 and history["train_loss"]:
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.4g}")
    bar.close()
    save()
    if state["best_state"] is not None:
        module.load_state_dict(state["best_state"])
    module.eval()
    return history
