"""Member weights across training and their t-SNE (paper section 4 and appendix D, Fig. 3, 15).

Appendix D: "We plot the t-SNE visualizations for different layers in Fig. 15, capturing the
evolution of weights during training. The visualizations include the initial pretrained
weights, and for each ensemble member, we plot weights from epoch 5 to epoch 65 at 5-epoch
intervals." A snapshot is, for every adapted projection ``<block>.<projection>`` of one kind
(the value projections by default, as section 4), each member's flattened update
``W_i - W0`` (:meth:`lorae.methods.EnsembleMethod.member_weights`), so the pretrained weights
are the origin of every layer's picture and any method with member weights (LoRA-Ensemble,
Explicit Ensemble, BatchEnsemble) is recorded the same way. Very long updates keep a fixed,
seeded subset of their coordinates (``max_features``): squared distances, which t-SNE reads,
are then estimated without bias up to one common scale.

:class:`lorae.evaluation.WeightTrajectory` (a Lightning callback) records the snapshots
into the run folder; ``lorae analyze`` draws them with :func:`trajectory_embedding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TRAJECTORY_FILE",
    "feature_indices",
    "load_trajectory",
    "member_updates",
    "trajectory_embedding",
]

#: The file name of a run's trajectory, next to its ``metrics.json`` and checkpoints folder.
TRAJECTORY_FILE = "weight_trajectory.pt"


def feature_indices(size: int, max_features: int, seed: int = 0) -> Tensor | None:
    """A fixed, sorted subset of ``max_features`` of ``size`` coordinates, or ``None`` when
    all of them fit."""
    if size <= max_features:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:max_features].sort().values


def member_updates(
    weights: Mapping[str, tuple[Tensor, Tensor]],
    projection: str,
    indices: Mapping[str, Tensor | None] | None = None,
) -> dict[str, Tensor]:
    """Each member's flattened update ``W_i - W0`` of every projection of one kind.

    Args:
        weights: :meth:`~lorae.methods.EnsembleMethod.member_weights` output.
        projection: ``"q"``, ``"k"``, ``"v"`` or ``"o"``.
        indices: per key, the coordinates to keep (``None``: all).

    Raises:
        ValueError: no projection of that kind.

    Shape:
        output: ``{"<block>.<projection>": (M, F)}``, float32 on the CPU
    """
    updates = {}
    for key, (reference, members) in weights.items():
        if key.rsplit(".", 1)[-1] != projection:
            continue
        delta = (members.detach().float() - reference.detach().float()).flatten(1).cpu()
        keep = None if indices is None else indices.get(key)
        updates[key] = delta if keep is None else delta[:, keep]
    if not updates:
        raise ValueError(
            f"No '{projection}' projection among the member weights: {sorted(weights)}."
        )
    return updates


def load_trajectory(path: str | Path) -> dict[str, Any]:
    """Read a trajectory file (tensors, lists and numbers only: loaded with
    ``weights_only=True``).

    Returns:
        ``{"projection": str, "epochs": [e_0, ...], "num_members": M,
        "snapshots": {key: (S, M, F)}, "indices": {key: (F,) or None}}``
    """
    loaded: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
    return loaded


def trajectory_embedding(
    snapshots: Tensor, seed: int = 0, perplexity: float | None = None
) -> np.ndarray:
    """2-D t-SNE of one layer's trajectory: the pretrained weights (the origin of the
    updates) first, then every member at every snapshot, snapshot-major.

    Args:
        snapshots: the member updates at each snapshot.
        seed: random state of t-SNE.
        perplexity: default ``min(30, (n - 1) / 3)`` for n points, at least 1.

    Shape:
        - snapshots: ``(S, M, F)``
        - output: ``(1 + S*M, 2)``; row ``1 + s*M + i`` is member i at snapshot s
    """
    from sklearn.manifold import TSNE

    points = torch.cat([torch.zeros(1, snapshots.shape[-1]), snapshots.flatten(0, 1).float()])
    n = points.shape[0]
    if n < 3:
        raise ValueError(f"A t-SNE needs at least 3 points, got {n}.")
    if perplexity is None:
        perplexity = max(1.0, min(30.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca")
    embedding: np.ndarray = tsne.fit_transform(points.double().numpy())
    return embedding
