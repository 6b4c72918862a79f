"""The schedule: how many optimizer steps a run takes, and the learning rate of each one."""

from __future__ import annotations

import math

from medlora.config import TrainConfig


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup:  step < warmup_steps          lr = peak * (step + 1) / warmup_steps
    decay:   warmup_steps <= step < total lr = peak * 0.5 * (1 + cos(pi * progress)),
             progress = (step - warmup_steps) / (total_steps - warmup_steps), from 0 towards 1
    floor:   step >= total_steps          lr = 0
    """
    if step >= total_steps:
        return 0.0
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_lengths(train_examples: int, config: TrainConfig) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps) of a run over `train_examples` rows.

    The last step of an epoch may be short; --max-steps caps the total; warmup is at least 1 step.
    """
    steps_per_epoch = math.ceil(train_examples / config.step_examples)
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = max(1, math.ceil(config.warmup_fraction * total_steps))
    return steps_per_epoch, total_steps, warmup_steps
