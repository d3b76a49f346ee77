"""Selective prediction: the risk-coverage curve, its area (AURC) and accuracy at a coverage.

A selective classifier answers only the inputs it is most confident about and abstains on the
rest (Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017).
Rank the ``N`` test samples by a confidence score, most confident first; at coverage
``k / N`` it answers the first ``k`` of them, and its *risk* is the error rate on those ``k``:

    r_k = (1 / k) * sum_{i <= k} 1[y_hat_(i) != y_(i)],   k = 1..N.

The ranking score of the ensemble is the maximum probability (confidence) of its predictive
distribution ``p = 1/M sum_m softmax(z_m / T)`` (``"msp"``, the default); minus the mutual
information between prediction and member (``"mi"``, the epistemic part) is the second score.
The prediction is always the argmax of ``p``.

**AURC** is the definition of torch-uncertainty's ``AURC`` metric, checked against v0.13.0
(``torch_uncertainty/metrics/classification/risk_coverage.py``, ``AURC.compute`` and
``_aurc_rejection_rate_compute``; github.com/ENSTA-U2IS-AI/torch-uncertainty):

- the curve has the ``N`` points ``(k / N, r_k)``, ``k = 1..N`` (no point at coverage 0);
- integration: the trapezoidal rule over these points, i.e. over ``[1/N, 1]``;
- normalisation: divided by the width ``1 - 1/N`` of that support ("as if its support was
  between 0 and 1"), so ``AURC = 1 / (N - 1) * sum_{k=1}^{N-1} (r_k + r_{k+1}) / 2``;
- ``N < 2``: NaN.

**Ties**: torch-uncertainty orders tied scores as ``argsort`` happens to leave them, so its
value depends on the order of the samples. Here a block of tied scores is taken in every
order with equal weight: within a block the cumulative error count grows linearly (the
block's errors spread evenly over its positions), which is the *expected* value of
torch-uncertainty's AURC (and of each ``r_k``) over a random order of the tied samples, since
both are linear in the cumulative error counts. Without ties the two are identical; with ties
the result is independent of the sample order, hence exact under DDP, where gathering changes
the order. Consequences: a constant score (``"mi"`` with ``M = 1``) gives ``r_k`` = the error
rate for every ``k`` and AURC = the error rate, the value of a random ranking.

Reference values with ``E`` errors among ``N`` samples (tested): a random ranking (all scores
tied) gives ``E / N``; a perfect ranking (every error after every correct sample) gives the
minimum, ``1 / (N - 1) * sum_{k=1}^{N-1} (r*_k + r*_{k+1}) / 2`` with
``r*_k = max(0, k - (N - E)) / k`` (tending to ``rho + (1 - rho) ln(1 - rho)``, ``rho = E/N``,
Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019).

**Accuracy at coverage c**: the accuracy on the ``ceil(c * N)`` most confident samples,
``1 - r_ceil(cN)`` (torch-uncertainty's ``RiskAtxCov`` convention, ``1 -`` its value; the
product ``c * N`` is rounded to 9 decimals first so that float error cannot add a sample);
NaN when ``N = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lorae.metrics import functional as LF

__all__ = [
    "COVERAGES",
    "SELECTIVE_SCORES",
    "SelectivePrediction",
    "SelectiveScore",
    "accuracy_at_coverage",
    "aurc",
    "coverage_key",
    "risk_coverage_curve",
    "selective_scores",
]

SelectiveScore = Literal["msp", "mi"]
SELECTIVE_SCORES: tuple[SelectiveScore, ...] = ("msp", "mi")
#: the coverages at which ``lorae test`` reports the accuracy
COVERAGES: tuple[float, ...] = (0.90, 0.95, 0.99)


def coverage_key(coverage: float) -> str:
    """The key of the accuracy at ``coverage``: ``0.9 -> "acc_at_cov90"``."""
    return f"acc_at_cov{round(coverage * 100):d}"


def selective_scores(
    logits: Tensor, target: Tensor, score: SelectiveScore = "msp", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The ranking score (higher = more confident) and the correctness of every sample.

    Args:
        logits: member logits.
        target: class indices.
        score: ``"msp"``: the maximum predictive probability; ``"mi"``: minus the mutual
            information between prediction and member.
        temperature: softmax temperature of every member.

    Returns:
        ``(score, correct)``: the score (float32) and whether the argmax of the ensemble
        predictive equals the target (bool).

    Shape:
        - logits: ``(M, B, C)``; target: ``(B,)``
        - score, correct: ``(B,)``
    """
    log_probs = LF.predictive_log_probs(logits.float(), temperature)
    confidence, prediction = log_probs.max(dim=-1)
    if score == "msp":
        ranking = confidence.exp()
    else:
        ranking = -LF.mutual_information(logits.float(), temperature)
    return ranking, prediction == target


def risk_coverage_curve(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """The risk-coverage curve (Geifman & El-Yaniv 2017), tied scores averaged over orders.

    Args:
        score: ranking score, higher = more confident (answered first); finite.
        correct: whether each prediction is correct.

    Returns:
        ``(coverage, risk)``: ``coverage[k-1] = k / N`` and ``risk[k-1] = r_k``, the error rate
        on the ``k`` most confident samples (see the module docstring for ties), float64.

    Raises:
        ValueError: shapes differ or a score is NaN.

    Shape:
        - score, correct: ``(N,)``
        - coverage, risk: ``(N,)``
    """
    if score.ndim != 1 or score.shape != correct.shape:
        raise ValueError(
            f"Expected score and correct of one shape (N,), got {tuple(score.shape)} and "
            f"{tuple(correct.shape)}."
        )
    if torch.isnan(score).any():
        raise ValueError("Selective-prediction scores must not be NaN.")
    n = score.shape[0]
    device = score.device
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    if n == 0:
        return k, k.clone()
    order = torch.argsort(score, descending=True)
    sorted_score = score[order]
    errors = (~correct.bool())[order].double()
    cumulative = torch.cat([errors.new_zeros(1), errors.cumsum(0)])  # (N + 1,)
    # Tie blocks: positions (start, end] of equal scores; within a block, the expected
    # cumulative error count over all orders of its samples is linear in the position.
    _, counts = torch.unique_consecutive(sorted_score, return_counts=True)
    end = counts.cumsum(0)
    start = end - counts
    block = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts)
    lo, hi, size = start[block], end[block], counts[block].double()
    expected = cumulative[lo] + (k - lo.double()) * (cumulative[hi] - cumulative[lo]) / size
    return k / n, expected / k


def aurc(score: Tensor, correct: Tensor) -> Tensor:
    """Area under the risk-coverage curve, torch-uncertainty's definition (module docstring).

    ``1 / (N - 1) * sum_{k=1}^{N-1} (r_k + r_{k+1}) / 2``: the trapezoidal rule over the
    points ``(k / N, r_k)``, divided by the support's width ``1 - 1/N``; NaN when ``N < 2``.
    Lower is better.

    Shape:
        - score, correct: ``(N,)``
        - output: ``()`` float64
    """
    _, risk = risk_coverage_curve(score, correct)
    return _aurc_from_risk(risk)


def _aurc_from_risk(risk: Tensor) -> Tensor:
    n = risk.shape[0]
    if n < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=risk.device)
    return (risk[:-1] + risk[1:]).sum() / (2 * (n - 1))


def _answered(coverage: float, n: int) -> int:
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"A coverage is in (0, 1], got {coverage!r}.")
    return max(1, math.ceil(round(coverage * n, 9)))


def accuracy_at_coverage(score: Tensor, correct: Tensor, coverage: float) -> Tensor:
    """Accuracy on the ``ceil(coverage * N)`` most confident samples (``1 - r_k``).

    Args:
        score: ranking score, higher = more confident.
        correct: whether each prediction is correct.
        coverage: the share of samples answered, in ``(0, 1]``.

    Returns:
        The selective accuracy (NaN when ``N = 0``), float64.

    Raises:
        ValueError: ``coverage`` is not in ``(0, 1]``.

    Shape:
        - score, correct: ``(N,)``
        - output: ``()``
    """
    _, risk = risk_coverage_curve(score, correct)
    return _accuracy_from_risk(risk, coverage)


def _accuracy_from_risk(risk: Tensor, coverage: float) -> Tensor:
    n = risk.shape[0]
    k = _answered(coverage, n)
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=risk.device)
    return 1.0 - risk[k - 1]


class SelectivePrediction(Metric):
    """Risk-coverage curve, AURC and accuracy at given coverages of the ensemble predictive.

    The states are the per-sample score and correctness (``cat``), gathered across processes
    by ``compute``; tied scores are averaged over their orders, so the result does not depend
    on the order of the samples and is exact under DDP.

    Args:
        score: the ranking score, ``"msp"`` (maximum predictive probability, the default) or
            ``"mi"`` (minus the mutual information).
        temperature: softmax temperature of every member.
        coverages: the coverages of the ``acc_at_cov<percent>`` outputs, each in ``(0, 1]``.

    Shape:
        - logits: ``(M, B, C)``; target: ``(B,)``
        - compute: ``coverage``, ``risk``: ``(N,)``; ``aurc`` and one
          :func:`coverage_key` per coverage: ``()``; all float64.
    """

    full_state_update = False
    higher_is_better = False
    score: list[Tensor]
    correct: list[Tensor]

    def __init__(
        self,
        score: SelectiveScore = "msp",
        temperature: float = 1.0,
        coverages: Sequence[float] = COVERAGES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for coverage in coverages:
            _answered(coverage, 1)  # rejects a coverage outside (0, 1]
        self.score_name: SelectiveScore = score
        self.temperature = temperature
        self.coverages = tuple(float(c) for c in coverages)
        self.add_state("score", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of member logits ``(M, B, C)`` and class indices ``(B,)``."""
        score, correct = selective_scores(logits, target, self.score_name, self.temperature)
        self.score.append(score)
        self.correct.append(correct)

    def compute(self) -> dict[str, Tensor]:
        """``coverage``, ``risk``, ``aurc`` and ``acc_at_cov<percent>`` per coverage."""
        score = self._cat(self.score, torch.float32)
        correct = self._cat(self.correct, torch.bool)
        coverage, risk = risk_coverage_curve(score, correct)
        values = {"coverage": coverage, "risk": risk, "aurc": _aurc_from_risk(risk)}
        for c in self.coverages:
            values[coverage_key(c)] = _accuracy_from_risk(risk, c)
        return values

    def _cat(self, state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
        # a list of batches in one process; one tensor after the DDP gather of ``compute``
        if isinstance(state, Tensor):
            return state
        return dim_zero_cat(state) if state else torch.zeros(0, dtype=dtype, device=self.device)
