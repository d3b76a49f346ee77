"""Shared machinery of the experiment scripts: one resumable ``lorae fit`` per cell, the
learning-rate choice, and running methods side by side.

A *cell* is one training run (one method, learning rate and seed) in its own folder. The cell
is finished when its marker file exists (``metrics.json`` for runs that test, the validation
summary for learning-rate search runs). A folder without it is the remains of an interrupted
run: by default it is deleted and the cell runs again from the start; a cell with
``resume=True`` whose run saved ``checkpoints/last.ckpt`` (a full training checkpoint, written
after every epoch by :func:`final_checkpoint_callbacks`) continues from that checkpoint with
``lorae fit --ckpt_path``, so an interruption costs at most the epoch in progress. Running the
same command again therefore continues an interrupted grid where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "LAST_CHECKPOINT",
    "SELECT",
    "Cell",
    "best_validation_row",
    "cell_loggers",
    "final_checkpoint_callbacks",
    "lr_label",
    "parallel",
    "parse_overrides",
    "run_cell",
    "select_lr",
    "set_threads",
]

T = TypeVar("T")
Mode = Literal["subprocess", "in-process"]

#: Selection metric -> whether lower is better.
SELECT: dict[str, Literal["min", "max"]] = {"val/nll": "min", "val/acc": "max", "val/ece": "min"}

#: File name of the full training checkpoint a resumable cell continues from.
LAST_CHECKPOINT = "last.ckpt"


@dataclass
class Cell:
    """One ``lorae fit`` run in ``folder``; finished once ``folder / marker`` exists.

    Attributes:
        folder: The run's log directory (TensorBoard files, ``csv/metrics.csv``,
            ``checkpoints/``, ``config.yaml``, ``metrics.json``, ``run.json``).
        args: The ``lorae`` arguments (starting with ``fit``).
        marker: File name inside ``folder`` that marks the cell as finished.
        info: Extra fields written to ``run.json`` (method, lr, seed, ...).
        callbacks: When given, the run's ``trainer.callbacks`` (written into the cell's own
            config next to the loggers; they replace the method config's list).
        resume: Continue an interrupted run from ``checkpoints/last.ckpt`` instead of
            starting over (needs callbacks that save it, :func:`final_checkpoint_callbacks`).
        log_config: Pass the cell's logger config (False for tools such as ``lorae analyze``).
        estimate_seconds: Expected CPU seconds of the cell (for ``--dry-run`` listings).
    """

    folder: Path
    args: list[str]
    marker: str = "metrics.json"
    info: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] | None = None
    resume: bool = False
    log_config: bool = True
    estimate_seconds: float | None = None

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


def final_checkpoint_callbacks() -> list[dict[str, Any]]:
    """``trainer.callbacks`` of a resumable run that tests its final weights: one
    ``ModelCheckpoint`` without a monitor that writes the full training state to
    ``checkpoints/last.ckpt`` after every epoch (what ``--ckpt_path`` resumes from). As in
    ``configs/sst2/base.yaml`` (the paper trains 3 epochs with a linear decay to 0 and
    evaluates the result), ``test_after_fit`` then tests the final weights.

    The epoch's checkpoint is the one top-k slot (``save_top_k: 1``) named ``last`` and
    overwritten in place (``enable_version_counter: false``), not ``save_last``: Lightning 2.6
    writes ``save_last`` only beside a top-k save, so ``save_top_k: 0, save_last: true``
    wrote ``last.ckpt`` only when training ended, and a run stopped before that had nothing
    to resume from (``tests/training/test_epoch_checkpoints.py``)."""
    # Every option is spelled out: jsonargparse merges the init_args of a callback of the same
    # class in the method config's list (configs/sst2_minilm/base.yaml keeps a weights-only
    # val/nll checkpoint), and a weights-only last.ckpt could not be resumed from.
    init_args = {
        "monitor": None,
        "mode": "min",
        "filename": "last",
        "save_weights_only": False,
        "save_top_k": 1,
        "save_last": False,
        "enable_version_counter": False,
    }
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": init_args}]


def cell_loggers(folder: Path, callbacks: list[dict[str, Any]] | None = None) -> Path:
    """Write ``folder/loggers.yaml``: TensorBoard into ``folder`` and a CSV log of every
    epoch's metrics into ``folder/csv/metrics.csv`` (the learning-rate search reads it), and
    ``callbacks`` as ``trainer.callbacks`` when given.

    Returns:
        The file, to pass as a second ``--config``.
    """
    config: dict[str, Any] = {
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
    if callbacks is not None:
        config["trainer"]["callbacks"] = callbacks
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "loggers.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


#: The CPU seconds of the child process a thread's last :func:`_run_lorae` ran (``cpu``).
_LAST_CHILD = threading.local()


def _run_lorae(args: list[str], log: Path, mode: Mode) -> int:
    """Run ``lorae ARGS``; stdout and stderr go to ``log``. Returns the exit code.

    A child's CPU time is its own (``os.wait4``), kept in ``_LAST_CHILD.cpu``: the process's
    ``RUSAGE_CHILDREN`` would also count the children that other threads (``--jobs``)
    reaped meanwhile."""
    if mode == "subprocess":
        with log.open("w", encoding="utf-8") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "lorae", *args], stdout=handle, stderr=subprocess.STDOUT
            )
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            _LAST_CHILD.cpu = usage.ru_utime + usage.ru_stime
            return process.returncode
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


def _keep_csv_log(folder: Path, attempt: int) -> None:
    """Set aside ``csv/metrics.csv`` before a resumed attempt (Lightning's ``CSVLogger``
    deletes the file it finds) as ``csv/metrics_<attempt>.csv``."""
    current = folder / "csv" / "metrics.csv"
    if current.is_file():
        current.replace(folder / "csv" / f"metrics_{attempt}.csv")


def _merge_csv_log(folder: Path) -> None:
    """``csv/metrics.csv`` as the rows of every attempt in order (``metrics_<k>.csv`` set
    aside by :func:`_keep_csv_log`, then the last attempt's), under the union of their
    headers; an epoch logged twice keeps both rows (the later counts,
    :func:`best_validation_row`)."""
    parts = sorted((folder / "csv").glob("metrics_*.csv"), key=lambda p: int(p.stem.split("_")[1]))
    current = folder / "csv" / "metrics.csv"
    if not parts:
        return
    rows: list[dict[str, str]] = []
    fields: dict[str, None] = {}
    for part in [*parts, current]:
        if not part.is_file():
            continue
        with part.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields.update(dict.fromkeys(reader.fieldnames or []))
            rows.extend(reader)
    with current.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def _attempts(folder: Path) -> list[dict[str, Any]]:
    """The finished attempts of an interrupted cell (``attempts.json``; empty when none)."""
    path = folder / "attempts.json"
    return list(json.loads(path.read_text())) if path.is_file() else []


def run_cell(cell: Cell, mode: Mode = "subprocess") -> dict[str, Any]:
    """Run ``cell`` unless it is done; write ``run.json`` (arguments, wall and CPU time, exit
    code).

    A leftover folder without the marker (an interrupted or failed run) is deleted first,
    except for a ``resume`` cell whose ``checkpoints/last.ckpt`` exists: that run continues
    from the checkpoint (``--ckpt_path``). Every attempt that returns is recorded in
    ``attempts.json``; ``run.json`` sums their wall and CPU seconds (an attempt killed
    before it returned is not counted: its time is lost with it).

    Returns:
        The ``run.json`` record (read back when the cell was already done, with
        ``"skipped": true``).
    """
    record_path = cell.folder / "run.json"
    if cell.done:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        return {**record, "skipped": True}
    last = cell.folder / "checkpoints" / LAST_CHECKPOINT
    resuming = cell.resume and last.is_file()
    if cell.folder.exists() and not resuming:
        shutil.rmtree(cell.folder)
    cell.folder.mkdir(parents=True, exist_ok=True)
    attempts = _attempts(cell.folder) if resuming else []
    args = list(cell.args)
    if cell.log_config:
        args += ["--config", str(cell_loggers(cell.folder, cell.callbacks))]
    if resuming:
        args.append(f"--ckpt_path={last}")
        _keep_csv_log(cell.folder, len(attempts))
    who = resource.RUSAGE_CHILDREN if mode == "subprocess" else resource.RUSAGE_SELF
    _LAST_CHILD.cpu = None
    before = resource.getrusage(who)
    start = time.perf_counter()
    log = cell.folder / ("lorae.log" if not attempts else f"lorae_{len(attempts)}.log")
    code = _run_lorae(args, log, mode)
    wall = time.perf_counter() - start
    if resuming:
        _merge_csv_log(cell.folder)
    after = resource.getrusage(who)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if mode == "subprocess" and _LAST_CHILD.cpu is not None:
        cpu = _LAST_CHILD.cpu  # this cell's child alone (see _run_lorae)
    attempt = {
        "command": ["lorae", *args],
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "returncode": code,
        "resumed_from": str(last) if resuming else None,
    }
    attempts.append(attempt)
    if cell.resume:
        (cell.folder / "attempts.json").write_text(json.dumps(attempts, indent=2) + "\n")
    record = {
        **cell.info,
        # the command of the first attempt: a resumed attempt adds only --ckpt_path
        "command": attempts[0]["command"],
        "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 3),
        # CPU time of the run; with one thread on a busy machine, cpu / wall is the share of
        # a core it got, so cpu_seconds estimates the wall time on an idle machine.
        "cpu_seconds": round(sum(a["cpu_seconds"] for a in attempts), 3),
        "returncode": code,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cell.resume:
        record["attempts"] = len(attempts)
    if cell.estimate_seconds is not None:
        record["estimate_seconds"] = round(cell.estimate_seconds, 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return {**record, "skipped": False}


def best_validation_row(
    metrics_csv: Path, monitor: str = "val/nll", mode: Literal["min", "max", "last"] = "min"
) -> dict[str, float]:
    """The validation metrics of the epoch the checkpoint callback keeps: the best
    ``monitor`` (``mode`` ``min``/``max``), or the final epoch (``mode="last"``, for runs that
    test their final weights).

    Reads the ``CSVLogger`` file of a run: only rows that hold validation metrics (``val/``
    keys) are considered; nothing logged under ``test/`` is read. A resumed run may have
    logged an epoch twice; the later row counts.

    Returns:
        ``{"epoch": ..., "val/acc": ..., "val/nll": ..., ...}`` of the chosen row.

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
    if mode == "last":
        return max(reversed(rows), key=lambda r: r["epoch"])  # the latest row of the last epoch
    sign = 1.0 if mode == "min" else -1.0
    return min(rows, key=lambda r: sign * r[monitor])


def lr_label(lr: float) -> str:
    """Folder-name form of a learning rate, e.g. ``0.0005`` -> ``lr5e-04``."""
    return f"lr{lr:.0e}"


def select_lr(
    candidates: dict[float, dict[str, Any]], monitor: str
) -> tuple[float, dict[str, Any]]:
    """The learning rate whose validation ``monitor`` is best (ties: the smaller rate).

    Args:
        candidates: Learning rate -> validation summary (``val/<metric>`` keys).
        monitor: A key of :data:`SELECT`.
    """
    sign = 1.0 if SELECT[monitor] == "min" else -1.0
    lr = min(sorted(candidates), key=lambda rate: sign * candidates[rate][monitor])
    return lr, candidates[lr]


def parallel(jobs: int, work: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
    """``work(item)`` for every item, ``jobs`` at a time (threads, each driving its own child
    processes), results in order."""
    if jobs == 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(work, items))


def add_pretrain_finetune_options(
    parser: argparse.ArgumentParser, methods: list[str], configs: Path
) -> None:
    """The options every appendix-J script (pretrain a backbone, then fine-tune ``methods``
    from it) shares: ``--pretrain-epochs --seeds --methods --precision --configs --override
    --threads --mode``."""
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: config's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "32", "bf16-mixed"])
    parser.add_argument("--configs", type=Path, default=configs)
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra `lorae fit --KEY=VALUE` options for every run",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["subprocess", "in-process"], default="subprocess")
