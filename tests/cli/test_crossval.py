"""``lorae crossval``'s epoch selection (paper appendix A.2): one epoch for all folds, the one
with the best held-out accuracy averaged over the folds, not each fold's own best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lorae.cli import crossval
from lorae.errors import ConfigError

#: Held-out ensemble accuracy of each of five folds after epochs 0, 1, 2 (10 clips per fold).
#: Each fold's own best is epoch 0 or 1; averaged over the folds, epoch 2 (0.8) is the best.
ACCURACY = [[1.0, 0.2, 0.8], [0.2, 1.0, 0.8], [1.0, 0.2, 0.8], [0.2, 1.0, 0.8], [1.0, 0.2, 0.8]]
CLIPS, CLASSES, MEMBERS = 10, 4, 2


def _logits(accuracy: float, targets: Tensor) -> Tensor:
    """Member logits ``(M, B, C)`` whose ensemble is right on the first ``accuracy`` share."""
    right = round(accuracy * len(targets))
    predicted = targets.clone()
    predicted[right:] = (targets[right:] + 1) % CLASSES
    logits = torch.zeros(MEMBERS, len(targets), CLASSES)
    logits[:, torch.arange(len(targets)), predicted] = 3.0
    return logits


def _fake_folds() -> dict[int, tuple[list[Tensor], Tensor]]:
    folds = {}
    for fold, accuracies in enumerate(ACCURACY, start=1):
        targets = (torch.arange(CLIPS) + fold) % CLASSES
        folds[fold] = ([_logits(a, targets) for a in accuracies], targets)
    return folds


def test_fake_data_has_the_intended_accuracies() -> None:
    for fold, (per_epoch, targets) in _fake_folds().items():
        got = [crossval.ensemble_accuracy(logits, targets) for logits in per_epoch]
        assert got == pytest.approx(ACCURACY[fold - 1])


def test_common_epoch_differs_from_every_fold_s_own_best() -> None:
    folds = _fake_folds()
    epoch_logits = [per_epoch for per_epoch, _ in folds.values()]
    targets = [t for _, t in folds.values()]
    own_best = [max(range(3), key=lambda e, a=acc: a[e]) for acc in ACCURACY]
    assert crossval.common_epoch(epoch_logits, targets) == 2
    assert 2 not in own_best
    assert crossval.mean_accuracies(epoch_logits, targets) == pytest.approx([0.68, 0.52, 0.8])


def test_common_epoch_takes_the_first_of_tied_epochs() -> None:
    targets = torch.arange(CLIPS) % CLASSES
    per_epoch = [_logits(0.5, targets), _logits(0.9, targets), _logits(0.9, targets)]
    assert crossval.common_epoch([per_epoch], [targets]) == 1


def test_common_epoch_needs_the_same_epochs_in_every_fold() -> None:
    targets = torch.arange(CLIPS) % CLASSES
    with pytest.raises(ConfigError, match="same"):
        crossval.common_epoch([[_logits(1.0, targets)], []], [targets, targets])


def test_cross_validate_pools_the_folds_at_the_common_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folds = _fake_folds()

    def fake_fit(
        configs: list[str], fold: int, root: Path, extra: list[str], checkpoint: str
    ) -> tuple[list[Tensor], Tensor, int, int]:
        per_epoch, targets = folds[fold]
        return (per_epoch if checkpoint == "common" else per_epoch[-1:]), targets, CLASSES, 10

    monkeypatch.setattr(crossval, "_fit_fold", fake_fit)
    result = crossval.cross_validate(["c.yaml"], [1, 2, 3, 4, 5], tmp_path, [], "common")
    assert result["epoch"] == 2
    assert result["pooled"]["acc"] == pytest.approx(0.8)
    for fold in range(1, 6):
        assert result["folds"][str(fold)]["acc"] == pytest.approx(0.8)
        saved: dict[str, Any] = torch.load(tmp_path / f"fold_{fold}" / "test_logits.pt")
        assert torch.equal(saved["logits"], folds[fold][0][2])
        assert saved["epoch_logits"].shape == (3, MEMBERS, CLIPS, CLASSES)
    assert json.loads((tmp_path / "crossval.json").read_text())["epoch"] == 2
    # Each fold's own best epoch would pool to 100% accuracy: the protocol is not that.
    last = crossval.cross_validate(["c.yaml"], [1, 2, 3, 4, 5], tmp_path / "last", [], "last")
    assert last["epoch"] is None and last["pooled"]["acc"] == pytest.approx(0.8)
