"""The typed result of ``lorae test`` (:class:`TestResult`) and its one flattening into keys.

:meth:`TestResult.log_values` is the only place that knows the ``test/...`` metric keys; the
tables, figures and ``metrics.json`` extras read the typed fields. :func:`key_table` renders the
key layout for ``docs/evaluation.md`` from the same field and score names (a test keeps the
document equal to it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal, TypedDict

from torch import Tensor

from lorae.metrics.ood import OOD_SCORES, OODScore
from lorae.metrics.selective import COVERAGES, SELECTIVE_SCORES, SelectiveScore, coverage_key

__all__ = [
    "CALIBRATED_PREFIX",
    "SWEEP_PREFIX",
    "ClassAccuracy",
    "Detection",
    "Diversity",
    "OODResult",
    "ReliabilityCurve",
    "RiskCoverage",
    "Scores",
    "ShiftResult",
    "SizeCurve",
    "TestResult",
    "TestStepOutput",
    "Variant",
    "VariantResult",
    "key_table",
]

SetKind = Literal["ood", "shift"]
VariantKind = Literal["uncalibrated", "calibrated", "sweep"]
CALIBRATED_PREFIX = "calibrated/"
SWEEP_PREFIX = "temperature/"
SCORE_NAMES = ("acc", "f1", "ece", "nll", "brier")
CURVE_NAMES = ("acc", "ece", "nll")
DIVERSITY_NAMES = ("disagreement", "jsd", "jsd_per_sample", "mi")
SELECTIVE_NAMES = ("aurc", *(coverage_key(c) for c in COVERAGES))
#: key prefix of the selective-prediction keys ranked by mutual information (``"msp"`` has none)
BY_MI_PREFIX = "by_mi/"


class TestStepOutput(TypedDict):
    """What a tested module's ``test_step`` returns for the test protocol (a typed mapping,
    because Lightning types a step's output as a tensor or a mapping).

    Shape:
        - logits: ``(M, B, C)`` member logits, float32
        - target: ``(B,)`` class indices (an OOD set's targets are ignored)
    """

    logits: Tensor
    target: Tensor


def _floats(values: Tensor) -> tuple[float, ...]:
    # torchmetrics squeezes one-element results (M = 1): restore the axis.
    return tuple(float(v) for v in values.detach().double().cpu().reshape(-1).tolist())


@dataclass(frozen=True)
class Variant:
    """One temperature at which every test metric is computed.

    Attributes:
        kind: ``"uncalibrated"`` (``T = 1``, keys ``test/...``), ``"calibrated"`` (fitted on
            the validation split, ``test/calibrated/...``) or ``"sweep"``
            (``--temperature_sweep``, ``test/temperature/<T>/...``).
        temperature: softmax temperature of every member.
    """

    kind: VariantKind
    temperature: float

    @property
    def prefix(self) -> str:
        """Key prefix after ``test/``: ``""``, ``"calibrated/"`` or ``"temperature/<T>/"``."""
        if self.kind == "uncalibrated":
            return ""
        if self.kind == "calibrated":
            return CALIBRATED_PREFIX
        return f"{SWEEP_PREFIX}{self.temperature:g}/"


@dataclass(frozen=True)
class Scores:
    """Metrics of the ensemble predictive on one labelled set.

    Attributes:
        acc: accuracy. f1: macro F1. ece: expected calibration error. nll: negative
        log-likelihood. brier: Brier score (sum over classes).
        member_acc: accuracy of each member on its own, length M.
    """

    acc: float
    f1: float
    ece: float
    nll: float
    brier: float
    member_acc: tuple[float, ...]

    @classmethod
    def from_tensors(cls, values: dict[str, Tensor], member_acc: Tensor) -> Scores:
        """From :meth:`lorae.metrics.EnsembleMetrics.compute`'s scalars and member accuracies."""
        scalars = {name: float(values[name]) for name in SCORE_NAMES}
        return cls(**scalars, member_acc=_floats(member_acc))

    def items(self, members: bool) -> Iterator[tuple[str, float]]:
        """``(name, value)`` of every scalar; ``member_acc/<m>`` too when ``members``."""
        for name in SCORE_NAMES:
            yield name, getattr(self, name)
        if members:
            for m, value in enumerate(self.member_acc):
                yield f"member_acc/{m}", value


@dataclass(frozen=True)
class ReliabilityCurve:
    """Reliability diagram bins (:class:`lorae.metrics.ReliabilityBins`).

    Shape:
        count, confidence, accuracy: ``(n_bins + 1,)`` (the last bin: confidence exactly 1;
        confidence and accuracy NaN where a bin is empty).
    """

    count: tuple[float, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    ece: float

    @classmethod
    def from_tensors(cls, bins: dict[str, Tensor]) -> ReliabilityCurve:
        """From :meth:`lorae.metrics.ReliabilityBins.compute`."""
        names = ("count", "confidence", "accuracy")
        return cls(**{name: _floats(bins[name]) for name in names}, ece=float(bins["ece"]))


@dataclass(frozen=True)
class SizeCurve:
    """Metrics of the first ``k`` members, ``k = 1..M`` (entry ``k - 1``).

    Shape:
        acc, ece, nll: ``(M,)``
    """

    acc: tuple[float, ...]
    ece: tuple[float, ...]
    nll: tuple[float, ...]

    @classmethod
    def from_tensors(cls, curve: dict[str, Tensor]) -> SizeCurve:
        """From :meth:`lorae.metrics.EnsembleSizeCurve.compute`."""
        return cls(**{name: _floats(curve[name]) for name in CURVE_NAMES})

    def rows(self) -> list[dict[str, float]]:
        """One row per ensemble size: ``{"k": k, "acc": ..., "ece": ..., "nll": ...}``."""
        return [
            {"k": k + 1, "acc": self.acc[k], "ece": self.ece[k], "nll": self.nll[k]}
            for k in range(len(self.acc))
        ]


@dataclass(frozen=True)
class RiskCoverage:
    """Selective prediction on the test split, ranked by one score
    (:class:`lorae.metrics.SelectivePrediction`; definitions in :mod:`lorae.metrics.selective`).

    Attributes:
        score: the ranking score, ``"msp"`` (maximum predictive probability) or ``"mi"``
            (minus the mutual information).
        aurc: area under the risk-coverage curve (torch-uncertainty's definition), lower is
            better; NaN with fewer than 2 samples.
        acc_at_coverage: ``{coverage: accuracy on the ceil(coverage * N) most confident
            samples}`` for each coverage of :data:`lorae.metrics.COVERAGES`.

    Shape:
        coverage, risk: ``(N,)``: ``k / N`` and the error rate on the ``k`` most confident
        samples, ``k = 1..N``.
    """

    score: SelectiveScore
    aurc: float
    acc_at_coverage: dict[float, float]
    coverage: tuple[float, ...]
    risk: tuple[float, ...]

    @classmethod
    def from_tensors(cls, score: SelectiveScore, values: dict[str, Tensor]) -> RiskCoverage:
        """From :meth:`lorae.metrics.SelectivePrediction.compute`."""
        accuracy = {c: float(values[coverage_key(c)]) for c in COVERAGES}
        return cls(
            score=score,
            aurc=float(values["aurc"]),
            acc_at_coverage=accuracy,
            coverage=_floats(values["coverage"]),
            risk=_floats(values["risk"]),
        )

    def items(self) -> Iterator[tuple[str, float]]:
        """``("aurc", ...)`` and ``("acc_at_cov<percent>", ...)`` per coverage."""
        yield "aurc", self.aurc
        for coverage, value in self.acc_at_coverage.items():
            yield coverage_key(coverage), value


@dataclass(frozen=True)
class Diversity:
    """Function-space diversity of the members (:class:`lorae.metrics.DiversityMetrics`).

    Attributes:
        disagreement, jsd, jsd_per_sample: mean over member pairs ``i != j``; ``jsd`` is the
            paper's statistic (section 4: softmax outputs "aggregat[ed] ... across all test
            samples", then pairwise JSD), ``jsd_per_sample`` the mean over samples of the
            per-sample JSD; mi: mean mutual information.

    Shape:
        disagreement_matrix, jsd_matrix, jsd_per_sample_matrix: ``(M, M)`` as nested tuples.
    """

    disagreement: float
    jsd: float
    jsd_per_sample: float
    mi: float
    disagreement_matrix: tuple[tuple[float, ...], ...]
    jsd_matrix: tuple[tuple[float, ...], ...]
    jsd_per_sample_matrix: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Detection:
    """Binary detection quality of one OOD score (in-distribution is the positive class)."""

    auroc: float
    auprc: float


@dataclass(frozen=True)
class OODResult:
    """An out-of-distribution set (``kind="ood"``): one :class:`Detection` per OOD score."""

    name: str
    scores: dict[OODScore, Detection]
    kind: Literal["ood"] = "ood"


@dataclass(frozen=True)
class ShiftResult:
    """A shifted test set (``kind="shift"``): the usual metrics."""

    name: str
    scores: Scores
    kind: Literal["shift"] = "shift"


SetResult = OODResult | ShiftResult


@dataclass(frozen=True)
class VariantResult:
    """Every test metric at one temperature.

    Attributes:
        variant: which temperature (and key prefix).
        scores: the test split.
        reliability: reliability bins of the test split.
        size_curve: the ensemble-size curve on the test split.
        diversity: member diversity; only the uncalibrated variant (``T = 1``) has it.
        sets: the data module's evaluation sets, in dataloader order.
        selective: selective prediction on the test split per ranking score, ``"msp"``
            (the default ranking) and ``"mi"``.
    """

    variant: Variant
    scores: Scores
    reliability: ReliabilityCurve
    size_curve: SizeCurve
    diversity: Diversity | None
    sets: tuple[SetResult, ...]
    selective: dict[SelectiveScore, RiskCoverage]

    def log_values(self) -> dict[str, float]:
        """This variant's keys without ``test/`` (see :meth:`TestResult.log_values`)."""
        values = dict(self.scores.items(members=True))
        for name in CURVE_NAMES:
            for k, value in enumerate(getattr(self.size_curve, name), start=1):
                values[f"ensemble_size/{k}/{name}"] = value
        for ranking in SELECTIVE_SCORES:
            if ranking in self.selective:
                key_prefix = "" if ranking == "msp" else BY_MI_PREFIX
                for name, value in self.selective[ranking].items():
                    values[key_prefix + name] = value
        if self.diversity is not None:
            for name in DIVERSITY_NAMES:
                values[f"diversity/{name}"] = getattr(self.diversity, name)
        for result in self.sets:
            if isinstance(result, OODResult):
                for score, detection in result.scores.items():
                    for field in fields(Detection):
                        value = getattr(detection, field.name)
                        values[f"ood/{result.name}/{score}/{field.name}"] = value
            else:
                for name, value in result.scores.items(members=False):
                    values[f"shift/{result.name}/{name}"] = value
        if self.variant.kind != "uncalibrated":
            values["temperature"] = self.variant.temperature
        prefix = self.variant.prefix
        return {prefix + key: value for key, value in values.items()}


@dataclass(frozen=True)
class ClassAccuracy:
    """Accuracy of the ensemble predictive on the test samples of one class.

    Attributes:
        index: the class index; ``name`` its name (the data module's ``class_names``).
        support: test samples of the class; ``correct`` those predicted as it.
        acc: ``correct / support`` (NaN when the class has no test sample).
    """

    index: int
    name: str
    support: int
    correct: int
    acc: float

    @classmethod
    def table(cls, correct: Tensor, total: Tensor, names: list[str] | None) -> list[ClassAccuracy]:
        """One entry per class from per-class counts ``(C,)``."""
        rows = []
        for i, (k, n) in enumerate(zip(correct.tolist(), total.tolist(), strict=True)):
            name = names[i] if names and i < len(names) else str(i)
            rows.append(cls(i, name, int(n), int(k), k / n if n else float("nan")))
        return rows


@dataclass(frozen=True)
class TestResult:
    """What ``lorae test`` computed: one :class:`VariantResult` per temperature, the
    uncalibrated one first."""

    __test__ = False  # not a pytest test class despite its name

    variants: tuple[VariantResult, ...]

    def variant(self, kind: VariantKind) -> VariantResult | None:
        """The first variant of ``kind`` (``None`` if there is none)."""
        return next((v for v in self.variants if v.variant.kind == kind), None)

    @property
    def sweep(self) -> list[VariantResult]:
        """The ``--temperature_sweep`` variants, by increasing temperature."""
        found = [v for v in self.variants if v.variant.kind == "sweep"]
        return sorted(found, key=lambda v: v.variant.temperature)

    @property
    def evaluation_sets(self) -> list[dict[str, str]]:
        """``[{"name": ..., "kind": ...}]`` of each evaluation set (``metrics.json``)."""
        return [{"name": s.name, "kind": s.kind} for s in self.variants[0].sets]

    def log_values(self) -> dict[str, float]:
        """Every scalar under its ``test/...`` key: the keys logged and written to
        ``metrics.json`` (the layout of :func:`key_table`)."""
        values: dict[str, float] = {}
        for variant in self.variants:
            values.update({f"test/{k}": v for k, v in variant.log_values().items()})
        return values


def key_table(num_members: str = "M") -> str:
    """The Markdown table of ``docs/evaluation.md`` listing every ``test/`` key group, built
    from the names :meth:`TestResult.log_values` uses."""
    scores = ", ".join(f"`{n}`" for n in SCORE_NAMES)
    curve = ",".join(CURVE_NAMES)
    selective = ", ".join(f"`{n}`" for n in SELECTIVE_NAMES)
    by_mi = ",".join(SELECTIVE_NAMES)
    ood = ",".join(OOD_SCORES)
    detection = ",".join(f.name for f in fields(Detection))
    shift = ",".join(SCORE_NAMES)
    rows = [
        ("keys", "what"),
        ("---", "---"),
        (
            f"{scores}, `member_acc/<i>`",
            "ensemble metrics on the test split (`docs/design.md`)",
        ),
        (
            f"`ensemble_size/<k>/{{{curve}}}`",
            f"the same for the first `k` members, `k = 1..{num_members}` (paper Fig. 4, 6)",
        ),
        (
            selective,
            "selective prediction on the test split (Geifman & El-Yaniv 2017), samples ranked "
            "by the maximum probability of the ensemble predictive (confidence): `aurc`, the "
            "area under the risk-coverage curve (error rate of the `k` most confident samples "
            "against coverage `k / N`; torch-uncertainty 0.13's `AURC`: trapezoids over "
            "`k = 1..N`, divided by `1 - 1/N`; tied scores averaged over their orders; lower is "
            "better), and `acc_at_cov<p>`, the accuracy on the `ceil(p% * N)` most confident "
            "samples",
        ),
        (
            f"`{BY_MI_PREFIX}{{{by_mi}}}`",
            "the same with the samples ranked by mutual information, least first (with one "
            "member it is 0 for every sample: all tied, so `aurc` = the error rate)",
        ),
        (
            "`diversity/disagreement`",
            "share of test samples on which two members predict different classes, mean "
            "over pairs `i != j`",
        ),
        (
            "`diversity/jsd`",
            "the paper's statistic (section 4): each member's softmax outputs averaged over the "
            "test samples, then the Jensen-Shannon divergence between two members' averages, "
            "in bits (base 2, in `[0, 1]`), mean over pairs; the divergence itself, not the "
            "square root of a symmetric KL",
        ),
        (
            "`diversity/jsd_per_sample`",
            "Jensen-Shannon divergence (bits) between two members' softmaxes on each sample, "
            "mean over samples and pairs",
        ),
        (
            "`diversity/mi`",
            "mean mutual information between prediction and member (epistemic part), nats",
        ),
        (
            f"`ood/<set>/{{{ood}}}/{{{detection}}}`",
            'per out-of-distribution set (`kind="ood"`): AUROC and AUPRC with the '
            "in-distribution test split as the **positive** class; scores: maximum softmax "
            "probability of the predictive (`msp`, the paper's score), minus predictive "
            "entropy, minus mutual information (higher = more in-distribution)",
        ),
        (
            f"`shift/<set>/{{{shift}}}`",
            'per shifted set (`kind="shift"`, e.g. `shift/gaussian_noise/3/acc`)',
        ),
        (
            f"`{CALIBRATED_PREFIX}...`",
            "with `--calibrate temperature`: every key above except `diversity/...` (diversity "
            "is computed once, at `T = 1`), at the temperature fitted on the validation split, "
            f"plus `{CALIBRATED_PREFIX}temperature`",
        ),
        (
            f"`{SWEEP_PREFIX}<T>/...`",
            "for each temperature of `--temperature_sweep`: every key above except "
            f"`diversity/...`, plus `{SWEEP_PREFIX}<T>/temperature`",
        ),
    ]
    return "\n".join(f"| {key} | {what} |" for key, what in rows) + "\n"
