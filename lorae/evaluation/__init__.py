"""The test protocol: every method is evaluated by this one package (paper section 4).

:class:`TestProtocol` (a Lightning callback) runs it and hands back a typed
:class:`~lorae.evaluation.result.TestResult`; :meth:`~lorae.evaluation.result.TestResult.
log_values` is the one place that names the ``test/...`` metric keys.
"""

from lorae.evaluation.abstention import (
    AbstentionThreshold,
    RiskNotCertifiableError,
    coverage_threshold,
    risk_controlling_threshold,
)
from lorae.evaluation.callback import EvaluatedModel, TestProtocol
from lorae.evaluation.protocol import TestEvaluation, VariantEvaluation
from lorae.evaluation.result import (
    Detection,
    Diversity,
    OODResult,
    ReliabilityCurve,
    RiskCoverage,
    Scores,
    ShiftResult,
    SizeCurve,
    TestResult,
    Variant,
    VariantResult,
)
from lorae.evaluation.trajectory import WeightTrajectory

__all__ = [
    "AbstentionThreshold",
    "Detection",
    "Diversity",
    "EvaluatedModel",
    "OODResult",
    "ReliabilityCurve",
    "RiskCoverage",
    "RiskNotCertifiableError",
    "Scores",
    "ShiftResult",
    "SizeCurve",
    "TestEvaluation",
    "TestProtocol",
    "TestResult",
    "Variant",
    "VariantEvaluation",
    "VariantResult",
    "WeightTrajectory",
    "coverage_threshold",
    "risk_controlling_threshold",
]
