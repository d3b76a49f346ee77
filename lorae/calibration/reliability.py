"""Reliability diagrams (paper Fig. 5, 7, 8): accuracy against confidence per bin.

:class:`ReliabilityBins` accumulates, per equal-width confidence bin, the number of samples, the
sum of their top-1 confidences and the number of correct predictions. The bins follow the
ECE convention of :func:`lorae.metrics.functional.expected_calibration_error` (bin ``k`` holds
``k/n <= conf < (k+1)/n``; a confidence of exactly 1 gets an extra bin ``n``), so the ECE
computed from these bins equals the reported ``ece``. States are sums, exact under DDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lorae.analysis.plots import require_pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ReliabilityBins", "reliability_figure"]


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


def reliability_figure(bins: dict[str, Tensor], title: str = "Reliability diagram") -> Figure:
    """Accuracy per confidence bin with the gap to the diagonal shaded, above a histogram of
    the share of samples per bin (the layout of the paper's Fig. 5).

    The extra bin of confidence exactly 1 is drawn together with the last bin.

    Args:
        bins: the output of :meth:`ReliabilityBins.compute`.
        title: figure title.
    """
    plt = require_pyplot()
    count = bins["count"].double().cpu().numpy().copy()
    conf_sum = np.nan_to_num(bins["confidence"].double().cpu().numpy()) * count
    correct = np.nan_to_num(bins["accuracy"].double().cpu().numpy()) * count
    # Merge the "confidence == 1" bin into the last bin for display.
    for array in (count, conf_sum, correct):
        array[-2] += array[-1]
    count, conf_sum, correct = count[:-1], conf_sum[:-1], correct[:-1]
    n_bins = count.shape[0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    filled = count > 0
    accuracy = np.divide(correct, count, out=np.zeros_like(count), where=filled)
    confidence = np.divide(conf_sum, count, out=centers.copy(), where=filled)

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap_low = np.minimum(accuracy, confidence)
    gap_high = np.maximum(accuracy, confidence)
    top.bar(
        centers[filled],
        (gap_high - gap_low)[filled],
        bottom=gap_low[filled],
        width=width,
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ece = float(bins["ece"])
    top.set_title(f"{title}\nECE = {ece:.4f}")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    share = count / max(count.sum(), 1.0)
    bottom.bar(centers, share, width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top-1 predictive probability)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    return figure
