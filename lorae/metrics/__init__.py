"""Ensemble metrics: functional helpers and torchmetrics classes."""

from __future__ import annotations

from lorae.metrics.classification import (
    BrierScore,
    EnsembleMetrics,
    MemberAccuracy,
    NegativeLogLikelihood,
)
from lorae.metrics.functional import (
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
from lorae.metrics.ood import OODMetrics, ood_scores

__all__ = [
    "BrierScore",
    "EnsembleMetrics",
    "MemberAccuracy",
    "NegativeLogLikelihood",
    "OODMetrics",
    "brier_score",
    "expected_calibration_error",
    "expected_member_entropy",
    "member_cross_entropy",
    "mutual_information",
    "negative_log_likelihood",
    "ood_scores",
    "predictive_entropy",
    "predictive_log_probs",
    "predictive_probs",
]
