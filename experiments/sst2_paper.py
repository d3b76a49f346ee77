"""SST-2 with all-MiniLM-L6-v2 under the paper's protocol, scaled down (issue 18): the Tab. 8
grid and the Tab. 11 gain sweep.

    # Tab. 8: every method, lr from the paper's grid by validation accuracy, 3 epochs, M = 8
    python experiments/sst2_paper.py grid --data /work/shared/data --output runs/sst2_paper \
        [--jobs 2 --threads 1] [--lrs 2e-5 5e-5 7e-5 ...] [--train-limit 4000] [--dry-run]
    # Tab. 11: LoRA-Ensemble (M = 8) with Xavier gains 1, 4, 10, 20, 40 at its chosen rate
    python experiments/sst2_paper.py gain --grid runs/sst2_paper [--gains 1 4 10 20 40] \
        [--seeds 0 1 2] [--jobs 2] [--dry-run]

``grid`` is ``experiments/sst2_grid.py --protocol paper`` (every option of that script is
accepted and recorded in ``grid.json``; see its docstring). ``gain`` reads the grid's options
(``grid.json``) and LoRA-Ensemble's chosen rate (``lr_selection.json``; ``--lr`` to give one
before the grid has chosen) and trains LoRA-Ensemble for each gain and seed with
``--model.method.init_args.lora.gain=G`` into ``<grid>/gain/g<G>/seed<S>``; the configs' own gain
(10) is the grid's LoRA-Ensemble run itself (``<grid>/runs/lora_ensemble/seed<S>``, the same
command), not a second copy. Every gain run gets the appendix E diversity score (one minus the
mean pairwise Pearson correlation of the members' value-projection matrices, averaged over
layers, of the updates ``W_i - W0`` and of the whole ``W_i``: the appendix does not say which;
``lorae analyze`` on its final checkpoint -> ``weight_diversity.json``) before its
checkpoints are removed. The sweep is resumable like the grid (cells resume per epoch).
``<grid>/gain/gain.json`` (written before the cells run, merged over invocations) lists the
gains and seeds of every invocation, where each gain's runs are and every command, for
``make_results.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as `python experiments/sst2_paper.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import sst2_grid
from experiments.runner import Cell, parallel, run_cell, set_threads

#: Tab. 11's gains that the issue asks for (the paper's HAM10000 sweep also has 2, 8, 12).
GAINS = [1.0, 4.0, 10.0, 20.0, 40.0]
GAIN_METHOD = "lora_ensemble"


def config_gain(configs: Path) -> float:
    """The Xavier gain of ``configs/<GAIN_METHOD>.yaml`` (10, the paper's)."""
    config = yaml.safe_load((configs / f"{GAIN_METHOD}.yaml").read_text())
    return float(config["model"]["method"]["init_args"]["lora"]["gain"])


def gain_label(gain: float) -> str:
    """Folder name of a gain, e.g. ``4.0`` -> ``g4``, ``0.5`` -> ``g0.5``."""
    return f"g{gain:g}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--grid", type=Path, required=True, help="the paper grid's --output")
    parser.add_argument("--gains", type=float, nargs="+", default=GAINS)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the grid's")
    parser.add_argument(
        "--lr", type=float, default=None, help="default: LoRA-Ensemble's choice in the grid"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: the grid's")
    parser.add_argument("--jobs", type=int, default=1, help="gains run at the same time")
    parser.add_argument("--mode", choices=["subprocess", "in-process"], default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the cells only")
    return parser


def grid_args(grid: Path, dry_run: bool) -> argparse.Namespace:
    """The grid's options, parsed again from the command line it recorded in ``grid.json``
    (a dry run without a grid folder uses the paper protocol's defaults)."""
    path = grid / "grid.json"
    if path.is_file():
        argv = list(json.loads(path.read_text())["argv"])
    elif dry_run:
        argv = ["--protocol", "paper", "--data", "DATA", "--output", str(grid)]
    else:
        raise SystemExit(f"error: no {path}: run `sst2_paper.py grid --output {grid}` first")
    argv = [a for a in argv if a != "--dry-run"]
    return sst2_grid.parse(argv)


def chosen_lr(grid: Path, given: float | None) -> float:
    """``given``, else the rate the grid chose for LoRA-Ensemble (NaN in a dry run without)."""
    if given is not None:
        return given
    path = sst2_grid.selection_path(grid, GAIN_METHOD)
    if path.is_file():
        return float(json.loads(path.read_text())["lr"])
    return math.nan


def gain_cell(args: argparse.Namespace, gain: float, seed: int, lr: float, base: float) -> Cell:
    """LoRA-Ensemble at ``gain``: the grid's own cell at the configs' gain ``base``."""
    if gain == base:
        return sst2_grid.test_cell(args, GAIN_METHOD, seed, lr)
    folder = args.output / "gain" / gain_label(gain) / f"seed{seed}"
    extra = [f"--model.method.init_args.lora.gain={gain:g}"]
    return sst2_grid.test_cell(
        args, GAIN_METHOD, seed, lr, variant=(folder, extra, {"stage": "gain", "gain": gain})
    )


def gain_runs(
    args: argparse.Namespace, gain: float, lr: float, base: float, dry_run: bool
) -> tuple[int, list[Cell]]:
    """Every seed of one gain (trained, tested and analysed); returns (failures, cells)."""
    failed, cells = 0, []
    for seed in args.seeds:
        cell = gain_cell(args, gain, seed, lr, base)
        cells.append(cell)
        if dry_run:
            sst2_grid.print_cell(cell)
            continue
        record = run_cell(cell, args.mode)
        if record["returncode"] != 0:
            failed += 1
            print(f"[gain {gain:g}] seed {seed}: FAILED, see {cell.folder / 'lorae.log'}")
            continue
        args.analyze = [GAIN_METHOD]
        sst2_grid.finish_test_cell(args, GAIN_METHOD, cell.folder)
        state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
        print(f"[gain {gain:g}] seed {seed} lr={lr:g}: {state}")
    return failed, cells


def run_gain(argv: list[str]) -> int:
    """The gain sweep; returns the number of failed runs."""
    options = _parser().parse_args(argv)
    args = grid_args(options.grid, options.dry_run)
    args.output = options.grid
    for name in ("seeds", "threads", "mode"):
        if getattr(options, name) is not None:
            setattr(args, name, getattr(options, name))
    if options.jobs > 1 and args.mode != "subprocess":
        raise SystemExit("error: --jobs > 1 needs --mode subprocess")
    set_threads(args.threads)
    lr = chosen_lr(options.grid, options.lr)
    if math.isnan(lr) and not options.dry_run:
        raise SystemExit(
            f"error: the grid has not chosen LoRA-Ensemble's rate yet "
            f"({options.grid / 'lr_search' / GAIN_METHOD / 'selection.json'}); give --lr"
        )
    base = config_gain(args.configs)
    if not options.dry_run:
        record_sweep(options, args, argv, lr, base)
    results = parallel(
        options.jobs,
        lambda g: gain_runs(args, float(g), lr, base, options.dry_run),
        [str(g) for g in options.gains],
    )
    cells = [cell for _, gain_cells in results for cell in gain_cells]
    if options.dry_run:
        new = [c for c in cells if c.info.get("stage") == "gain"]
        print(f"# ({len(cells) - len(new)} of these cells are the grid's own LoRA-Ensemble runs)")
        sst2_grid.print_plan(new, args.threads)
        return 0
    return sum(failed for failed, _ in results)


def record_sweep(
    options: argparse.Namespace, args: argparse.Namespace, argv: list[str], lr: float, base: float
) -> None:
    """Write ``gain/gain.json`` before any cell runs, so that a sweep stopped part-way (or run
    a few gains or seeds per session) is still found by ``make_results.py``: the union of every
    invocation's gains (with ``base``, the grid's own runs) and seeds, where each gain's runs
    are, and every invocation's command.

    Raises:
        SystemExit: an earlier invocation used another rate (its cells would not be one sweep).
    """
    path = options.grid / "gain" / "gain.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier and not math.isclose(float(earlier["lr"]), lr):
        raise SystemExit(
            f"error: {path} records a sweep at lr={earlier['lr']:g}, this one is at {lr:g}; "
            "give the same --lr, or another --grid"
        )
    gains = sorted({*map(float, earlier.get("gains", [])), *options.gains, base})
    seeds = sorted({*earlier.get("seeds", []), *args.seeds})
    folders = {
        f"{gain:g}": gain_cell(args, gain, seeds[0], lr, base)
        .folder.parent.relative_to(options.grid)
        .as_posix()
        for gain in gains
    }
    invocations = earlier.get("invocations") or ([earlier["argv"]] if "argv" in earlier else [])
    if argv not in invocations:
        invocations.append(argv)
    record = {
        "method": GAIN_METHOD,
        "gains": gains,
        "config_gain": base,
        "lr": lr,
        "seeds": seeds,
        "folders": folders,
        "argv": argv,
        "invocations": invocations,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def without_paper_protocol(argv: list[str]) -> list[str]:
    """``argv`` without a redundant ``--protocol paper`` (``grid`` always adds it, and a grid
    records its argv: passing it again would record it twice); any other protocol is refused,
    since this entry point is the paper protocol only."""
    out: list[str] = []
    rest = iter(argv)
    for item in rest:
        value = item.partition("=")[2] if item.startswith("--protocol=") else None
        if item == "--protocol":
            value = next(rest, "")
        if value is None:
            out.append(item)
        elif value != "paper":
            raise SystemExit(
                "error: sst2_paper.py grid always runs --protocol paper, got --protocol "
                f"{value!r}; run experiments/sst2_grid.py for the development grid"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """``grid ARGS`` (the paper-protocol grid) or ``gain ARGS`` (the gain sweep)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("grid", "gain"):
        raise SystemExit(
            "usage: sst2_paper.py grid --data DIR --output DIR [sst2_grid.py options]\n"
            "       sst2_paper.py gain --grid DIR [--gains ...] [--seeds ...] [--dry-run]"
        )
    if argv[0] == "grid":
        return sst2_grid.main(["--protocol", "paper", *without_paper_protocol(argv[1:])])
    return run_gain(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
