"""Tests of lorae.metrics against independent references (naive float64, numpy, scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, log_loss
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities.data import dim_zero_sum

from lorae.metrics import (
    BrierScore,
    EnsembleMetrics,
    MemberAccuracy,
    NegativeLogLikelihood,
    brier_score,
    expected_calibration_error,
    expected_member_entropy,
    member_cross_entropy,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    predictive_log_probs,
    predictive_probs,
)

MEMBERS = [1, 4]
CLASSES = [2, 5, 10]
SAMPLES = [1, 33]


def _logits(m: int, b: int, c: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, b, c, generator=gen, dtype=torch.float64)


def _target(b: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, c, (b,), generator=gen)


def _naive_predictive(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Mean over members of softmax(logits / T), in float64 numpy."""
    z = logits.double().numpy() / temperature
    z = z - z.max(axis=-1, keepdims=True)
    member_probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return member_probs.mean(axis=0)


def _numpy_ece(probs: np.ndarray, target: np.ndarray, n_bins: int) -> float:
    """Bins [k/n, (k+1)/n) for k < n, plus a bin of its own for confidence exactly 1."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == target).astype(np.float64)
    masks = [(conf >= k / n_bins) & (conf < (k + 1) / n_bins) for k in range(n_bins)]
    masks.append(conf == 1.0)
    ece = 0.0
    for mask in masks:
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return ece


def _torchmetrics_ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int) -> float:
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probs, target))


# --------------------------------------------------------------------------- predictive


@pytest.mark.parametrize("m", MEMBERS)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("b", SAMPLES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_predictive_log_probs_matches_naive_float64(
    m: int, c: int, b: int, temperature: float
) -> None:
    logits = _logits(m, b, c, seed=m * 100 + c * 10 + b)
    expected = np.log(_naive_predictive(logits, temperature))
    out = predictive_log_probs(logits, temperature)
    assert out.shape == (b, c)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # float32 input and a tensor temperature give the same result at float32 precision
    out32 = predictive_log_probs(logits.float(), torch.tensor(temperature))
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-4, atol=1e-5)
    probs = predictive_probs(logits, temperature)
    np.testing.assert_allclose(probs.numpy(), np.exp(expected), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("c", CLASSES)
def test_predictive_is_not_softmax_of_mean_logits(c: int) -> None:
    logits = _logits(4, 16, c, seed=c, scale=3.0)
    ours = predictive_log_probs(logits)
    mixed_up = F.log_softmax(logits.mean(0), dim=-1)
    assert not torch.allclose(ours, mixed_up, atol=1e-3)


def test_single_member_predictive_is_plain_log_softmax() -> None:
    logits = _logits(1, 8, 5, seed=3)
    torch.testing.assert_close(predictive_log_probs(logits), F.log_softmax(logits[0], -1))


def test_predictive_probs_never_exceed_one_for_saturated_members() -> None:
    logits = torch.tensor([[[200.0, 0.0, -50.0]]]).expand(4, 3, 3).contiguous()
    probs = predictive_probs(logits)
    assert bool((probs <= 1.0).all()) and bool((probs >= 0.0).all())
    assert bool((predictive_log_probs(logits) <= 0.0).all())


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5), (7,)])
def test_predictive_log_probs_rejects_non_3d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(M, B, C\)"):
        predictive_log_probs(torch.zeros(shape))


# --------------------------------------------------------------------------- training loss


@pytest.mark.parametrize("m", MEMBERS)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_member_cross_entropy_is_mean_of_member_losses(m: int, c: int, weighted: bool) -> None:
    b = 17
    logits = _logits(m, b, c, seed=m + c)
    target = _target(b, c, seed=c)
    weight = torch.rand(c, dtype=torch.float64) + 0.1 if weighted else None
    expected = torch.stack([F.cross_entropy(logits[i], target, weight=weight) for i in range(m)])
    torch.testing.assert_close(member_cross_entropy(logits, target, weight), expected.mean())


def test_member_cross_entropy_pairs_rows_member_major() -> None:
    # Members disagree strongly; a sample-major pairing would give a different loss.
    logits = _logits(3, 4, 5, seed=9, scale=5.0)
    target = torch.tensor([0, 1, 2, 3])
    wrong = F.cross_entropy(logits.flatten(0, 1), target.repeat_interleave(3))
    assert not torch.isclose(member_cross_entropy(logits, target), wrong)


def test_member_cross_entropy_rejects_bad_target() -> None:
    with pytest.raises(ValueError):
        member_cross_entropy(torch.zeros(2, 4, 3), torch.zeros(5, dtype=torch.long))


# --------------------------------------------------------------------------- ensemble metrics


def _reference_metrics(
    logits: torch.Tensor, target: torch.Tensor, temperature: float, n_bins: int
) -> dict[str, float]:
    c = logits.shape[-1]
    probs = _naive_predictive(logits, temperature)
    y = target.numpy()
    pred = probs.argmax(axis=1)
    onehot = np.eye(c)[y]
    return {
        "acc": accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro", zero_division=0.0),
        "nll": log_loss(y, probs, labels=list(range(c))),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "ece": _numpy_ece(probs, y, n_bins),
    }


def _assert_matches_reference(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, n_bins: int = 10
) -> dict[str, torch.Tensor]:
    m, _, c = logits.shape
    metrics = EnsembleMetrics(num_classes=c, num_members=m, n_bins=n_bins)
    metrics.update(logits, target, temperature=temperature)
    out = metrics.compute()
    ref = _reference_metrics(logits, target, temperature, n_bins)
    assert set(out) == set(ref) | {f"member_acc/{i}" for i in range(m)}
    for key, value in ref.items():
        assert out[key].ndim == 0, key
        assert float(out[key]) == pytest.approx(value, abs=1e-5), key
    return out


@pytest.mark.parametrize("m", MEMBERS)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("b", SAMPLES)
def test_ensemble_metrics_match_sklearn_and_numpy(m: int, c: int, b: int) -> None:
    seed = 7 * m + 3 * c + b
    _assert_matches_reference(_logits(m, b, c, seed), _target(b, c, seed), temperature=1.5)


def test_ensemble_metrics_one_class_absent_from_targets() -> None:
    c = 5
    logits = _logits(4, 40, c, seed=11)
    target = _target(40, c - 1, seed=11)  # class c-1 never occurs as a target
    _assert_matches_reference(logits, target)


def test_macro_f1_ignores_class_absent_from_targets_and_predictions() -> None:
    c = 5
    logits = _logits(4, 40, c, seed=12)
    logits[..., c - 1] = -50.0  # class c-1 is never predicted ...
    target = _target(40, c - 1, seed=12)  # ... and never a target
    out = _assert_matches_reference(logits, target)
    pred = _naive_predictive(logits).argmax(1)
    counted_as_zero = f1_score(
        target.numpy(), pred, average="macro", labels=list(range(c)), zero_division=0.0
    )
    assert float(out["f1"]) != pytest.approx(counted_as_zero, abs=1e-3)


def test_ties_pick_first_index() -> None:
    # Two members with identical tied logits: classes 1 and 2 tie, argmax must be class 1.
    logits = torch.tensor([[0.0, 3.0, 3.0], [1.0, 2.0, 2.0]]).unsqueeze(1).repeat(1, 4, 1)
    logits = torch.stack([logits[0], logits[0]]).double()
    out_first = _assert_matches_reference(logits, torch.tensor([1, 1, 1, 1]))
    assert float(out_first["acc"]) == 1.0
    out_second = _assert_matches_reference(logits, torch.tensor([2, 2, 2, 2]))
    assert float(out_second["acc"]) == 0.0
    assert float(out_second["member_acc/0"]) == 0.0


def test_single_sample() -> None:
    logits = _logits(4, 1, 5, seed=13)
    for cls in range(5):
        _assert_matches_reference(logits, torch.tensor([cls]))


# --------------------------------------------------------------------------- NLL and Brier


@pytest.mark.parametrize("c", CLASSES)
def test_nll_matches_sklearn_log_loss(c: int) -> None:
    logits, target = _logits(4, 25, c, seed=c), _target(25, c, seed=c)
    expected = log_loss(target.numpy(), _naive_predictive(logits), labels=list(range(c)))
    value = negative_log_likelihood(predictive_log_probs(logits), target)
    assert float(value) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("c", CLASSES)
def test_brier_matches_numpy_sum_over_classes(c: int) -> None:
    logits, target = _logits(4, 25, c, seed=c), _target(25, c, seed=c)
    probs = _naive_predictive(logits)
    expected = ((probs - np.eye(c)[target.numpy()]) ** 2).sum(axis=1).mean()
    assert float(brier_score(predictive_probs(logits), target)) == pytest.approx(expected)


def test_brier_is_twice_sklearn_binary_brier() -> None:
    logits, target = _logits(4, 30, 2, seed=21), _target(30, 2, seed=21)
    probs = predictive_probs(logits)
    sk = brier_score_loss(target.numpy(), probs[:, 1].numpy(), pos_label=1)
    assert float(brier_score(probs, target)) == pytest.approx(2 * sk, rel=1e-9)


def test_stateful_nll_and_brier_accumulate_exactly() -> None:
    logits, target = _logits(4, 30, 5, seed=22), _target(30, 5, seed=22)
    log_probs = predictive_log_probs(logits)
    nll, brier = NegativeLogLikelihood(), BrierScore()
    for chunk in ((0, 1), (1, 11), (11, 30)):  # unequal batch sizes
        sl = slice(*chunk)
        nll.update(log_probs[sl], target[sl])
        brier.update(log_probs[sl].exp(), target[sl])
    expected_nll = negative_log_likelihood(log_probs, target)
    expected_brier = brier_score(log_probs.exp(), target)
    assert float(nll.compute()) == pytest.approx(float(expected_nll), rel=1e-5)
    assert float(brier.compute()) == pytest.approx(float(expected_brier), rel=1e-5)


def test_states_are_sum_reduced_for_ddp() -> None:
    for metric in (NegativeLogLikelihood(), BrierScore(), MemberAccuracy(3)):
        assert metric._reductions, type(metric).__name__
        for name, reduce_fx in metric._reductions.items():
            assert reduce_fx is dim_zero_sum, (type(metric).__name__, name)


# --------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("m", MEMBERS)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_numpy_and_torchmetrics(m: int, c: int, n_bins: int) -> None:
    logits, target = _logits(m, 60, c, seed=m + c + n_bins), _target(60, c, seed=c)
    probs = predictive_probs(logits).float()
    expected = _numpy_ece(probs.double().numpy(), target.numpy(), n_bins)
    ours = float(expected_calibration_error(probs, target, n_bins))
    assert ours == pytest.approx(expected, abs=1e-6)
    assert ours == pytest.approx(_torchmetrics_ece(probs, target, n_bins), abs=1e-6)


def test_ece_confidence_one_has_its_own_bin() -> None:
    # Sample 0: confidence exactly 1, wrong. Sample 1: confidence 0.95, right.
    # Own bin: (|0 - 1| + |1 - 0.95|) / 2 = 0.525; pooled with [0.9, 1): |0.5 - 0.975| = 0.475.
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05]])
    target = torch.tensor([1, 0])
    ours = float(expected_calibration_error(probs, target, n_bins=10))
    assert ours == pytest.approx(0.525, abs=1e-6)
    assert ours == pytest.approx(_numpy_ece(probs.double().numpy(), target.numpy(), 10), abs=1e-6)
    assert ours == pytest.approx(_torchmetrics_ece(probs, target, 10), abs=1e-6)


def test_ece_bins_are_closed_on_the_left() -> None:
    # Confidence exactly 0.5 shares bin [0.5, 0.75) with 0.7 instead of falling in (0.25, 0.5].
    # First sample right (tie -> class 0), second wrong. Shared bin: acc 0.5, conf 0.6 -> 0.1;
    # separate bins would give (|1 - 0.5| + |0 - 0.7|) / 2 = 0.6.
    probs = torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    target = torch.tensor([0, 1])
    ours = float(expected_calibration_error(probs, target, n_bins=4))
    assert ours == pytest.approx(0.1, abs=1e-6)
    assert ours == pytest.approx(_torchmetrics_ece(probs, target, 4), abs=1e-6)


@pytest.mark.parametrize("c", CLASSES)
def test_ece_one_hot_probabilities(c: int) -> None:
    target = _target(20, c, seed=c)
    probs = F.one_hot(target, c).float()
    assert float(expected_calibration_error(probs, target)) == 0.0
    wrong = (target + 1) % c
    assert float(expected_calibration_error(probs, wrong)) == 1.0
    assert _torchmetrics_ece(probs, wrong, 10) == pytest.approx(1.0)


def test_ece_ties() -> None:
    probs = torch.full((2, 2), 0.5)
    assert float(expected_calibration_error(probs, torch.tensor([0, 1]))) == pytest.approx(0.0)
    assert float(expected_calibration_error(probs, torch.tensor([0, 0]))) == pytest.approx(0.5)
    assert float(expected_calibration_error(probs, torch.tensor([1, 1]))) == pytest.approx(0.5)


def test_ece_single_sample() -> None:
    probs = torch.tensor([[0.2, 0.7, 0.1]])
    assert float(expected_calibration_error(probs, torch.tensor([1]))) == pytest.approx(0.3)
    assert float(expected_calibration_error(probs, torch.tensor([0]))) == pytest.approx(0.7)


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("m", MEMBERS)
@pytest.mark.parametrize("c", CLASSES)
def test_entropy_decomposition(m: int, c: int) -> None:
    logits = _logits(m, 20, c, seed=m * c)
    total = predictive_entropy(predictive_log_probs(logits, 0.7))
    aleatoric = expected_member_entropy(logits, 0.7)
    epistemic = mutual_information(logits, 0.7)
    assert total.shape == aleatoric.shape == epistemic.shape == (20,)
    torch.testing.assert_close(total, aleatoric + epistemic, atol=1e-6, rtol=0)
    probs = _naive_predictive(logits, 0.7)
    np.testing.assert_allclose(total.numpy(), -(probs * np.log(probs)).sum(1), rtol=1e-9)


def test_mutual_information_zero_for_identical_members_positive_otherwise() -> None:
    one = _logits(1, 10, 5, seed=31)
    identical = one.expand(4, 10, 5)
    mi_same = mutual_information(identical)
    assert bool((mi_same >= 0).all()) and float(mi_same.max()) < 1e-9
    disagreeing = _logits(4, 10, 5, seed=32, scale=4.0)
    assert bool((mutual_information(disagreeing) > 1e-3).all())


def test_predictive_entropy_zero_log_zero() -> None:
    log_probs = torch.log(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    entropy = predictive_entropy(log_probs)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy, torch.tensor([0.0, float(np.log(2.0))]))


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("m", MEMBERS)
def test_ensemble_metrics_accumulate_like_one_shot(m: int) -> None:
    c, b = 5, 45
    logits, target = _logits(m, b, c, seed=41), _target(b, c, seed=41)
    one_shot = EnsembleMetrics(c, m, n_bins=15)
    one_shot.update(logits, target, temperature=1.3)
    expected = one_shot.compute()
    batched = EnsembleMetrics(c, m, n_bins=15)
    batched.update(torch.randn(m, 3, c, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    batched.reset()  # reset must clear everything
    for lo, hi in ((0, 10), (10, 11), (11, 45)):
        batched.update(logits[:, lo:hi], target[lo:hi], temperature=1.3)
    result = batched.compute()
    assert result.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(result[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", MEMBERS)
def test_member_accuracy_matches_sklearn(m: int) -> None:
    c, b = 5, 50
    logits, target = _logits(m, b, c, seed=51), _target(b, c, seed=51)
    metric = MemberAccuracy(m)
    metric.update(logits[:, :20], target[:20])
    metric.update(logits[:, 20:], target[20:])
    expected = [accuracy_score(target.numpy(), logits[i].argmax(-1).numpy()) for i in range(m)]
    np.testing.assert_allclose(metric.compute().reshape(-1).numpy(), expected, rtol=1e-6)
    assert metric.compute().shape == ((m,) if m > 1 else ())  # torchmetrics squeezes M = 1

    ensemble = EnsembleMetrics(c, m)
    ensemble.update(logits, target)
    out = ensemble.compute()
    for i in range(m):
        assert float(out[f"member_acc/{i}"]) == pytest.approx(expected[i], abs=1e-6)


def test_wrong_member_count_raises() -> None:
    with pytest.raises(ValueError, match="M=4"):
        MemberAccuracy(4).update(torch.zeros(3, 2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="M=4"):
        EnsembleMetrics(5, 4).update(torch.zeros(3, 2, 5), torch.zeros(2, dtype=torch.long))
