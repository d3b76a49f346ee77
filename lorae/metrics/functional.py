"""Functional metrics for an implicit ensemble.

Every function here works on plain tensors. The ensemble's prediction is always the mean over
members of the members' tempered softmax, ``p = 1/M * sum_m softmax(logits_m / T)``, never the
softmax of the mean logits (the two differ as soon as the members disagree).

Letters used in the ``Shape:`` sections: ``M`` ensemble members, ``B`` samples, ``C`` classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "brier_score",
    "expected_calibration_error",
    "expected_member_entropy",
    "member_cross_entropy",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "predictive_log_probs",
    "predictive_probs",
    "predictive_variance",
]


def _check_member_logits(logits: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(
            "Expected member logits of shape (M, B, C) = (members, samples, classes), "
            f"got a {logits.ndim}-D tensor of shape {tuple(logits.shape)}."
        )


def _check_probs_target(probs: Tensor, target: Tensor) -> None:
    if probs.ndim != 2 or target.ndim != 1 or probs.shape[0] != target.shape[0]:
        raise ValueError(
            "Expected (log-)probabilities of shape (B, C) and targets of shape (B,), "
            f"got {tuple(probs.shape)} and {tuple(target.shape)}."
        )


def _member_log_probs(logits: Tensor, temperature: float | Tensor) -> Tensor:
    _check_member_logits(logits)
    return F.log_softmax(logits / temperature, dim=-1)


def predictive_log_probs(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Log of the ensemble's predictive distribution.

    Computes ``log(1/M * sum_m softmax(logits_m / T))`` stably as
    ``logsumexp(log_softmax(logits / T), dim=0) - log(M)``. The result is clamped at 0 from above
    so that float rounding can never produce a "probability" above 1.

    Args:
        logits: Member logits.
        temperature: Softmax temperature ``T`` applied to every member (a float or a scalar
            tensor, e.g. a learned temperature).

    Returns:
        Log-probabilities of the member-averaged softmax.

    Raises:
        ValueError: If ``logits`` is not 3-D.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(B, C)``
    """
    log_p = _member_log_probs(logits, temperature)
    num_members = logits.shape[0]
    return (torch.logsumexp(log_p, dim=0) - math.log(num_members)).clamp(max=0.0)


def predictive_probs(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """The ensemble's predictive distribution, the mean over members of ``softmax(logits / T)``.

    Args:
        logits: Member logits.
        temperature: Softmax temperature ``T`` applied to every member.

    Returns:
        Class probabilities; every row sums to 1.

    Raises:
        ValueError: If ``logits`` is not 3-D.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(B, C)``
    """
    return predictive_log_probs(logits, temperature).exp()


def predictive_variance(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """The ensemble's predictive variance per class, paper Eq. 4:
    ``Var[Y|X] ≈ 1/N Σ_i (T_θi(X) - E[Y|X])²`` with ``T_θi(X)`` member i's softmax and
    ``E[Y|X]`` the predictive (their mean); the population variance (divided by M, not M - 1).

    Args:
        logits: Member logits.
        temperature: Softmax temperature ``T`` applied to every member.

    Raises:
        ValueError: If ``logits`` is not 3-D.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(B, C)``; 0 when all members agree
    """
    probs = _member_log_probs(logits, temperature).exp()  # (M, B, C)
    return (probs - probs.mean(dim=0)).square().mean(dim=0)


def member_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Training loss: the mean over members of each member's cross-entropy.

    Computed as a single ``F.cross_entropy`` on ``logits.flatten(0, 1)`` against
    ``target.repeat(M)``; the flattening is member-major, so row ``m * B + b`` is sample ``b``
    of member ``m`` and is paired with ``target[b]``.

    This equals the mean of the ``M`` per-member losses, also with class weights. With weights,
    ``F.cross_entropy`` returns ``sum_i w[y_i] * l_i / sum_i w[y_i]``. Every member sees the same
    targets, so the normaliser over all ``M * B`` rows is ``M * sum_b w[y_b]``: ``M`` times each
    member's own normaliser. The pooled loss is therefore
    ``1/M * sum_m (sum_b w[y_b] * l_mb / sum_b w[y_b])``, the mean of the per-member losses.

    Args:
        logits: Member logits.
        target: Class indices.
        weight: Optional per-class weights, as in ``F.cross_entropy``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: If ``logits`` is not 3-D or ``target`` does not match its sample dimension.

    Shape:
        - logits: ``(M, B, C)``
        - target: ``(B,)``
        - weight: ``(C,)``
        - output: ``()``
    """
    _check_member_logits(logits)
    if target.ndim != 1 or target.shape[0] != logits.shape[1]:
        raise ValueError(
            f"Expected targets of shape (B,) = ({logits.shape[1]},), got {tuple(target.shape)}."
        )
    num_members = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), target.repeat(num_members), weight=weight)


def predictive_entropy(log_probs: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of a distribution given by its log-probabilities.

    Zero-probability classes (``log p = -inf``) contribute 0 (the convention ``0 log 0 = 0``).

    Args:
        log_probs: Log-probabilities, e.g. from :func:`predictive_log_probs`.

    Returns:
        Entropy in nats per sample.

    Shape:
        - log_probs: ``(B, C)``
        - output: ``(B,)``
    """
    finite_log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * finite_log_probs).sum(dim=-1)


def expected_member_entropy(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Mean over members of each member's predictive entropy (the aleatoric part).

    Args:
        logits: Member logits.
        temperature: Softmax temperature ``T`` applied to every member.

    Returns:
        Expected entropy in nats per sample.

    Raises:
        ValueError: If ``logits`` is not 3-D.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(B,)``
    """
    return predictive_entropy(_member_log_probs(logits, temperature)).mean(dim=0)


def mutual_information(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Mutual information between prediction and member (the epistemic part).

    Predictive entropy minus expected member entropy. It is non-negative in exact arithmetic;
    the result is clamped at 0 from below only to remove float rounding.

    Args:
        logits: Member logits.
        temperature: Softmax temperature ``T`` applied to every member.

    Returns:
        Mutual information in nats per sample; 0 when all members agree.

    Raises:
        ValueError: If ``logits`` is not 3-D.

    Shape:
        - logits: ``(M, B, C)``
        - output: ``(B,)``
    """
    total = predictive_entropy(predictive_log_probs(logits, temperature))
    return (total - expected_member_entropy(logits, temperature)).clamp(min=0.0)


def negative_log_likelihood(log_probs: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood ``-log p_y`` of the true classes.

    Args:
        log_probs: Log-probabilities, e.g. from :func:`predictive_log_probs`.
        target: Class indices.

    Returns:
        Scalar mean NLL in nats.

    Raises:
        ValueError: If the shapes do not match.

    Shape:
        - log_probs: ``(B, C)``
        - target: ``(B,)``
        - output: ``()``
    """
    _check_probs_target(log_probs, target)
    return -log_probs.gather(1, target.unsqueeze(1)).mean()


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - onehot(y)_c)^2``.

    This is the definition of the paper's appendix; for two classes it is twice scikit-learn's
    binary ``brier_score_loss``, which only scores the positive class.

    Args:
        probs: Class probabilities, e.g. from :func:`predictive_probs`.
        target: Class indices.

    Returns:
        Scalar score in ``[0, 2]``.

    Raises:
        ValueError: If the shapes do not match.

    Shape:
        - probs: ``(B, C)``
        - target: ``(B,)``
        - output: ``()``
    """
    _check_probs_target(probs, target)
    one_hot = F.one_hot(target, probs.shape[1]).to(probs.dtype)
    return (probs - one_hot).square().sum(dim=1).mean()


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 10) -> Tensor:
    """Top-1 expected calibration error with equal-width bins.

    ``ECE = sum_b |B_b| / N * |acc_b - conf_b|`` where ``conf`` is the largest probability of a
    sample and the prediction is its first maximising class (as ``torch.max`` breaks ties).

    Bin convention (identical to torchmetrics' ``MulticlassCalibrationError``, which uses
    ``torch.bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1``): bin ``k`` holds
    ``k / n_bins <= conf < (k + 1) / n_bins``, so bins are closed on the left and open on the
    right. A confidence of exactly 0 lands in the first bin; a confidence of exactly 1 lands in
    an extra bin of its own (index ``n_bins``) and is not pooled with ``[1 - 1/n_bins, 1)``.
    Boundaries are built in the dtype of ``probs`` (torchmetrics casts to float32 first).

    Args:
        probs: Class probabilities, e.g. from :func:`predictive_probs`.
        target: Class indices.
        n_bins: Number of equal-width bins over ``[0, 1]``.

    Returns:
        Scalar ECE in ``[0, 1]``.

    Raises:
        ValueError: If the shapes do not match or ``n_bins < 1``.

    Shape:
        - probs: ``(B, C)``
        - target: ``(B,)``
        - output: ``()``
    """
    _check_probs_target(probs, target)
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}.")
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).to(probs.dtype)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    bins = torch.bucketize(confidence, boundaries, right=True) - 1
    conf_sum = torch.zeros(n_bins + 1, dtype=probs.dtype, device=probs.device)
    acc_sum = torch.zeros_like(conf_sum)
    conf_sum.scatter_add_(0, bins, confidence)
    acc_sum.scatter_add_(0, bins, correct)
    # |B_b| / N * |acc_b - conf_b| = |sum of correct in b - sum of confidences in b| / N
    return (acc_sum - conf_sum).abs().sum() / target.shape[0]
