"""Learning-rate schedules shared by the trainers."""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
          floor: float = 0.1) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to floor * base_lr at max_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizers, lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
