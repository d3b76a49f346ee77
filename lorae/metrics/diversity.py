"""Function-space diversity of ensemble members (paper section 4, Fig. 2).

All functions read member logits ``(M, B, C)``, so they apply to every method:

- disagreement rate: share of samples on which members ``i`` and ``j`` predict different
  classes (Fort et al. 2019);
- Jensen-Shannon divergence between the predictive distributions of members ``i`` and ``j``,
  ``JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)`` with ``m = (p + q) / 2``, in bits (base 2, so
  it lies in ``[0, 1]``), averaged over samples. This is the divergence itself, not the square
  root of a symmetrised KL divergence used by the reference code;
- mutual information between prediction and member (the epistemic part of the predictive
  entropy), averaged over samples, in nats;
- a t-SNE of the members' predictions: each member is one point, the concatenation of its
  softmax outputs over the evaluated samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lorae.metrics.functional import mutual_information

__all__ = [
    "DiversityMetrics",
    "check_member_logits",
    "disagreement_matrix",
    "jensen_shannon_matrix",
    "pairwise_jensen_shannon",
]


def check_member_logits(logits: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"Expected member logits (M, B, C), got shape {tuple(logits.shape)}.")


def pairwise_disagreement(logits: Tensor) -> Tensor:
    """Per-sample disagreement ``[argmax_c z_ic != argmax_c z_jc]`` of every member pair.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M, B)``, float, 0 on the diagonal.
    """
    check_member_logits(logits)
    prediction = logits.argmax(dim=-1)  # (M, B)
    return (prediction[:, None, :] != prediction[None, :, :]).to(torch.float64)


def disagreement_matrix(logits: Tensor) -> Tensor:
    """Share of samples on which members ``i`` and ``j`` predict different classes.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M)``, symmetric, zero diagonal.
    """
    return pairwise_disagreement(logits).mean(dim=-1)


def pairwise_jensen_shannon(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample Jensen-Shannon divergence (bits) between every pair of members' softmaxes.

    Computed in float64 with ``0 log 0 = 0`` (``torch.xlogy``); one member at a time against
    all others, so memory stays ``O(M B C)``.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M, B)``, symmetric, zero diagonal, values in ``[0, 1]``.
    """
    check_member_logits(logits)
    probs = F.softmax(logits.double() / temperature, dim=-1)  # (M, B, C)
    self_term = torch.xlogy(probs, probs).sum(dim=-1)  # (M, B): sum p log p
    rows = []
    for i in range(probs.shape[0]):
        mixture = (probs[i : i + 1] + probs) / 2  # (M, B, C)
        # KL(p || m) = sum p log p - sum p log m
        kl_i = self_term[i : i + 1] - torch.xlogy(probs[i : i + 1], mixture).sum(dim=-1)
        kl_j = self_term - torch.xlogy(probs, mixture).sum(dim=-1)
        rows.append((kl_i + kl_j) / 2)
    return (torch.stack(rows) / math.log(2)).clamp(min=0.0)


def jensen_shannon_matrix(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over samples of the pairwise Jensen-Shannon divergence, in bits.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M)``
    """
    return pairwise_jensen_shannon(logits, temperature).mean(dim=-1)


class DiversityMetrics(Metric):
    """Disagreement and Jensen-Shannon matrices and mean mutual information over a test set.

    States are sums, exact under DDP.

    Args:
        num_members: M.
        temperature: softmax temperature applied to every member.

    Shape:
        - logits: ``(M, B, C)``
        - compute: ``disagreement`` and ``jsd`` (mean over member pairs ``i != j``), ``mi``
          (mean over samples, nats) ``()``; ``disagreement_matrix``, ``jsd_matrix`` ``(M, M)``.
    """

    full_state_update = False
    disagreement_sum: Tensor
    jsd_sum: Tensor
    mi_sum: Tensor
    total: Tensor

    def __init__(self, num_members: int, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_members = num_members
        self.temperature = temperature
        zeros = torch.zeros(num_members, num_members, dtype=torch.float64)
        self.add_state("disagreement_sum", zeros.clone(), "sum")
        self.add_state("jsd_sum", zeros.clone(), "sum")
        self.add_state("mi_sum", torch.tensor(0.0, dtype=torch.float64), "sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), "sum")

    def update(self, logits: Tensor) -> None:
        """Accumulate a batch of member logits."""
        logits = logits.float()
        self.disagreement_sum += pairwise_disagreement(logits).sum(dim=-1)
        self.jsd_sum += pairwise_jensen_shannon(logits, self.temperature).sum(dim=-1)
        self.mi_sum += mutual_information(logits.double(), self.temperature).sum()
        self.total += logits.shape[1]

    def compute(self) -> dict[str, Tensor]:
        """Mean disagreement, JSD and MI, and the two pairwise matrices."""
        total = self.total.clamp(min=1)
        disagreement = self.disagreement_sum / total
        jsd = self.jsd_sum / total
        m = self.num_members
        pairs = max(m * (m - 1), 1)
        return {
            "disagreement": disagreement.sum() / pairs,
            "jsd": jsd.sum() / pairs,
            "mi": self.mi_sum / total,
            "disagreement_matrix": disagreement,
            "jsd_matrix": jsd,
        }
