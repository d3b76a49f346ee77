"""Files ``lorae test`` writes next to ``metrics.json``: tables and figures of the evaluation.

- ``ensemble_size.csv``: accuracy, ECE and NLL of the first ``k`` members, ``k = 1..M``;
- ``diversity.json``: the pairwise disagreement and Jensen-Shannon matrices (``T = 1``);
- ``temperature_sweep.csv`` / ``.md``: the test metrics at every swept temperature (paper
  Tab. 17), when ``--temperature_sweep`` is given;
- with plots: ``reliability.png`` (and ``reliability_calibrated.png`` after temperature
  scaling), ``ensemble_size.png``, ``disagreement.png``, ``jsd.png``, each also logged to
  TensorBoard when the run logs there.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lorae.analysis.cost import ComputeCostMonitor
from lorae.analysis.ensemble_size import size_curve_rows
from lorae.analysis.plots import (
    ensemble_size_figure,
    heatmap_figure,
    matplotlib_available,
    save_figure,
)
from lorae.calibration.callback import TemperatureScaling
from lorae.calibration.reliability import reliability_figure
from lorae.errors import ConfigError

if TYPE_CHECKING:
    from lorae.module import EnsembleClassifier

__all__ = [
    "SWEEP_PREFIX",
    "attach_test_callbacks",
    "test_report",
    "write_table",
    "write_test_artifacts",
]

SWEEP_PREFIX = "temperature/"
SWEEP_COLUMNS = ("acc", "f1", "ece", "nll", "brier")


def write_table(path_stem: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``rows`` as ``<stem>.csv`` and a Markdown table ``<stem>.md``."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path = path_stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = path_stem.with_suffix(".md")

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows),
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _sweep_rows(
    scalars: Mapping[str, float], temperatures: Mapping[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for prefix, temperature in temperatures.items():
        if prefix.startswith(SWEEP_PREFIX):
            row: dict[str, Any] = {"temperature": temperature}
            row.update({name: scalars[f"test/{prefix}{name}"] for name in SWEEP_COLUMNS})
            rows.append(row)
    return sorted(rows, key=lambda r: r["temperature"])


def write_test_artifacts(
    out_dir: Path,
    scalars: Mapping[str, float],
    arrays: Mapping[str, Tensor],
    temperatures: Mapping[str, float],
    plots: bool,
    tensorboard: Any | None = None,
    step: int = 0,
) -> list[Path]:
    """Write the evaluation's tables (and figures when ``plots``) into ``out_dir``.

    Args:
        out_dir: the run's log directory.
        scalars: the logged test metrics (``test/...`` keys).
        arrays: :attr:`lorae.module.EnsembleClassifier.test_arrays`.
        temperatures: the model's test temperatures (key prefix -> T).
        plots: draw the figures (needs matplotlib).
        tensorboard: a ``SummaryWriter`` to log the figures to, or ``None``.
        step: global step the figures are logged at.

    Returns:
        The written files.
    """
    arrays = {k: v.detach().double().cpu() for k, v in arrays.items()}
    written: list[Path] = []
    if "ensemble_size/acc" in arrays:
        curve = {k: arrays[f"ensemble_size/{k}"] for k in ("acc", "ece", "nll")}
        written += write_table(out_dir / "ensemble_size", size_curve_rows(curve))
    if "diversity/disagreement_matrix" in arrays:
        matrices = {
            name: arrays[f"diversity/{name}"].tolist()
            for name in ("disagreement_matrix", "jsd_matrix")
        }
        path = out_dir / "diversity.json"
        path.write_text(json.dumps(matrices, indent=2) + "\n")
        written.append(path)
    sweep = _sweep_rows(scalars, temperatures)
    if sweep:
        written += write_table(out_dir / "temperature_sweep", sweep)
    if not plots:
        return written

    figures = {}
    for prefix, name in (("", "reliability"), ("calibrated/", "reliability_calibrated")):
        if f"{prefix}reliability/count" in arrays:
            bins = {
                k: arrays[f"{prefix}reliability/{k}"]
                for k in ("count", "confidence", "accuracy", "ece")
            }
            label = f"T = {temperatures[prefix]:.3f}" if prefix else "uncalibrated"
            figures[name] = reliability_figure(bins, f"Reliability diagram ({label})")
    if "ensemble_size/acc" in arrays:
        size = arrays["ensemble_size/acc"].shape[0]
        series = {k: arrays[f"ensemble_size/{k}"].tolist() for k in ("acc", "ece", "nll")}
        figures["ensemble_size"] = ensemble_size_figure(range(1, size + 1), series)
    if "diversity/disagreement_matrix" in arrays:
        figures["disagreement"] = heatmap_figure(
            arrays["diversity/disagreement_matrix"].numpy(), "Pairwise disagreement rate"
        )
        figures["jsd"] = heatmap_figure(
            arrays["diversity/jsd_matrix"].numpy(), "Pairwise Jensen-Shannon divergence (bits)"
        )
    for name, figure in figures.items():
        if tensorboard is not None:
            tensorboard.add_figure(f"test/{name}", figure, global_step=step, close=False)
        written.append(save_figure(figure, out_dir / f"{name}.png"))
    return written


def attach_test_callbacks(
    trainer: pl.Trainer,
    model: EnsembleClassifier,
    calibrate: Literal["temperature"] | None,
    temperature_sweep: Sequence[float] | None,
) -> None:
    """Prepare a trainer and model for ``lorae fit``/``lorae test``.

    Attaches a :class:`~lorae.analysis.cost.ComputeCostMonitor` (and a
    :class:`~lorae.calibration.TemperatureScaling` with ``calibrate="temperature"``) once, and
    sets the model's test temperatures: ``T = 1`` plus one ``temperature/<T>/`` variant per
    swept temperature.

    Raises:
        ConfigError: a swept temperature is not positive.
    """
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    if not any(isinstance(c, ComputeCostMonitor) for c in callbacks):
        callbacks.append(ComputeCostMonitor())
    scaling = [c for c in callbacks if isinstance(c, TemperatureScaling)]
    if calibrate == "temperature" and not scaling:
        callbacks.append(TemperatureScaling())
    temperatures = {"": 1.0}
    for value in temperature_sweep or ():
        if not value > 0:
            raise ConfigError(
                f"--temperature_sweep values must be positive temperatures, got {value!r}."
            )
        temperatures[f"{SWEEP_PREFIX}{value:g}/"] = float(value)
    model.test_temperatures = temperatures


def test_report(
    trainer: pl.Trainer, model: EnsembleClassifier, ckpt_path: str | None, plots: bool | None
) -> dict[str, Any]:
    """Write the test artifacts (process 0 only) and return the extra ``metrics.json`` fields.

    Args:
        trainer: the trainer that just tested.
        model: the tested model.
        ckpt_path: the tested checkpoint, if any.
        plots: ``True`` draw figures (error without matplotlib), ``False`` never, ``None``
            when matplotlib is installed.

    Returns:
        ``{"compute": ..., "calibration": ..., "evaluation_sets": ..., "files": [...]}``.
    """
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    extra: dict[str, Any] = {}
    monitor = next((c for c in callbacks if isinstance(c, ComputeCostMonitor)), None)
    if monitor is not None:
        extra["compute"] = monitor.report(model, model.method.num_members, ckpt_path)
    scaling = next((c for c in callbacks if isinstance(c, TemperatureScaling)), None)
    if scaling is not None and scaling.result is not None:
        extra["calibration"] = {"method": "temperature", **asdict(scaling.result)}
    sets = getattr(getattr(trainer, "datamodule", None), "evaluation_sets", [])
    extra["evaluation_sets"] = [{"name": s.name, "kind": s.kind} for s in sets]
    out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP
    if trainer.is_global_zero:
        draw = matplotlib_available() if plots is None else plots
        scalars = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        logger = trainer.logger
        writer = logger.experiment if isinstance(logger, TensorBoardLogger) else None
        files = write_test_artifacts(
            out_dir,
            scalars,
            model.test_arrays,
            model.test_temperatures,
            draw,
            writer,
            trainer.global_step,
        )
        extra["files"] = [p.name for p in files]
    # Keep the processes together while process 0 writes, so that none leaves the process
    # group (and exits) while another is still working.
    trainer.strategy.barrier("lorae_test_report")
    return extra
