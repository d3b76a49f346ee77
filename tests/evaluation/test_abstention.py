"""Abstention thresholds (:mod:`lorae.evaluation.abstention`): the binomial p-value, the
fixed-sequence rule, the conformal coverage quantile, and the finite-sample guarantees
measured on synthetic data whose true selective risk is known in closed form."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lorae.checkpoints.calibration import CalibrationRecord
from lorae.errors import ConfigError
from lorae.evaluation.abstention import (
    RiskNotCertifiableError,
    apply_calibration,
    binomial_cdf,
    certainty,
    coverage_threshold,
    fixed_sequence_rejections,
    minimum_certifiable_risk,
    risk_controlling_threshold,
    score_values,
    selective_risk_p_values,
)
from lorae.metrics.functional import mutual_information, predictive_log_probs

GAMMA = 2.0


def _draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A calibrated binary classifier: confidence ``c = 1 - V / 2`` with ``V = U^GAMMA``, and
    its prediction is wrong with probability ``1 - c``. The true selective risk of "accept iff
    c >= lam" is then ``R(lam) = E[V / 2 | V <= 2 (1 - lam)] = (1 - lam) / (GAMMA + 1)`` and its
    coverage ``P(c >= lam) = (2 (1 - lam))^(1 / GAMMA)``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    v = u**GAMMA
    wrong = torch.rand(n, generator=generator, dtype=torch.float64) < v / 2
    return 1 - v / 2, wrong


def _true_risk(threshold: float) -> float:
    return (1 - threshold) / (GAMMA + 1)


def _true_coverage(threshold: float) -> float:
    return min(1.0, (2 * (1 - threshold)) ** (1 / GAMMA))


def test_binomial_cdf_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    n = torch.tensor([0, 1, 5, 10, 37, 100, 1000, 20000, 7, 3])
    k = torch.tensor([0, 0, 2, 10, 4, 3, 50, 1000, 9, -1])
    for p in (1e-3, 0.05, 0.3, 0.9):
        expected = torch.tensor(stats.binom.cdf(k.numpy(), n.numpy(), p), dtype=torch.float64)
        torch.testing.assert_close(binomial_cdf(k, n, p), expected, rtol=1e-9, atol=1e-300)


def test_binomial_cdf_exact_small_cases_and_edges() -> None:
    # P(Bin(3, 1/2) <= 1) = (1 + 3) / 8; P(Bin(n, p) <= 0) = (1 - p)^n
    assert float(binomial_cdf(torch.tensor(1), torch.tensor(3), 0.5)) == pytest.approx(0.5)
    value = binomial_cdf(torch.tensor(0), torch.tensor(45), 0.05)
    assert float(value) == pytest.approx(0.95**45, rel=1e-12)
    assert float(binomial_cdf(torch.tensor(-1), torch.tensor(4), 0.3)) == 0.0
    assert float(binomial_cdf(torch.tensor(4), torch.tensor(4), 0.3)) == pytest.approx(1.0)
    assert float(binomial_cdf(torch.tensor(0), torch.tensor(9), 0.0)) == 1.0
    assert float(binomial_cdf(torch.tensor(8), torch.tensor(9), 1.0)) == 0.0
    assert float(binomial_cdf(torch.tensor(9), torch.tensor(9), 1.0)) == 1.0
    with pytest.raises(ValueError):
        binomial_cdf(torch.tensor(1), torch.tensor(2), 1.5)


def test_p_values_in_blocks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    n = torch.arange(1, 301)
    k = (n * 0.07).floor().long()
    whole = selective_risk_p_values(n, k, 0.05)
    monkeypatch.setattr("lorae.evaluation.abstention._BLOCK", 64)  # many small blocks
    torch.testing.assert_close(selective_risk_p_values(n, k, 0.05), whole)
    assert float(selective_risk_p_values(torch.tensor([0]), torch.tensor([0]), 0.1)[0]) == 1.0


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    p = torch.tensor([0.01, 0.05, 0.2, 0.001, 0.0])
    assert fixed_sequence_rejections(p, 0.1) == 2  # H_4, H_5 are never reached
    assert fixed_sequence_rejections(p, 0.2) == 5  # p <= delta rejects
    assert fixed_sequence_rejections(torch.tensor([0.5, 0.0]), 0.1) == 0
    assert fixed_sequence_rejections(torch.tensor([]), 0.1) == 0


def test_risk_threshold_by_hand() -> None:
    # 60 samples with distinct scores; the best 50 are right, then errors every other sample.
    scores = torch.linspace(1.0, 0.0, 60, dtype=torch.float64)
    wrong = torch.zeros(60, dtype=torch.bool)
    wrong[50::2] = True
    alpha, delta = 0.1, 0.1  # n_min = ceil(log 0.1 / log 0.9) = 22
    chosen = risk_controlling_threshold(scores, wrong, alpha, delta)
    # Reference: the rule written out with scipy-free exact sums.
    expected_last = None
    for n in range(22, 61):
        k = int(wrong[:n].sum())
        p = sum(math.comb(n, i) * alpha**i * (1 - alpha) ** (n - i) for i in range(k + 1))
        if p > delta:
            break
        expected_last = n
    assert expected_last is not None and expected_last < 60
    assert chosen.num_accepted == expected_last
    assert chosen.threshold == float(scores[expected_last - 1])
    assert chosen.num_errors == int(wrong[:expected_last].sum())
    assert chosen.p_value is not None and chosen.p_value <= delta
    assert chosen.coverage == expected_last / 60


def test_ties_are_accepted_or_rejected_together() -> None:
    scores = torch.tensor([0.9] * 30 + [0.5] * 30, dtype=torch.float64)
    wrong = torch.zeros(60, dtype=torch.bool)
    wrong[30:40] = True
    chosen = risk_controlling_threshold(scores, wrong, 0.1, 0.1)
    assert chosen.threshold == 0.9 and chosen.num_accepted == 30


def test_a_too_low_target_risk_says_what_can_be_certified() -> None:
    scores = torch.linspace(1, 0, 40, dtype=torch.float64)
    wrong = torch.zeros(40, dtype=torch.bool)
    floor = minimum_certifiable_risk(40, 0.1)
    assert floor == pytest.approx(1 - 0.1 ** (1 / 40))
    with pytest.raises(RiskNotCertifiableError) as info:
        risk_controlling_threshold(scores, wrong, floor * 0.9, 0.1)
    message = str(info.value)
    assert f"{floor:.4g}" in message and "40 validation samples" in message
    assert "larger validation split" in message and "--target_risk" in message
    # Just above the floor, the same data pass with everything accepted.
    assert risk_controlling_threshold(scores, wrong, floor * 1.01, 0.1).num_accepted == 40
    # With an error among the first, the message gives the smallest target that passes here,
    # and that target does pass: the 6th most certain is wrong, so only a sequence that starts
    # (n_min <= 5) and rejects before it passes: alpha >= 1 - 0.1^(1/5) = 0.369.
    wrong[5] = True
    with pytest.raises(RiskNotCertifiableError) as info:
        risk_controlling_threshold(scores, wrong, 0.06, 0.1)
    found = re.search(r"smallest target risk that passes is about (0\.[0-9]+)", str(info.value))
    assert found is not None, str(info.value)
    passing = float(found.group(1))
    assert passing == pytest.approx(1 - 0.1 ** (1 / 5), abs=1e-3)
    assert risk_controlling_threshold(scores, wrong, passing * 1.001, 0.1).num_accepted > 0
    # Errors at the very top stop every test at its start.
    wrong[:3] = True
    with pytest.raises(RiskNotCertifiableError, match="no target risk passes"):
        risk_controlling_threshold(scores, wrong, 0.05, 0.1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0])
def test_levels_out_of_range(bad: float) -> None:
    scores, wrong = torch.rand(10, dtype=torch.float64), torch.zeros(10, dtype=torch.bool)
    with pytest.raises(ConfigError):
        risk_controlling_threshold(scores, wrong, bad, 0.1)
    with pytest.raises(ConfigError):
        risk_controlling_threshold(scores, wrong, 0.1, bad)
    with pytest.raises(ConfigError):
        coverage_threshold(scores, wrong, bad)


def test_coverage_quantile() -> None:
    scores = torch.arange(9, 0, -1, dtype=torch.float64)  # 9, 8, ..., 1
    wrong = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    chosen = coverage_threshold(scores, wrong, 0.5)  # k = ceil(0.5 * 10) = 5
    assert chosen.threshold == 5.0 and chosen.num_accepted == 5 and chosen.num_errors == 1
    assert coverage_threshold(scores, wrong, 0.9).threshold == 1.0  # k = 9
    everything = coverage_threshold(scores, wrong, 0.95)  # k = 10 > n: accept all
    assert everything.threshold == -math.inf and everything.coverage == 1.0
    assert coverage_threshold(scores, wrong, 0.4).num_accepted == 4  # 0.4 * 10 is exactly 4


def test_coverage_guarantee_holds_on_average() -> None:
    """E[coverage of lam_hat] = k / (n + 1) >= C for exchangeable continuous scores: uniform
    scores make the true coverage of a threshold ``1 - lam``."""
    generator = torch.Generator().manual_seed(1)
    n, target, reps = 49, 0.83, 4000
    scores = torch.rand(reps, n, generator=generator, dtype=torch.float64)
    k = math.ceil(target * (n + 1))  # 42
    thresholds = [coverage_threshold(s, s < 0, target).threshold for s in scores[:200]]
    assert thresholds == scores[:200].sort(dim=1, descending=True).values[:, k - 1].tolist()
    kth = scores.sort(dim=1, descending=True).values[:, k - 1]
    mean_coverage = float((1 - kth).mean())
    assert abs(mean_coverage - k / (n + 1)) < 4 * math.sqrt(k / (n + 1) / reps)
    assert mean_coverage >= target - 0.005


def test_the_risk_guarantee_holds_over_validation_draws() -> None:
    """Over 300 independent validation sets of 500 samples, the chosen threshold's true
    selective risk exceeds alpha in at most a share delta of them (plus binomial slack), and
    the coverage is far from 0 (the guarantee is not bought by abstaining on everything)."""
    generator = torch.Generator().manual_seed(0)
    alpha, delta, reps = 0.1, 0.1, 300
    violations, failures, coverages = 0, 0, []
    for _ in range(reps):
        scores, wrong = _draw(500, generator)
        try:
            chosen = risk_controlling_threshold(scores, wrong, alpha, delta)
        except RiskNotCertifiableError:
            failures += 1  # no threshold: no violation, coverage 0
            coverages.append(0.0)
            continue
        violations += _true_risk(chosen.threshold) > alpha
        coverages.append(_true_coverage(chosen.threshold))
    rate = violations / reps
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    print(f"LTT violation rate {rate:.3f} (delta {delta}), no threshold {failures / reps:.3f}")
    assert rate <= delta + slack
    best = _true_coverage(1 - alpha * (GAMMA + 1))  # the oracle threshold's coverage: 0.775
    assert sum(coverages) / reps > 0.75 * best
    assert failures / reps < 0.05


def test_the_guarantee_test_catches_a_rule_without_one() -> None:
    """The same check rejects the naive rule "the least conservative threshold whose
    validation risk is <= alpha" (no finite-sample correction): it violates in about half of
    the draws, so the test above can fail."""
    generator = torch.Generator().manual_seed(0)
    alpha, reps, violations = 0.1, 300, 0
    for _ in range(reps):
        scores, wrong = _draw(500, generator)
        order = scores.argsort(descending=True)
        risk = wrong[order].double().cumsum(0) / torch.arange(1, 501)
        last = int(torch.nonzero(risk <= alpha)[-1, 0])
        violations += _true_risk(float(scores[order][last])) > alpha
    assert violations / reps > 0.1 + 3 * math.sqrt(0.09 / reps)


def test_scores_and_apply_calibration() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(4, 20, 5, generator=generator)
    t = 1.7
    probs = predictive_log_probs(logits.double(), t).exp()
    confidence = score_values(logits, t, "confidence")
    torch.testing.assert_close(confidence, probs.max(-1).values)
    entropy = score_values(logits, t, "entropy")
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    mi = score_values(logits, t, "mutual_information")
    torch.testing.assert_close(mi, mutual_information(logits.double(), t))
    assert torch.equal(certainty(entropy, "entropy"), -entropy)

    cut = float(confidence.median())
    record = CalibrationRecord(t, 1.0, 0.9, 20, "confidence", threshold=cut)
    out = apply_calibration(logits, record)
    torch.testing.assert_close(out["calibrated_probs"], probs)
    assert torch.equal(out["abstain"], (confidence < cut).long())
    record = CalibrationRecord(t, 1.0, 0.9, 20, "entropy", threshold=float(entropy.median()))
    assert torch.equal(
        apply_calibration(logits, record)["abstain"], (entropy > entropy.median()).long()
    )
    no_threshold = apply_calibration(logits, CalibrationRecord(t, 1.0, 0.9, 20))
    assert set(no_threshold) == {"calibrated_probs"}
