"""Surviving faults: exact resume, pre-emption, guards against bad input.

:func:`default_callbacks` are the callbacks every ``lorae`` run gets (see
:class:`lorae.module.EnsembleClassifier.configure_callbacks`). The checkpoint files themselves
(atomic, data-only) are :mod:`lorae.checkpoints`'.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from lorae.training.guards import (
    FiniteLossGuard,
    LabelRangeGuard,
    NonFiniteLossError,
    out_of_memory_message,
)
from lorae.training.resume import LoaderPositionRestore, RandomStateCheckpoint
from lorae.training.signals import SigtermCheckpoint

__all__ = [
    "FiniteLossGuard",
    "LabelRangeGuard",
    "LoaderPositionRestore",
    "NonFiniteLossError",
    "RandomStateCheckpoint",
    "SigtermCheckpoint",
    "default_callbacks",
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
