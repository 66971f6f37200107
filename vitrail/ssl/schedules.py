"""Per-step schedules, pure functions of the step so a resumed run needs no schedule state."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float,
           warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `start`, then half a cosine from `start` to `end`."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """`start` rising linearly to `end` over `warmup_steps`, then constant."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
