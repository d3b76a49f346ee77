"""What a run writes besides logs and checkpoints: ``metrics.json`` and prediction files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor


def write_metrics(
    path: Path, metrics: Mapping[str, Tensor | float], extra: Mapping[str, Any]
) -> Path:
    """Write ``{"metrics": {...}, **extra}`` as JSON (floats; NaN as null)."""
    values = {k: float(v) for k, v in metrics.items()}
    clean = {k: (None if math.isnan(v) else v) for k, v in sorted(values.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": clean, **extra}, indent=2) + "\n")
    return path


class PredictionWriter(BasePredictionWriter):
    """Write ``lorae predict`` output as CSV: one row per sample.

    Columns: ``index`` (position in the predicted split), ``target``, ``pred`` (argmax of the
    ensemble predictive), ``entropy`` (predictive entropy, nats), ``prob_0`` ... ``prob_{C-1}``
    (the ensemble predictive probabilities).

    Args:
        output_path: the CSV file; ``None`` writes ``predictions.csv`` into the run's log
            directory.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.written: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        batches = [p for p in predictions if isinstance(p, dict)]
        if not batches:
            return
        merged = {k: torch.cat([b[k] for b in batches]).cpu() for k in batches[0]}
        default_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = Path(self.output_path) if self.output_path else default_dir / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        num_classes = merged["probs"].shape[1]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["index", "target", "pred", "entropy", *(f"prob_{c}" for c in range(num_classes))]
            )
            for i in range(merged["pred"].shape[0]):
                writer.writerow(
                    [
                        i,
                        int(merged["target"][i]),
                        int(merged["pred"][i]),
                        f"{float(merged['entropy'][i]):.6g}",
                        *(f"{float(p):.6g}" for p in merged["probs"][i]),
                    ]
                )
        self.written = path
