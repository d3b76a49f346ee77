"""Selective prediction (risk-coverage curve, AURC, accuracy at coverage) against independent
references: a brute-force numpy implementation written from the definition, hand-computed
examples, and torch-uncertainty's own ``AURC`` when it is installed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lorae.metrics import (
    COVERAGES,
    SelectivePrediction,
    accuracy_at_coverage,
    aurc,
    coverage_key,
    predictive_probs,
    risk_coverage_curve,
    selective_scores,
)

# ---------------------------------------------------------------- the reference, from scratch


def _curve_of_order(errors: np.ndarray) -> np.ndarray:
    """``r_k``, the error rate of the first ``k`` samples of one fixed order."""
    return np.cumsum(errors) / np.arange(1, len(errors) + 1)


def _aurc_of_order(errors: np.ndarray) -> float:
    """torch-uncertainty's AURC of one order: trapezoids over ``(k / N, r_k)``, ``k = 1..N``,
    divided by ``1 - 1/N``."""
    n = len(errors)
    risk = _curve_of_order(errors)
    coverage = np.arange(1, n + 1) / n
    area = sum((coverage[i + 1] - coverage[i]) * (risk[i] + risk[i + 1]) / 2 for i in range(n - 1))
    return area / (1 - 1 / n)


def _brute_force(score: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean risk curve and AURC over *every* order of the samples that sorts the scores in
    non-increasing order (each order of the tied samples once, with equal weight)."""
    orders = [
        p
        for p in itertools.permutations(range(len(score)))
        if all(score[p[i]] >= score[p[i + 1]] for i in range(len(p) - 1))
    ]
    errors = [(~correct[list(p)]).astype(np.float64) for p in orders]
    curve = np.mean([_curve_of_order(e) for e in errors], axis=0)
    area = float(np.mean([_aurc_of_order(e) for e in errors]))
    return curve, area


def _tensors(score: list[float], correct: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(score), torch.tensor(correct, dtype=torch.bool)


# ---------------------------------------------------------------- hand-computed examples


def test_torch_uncertainty_docstring_example() -> None:
    # probs [[.7,.3],[.6,.4],[.8,.2]], targets [0,1,0]: ranked .8 (right), .7 (right), .6
    # (wrong): r = (0, 0, 1/3), AURC = 1/2 * (0 + 1/6) = 1/12 (0.0833 in its docstring).
    assert float(aurc(*_tensors([0.7, 0.6, 0.8], [1, 0, 1]))) == pytest.approx(1 / 12)


def test_perfect_ranking_gives_the_minimum() -> None:
    # one error out of 4, ranked last: r = (0, 0, 0, 1/4) -> 1/3 * (0 + 0 + 1/8) = 1/24
    score, correct = _tensors([4.0, 3.0, 2.0, 1.0], [1, 1, 1, 0])
    coverage, risk = risk_coverage_curve(score, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == [0.0, 0.0, 0.0, 0.25]
    assert float(aurc(score, correct)) == pytest.approx(1 / 24)


def test_perfectly_wrong_ranking() -> None:
    # the error ranked first: r = (1, 1/2, 1/3, 1/4)
    # -> 1/3 * ((1 + 1/2) + (1/2 + 1/3) + (1/3 + 1/4)) / 2 = 35/72
    score, correct = _tensors([4.0, 3.0, 2.0, 1.0], [0, 1, 1, 1])
    assert float(aurc(score, correct)) == pytest.approx(35 / 72)


def test_random_ranking_gives_the_error_rate() -> None:
    # all scores tied: every order equally likely, E[r_k] = E / N for every k
    score, correct = _tensors([0.5] * 8, [1, 0, 1, 1, 0, 1, 1, 1])
    _, risk = risk_coverage_curve(score, correct)
    torch.testing.assert_close(risk, torch.full((8,), 0.25, dtype=torch.float64))
    assert float(aurc(score, correct)) == pytest.approx(0.25)
    assert float(accuracy_at_coverage(score, correct, 0.5)) == pytest.approx(0.75)


def test_all_correct_and_all_wrong() -> None:
    score = torch.rand(10, generator=torch.Generator().manual_seed(0))
    assert float(aurc(score, torch.ones(10, dtype=torch.bool))) == 0.0
    assert float(aurc(score, torch.zeros(10, dtype=torch.bool))) == 1.0


@pytest.mark.parametrize(("n", "errors"), [(5, 2), (37, 11), (200, 0), (200, 200)])
def test_perfect_ranking_closed_form_and_it_is_the_minimum(n: int, errors: int) -> None:
    correct = torch.arange(n) < n - errors  # every error after every correct sample
    score = -torch.arange(n, dtype=torch.float32)
    k = np.arange(1, n + 1)
    oracle = np.maximum(0, k - (n - errors)) / k
    expected = (oracle[:-1] + oracle[1:]).sum() / (2 * (n - 1))
    assert float(aurc(score, correct)) == pytest.approx(expected, abs=1e-12)
    generator = torch.Generator().manual_seed(n)
    for _ in range(5):  # any other ranking of the same predictions does no better
        shuffled = score[torch.randperm(n, generator=generator)]
        assert float(aurc(shuffled, correct)) >= expected - 1e-12


def test_perfect_ranking_tends_to_the_known_limit() -> None:
    # Geifman et al. 2019: optimal AURC -> rho + (1 - rho) ln(1 - rho) as N grows
    n, rho = 100_000, 0.2
    correct = torch.arange(n) < round(n * (1 - rho))
    score = -torch.arange(n, dtype=torch.float64)
    limit = rho + (1 - rho) * math.log(1 - rho)
    assert float(aurc(score, correct)) == pytest.approx(limit, abs=1e-3)


def test_accuracy_at_coverage_counts_ceil_of_cn_samples() -> None:
    # 10 samples, the 2 least confident wrong: the 9 most confident hold 1 error
    score = torch.arange(10, 0, -1, dtype=torch.float32)
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert float(accuracy_at_coverage(score, correct, 0.9)) == pytest.approx(8 / 9)
    assert float(accuracy_at_coverage(score, correct, 0.8)) == 1.0
    assert float(accuracy_at_coverage(score, correct, 0.81)) == pytest.approx(8 / 9)  # ceil
    assert float(accuracy_at_coverage(score, correct, 1.0)) == pytest.approx(0.8)
    # 0.07 * 100 = 7.000000000000001 in floating point: still 7 samples, not 8
    many = torch.arange(100, 0, -1, dtype=torch.float32)
    right = torch.arange(100) != 7  # the 8th most confident is wrong
    assert float(accuracy_at_coverage(many, right, 0.07)) == 1.0
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(many, right, 0.0)
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(many, right, 1.5)


def test_degenerate_sizes_and_bad_input() -> None:
    empty = torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    assert math.isnan(float(aurc(*empty)))
    assert math.isnan(float(accuracy_at_coverage(*empty, 0.9)))
    one = torch.ones(1), torch.ones(1, dtype=torch.bool)
    assert math.isnan(float(aurc(*one)))  # as torch-uncertainty: N < 2 has no area
    assert float(accuracy_at_coverage(*one, 0.9)) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        aurc(torch.tensor([0.5, float("nan")]), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        aurc(torch.ones(3), torch.ones(2, dtype=torch.bool))


# ---------------------------------------------------------------- against the brute force


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_brute_force_mean_over_orders_of_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    score = rng.choice([0.2, 0.5, 0.9, 1.0], size=n).astype(np.float32)  # many ties
    correct = rng.random(n) < 0.6
    curve, area = _brute_force(score, correct)
    _, risk = risk_coverage_curve(torch.from_numpy(score), torch.from_numpy(correct))
    np.testing.assert_allclose(risk.numpy(), curve, atol=1e-12)
    assert float(aurc(torch.from_numpy(score), torch.from_numpy(correct))) == pytest.approx(
        area, abs=1e-12
    )
    for coverage in (0.3, 0.5, 0.9, 1.0):
        k = math.ceil(coverage * n)
        expected = 1 - curve[k - 1]
        found = accuracy_at_coverage(torch.from_numpy(score), torch.from_numpy(correct), coverage)
        assert float(found) == pytest.approx(expected, abs=1e-12)


def test_without_ties_equals_one_sorted_order() -> None:
    rng = np.random.default_rng(7)
    score = rng.random(500)
    correct = rng.random(500) < 0.7
    errors = (~correct[np.argsort(-score)]).astype(np.float64)
    found = aurc(torch.from_numpy(score), torch.from_numpy(correct))
    assert float(found) == pytest.approx(_aurc_of_order(errors), abs=1e-12)


def test_result_does_not_depend_on_the_sample_order() -> None:
    """As under DDP, where the gathered order differs: ties are resolved by the average."""
    generator = torch.Generator().manual_seed(3)
    score = torch.randint(0, 5, (300,), generator=generator).float() / 4  # heavy ties
    correct = torch.rand(300, generator=generator) < 0.5
    reference = risk_coverage_curve(score, correct)[1]
    for _ in range(3):
        perm = torch.randperm(300, generator=generator)
        torch.testing.assert_close(risk_coverage_curve(score[perm], correct[perm])[1], reference)


# ---------------------------------------------------------------- the torchmetrics class


def _logits(m: int, b: int, c: int, seed: int) -> torch.Tensor:
    return 2.0 * torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_metric_accumulates_batches_and_ranks_by_predictive_confidence(
    temperature: float,
) -> None:
    logits, target = _logits(4, 90, 5, 0), torch.randint(0, 5, (90,))
    metric = SelectivePrediction("msp", temperature)
    for chunk in (slice(0, 33), slice(33, 34), slice(34, 90)):
        metric.update(logits[:, chunk], target[chunk])
    values = metric.compute()
    probs = predictive_probs(logits.double(), temperature).numpy()
    confidence, correct = probs.max(-1), probs.argmax(-1) == target.numpy()
    errors = (~correct[np.argsort(-confidence)]).astype(np.float64)
    assert float(values["aurc"]) == pytest.approx(_aurc_of_order(errors), abs=1e-6)
    np.testing.assert_allclose(values["risk"].numpy(), _curve_of_order(errors), atol=1e-6)
    np.testing.assert_allclose(values["coverage"].numpy(), np.arange(1, 91) / 90)
    for coverage in COVERAGES:
        k = math.ceil(coverage * 90)
        expected = 1 - _curve_of_order(errors)[k - 1]
        assert float(values[coverage_key(coverage)]) == pytest.approx(expected, abs=1e-6)
    assert set(values) == {"coverage", "risk", "aurc", "acc_at_cov90", "acc_at_cov95",
                           "acc_at_cov99"}  # fmt: skip


def test_mutual_information_ranking() -> None:
    logits, target = _logits(3, 60, 4, 1), torch.randint(0, 4, (60,))
    metric = SelectivePrediction("mi")
    metric.update(logits, target)
    score, correct = selective_scores(logits, target, "mi")
    assert float(metric.compute()["aurc"]) == pytest.approx(float(aurc(score, correct)))
    # a single member has no epistemic part: every score ties, AURC = the error rate
    single = SelectivePrediction("mi")
    single.update(logits[:1], target)
    error_rate = float((predictive_probs(logits[:1]).argmax(-1) != target).double().mean())
    assert float(single.compute()["aurc"]) == pytest.approx(error_rate, abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_metric_rejects_bad_coverages_and_resets() -> None:
    with pytest.raises(ValueError, match="coverage"):
        SelectivePrediction(coverages=(0.9, 1.2))
    metric = SelectivePrediction()
    metric.update(_logits(2, 10, 3, 2), torch.zeros(10, dtype=torch.long))
    metric.reset()
    values = metric.compute()
    assert values["risk"].shape == (0,) and math.isnan(float(values["aurc"]))


def test_two_process_gather_equals_one_process() -> None:
    """The DDP path of ``compute``: each process's states are gathered (torchmetrics replaces
    the list state by one concatenated tensor). Rank 0 holds the even samples, rank 1 the odd
    ones, so the gathered order differs from the single-process order, with ties."""
    logits, target = _logits(1, 64, 3, 4).round(decimals=0), torch.randint(0, 3, (64,))
    single = SelectivePrediction()
    single.update(logits, target)
    other = SelectivePrediction()
    other.update(logits[:, 1::2], target[1::2])
    gathered = {
        torch.bool: torch.cat(other.correct),
        torch.float32: torch.cat(other.score),
    }

    def gather(x: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return [x, gathered[x.dtype]]  # [rank 0, rank 1]

    rank0 = SelectivePrediction(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    rank0.update(logits[:, ::2], target[::2])
    expected, found = single.compute(), rank0.compute()
    assert len(set(selective_scores(logits, target)[0].tolist())) < 64  # there are ties
    assert found["risk"].shape == (64,)
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, msg=key)


def test_coverage_keys() -> None:
    assert [coverage_key(c) for c in COVERAGES] == ["acc_at_cov90", "acc_at_cov95", "acc_at_cov99"]


# ---------------------------------------------------------------- torch-uncertainty itself


def test_aurc_equals_torch_uncertainty_on_random_data() -> None:
    tu = pytest.importorskip("torch_uncertainty.metrics.classification")
    generator = torch.Generator().manual_seed(11)
    for n, c in ((2, 3), (17, 2), (500, 10)):
        probs = torch.softmax(3 * torch.randn(n, c, generator=generator), dim=-1)
        target = torch.randint(0, c, (n,), generator=generator)
        theirs = tu.AURC()
        theirs.update(probs, target)
        correct = probs.argmax(-1) == target
        confidence = probs.max(-1).values
        assert len(set(confidence.tolist())) == n  # no ties: the definitions coincide
        ours = aurc(confidence, correct)
        assert float(ours) == pytest.approx(float(theirs.compute()), abs=1e-6), n
        risk_at = tu.RiskAtxCov(0.8)
        risk_at.update(probs, target)
        ours_acc = accuracy_at_coverage(confidence, correct, 0.8)
        assert float(ours_acc) == pytest.approx(1 - float(risk_at.compute()), abs=1e-6), n
