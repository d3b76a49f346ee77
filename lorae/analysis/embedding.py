"""A picture of the members in function space: t-SNE of their predictions (paper Fig. 3)."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from lorae.metrics.diversity import check_member_logits

__all__ = ["tsne_embedding"]


def tsne_embedding(
    logits: Tensor, seed: int = 0, perplexity: float | None = None, max_samples: int = 2000
) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of the members' predictions, one point per member.

    Member ``i`` is represented by its softmax outputs over (at most ``max_samples``) samples,
    flattened to one vector of length ``N * C``.

    Args:
        logits: member logits.
        seed: random state of t-SNE.
        perplexity: t-SNE perplexity; must be below ``M``. Default ``min(30, (M - 1) / 3)``,
            at least 1.
        max_samples: use the first samples only (t-SNE on long vectors is slow).

    Raises:
        ValueError: fewer than 3 members (nothing to embed).

    Shape:
        - logits: ``(M, N, C)``
        - output: ``(M, 2)``
    """
    from sklearn.manifold import TSNE

    check_member_logits(logits)
    num_members = logits.shape[0]
    if num_members < 3:
        raise ValueError(f"A t-SNE of the members needs at least 3 members, got {num_members}.")
    features = F.softmax(logits[:, :max_samples].double(), dim=-1).flatten(1).numpy()
    if perplexity is None:
        perplexity = max(1.0, min(30.0, (num_members - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca")
    embedding: np.ndarray = tsne.fit_transform(features)
    return embedding
