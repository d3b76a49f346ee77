"""Temperature scaling (paper appendix K) and reliability bins/diagrams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from lorae.errors import ConfigError
from lorae.evaluation import figures as plots
from lorae.evaluation.figures import reliability_figure
from lorae.evaluation.result import ReliabilityCurve
from lorae.evaluation.temperature import fit_temperature
from lorae.metrics.functional import expected_calibration_error, predictive_probs
from lorae.metrics.reliability import ReliabilityBins


def _calibrated_ensemble(m: int, n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member logits whose ensemble predictive is calibrated by construction: every label is
    drawn from the predictive itself."""
    generator = torch.Generator().manual_seed(seed)
    shared = 2.0 * torch.randn(1, n, c, generator=generator, dtype=torch.float64)
    logits = shared + 0.7 * torch.randn(m, n, c, generator=generator, dtype=torch.float64)
    probs = predictive_probs(logits)
    target = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return logits, target


@pytest.mark.parametrize("num_members", [1, 4])
@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_recovers_a_known_temperature_and_lowers_ece(
    num_members: int, true_temperature: float
) -> None:
    logits, target = _calibrated_ensemble(num_members, 20_000, 6, seed=num_members)
    # A model whose logits are the calibrated ones times T is miscalibrated by exactly T.
    miscalibrated = logits * true_temperature
    fit = fit_temperature(miscalibrated, target)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fit.nll_after < fit.nll_before
    before = expected_calibration_error(predictive_probs(miscalibrated), target)
    after = expected_calibration_error(predictive_probs(miscalibrated, fit.temperature), target)
    assert after < before


def test_fit_is_the_nll_minimum() -> None:
    logits, target = _calibrated_ensemble(3, 2_000, 4, seed=7)
    logits = logits * 1.7
    fit = fit_temperature(logits, target)

    def nll(t: float) -> float:
        return float(-predictive_probs(logits, t).log().gather(1, target[:, None]).mean())

    assert fit.nll_after == pytest.approx(nll(fit.temperature), rel=1e-9)
    for t in (fit.temperature * 0.97, fit.temperature * 1.03):
        assert nll(t) > fit.nll_after


def test_fit_works_under_inference_mode() -> None:
    """Lightning tests under torch.inference_mode; the fit must still have gradients."""
    logits, target = _calibrated_ensemble(2, 500, 3, seed=1)
    with torch.inference_mode():
        fit = fit_temperature(logits.float() * 2, target)
    assert fit.temperature == pytest.approx(2.0, rel=0.25)


def test_fit_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="M, N, C"):
        fit_temperature(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="zero samples"):
        fit_temperature(torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.long))


def _probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=generator), dim=-1)
    target = torch.randint(0, c, (n,), generator=generator)
    return probs, target


def test_reliability_bins_match_numpy_and_ece() -> None:
    probs, target = _probs(500, 5, seed=0)
    probs[:3] = torch.tensor([1.0, 0, 0, 0, 0])  # confidence exactly 1: its own bin
    bins_metric = ReliabilityBins(n_bins=10)
    for lo in range(0, 500, 128):  # batched accumulation
        bins_metric.update(probs[lo : lo + 128], target[lo : lo + 128])
    bins = bins_metric.compute()
    confidence, prediction = probs.max(dim=1)
    conf, correct = confidence.double().numpy(), (prediction == target).numpy()
    index = np.minimum(np.floor(conf * 10).astype(int), 10)  # equal-width, 1.0 -> bin 10
    for b in range(11):
        mask = index == b
        assert bins["count"][b] == mask.sum()
        if mask.any():
            assert float(bins["accuracy"][b]) == pytest.approx(correct[mask].mean())
            assert float(bins["confidence"][b]) == pytest.approx(conf[mask].mean(), rel=1e-6)
        else:
            assert torch.isnan(bins["accuracy"][b])
    assert bins["count"][10] == 3
    expected = float(expected_calibration_error(probs, target, 10))
    assert float(bins["ece"]) == pytest.approx(expected, abs=1e-6)
    torchmetrics_ece = MulticlassCalibrationError(5, n_bins=10)(probs, target)
    assert float(bins["ece"]) == pytest.approx(float(torchmetrics_ece), abs=1e-6)


def test_reliability_figure_draws_bins(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    probs, target = _probs(300, 4, seed=1)
    metric = ReliabilityBins(n_bins=10)
    metric.update(probs, target)
    figure = reliability_figure(ReliabilityCurve.from_tensors(metric.compute()), "test")
    top = figure.axes[0]
    assert "ECE" in top.get_title()
    # 10 accuracy bars, then one gap bar per non-empty bin
    assert len(top.patches) == 10 + int((metric.compute()["count"][:10] > 0).sum())
    path = plots.save_figure(figure, tmp_path / "r.png")
    assert path.stat().st_size > 1000


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    with pytest.raises(ConfigError, match=r"lorae\[plots\]"):
        plots.require_pyplot()
