"""Weight-space analysis of ensemble members (paper section 4, appendices D and E, Fig. 3, 12-14).

Reads :meth:`lorae.methods.EnsembleMethod.member_weights`: for every adapted attention
projection the pretrained weight ``W0`` ``(D_out, D_in)`` and each member's effective weight
``W_i = W0 + (alpha/R) B_i A_i`` (LoRA-Ensemble) or its fine-tuned weight (Explicit Ensemble),
``(M, D_out, D_in)``. Singular vectors are the *left* ones (columns of ``U`` in
``W = U S V^T``, the output space), sorted by decreasing singular value.

- ``pretrained_similarity``: subspace similarity ``||U0_k^T Ui_k||_F^2 / k`` in ``[0, 1]``
  between the top-k singular vectors of ``W0`` and of ``W_i`` (1: same subspace);
- ``member_similarity``: the same between members ``i`` and ``j``;
- ``max_cosine_to_pretrained``: for each of a member's top-k singular vectors, its largest
  absolute cosine similarity with *any* singular vector of ``W0``; a vector below the
  threshold is an "intruder dimension" (Shuttleworth et al. 2024) and is counted in
  ``intruders``;
- ``delta_singular_values``: singular values of ``W_i - W0`` (the scaled ``B_i A_i``);
- as the paper shows them (appendix D: "Singular vectors corresponding to the top singular
  values (16 are shown) are extracted and compared using cosine similarity ... averaged
  across layers and ensemble members"; Fig. 3, 12-14): ``top_singular_values`` of every
  member (``W_i``'s top k), and the k x k heatmaps ``pretrained_cosines`` (entry ``(a, b)``:
  ``|cos(u0_a, ui_b)|``, mean over members; Fig. 13), ``member_cosines`` (``|cos(ui_a,
  uj_b)|``, mean over member pairs ``i != j``; Fig. 3, 12) and ``delta_member_cosines`` (the
  same for the singular vectors of the updates ``W_i - W0``, whose leading R are those of
  ``B_i A_i``; Fig. 14);
- :func:`diversity_score` (appendix E): one minus the mean pairwise Pearson correlation of the
  members' flattened value-projection updates ``W_i - W0`` or (``of="weights"``) of their
  whole matrices ``W_i``; the appendix does not say which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: What :func:`diversity_score` correlates: the members' updates or their whole matrices.
DiversityOf = Literal["updates", "weights"]

__all__ = [
    "DiversityOf",
    "WeightSpaceReport",
    "analyse_projection",
    "diversity_score",
    "mean_pair_cosines",
    "subspace_cosines",
    "subspace_similarity",
    "top_singular_vectors",
]


def top_singular_vectors(weight: Tensor, k: int) -> Tensor:
    """The ``k`` leading left singular vectors of each matrix, in float64.

    Shape:
        - weight: ``(..., D_out, D_in)``
        - output: ``(..., D_out, k)``
    """
    u, _, _ = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[..., :k]


def subspace_cosines(u_a: Tensor, u_b: Tensor) -> Tensor:
    """Absolute cosine similarity of every pair of (unit) singular vectors.

    Shape:
        - u_a: ``(D, k_a)``; u_b: ``(D, k_b)``
        - output: ``(k_a, k_b)``
    """
    return (u_a.transpose(-2, -1) @ u_b).abs()


def subspace_similarity(u_a: Tensor, u_b: Tensor) -> Tensor:
    """``||U_a^T U_b||_F^2 / k``: 1 for the same k-dimensional subspace, 0 for orthogonal ones.

    Shape:
        - u_a, u_b: ``(..., D, k)``
        - output: ``(...)``
    """
    k = u_a.shape[-1]
    return (u_a.transpose(-2, -1) @ u_b).square().sum(dim=(-2, -1)) / k


@dataclass(frozen=True)
class WeightSpaceReport:
    """Weight-space numbers of one projection (see the module docstring).

    Shapes: ``pretrained_similarity`` ``(M,)``, ``member_similarity`` ``(M, M)``,
    ``max_cosine_to_pretrained`` ``(M, k)``, ``intruders`` ``(M,)``,
    ``delta_singular_values`` ``(M, min(D_out, D_in))``,
    ``pretrained_singular_values`` ``(min(D_out, D_in),)``, ``top_singular_values`` ``(M, k)``,
    ``pretrained_cosines``, ``member_cosines``, ``delta_member_cosines`` ``(k, k)``.
    """

    pretrained_similarity: Tensor
    member_similarity: Tensor
    max_cosine_to_pretrained: Tensor
    intruders: Tensor
    delta_singular_values: Tensor
    pretrained_singular_values: Tensor
    top_singular_values: Tensor
    pretrained_cosines: Tensor
    member_cosines: Tensor
    delta_member_cosines: Tensor

    def summary(self) -> dict[str, float]:
        """Scalars for a table: means over members (and member pairs ``i != j``)."""
        m = self.member_similarity.shape[0]
        off_diagonal = self.member_similarity.sum() - self.member_similarity.diagonal().sum()
        return {
            "pretrained_similarity": float(self.pretrained_similarity.mean()),
            "member_similarity": float(off_diagonal / (m * (m - 1))) if m > 1 else float("nan"),
            "intruders": float(self.intruders.double().mean()),
            "delta_top_singular_value": float(self.delta_singular_values[:, 0].mean()),
        }


def mean_pair_cosines(u: Tensor) -> Tensor:
    """``|cos(u_i[:, a], u_j[:, b])|`` averaged over ordered member pairs ``i != j``.

    Shape:
        - u: ``(M, D, k)`` each member's singular vectors
        - output: ``(k, k)`` (NaN for a single member)
    """
    m, k = u.shape[0], u.shape[-1]
    if m < 2:
        return torch.full((k, k), float("nan"), dtype=u.dtype)
    cosines = subspace_cosines(u[:, None], u[None, :])  # (M, M, k, k)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    return cosines[off_diagonal].mean(dim=0)


def analyse_projection(
    reference: Tensor, members: Tensor, k: int = 16, intruder_threshold: float = 0.5
) -> WeightSpaceReport:
    """Weight-space numbers of one projection.

    Args:
        reference: the pretrained weight ``W0``.
        members: each member's effective weight ``W_i``.
        k: number of leading singular vectors compared.
        intruder_threshold: a member's singular vector whose largest absolute cosine with any
            singular vector of ``W0`` is below this is an intruder dimension.

    Shape:
        - reference: ``(D_out, D_in)``
        - members: ``(M, D_out, D_in)``
    """
    if members.ndim != 3 or members.shape[1:] != reference.shape:
        raise ValueError(
            f"Expected reference (D_out, D_in) and members (M, D_out, D_in), got "
            f"{tuple(reference.shape)} and {tuple(members.shape)}."
        )
    reference = reference.detach().double().cpu()
    members = members.detach().double().cpu()
    k = min(k, *reference.shape)
    u0_full, s0, _ = torch.linalg.svd(reference, full_matrices=False)
    u0 = u0_full[:, :k]
    u_all, s_members, _ = torch.linalg.svd(members, full_matrices=False)
    u_members = u_all[..., :k]  # (M, D_out, k)
    pretrained_similarity = subspace_similarity(u0.expand_as(u_members), u_members)
    member_similarity = subspace_similarity(u_members[:, None], u_members[None, :])
    max_cosine = subspace_cosines(u0_full, u_members).amax(dim=-2)  # (M, k)
    u_delta, delta_sv, _ = torch.linalg.svd(members - reference, full_matrices=False)
    return WeightSpaceReport(
        pretrained_similarity=pretrained_similarity,
        member_similarity=member_similarity,
        max_cosine_to_pretrained=max_cosine,
        intruders=(max_cosine < intruder_threshold).sum(dim=-1),
        delta_singular_values=delta_sv,
        pretrained_singular_values=s0,
        top_singular_values=s_members[:, :k],
        pretrained_cosines=subspace_cosines(u0, u_members).mean(dim=0),
        member_cosines=mean_pair_cosines(u_members),
        delta_member_cosines=mean_pair_cosines(u_delta[..., :k]),
    )


def diversity_score(
    weights: Mapping[str, tuple[Tensor, Tensor]],
    projection: str = "v",
    of: DiversityOf = "updates",
) -> float:
    """Appendix E diversity score: ``1 - mean pairwise Pearson correlation`` of the members'
    flattened matrices of one projection (value by default), averaged over layers.

    Appendix E: "we compute the average pairwise correlation between the LoRA V projection
    matrices of different ensemble members, averaged across all layers. Diversity score = 1 -
    average correlation." It does not say which matrix; both readings are computed:

    - ``of="updates"``: the members' updates ``W_i - W0`` (the scaled ``B_i A_i``). 0 when all
      members learned the same update, about 1 for uncorrelated updates: independently
      initialised ``A_i`` make it high at any gain.
    - ``of="weights"``: the members' whole adapted matrices ``W_i = W0 + (alpha/R) B_i A_i``.
      The shared ``W0`` dominates while the updates are small, so it grows with the updates'
      size relative to ``W0``, from near 0. Tab. 11's values (0.006 at gain 1 to 0.511 at gain
      40) fit this reading, not the first.

    Args:
        weights: :meth:`~lorae.methods.EnsembleMethod.member_weights` output.
        projection: which projection's keys (``"<block>.<projection>"``) to use.
        of: ``"updates"`` or ``"weights"`` (above).

    Raises:
        ValueError: no key of that projection, fewer than two members, or another ``of``.
    """
    if of not in ("updates", "weights"):
        raise ValueError(f"of={of!r}: expected 'updates' (W_i - W0) or 'weights' (W_i).")
    correlations = []
    for name, (reference, members) in weights.items():
        if name.rsplit(".", 1)[-1] != projection:
            continue
        if members.shape[0] < 2:
            raise ValueError("The diversity score needs at least two members.")
        matrices = members.detach().double().cpu()
        if of == "updates":
            matrices = matrices - reference.detach().double().cpu()
        corr = torch.corrcoef(matrices.flatten(1))
        m = corr.shape[0]
        correlations.append((corr.sum() - corr.diagonal().sum()) / (m * (m - 1)))
    if not correlations:
        raise ValueError(
            f"No '{projection}' projection among the analysed weights: {sorted(weights)}."
        )
    return float(1.0 - torch.stack(correlations).mean())
