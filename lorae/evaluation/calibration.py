"""``--calibrate temperature``: fit the temperature on the validation split before testing."""

from __future__ import annotations

import lightning.pytorch as pl

from lorae.errors import ConfigError
from lorae.evaluation.collect import collect_member_logits
from lorae.evaluation.temperature import TemperatureFit, fit_temperature

__all__ = ["fit_validation_temperature"]


def fit_validation_temperature(trainer: pl.Trainer, model: pl.LightningModule) -> TemperatureFit:
    """Fit one temperature on the data module's whole validation split (paper appendix K).

    Every process runs the same full split, so every process fits the same ``T`` without
    communication. The model runs under the trainer's precision (its autocast) and device.

    Args:
        trainer: the trainer about to test; its data module gives the validation split.
        model: returns member logits ``(M, B, C)`` when called on a batch's inputs.

    Returns:
        The fitted temperature and the validation NLL before and after.

    Raises:
        ConfigError: the trainer has no data module.
    """
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if datamodule is None:
        raise ConfigError(
            "--calibrate temperature fits the temperature on the validation split and "
            "needs a data module; run `lorae test --config ...` with a data section."
        )
    datamodule.setup("validate")
    strategy = trainer.strategy
    logits, target = collect_member_logits(
        model,
        datamodule.val_dataloader(),
        lambda batch: strategy.batch_to_device(batch),
        forward_context=trainer.precision_plugin.forward_context,
    )
    return fit_temperature(logits, target)
