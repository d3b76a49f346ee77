"""Compute-cost report (paper Tab. 9 and 22), measured during the run.

:class:`ComputeCostMonitor` is attached by ``lorae fit`` and ``lorae test``; the CLI writes its
:meth:`~ComputeCostMonitor.report` under ``"compute"`` in ``metrics.json``. Timings depend on the
machine and its load; they are reported, never compared in tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["ComputeCostMonitor", "parameter_counts"]


def parameter_counts(module: nn.Module, num_members: int) -> dict[str, int | float]:
    """Total and trainable parameters, and trainable parameters per member.

    ``trainable_per_member`` is ``trainable / M``: every member-specific parameter (LoRA
    factors, heads, an explicit member's whole network) belongs to one member; for methods
    whose trainable weights are shared by all members it is an average.
    """
    unique = {id(p): p for p in module.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "trainable_per_member": trainable / num_members,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ComputeCostMonitor(pl.Callback):
    """Measures training time per epoch and test time per sample.

    - ``train_seconds_per_epoch``: wall time from ``on_train_epoch_start`` to
      ``on_train_epoch_end`` (training steps only; validation is excluded), mean over epochs.
    - ``inference_seconds_per_sample``: wall time of each test batch of the in-distribution
      test split (forward pass and metric updates, after a device synchronisation), summed and
      divided by the number of samples; the first batch is excluded as warm-up when there are
      several.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.batch_seconds: list[tuple[float, int]] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batch_seconds = []

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0:
            return
        _synchronize(pl_module.device)
        self.batch_seconds.append((time.perf_counter() - self._start, int(batch[1].shape[0])))

    def report(self, module: nn.Module, num_members: int, checkpoint: str | None) -> dict[str, Any]:
        """Parameters, checkpoint size and the measured times (``None`` when not measured)."""
        batches = self.batch_seconds[1:] if len(self.batch_seconds) > 1 else self.batch_seconds
        samples = sum(n for _, n in batches)
        ckpt = Path(checkpoint) if checkpoint else None
        return {
            "parameters": parameter_counts(module, num_members),
            "checkpoint_bytes": ckpt.stat().st_size if ckpt and ckpt.is_file() else None,
            "train_seconds_per_epoch": (
                sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
            ),
            "train_epochs_timed": len(self.epoch_seconds),
            "inference_seconds_per_sample": (
                sum(s for s, _ in batches) / samples if samples else None
            ),
            "inference_samples_timed": samples,
        }
