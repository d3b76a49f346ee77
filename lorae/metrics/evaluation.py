"""Everything ``lorae test`` computes, for every dataloader and every test temperature.

The test split (dataloader 0) and the data module's evaluation sets (dataloader ``1 + i``,
:class:`lorae.data.base.EvaluationSet`) are scored from the same member logits:

- test split: the usual metrics (:class:`~lorae.metrics.EnsembleMetrics`), reliability bins,
  the ensemble-size curve, and (at ``T = 1``) function-space diversity;
- ``kind="shift"`` set: the usual metrics, under ``shift/<name>/``;
- ``kind="ood"`` set: AUROC and AUPRC of the three OOD scores against the test split (positive
  class), under ``ood/<name>/<score>/``.

Each *variant* is a temperature with a key prefix: ``""`` at ``T = 1`` always, ``calibrated/``
after temperature scaling, ``temperature/<T>/`` for a temperature sweep. All states are
torchmetrics states, synchronised across DDP processes by ``compute``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lorae.analysis.diversity import DiversityMetrics
from lorae.analysis.ensemble_size import EnsembleSizeCurve
from lorae.calibration.reliability import ReliabilityBins
from lorae.metrics import functional as LF
from lorae.metrics.classification import EnsembleMetrics
from lorae.metrics.ood import OODMetrics

__all__ = ["TestEvaluation", "VariantEvaluation"]

SetKind = Literal["ood", "shift"]


class VariantEvaluation(nn.Module):
    """All test metrics at one temperature.

    Args:
        num_classes: C.
        num_members: M.
        n_bins: ECE bins.
        temperature: softmax temperature of every member.
        sets: ``(name, kind)`` of each evaluation set, in dataloader order.
        diversity: also accumulate :class:`~lorae.analysis.diversity.DiversityMetrics`.

    Shape:
        - logits: ``(M, B, C)``; target ``(B,)``
    """

    def __init__(
        self,
        num_classes: int,
        num_members: int,
        n_bins: int,
        temperature: float,
        sets: Sequence[tuple[str, SetKind]],
        diversity: bool,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.sets = list(sets)
        self.test = EnsembleMetrics(num_classes, num_members, n_bins)
        self.reliability = ReliabilityBins(n_bins)
        self.size_curve = EnsembleSizeCurve(num_members, n_bins, temperature)
        self.diversity = DiversityMetrics(num_members, temperature) if diversity else None
        self._extra: list[OODMetrics | EnsembleMetrics] = [
            OODMetrics(temperature)
            if kind == "ood"
            else EnsembleMetrics(num_classes, num_members, n_bins)
            for _, kind in self.sets
        ]
        self.extra = nn.ModuleList(self._extra)  # registered for .to() and DDP

    def update(self, logits: Tensor, target: Tensor, dataloader_idx: int) -> None:
        """Accumulate a batch of dataloader ``dataloader_idx`` (0: the test split)."""
        if dataloader_idx == 0:
            self.test.update(logits, target, self.temperature)
            probs = LF.predictive_probs(logits.float(), self.temperature)
            self.reliability.update(probs, target)
            self.size_curve.update(logits, target)
            if self.diversity is not None:
                self.diversity.update(logits)
            for metric in self._extra:
                if isinstance(metric, OODMetrics):
                    metric.update(logits, in_distribution=True)
            return
        metric = self._extra[dataloader_idx - 1]
        if isinstance(metric, OODMetrics):
            metric.update(logits, in_distribution=False)
        else:
            metric.update(logits, target, self.temperature)

    def compute(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(scalars, arrays)``: scalar metrics to log (keys without the ``test/`` prefix) and
        the arrays behind the plots (reliability bins, size curve, diversity matrices)."""
        scalars: dict[str, Tensor] = dict(self.test.compute())
        arrays: dict[str, Tensor] = {}
        for name, value in self.reliability.compute().items():
            arrays[f"reliability/{name}"] = value
        # torchmetrics squeezes one-element results (M = 1): restore the member axes.
        curve = {k: v.reshape(-1) for k, v in self.size_curve.compute().items()}
        for name, values in curve.items():
            arrays[f"ensemble_size/{name}"] = values
            for k, value in enumerate(values, start=1):
                scalars[f"ensemble_size/{k}/{name}"] = value
        if self.diversity is not None:
            m = self.diversity.num_members
            for name, value in self.diversity.compute().items():
                if name.endswith("_matrix"):
                    arrays[f"diversity/{name}"] = value.reshape(m, m)
                else:
                    scalars[f"diversity/{name}"] = value
        for (set_name, kind), metric in zip(self.sets, self._extra, strict=True):
            for name, value in metric.compute().items():
                if not name.startswith("member_acc/"):
                    scalars[f"{kind}/{set_name}/{name}"] = value
        return scalars, arrays


class TestEvaluation(nn.Module):
    """One :class:`VariantEvaluation` per test temperature.

    Args:
        num_classes: C.
        num_members: M.
        n_bins: ECE bins.
        temperatures: key prefix -> temperature (``{"": 1.0}``: plain evaluation).
        sets: ``(name, kind)`` of each evaluation set, in dataloader order.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        num_classes: int,
        num_members: int,
        n_bins: int,
        temperatures: Mapping[str, float],
        sets: Sequence[tuple[str, SetKind]] = (),
    ) -> None:
        super().__init__()
        self.temperatures = dict(temperatures)
        self.prefixes = list(temperatures)
        self._variants = [
            VariantEvaluation(num_classes, num_members, n_bins, t, sets, diversity=p == "")
            for p, t in temperatures.items()
        ]
        self.variants = nn.ModuleList(self._variants)  # registered for .to() and DDP

    def update(self, logits: Tensor, target: Tensor, dataloader_idx: int = 0) -> None:
        """Accumulate a batch of member logits ``(M, B, C)`` into every variant."""
        for variant in self._variants:
            variant.update(logits, target, dataloader_idx)

    def compute(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Scalars and arrays of every variant, keys prefixed with the variant's prefix."""
        scalars: dict[str, Tensor] = {}
        arrays: dict[str, Tensor] = {}
        for prefix, variant in zip(self.prefixes, self._variants, strict=True):
            variant_scalars, variant_arrays = variant.compute()
            if prefix:
                variant_scalars["temperature"] = torch.tensor(self.temperatures[prefix])
            scalars.update({prefix + k: v for k, v in variant_scalars.items()})
            arrays.update({prefix + k: v for k, v in variant_arrays.items()})
        return scalars, arrays
