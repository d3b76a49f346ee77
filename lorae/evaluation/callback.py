""":class:`TestProtocol`: the one callback that runs lorae's test protocol (paper section 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lorae.data.base import ClassificationDataModule, EvaluationSet
from lorae.errors import ConfigError
from lorae.evaluation import figures
from lorae.evaluation.calibration import fit_validation_temperature
from lorae.evaluation.cost import ComputeCostMeter
from lorae.evaluation.outputs import write_metrics
from lorae.evaluation.protocol import TestEvaluation
from lorae.evaluation.report import write_table, write_test_artifacts
from lorae.evaluation.result import ClassAccuracy, TestResult, Variant
from lorae.evaluation.temperature import TemperatureFit
from lorae.metrics import predictive_log_probs

__all__ = ["EvaluatedMethod", "EvaluatedModel", "TestProtocol"]


class EvaluatedMethod(Protocol):
    """What the protocol reads of the model's method."""

    @property
    def num_members(self) -> int: ...

    def identity(self) -> dict[str, Any]: ...


@runtime_checkable
class EvaluatedModel(Protocol):
    """What the protocol reads of the tested LightningModule (e.g.
    :class:`lorae.module.EnsembleClassifier`); its ``test_step`` returns a
    :class:`~lorae.evaluation.result.TestStepOutput`."""

    @property
    def num_classes(self) -> int: ...

    @property
    def ece_bins(self) -> int: ...

    @property
    def method(self) -> EvaluatedMethod: ...


def _evaluated(pl_module: pl.LightningModule) -> EvaluatedModel:
    if not isinstance(pl_module, EvaluatedModel):
        raise ConfigError(
            f"TestProtocol evaluates a module with num_classes, ece_bins and a method "
            f"(num_members, identity()), such as lorae's EnsembleClassifier; got "
            f"{type(pl_module).__name__}."
        )
    return pl_module


class TestProtocol(pl.Callback):
    """Runs ``lorae test``: every metric, every temperature, every evaluation set, the files.

    - Temperatures: ``T = 1`` always; with ``calibrate="temperature"`` one temperature fitted
      on the validation split when testing starts (:func:`fit_validation_temperature`); one
      more per ``temperature_sweep`` entry.
    - Sets: the test split (dataloader 0) and the data module's
      :attr:`~lorae.data.base.ClassificationDataModule.evaluation_sets` (dataloader ``1 + i``).
    - Each test batch's ``test_step`` output (member logits and target) is accumulated in
      :class:`~lorae.evaluation.protocol.TestEvaluation` (torchmetrics states, exact under
      DDP); at the end of the epoch the typed :class:`~lorae.evaluation.result.TestResult` is
      kept in :attr:`result` and its :meth:`~lorae.evaluation.result.TestResult.log_values`
      are logged.
    - Selective prediction on the test split at every temperature: the risk-coverage curve,
      AURC and the accuracy at 90/95/99% coverage, ranked by the predictive's confidence and
      by mutual information (:class:`~lorae.metrics.SelectivePrediction`).
    - When testing ends, process 0 writes the tables and figures
      (:func:`~lorae.evaluation.report.write_test_artifacts`: e.g. ``risk_coverage.csv`` and
      ``risk_coverage.png``, the figures also logged to a ``TensorBoardLogger``'s writer as
      ``test/<name>``) and ``metrics.json`` (the logged
      ``test/...`` metrics, the checkpoint, the method identity, the compute cost, the
      calibration, the evaluation sets and the written files) into the log directory.

    The model is read, never written: see :class:`EvaluatedModel`.

    Args:
        calibrate: ``"temperature"``: also report every metric at the fitted temperature.
        temperature_sweep: also report every metric at each of these temperatures.
        plots: ``True`` draw figures (error without matplotlib), ``False`` never, ``None``
            when matplotlib is installed.

    Attributes:
        result: the last test's result (``None`` before the first test ends).
        calibration: the last temperature fit (``None`` without ``calibrate``).
        metrics_path: the ``metrics.json`` written by the last test (``None`` on processes
            other than 0).

    Raises:
        ConfigError: a swept temperature is not positive.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        calibrate: Literal["temperature"] | None = None,
        temperature_sweep: Sequence[float] | None = None,
        plots: bool | None = None,
    ) -> None:
        sweep: list[float] = []
        for value in temperature_sweep or ():
            if not value > 0:
                raise ConfigError(
                    f"--temperature_sweep values must be positive temperatures, got {value!r}."
                )
            if float(value) not in sweep:
                sweep.append(float(value))
        self.calibrate = calibrate
        self.temperature_sweep = sweep
        self.plots = plots
        self.cost = ComputeCostMeter()
        self.result: TestResult | None = None
        self.calibration: TemperatureFit | None = None
        self.metrics_path: Path | None = None
        self._evaluation: TestEvaluation | None = None
        self._sets: list[EvaluationSet] = []
        #: per-class accuracy of the test split with the class names (``per_class.md``)
        self.per_class: list[ClassAccuracy] = []
        self._class_counts: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ training time

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cost.start_epoch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cost.end_epoch()

    # ------------------------------------------------------------------ testing

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _evaluated(pl_module)
        if self.plots:
            figures.require_pyplot()  # fail before the test pass, not after it
        self.result, self.calibration, self.metrics_path = None, None, None
        self.cost.start_test()
        variants = [Variant("uncalibrated", 1.0)]
        if self.calibrate == "temperature":
            self.calibration = fit_validation_temperature(trainer, pl_module)
            variants.append(Variant("calibrated", self.calibration.temperature))
            fit = self.calibration
            pl_module.print(
                f"Temperature scaling: T = {fit.temperature:.4f} (validation NLL "
                f"{fit.nll_before:.4f} -> {fit.nll_after:.4f}, {fit.num_samples} samples)"
            )
        variants += [Variant("sweep", t) for t in self.temperature_sweep]
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if isinstance(datamodule, ClassificationDataModule):
            self._sets = list(datamodule.evaluation_sets)
        else:  # plain dataloaders or another data module: the test split only
            self._sets = []
        zeros = torch.zeros(model.num_classes, dtype=torch.long, device=pl_module.device)
        self._class_counts, self.per_class = (zeros, zeros.clone()), []
        self._evaluation = TestEvaluation(
            model.num_classes,
            model.method.num_members,
            model.ece_bins,
            variants,
            [(s.name, s.kind) for s in self._sets],
        ).to(pl_module.device)

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0:
            self.cost.start_batch(pl_module.device)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        logits, target = _step_output(outputs)
        assert self._evaluation is not None, "on_test_start builds the evaluation"
        self._evaluation.update(logits, target, dataloader_idx)
        if dataloader_idx == 0:
            self.cost.end_batch(pl_module.device, int(target.shape[0]))
            assert self._class_counts is not None
            correct, total = self._class_counts
            pred = predictive_log_probs(logits).argmax(-1)
            total += torch.bincount(target, minlength=total.shape[0])[: total.shape[0]]
            correct += torch.bincount(target[pred == target], minlength=correct.shape[0])[
                : correct.shape[0]
            ]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._evaluation is not None, "on_test_start builds the evaluation"
        self.result = self._evaluation.compute()  # synchronised across processes
        self._evaluation = None  # free the states (AUROC keeps every score)
        if self._class_counts is not None:
            reduce = trainer.strategy.reduce
            correct, total = (reduce(t, reduce_op="sum") for t in self._class_counts)
            names = getattr(trainer.datamodule, "class_names", None)  # type: ignore[attr-defined]
            self.per_class = ClassAccuracy.table(correct, total, names)
        for key, value in self.result.log_values().items():
            pl_module.log(key, value, add_dataloader_idx=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is None:  # the test split yielded no batches
            return
        model = _evaluated(pl_module)
        checkpoint = trainer.ckpt_path
        ckpt_path = None if checkpoint is None else str(checkpoint)
        extra: dict[str, Any] = {
            "checkpoint": ckpt_path,
            "method": model.method.identity(),
            "compute": self.cost.report(pl_module, model.method.num_members, ckpt_path),
        }
        if self.calibration is not None:
            extra["calibration"] = {"method": "temperature", **asdict(self.calibration)}
        extra["evaluation_sets"] = self.result.evaluation_sets
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP
        if trainer.is_global_zero:  # one writer: every process holds the same values
            draw = figures.matplotlib_available() if self.plots is None else self.plots
            logger = trainer.logger
            writer = logger.experiment if isinstance(logger, TensorBoardLogger) else None
            files = write_test_artifacts(out_dir, self.result, draw, writer, trainer.global_step)
            if self.per_class:
                files += write_table(out_dir / "per_class", [asdict(r) for r in self.per_class])
                pl_module.print(per_class_text(self.per_class))
            extra["files"] = [p.name for p in files]
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            self.metrics_path = write_metrics(out_dir / "metrics.json", metrics, extra)
        # Keep the processes together while process 0 writes, so that none leaves the process
        # group (and exits) while another is still working.
        trainer.strategy.barrier("lorae_test_report")


def per_class_text(rows: Sequence[ClassAccuracy], limit: int = 50) -> str:
    """The per-class accuracy table ``lorae test`` prints (the first ``limit`` classes)."""
    width = max(5, *(len(r.name) for r in rows[:limit]))
    lines = [f"{'class':<{width}}  support  correct     acc"]
    for r in rows[:limit]:
        lines.append(f"{r.name:<{width}}  {r.support:>7}  {r.correct:>7}  {r.acc:>6.4f}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more classes in per_class.md")
    return "\n".join(lines)


def _step_output(outputs: Any) -> tuple[Tensor, Tensor]:
    """The logits and target a test step returned (:class:`TestStepOutput`)."""
    if isinstance(outputs, Mapping) and set(outputs) >= {"logits", "target"}:
        return outputs["logits"], outputs["target"]
    raise TypeError(
        "TestProtocol needs test_step to return a TestStepOutput, {'logits': member logits "
        f"(M, B, C), 'target': class indices (B,)}}; got {type(outputs).__name__}."
    )
