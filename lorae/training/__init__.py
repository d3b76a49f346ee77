"""Surviving faults: exact resume, pre-emption, guards against bad input; and what a run does
around training: pretraining its backbone first (:class:`PretrainBackbone`, paper appendix J)
and the one-member-versus-ensemble table after testing (:class:`MemberComparison`).

:func:`default_callbacks` are the callbacks every ``lorae`` run gets (see
:class:`lorae.module.EnsembleClassifier.configure_callbacks`). The checkpoint files themselves
(atomic, data-only) are :mod:`lorae.checkpoints`'.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from lorae.training.comparison import MemberComparison, compare_members, comparison_table
from lorae.training.guards import (
    FiniteLossGuard,
    LabelRangeGuard,
    NonFiniteLossError,
    out_of_memory_message,
)
from lorae.training.precision import CPUPrecisionCheck, CPUPrecisionWarning
from lorae.training.pretrain import PretrainBackbone, PretrainRecord, pretrain_backbone
from lorae.training.resume import LoaderPositionRestore, RandomStateCheckpoint
from lorae.training.signals import SigtermCheckpoint

__all__ = [
    "CPUPrecisionCheck",
    "CPUPrecisionWarning",
    "FiniteLossGuard",
    "LabelRangeGuard",
    "LoaderPositionRestore",
    "MemberComparison",
    "NonFiniteLossError",
    "PretrainBackbone",
    "PretrainRecord",
    "RandomStateCheckpoint",
    "SigtermCheckpoint",
    "compare_members",
    "comparison_table",
    "default_callbacks",
    "out_of_memory_message",
    "pretrain_backbone",
]


def default_callbacks() -> list[Callback]:
    """Fault-tolerance callbacks of every run: RNG state and the data position restored on
    resume, a checkpoint on SIGTERM, stops with a clear message on a non-finite loss or
    out-of-range labels, and a warning when bf16 is asked for on a CPU that emulates it."""
    return [
        RandomStateCheckpoint(),
        LoaderPositionRestore(),
        SigtermCheckpoint(),
        FiniteLossGuard(),
        LabelRangeGuard(),
        CPUPrecisionCheck(),
    ]
