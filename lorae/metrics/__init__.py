"""Every metric of lorae: functional helpers and torchmetrics classes over member logits
``(M, B, C)``. A leaf package: it imports nothing of lorae but :mod:`lorae.errors`."""

from __future__ import annotations

from lorae.metrics.classification import (
    BrierScore,
    EnsembleMetrics,
    MemberAccuracy,
    NegativeLogLikelihood,
)
from lorae.metrics.diversity import (
    DiversityMetrics,
    disagreement_matrix,
    jensen_shannon_matrix,
    pairwise_disagreement,
    pairwise_jensen_shannon,
    per_sample_jensen_shannon_matrix,
)
from lorae.metrics.ensemble_size import EnsembleSizeCurve, first_k_log_probs
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
    predictive_variance,
)
from lorae.metrics.ood import OODMetrics, ood_scores
from lorae.metrics.reliability import ReliabilityBins
from lorae.metrics.selective import (
    COVERAGES,
    SELECTIVE_SCORES,
    SelectivePrediction,
    SelectiveScore,
    accuracy_at_coverage,
    aurc,
    coverage_key,
    risk_coverage_curve,
    selective_scores,
)

__all__ = [
    "COVERAGES",
    "SELECTIVE_SCORES",
    "BrierScore",
    "DiversityMetrics",
    "EnsembleMetrics",
    "EnsembleSizeCurve",
    "MemberAccuracy",
    "NegativeLogLikelihood",
    "OODMetrics",
    "ReliabilityBins",
    "SelectivePrediction",
    "SelectiveScore",
    "accuracy_at_coverage",
    "aurc",
    "brier_score",
    "coverage_key",
    "disagreement_matrix",
    "expected_calibration_error",
    "expected_member_entropy",
    "first_k_log_probs",
    "jensen_shannon_matrix",
    "member_cross_entropy",
    "mutual_information",
    "negative_log_likelihood",
    "ood_scores",
    "pairwise_disagreement",
    "pairwise_jensen_shannon",
    "per_sample_jensen_shannon_matrix",
    "predictive_entropy",
    "predictive_log_probs",
    "predictive_probs",
    "predictive_variance",
    "risk_coverage_curve",
    "selective_scores",
]
