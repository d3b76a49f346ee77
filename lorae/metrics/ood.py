"""Out-of-distribution detection from member logits (paper section 3).

An OOD score is a number per sample that is *higher for in-distribution* samples, so that
in-distribution is the positive class of the binary AUROC / AUPRC (as the paper reports them).
Three scores are computed from the same member logits:

- ``msp``: maximum softmax probability of the ensemble predictive (the paper's score);
- ``entropy``: minus the predictive entropy (total uncertainty);
- ``mi``: minus the mutual information between prediction and member (epistemic part; constant
  0 for a single model, which then scores AUROC 0.5).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from lorae.metrics import functional as LF

__all__ = ["OOD_SCORES", "OODMetrics", "OODScore", "ood_scores"]

OODScore = Literal["msp", "entropy", "mi"]
OOD_SCORES: tuple[OODScore, ...] = ("msp", "entropy", "mi")


def ood_scores(logits: Tensor, temperature: float | Tensor = 1.0) -> dict[OODScore, Tensor]:
    """The three in-distribution scores of every sample (higher = more in-distribution).

    Args:
        logits: member logits.
        temperature: softmax temperature applied to every member.

    Returns:
        ``{"msp": max_c p_c, "entropy": -H[p], "mi": -I}`` with ``p`` the ensemble predictive.

    Shape:
        - logits: ``(M, B, C)``
        - each output: ``(B,)``
    """
    log_probs = LF.predictive_log_probs(logits, temperature)
    return {
        "msp": log_probs.max(dim=-1).values.exp(),
        "entropy": -LF.predictive_entropy(log_probs),
        "mi": -LF.mutual_information(logits, temperature),
    }


class OODMetrics(nn.Module):
    """AUROC and AUPRC of every OOD score, in-distribution samples being the positive class.

    Feed the in-distribution test split with ``in_distribution=True`` and the OOD set with
    ``False``. The torchmetrics states are lists of scores gathered across processes, so the
    result is exact under DDP.

    Args:
        temperature: softmax temperature applied to every member before scoring.

    Shape:
        - logits: ``(M, B, C)``
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self._auroc: dict[str, BinaryAUROC] = {s: BinaryAUROC() for s in OOD_SCORES}
        self._auprc: dict[str, BinaryAveragePrecision] = {
            s: BinaryAveragePrecision() for s in OOD_SCORES
        }
        # registered so that .to(), DDP synchronisation and reset reach them
        self.auroc = nn.ModuleDict(self._auroc)
        self.auprc = nn.ModuleDict(self._auprc)

    def update(self, logits: Tensor, in_distribution: bool) -> None:
        """Accumulate the scores of a batch that is entirely in- or out-of-distribution."""
        scores = ood_scores(logits.float(), self.temperature)
        label = torch.full(
            (logits.shape[1],), int(in_distribution), dtype=torch.long, device=logits.device
        )
        for name, score in scores.items():
            self._auroc[name].update(score, label)
            self._auprc[name].update(score, label)

    def compute(self) -> dict[str, Tensor]:
        """``{"<score>/auroc": ..., "<score>/auprc": ...}`` for ``score`` in :data:`OOD_SCORES`."""
        results: dict[str, Tensor] = {}
        for name in OOD_SCORES:
            results[f"{name}/auroc"] = self._auroc[name].compute()
            results[f"{name}/auprc"] = self._auprc[name].compute()
        return results

    def reset(self) -> None:
        """Clear all accumulated scores."""
        for metric in (*self._auroc.values(), *self._auprc.values()):
            metric.reset()
