"""Shared machinery of the experiment scripts: one resumable ``lorae fit`` per cell.

A *cell* is one training run (one method, learning rate and seed) in its own folder. The cell
is finished when its marker file exists (``metrics.json`` for runs that test, the validation
summary for learning-rate search runs); a folder without it is the remains of an interrupted
run and is deleted before the cell runs again, so an interrupted grid continues where it
stopped when the same command is run again.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Cell",
    "best_validation_row",
    "cell_loggers",
    "parse_overrides",
    "run_cell",
    "set_threads",
]

Mode = Literal["subprocess", "in-process"]


@dataclass
class Cell:
    """One ``lorae fit`` run in ``folder``; finished once ``folder / marker`` exists.

    Attributes:
        folder: The run's log directory (TensorBoard files, ``csv/metrics.csv``,
            ``checkpoints/``, ``config.yaml``, ``metrics.json``, ``run.json``).
        args: The ``lorae`` arguments (starting with ``fit``).
        marker: File name inside ``folder`` that marks the cell as finished.
        info: Extra fields written to ``run.json`` (method, lr, seed, ...).
    """

    folder: Path
    args: list[str]
    marker: str = "metrics.json"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Whether the cell finished in an earlier call."""
        return (self.folder / self.marker).is_file()


def set_threads(threads: int) -> None:
    """Limit this process and its children to ``threads`` CPU threads."""
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    """``KEY=VALUE`` items as ``--KEY=VALUE`` arguments of ``lorae fit``.

    Raises:
        SystemExit: An item has no ``=`` (reported like an argparse error).
    """
    result = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --override needs KEY=VALUE items, got {item!r}")
        result.append(f"--{key.removeprefix('--')}={value}")
    return result


def cell_loggers(folder: Path) -> Path:
    """Write ``folder/loggers.yaml``: TensorBoard into ``folder`` and a CSV log of every
    epoch's metrics into ``folder/csv/metrics.csv`` (the learning-rate search reads it).

    Returns:
        The file, to pass as a second ``--config``.
    """
    config = {
        "trainer": {
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": str(folder), "name": "", "version": ""},
                },
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(folder), "name": "csv", "version": ""},
                },
            ]
        }
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "loggers.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _run_lorae(args: list[str], log: Path, mode: Mode) -> int:
    """Run ``lorae ARGS``; stdout and stderr go to ``log``. Returns the exit code."""
    if mode == "subprocess":
        with log.open("w", encoding="utf-8") as handle:
            return subprocess.call(
                [sys.executable, "-m", "lorae", *args], stdout=handle, stderr=subprocess.STDOUT
            )
    from contextlib import redirect_stderr, redirect_stdout

    from lorae.cli import main

    with (
        log.open("w", encoding="utf-8") as handle,
        redirect_stdout(handle),
        redirect_stderr(handle),
    ):
        try:
            main(args)
        except SystemExit as error:
            return error.code if isinstance(error.code, int) else 1
    return 0


def run_cell(cell: Cell, mode: Mode = "subprocess") -> dict[str, Any]:
    """Run ``cell`` unless it is done; write ``run.json`` (arguments, wall and CPU time, exit
    code).

    A leftover folder without the marker (an interrupted run) is deleted first.

    Returns:
        The ``run.json`` record (read back when the cell was already done, with
        ``"skipped": true``).
    """
    record_path = cell.folder / "run.json"
    if cell.done:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        return {**record, "skipped": True}
    if cell.folder.exists():
        shutil.rmtree(cell.folder)
    cell.folder.mkdir(parents=True)
    loggers = cell_loggers(cell.folder)
    args = [*cell.args, "--config", str(loggers)]
    who = resource.RUSAGE_CHILDREN if mode == "subprocess" else resource.RUSAGE_SELF
    before = resource.getrusage(who)
    start = time.perf_counter()
    code = _run_lorae(args, cell.folder / "lorae.log", mode)
    wall = time.perf_counter() - start
    after = resource.getrusage(who)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = {
        **cell.info,
        "command": ["lorae", *args],
        "wall_seconds": round(wall, 3),
        # CPU time of the run; with one thread on a busy machine, cpu / wall is the share of
        # a core it got, so cpu_seconds estimates the wall time on an idle machine.
        "cpu_seconds": round(cpu, 3),
        "returncode": code,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return {**record, "skipped": False}


def best_validation_row(
    metrics_csv: Path, monitor: str = "val/nll", mode: Literal["min", "max"] = "min"
) -> dict[str, float]:
    """The validation metrics of the epoch the checkpoint callback keeps (best ``monitor``).

    Reads the ``CSVLogger`` file of a run: only rows that hold validation metrics (``val/``
    keys) are considered; nothing logged under ``test/`` is read.

    Returns:
        ``{"epoch": ..., "val/acc": ..., "val/nll": ..., ...}`` of the best row.

    Raises:
        ValueError: No row holds ``monitor``.
    """
    rows: list[dict[str, float]] = []
    with metrics_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            value = row.get(monitor, "")
            if value in ("", None):
                continue
            values = {k: float(v) for k, v in row.items() if k.startswith("val/") and v != ""}
            values["epoch"] = float(row.get("epoch") or math.nan)
            rows.append(values)
    if not rows:
        raise ValueError(f"No {monitor} values in '{metrics_csv}'.")
    sign = 1.0 if mode == "min" else -1.0
    return min(rows, key=lambda r: sign * r[monitor])
