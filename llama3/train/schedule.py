"""Learning-rate schedules as pure functions of the step (no scheduler object, nothing to checkpoint).

`lr_at(step, ...)` is the learning rate used for optimizer step `step` (0-based). Linear warmup over
`warmup_steps`, then either cosine decay to `min_lr_ratio · lr` at the last step, WSD (warmup-stable-decay:
constant, then a linear decay over the final `decay_fraction` of steps; Hu et al. 2024, MiniCPM), or constant.
"""

from __future__ import annotations

import math

from .config import ScheduleSection

__all__ = ["lr_at"]


def lr_at(step: int, *, lr: float, total_steps: int, schedule: ScheduleSection) -> float:
    """The learning rate at optimizer step `step` of `total_steps`."""
    if step < schedule.warmup_steps:
        return lr * (step + 1) / schedule.warmup_steps
    min_lr = lr * schedule.min_lr_ratio
    if schedule.name == "constant":
        return lr
    if schedule.name == "cosine":
        span = max(1, total_steps - 1 - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule.name == "wsd":
        decay_steps = max(1, round(total_steps * schedule.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule.name!r}; choose cosine, wsd or constant")
