"""``lorae test --calibrate temperature``: fit the temperature right before testing."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import lightning.pytorch as pl

from lorae.analysis.collect import collect_member_logits
from lorae.calibration.temperature import TemperatureFit, fit_temperature
from lorae.errors import ConfigError

if TYPE_CHECKING:
    from lorae.module import EnsembleClassifier

__all__ = ["CALIBRATED_PREFIX", "TemperatureScaling"]

CALIBRATED_PREFIX = "calibrated/"


class TemperatureScaling(pl.Callback):
    """Fit one temperature on the validation split when testing starts (paper appendix K).

    The model runs over the data module's whole validation dataloader (every process runs the
    same full split, so every process fits the same ``T`` without communication), the
    temperature is fitted with :func:`~lorae.calibration.fit_temperature` and registered with
    the model, which then reports every test metric also at that temperature under
    ``test/calibrated/...`` next to the uncalibrated ``test/...``.

    Attributes:
        result: the last fit (``None`` before the first test).
    """

    def __init__(self) -> None:
        self.result: TemperatureFit | None = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None:
            raise ConfigError(
                "--calibrate temperature fits the temperature on the validation split and "
                "needs a data module; run `lorae test --config ...` with a data section."
            )
        datamodule.setup("validate")
        strategy = trainer.strategy
        logits, target = collect_member_logits(
            pl_module,
            datamodule.val_dataloader(),
            lambda batch: strategy.batch_to_device(batch),
            forward_context=trainer.precision_plugin.forward_context,
        )
        self.result = fit_temperature(logits, target)
        model = cast("EnsembleClassifier", pl_module)
        model.test_temperatures[CALIBRATED_PREFIX] = self.result.temperature
        pl_module.print(
            f"Temperature scaling: T = {self.result.temperature:.4f} "
            f"(validation NLL {self.result.nll_before:.4f} -> {self.result.nll_after:.4f}, "
            f"{self.result.num_samples} samples)"
        )
