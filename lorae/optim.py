"""Learning-rate schedules: linear warm-up, then decay (paper appendix M)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from lorae.errors import ConfigError

LRDecay = Literal["cosine", "linear", "constant"]


def warmup_decay(total_steps: int, warmup_steps: int, decay: LRDecay) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimizer step (for ``LambdaLR``).

    Linear warm-up from 0 to 1 over ``warmup_steps`` (the paper uses 500), then ``decay``:
    ``"cosine"`` to 0 at ``total_steps`` (the paper's ViT and AST recipes), ``"linear"`` to 0
    (its BERT recipe) or ``"constant"``. If training is shorter than the warm-up, the warm-up
    is shortened to end at the last step, which then runs at the peak rate.
    """
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if decay not in ("cosine", "linear", "constant"):
        raise ConfigError(f"lr_decay must be 'cosine', 'linear' or 'constant', got {decay!r}.")
    total = max(1, total_steps)
    warmup = min(warmup_steps, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
