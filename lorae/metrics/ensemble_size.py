"""Ensemble-size curves (paper Fig. 4 and 6): metrics of the first ``k`` members, k = 1..M.

Every ``k`` reads the same test pass: the predictive of the first ``k`` members is
``1/k sum_{m<k} softmax(logits_m / T)``, computed for all ``k`` at once with a cumulative
log-sum-exp over the member axis.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["EnsembleSizeCurve", "first_k_log_probs"]


def first_k_log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-predictive of the first ``k`` members for every ``k``.

    Row ``k - 1`` is ``log(1/k sum_{m<k} softmax(logits_m / T))``.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(M, B, C)``
    """
    if logits.ndim != 3:
        raise ValueError(f"Expected member logits (M, B, C), got shape {tuple(logits.shape)}.")
    log_p = F.log_softmax(logits / temperature, dim=-1)
    sizes = torch.arange(1, logits.shape[0] + 1, device=logits.device, dtype=log_p.dtype)
    return torch.logcumsumexp(log_p, dim=0) - sizes.log()[:, None, None]


class EnsembleSizeCurve(Metric):
    """Accuracy, ECE and NLL of the first ``k`` members for ``k = 1..M``.

    ECE uses the bins of :func:`lorae.metrics.functional.expected_calibration_error`. States
    are sums, exact under DDP.

    Args:
        num_members: M.
        n_bins: equal-width ECE bins.
        temperature: softmax temperature applied to every member.

    Shape:
        - logits: ``(M, B, C)``; target ``(B,)``
        - compute: ``acc``, ``ece``, ``nll``, each ``(M,)`` (entry ``k - 1`` for size ``k``).
    """

    full_state_update = False
    correct: Tensor
    nll_sum: Tensor
    confidence_sum: Tensor
    correct_sum: Tensor
    total: Tensor

    def __init__(
        self, num_members: int, n_bins: int = 10, temperature: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        self.temperature = temperature
        f64 = torch.float64
        self.add_state("correct", torch.zeros(num_members, dtype=f64), "sum")
        self.add_state("nll_sum", torch.zeros(num_members, dtype=f64), "sum")
        self.add_state("confidence_sum", torch.zeros(num_members, n_bins + 1, dtype=f64), "sum")
        self.add_state("correct_sum", torch.zeros(num_members, n_bins + 1, dtype=f64), "sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), "sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of member logits and class indices."""
        log_probs = first_k_log_probs(logits.float(), self.temperature)  # (M, B, C)
        num_members, batch = log_probs.shape[:2]
        confidence, prediction = log_probs.exp().max(dim=-1)  # (M, B)
        correct = (prediction == target).double()
        self.correct += correct.sum(dim=1)
        index = target.view(1, -1, 1).expand(num_members, batch, 1)
        self.nll_sum -= log_probs.gather(2, index).squeeze(2).double().sum(dim=1)
        boundaries = torch.linspace(0, 1, self.n_bins + 1, device=logits.device)
        bins = torch.bucketize(confidence, boundaries, right=True) - 1  # (M, B)
        self.confidence_sum.scatter_add_(1, bins, confidence.double())
        self.correct_sum.scatter_add_(1, bins, correct)
        self.total += batch

    def compute(self) -> dict[str, Tensor]:
        """``acc``, ``ece`` and ``nll`` of every ensemble size."""
        total = self.total.clamp(min=1)
        ece = (self.correct_sum - self.confidence_sum).abs().sum(dim=1) / total
        return {"acc": self.correct / total, "ece": ece, "nll": self.nll_sum / total}
