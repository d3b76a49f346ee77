"""Stateful (torchmetrics) metrics for an implicit ensemble.

All states are sums reduced with ``dist_reduce_fx="sum"``, so the metrics are exact under
distributed data parallel. :class:`EnsembleMetrics` bundles everything the paper reports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
)

from lorae.metrics import functional as LF

__all__ = ["BrierScore", "EnsembleMetrics", "MemberAccuracy", "NegativeLogLikelihood"]


class NegativeLogLikelihood(Metric):
    """Mean negative log-likelihood ``-log p_y`` over all samples seen.

    Args:
        **kwargs: Passed on to :class:`torchmetrics.Metric`.

    Shape:
        - log_probs: ``(B, C)``
        - target: ``(B,)``
        - output of ``compute``: ``()``
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    sum_nll: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_nll", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        """Accumulate a batch of log-probabilities and class indices."""
        self.sum_nll += LF.negative_log_likelihood(log_probs, target) * target.shape[0]
        self.total += target.shape[0]

    def compute(self) -> Tensor:
        """Return the mean NLL."""
        return self.sum_nll / self.total


class BrierScore(Metric):
    """Mean over samples of ``sum_c (p_c - onehot(y)_c)^2``, see :func:`~.functional.brier_score`.

    Args:
        **kwargs: Passed on to :class:`torchmetrics.Metric`.

    Shape:
        - probs: ``(B, C)``
        - target: ``(B,)``
        - output of ``compute``: ``()``
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    sum_score: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_score", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Accumulate a batch of probabilities and class indices."""
        self.sum_score += LF.brier_score(probs, target) * target.shape[0]
        self.total += target.shape[0]

    def compute(self) -> Tensor:
        """Return the mean Brier score."""
        return self.sum_score / self.total


class MemberAccuracy(Metric):
    """Top-1 accuracy of every ensemble member on its own.

    Args:
        num_members: Number of members ``M``.
        **kwargs: Passed on to :class:`torchmetrics.Metric`.

    Shape:
        - logits: ``(M, B, C)``
        - target: ``(B,)``
        - output of ``compute``: ``(M,)``; for ``M = 1`` torchmetrics' compute wrapper squeezes
          one-element results, so it is ``()`` (``.reshape(-1)`` gives ``(1,)``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_members: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_members = num_members
        self.add_state("correct", torch.zeros(num_members, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of member logits and class indices.

        Raises:
            ValueError: If ``logits`` is not ``(num_members, B, C)`` with ``B == len(target)``.
        """
        if logits.ndim != 3 or logits.shape[0] != self.num_members:
            raise ValueError(
                f"Expected member logits of shape (M={self.num_members}, B, C), "
                f"got {tuple(logits.shape)}."
            )
        if target.ndim != 1 or target.shape[0] != logits.shape[1]:
            raise ValueError(
                f"Expected targets of shape (B,) = ({logits.shape[1]},), got {tuple(target.shape)}."
            )
        self.correct += (logits.argmax(dim=-1) == target).sum(dim=1)
        self.total += target.shape[0]

    def compute(self) -> Tensor:
        """Return each member's accuracy."""
        return self.correct.float() / self.total


class EnsembleMetrics(torch.nn.Module):
    """Everything reported for an ensemble: accuracy, macro F1, ECE, NLL, Brier, member accuracy.

    All ensemble metrics are computed on the predictive distribution, the mean over members of
    ``softmax(logits / T)`` (see :func:`~.functional.predictive_probs`).

    Args:
        num_classes: Number of classes ``C``.
        num_members: Number of members ``M``.
        n_bins: Number of equal-width ECE bins.

    Shape:
        - logits: ``(M, B, C)``
        - target: ``(B,)``
    """

    def __init__(self, num_classes: int, num_members: int, n_bins: int = 10) -> None:
        super().__init__()
        self.metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "ece": MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1"),
                "nll": NegativeLogLikelihood(),
                "brier": BrierScore(),
            },
            compute_groups=False,
        )
        self.member_acc = MemberAccuracy(num_members)

    def update(self, logits: Tensor, target: Tensor, temperature: float = 1.0) -> None:
        """Accumulate a batch of member logits and class indices."""
        self.member_acc.update(logits, target)
        log_probs = LF.predictive_log_probs(logits, temperature)
        probs = log_probs.exp()
        for name, metric in self.metrics.items():
            metric.update(log_probs if name == "nll" else probs, target)

    def compute(self) -> dict[str, Tensor]:
        """Return ``acc``, ``f1``, ``ece``, ``nll``, ``brier`` and ``member_acc/<m>``."""
        results: dict[str, Tensor] = dict(self.metrics.compute())
        for m, acc in enumerate(self.member_acc.compute().reshape(-1)):
            results[f"member_acc/{m}"] = acc
        return results

    def reset(self) -> None:
        """Clear all accumulated state."""
        self.metrics.reset()
        self.member_acc.reset()
