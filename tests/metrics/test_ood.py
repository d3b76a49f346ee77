"""OOD scores and AUROC/AUPRC (paper section 3) and the per-set test evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from lorae.evaluation.protocol import TestEvaluation
from lorae.evaluation.result import OODResult, ShiftResult, Variant
from lorae.metrics import EnsembleMetrics, OODMetrics, ood_scores
from lorae.metrics.functional import mutual_information, predictive_entropy, predictive_probs


def _logits(m: int, b: int, c: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed))


def test_scores_are_higher_for_confident_samples() -> None:
    logits = _logits(3, 40, 4, seed=0)
    scores = ood_scores(logits)
    probs = predictive_probs(logits)
    torch.testing.assert_close(scores["msp"], probs.max(-1).values)
    torch.testing.assert_close(scores["entropy"], -predictive_entropy(probs.log()))
    torch.testing.assert_close(scores["mi"], -mutual_information(logits))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_auroc_and_auprc_equal_scikit_learn(temperature: float) -> None:
    in_logits = _logits(3, 150, 5, seed=1, scale=3.0)  # confident: in-distribution
    ood_logits = _logits(3, 70, 5, seed=2, scale=1.0)
    metric = OODMetrics(temperature)
    for lo in range(0, 150, 64):
        metric.update(in_logits[:, lo : lo + 64], in_distribution=True)
    metric.update(ood_logits[:, :30], in_distribution=False)
    metric.update(ood_logits[:, 30:], in_distribution=False)
    result = metric.compute()
    labels = np.r_[np.ones(150), np.zeros(70)]
    in_scores, out_scores = ood_scores(in_logits, temperature), ood_scores(ood_logits, temperature)
    for name in ("msp", "entropy", "mi"):
        values = torch.cat([in_scores[name], out_scores[name]]).numpy()
        assert float(result[f"{name}/auroc"]) == pytest.approx(
            roc_auc_score(labels, values), abs=1e-6
        )
        assert float(result[f"{name}/auprc"]) == pytest.approx(
            average_precision_score(labels, values), abs=1e-6
        )
    assert float(result["msp/auroc"]) > 0.7  # the sets are separable; the sign is right


def test_single_member_mutual_information_is_uninformative() -> None:
    metric = OODMetrics()
    metric.update(_logits(1, 20, 3, seed=3, scale=3.0), True)
    metric.update(_logits(1, 20, 3, seed=4, scale=0.5), False)
    assert float(metric.compute()["mi/auroc"]) == pytest.approx(0.5)


def test_test_evaluation_scores_every_set() -> None:
    num_classes, m = 4, 2
    variants = [Variant("uncalibrated", 1.0), Variant("calibrated", 1.5)]
    evaluation = TestEvaluation(num_classes, m, 10, variants, [("far", "ood"), ("blur/1", "shift")])
    test = _logits(m, 60, num_classes, seed=5, scale=3.0), torch.randint(0, 4, (60,))
    far = _logits(m, 30, num_classes, seed=6, scale=0.5), torch.full((30,), 77)  # bad targets
    shift = _logits(m, 40, num_classes, seed=7), torch.randint(0, 4, (40,))
    evaluation.update(*test, dataloader_idx=0)
    evaluation.update(*far, dataloader_idx=1)
    evaluation.update(*shift, dataloader_idx=2)
    result = evaluation.compute()
    for variant, temperature in zip(result.variants, (1.0, 1.5), strict=True):
        assert variant.variant.temperature == temperature
        far_result, shift_result = variant.sets
        assert isinstance(far_result, OODResult) and isinstance(shift_result, ShiftResult)
        reference = EnsembleMetrics(num_classes, m)
        reference.update(*shift, temperature=temperature)
        expected = reference.compute()
        for name, value in shift_result.scores.items(members=False):
            assert value == pytest.approx(float(expected[name]))
        ood = OODMetrics(temperature)
        ood.update(test[0], True)
        ood.update(far[0], False)
        found = ood.compute()
        for score, detection in far_result.scores.items():
            assert detection.auroc == pytest.approx(float(found[f"{score}/auroc"]))
            assert detection.auprc == pytest.approx(float(found[f"{score}/auprc"]))
        reference = EnsembleMetrics(num_classes, m)
        reference.update(*test, temperature=temperature)
        assert variant.scores.ece == pytest.approx(float(reference.compute()["ece"]))
        assert variant.reliability.ece == pytest.approx(variant.scores.ece, abs=1e-6)
    values = result.log_values()
    assert values["test/calibrated/temperature"] == 1.5
    assert values["test/calibrated/ood/far/msp/auroc"] == result.variants[1].sets[0].scores[
        "msp"
    ].auroc  # fmt: skip
    assert "test/diversity/jsd" in values and "test/calibrated/diversity/jsd" not in values
    diversity = result.variants[0].diversity
    assert diversity is not None and len(diversity.jsd_matrix) == m
    assert all(len(row) == m for row in diversity.jsd_matrix)
