"""Analysis of trained ensembles: ensemble-size curves, function-space diversity, weight-space
analysis (paper section 4, appendices D and E) and the compute-cost report."""

from __future__ import annotations

from lorae.analysis.collect import collect_member_logits
from lorae.analysis.cost import ComputeCostMonitor, parameter_counts
from lorae.analysis.diversity import (
    DiversityMetrics,
    disagreement_matrix,
    jensen_shannon_matrix,
    pairwise_jensen_shannon,
    tsne_embedding,
)
from lorae.analysis.ensemble_size import EnsembleSizeCurve, first_k_log_probs, size_curve_rows
from lorae.analysis.weights import (
    WeightSpaceReport,
    analyse_projection,
    diversity_score,
    subspace_similarity,
)

__all__ = [
    "ComputeCostMonitor",
    "DiversityMetrics",
    "EnsembleSizeCurve",
    "WeightSpaceReport",
    "analyse_projection",
    "collect_member_logits",
    "disagreement_matrix",
    "diversity_score",
    "first_k_log_probs",
    "jensen_shannon_matrix",
    "pairwise_jensen_shannon",
    "parameter_counts",
    "size_curve_rows",
    "subspace_similarity",
    "tsne_embedding",
]
