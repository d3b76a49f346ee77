"""Test-only callbacks that hurt a run on purpose, named by class path in tiny configs."""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send ``signal_name`` to this very process after training step ``step``.

    A real signal, delivered at a known step, so the test does not race the run: ``SIGKILL``
    ends the process at once (no handler, no clean-up); ``SIGTERM`` goes through Lightning's
    handler like a cluster pre-emption.
    """

    def __init__(self, step: int, signal_name: Literal["SIGKILL", "SIGTERM"]) -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class PoisonInputsAtStep(Callback):
    """Replace the inputs of training batch ``step`` by NaN, so the loss becomes NaN there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            inputs = batch[0]
            assert isinstance(inputs, torch.Tensor)
            inputs.fill_(float("nan"))


class RaiseAtStep(Callback):
    """Crash the run with an exception after training step ``step`` (an in-process crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"deliberate crash after step {self.step}")


class OutOfMemoryAtStep(Callback):
    """Raise the error PyTorch raises when an allocation fails, at training step ``step``.

    A real out-of-memory cannot be provoked safely on a shared CPU machine; the CLI's
    handling only depends on the exception type, which this raises with a CUDA-like message.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total)"
            )
