"""The test protocol: typed result, its flattened keys, report files, and the callback."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lorae.data.base import ClassificationDataModule, EvaluationSet
from lorae.errors import ConfigError
from lorae.evaluation import (
    Detection,
    Diversity,
    OODResult,
    ReliabilityCurve,
    Scores,
    ShiftResult,
    SizeCurve,
    TestEvaluation,
    TestProtocol,
    TestResult,
    Variant,
    VariantResult,
)
from lorae.evaluation.report import write_test_artifacts
from lorae.evaluation.result import RiskCoverage, key_table
from lorae.methods.base import EnsembleMethod
from lorae.metrics import EnsembleMetrics, accuracy_at_coverage, aurc, predictive_probs
from lorae.module import EnsembleClassifier

REPO = Path(__file__).resolve().parents[2]
M, C = 2, 4


def _per_variant_keys(m: int, diversity: bool, temperature: bool) -> list[str]:
    """The keys of one temperature, as ``lorae test`` has always written them (issue 16 must
    not change them: experiments/ and aggregate read these names)."""
    keys = ["acc", "f1", "ece", "nll", "brier", *(f"member_acc/{i}" for i in range(m))]
    keys += [f"ensemble_size/{k}/{n}" for k in range(1, m + 1) for n in ("acc", "ece", "nll")]
    # selective prediction (issue 17, item 4): ranked by confidence, then by mutual information
    selective = ["aurc", "acc_at_cov90", "acc_at_cov95", "acc_at_cov99"]
    keys += selective + [f"by_mi/{n}" for n in selective]
    keys += [f"ood/noise/{s}/{q}" for s in ("msp", "entropy", "mi") for q in ("auroc", "auprc")]
    keys += [f"shift/blur/1/{n}" for n in ("acc", "f1", "ece", "nll", "brier")]
    if diversity:
        keys += ["diversity/disagreement", "diversity/jsd", "diversity/jsd_per_sample"]
        keys += ["diversity/mi"]
    if temperature:
        keys += ["temperature"]
    return keys


def _expected_keys(m: int) -> set[str]:
    expected = {f"test/{k}" for k in _per_variant_keys(m, diversity=True, temperature=False)}
    for prefix in ("calibrated/", "temperature/0.5/", "temperature/2/"):
        keys = _per_variant_keys(m, diversity=False, temperature=True)
        expected |= {f"test/{prefix}{k}" for k in keys}
    return expected


def _logits(m: int, b: int, c: int, seed: int, scale: float = 2.0) -> Tensor:
    return scale * torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed))


VARIANTS = (
    Variant("uncalibrated", 1.0),
    Variant("calibrated", 1.3),
    Variant("sweep", 0.5),
    Variant("sweep", 2.0),
)
SETS = (("noise", "ood"), ("blur/1", "shift"))


def _computed() -> tuple[TestResult, dict[str, tuple[Tensor, Tensor]]]:
    evaluation = TestEvaluation(C, M, 10, VARIANTS, SETS)  # type: ignore[arg-type]
    data = {
        "test": (_logits(M, 40, C, 0, 3.0), torch.randint(0, C, (40,))),
        "noise": (_logits(M, 20, C, 1, 0.5), torch.full((20,), 77)),  # targets ignored
        "shift": (_logits(M, 30, C, 2), torch.randint(0, C, (30,))),
    }
    for index, (logits, target) in enumerate(data.values()):
        evaluation.update(logits, target, index)
    return evaluation.compute(), data


def test_flattened_keys_are_the_old_key_set() -> None:
    result, _ = _computed()
    values = result.log_values()
    assert set(values) == _expected_keys(M)
    # 103 + diversity/jsd_per_sample (issue 14, item 7); + 8 selective keys per temperature
    assert len(values) == 103 + 4 * 8
    assert values["test/calibrated/temperature"] == 1.3
    assert values["test/temperature/0.5/temperature"] == 0.5


def test_typed_fields_match_the_reference_metrics() -> None:
    result, data = _computed()
    for variant in result.variants:
        t = variant.variant.temperature
        reference = EnsembleMetrics(C, M)
        reference.update(*data["test"], temperature=t)
        expected = reference.compute()
        assert variant.scores.ece == pytest.approx(float(expected["ece"]))
        assert variant.scores.member_acc == pytest.approx(
            [float(expected[f"member_acc/{i}"]) for i in range(M)]
        )
        assert variant.reliability.ece == pytest.approx(variant.scores.ece, abs=1e-6)
        assert variant.size_curve.acc[-1] == pytest.approx(variant.scores.acc)
        shift = variant.sets[1]
        assert isinstance(shift, ShiftResult) and shift.name == "blur/1"
        probs = predictive_probs(data["shift"][0], t)
        acc = (probs.argmax(-1) == data["shift"][1]).double().mean()
        assert shift.scores.acc == pytest.approx(float(acc))
        ood = variant.sets[0]
        assert isinstance(ood, OODResult) and set(ood.scores) == {"msp", "entropy", "mi"}
        # selective prediction ranked by the confidence of the tempered predictive
        probs = predictive_probs(data["test"][0], t)
        confidence, correct = probs.max(-1).values, probs.argmax(-1) == data["test"][1]
        selective = variant.selective["msp"]
        assert selective.aurc == pytest.approx(float(aurc(confidence, correct)))
        assert selective.acc_at_coverage[0.95] == pytest.approx(
            float(accuracy_at_coverage(confidence, correct, 0.95))
        )
        assert len(selective.risk) == 40 and selective.coverage[-1] == 1.0
        assert selective.risk[-1] == pytest.approx(1 - variant.scores.acc)
        assert variant.selective["mi"].aurc != selective.aurc  # another ranking
    plain = result.variant("uncalibrated")
    assert plain is not None and plain.diversity is not None
    assert len(plain.diversity.jsd_matrix) == M
    assert all(v.diversity is None for v in result.variants[1:])  # diversity at T = 1 only
    assert [v.variant.temperature for v in result.sweep] == [0.5, 2.0]
    assert result.evaluation_sets == [
        {"name": "noise", "kind": "ood"},
        {"name": "blur/1", "kind": "shift"},
    ]


def test_duplicate_variants_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        TestEvaluation(C, M, 10, [Variant("sweep", 2.0), Variant("sweep", 2.0)])


def _hand_made_result() -> TestResult:
    """A result whose numbers are all distinct, to see which field lands where."""

    def scores(base: float) -> Scores:
        return Scores(base, base + 0.01, base + 0.02, base + 0.03, base + 0.04, (0.5, 0.6))

    reliability = ReliabilityCurve((1.0, 0.0, 3.0), (0.2, math.nan, 0.9), (0.0, math.nan, 1.0), 0.1)
    curve = SizeCurve(acc=(0.7, 0.8), ece=(0.2, 0.1), nll=(0.9, 0.6))
    diversity = Diversity(
        disagreement=0.3,
        jsd=0.05,
        jsd_per_sample=0.07,
        mi=0.02,
        disagreement_matrix=((0.0, 0.3), (0.3, 0.0)),
        jsd_matrix=((0.0, 0.05), (0.05, 0.0)),
        jsd_per_sample_matrix=((0.0, 0.07), (0.07, 0.0)),
    )
    sets = (OODResult("far", {"msp": Detection(0.9, 0.8)}), ShiftResult("blur", scores(0.4)))
    coverage = (0.25, 0.5, 0.75, 1.0)
    selective = {
        "msp": RiskCoverage("msp", 1 / 24, {0.9: 0.75}, coverage, (0.0, 0.0, 0.0, 0.25)),
        "mi": RiskCoverage("mi", 0.4, {0.9: 0.76}, coverage, (1.0, 0.5, 1 / 3, 0.25)),
    }
    plain = VariantResult(
        Variant("uncalibrated", 1.0), scores(0.8), reliability, curve, diversity, sets, selective
    )
    return TestResult(
        (
            plain,
            VariantResult(Variant("sweep", 2.0), scores(0.6), reliability, curve, None, sets, {}),
            VariantResult(Variant("sweep", 0.5), scores(0.7), reliability, curve, None, sets, {}),
        )
    )


def test_report_files_are_written_from_the_typed_result(tmp_path: Path) -> None:
    result = _hand_made_result()
    files = write_test_artifacts(tmp_path, result, plots=False)
    assert {p.name for p in files} == {
        "ensemble_size.csv", "ensemble_size.md", "diversity.json",
        "temperature_sweep.csv", "temperature_sweep.md", "risk_coverage.csv",
    }  # fmt: skip
    with (tmp_path / "risk_coverage.csv").open() as handle:
        risk = list(csv.DictReader(handle))
    assert list(risk[0]) == ["coverage", "risk", "risk_by_mi", "risk_oracle"]
    assert [float(r["coverage"]) for r in risk] == [0.25, 0.5, 0.75, 1.0]
    assert [float(r["risk_by_mi"]) for r in risk] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    # the oracle of 1 error in 4: the error answered last
    assert [float(r["risk_oracle"]) for r in risk] == [0.0, 0.0, 0.0, 0.25]
    values = result.log_values()
    assert values["test/aurc"] == 1 / 24 and values["test/acc_at_cov90"] == 0.75
    assert values["test/by_mi/aurc"] == 0.4 and values["test/by_mi/acc_at_cov90"] == 0.76
    assert not any("aurc" in k for k in values if k.startswith("test/temperature/"))
    with (tmp_path / "ensemble_size.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["k"]), float(r["acc"]), float(r["nll"])) for r in rows] == [
        (1, 0.7, 0.9),
        (2, 0.8, 0.6),
    ]
    matrices = json.loads((tmp_path / "diversity.json").read_text())
    assert matrices == {
        "disagreement_matrix": [[0, 0.3], [0.3, 0]],
        "jsd_matrix": [[0, 0.05], [0.05, 0]],
        "jsd_per_sample_matrix": [[0, 0.07], [0.07, 0]],
    }
    with (tmp_path / "temperature_sweep.csv").open() as handle:
        sweep = list(csv.DictReader(handle))
    assert list(sweep[0]) == ["temperature", "acc", "f1", "ece", "nll", "brier"]
    # sorted by temperature; each row holds its own variant's scores
    assert [float(r["temperature"]) for r in sweep] == [0.5, 2.0]
    assert [float(r["acc"]) for r in sweep] == [0.7, 0.6]
    assert float(sweep[0]["brier"]) == pytest.approx(0.74)


def test_report_figures_from_the_typed_result(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = write_test_artifacts(tmp_path, _hand_made_result(), plots=True)
    names = {p.name for p in files}
    assert {"reliability.png", "ensemble_size.png", "disagreement.png", "jsd.png"} <= names
    assert "risk_coverage.png" in names and (tmp_path / "risk_coverage.png").stat().st_size
    assert "reliability_calibrated.png" not in names  # no calibrated variant in this result


def test_documented_key_table_is_generated_from_the_code() -> None:
    doc = (REPO / "docs" / "evaluation.md").read_text()
    assert key_table() in doc, "regenerate the table with lorae.evaluation.result.key_table()"
    # every documented key family exists in a real result
    values = _computed()[0].log_values()
    for family in re.findall(r"^\| `([a-z_]+)/", key_table(), flags=re.MULTILINE):
        assert any(k.startswith(f"test/{family}/") for k in values), family


# ---------------------------------------------------------------------- the callback


class GivenLogits(EnsembleMethod):
    """A method whose input already is the member logits, ``(B, M, C) -> (M, B, C)``."""

    def __init__(self, num_classes: int, num_members: int) -> None:
        super().__init__()
        self.num_classes, self.num_members = num_classes, num_members
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Any) -> Tensor:
        return self.scale * x.transpose(0, 1)


def _dataset(n: int, seed: int, scale: float, target: Tensor | None = None) -> Dataset[Any]:
    logits = _logits(M, n, C, seed, scale)
    labels = predictive_probs(logits).argmax(-1) if target is None else target
    # every third label wrong, so that the model is overconfident and T > 1 is fitted
    if target is None:
        labels = torch.where(torch.arange(n) % 3 == 0, (labels + 1) % C, labels)
    return TensorDataset(logits.transpose(0, 1).contiguous(), labels)


class LogitsData(ClassificationDataModule):
    """Member logits as data: validation, test, one OOD and one shift set."""

    num_classes = C
    class_names = [str(c) for c in range(C)]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        return _dataset(40, 0, 4.0), _dataset(60, 1, 4.0), _dataset(50, 2, 4.0)

    def build_evaluation_sets(self) -> list[EvaluationSet]:
        return [
            EvaluationSet("noise", "ood", _dataset(30, 3, 0.3, torch.full((30,), 99))),
            EvaluationSet("blur/1", "shift", _dataset(20, 4, 2.0)),
        ]


def _trainer(root: Path, protocol: TestProtocol) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[protocol],
    )


def _attributes(module: nn.Module) -> dict[str, Any]:
    """The module's own attributes (Lightning's private bookkeeping aside) and children."""
    public = {k: id(v) for k, v in vars(module).items() if not k.startswith("_")}
    return {**public, "modules": dict(module.named_modules()).keys()}


def test_callback_runs_the_protocol_without_touching_the_module(tmp_path: Path) -> None:
    module = EnsembleClassifier(lambda c: GivenLogits(c, M), C)
    before = _attributes(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    protocol = TestProtocol("temperature", [0.5, 2.0], plots=False)
    trainer = _trainer(tmp_path, protocol)
    trainer.test(module, datamodule=LogitsData(batch_size=16))
    assert _attributes(module) == before  # nothing written into the module
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert not any(hasattr(module, a) for a in ("test_temperatures", "test_arrays"))
    result = protocol.result
    assert result is not None and protocol.calibration is not None
    assert protocol.calibration.temperature > 1.0  # overconfident by construction
    values = result.log_values()
    assert set(values) == _expected_keys(M)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert protocol.metrics_path == tmp_path / "metrics.json"
    assert set(report["metrics"]) == _expected_keys(M) | {"test/loss"}
    for key, value in values.items():  # logged (float32) values of the typed result
        assert report["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert list(report) == [
        "metrics", "checkpoint", "method", "compute", "calibration", "evaluation_sets", "files",
    ]  # fmt: skip
    assert report["checkpoint"] is None
    assert report["method"] == {"method": "GivenLogits", "num_members": M, "num_classes": C}
    assert report["calibration"]["temperature"] == protocol.calibration.temperature
    assert report["evaluation_sets"] == result.evaluation_sets
    assert report["compute"]["inference_samples_timed"] > 0
    assert "temperature_sweep.csv" in report["files"]


def test_second_test_starts_from_scratch(tmp_path: Path) -> None:
    """test_after_fit reuses the trainer: a second test must not accumulate the first one."""
    module = EnsembleClassifier(lambda c: GivenLogits(c, M), C)
    protocol = TestProtocol(plots=False)
    trainer = _trainer(tmp_path, protocol)
    datamodule = LogitsData(batch_size=16)
    trainer.test(module, datamodule=datamodule)
    first = protocol.result
    trainer.test(module, datamodule=datamodule)
    assert first is not None and protocol.result is not None and protocol.result is not first
    assert protocol.result.log_values() == first.log_values()
    assert protocol.result.variants[0].reliability.count == first.variants[0].reliability.count


def test_callback_rejects_a_module_it_cannot_read(tmp_path: Path) -> None:
    class Plain(pl.LightningModule):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            return None

    trainer = _trainer(tmp_path, TestProtocol(plots=False))
    loader = torch.utils.data.DataLoader(TensorDataset(torch.zeros(2, 1), torch.zeros(2)))
    with pytest.raises(ConfigError, match="num_classes, ece_bins and a method"):
        trainer.test(Plain(), dataloaders=loader)


def test_sweep_temperatures_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="positive"):
        TestProtocol(temperature_sweep=[1.0, 0.0])
