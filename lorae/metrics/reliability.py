"""Reliability diagrams (paper Fig. 5, 7, 8): accuracy against confidence per bin.

:class:`ReliabilityBins` accumulates, per equal-width confidence bin, the number of samples, the
sum of their top-1 confidences and the number of correct predictions. The bins follow the
ECE convention of :func:`lorae.metrics.functional.expected_calibration_error` (bin ``k`` holds
``k/n <= conf < (k+1)/n``; a confidence of exactly 1 gets an extra bin ``n``), so the ECE
computed from these bins equals the reported ``ece``. States are sums, exact under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ReliabilityBins"]


class ReliabilityBins(Metric):
    """Per-bin counts, confidence sums and correct counts of top-1 predictions.

    Args:
        n_bins: equal-width bins over ``[0, 1]`` (plus one bin for confidence exactly 1).

    Shape:
        - probs: ``(B, C)``
        - target: ``(B,)``
        - compute: ``count``, ``confidence`` (mean per bin, NaN when empty), ``accuracy``
          (NaN when empty), each ``(n_bins + 1,)``; ``ece`` ``()``.
    """

    full_state_update = False
    count: Tensor
    confidence_sum: Tensor
    correct_sum: Tensor

    def __init__(self, n_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        for name in ("count", "confidence_sum", "correct_sum"):
            self.add_state(name, torch.zeros(n_bins + 1, dtype=torch.float64), "sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Accumulate a batch of predictive probabilities and class indices."""
        confidence, prediction = probs.float().max(dim=1)
        boundaries = torch.linspace(0, 1, self.n_bins + 1, device=probs.device)
        bins = torch.bucketize(confidence, boundaries, right=True) - 1
        correct = (prediction == target).double()
        self.count.scatter_add_(0, bins, torch.ones_like(correct))
        self.confidence_sum.scatter_add_(0, bins, confidence.double())
        self.correct_sum.scatter_add_(0, bins, correct)

    def compute(self) -> dict[str, Tensor]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy``, and the ``ece``."""
        total = self.count.sum().clamp(min=1)
        ece = (self.correct_sum - self.confidence_sum).abs().sum() / total
        empty = self.count == 0
        denominator = self.count.clamp(min=1)
        nan = torch.full_like(self.count, float("nan"))
        return {
            "count": self.count,
            "confidence": torch.where(empty, nan, self.confidence_sum / denominator),
            "accuracy": torch.where(empty, nan, self.correct_sum / denominator),
            "ece": ece,
        }
