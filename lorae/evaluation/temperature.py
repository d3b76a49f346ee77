"""Post-hoc temperature scaling of an ensemble (Guo et al. 2017; paper appendix K).

One temperature ``T > 0`` is shared by every member: the calibrated predictive distribution is
``p_T = 1/M * sum_m softmax(logits_m / T)``, the same predictive every metric reads (each
member's logits divided by ``T``, softmaxes averaged). ``T`` minimises the negative
log-likelihood of ``p_T`` on the validation split; it is optimised as ``log T`` (so it stays
positive) with L-BFGS. With ``M = 1`` this is ordinary temperature scaling of a single model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorae.metrics.functional import negative_log_likelihood, predictive_log_probs

__all__ = ["TemperatureFit", "fit_temperature"]


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`.

    Attributes:
        temperature: the fitted ``T``.
        nll_before: NLL of the predictive at ``T = 1`` on the fitting data.
        nll_after: NLL of the predictive at the fitted ``T`` on the fitting data.
        num_samples: number of samples the temperature was fitted on.
    """

    temperature: float
    nll_before: float
    nll_after: float
    num_samples: int


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    max_iter: int = 100,
    bounds: tuple[float, float] = (1e-2, 1e2),
) -> TemperatureFit:
    """Fit one temperature for all members by minimising the NLL of the ensemble predictive.

    The objective ``NLL(T) = -1/N sum_n log p_T(y_n | x_n)`` is minimised over ``log T`` with
    L-BFGS (strong-Wolfe line search), in float64 on the CPU so the result does not depend on
    the device or the precision the logits were computed in.

    Args:
        logits: member logits of the fitting (validation) samples.
        target: class indices.
        max_iter: L-BFGS iterations.
        bounds: the fitted ``T`` is clamped into this range (a degenerate split, e.g. one
            where every prediction is right, drives ``T`` towards 0).

    Returns:
        The temperature and the NLL before and after scaling.

    Raises:
        ValueError: if ``logits`` is not 3-D, the shapes do not match or there are no samples.

    Shape:
        - logits: ``(M, N, C)``
        - target: ``(N,)``
    """
    if logits.ndim != 3 or target.ndim != 1 or logits.shape[1] != target.shape[0]:
        raise ValueError(
            "Expected member logits (M, N, C) and targets (N,), "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}."
        )
    if target.shape[0] == 0:
        raise ValueError("Cannot fit a temperature on zero samples.")
    # Lightning tests under torch.inference_mode; autograd needs ordinary tensors (clones).
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to(device="cpu", dtype=torch.float64).clone()
        y = target.detach().to(device="cpu", dtype=torch.long).clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = negative_log_likelihood(predictive_log_probs(z, log_t.exp()), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    low, high = bounds
    temperature = float(min(max(math.exp(float(log_t.detach())), low), high))
    with torch.no_grad():
        before = negative_log_likelihood(predictive_log_probs(z, 1.0), y)
        after = negative_log_likelihood(predictive_log_probs(z, temperature), y)
    return TemperatureFit(temperature, float(before), float(after), int(y.shape[0]))
