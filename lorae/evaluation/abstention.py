r"""Abstention with a finite-sample guarantee: choose a threshold on a ranking score.

A selective classifier answers an input only when its score says it is certain enough and
abstains otherwise. Here the prediction is the ensemble's ``pred`` (argmax of
``1/M sum_m softmax(z_m)``, the ``pred`` column of ``lorae predict``) and the score is one of
(:data:`~lorae.checkpoints.calibration.AbstentionScore`, all at the fitted temperature ``T``):

- ``confidence``: ``max_c p_T(c | x)`` of ``p_T = 1/M sum_m softmax(z_m / T)`` (accept high);
- ``entropy``: ``H[p_T]`` (accept low);
- ``mutual_information``: ``H[p_T] - 1/M sum_m H[softmax(z_m / T)]`` (accept low).

Internally every score is turned into a *certainty* ``s`` (the confidence, or minus the
entropy / mutual information) and an input is accepted iff ``s >= lambda``.

**Target risk (Learn then Test).** For a threshold ``lambda`` let ``R(lambda) = P(pred != Y |
s(X) >= lambda)`` be the selective risk on new data. Given a target ``alpha`` and ``delta``,
:func:`risk_controlling_threshold` returns ``lambda_hat`` with

    P( R(lambda_hat) <= alpha ) >= 1 - delta,

the probability taken over the draw of the ``n`` validation samples (Angelopoulos, Bates,
Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
Control", 2021, arXiv:2110.01052; the same setting as the SGR algorithm of Geifman &
El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017). The procedure:

1. Candidates ``lambda_1 > lambda_2 > ...`` are the distinct validation certainties, from the
   most conservative (fewest accepted) to the least. At ``lambda_j``, ``n_j`` samples are
   accepted and ``k_j`` of them are wrong.
2. Null hypothesis ``H_j: R(lambda_j) > alpha``. Conditional on ``n_j``, the accepted samples
   are i.i.d. draws from the distribution of ``(X, Y)`` given ``s(X) >= lambda_j``, so
   ``k_j ~ Binomial(n_j, R(lambda_j))``; the exact binomial tail
   ``p_j = P(Binomial(n_j, alpha) <= k_j)`` (:func:`binomial_cdf`, float64) is a valid
   p-value: under ``H_j``, ``P(p_j <= delta) <= delta``.
3. Fixed-sequence testing (LTT section 3, "fixed sequence testing"): reject ``H_1, H_2, ...``
   in order while ``p_j <= delta`` and stop at the first ``p_j > delta``. This controls the
   family-wise error rate at ``delta`` with no multiplicity correction, because the order is
   fixed before the labels are looked at; every rejected ``lambda_j`` then has
   ``R(lambda_j) <= alpha`` simultaneously with probability ``>= 1 - delta``.
   ``lambda_hat`` is the last (least conservative) rejected candidate.
4. A candidate with ``n_j < n_min = ceil(log(delta) / log(1 - alpha))`` can never be rejected
   (``p_j >= (1 - alpha)^{n_j} > delta`` whatever the labels), so the sequence starts at the
   first candidate accepting at least ``n_min`` samples, as the LTT reference code starts at
   thresholds with enough accepted samples; otherwise the test would always stop at once.

If no candidate is rejected, no threshold is certified: :class:`RiskNotCertifiableError`
names the smallest risk ``n`` samples could ever certify, ``1 - delta^(1/n)`` (every sample
accepted, none wrong), and the smallest target that passes on this split.

**Target coverage (split conformal).** :func:`coverage_threshold` accepts at least a share
``C`` of new inputs on average: with ``s_(1) >= ... >= s_(n)`` the sorted validation
certainties and ``k = ceil(C (n + 1))``, ``lambda_hat = s_(k)`` (``-inf``, accept every input,
when ``k > n``). For exchangeable validation and test scores,
``P(s_{n+1} >= s_(k)) >= k / (n + 1) >= C``, i.e. the expected coverage
``E[P(s(X) >= lambda_hat | validation)] >= C`` (Vovk, Gammerman, Shafer, "Algorithmic
Learning in a Random World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal
Prediction", 2021, section 1). With continuous scores (no ties) the coverage of
``lambda_hat`` is ``Beta(k, n + 1 - k)``-distributed, so it is also below ``C + 1/(n + 1)`` on
average; it holds on average over validation draws, not for every draw.

**Assumptions.** Validation samples and new inputs are exchangeable (e.g. i.i.d. from one
distribution); a distribution shift voids both guarantees. The score function must not depend
on the validation labels used for the threshold: ``lorae calibrate`` fits the temperature on
the same split by default (one scalar, as ``lorae test --calibrate temperature`` does), a
dependence the proof does not cover; ``--temperature_fraction`` fits it on a separate share
of the validation split so the guarantee holds exactly for the rest. Step 1 also takes the
candidates and step 4 the starting point from the (unlabelled) validation scores, as the LTT
reference code does; the test suite measures the violation rate of the whole procedure on
synthetic data with known risk (tests/evaluation/test_abstention.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lorae.checkpoints.calibration import AbstentionScore, CalibrationRecord
from lorae.errors import ConfigError
from lorae.metrics.functional import (
    mutual_information,
    predictive_entropy,
    predictive_log_probs,
)

__all__ = [
    "CONFORMAL_CITATION",
    "LTT_CITATION",
    "AbstentionThreshold",
    "RiskNotCertifiableError",
    "apply_calibration",
    "binomial_cdf",
    "certainty",
    "coverage_threshold",
    "fixed_sequence_rejections",
    "minimum_certifiable_risk",
    "risk_controlling_threshold",
    "score_values",
    "selective_risk_p_values",
]

LTT_CITATION = (
    "Angelopoulos, Bates, Candes, Jordan, Lei (2021). Learn then Test: Calibrating Predictive "
    "Algorithms to Achieve Risk Control. arXiv:2110.01052; Geifman & El-Yaniv (2017). "
    "Selective Classification for Deep Neural Networks. NeurIPS."
)
CONFORMAL_CITATION = (
    "Vovk, Gammerman, Shafer (2005). Algorithmic Learning in a Random World; Angelopoulos & "
    "Bates (2021). A Gentle Introduction to Conformal Prediction. arXiv:2107.07511."
)

#: rows x columns of one block of binomial terms (float64): bounds the memory of
#: :func:`selective_risk_p_values` to about 32 MiB.
_BLOCK = 1 << 22


class RiskNotCertifiableError(ConfigError):
    """No threshold passes the test: the target risk is too low for this validation split."""


@dataclass(frozen=True)
class AbstentionThreshold:
    """A chosen threshold on the certainty and what it does on the validation samples.

    Attributes:
        threshold: accept iff certainty ``>= threshold`` (``-inf``: accept everything).
        num_samples: validation samples ``n``.
        num_accepted: samples accepted at ``threshold``.
        num_errors: wrong predictions among them.
        p_value: the binomial p-value of the chosen threshold (target risk only).
    """

    threshold: float
    num_samples: int
    num_accepted: int
    num_errors: int
    p_value: float | None = None

    @property
    def coverage(self) -> float:
        """Share of the validation samples accepted."""
        return self.num_accepted / self.num_samples

    @property
    def risk(self) -> float:
        """Error rate among the accepted validation samples (NaN when none is accepted)."""
        return self.num_errors / self.num_accepted if self.num_accepted else math.nan


def score_values(logits: Tensor, temperature: float, score: AbstentionScore) -> Tensor:
    """The ranking score in its own units, from the member logits at temperature ``T``.

    Returns:
        ``confidence`` (max of ``1/M sum_m softmax(z_m / T)``), ``entropy`` of that predictive
        or the members' ``mutual_information`` (nats), float64.

    Shape:
        logits: ``(M, N, C)`` -> ``(N,)``.
    """
    z = logits.double()
    log_probs = predictive_log_probs(z, temperature)
    if score == "confidence":
        return log_probs.max(-1).values.exp()
    if score == "entropy":
        return predictive_entropy(log_probs)
    if score == "mutual_information":
        return mutual_information(z, temperature)
    raise ConfigError(
        f"Unknown abstention score {score!r}: use confidence, entropy or mutual_information."
    )


def certainty(values: Tensor, score: AbstentionScore) -> Tensor:
    """Score values turned into a certainty (higher = more certain): the confidence itself,
    minus the entropy or minus the mutual information. Shape: ``(N,) -> (N,)``."""
    return values if score == "confidence" else -values


def binomial_cdf(k: Tensor, n: Tensor, p: float) -> Tensor:
    """Exact ``P(Binomial(n, p) <= k)`` in float64, elementwise.

    Sums the probability mass ``C(n, i) p^i (1 - p)^(n - i)`` for ``i = 0..k`` in log space
    (``lgamma`` for the binomial coefficient, ``logsumexp`` for the sum), so it stays exact to
    float64 rounding for any ``n``; memory is ``numel x (max k + 1)``.

    Args:
        k: counts (``k < 0`` gives 0, ``k >= n`` gives 1).
        n: numbers of trials, ``>= 0``.
        p: success probability in ``[0, 1]``.

    Shape:
        k, n: broadcastable -> their broadcast shape.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p!r}.")
    k, n = torch.broadcast_tensors(k.double(), n.double())
    if k.numel() == 0:
        return k.clone()
    if p == 0.0 or p == 1.0:
        return (k >= (0 if p == 0.0 else n)).double()
    top = int(k.clamp(min=0).max())
    i = torch.arange(top + 1, dtype=torch.float64)
    n_ = n.unsqueeze(-1)
    valid = (i <= k.unsqueeze(-1)) & (i <= n_)
    safe_i = torch.minimum(i.expand_as(valid), n_)  # keeps lgamma's argument positive
    log_pmf = (
        torch.lgamma(n_ + 1)
        - torch.lgamma(safe_i + 1)
        - torch.lgamma(n_ - safe_i + 1)
        + safe_i * math.log(p)
        + (n_ - safe_i) * math.log1p(-p)
    )
    log_pmf = log_pmf.masked_fill(~valid, -math.inf)
    cdf = torch.logsumexp(log_pmf, dim=-1).exp().clamp(max=1.0)
    return torch.where(k < 0, torch.zeros_like(cdf), cdf)


def selective_risk_p_values(num_accepted: Tensor, num_errors: Tensor, alpha: float) -> Tensor:
    """The LTT p-values ``P(Binomial(n_j, alpha) <= k_j)`` of ``H_j: R(lambda_j) > alpha``.

    ``n_j = 0`` gives 1 (nothing accepted: no evidence).

    Shape:
        num_accepted, num_errors: ``(J,)`` -> ``(J,)`` float64.
    """
    return torch.cat([p for _, p in _p_value_blocks(num_accepted, num_errors, alpha)])


def _p_value_blocks(
    num_accepted: Tensor, num_errors: Tensor, alpha: float
) -> Iterator[tuple[int, Tensor]]:
    """:func:`selective_risk_p_values` in consecutive blocks ``(start, p_values)`` whose
    binomial terms fit in :data:`_BLOCK` float64 numbers, so a caller can stop early."""
    count = num_accepted.shape[0]
    if count == 0:
        yield 0, torch.ones(0, dtype=torch.float64)
    start = 0
    while start < count:
        rows = max(1, _BLOCK // (int(num_errors[start:].max().clamp(min=0)) + 1))
        stop = min(start + rows, count)
        yield start, binomial_cdf(num_errors[start:stop], num_accepted[start:stop], alpha)
        start = stop


def fixed_sequence_rejections(p_values: Tensor, delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects: it rejects ``H_1, H_2, ...`` in
    order while ``p_j <= delta`` and stops at the first ``p_j > delta`` (family-wise error
    rate ``<= delta`` for an order fixed in advance; LTT, section 3).

    Shape:
        p_values: ``(J,)`` in testing order.
    """
    failed = torch.nonzero(p_values > delta)
    return int(failed[0, 0]) if failed.numel() else int(p_values.shape[0])


def minimum_certifiable_risk(num_samples: int, delta: float) -> float:
    """The smallest target risk any threshold can certify with ``n`` validation samples,
    ``1 - delta^(1/n)``: the binomial test needs ``(1 - alpha)^n <= delta`` even when all
    ``n`` samples are accepted and none is wrong."""
    return 1.0 - delta ** (1.0 / num_samples) if num_samples > 0 else 1.0


def _check_inputs(scores: Tensor, errors: Tensor) -> tuple[Tensor, Tensor]:
    if scores.ndim != 1 or scores.shape != errors.shape:
        raise ValueError(
            f"Expected certainties and errors of one shape (N,), got {tuple(scores.shape)} and "
            f"{tuple(errors.shape)}."
        )
    if scores.shape[0] == 0:
        raise ConfigError("The validation split is empty: no threshold can be chosen.")
    if torch.isnan(scores).any():
        raise ValueError("Certainty scores must not be NaN.")
    return scores.double().cpu(), errors.bool().cpu()


def _candidates(scores: Tensor, errors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct certainties, most conservative first, and the accepted / wrong counts at each
    (accept iff certainty >= candidate). Shape: ``(N,)`` -> three ``(J,)``."""
    order = torch.argsort(scores, descending=True)
    sorted_scores = scores[order]
    cumulative_errors = errors[order].long().cumsum(0)
    values, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    last = counts.cumsum(0) - 1  # index of the last sample of each tie block
    return values, last + 1, cumulative_errors[last]


def _fixed_sequence(
    accepted: Tensor, wrong: Tensor, alpha: float, delta: float
) -> tuple[int, float] | None:
    """Fixed-sequence testing over the candidates: the index of the last rejected one and
    its p-value, or ``None`` when none is rejected. Starts at the first candidate with
    ``n_j >= n_min`` (module docstring, step 4) and stops computing at the first failure."""
    n_min = math.ceil(math.log(delta) / math.log1p(-alpha))
    usable = torch.nonzero(accepted >= n_min)
    if not usable.numel():
        return None
    first = int(usable[0, 0])
    last: tuple[int, float] | None = None
    for start, p_values in _p_value_blocks(accepted[first:], wrong[first:], alpha):
        rejected = fixed_sequence_rejections(p_values, delta)
        if rejected:
            last = first + start + rejected - 1, float(p_values[rejected - 1])
        if rejected < p_values.shape[0]:
            break
    return last


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value!r}.")


def risk_controlling_threshold(
    scores: Tensor, errors: Tensor, alpha: float, delta: float = 0.1
) -> AbstentionThreshold:
    """The least conservative threshold certified to have selective risk ``<= alpha`` with
    probability ``>= 1 - delta`` (Learn then Test with fixed-sequence testing and exact
    binomial p-values; see the module docstring for the procedure and its assumptions).

    Args:
        scores: certainty of each validation sample (higher = more certain).
        errors: whether the prediction on each validation sample is wrong.
        alpha: target selective risk, in ``(0, 1)``.
        delta: failure probability of the guarantee, in ``(0, 1)``.

    Raises:
        ConfigError: ``alpha`` or ``delta`` out of range, or no samples.
        RiskNotCertifiableError: no threshold passes; the message gives the smallest risk
            certifiable with this many samples and the smallest target passing on this split.

    Shape:
        scores, errors: ``(N,)``.
    """
    _check_level("The target risk", alpha)
    _check_level("delta", delta)
    scores, errors = _check_inputs(scores, errors)
    values, accepted, wrong = _candidates(scores, errors)
    chosen = _fixed_sequence(accepted, wrong, alpha, delta)
    n = scores.shape[0]
    if chosen is None:
        floor = minimum_certifiable_risk(n, delta)
        best = _smallest_passing_risk(accepted, wrong, delta, floor)
        on_split = (
            f"on this split the smallest target risk that passes is about {best:.4g}"
            if best is not None
            else "on this split no target risk passes (wrong predictions among its most "
            "certain inputs stop the test at its start)"
        )
        raise RiskNotCertifiableError(
            f"No abstention threshold certifies a selective risk <= {alpha:g} with probability "
            f">= {1 - delta:g} on {n} validation samples: the smallest risk {n} samples can "
            f"certify is {floor:.4g} (all accepted, none wrong), and {on_split}. Use a larger "
            "validation split (e.g. data.init_args.val_fraction), a larger --target_risk or a "
            "larger --delta."
        )
    index, p_value = chosen
    return AbstentionThreshold(
        float(values[index]), n, int(accepted[index]), int(wrong[index]), p_value
    )


def _smallest_passing_risk(
    accepted: Tensor, wrong: Tensor, delta: float, floor: float
) -> float | None:
    """The smallest target risk for which :func:`risk_controlling_threshold` finds a threshold
    on these samples (for the error message): a log-spaced scan from ``floor`` to 1 (passing
    is not monotone in the target, since the start of the sequence moves with it), refined by
    bisection below the first target that passes."""
    grid = torch.logspace(math.log10(floor), math.log10(0.999), 100, dtype=torch.float64)
    previous = floor
    for alpha in grid.tolist():
        if _fixed_sequence(accepted, wrong, alpha, delta) is not None:
            low, high = previous, alpha
            for _ in range(20):
                middle = (low + high) / 2
                if _fixed_sequence(accepted, wrong, middle, delta) is None:
                    low = middle
                else:
                    high = middle
            return high
        previous = alpha
    return None


def coverage_threshold(scores: Tensor, errors: Tensor, coverage: float) -> AbstentionThreshold:
    """The split-conformal threshold accepting at least a share ``coverage`` of new inputs in
    expectation: the ``k``-th largest validation certainty, ``k = ceil(coverage (n + 1))``
    (``-inf``, accept all, when ``k > n``); see the module docstring for the guarantee.

    Args:
        scores: certainty of each validation sample (higher = more certain).
        errors: whether the prediction on each validation sample is wrong (for the report).
        coverage: target share of accepted inputs, in ``(0, 1)``.

    Shape:
        scores, errors: ``(N,)``.
    """
    _check_level("The target coverage", coverage)
    scores, errors = _check_inputs(scores, errors)
    n = scores.shape[0]
    k = math.ceil(round(coverage * (n + 1), 9))  # rounded: float error must not add a sample
    threshold = -math.inf if k > n else float(torch.sort(scores, descending=True).values[k - 1])
    accept = scores >= threshold
    return AbstentionThreshold(threshold, n, int(accept.sum()), int((accept & errors).sum()))


def apply_calibration(logits: Tensor, record: CalibrationRecord) -> dict[str, Tensor]:
    """What a calibrated checkpoint adds to a prediction.

    Returns:
        ``calibrated_probs``: ``1/M sum_m softmax(z_m / T)`` ``(B, C)``; with a threshold
        also ``abstain``: 1 where the score is on the abstaining side of it, else 0 ``(B,)``
        (int64).

    Shape:
        logits: ``(M, B, C)``.
    """
    z = logits.double()
    out = {"calibrated_probs": predictive_log_probs(z, record.temperature).exp()}
    if record.threshold is not None:
        values = score_values(z, record.temperature, record.score)
        accept = certainty(values, record.score) >= _certainty_threshold(record)
        out["abstain"] = (~accept).long()
    return out


def _certainty_threshold(record: CalibrationRecord) -> float:
    assert record.threshold is not None
    return record.threshold if record.score == "confidence" else -record.threshold
