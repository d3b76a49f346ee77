"""``Predictor``: predictions with uncertainty from a checkpoint, in Python, without a Trainer.

>>> from lorae import Predictor
>>> p = Predictor.from_checkpoint("runs/quickstart/version_0/checkpoints/best.ckpt")
>>> result = p.predict(["digit.png", "other.png"])  # or PIL images, strings, waveforms
>>> result.pred_name, result.confidence, result.mutual_information

The numbers are those of ``lorae predict`` on the same inputs: the same input reader
(:class:`~lorae.data.inference.InputReader`) and the same per-input quantities
(:func:`~lorae.module.prediction_outputs`), including, for a checkpoint written by ``lorae
calibrate``, the temperature-scaled probabilities and the abstention decision
(``result.calibrated_probs``, ``result.abstain``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorae.checkpoints.adapters import is_adapter_checkpoint
from lorae.checkpoints.export import _typed_arguments
from lorae.checkpoints.inference import inference_spec, method_record
from lorae.checkpoints.safe import load_checkpoint_safely
from lorae.data.inference import InferenceSpec, InputReader
from lorae.errors import CheckpointReadError
from lorae.methods.base import EnsembleMethod
from lorae.module import EnsembleClassifier, prediction_outputs

__all__ = ["Prediction", "Predictor"]


@dataclass(frozen=True)
class Prediction:
    """What a user reads per input (N inputs, M members, C classes; float64).

    Attributes:
        probs: ensemble predictive ``1/M sum_m softmax(z_m)``, ``(N, C)``.
        member_probs: each member's softmax, ``(M, N, C)``.
        pred: predicted class ``(N,)``; ``pred_name`` its name.
        confidence: ``max_c probs`` ``(N,)``.
        agreement: share of members whose argmax is ``pred`` ``(N,)``.
        entropy: total uncertainty ``H[probs]`` (nats) ``(N,)``.
        expected_entropy: aleatoric part, mean member entropy ``(N,)``.
        mutual_information: epistemic part, ``entropy - expected_entropy`` ``(N,)``.
        variance: predictive variance over the members per class (paper Eq. 4) ``(N, C)``.
        calibrated_probs: temperature-scaled predictive ``1/M sum_m softmax(z_m / T)``
            ``(N, C)`` of a checkpoint calibrated with ``lorae calibrate``; ``None`` otherwise.
        abstain: ``(N,)`` bool, True where the calibrated checkpoint's threshold says to
            abstain (its guarantee is about the errors of ``pred`` where False); ``None`` for a
            checkpoint without a threshold.
    """

    probs: Tensor
    member_probs: Tensor
    pred: Tensor
    pred_name: list[str]
    confidence: Tensor
    agreement: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variance: Tensor
    calibrated_probs: Tensor | None = None
    abstain: Tensor | None = None


class Predictor:
    """A trained ensemble and its input reader.

    Args:
        model: the trained classifier.
        spec: how inputs are read, and the class names.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: inputs per forward pass.
    """

    def __init__(
        self,
        model: EnsembleClassifier,
        spec: InferenceSpec,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.reader = InputReader(spec.inputs)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> Predictor:
        """Rebuild model and input reader from a ``lorae fit`` checkpoint alone.

        Raises:
            CheckpointReadError: the checkpoint predates lorae's records (use ``lorae
                predict --config``) or names no lorae method.
        """
        source = f"Checkpoint '{path}'"
        checkpoint = load_checkpoint_safely(path)
        spec = inference_spec(checkpoint, source)
        config = method_record(checkpoint, source)
        module_name, _, class_name = config["class_path"].rpartition(".")
        method_cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (inspect.isclass(method_cls) and issubclass(method_cls, EnsembleMethod)):
            raise CheckpointReadError(f"'{config['class_path']}' is not a lorae EnsembleMethod.")
        init_args = _typed_arguments(method_cls, config["init_args"])
        if not is_adapter_checkpoint(checkpoint) and "pretrained" in init_args:
            init_args["pretrained"] = False  # every weight is in the checkpoint
        model = EnsembleClassifier(
            functools.partial(method_cls, **init_args), num_classes=len(spec.class_names)
        )
        model.on_load_checkpoint(checkpoint)  # identity check; adds frozen weights if needed
        model.load_state_dict(checkpoint["state_dict"])
        return cls(model, spec, device, batch_size)

    @torch.no_grad()
    def predict(self, inputs: Sequence[Any]) -> Prediction:
        """Predict on image paths or PIL images, strings, or WAV paths / waveforms.

        Raises:
            CorruptSampleError: an input cannot be read (named in the message).
        """
        parts: list[dict[str, Tensor]] = []
        member_probs: list[Tensor] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            batch, _ = self.reader.collate([(self.reader.load(x), i) for i, x in enumerate(chunk)])
            logits = self.model(_to(batch, self.device)).double()
            outputs = prediction_outputs(logits, self.model.calibration)
            parts.append({k: v.cpu() for k, v in outputs.items()})
            member_probs.append(logits.softmax(-1).cpu())
        if not parts:
            raise ValueError("predict needs at least one input.")
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        names = self.spec.class_names
        return Prediction(
            probs=out["probs"],
            member_probs=torch.cat(member_probs, dim=1),
            pred=out["pred"],
            pred_name=[names[int(i)] for i in out["pred"]],
            confidence=out["confidence"],
            agreement=out["agreement"],
            entropy=out["entropy"],
            expected_entropy=out["expected_entropy"],
            mutual_information=out["mutual_information"],
            variance=out["variance"],
            calibrated_probs=out.get("calibrated_probs"),
            abstain=out["abstain"].bool() if "abstain" in out else None,
        )


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)
