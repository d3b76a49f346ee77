"""One member versus the whole ensemble on the test split: the comparison the quickstart prints.

The paper's claim is a comparison: an ensemble of LoRA members is better calibrated (lower ECE
and NLL) than one network with LoRA (section 5, Tab. 1; appendix J for a backbone pretrained
on the same data). :class:`MemberComparison` prints it at the end of ``lorae test`` (and of
the test after ``lorae fit``): accuracy, ECE and NLL of member 0 alone, the mean over the
members scored one by one, and the ensemble's predictive distribution (the mean of the members'
softmaxes, the one every lorae metric uses). It only reads the test split's member logits that
``test_step`` returns; the full test protocol and ``metrics.json`` are
:mod:`lorae.evaluation`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import Tensor

from lorae.metrics import expected_calibration_error, negative_log_likelihood, predictive_log_probs

__all__ = ["MemberComparison", "Row", "compare_members", "comparison_table"]


@dataclass(frozen=True)
class Row:
    """Accuracy, mean confidence (the top probability; above ``acc``: overconfident, below:
    underconfident), ECE and NLL of one way of predicting."""

    name: str
    acc: float
    conf: float
    ece: float
    nll: float


def _scores(name: str, log_probs: Tensor, target: Tensor, n_bins: int) -> Row:
    probs = log_probs.exp()
    return Row(
        name,
        float((probs.argmax(-1) == target).double().mean()),
        float(probs.max(-1).values.mean()),
        float(expected_calibration_error(probs, target, n_bins)),
        float(negative_log_likelihood(log_probs, target)),
    )


def compare_members(logits: Tensor, target: Tensor, n_bins: int = 10) -> list[Row]:
    """Member 0, the mean over members (each scored alone) and the ensemble.

    Every score uses :mod:`lorae.metrics`' functions; a member alone is the one-member
    predictive distribution ``softmax(z_m)``, the ensemble the mean of the M softmaxes. With
    ``M = 1`` the three rows are equal.

    Args:
        logits: member logits of the whole test split.
        target: class indices.
        n_bins: equal-width ECE bins (the test protocol's default is 10).

    Returns:
        ``[member 0, mean of members, ensemble of M]``.

    Shape:
        - logits: ``(M, B, C)``
        - target: ``(B,)``
    """
    logits = logits.double()
    members = [
        _scores(f"member {m}", predictive_log_probs(logits[m : m + 1]), target, n_bins)
        for m in range(logits.shape[0])
    ]
    mean = Row(
        f"mean of {len(members)} members",
        sum(r.acc for r in members) / len(members),
        sum(r.conf for r in members) / len(members),
        sum(r.ece for r in members) / len(members),
        sum(r.nll for r in members) / len(members),
    )
    ensemble = _scores(
        f"ensemble of {logits.shape[0]}", predictive_log_probs(logits), target, n_bins
    )
    return [members[0], mean, ensemble]


def comparison_table(rows: list[Row], samples: int) -> str:
    """The rows as a small text table, with which of them the ensemble beats."""
    width = max(len(r.name) for r in rows)
    lines = [
        f"One member vs the ensemble on the test split ({samples} samples; lower ECE and "
        "NLL are better):",
        f"  {'':<{width}}  {'acc':>6}  {'conf':>6}  {'ECE':>6}  {'NLL':>6}",
        *(
            f"  {r.name:<{width}}  {r.acc:6.3f}  {r.conf:6.3f}  {r.ece:6.3f}  {r.nll:6.3f}"
            for r in rows
        ),
    ]
    single, ensemble = rows[0], rows[-1]
    better = [
        name
        for name, ours, theirs in (
            ("accuracy", -ensemble.acc, -single.acc),
            ("ECE", ensemble.ece, single.ece),
            ("NLL", ensemble.nll, single.nll),
        )
        if ours < theirs
    ]
    lines.append(
        "  The ensemble beats member 0 on "
        + (", ".join(better) if better else "none of accuracy, ECE, NLL")
        + "."
    )
    return "\n".join(lines)


class MemberComparison(Callback):
    """Print :func:`comparison_table` for the test split at the end of every test run.

    Collects the member logits that ``test_step`` returns (``{"logits": (M, B, C),
    "target": (B,)}``, lorae's :class:`~lorae.module.EnsembleClassifier`) for the first test
    dataloader (the test split; OOD and shift sets are left out) and prints after Lightning's
    metrics table, from process 0 (under DDP: on process 0's share of the test split).

    Args:
        n_bins: equal-width ECE bins (10, like the test protocol's default ``ece_bins``).
    """

    def __init__(self, n_bins: int = 10) -> None:
        self.n_bins = n_bins
        self._logits: list[Tensor] = []
        self._target: list[Tensor] = []
        self.rows: list[Row] | None = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logits, self._target, self.rows = [], [], None

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or not isinstance(outputs, Mapping):
            return
        self._logits.append(outputs["logits"].detach().float().cpu())
        self._target.append(outputs["target"].detach().cpu())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the test loop and its printed metrics: compute and print the comparison."""
        if stage != "test" or not self._logits:
            return
        logits = torch.cat(self._logits, dim=1)
        target = torch.cat(self._target)
        self._logits, self._target = [], []
        self.rows = compare_members(logits, target, self.n_bins)
        if trainer.is_global_zero:
            table = comparison_table(self.rows, int(target.shape[0]))
            if trainer.world_size > 1:  # each process tested its own share of the split
                table += "\n  (process 0's share of the test split only; metrics.json has all)"
            print("\n" + table)
