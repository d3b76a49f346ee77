"""What a run writes besides logs and checkpoints: ``metrics.json`` and prediction files."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lorae.checkpoints.atomic import atomic_path
from lorae.errors import ConfigError, OutputExistsError

__all__ = ["PredictionWriter", "merge_rank_predictions", "prediction_columns", "write_metrics"]

PredictionFormat = Literal["auto", "csv", "parquet"]


def write_metrics(
    path: Path, metrics: Mapping[str, Tensor | float], extra: Mapping[str, Any]
) -> Path:
    """Write ``{"metrics": {...}, **extra}`` as JSON (floats; NaN as null)."""
    values = {k: float(v) for k, v in metrics.items()}
    clean = {k: (None if math.isnan(v) else v) for k, v in sorted(values.items())}
    with atomic_path(path) as partial:  # readers never see a half-written file
        partial.write_text(json.dumps({"metrics": clean, **extra}, indent=2) + "\n")
    return path


def merge_rank_predictions(payloads: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge the predictions of every process into one table in sample order.

    Each payload holds an ``index`` array (the sample's position in the predicted split) and
    per-sample arrays of the same length. Rows are concatenated, sorted by ``index`` and
    de-duplicated (a distributed sampler that pads repeats a few samples).

    Shape:
        each array: ``(N_rank, ...)`` -> ``(N, ...)``
    """
    keys = list(payloads[0])
    merged = {k: np.concatenate([p[k] for p in payloads]) for k in keys}
    _, first = np.unique(merged["index"], return_index=True)  # sorted unique indices
    return {k: v[first] for k, v in merged.items()}


def prediction_columns(
    num_classes: int,
    num_members: int,
    with_file: bool,
    member_predictions: bool,
    labelled: bool = True,
    calibrated: bool = False,
    abstention: bool = False,
) -> list[str]:
    """Column names of the prediction file, in order (see :class:`PredictionWriter`);
    unlabelled inputs (``labelled=False``) have no ``target``; a calibrated checkpoint
    (``lorae calibrate``) adds ``calibrated_prob_*`` and, with a threshold, ``abstain``."""
    return [
        "index",
        *(["file"] if with_file else []),
        *(["target"] if labelled else []),
        "pred",
        "pred_name",
        *(["abstain"] if abstention else []),
        "confidence",
        "agreement",
        "entropy",
        "expected_entropy",
        "mutual_information",
        *(f"prob_{c}" for c in range(num_classes)),
        *(f"calibrated_prob_{c}" for c in range(num_classes) if calibrated),
        "variance",
        *(f"var_{c}" for c in range(num_classes)),
        *(f"member_pred_{m}" for m in range(num_members) if member_predictions),
    ]


class PredictionWriter(BasePredictionWriter):
    """Write ``lorae predict`` output: one row per sample with its predictive uncertainty.

    Columns (in this order; entropies in nats):

    - ``index``: position of the sample in the predicted split (the test split, or the
      inputs of ``--data.predict_path`` in ``file`` order; skipped unreadable inputs leave gaps);
    - ``file``: the sample's file, when the data module names its samples
      (:meth:`~lorae.data.base.ClassificationDataModule.predict_sample_names`; ``file:line``
      for text inputs);
    - ``target``: the label in the data (class index); absent for unlabelled inputs;
    - ``pred``: argmax of the ensemble predictive ``p = 1/M sum_m softmax(z_m)``;
    - ``pred_name``: the name of class ``pred`` (the data module's ``class_names``);
    - ``abstain``: only for a checkpoint calibrated with a threshold (``lorae calibrate
      --target_risk`` or ``--target_coverage``): 1 where the model abstains (its score is on
      the uncertain side of the threshold), 0 where ``pred`` is to be used; the threshold's
      guarantee is about the errors of ``pred`` among the inputs with ``abstain = 0``;
    - ``confidence``: ``max_c p_c``, the predictive probability of ``pred``;
    - ``agreement``: the share of members whose own argmax is ``pred``;
    - ``entropy``: total predictive entropy ``H[p]``;
    - ``expected_entropy``: mean member entropy ``1/M sum_m H[softmax(z_m)]`` (aleatoric part);
    - ``mutual_information``: ``entropy - expected_entropy`` (epistemic part; 0 when all
      members agree);
    - ``prob_0`` ... ``prob_{C-1}``: the ensemble predictive probabilities;
    - ``calibrated_prob_0`` ... ``calibrated_prob_{C-1}``: only for a calibrated checkpoint,
      the temperature-scaled predictive ``1/M sum_m softmax(z_m / T)``;
    - ``variance``: the ensemble's predictive variance of paper Eq. 4 summed over the classes
      (the trace of the members' covariance; 0 when all members agree);
    - ``var_0`` ... ``var_{C-1}``: that variance per class,
      ``1/M sum_m (softmax(z_m)_c - p_c)^2`` (divided by M, as Eq. 4);
    - ``member_pred_0`` ... ``member_pred_{M-1}``: each member's predicted class (only with
      ``member_predictions``).

    Under DDP every process sends its rows to process 0, which writes one file in sample
    order.

    Args:
        output_path: the output file; ``None`` writes ``predictions.csv`` (or
            ``predictions.parquet``) into the run's log directory.
        format: ``"csv"``, ``"parquet"`` (needs pyarrow: ``pip install 'lorae[parquet]'``) or
            ``"auto"``: Parquet when ``output_path`` ends in ``.parquet``, else CSV.
        member_predictions: also write each member's predicted class.
        overwrite: replace an existing ``output_path``; without it an existing file is an
            error before anything is predicted (the file is always written atomically: a
            killed run leaves the old file or the new one, never a part).
    """

    def __init__(
        self,
        output_path: str | None = None,
        format: PredictionFormat = "auto",
        member_predictions: bool = False,
        overwrite: bool = False,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.format = format
        self.member_predictions = member_predictions
        self.overwrite = overwrite
        self.written: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to replace an existing file the user did not ask to replace, before the
        (possibly long) prediction runs."""
        if self.output_path is None or self.overwrite or not Path(self.output_path).exists():
            return
        raise OutputExistsError(
            f"'{self.output_path}' already exists: choose another "
            "--prediction_writer.output_path, or give --prediction_writer.overwrite=true to "
            "replace it."
        )

    def _resolve_format(self) -> Literal["csv", "parquet"]:
        if self.format != "auto":
            return self.format
        is_parquet = self.output_path is not None and self.output_path.endswith(".parquet")
        return "parquet" if is_parquet else "csv"

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
        payload = {k: torch.cat([b[k] for b in batches]).cpu().numpy() for k in batches[0]}
        indices = [i for batch in (batch_indices or [[]])[0] for i in batch]
        count = payload["pred"].shape[0]
        payload["index"] = np.asarray(indices if len(indices) == count else range(count))
        if not getattr(trainer.datamodule, "predict_has_targets", True):  # type: ignore[attr-defined]
            payload["index"] = payload["target"]  # unlabelled inputs carry their index
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, payload)
            payloads = gathered
        else:
            payloads = [payload]
        # trainer.log_dir is a collective call under DDP: every process must ask for it.
        default_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            table = merge_rank_predictions(payloads)
            self.written = self._write(trainer, default_dir, table)
        trainer.strategy.barrier("lorae_predictions")  # no process exits while 0 writes

    def _write(self, trainer: pl.Trainer, default_dir: Path, table: dict[str, np.ndarray]) -> Path:
        file_format = self._resolve_format()
        default_name = f"predictions.{file_format}"
        path = Path(self.output_path) if self.output_path else default_dir / default_name
        names_hook = getattr(trainer.datamodule, "predict_sample_names", None)  # type: ignore[attr-defined]
        names = names_hook() if names_hook is not None else None
        labelled = getattr(trainer.datamodule, "predict_has_targets", True)  # type: ignore[attr-defined]
        num_classes = table["probs"].shape[1]
        num_members = table["member_pred"].shape[1]
        columns: dict[str, list[Any]] = {"index": table["index"].tolist()}
        if names is not None:
            columns["file"] = [names[i] for i in table["index"]]
        if labelled:
            columns["target"] = table["target"].astype(int).tolist()
        columns["pred"] = table["pred"].astype(int).tolist()
        class_names = getattr(trainer.datamodule, "class_names", None)  # type: ignore[attr-defined]
        columns["pred_name"] = [class_names[p] if class_names else str(p) for p in columns["pred"]]
        if "abstain" in table:
            columns["abstain"] = table["abstain"].astype(int).tolist()
        for key in ("confidence", "agreement"):
            columns[key] = table[key].astype(float).tolist()
        for key in ("entropy", "expected_entropy", "mutual_information"):
            columns[key] = table[key].astype(float).tolist()
        for c in range(num_classes):
            columns[f"prob_{c}"] = table["probs"][:, c].astype(float).tolist()
        if "calibrated_probs" in table:
            for c in range(num_classes):
                values = table["calibrated_probs"][:, c].astype(float).tolist()
                columns[f"calibrated_prob_{c}"] = values
        columns["variance"] = table["variance"].sum(axis=1).astype(float).tolist()
        for c in range(num_classes):
            columns[f"var_{c}"] = table["variance"][:, c].astype(float).tolist()
        if self.member_predictions:
            for m in range(num_members):
                columns[f"member_pred_{m}"] = table["member_pred"][:, m].astype(int).tolist()
        expected = prediction_columns(
            num_classes,
            num_members,
            names is not None,
            self.member_predictions,
            labelled,
            calibrated="calibrated_probs" in table,
            abstention="abstain" in table,
        )
        assert list(columns) == expected
        with atomic_path(path) as partial:  # a killed run leaves no half-written table
            if file_format == "parquet":
                _write_parquet(partial, columns)
            else:
                _write_csv(partial, columns)
        return path


def _write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(columns))
        for row in zip(*columns.values(), strict=True):
            # repr-precision floats: entropy = expected_entropy + mutual_information holds to
            # float64 rounding in the file, not only in memory.
            writer.writerow([repr(v) if isinstance(v, float) else v for v in row])


def _write_parquet(path: Path, columns: dict[str, list[Any]]) -> None:
    if importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(
            "Writing predictions as Parquet needs pyarrow, which is not installed. Install the "
            "parquet extra (pip install 'lorae[parquet]') or write CSV "
            "(--prediction_writer.format=csv)."
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
