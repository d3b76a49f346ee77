"""``lorae predict`` output: columns, entropy decomposition, merge of DDP ranks, file names."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lorae.data import ImageFolderDataModule
from lorae.errors import ConfigError
from lorae.evaluation.outputs import PredictionWriter, merge_rank_predictions, prediction_columns
from lorae.methods.base import EnsembleMethod
from lorae.metrics.functional import predictive_log_probs
from lorae.module import EnsembleClassifier
from tests.fixtures.builders import write_image_folder


class GivenLogits(EnsembleMethod):
    """A method whose input already is the member logits: ``(B, M, C) -> (M, B, C)``."""

    def __init__(self, num_classes: int, num_members: int) -> None:
        super().__init__()
        self.num_classes, self.num_members = num_classes, num_members

    def forward(self, x: Any) -> torch.Tensor:
        return x.transpose(0, 1)


def _batch(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the real EnsembleClassifier.predict_step returns for these member logits."""
    m, _, c = logits.shape
    module = EnsembleClassifier(lambda classes: GivenLogits(classes, m), c)
    with torch.no_grad():
        return module.predict_step((logits.transpose(0, 1), target), 0)


def _trainer(tmp_path: Path, names: list[str] | None = None) -> Any:
    datamodule = SimpleNamespace(predict_sample_names=lambda: names)
    return SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), datamodule=datamodule,
        is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name: None),
    )  # fmt: skip


def _logits(m: int, b: int, c: int, seed: int) -> torch.Tensor:
    return 3 * torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed))


def test_columns_and_entropy_decomposition_in_the_csv(tmp_path: Path) -> None:
    logits, target = _logits(4, 25, 3, seed=0), torch.randint(0, 3, (25,))
    batches = [_batch(logits[:, :10], target[:10]), _batch(logits[:, 10:], target[10:])]
    writer = PredictionWriter(member_predictions=True)
    writer.write_on_epoch_end(
        _trainer(tmp_path), None, batches, [[list(range(10)), list(range(10, 25))]]
    )  # type: ignore[arg-type]
    assert writer.written == tmp_path / "predictions.csv"
    with writer.written.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == prediction_columns(3, 4, False, True)
    assert reader.fieldnames[:9] == [
        "index", "target", "pred", "pred_name", "confidence", "agreement",
        "entropy", "expected_entropy", "mutual_information",
    ]  # fmt: skip
    probs = predictive_log_probs(logits.double()).exp()
    for i, row in enumerate(rows):
        assert int(row["index"]) == i and int(row["target"]) == int(target[i])
        total = float(row["entropy"])
        aleatoric, epistemic = float(row["expected_entropy"]), float(row["mutual_information"])
        assert abs(aleatoric + epistemic - total) < 1e-6
        assert epistemic >= 0 and 0 <= aleatoric <= math.log(3) + 1e-9
        p = [float(row[f"prob_{c}"]) for c in range(3)]
        np.testing.assert_allclose(p, probs[i].numpy(), rtol=1e-12)
        assert int(row["pred"]) == int(np.argmax(p))
        assert row["pred_name"] == row["pred"]  # the data module names no classes here
        assert float(row["confidence"]) == pytest.approx(max(p), rel=1e-12)
        votes = logits[:, i].argmax(-1) == int(row["pred"])
        assert float(row["agreement"]) == pytest.approx(votes.double().mean().item())
        members = [int(row[f"member_pred_{m}"]) for m in range(4)]
        assert members == logits[:, i].argmax(-1).tolist()
    assert any(float(r["mutual_information"]) > 1e-3 for r in rows)  # members do disagree


def test_members_that_agree_have_zero_epistemic_uncertainty() -> None:
    logits = _logits(1, 8, 5, seed=1).repeat(3, 1, 1)
    batch = _batch(logits, torch.zeros(8, dtype=torch.long))
    assert batch["mutual_information"].abs().max() < 1e-12
    torch.testing.assert_close(batch["expected_entropy"], batch["entropy"])


def test_merge_rank_predictions_restores_sample_order() -> None:
    # DistributedSampler style: rank r holds samples r, r + 2, ...; the padding repeats sample 0.
    def payload(indices: list[int]) -> dict[str, np.ndarray]:
        idx = np.array(indices)
        return {"index": idx, "pred": idx * 10, "probs": np.stack([idx, -idx], axis=1)}

    merged = merge_rank_predictions([payload([0, 2, 4, 6]), payload([1, 3, 5, 0])])
    np.testing.assert_array_equal(merged["index"], np.arange(7))
    np.testing.assert_array_equal(merged["pred"], np.arange(7) * 10)
    np.testing.assert_array_equal(merged["probs"][:, 1], -np.arange(7))


def test_parquet_output_and_file_names(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    logits, target = _logits(2, 3, 2, seed=2), torch.tensor([0, 1, 1])
    writer = PredictionWriter(output_path=str(tmp_path / "p.parquet"))
    trainer = _trainer(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    writer.write_on_epoch_end(trainer, None, [_batch(logits, target)], [[[0, 1, 2]]])  # type: ignore[arg-type]
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert list(table) == prediction_columns(2, 2, True, False)
    assert table["file"] == ["a.jpg", "b.jpg", "c.jpg"]


def test_parquet_without_pyarrow_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lorae.evaluation.outputs.importlib.util.find_spec", lambda name: None)
    writer = PredictionWriter(output_path=str(tmp_path / "p.parquet"))
    batch = _batch(_logits(2, 3, 2, seed=3), torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match=r"lorae\[parquet\]"):
        writer.write_on_epoch_end(_trainer(tmp_path), None, [batch], [[[0, 1, 2]]])  # type: ignore[arg-type]


@pytest.mark.parametrize("with_test_folder", [True, False])
def test_image_folder_names_its_test_files(tmp_path: Path, with_test_folder: bool) -> None:
    splits = ("train", "test") if with_test_folder else ("train",)
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=5, size=8, splits=splits)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, test_fraction=0.3, seed=0)
    names = dm.predict_sample_names()
    targets = [int(t) for _, t in dm.test_dataset]  # type: ignore[attr-defined]
    assert len(names) == len(targets) > 0
    for name, target in zip(names, targets, strict=True):
        assert (tmp_path / name).is_file()
        split, label, _ = name.split("/")
        assert split == ("test" if with_test_folder else "train")
        assert dm.class_names.index(label) == target


def test_predictive_variance_of_eq_4_per_class_and_summed(tmp_path: Path) -> None:
    """Paper Eq. 4: Var[Y|X] = 1/N sum_i (T_i(X) - E[Y|X])^2 of the members' softmaxes, written
    per class (``var_c``) and summed over the classes (``variance``)."""
    logits, target = _logits(5, 12, 3, seed=4), torch.randint(0, 3, (12,))
    logits[:, 0] = logits[0, 0]  # sample 0: all members agree, so no variance
    writer = PredictionWriter()
    writer.write_on_epoch_end(
        _trainer(tmp_path), None, [_batch(logits, target)], [[list(range(12))]]
    )  # type: ignore[arg-type]
    assert writer.written is not None
    with writer.written.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames is not None
    assert reader.fieldnames[-4:] == ["variance", "var_0", "var_1", "var_2"]
    member_probs = torch.softmax(logits.double(), dim=-1).numpy()  # (M, B, C)
    expected = member_probs.var(axis=0, ddof=0)  # divided by M, as Eq. 4
    for i, row in enumerate(rows):
        per_class = [float(row[f"var_{c}"]) for c in range(3)]
        np.testing.assert_allclose(per_class, expected[i], rtol=1e-9, atol=1e-15)
        assert float(row["variance"]) == pytest.approx(expected[i].sum(), rel=1e-9, abs=1e-15)
    assert float(rows[0]["variance"]) < 1e-30  # float64 rounding of the mean only
    assert max(float(r["variance"]) for r in rows) > 0.01


def test_a_calibrated_module_adds_abstain_and_calibrated_probs(tmp_path: Path) -> None:
    """With a ``lorae calibrate`` record on the module, ``abstain`` follows ``pred_name`` and
    ``calibrated_prob_*`` (``1/M sum_m softmax(z_m / T)``) follow ``prob_*``."""
    from lorae.checkpoints.calibration import CalibrationRecord

    logits, target = _logits(3, 16, 4, seed=5), torch.randint(0, 4, (16,))
    module = EnsembleClassifier(lambda classes: GivenLogits(classes, 3), 4)
    temperature = 2.5
    calibrated = predictive_log_probs(logits.double(), temperature).exp()
    threshold = float(calibrated.max(-1).values.median())
    module.calibration = CalibrationRecord(temperature, 1.0, 0.9, 50, threshold=threshold)
    with torch.no_grad():
        batch = module.predict_step((logits.transpose(0, 1), target), 0)
    writer = PredictionWriter()
    writer.write_on_epoch_end(_trainer(tmp_path), None, [batch], [[list(range(16))]])  # type: ignore[arg-type]
    assert writer.written is not None
    with writer.written.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == prediction_columns(4, 3, False, False, True, True, True)
    assert reader.fieldnames[3:5] == ["pred_name", "abstain"]
    for i, row in enumerate(rows):
        values = [float(row[f"calibrated_prob_{c}"]) for c in range(4)]
        np.testing.assert_allclose(values, calibrated[i].numpy(), rtol=1e-12)
        assert int(row["abstain"]) == int(max(values) < threshold)
    assert {row["abstain"] for row in rows} == {"0", "1"}
    module.calibration = CalibrationRecord(temperature, 1.0, 0.9, 50)  # no threshold
    with torch.no_grad():
        batch = module.predict_step((logits.transpose(0, 1), target), 0)
    assert "abstain" not in batch and "calibrated_probs" in batch
