"""The calibration record of a checkpoint: a temperature and an abstention threshold.

``lorae calibrate`` fits both on the validation split (:mod:`lorae.evaluation.abstention` has
the math) and writes a new checkpoint: the original content plus :data:`CALIBRATION_KEY`.
``EnsembleClassifier.on_load_checkpoint`` keeps the record on the module, so ``lorae predict``
and :class:`lorae.Predictor` add the temperature-scaled probabilities and the abstention
decision to their outputs. The record holds plain Python values only (the checkpoint stays
loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from lorae.errors import CheckpointReadError

__all__ = [
    "CALIBRATION_KEY",
    "AbstentionScore",
    "CalibrationRecord",
    "calibration_record",
]

#: Checkpoint entry written by ``lorae calibrate``.
CALIBRATION_KEY = "lorae_calibration"

#: What ranks the inputs: the temperature-scaled ensemble's maximum probability
#: (``confidence``, higher = more certain), its predictive entropy or the members' mutual
#: information (both lower = more certain).
AbstentionScore = Literal["confidence", "entropy", "mutual_information"]
SCORES: tuple[AbstentionScore, ...] = ("confidence", "entropy", "mutual_information")


@dataclass(frozen=True)
class CalibrationRecord:
    """What ``lorae calibrate`` stores under :data:`CALIBRATION_KEY`.

    Attributes:
        temperature: ``T`` of the calibrated predictive ``1/M sum_m softmax(z_m / T)``.
        nll_before: validation NLL at ``T = 1``; ``nll_after`` at the fitted ``T``.
        num_temperature: validation samples ``T`` was fitted on.
        score: the ranking score (:data:`AbstentionScore`), computed at temperature ``T``.
        threshold: inputs are accepted when ``confidence >= threshold`` (or ``entropy`` /
            ``mutual_information <= threshold``) and abstained on otherwise; ``None``: no
            abstention rule (only the temperature).
        target: ``"risk"`` or ``"coverage"`` (what the threshold guarantees), or ``None``.
        target_value: the target selective risk ``alpha`` or coverage ``C``.
        delta: the guarantee's failure probability (``target == "risk"``).
        num_validation: validation samples the threshold was chosen on.
        validation_coverage: share of those accepted at ``threshold``.
        validation_risk: error rate of ``pred`` among those accepted (NaN if none).
        method: how the threshold was chosen; ``citation`` its reference; ``guarantee`` the
            guarantee in words.
    """

    temperature: float
    nll_before: float
    nll_after: float
    num_temperature: int
    score: AbstentionScore = "confidence"
    threshold: float | None = None
    target: Literal["risk", "coverage"] | None = None
    target_value: float | None = None
    delta: float | None = None
    num_validation: int = 0
    validation_coverage: float | None = None
    validation_risk: float | None = None
    method: str = ""
    citation: str = ""
    guarantee: str = ""

    def to_record(self) -> dict[str, Any]:
        """The plain dict stored in the checkpoint."""
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str) -> CalibrationRecord:
        """Read a stored record back.

        Raises:
            CheckpointReadError: the record is malformed (``source`` names the checkpoint).
        """
        fields = {k: v for k, v in record.items() if k != "version"}
        try:
            result = cls(**fields)
            float(result.temperature)
        except (TypeError, ValueError) as error:
            raise CheckpointReadError(
                f"{source} has a malformed calibration record ({error}); calibrate the "
                "original checkpoint again with `lorae calibrate`."
            ) from error
        if result.score not in SCORES or not result.temperature > 0:
            raise CheckpointReadError(
                f"{source} has a malformed calibration record (score {result.score!r}, "
                f"temperature {result.temperature!r}); calibrate it again with `lorae calibrate`."
            )
        return result

    @property
    def abstains(self) -> bool:
        """Whether the record holds an abstention threshold."""
        return self.threshold is not None


def calibration_record(
    checkpoint: Mapping[str, Any], source: str = "The checkpoint"
) -> CalibrationRecord | None:
    """The checkpoint's calibration, or ``None`` when it was not calibrated.

    Raises:
        CheckpointReadError: a record is there but malformed.
    """
    record = checkpoint.get(CALIBRATION_KEY)
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise CheckpointReadError(f"{source} has a malformed calibration record.")
    return CalibrationRecord.from_record(cast(Mapping[str, Any], record), source)
