"""Analysis of trained ensembles, a library: weight-space analysis (paper section 4, appendices
D and E) and the t-SNE picture of the members in function space. The function-space numbers
(disagreement, Jensen-Shannon divergence, ensemble-size curves) are metrics
(:mod:`lorae.metrics`)."""

from __future__ import annotations

from lorae.analysis.embedding import tsne_embedding
from lorae.analysis.weights import (
    WeightSpaceReport,
    analyse_projection,
    diversity_score,
    subspace_similarity,
)

__all__ = [
    "WeightSpaceReport",
    "analyse_projection",
    "diversity_score",
    "subspace_similarity",
    "tsne_embedding",
]
