"""Jensen-Shannon diversity as the paper measures it (section 4) and per sample, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

from lorae.metrics.diversity import (
    DiversityMetrics,
    aggregated_probs,
    jensen_shannon_matrix,
    per_sample_jensen_shannon_matrix,
)

#: members x samples x classes. Members 0 and 1 disagree on every sample but predict the same
#: class frequencies (both aggregate to [0.55, 0.45]); member 2 aggregates to [0.85, 0.15].
PROBS = np.array(
    [
        [[0.9, 0.1], [0.2, 0.8]],
        [[0.2, 0.8], [0.9, 0.1]],
        [[0.9, 0.1], [0.8, 0.2]],
    ]
)
LOGITS = torch.tensor(np.log(PROBS))


def scipy_jsd(p: np.ndarray, q: np.ndarray) -> float:
    """scipy gives the Jensen-Shannon *distance*; the divergence is its square."""
    return float(jensenshannon(p, q, base=2) ** 2)


def test_aggregated_jsd_is_the_papers_statistic_against_scipy() -> None:
    aggregated = PROBS.mean(axis=1)
    np.testing.assert_allclose(aggregated_probs(LOGITS).numpy(), aggregated, atol=1e-12)
    expected = np.array(
        [[scipy_jsd(aggregated[i], aggregated[j]) for j in range(3)] for i in range(3)]
    )
    np.testing.assert_allclose(jensen_shannon_matrix(LOGITS).numpy(), expected, atol=1e-12)
    # the two disagreeing members have identical class frequencies: no aggregated divergence
    assert jensen_shannon_matrix(LOGITS)[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert expected[0, 2] > 0.01


def test_per_sample_jsd_against_scipy() -> None:
    expected = np.array(
        [[np.mean([scipy_jsd(PROBS[i, n], PROBS[j, n]) for n in range(2)]) for j in range(3)]
         for i in range(3)]
    )  # fmt: skip
    np.testing.assert_allclose(
        per_sample_jensen_shannon_matrix(LOGITS).numpy(), expected, atol=1e-12
    )
    assert expected[0, 1] > 0.3  # per sample, members 0 and 1 are far apart


def test_the_metric_reports_both_on_the_hand_made_case() -> None:
    metric = DiversityMetrics(3, 2)
    metric.update(LOGITS[:, :1].float())  # two batches: the aggregate spans both
    metric.update(LOGITS[:, 1:].float())
    result = metric.compute()
    aggregated = PROBS.mean(axis=1)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    paper = np.mean([scipy_jsd(aggregated[i], aggregated[j]) for i, j in pairs])
    per_sample = np.mean(
        [np.mean([scipy_jsd(PROBS[i, n], PROBS[j, n]) for n in range(2)]) for i, j in pairs]
    )
    assert float(result["jsd"]) == pytest.approx(paper, abs=1e-6)
    assert float(result["jsd_per_sample"]) == pytest.approx(per_sample, abs=1e-6)
    assert float(result["jsd"]) < float(result["jsd_per_sample"])
    assert result["jsd_matrix"][0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_random_logits_match_scipy_with_a_temperature() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 20, 5, generator=generator, dtype=torch.float64)
    probs = softmax(logits.numpy() / 2.0, axis=-1)
    aggregated = probs.mean(axis=1)
    expected = np.array(
        [[scipy_jsd(aggregated[i], aggregated[j]) for j in range(3)] for i in range(3)]
    )
    np.testing.assert_allclose(jensen_shannon_matrix(logits, 2.0).numpy(), expected, atol=1e-12)
    per_sample = np.array(
        [[np.mean([scipy_jsd(probs[i, n], probs[j, n]) for n in range(20)]) for j in range(3)]
         for i in range(3)]
    )  # fmt: skip
    np.testing.assert_allclose(
        per_sample_jensen_shannon_matrix(logits, 2.0).numpy(), per_sample, atol=1e-12
    )


def test_zero_probabilities_and_disjoint_supports() -> None:
    # softmax of -inf logits gives exact zeros; disjoint one-hot members have JSD exactly 1 bit
    logits = torch.tensor([[[0.0, -float("inf")]], [[-float("inf"), 0.0]]])
    assert per_sample_jensen_shannon_matrix(logits)[0, 1].item() == pytest.approx(1.0)
    assert jensen_shannon_matrix(logits)[0, 1].item() == pytest.approx(1.0)
