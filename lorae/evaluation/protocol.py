"""The accumulators of ``lorae test``: every dataloader, every test temperature.

The test split (dataloader 0) and the data module's evaluation sets (dataloader ``1 + i``,
:class:`lorae.data.base.EvaluationSet`) are scored from the same member logits:

- test split: the usual metrics (:class:`~lorae.metrics.EnsembleMetrics`), reliability bins,
  the ensemble-size curve, selective prediction (:class:`~lorae.metrics.SelectivePrediction`:
  risk-coverage curve, AURC, accuracy at 90/95/99% coverage, ranked by the predictive's
  confidence and by mutual information), and (at ``T = 1``) function-space diversity;
- ``kind="shift"`` set: the usual metrics;
- ``kind="ood"`` set: AUROC and AUPRC of the three OOD scores against the test split (positive
  class).

One :class:`VariantEvaluation` per :class:`~lorae.evaluation.result.Variant` (a temperature);
:meth:`TestEvaluation.compute` returns a typed :class:`~lorae.evaluation.result.TestResult`.
All states are torchmetrics states, synchronised across DDP processes by ``compute``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lorae.evaluation.result import (
    Detection,
    Diversity,
    OODResult,
    ReliabilityCurve,
    RiskCoverage,
    Scores,
    SetKind,
    SetResult,
    ShiftResult,
    SizeCurve,
    TestResult,
    Variant,
    VariantResult,
)
from lorae.metrics import functional as LF
from lorae.metrics.classification import EnsembleMetrics
from lorae.metrics.diversity import DiversityMetrics
from lorae.metrics.ensemble_size import EnsembleSizeCurve
from lorae.metrics.ood import OOD_SCORES, OODMetrics
from lorae.metrics.reliability import ReliabilityBins
from lorae.metrics.selective import SELECTIVE_SCORES, SelectivePrediction, SelectiveScore

__all__ = ["TestEvaluation", "VariantEvaluation"]


def _scores(metrics: EnsembleMetrics) -> Scores:
    return Scores.from_tensors(dict(metrics.metrics.compute()), metrics.member_acc.compute())


def _matrix(values: Tensor, size: int) -> tuple[tuple[float, ...], ...]:
    rows = values.detach().double().cpu().reshape(size, size).tolist()
    return tuple(tuple(float(v) for v in row) for row in rows)


class VariantEvaluation(nn.Module):
    """All test metrics at one temperature.

    Args:
        num_classes: C.
        num_members: M.
        n_bins: ECE bins.
        variant: the temperature (and its kind).
        sets: ``(name, kind)`` of each evaluation set, in dataloader order.
        diversity: also accumulate :class:`~lorae.metrics.DiversityMetrics`.

    Shape:
        - logits: ``(M, B, C)``; target ``(B,)``
    """

    def __init__(
        self,
        num_classes: int,
        num_members: int,
        n_bins: int,
        variant: Variant,
        sets: Sequence[tuple[str, SetKind]],
        diversity: bool,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.temperature = variant.temperature
        self.sets = list(sets)
        self.num_members = num_members
        self.test = EnsembleMetrics(num_classes, num_members, n_bins)
        self.reliability = ReliabilityBins(n_bins)
        self.size_curve = EnsembleSizeCurve(num_members, n_bins, self.temperature)
        self._selective: dict[SelectiveScore, SelectivePrediction] = {
            s: SelectivePrediction(s, self.temperature) for s in SELECTIVE_SCORES
        }
        # registered for .to() and DDP
        self.selective = nn.ModuleDict({str(k): v for k, v in self._selective.items()})
        self.diversity = (
            DiversityMetrics(num_members, num_classes, self.temperature) if diversity else None
        )
        self._extra: list[OODMetrics | EnsembleMetrics] = [
            OODMetrics(self.temperature)
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
            for selective in self._selective.values():
                selective.update(logits, target)
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

    def compute(self) -> VariantResult:
        """The typed metrics of this temperature (synchronised across processes)."""
        reliability = ReliabilityCurve.from_tensors(self.reliability.compute())
        size_curve = SizeCurve.from_tensors(self.size_curve.compute())
        diversity = None
        if self.diversity is not None:
            values = self.diversity.compute()
            m = self.num_members
            diversity = Diversity(
                disagreement=float(values["disagreement"]),
                jsd=float(values["jsd"]),
                jsd_per_sample=float(values["jsd_per_sample"]),
                mi=float(values["mi"]),
                disagreement_matrix=_matrix(values["disagreement_matrix"], m),
                jsd_matrix=_matrix(values["jsd_matrix"], m),
                jsd_per_sample_matrix=_matrix(values["jsd_per_sample_matrix"], m),
            )
        sets: list[SetResult] = []
        for (name, _), metric in zip(self.sets, self._extra, strict=True):
            if isinstance(metric, OODMetrics):
                found = metric.compute()
                detections = {
                    score: Detection(float(found[f"{score}/auroc"]), float(found[f"{score}/auprc"]))
                    for score in OOD_SCORES
                }
                sets.append(OODResult(name, detections))
            else:
                sets.append(ShiftResult(name, _scores(metric)))
        return VariantResult(
            variant=self.variant,
            scores=_scores(self.test),
            reliability=reliability,
            size_curve=size_curve,
            diversity=diversity,
            sets=tuple(sets),
            selective={
                score: RiskCoverage.from_tensors(score, metric.compute())
                for score, metric in self._selective.items()
            },
        )


class TestEvaluation(nn.Module):
    """One :class:`VariantEvaluation` per test temperature.

    Args:
        num_classes: C.
        num_members: M.
        n_bins: ECE bins.
        variants: the temperatures; diversity is accumulated for the ``"uncalibrated"`` one
            only (it describes the members, which a common temperature barely changes).
        sets: ``(name, kind)`` of each evaluation set, in dataloader order.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        num_classes: int,
        num_members: int,
        n_bins: int,
        variants: Sequence[Variant] = (Variant("uncalibrated", 1.0),),
        sets: Sequence[tuple[str, SetKind]] = (),
    ) -> None:
        super().__init__()
        prefixes = [v.prefix for v in variants]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"Test variants must have distinct key prefixes, got {prefixes}.")
        self._variants = [
            VariantEvaluation(
                num_classes, num_members, n_bins, v, sets, diversity=v.kind == "uncalibrated"
            )
            for v in variants
        ]
        self.variants = nn.ModuleList(self._variants)  # registered for .to() and DDP

    def update(self, logits: Tensor, target: Tensor, dataloader_idx: int = 0) -> None:
        """Accumulate a batch of member logits ``(M, B, C)`` into every variant."""
        for variant in self._variants:
            variant.update(logits, target, dataloader_idx)

    def compute(self) -> TestResult:
        """The typed result of every variant, in the order given."""
        return TestResult(tuple(variant.compute() for variant in self._variants))
