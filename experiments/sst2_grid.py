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
finished grid's seeds at the rate it chose); ``--method-lr METHOD=LR ...`` does the same with a
rate per method (the GPU run of issue 18 trains on the full training set at the rates the CPU
grid chose, ``experiments/gpu_issue18.sh``).

Every run is a cell in its own folder with ``run.json`` (command, wall time, exit code); cells
whose marker exists are skipped, so running the same command again continues an interrupted
grid. A seed sets ``seed_everything`` and the data module's ``seed`` (shuffle order); the data
subsets use the config's fixed ``subset_seed``. ``trainer.deterministic`` is on in the configs,
so a cell rerun with the same seed gives the same numbers. ``--jobs 2`` runs two cells at a
time (one CPU thread each by default): any two search cells, of one method or of two, then
any two ``(method, seed)`` cells, two seeds of one method included.

``--protocol paper`` (issue 18) is the paper's SST-2 protocol (appendix M) scaled down: every
method, Bayes-LoRA included, searches the same rates of the paper's grid (default
:data:`PAPER_LRS`, ``--lrs`` for more of :data:`PAPER_FULL_GRID`) and keeps the one with the
highest validation accuracy ("select the learning rate [...] that yields the highest
accuracy"), 3 epochs, M = 8 for every ensemble (``--members``; Bayes-LoRA keeps its 512
posterior samples, :data:`ENSEMBLES`), at least 4,000 training
sentences, float32. Each run tests its final weights (3 epochs of linear decay to 0, as the
paper) and saves its full state after every epoch, so an interrupted cell resumes from its
last epoch (``checkpoints/last.ckpt``) instead of starting over; finished cells drop their
checkpoints, after the appendix E weight diversity of LoRA-Ensemble is computed from them
(``lorae analyze``, ``weight_diversity.json``). The tested run of seed ``--lr-seed`` is the
search run at the chosen rate, tested (:func:`reuses_search`): the same command and seed
would train the same weights again. To continue a grid on another machine, copy its kept
records back first (``cp -r experiments/records/<date>/sst2_paper runs/sst2_paper``): every
finished cell has its marker there and is skipped. ``--dry-run`` lists every cell with its
estimated CPU time (:mod:`experiments.estimate_cost`, from kept records).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as `python experiments/sst2_grid.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runner import (
    LAST_CHECKPOINT,
    SELECT,
    Cell,
    Mode,
    best_validation_row,
    final_checkpoint_callbacks,
    lr_label,
    parallel,
    parse_overrides,
    run_cell,
    select_lr,
    set_threads,
)

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
    "bayes_lora": [1e-4, 5e-4, 1e-3],
}
DEFAULT_METHODS = [m for m in LEARNING_RATES if m not in ("lora_ensemble_m8", "bayes_lora")]

#: The paper's learning-rate grid for SST-2, the same for every method (appendix M).
PAPER_FULL_GRID = [2e-6, 7e-6, 9e-6, 2e-5, 3e-5, 5e-5, 7e-5]
#: The part of it the scaled-down protocol searches by default (issue 18: at least these).
PAPER_LRS = [2e-5, 5e-5, 7e-5]
#: Tab. 8's methods (config stems).
PAPER_METHODS = [
    "single_network",
    "single_lora",
    "mc_dropout",
    "explicit_ensemble",
    "lora_ensemble",
    "batch_ensemble",
    "bayes_lora",
]
#: Methods whose ``num_members`` ``--members`` sets (MC Dropout: stochastic passes, each a
#: backbone pass). Bayes-LoRA is not among them: its members are draws of the linearised
#: predictive, free once the Jacobian is computed, and it keeps its config's 512 (appendix W:
#: "the number of posterior samples (i.e., ensemble members) is fixed at 512"). With 8 draws
#: the Monte Carlo noise alone flips decisions: the first paper-grid run (seed 0, 8 draws) had
#: test accuracy 0.808 against 0.867 for the same MAP network as Single LoRA, whereas for two
#: classes the exact predictive keeps every MAP decision.
ENSEMBLES = {"mc_dropout", "explicit_ensemble", "lora_ensemble", "batch_ensemble"}
#: Members of each config when ``--members`` is not given.
CONFIG_MEMBERS = {
    "single_network": 1,
    "single_lora": 1,
    "lora_ensemble_m8": 8,
    "bayes_lora": 512,
    **{m: 4 for m in ("mc_dropout", "explicit_ensemble", "lora_ensemble", "batch_ensemble")},
}

Checkpoint = Literal["config", "final"]


@dataclass(frozen=True)
class Protocol:
    """Defaults of one ``--protocol`` (each can still be given on the command line).

    Attributes:
        methods: config stems run by default.
        lrs: one candidate list for every method (``None``: :data:`LEARNING_RATES`).
        select: validation metric that picks the rate.
        epochs: training epochs (``None``: the configs' 3).
        members: M of every method in :data:`ENSEMBLES` (``None``: the configs').
        train_limit: training sentences (``None``: the configs' 4,000).
        checkpoint: ``"config"``: the config's checkpoint (lowest ``val/nll``) is tested and
            its epoch gives the validation metrics; ``"final"``: the final weights, with a
            full checkpoint after every epoch to resume from.
        analyze: methods whose tested runs get the appendix E weight diversity.
    """

    methods: tuple[str, ...]
    lrs: tuple[float, ...] | None
    select: str
    epochs: int | None
    members: int | None
    train_limit: int | None
    checkpoint: Checkpoint
    analyze: tuple[str, ...]


PROTOCOLS = {
    "dev": Protocol(tuple(DEFAULT_METHODS), None, "val/nll", None, None, None, "config", ()),
    "paper": Protocol(
        tuple(PAPER_METHODS), tuple(PAPER_LRS), "val/acc", 3, 8, 4000, "final", ("lora_ensemble",)
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder holding sst2/ and agnews/")
    parser.add_argument("--output", type=Path, required=True, help="grid folder")
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="dev",
        help="dev: the CPU development grid of docs/results.md (default); paper: appendix M\n"
        f"scaled down ({', '.join(PAPER_METHODS)}; lrs {' '.join(map(str, PAPER_LRS))};\n"
        "val/acc; 3 epochs; M = 8; 4,000 sentences; final weights; resumable per epoch)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=sorted(LEARNING_RATES),
        help=f"config stems (default dev: {' '.join(DEFAULT_METHODS)}; add lora_ensemble_m8)",
    )
    parser.add_argument(
        "--members", type=int, default=None, help="M of every ensemble (paper: 8; dev: configs')"
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
    parser.add_argument(
        "--method-lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="no search, a rate per method (e.g. single_network=5e-05 lora_ensemble=7e-05,\n"
        "the rates another grid chose); methods not named take --fixed-lr",
    )
    parser.add_argument(
        "--select", choices=sorted(SELECT), default=None, help="dev: val/nll; paper: val/acc"
    )
    parser.add_argument("--precision", default="32-true", choices=["32-true", "32", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the configs' 3")
    parser.add_argument(
        "--lr-epochs", type=int, default=None, help="epochs of the LR search (default --epochs)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="default: configs' 64")
    parser.add_argument("--train-limit", type=int, default=None, help="default: 4000")
    parser.add_argument(
        "--analyze",
        nargs="*",
        default=None,
        metavar="METHOD",
        help="methods whose tested runs get the appendix E weight diversity (`lorae analyze`\n"
        "on the final checkpoint; paper default: lora_ensemble)",
    )
    parser.add_argument(
        "--cost-records",
        type=Path,
        default=None,
        help="kept records the --dry-run estimates start from (default: experiments/records/\n"
        "2026-11-27/sst2_minilm)",
    )
    parser.add_argument(
        "--speed-factor", type=float, default=1.0, help="scales every estimate (this CPU's)"
    )
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
        "--jobs",
        type=int,
        default=1,
        help="cells at the same time: search cells, then methods' seeds (subprocess mode)",
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
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="paper protocol: keep the tested runs' last.ckpt (default: removed when done)",
    )
    parser.add_argument(
        "--retrain-lr-seed",
        action="store_true",
        help="paper protocol: train the tested run of seed --lr-seed again instead of testing\n"
        "the search run at the chosen rate (the same weights; see reuses_search)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def resolve_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with ``--protocol``'s defaults (in place; returned)."""
    protocol = PROTOCOLS[args.protocol]
    if args.methods is None:
        args.methods = list(protocol.methods)
    if args.select is None:
        args.select = protocol.select
    if args.epochs is None:
        args.epochs = protocol.epochs
    if args.members is None:
        args.members = protocol.members
    if args.train_limit is None:
        args.train_limit = protocol.train_limit
    searches = args.fixed_lr is None and not args.method_lr
    if args.lrs is None and protocol.lrs is not None and searches:
        args.lrs = list(protocol.lrs)
    if args.analyze is None:
        args.analyze = list(protocol.analyze)
    args.checkpoint = protocol.checkpoint
    return args


def members_of(args: argparse.Namespace, method: str) -> int:
    """M of ``method``'s runs: ``--members`` for an ensemble, else its config's."""
    if args.members is not None and method in ENSEMBLES:
        return int(args.members)
    return CONFIG_MEMBERS.get(method, 1)


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
    if args.members is not None and method in ENSEMBLES:
        result.append(f"--model.method.init_args.num_members={args.members}")
    return [*result, *parse_overrides(args.override)]


def _estimate(args: argparse.Namespace, method: str, epochs: int, test: bool) -> float | None:
    """Estimated single-thread CPU seconds of one cell (``None`` without records)."""
    from experiments import estimate_cost  # here: estimate_cost imports this module

    rates = getattr(args, "_rates", None)
    if rates is None:
        records = args.cost_records or estimate_cost.DEFAULT_RECORDS
        rates = estimate_cost.record_rates(records) if records.is_dir() else {}
        args._rates = rates
    if method not in rates:
        return None
    return estimate_cost.cell_seconds(
        rates[method],
        method=method,
        members=members_of(args, method),
        epochs=epochs,
        train_limit=args.train_limit or 4000,
        test=test,
        precision=args.precision,
        test_size=args.test_limit or estimate_cost.TEST_SIZE,
        ood_limit=args.ood_limit or 2000,
        speed_factor=args.speed_factor,
    )["total"]


def make_cell(
    args: argparse.Namespace,
    folder: Path,
    cell_args: list[str],
    info: dict[str, Any],
    *,
    marker: str = "metrics.json",
    epochs: int | None = None,
    test: bool = True,
) -> Cell:
    """A cell of this grid: with ``--protocol paper`` resumable (a full checkpoint after each
    epoch, the final weights tested), with its estimated CPU seconds."""
    final = args.checkpoint == "final"
    return Cell(
        folder,
        cell_args,
        marker=marker,
        info=info,
        callbacks=final_checkpoint_callbacks() if final else None,
        resume=final,
        estimate_seconds=_estimate(args, info["method"], epochs or 3, test),
    )


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
        cell = make_cell(
            args, folder, cell_args, info, marker="validation.json", epochs=epochs, test=False
        )
        cells.append((lr, cell))
    return cells


def finish_search_cell(
    cell: Cell, monitor: str, keep_checkpoints: bool, checkpoint: Checkpoint = "config"
) -> dict[str, Any]:
    """Read the validation metrics of a finished search run and write its marker: those of
    the epoch the run would test (``checkpoint="config"``: the lowest ``val/nll``, the
    configs' checkpoint; ``"final"``: the last epoch)."""
    metrics = cell.folder / "csv" / "metrics.csv"
    if checkpoint == "final":
        row = best_validation_row(metrics, monitor, "last")
    else:
        row = best_validation_row(metrics, "val/nll", "min")
    summary = {"checkpoint_epoch": row.pop("epoch"), **row, "selected_by": monitor}
    (cell.folder / cell.marker).write_text(json.dumps(summary, indent=2) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(cell.folder / "checkpoints", ignore_errors=True)
    return summary


def print_cell(cell: Cell) -> None:
    """A dry run's listing of one cell: its folder and estimate, then its command."""
    estimate = cell.estimate_seconds
    cost = "estimate n/a" if estimate is None else f"~{estimate / 3600:.2f} CPU-h"
    if cell.info.get("reuses_search"):
        cost += f"; tests the search run at the chosen rate ({REUSED_FILE})"
    print(f"# {cell.folder} ({cost})")
    print(" ".join(["lorae", *cell.args]))


def run_search_cell(args: argparse.Namespace, cell: Cell) -> dict[str, Any] | None:
    """Run one search cell (skipped when done); its validation summary, ``None`` if it
    failed."""
    method, lr = cell.info["method"], cell.info["lr"]
    record = run_cell(cell, args.mode)
    if record["returncode"] != 0:
        print(f"[lr search] {method} lr={lr:g}: FAILED, see {cell.folder / 'lorae.log'}")
        return None
    keep = args.keep_lr_checkpoints or reuses_search(args, method)  # hand_over removes them
    summary = (
        json.loads((cell.folder / cell.marker).read_text())
        if record["skipped"]
        else finish_search_cell(cell, args.select, keep, args.checkpoint)
    )
    print(f"[lr search] {method} lr={lr:g}: {args.select}={summary[args.select]:.4f}")
    return {**summary, "wall_seconds": record.get("wall_seconds")}


def choose_lr(
    args: argparse.Namespace, method: str, candidates: dict[float, dict[str, Any]]
) -> dict[str, Any]:
    """Pick ``method``'s rate from its search summaries, write ``selection.json`` and hand
    the chosen run over to seed ``--lr-seed`` (:func:`hand_over`)."""
    lr, best = select_lr(candidates, args.select)
    choice = {
        "lr": lr,
        "selected_by": args.select,
        "value": best[args.select],
        "seed": args.lr_seed,
        "candidates": {f"{k:g}": v for k, v in sorted(candidates.items())},
    }
    selection_path(args.output, method).write_text(json.dumps(choice, indent=2) + "\n")
    print(f"[lr search] {method}: chose lr={lr:g}")
    hand_over(args, method, lr)
    return choice


def search(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any] | None]:
    """Stage 1 for ``methods``: every search cell of every method, ``--jobs`` cells at a time
    (so two cores stay busy also when one method is left), then each method's choice
    (``lr_search/<method>/selection.json``). Returns the choices (``None``: a failed cell, or
    a dry run)."""
    cells = [cell for method in methods for _, cell in search_cells(args, method)]
    if args.dry_run:
        for cell in cells:
            print_cell(cell)
            args._planned.append(cell)
        return dict.fromkeys(methods)
    summaries = parallel(args.jobs, lambda cell: run_search_cell(args, cell), cells)
    choices: dict[str, dict[str, Any] | None] = {}
    for method in methods:
        results = [
            (cell.info["lr"], summary)
            for cell, summary in zip(cells, summaries, strict=True)
            if cell.info["method"] == method
        ]
        if any(summary is None for _, summary in results):
            choices[method] = None
            continue
        choices[method] = choose_lr(args, method, {lr: s for lr, s in results if s is not None})
    return choices


def search_method(args: argparse.Namespace, method: str) -> dict[str, Any] | None:
    """Stage 1 for one method (:func:`search` of it alone)."""
    return search(args, [method])[method]


#: Written into a tested cell whose training is the learning-rate search run at the chosen rate.
REUSED_FILE = "reused_training.json"


def reuses_search(args: argparse.Namespace, method: str) -> bool:
    """Whether the tested run of ``method`` at seed ``--lr-seed`` is the search run at the
    chosen rate. Never for a ``--share-lr`` target: it has no search run of its own (its
    rate is another method's choice), so each of its seeds trains in full.

    With ``--protocol paper`` both stages train the final weights with the same command except
    ``--test_after_fit`` (same seed, rate, epochs and data), and ``trainer.deterministic`` is
    on, so training that seed again would repeat the search run bit for bit. Its final
    checkpoint (``last.ckpt``, the full training state after the last epoch) is handed to
    the tested cell instead, which resumes from it with nothing left to train and tests it:
    one training run fewer per method (about 6 CPU-hours of the grid's 38)."""
    return (
        args.checkpoint == "final"
        and method not in shared_lrs(args)
        and fixed_rates(args) is None
        and not args.retrain_lr_seed
        and args.lr_seed in args.seeds
        and (args.lr_epochs is None or args.lr_epochs == args.epochs)
    )


def selection_path(output: Path, method: str) -> Path:
    """Where the search of ``method`` under ``output`` records its chosen rate."""
    return output / "lr_search" / method / "selection.json"


def will_reuse_search(args: argparse.Namespace, method: str, folder: Path) -> bool:
    """Whether the tested cell in ``folder`` (seed ``--lr-seed``) gets the search run's
    training (:func:`reuses_search`): it already holds the reuse record, the search has not
    chosen yet (:func:`hand_over` moves the checkpoint when it does), or the chosen search run
    still holds its ``last.ckpt``. Not when the search finished on another machine and only
    its records were restored (no checkpoint): that cell trains in full, and the plan and its
    estimate say so."""
    if not reuses_search(args, method):
        return False
    if (folder / REUSED_FILE).is_file():
        return True
    selection = selection_path(args.output, method)
    if not selection.is_file():
        return True
    lr = json.loads(selection.read_text())["lr"]
    return any(
        rate == lr and (cell.folder / "checkpoints" / LAST_CHECKPOINT).is_file()
        for rate, cell in search_cells(args, method)
    )


def hand_over(args: argparse.Namespace, method: str, lr: float) -> None:
    """Move the chosen search run's ``last.ckpt`` into the tested cell of seed ``--lr-seed``
    (see :func:`reuses_search`) with :data:`REUSED_FILE` (where it was trained, its wall and
    CPU time) and its CSV log (merged with the test's, as a resumed attempt's), then remove
    the other candidates' checkpoints (unless ``--keep-lr-checkpoints``). A tested cell that
    is done or already holds a checkpoint is left alone; without the checkpoint (a search
    finished on another machine, its records restored) the tested cell trains from the start
    as usual."""
    if not reuses_search(args, method):
        return
    target = test_cell(args, method, args.lr_seed, lr)
    for rate, cell in search_cells(args, method):
        source = cell.folder / "checkpoints" / LAST_CHECKPOINT
        moved = target.folder / "checkpoints" / LAST_CHECKPOINT
        if rate == lr and source.is_file() and not target.done and not moved.is_file():
            moved.parent.mkdir(parents=True, exist_ok=True)
            source.replace(moved)
            # its training log, merged in front of the test's like a resumed attempt's
            (target.folder / "csv").mkdir(exist_ok=True)
            shutil.copyfile(
                cell.folder / "csv" / "metrics.csv", target.folder / "csv" / "metrics.csv"
            )
            run = json.loads((cell.folder / "run.json").read_text())
            reused = {
                "trained_in": cell.folder.relative_to(args.output).as_posix(),
                "wall_seconds": run.get("wall_seconds"),
                "cpu_seconds": run.get("cpu_seconds"),
            }
            (target.folder / REUSED_FILE).write_text(json.dumps(reused, indent=2) + "\n")
        if not args.keep_lr_checkpoints:
            shutil.rmtree(cell.folder / "checkpoints", ignore_errors=True)


#: Written next to an analysed run: the appendix E score and a few function-space numbers.
DIVERSITY_FILE = "weight_diversity.json"
#: Validation sentences ``lorae analyze`` runs (its function-space numbers only; the appendix
#: E score reads the weights).
ANALYZE_SAMPLES = 64


def analysis_cell(folder: Path) -> Cell:
    """``lorae analyze`` of a finished run's final checkpoint into ``folder/analysis``."""
    return Cell(
        folder / "analysis",
        [
            "analyze",
            "--config",
            str(folder / "config.yaml"),
            "--ckpt_path",
            str(folder / "checkpoints" / "last.ckpt"),
            "--output_dir",
            str(folder / "analysis"),
            "--split",
            "val",
            "--max_samples",
            str(ANALYZE_SAMPLES),
            "--plots",
            "false",
        ],
        marker="analysis.json",
        info={"stage": "analyze"},
        log_config=False,
    )


def analyze_run(folder: Path, mode: Mode) -> dict[str, Any] | None:
    """Write ``folder/weight_diversity.json`` from ``lorae analyze`` of the run's
    ``checkpoints/last.ckpt`` (the appendix E diversity score of the value updates
    ``diversity_score_v`` and of the whole value matrices ``diversity_score_v_weights``, the
    members' mean disagreement and JSD on :data:`ANALYZE_SAMPLES` validation sentences).

    Returns:
        The record; ``None`` when the analysis failed or the checkpoint is gone.
    """
    target = folder / DIVERSITY_FILE
    if target.is_file():
        return dict(json.loads(target.read_text()))
    if not (folder / "checkpoints" / "last.ckpt").is_file():
        print(f"[analyze] {folder}: no checkpoints/last.ckpt; rerun the cell to analyse it")
        return None
    cell = analysis_cell(folder)
    record = run_cell(cell, mode)
    if record["returncode"] != 0:
        print(f"[analyze] {folder}: FAILED, see {cell.folder / 'lorae.log'}")
        return None
    analysis = json.loads((cell.folder / cell.marker).read_text())
    weights = analysis.get("weights", analysis)
    result = {
        "diversity_score_v": weights.get("diversity_score_v"),
        "diversity_score_v_weights": weights.get("diversity_score_v_weights"),
        "disagreement": analysis.get("disagreement"),
        "jsd_bits": analysis.get("jsd_bits"),
        "split": "val",
        "max_samples": ANALYZE_SAMPLES,
        "command": record["command"],
        "wall_seconds": record["wall_seconds"],
        "cpu_seconds": record["cpu_seconds"],
    }
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result


def finish_test_cell(args: argparse.Namespace, method: str, folder: Path) -> None:
    """After a tested paper-protocol run: its weight diversity (``--analyze`` methods), then
    remove its checkpoints (unless ``--keep-checkpoints``)."""
    if args.checkpoint != "final":
        return
    if method in args.analyze and analyze_run(folder, args.mode) is None:
        return  # keep the checkpoint for the next attempt
    if not args.keep_checkpoints:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        shutil.rmtree(folder / "analysis", ignore_errors=True)


def test_cell(
    args: argparse.Namespace,
    method: str,
    seed: int,
    lr: float,
    variant: tuple[Path, list[str], dict[str, Any]] | None = None,
) -> Cell:
    """The stage 2 cell of ``method`` and ``seed`` at ``lr`` (trained and tested).

    ``variant``: ``(folder, extra lorae arguments, extra info)`` of a cell that is not the
    grid's own (e.g. the gain sweep's); such a cell never tests a search run, so it is
    estimated and run as a full training."""
    folder = args.output / "runs" / method / f"seed{seed}"
    cell_args = [*common_args(args, method, seed, lr), "--test_after_fit=true"]
    if args.epochs is not None:
        cell_args.append(f"--trainer.max_epochs={args.epochs}")
    info: dict[str, Any] = {"stage": "test", "method": method, "lr": lr, "seed": seed}
    if variant is not None:
        folder, extra_args, extra_info = variant
        cell_args += extra_args
        info.update(extra_info)
    reused = folder / REUSED_FILE
    if reused.is_file():
        info["training_reused"] = json.loads(reused.read_text())
    cell = make_cell(args, folder, cell_args, info, epochs=args.epochs)
    if variant is None and seed == args.lr_seed and will_reuse_search(args, method, folder):
        cell.info["reuses_search"] = True
        trained = _estimate(args, method, args.epochs or 3, test=False)
        if cell.estimate_seconds is not None and trained is not None:
            from experiments.estimate_cost import STARTUP_SECONDS  # a cycle at import time

            cell.estimate_seconds -= trained - STARTUP_SECONDS  # it only tests
    return cell


def seed_run(args: argparse.Namespace, method: str, seed: int, lr: float) -> int:
    """Stage 2 for one method and seed: train and test at ``lr``; returns 1 if it failed."""
    cell = test_cell(args, method, seed, lr)
    if args.dry_run:
        print_cell(cell)
        args._planned.append(cell)
        return 0
    record = run_cell(cell, args.mode)
    state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
    failed = int(record["returncode"] != 0)
    if failed:
        state = f"FAILED, see {cell.folder / 'lorae.log'}"
    else:
        finish_test_cell(args, method, cell.folder)
    print(f"[test] {method} seed {seed} lr={lr:g}: {state}", flush=True)
    return failed


def seed_runs(args: argparse.Namespace, rates: dict[str, float]) -> int:
    """Stage 2: every ``(method, seed)`` cell at its method's rate, ``--jobs`` at a time.

    The cells are independent (each its own folder, seed and child process), so two seeds of
    one method may run side by side: the last method left no longer runs on one core.
    Returns the number of failed cells."""
    pairs = [(m, seed) for m in args.methods if m in rates for seed in args.seeds]
    if args.dry_run:  # print in order; nothing runs
        return sum(seed_run(args, m, seed, rates[m]) for m, seed in pairs)
    return sum(parallel(args.jobs, lambda pair: seed_run(args, *pair, rates[pair[0]]), pairs))


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


def write_selection(args: argparse.Namespace) -> dict[str, Any]:
    """Collect every method's ``selection.json`` into ``<output>/lr_selection.json``."""
    selection = {}
    for method in LEARNING_RATES:
        path = selection_path(args.output, method)
        if path.is_file():
            selection[method] = json.loads(path.read_text())
    (args.output / "lr_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return selection


def print_plan(cells: list[Cell], threads: int) -> None:
    """A dry run's summary: cells, total and longest estimated CPU time."""
    from experiments.estimate_cost import parallel_speedup

    known = [c.estimate_seconds for c in cells if c.estimate_seconds is not None]
    print(f"# {len(cells)} cells", end="")
    if known:
        longest = max(known) / parallel_speedup(threads) / 3600
        print(
            f"; estimated {sum(known) / 3600:.1f} CPU-hours (1 thread) for the {len(known)} "
            f"with an estimate; the longest cell about {longest:.2f} h wall on {threads} "
            "thread(s)",
            end="",
        )
    print()


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line with ``--protocol``'s defaults filled in, checked."""
    args = resolve_protocol(_parser().parse_args(argv))
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.jobs > 1 and args.mode != "subprocess":
        raise SystemExit("error: --jobs > 1 needs --mode subprocess")
    if args.protocol == "paper" and (args.train_limit or 0) < 4000:
        print("warning: --train-limit below the paper protocol's 4,000 sentences (a smoke run?)")
    args._planned = []
    return args


def plan(argv: list[str]) -> list[Cell]:
    """Every cell a grid command would run (stage 2 at ``lr=nan``), without running or
    printing anything."""
    import contextlib
    import io

    args = parse([*argv, "--dry-run"])
    with contextlib.redirect_stdout(io.StringIO()):
        run_grid(args)
    return list(args._planned)


def fixed_rates(args: argparse.Namespace) -> dict[str, float] | None:
    """The rate of every method when ``--fixed-lr`` or ``--method-lr`` replaces the search
    (``None`` when the grid searches).

    Raises:
        SystemExit: A ``--method-lr`` item is not ``METHOD=LR`` with a known method and a
            number, or a method of ``--methods`` has no rate.
    """
    if args.fixed_lr is None and not args.method_lr:
        return None
    rates: dict[str, float] = {}
    for item in args.method_lr:
        method, _, value = item.partition("=")
        try:
            rates[method] = float(value)
        except ValueError:
            rates[method] = float("nan")
        if method not in LEARNING_RATES or not rates[method] > 0:
            raise SystemExit(
                f"error: --method-lr needs METHOD=LR with one of {', '.join(LEARNING_RATES)} and "
                f"a positive rate, got {item!r}"
            )
    missing = [m for m in args.methods if m not in rates and args.fixed_lr is None]
    if missing:
        raise SystemExit(
            f"error: no rate for {', '.join(missing)}: add METHOD=LR to --method-lr or give "
            "--fixed-lr for the rest"
        )
    return {m: rates.get(m, args.fixed_lr) for m in args.methods}


def run_grid(args: argparse.Namespace) -> int:
    """Both stages for every method; returns the number of failed runs."""
    rates = fixed_rates(args)
    if rates is not None:  # stage 2 only
        if args.lrs or args.share_lr:
            raise SystemExit(
                "error: --fixed-lr and --method-lr replace the search: drop --lrs and --share-lr"
            )
        return seed_runs(args, rates)
    shared = shared_lrs(args)
    searched = [m for m in args.methods if m not in shared]
    choices = search(args, searched)
    failed = sum(1 for choice in choices.values() if choice is None and not args.dry_run)
    tested: dict[str, float] = {}
    for method in args.methods:
        choice = choices.get(shared.get(method, method))
        if choice is not None:
            tested[method] = float(choice["lr"])
        elif args.dry_run:  # no rate chosen yet: print the commands with lr=nan
            tested[method] = float("nan")
        # else its search failed (counted above): nothing to test
    failed += seed_runs(args, tested)
    if not args.dry_run:
        selection = write_selection(args)
        for target, source in shared.items():
            if target in args.methods and source in selection:
                selection[target] = {**selection[source], "shared_from": source}
        (args.output / "lr_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return failed


def main(argv: list[str] | None = None) -> int:
    """Run both stages for every method; returns the number of failed runs (0: success).

    First every method's learning-rate search (except ``--share-lr`` targets), then every
    method's seeds. With ``--jobs N`` up to N search cells run at the same time, then up to N
    ``(method, seed)`` cells, each its own child process.
    """
    args = parse(argv)
    set_threads(args.threads)
    if not args.dry_run:
        args.output.mkdir(parents=True, exist_ok=True)
        options = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if not k.startswith("_")
        }
        # a grid spread over sessions (--methods per session) keeps every command it ran
        path = args.output / "grid.json"
        earlier = json.loads(path.read_text()).get("invocations", []) if path.is_file() else []
        invocations = [*earlier, args.argv] if args.argv not in earlier else earlier
        options["invocations"] = invocations
        path.write_text(json.dumps(options, indent=2) + "\n")
    failed = run_grid(args)
    if args.dry_run:
        print_plan(args._planned, args.threads)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
