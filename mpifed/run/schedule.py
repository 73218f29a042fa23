"""The inner learning-rate schedule: linear warmup, then constant or cosine decay to train.min_lr,
over all rounds x local steps of the run (so a resumed run continues the same curve)."""
from __future__ import annotations

import math

from mpifed.config import TrainConfig


def inner_lr(train: TrainConfig, step: int, total_steps: int, ranks: int = 1) -> float:
    """The inner learning rate at 0-based global inner step `step` of `total_steps`: linear warmup,
    then constant or cosine decay to train.min_lr; times the facility's ranks with train.scale_lr."""
    peak = train.lr * (ranks if train.scale_lr else 1)
    floor = train.min_lr * (ranks if train.scale_lr else 1)
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return peak
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps - 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
