"""``EnsembleClassifier``: the one LightningModule for every method.

The paper's claims are comparisons, so training and evaluation are literally the same code
for every method: the method returns member logits ``(M, B, C)``; the loss is the mean over
members of each member's cross-entropy; every metric reads the ensemble predictive
distribution, the mean over members of their softmaxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lorae.backbones.base import Inputs
from lorae.checkpoints.adapters import (
    ADAPTERS_KEY,
    CheckpointContents,
    checkpoint_record,
    method_config,
    restore_checkpoint,
    strip_checkpoint,
)
from lorae.checkpoints.calibration import CalibrationRecord, calibration_record
from lorae.checkpoints.inference import INFERENCE_KEY
from lorae.data.base import ClassificationDataModule
from lorae.errors import CheckpointMismatchError, ConfigError
from lorae.evaluation.abstention import apply_calibration
from lorae.evaluation.result import TestStepOutput
from lorae.methods.base import EnsembleMethod, describe_mismatch
from lorae.metrics import (
    EnsembleMetrics,
    expected_member_entropy,
    member_cross_entropy,
    mutual_information,
    predictive_entropy,
    predictive_log_probs,
    predictive_variance,
)
from lorae.optim import LRDecay, TrainingSteps, warmup_decay
from lorae.training import default_callbacks

Batch = tuple[Inputs, Tensor]
CHECKPOINT_KEY = "lorae"

#: Beyond this many members (Bayes-LoRA's 512 posterior draws, appendix W) validation logs
#: ``member_acc/{min,mean,max}`` instead of one curve per member; ``metrics.json`` of a test
#: keeps every member.
MEMBER_CURVES_MAX = 32


def summarise_members(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace the ``member_acc/<m>`` entries of ``values`` by their min, mean and max."""
    members = [v for k, v in values.items() if k.startswith("member_acc/")]
    kept = {k: v for k, v in values.items() if not k.startswith("member_acc/")}
    if not members:
        return kept
    stacked = torch.stack(members)
    return {
        **kept,
        "member_acc/min": stacked.min(),
        "member_acc/mean": stacked.mean(),
        "member_acc/max": stacked.max(),
    }


def prediction_outputs(
    logits: Tensor, calibration: CalibrationRecord | None = None
) -> dict[str, Tensor]:
    """What a user reads per input, from the member logits (in float64, so the entropy
    decomposition holds to 1e-12).

    Args:
        logits: member logits.
        calibration: a checkpoint's ``lorae calibrate`` record; adds ``calibrated_probs`` and
            (with a threshold) ``abstain`` (:func:`~lorae.evaluation.abstention.
            apply_calibration`).

    Returns:
        ``probs`` (ensemble predictive) and ``variance`` (over the members, paper Eq. 4, per
        class) ``(B, C)``; ``pred`` (argmax of ``probs``), ``confidence`` (its probability),
        ``agreement`` (share of members whose argmax is ``pred``), ``entropy`` (total),
        ``expected_entropy`` (aleatoric) and ``mutual_information`` (epistemic) ``(B,)``;
        ``member_pred`` ``(B, M)``; with ``calibration``, ``calibrated_probs`` ``(B, C)`` and
        ``abstain`` ``(B,)``.

    Shape:
        logits: ``(M, B, C)``.
    """
    logits = logits.double()
    log_probs = predictive_log_probs(logits)
    pred = log_probs.argmax(-1)
    member_pred = logits.argmax(-1)  # (M, B)
    return {
        "pred": pred,
        "confidence": log_probs.max(-1).values.exp(),
        "agreement": (member_pred == pred).double().mean(0),
        "entropy": predictive_entropy(log_probs),
        "expected_entropy": expected_member_entropy(logits),
        "mutual_information": mutual_information(logits),
        "probs": log_probs.exp(),
        "variance": predictive_variance(logits),
        "member_pred": member_pred.T,
        **(apply_calibration(logits, calibration) if calibration is not None else {}),
    }


class EnsembleClassifier(pl.LightningModule):
    """Train and evaluate any :class:`~lorae.methods.EnsembleMethod`.

    Args:
        method: builds the method given the number of classes (in a config:
            ``class_path`` + ``init_args`` without ``num_classes``).
        num_classes: C; the CLI links it from the data module.
        optimizer: builds the optimizer from the trainable parameters only (frozen backbone
            weights never reach it). Default ``torch.optim.AdamW`` (its own default lr
            1e-3; the paper's configs set 1e-4).
        lr_decay: schedule after the warm-up: ``"cosine"`` (paper), ``"linear"``,
            ``"constant"`` or per-epoch exponential decay ``{gamma: 0.94, every_epochs: 4}``
            (:class:`~lorae.optim.ExponentialDecay`; the paper's iNaturalist and ESC-50 recipes).
        warmup_steps: linear warm-up steps (paper: 500).
        class_weights: optional per-class cross-entropy weights (length C).
        ece_bins: equal-width bins of the expected calibration error (10, as the reference
            code that produced the paper's numbers).
        checkpoint: what checkpoints store: ``"full"`` (every weight) or ``"adapters"`` (only
            trainable parameters and buffers, e.g. LoRA factors, heads, snapshots; the frozen
            pretrained backbone is left out and identified by a fingerprint, see
            :mod:`lorae.checkpoints.adapters`). Loading an adapter-only checkpoint needs the same
            ``pretrained`` weights; either kind loads whatever this option says.

    Logged metrics (``{stage}/`` prefix for ``val`` and ``test``): ``acc``, ``f1`` (macro),
    ``ece``, ``nll``, ``brier`` of the ensemble predictive, ``member_acc/{i}`` per member (their
    min, mean and max beyond :data:`MEMBER_CURVES_MAX` members), and ``loss``. Testing logs
    ``test/loss``; :meth:`test_step` returns the member logits and targets, from which the
    :class:`~lorae.evaluation.callback.TestProtocol` callback (attached by the CLI; add it to a
    trainer of your own) computes and logs every other ``test/`` metric (temperature variants,
    ensemble-size curve, diversity, OOD and shift sets) and writes ``metrics.json``.
    """

    class_weights: Tensor | None
    #: the loaded checkpoint's ``lorae calibrate`` record (temperature, abstention threshold),
    #: used by :meth:`predict_step`; ``None`` for an uncalibrated one and once training starts.
    calibration: CalibrationRecord | None = None

    def __init__(
        self,
        method: Callable[[int], EnsembleMethod],
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_decay: LRDecay = "cosine",
        warmup_steps: int = 500,
        class_weights: list[float] | None = None,
        ece_bins: int = 10,
        checkpoint: CheckpointContents = "full",
    ) -> None:
        super().__init__()
        self.method = method(num_classes)
        self.method_config = method_config(method)  # recorded in checkpoints, for exports
        if checkpoint not in ("full", "adapters"):
            raise ConfigError(f"checkpoint must be 'full' or 'adapters', got {checkpoint!r}.")
        self.checkpoint_contents: CheckpointContents = checkpoint
        self.num_classes = num_classes
        self.optimizer = optimizer
        self.lr_decay = lr_decay
        self.warmup_steps = warmup_steps
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigError(
                f"class_weights has {len(class_weights)} entries but the data has "
                f"{num_classes} classes: give one weight per class or none."
            )
        weights = None if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("class_weights", weights)
        m = self.method.num_members
        self.val_metrics = EnsembleMetrics(num_classes, m, ece_bins)
        self.ece_bins = ece_bins

    def forward(self, x: Inputs) -> Tensor:
        """Member logits. Shape: inputs ``(B, ...)`` -> ``(M, B, C)``."""
        return self.method(x)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        inputs, target = batch
        loss = member_cross_entropy(self(inputs), target, self.class_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0])
        return loss

    def _evaluate(self, batch: Batch, stage: str, metrics: EnsembleMetrics) -> None:
        inputs, target = batch
        logits = self(inputs).float()  # bf16-mixed logits: metrics in float32
        loss = member_cross_entropy(logits, target, self.class_weights)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=target.shape[0])
        metrics.update(logits, target)

    def _log_metrics(self, stage: str, metrics: EnsembleMetrics) -> None:
        values = metrics.compute()  # torchmetrics synchronises across processes here
        if self.method.num_members > MEMBER_CURVES_MAX:
            values = summarise_members(values)
        for key, value in values.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("acc", "nll"))
        metrics.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> TestStepOutput:
        """Log the test loss (test split only) and return the float32 member logits
        ``(M, B, C)`` and targets ``(B,)`` for :class:`~lorae.evaluation.TestProtocol`."""
        inputs, target = batch
        logits = self(inputs).float()  # bf16-mixed logits: metrics in float32
        if dataloader_idx == 0:  # evaluation-set targets may lie outside the task's classes
            loss = member_cross_entropy(logits, target, self.class_weights)
            self.log(
                "test/loss",
                loss,
                sync_dist=True,
                batch_size=target.shape[0],
                add_dataloader_idx=False,
            )
        return {"logits": logits, "target": target}

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """:func:`prediction_outputs` of the batch (with the checkpoint's calibration, if
        any), plus its ``target`` ``(B,)`` (for unlabelled inputs, the sample indices)."""
        inputs, target = batch
        return {"target": target, **prediction_outputs(self(inputs), self.calibration)}

    def on_fit_start(self) -> None:
        """Training changes the weights a loaded calibration was fitted for: drop it (it is
        not written into new checkpoints either)."""
        self.calibration = None

    def configure_callbacks(self) -> list[pl.Callback]:
        """lorae's fault-tolerance callbacks (:func:`lorae.training.default_callbacks`) and the
        method's own (see :meth:`EnsembleMethod.callbacks`). A trainer that already holds one
        of a kind (``test_after_fit`` reuses the fit's trainer) keeps it, instead of Lightning
        replacing it with a fresh copy and warning about the override."""
        attached = {type(c) for c in self.trainer.callbacks}  # type: ignore[attr-defined]
        callbacks = [*default_callbacks(), *self.method.callbacks()]
        return [c for c in callbacks if type(c) not in attached]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        total_steps = int(self.trainer.estimated_stepping_batches)  # also sets up the data
        batches = self.trainer.num_training_batches  # inf for an iterable without length
        steps_per_epoch = (
            math.ceil(batches / self.trainer.accumulate_grad_batches)
            if math.isfinite(batches)
            else total_steps
        )
        steps = TrainingSteps(
            total_steps,
            steps_per_epoch,
            self.trainer.max_epochs,
            self.warmup_steps,
            bool(self.trainer.fast_dev_run),  # type: ignore[attr-defined]
        )
        # The method's own schedule (Snapshot Ensemble's cycles), else warm-up + decay.
        schedule = self.method.lr_schedule(steps) or warmup_decay(
            total_steps, self.warmup_steps, self.lr_decay, steps_per_epoch
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.method.identity()
        record = checkpoint_record(
            self.method, self.checkpoint_contents, self.method_config, prefix="method."
        )  # "method.": self.method's entries in the state dict
        checkpoint[ADAPTERS_KEY] = record
        datamodule = getattr(self._trainer, "datamodule", None)
        if isinstance(datamodule, ClassificationDataModule):
            spec = datamodule.inference_spec()
            if spec is not None:  # how to read new inputs: `lorae predict --data.predict_path`
                checkpoint[INFERENCE_KEY] = spec.to_record()
        if self.checkpoint_contents == "adapters":
            strip_checkpoint(checkpoint, record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.calibration = calibration_record(checkpoint)  # `lorae calibrate`'s, or None
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        differences = describe_mismatch(saved, self.method.identity())
        if differences:
            raise CheckpointMismatchError(
                "The checkpoint does not match the configured model:\n  "
                + "\n  ".join(differences)
                + "\nUse the config the checkpoint was trained with (saved as config.yaml next "
                "to its logs) or set these options to the checkpoint's values."
            )
        restore_checkpoint(checkpoint, self.method)  # adapter-only: add the frozen weights
