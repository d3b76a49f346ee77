"""Function-space diversity of ensemble members (paper section 4, Fig. 2).

All functions read member logits ``(M, B, C)``, so they apply to every method:

- disagreement rate: share of samples on which members ``i`` and ``j`` predict different
  classes (Fort et al. 2019);
- Jensen-Shannon divergence as the paper measures it (section 4: "we construct a probability
  distribution for each ensemble member by aggregating their softmax outputs across all test
  samples, then compute pairwise Jensen-Shannon divergences"): member ``i``'s distribution is
  its softmax averaged over the samples, ``p̄_i = 1/N Σ_n softmax(z_in)`` (a distribution over
  the C classes), and the statistic is ``JSD(p̄_i, p̄_j)``. Averaging is how we read
  "aggregating": aggregating by concatenating the N softmaxes (and dividing by N) would give
  exactly the per-sample mean below, which the paper's wording sets apart;
- the per-sample Jensen-Shannon divergence ``1/N Σ_n JSD(p_in, p_jn)`` (lorae's earlier
  ``jsd``), kept as ``jsd_per_sample``: it also sees members that disagree sample by sample
  but predict the same class frequencies, which the aggregated statistic cannot.
  Both use ``JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)`` with ``m = (p + q) / 2``, in bits
  (base 2, so it lies in ``[0, 1]``): the divergence itself, not the square root of a
  symmetrised KL divergence used by the reference code (nor scipy's distance, its root);
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
    "aggregated_probs",
    "check_member_logits",
    "disagreement_matrix",
    "jensen_shannon_divergence",
    "jensen_shannon_matrix",
    "member_jensen_shannon_matrix",
    "pairwise_jensen_shannon",
    "per_sample_jensen_shannon_matrix",
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


def jensen_shannon_divergence(p: Tensor, q: Tensor) -> Tensor:
    """``JSD(p, q)`` in bits along the last axis, in float64, with ``0 log 0 = 0``.

    Shape:
        - p, q: ``(..., C)`` probability vectors (broadcastable)
        - output: ``(...)``, values in ``[0, 1]``
    """
    p, q = p.double(), q.double()
    mixture = (p + q) / 2
    # KL(p || m) = sum p log p - sum p log m
    kl_p = torch.xlogy(p, p).sum(dim=-1) - torch.xlogy(p, mixture).sum(dim=-1)
    kl_q = torch.xlogy(q, q).sum(dim=-1) - torch.xlogy(q, mixture).sum(dim=-1)
    return ((kl_p + kl_q) / (2 * math.log(2))).clamp(min=0.0)


def pairwise_jensen_shannon(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample Jensen-Shannon divergence (bits) between every pair of members' softmaxes.

    One member at a time against all others, so memory stays ``O(M B C)``.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M, B)``, symmetric, zero diagonal, values in ``[0, 1]``.
    """
    check_member_logits(logits)
    probs = F.softmax(logits.double() / temperature, dim=-1)  # (M, B, C)
    return torch.stack(
        [jensen_shannon_divergence(probs[i : i + 1], probs) for i in range(len(probs))]
    )


def per_sample_jensen_shannon_matrix(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over samples of the pairwise per-sample Jensen-Shannon divergence, in bits.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M)``
    """
    return pairwise_jensen_shannon(logits, temperature).mean(dim=-1)


def aggregated_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Each member's softmax averaged over the samples: its distribution over the classes.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, C)``, float64, rows sum to 1
    """
    check_member_logits(logits)
    return F.softmax(logits.double() / temperature, dim=-1).mean(dim=1)


def member_jensen_shannon_matrix(distributions: Tensor) -> Tensor:
    """Pairwise Jensen-Shannon divergence (bits) between the members' distributions.

    Shape:
        - distributions: ``(M, C)``
        - output: ``(M, M)``, symmetric, zero diagonal
    """
    return jensen_shannon_divergence(distributions[:, None, :], distributions[None, :, :])


def jensen_shannon_matrix(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The paper's statistic (section 4): pairwise Jensen-Shannon divergence, in bits, between
    the members' softmax outputs aggregated (averaged) over all samples.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, M)``
    """
    return member_jensen_shannon_matrix(aggregated_probs(logits, temperature))


class DiversityMetrics(Metric):
    """Disagreement and Jensen-Shannon matrices and mean mutual information over a test set.

    States are sums (the members' summed softmaxes among them), exact under DDP.

    Args:
        num_members: M.
        num_classes: C.
        temperature: softmax temperature applied to every member.

    Shape:
        - logits: ``(M, B, C)``
        - compute: ``disagreement``, ``jsd`` (the paper's aggregated statistic) and
          ``jsd_per_sample`` (mean over member pairs ``i != j``), ``mi`` (mean over samples,
          nats) ``()``; ``disagreement_matrix``, ``jsd_matrix``, ``jsd_per_sample_matrix``
          ``(M, M)``.
    """

    full_state_update = False
    disagreement_sum: Tensor
    jsd_sum: Tensor
    prob_sum: Tensor
    mi_sum: Tensor
    total: Tensor

    def __init__(
        self, num_members: int, num_classes: int, temperature: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_members = num_members
        self.num_classes = num_classes
        self.temperature = temperature
        zeros = torch.zeros(num_members, num_members, dtype=torch.float64)
        self.add_state("disagreement_sum", zeros.clone(), "sum")
        self.add_state("jsd_sum", zeros.clone(), "sum")
        probs = torch.zeros(num_members, num_classes, dtype=torch.float64)
        self.add_state("prob_sum", probs, "sum")
        self.add_state("mi_sum", torch.tensor(0.0, dtype=torch.float64), "sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), "sum")

    def update(self, logits: Tensor) -> None:
        """Accumulate a batch of member logits."""
        logits = logits.float()
        self.disagreement_sum += pairwise_disagreement(logits).sum(dim=-1)
        self.jsd_sum += pairwise_jensen_shannon(logits, self.temperature).sum(dim=-1)
        self.prob_sum += F.softmax(logits.double() / self.temperature, dim=-1).sum(dim=1)
        self.mi_sum += mutual_information(logits.double(), self.temperature).sum()
        self.total += logits.shape[1]

    def compute(self) -> dict[str, Tensor]:
        """Mean disagreement, both JSDs and MI, and the pairwise matrices."""
        total = self.total.clamp(min=1)
        disagreement = self.disagreement_sum / total
        jsd = member_jensen_shannon_matrix(self.prob_sum / total)
        jsd_per_sample = self.jsd_sum / total
        m = self.num_members
        pairs = max(m * (m - 1), 1)
        return {
            "disagreement": disagreement.sum() / pairs,
            "jsd": jsd.sum() / pairs,
            "jsd_per_sample": jsd_per_sample.sum() / pairs,
            "mi": self.mi_sum / total,
            "disagreement_matrix": disagreement,
            "jsd_matrix": jsd,
            "jsd_per_sample_matrix": jsd_per_sample,
        }
