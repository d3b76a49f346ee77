"""SST-2 with the pretrained all-MiniLM-L6-v2: every method, a learning rate per method chosen on
validation, three seeds (issue 8; the paper's appendix A.7 setting scaled to CPU).

    python experiments/sst2_grid.py --data /work/shared/data --output runs/sst2_minilm \
        [--seeds 0 1 2] [--methods ...] [--lrs ...] [--precision bf16-mixed|32-true]

Stage 1 (learning-rate search, seed ``--lr-seed`` only): each method is trained with every
learning rate of its list (``LEARNING_RATES`` or ``--lrs``) without testing
(``--test_after_fit=false``); the epoch the checkpoint callback keeps (lowest ``val/nll``) gives
the validation metrics, read from the run's CSV log, and the learning rate with the best
``--select`` metric is chosen. Choices and all candidates' validation metrics go to
``<output>/lr_search/<method>/selection.json``, collected in ``<output>/lr_selection.json``.
The test split is never evaluated in this stage.

Stage 2: each method is trained with its chosen learning rate for every seed through the real
``lorae fit --test_after_fit=true`` and writes ``<output>/runs/<method>/seed<S>/metrics.json``.
``--fixed-lr LR`` skips stage 1 and runs stage 2 at ``LR`` for every method (a rerun of a
finished grid's seeds at the rate it chose).

Every run is a cell in its own folder with ``run.json`` (command, wall time, exit code); cells
whose marker exists are skipped, so running the same command again continues an interrupted
grid. A seed sets ``seed_everything`` and the data module's ``seed`` (shuffle order); the data
subsets use the config's fixed ``subset_seed``. ``trainer.deterministic`` is on in the configs,
so a cell rerun with the same seed gives the same numbers. ``--jobs 2`` runs two methods at a
time (one CPU thread each by default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as `python experiments/sst2_grid.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runner import Cell, best_validation_row, parse_overrides, run_cell, set_threads

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "sst2_minilm"

#: Learning-rate candidates per method (config file stem): full fine-tuning takes the usual
#: BERT range, the adapters (LoRA, BatchEnsemble factors) larger steps.
LEARNING_RATES: dict[str, list[float]] = {
    "single_network": [2e-5, 5e-5, 1e-4],
    "single_lora": [1e-4, 5e-4, 1e-3],
    "mc_dropout": [2e-5, 5e-5, 1e-4],
    "explicit_ensemble": [2e-5, 5e-5, 1e-4],
    "lora_ensemble": [1e-4, 5e-4, 1e-3],
    "lora_ensemble_m8": [1e-4, 5e-4, 1e-3],
    "batch_ensemble": [2e-5, 5e-5, 1e-4],
}
DEFAULT_METHODS = [m for m in LEARNING_RATES if m != "lora_ensemble_m8"]

#: Selection metric -> whether lower is better.
SELECT: dict[str, Literal["min", "max"]] = {"val/nll": "min", "val/acc": "max", "val/ece": "min"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder holding sst2/ and agnews/")
    parser.add_argument("--output", type=Path, required=True, help="grid folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=sorted(LEARNING_RATES),
        help=f"config stems (default: {' '.join(DEFAULT_METHODS)}; add lora_ensemble_m8)",
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="one LR list for every method"
    )
    parser.add_argument("--lr-seed", type=int, default=0, help="seed of the LR search runs")
    parser.add_argument(
        "--share-lr",
        nargs="+",
        default=[],
        metavar="TARGET=SOURCE",
        help="TARGET uses the rate chosen for SOURCE instead of a search of its own, e.g.\n"
        "explicit_ensemble=single_network (its members are independently trained single\n"
        "networks); a cost reduction, recorded in lr_selection.json as shared_from",
    )
    parser.add_argument(
        "--fixed-lr",
        type=float,
        default=None,
        metavar="LR",
        help="no search: every method trains its seeds at LR (e.g. to rerun stage 2 at the\n"
        "rate a finished grid chose; recorded in grid.json, no lr_selection.json)",
    )
    parser.add_argument("--select", choices=sorted(SELECT), default="val/nll")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "32", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the configs' 3")
    parser.add_argument(
        "--lr-epochs", type=int, default=None, help="epochs of the LR search (default --epochs)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="default: configs' 64")
    parser.add_argument("--train-limit", type=int, default=None, help="default: 4000")
    parser.add_argument(
        "--test-limit", type=int, default=None, help="test sentences (default: all 5,725)"
    )
    parser.add_argument("--ood-limit", type=int, default=None, help="default: 2000")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="config folder")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra `lorae fit --KEY=VALUE` options for every run (e.g. another backbone)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="methods run at the same time (subprocess mode)"
    )
    parser.add_argument(
        "--mode",
        choices=["subprocess", "in-process"],
        default="subprocess",
        help="run `lorae fit` as a child process (default) or inside this one",
    )
    parser.add_argument(
        "--keep-lr-checkpoints", action="store_true", help="keep the LR search checkpoints"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def common_args(args: argparse.Namespace, method: str, seed: int, lr: float) -> list[str]:
    """``lorae fit`` arguments shared by both stages for one method, seed and learning rate."""
    config = args.configs / f"{method}.yaml"
    if not config.is_file():
        raise SystemExit(f"error: no config '{config}' for method {method!r}")
    result = [
        "fit",
        "--config",
        str(config),
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.root={args.data / 'sst2'}",
        f"--data.init_args.ood_file={args.data / 'agnews' / 'dev.tsv'}",
        f"--model.optimizer.init_args.lr={lr}",
        f"--trainer.precision={args.precision}",
        "--trainer.enable_progress_bar=false",
    ]
    for option, value in (
        ("data.init_args.max_length", args.max_length),
        ("data.init_args.train_limit", args.train_limit),
        ("data.init_args.test_limit", args.test_limit),
        ("data.init_args.ood_limit", args.ood_limit),
    ):
        if value is not None:
            result.append(f"--{option}={value}")
    return [*result, *parse_overrides(args.override)]


def lr_label(lr: float) -> str:
    """Folder-name form of a learning rate, e.g. ``0.0005`` -> ``lr5e-04``."""
    return f"lr{lr:.0e}"


def search_cells(args: argparse.Namespace, method: str) -> list[tuple[float, Cell]]:
    """The learning-rate search cells of ``method`` (seed ``--lr-seed``, no test)."""
    epochs = args.lr_epochs or args.epochs
    cells = []
    for lr in args.lrs or LEARNING_RATES[method]:
        folder = args.output / "lr_search" / method / lr_label(lr)
        cell_args = [*common_args(args, method, args.lr_seed, lr), "--test_after_fit=false"]
        if epochs is not None:
            cell_args.append(f"--trainer.max_epochs={epochs}")
        info = {"stage": "lr_search", "method": method, "lr": lr, "seed": args.lr_seed}
        cells.append((lr, Cell(folder, cell_args, marker="validation.json", info=info)))
    return cells


def finish_search_cell(cell: Cell, monitor: str, keep_checkpoints: bool) -> dict[str, Any]:
    """Read the validation metrics of a finished search run and write its marker."""
    row = best_validation_row(cell.folder / "csv" / "metrics.csv", "val/nll", "min")
    summary = {"checkpoint_epoch": row.pop("epoch"), **row, "selected_by": monitor}
    (cell.folder / cell.marker).write_text(json.dumps(summary, indent=2) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(cell.folder / "checkpoints", ignore_errors=True)
    return summary


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


def search_method(args: argparse.Namespace, method: str) -> dict[str, Any] | None:
    """Stage 1 for one method: run its search cells and write its choice to
    ``lr_search/<method>/selection.json``. Returns the choice (``None`` in a dry run)."""
    candidates: dict[float, dict[str, Any]] = {}
    for lr, cell in search_cells(args, method):
        if args.dry_run:
            print(" ".join(["lorae", *cell.args]))
            continue
        record = run_cell(cell, args.mode)
        if record["returncode"] != 0:
            print(f"[lr search] {method} lr={lr:g}: FAILED, see {cell.folder / 'lorae.log'}")
            return None
        summary = (
            json.loads((cell.folder / cell.marker).read_text())
            if record["skipped"]
            else finish_search_cell(cell, args.select, args.keep_lr_checkpoints)
        )
        candidates[lr] = {**summary, "wall_seconds": record.get("wall_seconds")}
        print(f"[lr search] {method} lr={lr:g}: {args.select}={summary[args.select]:.4f}")
    if args.dry_run:
        return None
    lr, best = select_lr(candidates, args.select)
    choice = {
        "lr": lr,
        "selected_by": args.select,
        "value": best[args.select],
        "seed": args.lr_seed,
        "candidates": {f"{k:g}": v for k, v in sorted(candidates.items())},
    }
    (args.output / "lr_search" / method / "selection.json").write_text(
        json.dumps(choice, indent=2) + "\n"
    )
    print(f"[lr search] {method}: chose lr={lr:g}")
    return choice


def seed_runs(args: argparse.Namespace, method: str, lr: float) -> int:
    """Stage 2 for one method: train and test at ``lr`` for every seed; returns failures."""
    failed = 0
    for seed in args.seeds:
        folder = args.output / "runs" / method / f"seed{seed}"
        cell_args = [*common_args(args, method, seed, lr), "--test_after_fit=true"]
        if args.epochs is not None:
            cell_args.append(f"--trainer.max_epochs={args.epochs}")
        info = {"stage": "test", "method": method, "lr": lr, "seed": seed}
        cell = Cell(folder, cell_args, info=info)
        if args.dry_run:
            print(" ".join(["lorae", *cell.args]))
            continue
        record = run_cell(cell, args.mode)
        state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
        if record["returncode"] != 0:
            failed += 1
            state = f"FAILED, see {folder / 'lorae.log'}"
        print(f"[test] {method} seed {seed} lr={lr:g}: {state}")
    return failed


def shared_lrs(args: argparse.Namespace) -> dict[str, str]:
    """``--share-lr TARGET=SOURCE`` items as ``{target: source}``, checked."""
    shared = {}
    for item in args.share_lr:
        target, _, source = item.partition("=")
        if target not in LEARNING_RATES or source not in LEARNING_RATES or target == source:
            raise SystemExit(f"error: --share-lr needs TARGET=SOURCE method names, got {item!r}")
        if target in args.methods and source not in args.methods:
            raise SystemExit(f"error: --share-lr {item}: {source} is not in --methods")
        shared[target] = source
    if set(shared) & set(shared.values()):
        raise SystemExit("error: --share-lr sources cannot themselves share another's rate")
    return shared


def _parallel(args: argparse.Namespace, work: Any, methods: list[str]) -> list[Any]:
    """``work(method)`` for every method, ``--jobs`` at a time, results in order."""
    if args.jobs == 1:
        return [work(method) for method in methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(work, methods))


def write_selection(args: argparse.Namespace) -> dict[str, Any]:
    """Collect every method's ``selection.json`` into ``<output>/lr_selection.json``."""
    selection = {}
    for method in LEARNING_RATES:
        path = args.output / "lr_search" / method / "selection.json"
        if path.is_file():
            selection[method] = json.loads(path.read_text())
    (args.output / "lr_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return selection


def main(argv: list[str] | None = None) -> int:
    """Run both stages for every method; returns the number of failed runs (0: success).

    First every method's learning-rate search (except ``--share-lr`` targets), then every
    method's seeds. With ``--jobs N`` up to N methods run at the same time, each as its own
    sequence of child processes.
    """
    args = _parser().parse_args(argv)
    if args.jobs > 1 and args.mode != "subprocess":
        raise SystemExit("error: --jobs > 1 needs --mode subprocess")
    set_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.output / "grid.json").write_text(json.dumps(options, indent=2) + "\n")
    if args.fixed_lr is not None:  # stage 2 only
        if args.lrs or args.share_lr:
            raise SystemExit("error: --fixed-lr replaces the search: drop --lrs and --share-lr")
        return sum(_parallel(args, lambda m: seed_runs(args, m, args.fixed_lr), args.methods))
    shared = shared_lrs(args)
    searched = [m for m in args.methods if m not in shared]
    results = _parallel(args, lambda m: search_method(args, m), searched)
    choices = dict(zip(searched, results, strict=True))
    failed = sum(1 for choice in choices.values() if choice is None and not args.dry_run)

    def seeds_of(method: str) -> int:
        choice = choices.get(shared.get(method, method))
        if choice is not None:
            return seed_runs(args, method, float(choice["lr"]))
        if args.dry_run:  # no rate chosen yet: print the commands with lr=nan
            return seed_runs(args, method, float("nan"))
        return 0  # its search failed (counted above): nothing to test

    failed += sum(_parallel(args, seeds_of, args.methods))
    if not args.dry_run:
        selection = write_selection(args)
        for target, source in shared.items():
            if target in args.methods and source in selection:
                selection[target] = {**selection[source], "shared_from": source}
        (args.output / "lr_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
