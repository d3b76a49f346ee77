"""Measure one short epoch of each SST-2 method and extrapolate the CPU time of the full grid.

    python experiments/estimate_cost.py --data /work/shared/data --output /tmp/sst2_cost \
        [--sentences 500] [--precisions 32-true bf16-mixed] [--threads 1]

Each method of ``experiments/sst2_grid.py`` trains one epoch on ``--sentences`` training
sentences and is tested on a few batches, through the same ``lorae fit`` cells as the grid
(resumable likewise). From each run's ``metrics.json`` (``compute.train_seconds_per_epoch``,
``compute.inference_seconds_per_sample``) the script extrapolates, per precision,

    grid = sum over methods of  lrs * lr_epochs * (train + val)  +  seeds * (epochs * (train + val)
           + test + ood)

with ``train`` scaled linearly to ``--train-limit`` sentences, ``val``/``test`` the measured
seconds per evaluated sample times the validation (1,010) and test (``--test-size``, default
5,725) sizes, and ``ood``
the same per-sample time times ``--ood-limit`` times ``--ood-factor`` (AG News texts are about
three times as long as SST-2 sentences). Model loading and start-up are not included. On a
busy machine each measured time is multiplied by the run's CPU share (``cpu_seconds /
wall_seconds`` of ``run.json``, at most 1), which estimates the time on an idle machine with
``--threads`` threads; both numbers are in ``estimate.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/estimate_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runner import Cell, parse_overrides, run_cell, set_threads
from experiments.sst2_grid import CONFIGS, LEARNING_RATES

VAL_SIZE, TEST_SIZE = 1010, 5725


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with sst2/, agnews/")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--sentences", type=int, default=500, help="training sentences timed")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--test-batches", type=int, default=4, help="test batches timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE")
    # the grid being estimated
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr-epochs", type=int, default=None, help="default: --epochs")
    parser.add_argument("--lrs", type=int, default=3, help="LR candidates per method")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--test-size", type=int, default=TEST_SIZE, help="test sentences")
    parser.add_argument("--ood-limit", type=int, default=2000)
    parser.add_argument("--ood-factor", type=float, default=3.0)
    parser.add_argument("--grid-methods", nargs="+", default=None, help="default: --methods")
    parser.add_argument(
        "--shared", nargs="+", default=[], help="methods without a search (--share-lr targets)"
    )
    return parser


def measure(args: argparse.Namespace, method: str, precision: str) -> dict[str, float]:
    """Time one epoch of ``method`` at ``precision``; returns the compute report."""
    folder = args.output / precision / method
    cell_args = [
        "fit",
        "--config",
        str(CONFIGS / f"{method}.yaml"),
        f"--data.init_args.root={args.data / 'sst2'}",
        f"--data.init_args.ood_file={args.data / 'agnews' / 'dev.tsv'}",
        f"--data.init_args.train_limit={args.sentences}",
        f"--trainer.precision={precision}",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        f"--trainer.limit_test_batches={args.test_batches}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
        "--plots=false",
        *parse_overrides(args.override),
    ]
    record = run_cell(Cell(folder, cell_args, info={"method": method}))
    if record["returncode"] != 0:
        raise SystemExit(f"error: {method} ({precision}) failed; see {folder / 'lorae.log'}")
    compute = json.loads((folder / "metrics.json").read_text())["compute"]
    wall = float(record["wall_seconds"])
    share = min(1.0, float(record["cpu_seconds"]) / wall) if wall > 0 else 1.0
    return {
        "train_seconds": float(compute["train_seconds_per_epoch"]) * share,
        "eval_seconds_per_sample": float(compute["inference_seconds_per_sample"]) * share,
        "train_seconds_measured": float(compute["train_seconds_per_epoch"]),
        "cpu_share": share,
        "wall_seconds": wall,
    }


def extrapolate(args: argparse.Namespace, m: dict[str, float], method: str) -> dict[str, float]:
    """Grid seconds of one method from its measurement (see the module docstring)."""
    train = m["train_seconds"] * args.train_limit / args.sentences
    per_sample = m["eval_seconds_per_sample"]
    val, test = per_sample * VAL_SIZE, per_sample * args.test_size
    ood = per_sample * args.ood_limit * args.ood_factor
    lr_epochs = args.lr_epochs or args.epochs
    search = 0.0 if method in args.shared else args.lrs * lr_epochs * (train + val)
    seeds = args.seeds * (args.epochs * (train + val) + test + ood)
    return {"train_epoch": train, "search": search, "seeds": seeds, "total": search + seeds}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the estimate as a Markdown table; writes ``estimate.json``."""
    args = _parser().parse_args(argv)
    set_threads(args.threads)
    grid_methods = args.grid_methods or args.methods
    report: dict[str, dict[str, dict[str, float]]] = {}
    lines = [
        "| precision | method | s / short epoch (measured) | CPU share | s / short epoch (idle) "
        "| s / eval sample (idle) | grid hours (idle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision in args.precisions:
        total = 0.0
        for method in args.methods:
            measured = measure(args, method, precision)
            estimate = extrapolate(args, measured, method)
            report.setdefault(precision, {})[method] = {**measured, **estimate}
            if method in grid_methods:
                total += estimate["total"]
            lines.append(
                f"| {precision} | {method} | {measured['train_seconds_measured']:.1f} | "
                f"{measured['cpu_share']:.2f} | {measured['train_seconds']:.1f} | "
                f"{measured['eval_seconds_per_sample']:.4f} | {estimate['total'] / 3600:.2f} |"
            )
        lines.append(
            f"| {precision} | **grid ({', '.join(grid_methods)})** | | | | "
            f"| **{total / 3600:.2f}** |"
        )
    (args.output / "estimate.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
