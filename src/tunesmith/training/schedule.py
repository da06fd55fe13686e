"""Learning-rate schedules as pure functions of the step (the same formulas as transformers' get_scheduler).

A schedule is a multiplier of the peak learning rate: it has no state, so a resumed run needs only the
step number to continue exactly where it stopped.
"""

from __future__ import annotations

import math


def lr_factor(kind: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if kind == "constant":  # transformers' "constant" has no warm-up
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """warmup_steps wins when set; otherwise the ceiling of warmup_ratio * total_steps (as transformers does)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
