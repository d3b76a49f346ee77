"""Learning-rate schedules: linear warm-up, then decay (paper appendix M)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lorae.errors import ConfigError


@dataclass(frozen=True)
class ExponentialDecay:
    """Multiply the learning rate by ``gamma`` every ``every_epochs`` epochs after
    ``start_epoch`` (paper appendix M: iNaturalist x0.94 every 4 epochs; ESC-50 x0.85 per epoch
    from epoch 5). Epochs count from 0; the first decay applies from epoch
    ``start_epoch + every_epochs`` on. In a config: ``lr_decay: {gamma: 0.94, every_epochs: 4}``.
    """

    gamma: float
    every_epochs: int = 1
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"lr_decay.gamma must be in (0, 1], got {self.gamma}.")
        if self.every_epochs < 1 or self.start_epoch < 0:
            raise ConfigError(
                "lr_decay.every_epochs must be >= 1 and lr_decay.start_epoch >= 0, got "
                f"{self.every_epochs} and {self.start_epoch}."
            )


LRDecay = Literal["cosine", "linear", "constant"] | ExponentialDecay
#: Learning-rate multiplier per optimizer step (the function ``LambdaLR`` takes).
LRLambda = Callable[[int], float]


@dataclass(frozen=True)
class TrainingSteps:
    """How long training runs, in optimizer steps: what a learning-rate schedule is built from.

    Attributes:
        total_steps: optimizer steps of the whole fit (Lightning's estimate).
        steps_per_epoch: optimizer steps per epoch (gradient accumulation counted).
        max_epochs: the trainer's epoch budget (``None`` or negative when unbounded).
        warmup_steps: linear warm-up steps the module is configured with.
        fast_dev_run: a one-step debugging run (Lightning's ``fast_dev_run``).
    """

    total_steps: int
    steps_per_epoch: int
    max_epochs: int | None
    warmup_steps: int
    fast_dev_run: bool = False


def warmup_decay(
    total_steps: int, warmup_steps: int, decay: LRDecay, steps_per_epoch: int = 1
) -> LRLambda:
    """Multiplier of the base learning rate at each optimizer step (for ``LambdaLR``).

    Linear warm-up from 0 to 1 over ``warmup_steps`` (the paper uses 500), then ``decay``:
    ``"cosine"`` to 0 at ``total_steps`` (the paper's ViT and AST recipes), ``"linear"`` to 0
    (its BERT recipe), ``"constant"``, or an :class:`ExponentialDecay` per epoch (epochs are
    counted in ``steps_per_epoch`` optimizer steps). If training is shorter than the warm-up,
    the warm-up is shortened to end at the last step, which then runs at the peak rate.
    """
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if not isinstance(decay, ExponentialDecay) and decay not in ("cosine", "linear", "constant"):
        raise ConfigError(
            "lr_decay must be 'cosine', 'linear', 'constant' or {gamma: G, every_epochs: N, "
            f"start_epoch: S}}, got {decay!r}."
        )
    total = max(1, total_steps)
    warmup = min(warmup_steps, total - 1) if total > 1 else 0
    epoch_steps = max(1, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        if isinstance(decay, ExponentialDecay):
            epochs = max(0, step // epoch_steps - decay.start_epoch)
            return float(decay.gamma ** (epochs // decay.every_epochs))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
