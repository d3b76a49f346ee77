"""The "how to rebuild" record of a checkpoint: model config and input description.

``EnsembleClassifier.on_save_checkpoint`` stores the data module's
:class:`~lorae.data.inference.InferenceSpec` under :data:`INFERENCE_KEY`; next to the method's
config (:data:`~lorae.checkpoints.adapters.ADAPTERS_KEY`) it is all ``lorae predict
--ckpt_path K --data.predict_path P`` and :class:`lorae.Predictor` need: no training config,
no data root.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorae.checkpoints.adapters import ADAPTERS_KEY, is_adapter_checkpoint
from lorae.data.inference import InferenceSpec
from lorae.errors import CheckpointReadError

__all__ = ["INFERENCE_KEY", "inference_spec", "method_record", "prediction_config"]

#: Checkpoint entry with the data module's input description and class names.
INFERENCE_KEY = "lorae_inference"

_PASS_CONFIG = (
    "Checkpoints written before lorae stored this record cannot be used alone: pass the "
    "training config, `lorae predict --config <config.yaml> --ckpt_path ...` (config.yaml is "
    "saved next to the run's logs)."
)


def inference_spec(checkpoint: Mapping[str, Any], source: str) -> InferenceSpec:
    """The checkpoint's input description and class names.

    Raises:
        CheckpointReadError: the checkpoint has no record (``source`` names it).
    """
    record = checkpoint.get(INFERENCE_KEY)
    if not isinstance(record, Mapping):
        raise CheckpointReadError(f"{source} records no input description. {_PASS_CONFIG}")
    return InferenceSpec.from_record(record, source)


def method_record(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The method's ``{"class_path", "init_args"}`` recorded in the checkpoint.

    Raises:
        CheckpointReadError: none recorded (an old checkpoint, or a model built in Python
            without ``functools.partial``).
    """
    record = checkpoint.get(ADAPTERS_KEY)
    config = record.get("method_config") if isinstance(record, Mapping) else None
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise CheckpointReadError(f"{source} records no method config. {_PASS_CONFIG}")
    return {"class_path": config["class_path"], "init_args": dict(config.get("init_args", {}))}


def prediction_config(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A ``lorae predict`` config (without ``predict_path``) rebuilt from the checkpoint:
    the recorded method, the checkpoint kind, and a
    :class:`~lorae.data.predict.PredictionDataModule` reading inputs as in training.
    Predictions go to ``predictions.csv`` in the working folder (no logger)."""
    spec = inference_spec(checkpoint, source)
    record = spec.to_record()
    contents = "adapters" if is_adapter_checkpoint(checkpoint) else "full"
    return {
        "trainer": {"logger": False, "enable_model_summary": False},
        "model": {"method": method_record(checkpoint, source), "checkpoint": contents},
        "data": {
            "class_path": "lorae.data.PredictionDataModule",
            "init_args": {"inputs": record["inputs"], "class_names": record["class_names"]},
        },
    }
