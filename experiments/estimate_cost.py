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

Without training anything, ``--from-records DIR`` estimates every cell of a grid from the kept
records of an earlier grid (``experiments/records/<date>/sst2_minilm``: each run's
``compute.train_seconds_per_epoch`` and ``compute.inference_seconds_per_sample`` times its CPU
share), scaled per member and per sentence (:func:`cell_seconds`); ``sst2_grid.py --dry-run``
prints these per-cell estimates, this script's ``--from-records`` the per-method sums:

    python experiments/estimate_cost.py --from-records experiments/records/2026-11-27/sst2_minilm \
        --protocol paper [--gains 1 4 20 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/estimate_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runner import Cell, parse_overrides, run_cell, set_threads
from experiments.sst2_grid import CONFIGS, LEARNING_RATES

VAL_SIZE, TEST_SIZE = 1010, 5725

#: The records the estimates of ``sst2_grid.py --dry-run`` start from.
DEFAULT_RECORDS = Path(__file__).resolve().parent / "records" / "2026-11-27" / "sst2_minilm"
#: Float32 time over the records' time. Those runs used bf16-mixed on a CPU with AMX; the
#: per-method float32 / bf16 ratios measured in 2026-11 (experiments/README.md, "Cost") were
#: 1.2-1.8 for training, so the largest is assumed for every method. On a CPU without AMX
#: (DESIGN.md: bf16 about 9x slower there) run float32 and rescale with ``speed_factor``.
PRECISION_FACTOR = {"32-true": 1.8, "32": 1.8, "bf16-mixed": 1.0}
#: Seconds of start-up per ``lorae fit`` (imports, model and data loading).
STARTUP_SECONDS = 30.0
#: Extra test cost of Bayes-LoRA over its MAP network: the linearised predictive's Jacobian
#: (C = 2 backward passes per sample) and the posterior fit (one pass with gradients over the
#: training split), as multiples of single LoRA's evaluation / training time.
BAYES_EVAL_FACTOR, BAYES_FIT_EPOCHS = 4.0, 1.0


@dataclass(frozen=True)
class Rate:
    """Single-thread CPU seconds of one method, per member (from kept records).

    Attributes:
        train: seconds per training sentence and member (one epoch's training steps).
        evaluate: seconds per evaluated sample and member (validation, test, OOD).
        source: the recorded method the rates come from.
    """

    train: float
    evaluate: float
    source: str


#: Methods without records of their own -> (recorded method, train factor, eval factor).
SUBSTITUTES = {
    "lora_ensemble_m8": ("lora_ensemble", 1.0, 1.0),
    "bayes_lora": ("single_lora", 1.0, BAYES_EVAL_FACTOR),
}


def record_rates(folder: Path, train_limit: int = 4000) -> dict[str, Rate]:
    """Per-member rates of every method in ``folder/runs/<method>/seed*/`` (mean over seeds).

    Each run's ``compute.train_seconds_per_epoch`` (over ``train_limit`` sentences, the
    grid's ``train_limit`` in its ``grid.json`` when it has one) and
    ``compute.inference_seconds_per_sample`` are multiplied by its CPU share
    (``cpu_seconds / wall_seconds`` of ``run.json``, at most 1) and divided by its members.
    Methods in :data:`SUBSTITUTES` without records of their own borrow another's rates.
    """
    grid_path = folder / "grid.json"
    if grid_path.is_file():
        train_limit = json.loads(grid_path.read_text()).get("train_limit") or train_limit
    sums: dict[str, list[tuple[float, float]]] = {}
    for path in sorted((folder / "runs").glob("*/seed*/metrics.json")):
        report = json.loads(path.read_text())
        run = json.loads((path.parent / "run.json").read_text())
        wall = float(run["wall_seconds"])
        share = min(1.0, float(run["cpu_seconds"]) / wall) if wall > 0 else 1.0
        members = int(report["method"].get("num_members") or 1)
        compute = report["compute"]
        train = float(compute["train_seconds_per_epoch"]) * share / train_limit / members
        evaluate = float(compute["inference_seconds_per_sample"]) * share / members
        sums.setdefault(path.parent.parent.name, []).append((train, evaluate))
    rates = {
        method: Rate(
            sum(t for t, _ in values) / len(values),
            sum(e for _, e in values) / len(values),
            method,
        )
        for method, values in sums.items()
    }
    for method, (source, train_factor, eval_factor) in SUBSTITUTES.items():
        if method not in rates and source in rates:
            base = rates[source]
            rates[method] = Rate(base.train * train_factor, base.evaluate * eval_factor, source)
    return rates


def cell_seconds(
    rate: Rate,
    *,
    method: str,
    members: int,
    epochs: int,
    train_limit: int,
    test: bool,
    precision: str = "32-true",
    test_size: int = TEST_SIZE,
    ood_limit: int = 2000,
    ood_factor: float = 3.0,
    speed_factor: float = 1.0,
) -> dict[str, float]:
    """Single-thread CPU seconds of one cell: ``epochs`` of training on ``train_limit``
    sentences with validation (1,010 sentences) after each, and, when ``test``, the test split
    and ``ood_limit`` OOD texts (``ood_factor`` times longer than SST-2 sentences), all linear
    in ``members`` (every method passes ``M x B`` rows through its backbone; Bayes-LoRA
    trains one network and samples its members from the linearised predictive, so its cost
    is its MAP network's plus the posterior, whatever M), plus start-up.

    Returns:
        ``{"epoch": seconds of one training epoch with its validation, "total": ...}``.
    """
    factor = PRECISION_FACTOR.get(precision, 1.0) * speed_factor
    if method == "bayes_lora":  # one MAP network; its samples are drawn in logit space
        members = 1
    train = rate.train * train_limit * members * factor
    val = rate.evaluate * VAL_SIZE * members * factor
    total = STARTUP_SECONDS + epochs * (train + val)
    if test:
        total += rate.evaluate * (test_size + ood_limit * ood_factor) * members * factor
        if method == "bayes_lora":  # posterior fit: one pass over the training split
            total += BAYES_FIT_EPOCHS * rate.train * train_limit * factor
    return {"epoch": train + val, "total": total}


def parallel_speedup(threads: int) -> float:
    """Assumed wall-time speed-up of one run on ``threads`` threads (70% efficiency for
    every thread after the first; small BERT batches do not scale linearly)."""
    return 1.0 + 0.7 * (max(threads, 1) - 1)


def hours(seconds: float) -> str:
    """``seconds`` as hours with two decimals (``n/a`` for NaN)."""
    return "n/a" if math.isnan(seconds) else f"{seconds / 3600:.2f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder with sst2/, agnews/ (measuring)")
    parser.add_argument("--output", type=Path, help="where the measured runs go (measuring)")
    parser.add_argument(
        "--from-records",
        type=Path,
        default=None,
        metavar="DIR",
        help="estimate from kept records (no training): the cells of sst2_grid.py\n"
        "--protocol PROTOCOL with --train-limit, --threads (and the gain sweep's --gains)",
    )
    parser.add_argument("--protocol", default="paper", help="with --from-records")
    parser.add_argument(
        "--gains", type=float, nargs="*", default=None, help="with --from-records (paper)"
    )
    parser.add_argument("--speed-factor", type=float, default=1.0, help="with --from-records")
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


def from_records(args: argparse.Namespace) -> str:
    """The per-method estimate (Markdown) of a grid's cells and, for the paper protocol, of
    the gain sweep, from kept records; nothing is trained."""
    from experiments import sst2_grid, sst2_paper

    argv = ["--protocol", args.protocol, "--data", "DATA", "--output", "/nonexistent/grid"]
    argv += ["--cost-records", str(args.from_records), "--threads", str(args.threads)]
    argv += ["--speed-factor", str(args.speed_factor), "--train-limit", str(args.train_limit)]
    argv += ["--epochs", str(args.epochs)]
    cells = sst2_grid.plan(argv)
    gains = sst2_paper.GAINS if args.gains is None else args.gains
    if args.protocol == "paper" and gains:
        grid = sst2_grid.parse(argv)
        base = sst2_paper.config_gain(grid.configs)
        cells += [
            sst2_paper.gain_cell(grid, gain, seed, math.nan, base)
            for gain in gains
            if gain != base
            for seed in grid.seeds
        ]
    groups: dict[tuple[str, str], list[float]] = {}
    for cell in cells:
        key = (str(cell.info["stage"]), str(cell.info["method"]))
        groups.setdefault(key, []).append(cell.estimate_seconds or math.nan)
    speedup = parallel_speedup(args.threads)
    lines = [
        f"Estimated from {args.from_records} ({args.protocol} protocol, "
        f"{args.train_limit} sentences, {args.epochs} epochs, float32 = "
        f"{PRECISION_FACTOR['32-true']} x the records' bf16, speed factor {args.speed_factor}):",
        "",
        "| stage | method | cells | CPU-h per cell (1 thread) | wall h per cell "
        f"({args.threads} thread(s)) | CPU-h |",
        "|---|---|---|---|---|---|",
    ]
    for (stage, method), values in groups.items():
        lines.append(
            f"| {stage} | {method} | {len(values)} | {hours(max(values))} | "
            f"{hours(max(values) / speedup)} | {hours(sum(values))} |"
        )
    total = sum(v for values in groups.values() for v in values)
    lines.append(f"| **all** | | **{len(cells)}** | | | **{hours(total)}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the estimate as a Markdown table; writes ``estimate.json``. With
    ``--from-records`` print the estimate from kept records instead."""
    args = _parser().parse_args(argv)
    if args.from_records is not None:
        print(from_records(args))
        return 0
    if args.data is None or args.output is None:
        raise SystemExit("error: give --data and --output (measuring) or --from-records DIR")
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
