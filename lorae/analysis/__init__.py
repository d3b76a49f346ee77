"""Analysis of trained ensembles, a library: weight-space analysis (paper section 4, appendices
D and E), the members' weight trajectory across training, and the t-SNE pictures of the
members in function space and along that trajectory. The function-space numbers
(disagreement, Jensen-Shannon divergence, ensemble-size curves) are metrics
(:mod:`lorae.metrics`)."""

from __future__ import annotations

from lorae.analysis.embedding import tsne_embedding
from lorae.analysis.trajectory import (
    TRAJECTORY_FILE,
    load_trajectory,
    member_updates,
    trajectory_embedding,
)
from lorae.analysis.weights import (
    WeightSpaceReport,
    analyse_projection,
    diversity_score,
    subspace_similarity,
)

__all__ = [
    "TRAJECTORY_FILE",
    "WeightSpaceReport",
    "analyse_projection",
    "diversity_score",
    "load_trajectory",
    "member_updates",
    "subspace_similarity",
    "trajectory_embedding",
    "tsne_embedding",
]
