"""Stop early and clearly on bad training signals: non-finite loss, labels out of range, OOM."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lorae.errors import ConfigError, NonFiniteLossError

__all__ = [
    "FiniteLossGuard",
    "LabelRangeGuard",
    "NonFiniteLossError",
    "out_of_memory_message",
]


def _saved_checkpoints(trainer: pl.Trainer) -> list[str]:
    paths: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            for path in (callback.last_model_path, callback.best_model_path):
                if path and path not in paths:
                    paths.append(path)
    return paths


class FiniteLossGuard(Callback):
    """Stop training at the first NaN or infinite loss, before it reaches the weights.

    The check runs before ``backward`` (so before the optimizer step): the weights, and every
    checkpoint already written, stay as they were after the last finite step, and no new
    checkpoint is written. Under DDP the ranks agree (any rank's bad loss stops all of them),
    so no rank waits forever for the others.

    Raises:
        NonFiniteLossError: naming the step, the loss and the last good checkpoint(s).
    """

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        kept = _saved_checkpoints(trainer)
        where = (
            f"The last good checkpoint is kept: {', '.join(kept)}; resume from it with "
            "--ckpt_path last (or that path) after the fix."
            if kept
            else "No checkpoint had been written yet."
        )
        raise NonFiniteLossError(
            f"The training loss became {float(loss.detach().float().mean())} at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}); training stopped. {where} "
            "Usual fixes: a lower learning rate (--model.optimizer.init_args.lr), a longer "
            "warm-up (--model.warmup_steps), gradient clipping (--trainer.gradient_clip_val), "
            "--trainer.precision=32-true instead of 16-mixed, or check the data for NaN/inf "
            "values."
        )


class LabelRangeGuard(Callback):
    """Refuse batches whose targets lie outside ``[0, num_classes)`` with a clear message.

    Without it, cross-entropy fails with an opaque index error on the CPU and a device-side
    assert on the GPU. The targets of a batch are read once per batch (one small reduction).

    Raises:
        ConfigError: naming the bad label and the model's ``num_classes``.
    """

    def _check(self, pl_module: pl.LightningModule, batch: Any, stage: str) -> None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return
        target = batch[1]
        if not isinstance(target, Tensor) or target.numel() == 0:
            return
        num_classes = int(getattr(pl_module, "num_classes", 0))
        low, high = int(target.min()), int(target.max())
        if low >= 0 and high < num_classes:
            return
        bad = low if low < 0 else high
        raise ConfigError(
            f"A {stage} batch has label {bad}, outside [0, {num_classes}): the model was built "
            f"for num_classes={num_classes}. Labels must be 0 .. num_classes - 1; check the "
            "data's labels, or the checkpoint and data module you combined (a checkpoint "
            "trained on another number of classes cannot score this data)."
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._check(pl_module, batch, "training")

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._check(pl_module, batch, "validation")

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0:  # out-of-distribution sets may carry foreign labels
            self._check(pl_module, batch, "test")


def out_of_memory_message(error: BaseException) -> str:
    """What to tell a user whose run ran out of (GPU or CPU) memory."""
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return (
        f"Out of memory ({type(error).__name__}: {first}). Reduce what one step holds: "
        "a smaller --data.init_args.batch_size and --data.init_args.eval_batch_size (for "
        "example half), fewer members (--model.method.init_args.num_members), "
        "--trainer.precision=bf16-mixed (16-bit activations), or fewer adapted "
        "projections (--model.method.init_args.lora.targets / lora.last_blocks). With "
        "several GPUs, --trainer.strategy=ddp --trainer.devices=N splits each batch across "
        "them."
    )
