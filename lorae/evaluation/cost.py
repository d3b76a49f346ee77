"""Compute-cost report (paper Tab. 9 and 22), measured during the run.

:class:`ComputeCostMeter` is driven by :class:`~lorae.evaluation.callback.TestProtocol`, which
writes its :meth:`~ComputeCostMeter.report` under ``"compute"`` in ``metrics.json``. Timings
depend on the machine and its load; they are reported, never compared in tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ComputeCostMeter", "parameter_counts"]


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


class ComputeCostMeter:
    """Measures training time per epoch and test time per sample.

    - ``train_seconds_per_epoch``: wall time from :meth:`start_epoch` to :meth:`end_epoch`
      (called at the start and end of the training epoch: training steps only, validation
      excluded), mean over epochs.
    - ``inference_seconds_per_sample``: wall time of each timed test batch of the
      in-distribution test split (forward pass and metric updates, after a device
      synchronisation), summed and divided by the number of samples; the first batch is
      excluded as warm-up when there are several.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.batch_seconds: list[tuple[float, int]] = []
        self._epoch_start = 0.0
        self._batch_start = 0.0

    def start_epoch(self) -> None:
        """A training epoch starts."""
        self._epoch_start = time.perf_counter()

    def end_epoch(self) -> None:
        """The training epoch started last ends."""
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def start_test(self) -> None:
        """A test run starts: forget the batches of an earlier one."""
        self.batch_seconds = []

    def start_batch(self, device: torch.device) -> None:
        """A test batch starts (the device's queued work is waited for first)."""
        _synchronize(device)
        self._batch_start = time.perf_counter()

    def end_batch(self, device: torch.device, num_samples: int) -> None:
        """The test batch started last ends, after its forward pass and metric updates."""
        _synchronize(device)
        self.batch_seconds.append((time.perf_counter() - self._batch_start, num_samples))

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
