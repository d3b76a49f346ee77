"""Does the data pipeline keep up? End-to-end ``lorae fit`` throughput against the model alone.

The same ``lorae fit`` configuration (built by :func:`lorae.cli.main.build_cli`, the path of
the ``lorae`` command) is trained for ``--warmup-steps + --steps`` steps, once per
``--workers`` setting, reading the images from disk through the configured data module; then
once more on one batch of that data module held in memory (the model-only run: the same
trainer, module and step, no loading at all). Throughput is samples per second over the
steps after the warm-up (from the end of the last warm-up step to the end of the last step),
so it includes every wait for data. Reported: each setting's throughput and its ratio to the
model-only throughput (issue 20's target: >= 0.9 for the default setting).

Run from the repository root on the CIFAR-10 ImageFolder images (extracted to a temporary
folder, removed afterwards)::

    python benchmarks/pipeline.py --archive ../shared/data/cifar10/train.tar.gz \\
        --output pipeline.json --markdown docs/performance.md

``--workers default`` leaves ``num_workers`` and ``pin_memory`` at the data module's defaults
(``"auto"``); numbers set ``num_workers``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make `benchmarks` (and a source `lorae`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import tarfile
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.report import write_section
from lorae.cli.compose import load_composed
from lorae.cli.main import build_cli
from lorae.data.base import ClassificationDataModule, available_cores
from lorae.training.precision import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "examples" / "image_folder_vit_b_32.yaml"


class StepTimer(pl.Callback):
    """Records the wall-clock time at the end of every training step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.batch_sizes: list[int] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        self.ends.append(time.perf_counter())
        self.batch_sizes.append(int(batch[1].shape[0]))

    def throughput(self, warmup: int) -> float:
        """Samples per second over the steps after the first ``warmup`` ones."""
        if len(self.ends) <= warmup or warmup < 1:
            raise RuntimeError(f"need more than {warmup} >= 1 steps, timed {len(self.ends)}")
        seconds = self.ends[-1] - self.ends[warmup - 1]
        return sum(self.batch_sizes[warmup:]) / seconds


class RepeatedBatch(Dataset[Any]):
    """One collated batch, ``length`` times (the model-only run's "data")."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batch


def fit_config(
    base: dict[str, Any], root: Path, members: int, steps: int, precision: str
) -> dict[str, Any]:
    """``base`` (a ``lorae fit`` config) made into a short timed run on ``root``: random
    backbone weights (nothing to download), ``members`` members, ``steps`` training steps, no
    validation, logging, checkpoints or progress bar; the data module's own options kept."""
    config = copy.deepcopy(base)
    config.pop("test_after_fit", None)
    trainer = config.setdefault("trainer", {})
    for key in ("logger", "callbacks", "max_epochs"):
        trainer.pop(key, None)
    trainer.update(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    init_args = config["model"]["method"].setdefault("init_args", {})
    init_args.update(pretrained=False, num_members=members)
    config["model"].pop("warmup_steps", None)
    config["data"].setdefault("init_args", {})["root"] = str(root)
    return config


def _with_workers(config: dict[str, Any], workers: str) -> dict[str, Any]:
    out = copy.deepcopy(config)
    data_args = out["data"]["init_args"]
    data_args.pop("num_workers", None)
    data_args.pop("pin_memory", None)
    if workers != "default":
        data_args["num_workers"] = int(workers)
    return out


def timed_fit(config: dict[str, Any], warmup: int, model_only: bool) -> dict[str, Any]:
    """Train ``config`` and return its throughput; ``model_only``: on one in-memory batch."""
    argv, sys.argv[1:] = sys.argv[1:], []  # this script's own arguments are not the CLI's
    try:
        cli = build_cli(["--config", json.dumps(config)], run=False, save_config=False)
    finally:
        sys.argv[1:] = argv
    data = cli.datamodule
    assert isinstance(data, ClassificationDataModule)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    started = time.perf_counter()
    if model_only:
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        steps = int(config["trainer"]["max_steps"])
        loader = DataLoader(RepeatedBatch(batch, steps), batch_size=None)
        cli.trainer.fit(cli.model, train_dataloaders=loader)
        workers, pin = 0, False
    else:
        cli.trainer.fit(cli.model, datamodule=data)
        workers, pin = data.loader_workers, data.loader_pin_memory
    return {
        "samples_per_second": timer.throughput(warmup),
        "steps": len(timer.ends),
        "num_workers": workers,
        "pin_memory": pin,
        "wall_seconds": time.perf_counter() - started,
    }


def extract(archive: Path, into: Path) -> Path:
    """Extract ``archive`` (``train/<class>/*.jpg``) into ``into``; returns the ImageFolder
    root (the folder holding ``train/``)."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    found = next(into.rglob("train"), None)
    if found is None or not found.is_dir():
        raise SystemExit(f"pipeline.py: {archive} holds no train/ folder")
    return found.parent


def run(args: argparse.Namespace, root: Path, command: str) -> dict[str, Any]:
    """``--rounds`` rounds of every ``--workers`` setting and the model-only run, round-robin
    (so a slow drift of a shared machine hits every setting alike); each setting's
    throughput is the median over the rounds, its ratio the median's over the model-only
    median."""
    torch.set_num_threads(args.threads)
    base = load_composed(args.config)
    steps = args.warmup_steps + args.steps
    config = fit_config(base, root, args.members, steps, args.precision)
    if args.config_override:
        config = _merge(config, json.loads(args.config_override))
    batch = int(config["data"]["init_args"].get("batch_size", 32))
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in [*args.workers, "model_only"]}
    for r in range(args.rounds):
        for workers in runs:
            print(f"[pipeline] round {r + 1}: {workers}", file=sys.stderr, flush=True)
            only = workers == "model_only"
            setting = _with_workers(config, "0" if only else workers)
            runs[workers].append(timed_fit(setting, args.warmup_steps, only))
    summary = {name: _median_run(each) for name, each in runs.items()}
    model_only = summary.pop("model_only")
    settings = summary
    for entry in settings.values():
        entry["ratio"] = entry["samples_per_second"] / model_only["samples_per_second"]
    return {
        "command": command,
        "config": str(args.config),
        "members": args.members,
        "batch_size": batch,
        "precision": args.precision,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "settings": settings,
        "model_only": model_only,
        "environment": {
            "cpu": _cpu_name(),
            "available_cores": available_cores(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **describe_cpu(),
        },
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's rounds: the median throughput, every round's, and the loader options."""
    rates = [r["samples_per_second"] for r in runs]
    return {**runs[0], "samples_per_second": statistics.median(rates), "rounds": rates}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def render_markdown(result: dict[str, Any]) -> str:
    """The section of ``docs/performance.md``: command, machine, one row per setting."""
    env = result["environment"]
    model = result["model_only"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['cpu']} (CPU kind `{env['cpu_kind']}`), {env['available_cores']} "
        f"cores available, {result['threads']} torch threads, torch {env['torch']}, "
        f"{env['date']}. Config `{result['config']}` with {result['members']} members, "
        f"batch {result['batch_size']}, precision {result['precision']}, random weights; "
        f"{result['steps']} timed steps after {result['warmup_steps']} warm-up steps, "
        f"{result.get('rounds', 1)} round(s), interleaved; samples/s is the median over "
        "the rounds (each round's in brackets).",
        "",
        "| data loading | num_workers | pin_memory | samples/s | x model-only |",
        "|---|---:|:---:|---:|---:|",
    ]
    for name, entry in result["settings"].items():
        label = "defaults (`auto`)" if name == "default" else f"num_workers={name}"
        lines.append(
            f"| {label} | {entry['num_workers']} | {'yes' if entry['pin_memory'] else 'no'} | "
            f"{_rate(entry)} | {entry['ratio']:.3f} |"
        )
    lines.append(f"| model only (one batch in memory) | - | - | {_rate(model)} | 1 |")
    return "\n".join(lines)


def _rate(entry: dict[str, Any]) -> str:
    rounds = entry.get("rounds", [])
    each = f" ({', '.join(f'{r:.3g}' for r in rounds)})" if len(rounds) > 1 else ""
    return f"{entry['samples_per_second']:.3g}{each}"


def markers(result: dict[str, Any]) -> tuple[str, str]:
    kind = result["environment"]["cpu_kind"]
    return f"<!-- pipeline:cpu-{kind}:start -->", f"<!-- pipeline:cpu-{kind}:end -->"


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    """Write the section between its markers in ``path`` (appended when they are absent)."""
    write_section(path, *markers(result), render_markdown(result))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, help="an ImageFolder root (holding train/)")
    where.add_argument("--archive", type=Path, help="a .tar.gz of train/<class>/*.jpg")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a lorae fit config")
    p.add_argument(
        "--config-override", help="JSON merged into the config (e.g. a tiny backbone for tests)"
    )
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="round-robin repetitions")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--workers",
        nargs="+",
        default=["default", "0", "1"],
        help="'default' (the data module's auto) and/or num_workers values",
    )
    p.add_argument("--output", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--from-json", type=Path, help="render an earlier result instead of running")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        argv_text = sys.argv[1:] if argv is None else list(argv)
        command = "python benchmarks/pipeline.py " + shlex.join(argv_text)
        if args.root is not None:
            result = run(args, args.root, command)
        elif args.archive is not None:
            with tempfile.TemporaryDirectory(prefix="lorae-pipeline-") as folder:
                result = run(args, extract(args.archive, Path(folder)), command)
        else:
            raise SystemExit("pipeline.py: give --root or --archive")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    if args.markdown is not None:
        write_markdown(args.markdown, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
