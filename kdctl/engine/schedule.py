"""Learning-rate schedule as a pure function of the optimizer step, and a resumable LambdaLR.

The semantics follow MMDetection's detector configs (mmcv ``LrUpdaterHook`` / mmengine
param schedulers) so that kdctl recipes reproduce published numbers:

- **linear warmup** over the first ``warmup_iters`` optimizer steps, from ``warmup_ratio`` of the
  scheduled lr up to all of it, *multiplied* onto the main schedule (mmcv's
  ``warmup='linear'``): ``warmup_ratio + (1 - warmup_ratio) * step / warmup_iters``;
- **step**: the lr is multiplied by ``gamma`` once for every milestone epoch already reached
  (milestones count epochs: the "1x" schedule is 12 epochs with ``[8, 11]``, "2x" is 24 with
  ``[16, 22]``). Epoch ``m`` begins at step ``m * steps_per_epoch``;
- **cosine**: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * step / total_steps)) / 2``, from 1 at
  step 0 to ``min_ratio`` at ``total_steps``. It is computed per step rather than per epoch
  (mmcv's default ``by_epoch=True`` holds it constant within an epoch); per step is smoother and
  the difference is below 1 % of the lr for epochs of more than a few steps.

``step`` is always 0-based and is the step *about to be taken*: the factor for step 0 is the lr
of the very first update.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("step", "cosine")


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    schedule: str,
    milestones: Sequence[int],
    gamma: float,
    warmup_iters: int,
    warmup_ratio: float,
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based, the update about to happen).

    Args:
        step: optimizer steps already taken (>= 0). Steps past ``total_steps`` keep the final value.
        steps_per_epoch: optimizer steps in one epoch (>= 1); converts ``milestones`` to steps.
        total_steps: length of the whole run in optimizer steps (>= 1); the cosine period.
        schedule: ``"step"`` or ``"cosine"``.
        milestones: epochs (not steps) at whose start the step schedule multiplies by ``gamma``.
        gamma: step-schedule multiplier per milestone reached.
        warmup_iters: length of the linear warmup in optimizer steps (0: none).
        warmup_ratio: warmup's starting fraction of the scheduled lr, in (0, 1].
        min_ratio: cosine schedule's final fraction of the base lr (mmcv's ``min_lr_ratio``).

    Returns:
        A unitless factor; lr = base_lr * factor.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch and total_steps must be >= 1, got {steps_per_epoch} and {total_steps}")
    if schedule == "step":
        reached = sum(1 for m in milestones if step >= m * steps_per_epoch)
        factor = gamma**reached
    elif schedule == "cosine":
        progress = min(step, total_steps) / total_steps
        factor = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup_iters:
        factor *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    return factor


class _FactorLR(LambdaLR):
    """LambdaLR whose ``load_state_dict`` also puts the restored lr into the optimizer.

    Plain LambdaLR only restores its own counters; the optimizer's ``lr`` is right after a resume
    only when the optimizer state is loaded *after* the scheduler was built. Re-applying the lr
    here makes the load order irrelevant.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        factor = self.lr_lambdas[0](self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def make_scheduler(optimizer: Optimizer, **schedule) -> LambdaLR:
    """A LambdaLR that applies :func:`lr_factor` to every param group's base lr.

    Call ``scheduler.step()`` once after each ``optimizer.step()``: the scheduler's
    ``last_epoch`` then counts optimizer steps, and the lr in the optimizer is the one for the
    step about to be taken. Building it sets the lr for step 0 at once.

    The factor is a plain function of the arguments (nothing of it is stored), so
    ``state_dict()`` holds only numbers and loads with ``torch.load(weights_only=True)``; to
    resume, build it again from the same recipe and call ``load_state_dict`` (in either order
    with the optimizer's ``load_state_dict``). ``schedule``: the keyword arguments of
    :func:`lr_factor` (all but ``step``).
    """
    schedule = {**schedule, "milestones": tuple(int(m) for m in schedule["milestones"])}
    lr_factor(0, **schedule)  # check the arguments now rather than at the first step of a long run

    def factor(step: int) -> float:
        return lr_factor(step, **schedule)

    return _FactorLR(optimizer, factor)


def effective_lr(lr: float, batch_size: int, world_size: int, rule: str, base_batch_size: int) -> float:
    """``train.lr``, or with ``rule == "linear"`` ``lr * batch_size * world_size / base_batch_size``
    (MMDetection's ``auto_scale_lr``: the recipe's lr is the one for ``base_batch_size`` images
    per step, 16 = 8 GPUs x 2)."""
    return lr * batch_size * world_size / base_batch_size if rule == "linear" else lr
