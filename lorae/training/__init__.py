"""Surviving faults: atomic and data-only checkpoints, pre-emption, guards against bad input.

:func:`default_callbacks` are the callbacks every ``lorae`` run gets (see
:class:`lorae.module.EnsembleClassifier.configure_callbacks`); :class:`SafeCheckpointIO` is the
checkpoint plugin the CLI installs.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from lorae.training.checkpointing import (
    CheckpointReadError,
    LoaderPositionRestore,
    RandomStateCheckpoint,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint_safely,
)
from lorae.training.guards import (
    FiniteLossGuard,
    LabelRangeGuard,
    NonFiniteLossError,
    out_of_memory_message,
)
from lorae.training.signals import SigtermCheckpoint

__all__ = [
    "CheckpointReadError",
    "FiniteLossGuard",
    "LabelRangeGuard",
    "LoaderPositionRestore",
    "NonFiniteLossError",
    "RandomStateCheckpoint",
    "SafeCheckpointIO",
    "SigtermCheckpoint",
    "UnsafeCheckpointError",
    "default_callbacks",
    "load_checkpoint_safely",
    "out_of_memory_message",
]


def default_callbacks() -> list[Callback]:
    """Fault-tolerance callbacks of every run: RNG state and the data position restored on
    resume, a checkpoint on SIGTERM, and stops with a clear message on a non-finite loss or
    out-of-range labels."""
    return [
        RandomStateCheckpoint(),
        LoaderPositionRestore(),
        SigtermCheckpoint(),
        FiniteLossGuard(),
        LabelRangeGuard(),
    ]
