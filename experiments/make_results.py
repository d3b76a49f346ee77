"""Generate ``docs/results.md`` from the experiment folders' ``metrics.json`` files.

    python experiments/make_results.py [--sst2 runs/sst2_minilm] [--cifar10 runs/cifar10_j] \
        [--sst2-paper runs/sst2_paper] [--fsdd runs/fsdd_ast] \
        [--output docs/results.md] [--discussion experiments/discussion.md] [--discussion-only]

Each folder may also be a kept copy of its records (``experiments/records/<date>/<name>``,
``keep_records.py``). The paper-protocol SST-2 grid (``experiments/sst2_paper.py``, issue 18)
adds a section only when its folder has finished runs: the Tab. 8-like table (mean ± std over
seeds), the exact ``lorae`` command of every run, the Tab. 11-like gain table with its figure
(appendix E diversity score against accuracy, ECE and NLL) and a cost table with the wall and
CPU seconds of every cell. An FSDD section comes from ``experiments/fsdd_results.py`` when
that module exists and defines ``section(folder, figure_dir, doc) -> str``.

Every table cell is computed here from the runs (``lorae.cli.aggregate``: mean ± sample
standard deviation over seeds); nothing is typed by hand except the discussion, which is read
from ``--discussion`` and included unchanged, so it survives regeneration. The reliability
diagram and ensemble-size curve of each method's first seed are copied next to the document
(``docs/figures/results/``) and linked. A missing experiment folder gives a section that says
how to produce it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python experiments/make_results.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorae.cli.aggregate import aggregate

REPO = Path(__file__).resolve().parents[1]

#: (metric name for lorae.cli.aggregate, column title, digits)
QUALITY = [
    ("acc", "Accuracy", 4),
    ("f1", "Macro F1", 4),
    ("ece", "ECE", 4),
    ("nll", "NLL", 4),
    ("brier", "Brier", 4),
]
SST2_OOD = [
    ("test/ood/agnews/msp/auroc", "AUROC (AG News)", 4),
    ("test/ood/agnews/msp/auprc", "AUPRC (AG News)", 4),
]
COST = [
    ("compute.parameters.total", "Parameters", 0),
    ("compute.parameters.trainable", "Trainable", 0),
    ("compute.train_seconds_per_epoch", "s / epoch", 1),
    ("compute.wall_seconds", "Wall s / run", 0),
]
FIGURES = ("reliability.png", "ensemble_size.png")

SST2_COMMAND = "python experiments/sst2_grid.py --data /work/shared/data --output runs/sst2_minilm"
CIFAR_COMMAND = (
    "python experiments/cifar10_appendix_j.py --data /work/shared/data/cifar10/train.tar.gz "
    "--output runs/cifar10_j"
)
GENERATE_COMMAND = "python experiments/make_results.py"
#: grid.json option -> sst2_grid.py flag, for the options that are not the script's default.
GRID_FLAGS = {
    "precision": ("--precision", None),
    "lr_epochs": ("--lr-epochs", None),
    "epochs": ("--epochs", None),
    "train_limit": ("--train-limit", None),
    "test_limit": ("--test-limit", None),
    "ood_limit": ("--ood-limit", None),
    "max_length": ("--max-length", None),
    "seeds": ("--seeds", [0, 1, 2]),
    "lrs": ("--lrs", None),
    "fixed_lr": ("--fixed-lr", None),
    "method_lr": ("--method-lr", []),
    "share_lr": ("--share-lr", []),
    "jobs": ("--jobs", 1),
    "threads": ("--threads", 1),
}


def grid_command(grid: dict[str, Any]) -> str:
    """The ``sst2_grid.py`` command line that wrote ``grid`` (its ``grid.json``)."""
    words = [SST2_COMMAND.split(" --data")[0], "--data", str(grid["data"])]
    words += ["--output", str(grid["output"])]
    for key, (flag, default) in GRID_FLAGS.items():
        value = grid.get(key, default)
        if value is None or value == default or value == "32-true":
            continue
        values = value if isinstance(value, list) else [value]
        words += [flag, *(str(v) for v in values)]
    return " ".join(words)


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """Every finished run under ``folder/runs/<method>/seed<S>/``: its ``metrics.json`` with
    ``method.method`` replaced by the folder name ``<method>`` (the config stem) and the wall
    time of ``run.json`` added as ``compute.wall_seconds``; sorted by method, then seed."""
    reports = []
    for path in sorted((folder / "runs").glob("*/seed*/metrics.json")):
        report = json.loads(path.read_text())
        run_path = path.parent / "run.json"
        run = json.loads(run_path.read_text()) if run_path.is_file() else {}
        report["method"] = {**report.get("method", {}), "method": path.parent.parent.name}
        report["compute"] = {**report.get("compute", {}), "wall_seconds": run.get("wall_seconds")}
        report["_folder"] = path.parent
        report["_seed"] = run.get("seed", path.parent.name.removeprefix("seed"))
        reports.append(report)
    return reports


def _cell(row: dict[str, Any], name: str, digits: int) -> str:
    mean, std = row[f"{name}/mean"], row[f"{name}/std"]
    if math.isnan(mean):
        return "n/a"
    if digits == 0:
        text = f"{mean:,.0f}"
        return text if math.isnan(std) or std == 0 else f"{text} ± {std:,.0f}"
    text = f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def seeds_by_method(reports: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The tested seeds of each method (config stem), in the reports' order."""
    seeds: dict[str, list[str]] = {}
    for report in reports:
        seeds.setdefault(report["method"]["method"], []).append(str(report["_seed"]))
    return seeds


def seeds_short(seeds: dict[str, list[str]], expected: Sequence[str]) -> dict[str, list[str]]:
    """Each method of ``seeds`` (:func:`seeds_by_method`) whose tested seeds are fewer than
    ``expected`` (the grid's ``--seeds``): a row's mean over 2 seeds is not one over 3."""
    return {m: s for m, s in seeds.items() if not set(expected) <= set(s)}


def table(reports: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, int]]) -> str:
    """A Markdown table: one row per method (config stem), mean ± std over its seeds."""
    rows = aggregate(reports, [name for name, _, _ in columns], ["method"])
    seeds = seeds_by_method(reports)
    lines = [
        "| method | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = " | ".join(_cell(row, name, digits) for name, _, digits in columns)
        lines.append(f"| {row['group']} | {','.join(seeds[row['group']])} | {cells} |")
    return "\n".join(lines) + "\n"


def figures(reports: Sequence[dict[str, Any]], prefix: str, target: Path, doc: Path) -> str:
    """Copy each method's first-seed figures to ``target`` and return Markdown links."""
    lines = []
    done: set[str] = set()
    for report in reports:
        method = report["method"]["method"]
        if method in done:
            continue
        done.add(method)
        links = []
        for name in FIGURES:
            source = report["_folder"] / name
            if not source.is_file():
                continue
            target.mkdir(parents=True, exist_ok=True)
            copy = target / f"{prefix}_{method}_{name}"
            shutil.copyfile(source, copy)
            links.append(f"[{name.removesuffix('.png')}]({copy.relative_to(doc.parent)})")
        if links:
            lines.append(f"- {method} (seed {report['_seed']}): " + ", ".join(links))
    if not lines:
        return "No figures were written (run with the `plots` extra installed).\n"
    return "\n".join(lines) + "\n"


def lr_table(selection: dict[str, Any]) -> str:
    """The learning-rate search: candidates' validation metric and the choice per method."""
    lines = [
        "| method | selected by | candidates (validation value) | chosen |",
        "|---|---|---|---|",
    ]
    for method, entry in selection.items():
        key = entry["selected_by"]
        tried = ", ".join(f"{lr}: {c[key]:.4f}" for lr, c in entry["candidates"].items())
        lines.append(f"| {method} | {key} (seed {entry['seed']}) | {tried} | {entry['lr']:g} |")
    return "\n".join(lines) + "\n"


def sst2_section(folder: Path, figure_dir: Path, doc: Path) -> str:
    """The SST-2 section: setup, LR search, quality/OOD and cost tables, figures."""
    parts = ["## SST-2 with all-MiniLM-L6-v2 (paper appendix A.7, Tab. 8)\n"]
    reports = load_runs(folder)
    if not reports:
        return parts[0] + f"\nNo runs yet. Produce them with `{SST2_COMMAND}`.\n"
    grid_path = folder / "grid.json"
    grid = json.loads(grid_path.read_text()) if grid_path.is_file() else {}
    parts.append(
        "\nSetup: configs `configs/sst2_minilm/*.yaml`; training on a fixed subset of "
        "`sst2/train.tsv` (`train_limit`, `subset_seed` 0), validation and test as disjoint "
        "parts of `sst2/dev.tsv` (`test_val_fraction` 0.15, `subset_seed` 0), OOD: AG News "
        "`dev.tsv` (`ood_limit` texts, maximum softmax probability). Grid options: "
        f"`{json.dumps({k: v for k, v in grid.items() if k not in ('configs', 'mode')})}`.\n"
    )
    selection_path = folder / "lr_selection.json"
    if selection_path.is_file():
        parts.append("\nLearning rates, chosen on the validation part only:\n\n")
        parts.append(lr_table(json.loads(selection_path.read_text())))
    parts.append("\nTest part, mean ± std over seeds:\n\n")
    parts.append(table(reports, [*QUALITY, *SST2_OOD]))
    parts.append("\nCost (1 CPU thread unless the grid options say otherwise):\n\n")
    parts.append(table(reports, COST))
    parts.append("\nFigures (reliability diagram, ensemble-size curve):\n\n")
    parts.append(figures(reports, "sst2", figure_dir, doc))
    return "".join(parts)


def pretrain_values(folder: Path) -> str | None:
    """``"Accuracy 0.5020, Macro F1 ..."``: the test metrics of ``folder/pretrain`` (the CIFAR-10
    backbone trained from scratch); ``None`` when it has not finished."""
    pretrain = folder / "pretrain" / "metrics.json"
    if not pretrain.is_file():
        return None
    metrics = json.loads(pretrain.read_text())["metrics"]
    return ", ".join(
        f"{title} {metrics[f'test/{name}']:.4f}"
        for name, title, _ in QUALITY
        if f"test/{name}" in metrics
    )


def pretrain_line(folder: Path) -> str | None:
    """The CIFAR-10 section's sentence on the pretrained backbone (``None`` without one)."""
    values = pretrain_values(folder)
    if values is None:
        return None
    return f"The backbone trained from scratch (Single Network, seed 0): {values}."


def cifar_section(folder: Path, figure_dir: Path, doc: Path) -> str:
    """The CIFAR-10 appendix J section: pretraining result, fine-tuning tables, figures."""
    parts = ["## CIFAR-10 from scratch (paper appendix J, Tab. 16)\n"]
    reports = load_runs(folder)
    if not reports:
        return parts[0] + f"\nNo runs yet. Produce them with `{CIFAR_COMMAND}`.\n"
    subset_path = folder / "data" / "subset.json"
    if subset_path.is_file():
        subset = json.loads(subset_path.read_text())
        parts.append(
            f"\nData: {subset['per_class']} images per class of `{subset['archive']}` (seed "
            f"{subset['seed']}), of which 20% are the held-out test part and 10% validation "
            "(data seed 0 in every run). Configs `configs/cifar10_scratch/*.yaml`.\n"
        )
    line = pretrain_line(folder)
    if line is not None:
        parts.append(f"\n{line}\n")
    parts.append("\nOne epoch from that backbone, test part, mean ± std over seeds:\n\n")
    parts.append(table(reports, QUALITY))
    parts.append("\nCost:\n\n")
    parts.append(table(reports, COST))
    parts.append("\nFigures (reliability diagram, ensemble-size curve):\n\n")
    parts.append(figures(reports, "cifar10", figure_dir, doc))
    return "".join(parts)


def device_section(folder: Path) -> str:
    """The same CIFAR-10 pipeline run on a GPU machine (``folder``: its output folder, with
    the machine's ``env.txt`` beside it); empty when there is none."""
    reports = load_runs(folder)
    if not reports:
        return ""
    env = folder.parent / "env.txt"
    machine = env.read_text().strip().splitlines()[0] if env.is_file() else "a GPU"
    parts = [
        "### The same pipeline on a GPU (cross-check)\n",
        f"\nRun on {machine} with the same script and configs (float32, "
        "`--override trainer.deterministic=warn`), its own pretraining included; the runs "
        "shown finished there. Not pooled with the CPU runs above.\n\n",
    ]
    values = pretrain_values(folder)
    if values is not None:
        parts.append(f"Backbone trained from scratch there: {values}.\n\n")
    parts.append(table(reports, [*QUALITY, COST[-1]]))
    return "".join(parts)


PAPER_COMMAND = (
    "python experiments/sst2_paper.py grid --data /work/shared/data --output runs/sst2_paper"
)
GAIN_COMMAND = "python experiments/sst2_paper.py gain --grid runs/sst2_paper"
PAPER_HEADING = "## SST-2 with all-MiniLM-L6-v2, the paper's protocol scaled down (Tab. 8, Tab. 11)"
#: Name of the gain figure in docs/figures/results/.
GAIN_FIGURE = "sst2_paper_gain.png"
#: (key in a gain row, column title, digits) of the gain table.
GAIN_COLUMNS = [
    ("diversity", "Diversity of updates (App. E)", 4),
    ("diversity_weights", "Diversity of W_i (App. E)", 4),
    ("test/acc", "Accuracy", 4),
    ("test/ece", "ECE", 4),
    ("test/nll", "NLL", 4),
    ("test/diversity/disagreement", "Disagreement (test)", 4),
]


#: The gain table's diversity columns and their ``weight_diversity.json`` fields: appendix E's
#: score of the members' value updates ``W_i - W0`` and of their whole value matrices ``W_i``
#: (the appendix does not say which; :func:`lorae.analysis.diversity_score`).
DIVERSITY_FIELDS = {
    "diversity": "diversity_score_v",
    "diversity_weights": "diversity_score_v_weights",
}


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sample std`` of the finite ``values`` (``n/a`` when none; no ± for one).

    When only some seeds have a value (e.g. a reading recorded after the first seeds ran), the
    cell says over how many it is, so it is not read as the row's seeds:
    ``0.0290 ± 0.0010 (2 of 3 seeds)``."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "n/a"
    text = f"{statistics.fmean(finite):.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    if len(finite) < len(values):
        text += f" ({len(finite)} of {len(values)} seeds)"
    return text


def grid_argv_command(folder: Path, script: str, fallback: str) -> str:
    """The commands that wrote ``folder/grid.json`` (every recorded invocation, one per line,
    else its ``argv``), else ``fallback``."""
    path = folder / "grid.json"
    if not path.is_file():
        return fallback
    grid = json.loads(path.read_text())
    invocations = grid.get("invocations") or ([grid["argv"]] if "argv" in grid else [])
    if not invocations:
        return fallback
    lines = []
    for argv in invocations:
        words = [w for w in argv if w not in ("--protocol", "paper")] if "grid" in script else argv
        lines.append(" ".join([script, *words]))
    return "\n".join(lines)


def commands_block(reports: Sequence[dict[str, Any]]) -> str:
    """Every run's exact ``lorae`` command (from its ``run.json``), grouped by method."""
    groups: dict[str, list[str]] = {}
    for report in reports:
        run_path = report["_folder"] / "run.json"
        run = json.loads(run_path.read_text()) if run_path.is_file() else {}
        command = " ".join(run.get("command", ["(no run.json)"]))
        reused = run.get("training_reused")
        if reused:  # sst2_grid.reuses_search: trained by the search cell, only tested here
            command = (
                f"# trained in {reused['trained_in']} (the same command with "
                f"--test_after_fit=false), then tested:\n{command}"
            )
        groups.setdefault(report["method"]["method"], []).append(command)
    blocks = [
        f"{method}:\n\n```bash\n" + "\n".join(lines) + "\n```\n" for method, lines in groups.items()
    ]
    return "\n".join(blocks)


def gain_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per gain of the sweep in ``folder/gain/gain.json``: the seeds and, per seed,
    the appendix E diversity score (``weight_diversity.json``) and the test metrics."""
    path = folder / "gain" / "gain.json"
    if not path.is_file():
        return []
    sweep = json.loads(path.read_text())
    rows = []
    for gain in sweep["gains"]:
        runs = folder / sweep["folders"][f"{gain:g}"]
        seeds: list[str] = []
        values: dict[str, list[float]] = {key: [] for key, _, _ in GAIN_COLUMNS}
        for metrics_path in sorted(runs.glob("seed*/metrics.json")):
            seeds.append(metrics_path.parent.name.removeprefix("seed"))
            metrics = json.loads(metrics_path.read_text())["metrics"]
            diversity_path = metrics_path.parent / "weight_diversity.json"
            record = json.loads(diversity_path.read_text()) if diversity_path.is_file() else {}
            for key, field in DIVERSITY_FIELDS.items():
                value = record.get(field)  # absent: analysed before it was recorded
                values[key].append(math.nan if value is None else float(value))
            for key, _, _ in GAIN_COLUMNS:
                if key not in DIVERSITY_FIELDS:
                    values[key].append(float(metrics.get(key, math.nan)))
        if seeds:
            rows.append({"gain": gain, "folder": runs, "seeds": seeds, "values": values})
    return rows


def gain_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Tab. 11-like table: per gain, mean ± std over its seeds."""
    lines = [
        "| gain | seeds | " + " | ".join(title for _, title, _ in GAIN_COLUMNS) + " |",
        "|---|---|" + "---|" * len(GAIN_COLUMNS),
    ]
    for row in rows:
        cells = " | ".join(mean_std(row["values"][k], d) for k, _, d in GAIN_COLUMNS)
        lines.append(f"| {row['gain']:g} | {','.join(row['seeds'])} | {cells} |")
    return "\n".join(lines) + "\n"


def gain_figure(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Accuracy, ECE and NLL against the diversity score, one point per gain (mean ± std
    over seeds, labelled with the gain), as Tab. 11 / Fig. 14: one row per reading of the
    score (of the updates, of the whole matrices; a gain without it is left out of that row,
    a reading no gain has is left out). Returns False without matplotlib or any score."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    def stats(values: list[float]) -> tuple[float, float]:
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return math.nan, math.nan
        return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0

    readings = [  # a reading no gain has recorded gets no row
        (key, title)
        for key, title in (
            ("diversity", "diversity of V updates W_i - W0"),
            ("diversity_weights", "diversity of V matrices W_i"),
        )
        if any(not math.isnan(v) for row in rows for v in row["values"][key])
    ]
    if not readings:
        return False
    figure, grid = plt.subplots(len(readings), 3, figsize=(12, 3.4 * len(readings)), squeeze=False)
    for axes, (x_key, x_title) in zip(grid, readings, strict=True):
        xs = [stats(row["values"][x_key]) for row in rows]
        for axis, (key, title, _) in zip(axes, GAIN_COLUMNS[2:5], strict=True):
            ys = [stats(row["values"][key]) for row in rows]
            shown = [i for i, (x, _) in enumerate(xs) if not math.isnan(x)]  # n/a: not recorded
            axis.errorbar(
                [xs[i][0] for i in shown],
                [ys[i][0] for i in shown],
                xerr=[xs[i][1] for i in shown],
                yerr=[ys[i][1] for i in shown],
                marker="o",
                capsize=3,
            )
            for i in shown:
                axis.annotate(
                    f"gain {rows[i]['gain']:g}",
                    (xs[i][0], ys[i][0]),
                    textcoords="offset points",
                    xytext=(4, 4),
                )
            axis.set_xlabel(f"{x_title} (App. E)")
            axis.set_ylabel(title)
            axis.grid(alpha=0.3)
    figure.suptitle("LoRA-Ensemble (M = 8) on SST-2 / all-MiniLM-L6-v2: Xavier gain sweep")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


#: The cells of a paper grid folder: search, tested runs, gain runs.
PAPER_CELLS = ("lr_search/*/*/run.json", "runs/*/seed*/run.json", "gain/*/seed*/run.json")


def numbers_in_order(path: Path) -> list[int | str]:
    """Sort key reading a path's digit runs as numbers, so ``gain/g4`` comes before
    ``gain/g20`` and ``seed2`` before ``seed10`` (string order puts them the other way).
    ``re.split`` with a group alternates text and digits, so equal positions compare alike."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def cost_rows(folder: Path, patterns: Sequence[str] = PAPER_CELLS) -> list[dict[str, Any]]:
    """Every cell's ``run.json`` under ``folder`` matching ``patterns``, in their order (each
    pattern's cells with their numbers in numeric order)."""
    rows = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern), key=numbers_in_order):
            run = json.loads(path.read_text())
            rows.append({"cell": path.parent.relative_to(folder).as_posix(), **run})
    return rows


def cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """Wall and CPU seconds of every cell (summed over its attempts), with its estimate."""
    lines = [
        "| cell | lr | threads | attempts | wall s | CPU s | estimated CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = row.get("estimate_seconds")
        cell = row["cell"]
        reused = row.get("training_reused")
        if reused:  # sst2_grid.reuses_search: this cell only tested
            cell += f" (test only; trained in {reused['trained_in']})"
        lr = row.get("lr")
        lines.append(
            f"| {cell} | {'n/a' if lr is None else f'{lr:g}'} | {row.get('threads') or 'n/a'} | "
            f"{row.get('attempts', 1)} | {row['wall_seconds']:,.0f} | "
            f"{row['cpu_seconds']:,.0f} | {'n/a' if estimate is None else f'{estimate:,.0f}'} |"
        )
    wall = sum(float(r["wall_seconds"]) for r in rows)
    cpu = sum(float(r["cpu_seconds"]) for r in rows)
    lines.append(f"| **all {len(rows)} cells** | | | | **{wall:,.0f}** | **{cpu:,.0f}** | |")
    return "\n".join(lines) + "\n"


def paper_section(folder: Path, figure_dir: Path, doc: Path) -> str:
    """The paper-protocol SST-2 section (empty when the grid has no finished runs)."""
    reports = load_runs(folder)
    if not reports:
        return ""
    grid_path = folder / "grid.json"
    grid = json.loads(grid_path.read_text()) if grid_path.is_file() else {}
    # the options every invocation shares; methods and jobs are per invocation (listed below)
    per_invocation = (
        "configs",
        "mode",
        "argv",
        "data",
        "methods",
        "jobs",
        "dry_run",
        "invocations",
    )
    options = {k: v for k, v in grid.items() if k not in per_invocation}
    parts = [
        f"{PAPER_HEADING}\n",
        "\nThe paper's SST-2 protocol (appendix M) scaled to CPU: all-MiniLM-L6-v2 instead of "
        "BERT base, a fixed subset of `sst2/train.tsv`; each method's learning rate from the "
        "paper's grid by validation accuracy (the final epoch's), 3 epochs of linear decay, "
        "M = 8 for every ensemble (Bayes-LoRA: its 512 posterior samples, appendix W), the "
        "final weights tested on the test part of `dev.tsv`, OOD "
        f"against AG News. Grid options: `{json.dumps(options)}`.\n\n```bash\n"
        f"{grid_argv_command(folder, 'python experiments/sst2_paper.py grid', PAPER_COMMAND)}\n"
        "```\n",
    ]
    selection_path = folder / "lr_selection.json"
    if selection_path.is_file():
        parts.append("\nLearning rates, chosen on the validation part only:\n\n")
        parts.append(lr_table(json.loads(selection_path.read_text())))
    from experiments.sst2_grid import PAPER_METHODS  # sst2_grid's tools import this module

    tested_seeds = seeds_by_method(reports)
    missing = [m for m in PAPER_METHODS if m not in tested_seeds]
    short = seeds_short(tested_seeds, [str(s) for s in grid.get("seeds", [])])
    if missing or short:
        done = f"{len(PAPER_METHODS) - len(missing)} of {len(PAPER_METHODS)} methods have tested"
        left = [f"not yet run: {', '.join(missing)}"] if missing else []
        if short:
            tested = ", ".join(f"{method} ({','.join(s)})" for method, s in short.items())
            left.append(
                f"fewer seeds than the grid's ({','.join(map(str, grid['seeds']))}) so "
                f"far: {tested}"
            )
        parts.append(
            f"\n**Partial grid:** {done} runs so far; {'; '.join(left)}. The grid continues "
            "from its kept records in later sessions (experiments/README.md).\n"
        )
    parts.append("\nTest part, mean ± std over seeds (Tab. 8):\n\n")
    parts.append(table(reports, [*QUALITY, *SST2_OOD]))
    rows = gain_rows(folder)
    if rows:
        sweep = json.loads((folder / "gain" / "gain.json").read_text())
        script = GAIN_COMMAND.split(" --grid")[0]
        invocations = sweep.get("invocations") or [sweep.get("argv", [])]
        command = "\n".join(" ".join([script, *argv]) for argv in invocations)
        parts.append(
            "\n### Xavier gain against diversity (Tab. 11, appendix E)\n\n"
            f"LoRA-Ensemble (M = 8) at its chosen rate ({sweep['lr']:g}) with the LoRA A "
            "factors drawn Xavier-uniform with each gain; gain "
            f"{sweep['config_gain']:g} is the grid's own LoRA-Ensemble run. Diversity score "
            "(appendix E): one minus the mean pairwise Pearson correlation of the members' "
            "value-projection matrices, averaged over layers (`lorae analyze`, "
            "`weight_diversity.json`). The appendix does not say which matrices: 'of updates' "
            "correlates the updates `W_i - W0`, 'of W_i' the whole adapted matrices (fewer "
            "seeds, or n/a, where a run was analysed before that column was recorded). "
            "Disagreement: the members' mean "
            "pairwise disagreement on the test part. Mean ± std over seeds.\n\n"
            f"```bash\n{command}\n```\n\n"
        )
        parts.append(gain_table(rows))
        figure = figure_dir / GAIN_FIGURE
        if gain_figure(rows, figure):
            parts.append(f"\n![gain sweep]({figure.relative_to(doc.parent).as_posix()})\n")
    parts.append("\nCost of every cell (wall and CPU seconds over all its attempts):\n\n")
    parts.append(cost_table(cost_rows(folder)))
    parts.append("\nThe exact command of every tested run:\n\n")
    parts.append(commands_block(reports))
    return "".join(parts)


def fsdd_section(folder: Path) -> str:
    """The FSDD section (``experiments/fsdd_results.py``), or nothing while its runs do not
    exist."""
    if not folder.exists():
        return ""
    from experiments import fsdd_results  # it imports this module's tables

    return fsdd_results.fsdd_section(folder)


DISCUSSION_MARKER = "<!-- from experiments/discussion.md -->"


def replace_discussion(document: str, discussion: Path) -> str:
    """``document`` (a generated results.md) with the text after its discussion marker replaced
    by ``discussion``'s; the tables above it are kept as they are."""
    head, marker, _ = document.partition(DISCUSSION_MARKER)
    if not marker:
        raise SystemExit(
            f"error: the document has no {DISCUSSION_MARKER!r} line; regenerate it whole"
        )
    return f"{head}{marker}\n{discussion.read_text().strip()}\n"


#: Where the issue 18 sections (and after them the comparison) start in a generated document.
NEW_SECTION_STARTS = (
    PAPER_HEADING,
    "## FSDD",
    "## SST-2 on the full training set",
    "## Comparison with the paper",
)


def earlier_sections(document: str) -> str:
    """The part of a generated ``document`` before its issue 18 sections: the header, the
    SST-2 dev grid, CIFAR-10 and GPU sections, as they were generated from their runs."""
    starts = [document.find(f"\n{h}") for h in NEW_SECTION_STARTS if f"\n{h}" in document]
    if not starts:
        raise SystemExit("error: the document has no comparison section; regenerate it whole")
    return document[: min(starts) + 1]


def render(
    sst2: Path,
    cifar10: Path,
    discussion: Path,
    doc: Path,
    device: Path,
    sst2_paper: Path | None = None,
    fsdd: Path | None = None,
    earlier: str | None = None,
    sst2_gpu: Path | None = None,
) -> str:
    """The whole document. The paper-protocol and FSDD sections appear only when their runs
    exist, so the document of the earlier records regenerates unchanged. ``earlier``: the
    text to use instead of the SST-2 dev grid, CIFAR-10 and GPU sections (see
    :func:`earlier_sections`)."""
    figure_dir = doc.parent / "figures" / "results"
    text = discussion.read_text().strip() if discussion.is_file() else ""
    grid_path = sst2 / "grid.json"
    sst2_command = (
        grid_command(json.loads(grid_path.read_text())) if grid_path.is_file() else SST2_COMMAND
    )
    paper = paper_section(sst2_paper, figure_dir, doc) if sst2_paper is not None else ""
    fsdd_part = fsdd_section(fsdd) if fsdd is not None else ""
    gpu_part = ""
    if sst2_gpu is not None:
        from experiments.gpu_issue18 import gpu_section  # it imports this module's tables

        gpu_part = gpu_section(sst2_gpu)
    heading = "## Comparison with the paper (Tab. 8 and Tab. 16)\n"
    if paper:
        heading = "## Comparison with the paper (Tab. 8, Tab. 11 and Tab. 16)\n"
    extra = [part for part in (paper, fsdd_part, gpu_part) if part]
    if earlier is not None:
        return "\n".join(
            [
                earlier.rstrip("\n") + "\n",
                *extra,
                heading,
                DISCUSSION_MARKER,
                text or "_No discussion written yet (experiments/discussion.md)._",
                "",
            ]
        )
    return "\n".join(
        [
            "<!-- Generated by `python experiments/make_results.py`; do not edit by hand. "
            "The discussion comes from experiments/discussion.md. -->",
            "# Results on real data at CPU scale\n",
            "Development results of the paper's comparisons (issue 8) on the data in "
            "`../shared/data`, produced by the commands below and generated from the runs' "
            f"`metrics.json` by `{GENERATE_COMMAND}`. They are not the paper's numbers: "
            "smaller data, a smaller backbone and fewer epochs (see experiments/README.md).\n",
            "```bash",
            sst2_command,
            CIFAR_COMMAND,
            GENERATE_COMMAND,
            "```\n",
            "Each run's full `lorae fit` command, wall time and CPU time are in the `run.json` "
            "next to its `metrics.json` (`<output>/runs/<method>/seed<S>/`); the learning-rate "
            "search is in `<output>/lr_search/` and `lr_selection.json`.\n",
            sst2_section(sst2, figure_dir, doc),
            cifar_section(cifar10, figure_dir, doc),
            device_section(device),
            *extra,
            heading,
            DISCUSSION_MARKER,
            text or "_No discussion written yet (experiments/discussion.md)._",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Write the document; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2", type=Path, default=Path("runs/sst2_minilm"))
    parser.add_argument("--cifar10", type=Path, default=Path("runs/cifar10_j"))
    parser.add_argument(
        "--cifar10-device",
        type=Path,
        default=Path("runs/device_h200/cifar10_j"),
        help="the CIFAR-10 pipeline's output folder from a GPU machine (optional)",
    )
    parser.add_argument(
        "--sst2-paper",
        type=Path,
        default=Path("runs/sst2_paper"),
        help="the paper-protocol grid (experiments/sst2_paper.py; a section when it has runs)",
    )
    parser.add_argument(
        "--fsdd", type=Path, default=Path("runs/fsdd_ast"), help="FSDD runs (fsdd_results.py)"
    )
    parser.add_argument(
        "--sst2-gpu",
        type=Path,
        default=Path("runs/sst2_full"),
        help="the GPU run's kept records (experiments/gpu_issue18.sh; a section when present)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--discussion", type=Path, default=REPO / "experiments" / "discussion.md")
    parser.add_argument(
        "--discussion-only",
        action="store_true",
        help="replace only the discussion of an existing --output (its tables are kept, the "
        "runs are not needed)",
    )
    parser.add_argument(
        "--keep-earlier-sections",
        action="store_true",
        help="keep the SST-2 dev grid, CIFAR-10 and GPU sections of the existing --output as\n"
        "they are (their first run folders are gone; experiments/records/2026-11-27 reproduces\n"
        "their quality rows) and regenerate the paper-protocol and FSDD sections and the\n"
        "discussion after them",
    )
    args = parser.parse_args(argv)
    if args.discussion_only:
        if not args.output.is_file():
            parser.error(f"--discussion-only needs an existing {args.output}")
        args.output.write_text(replace_discussion(args.output.read_text(), args.discussion))
        print(f"Discussion replaced: {args.output}")
        return 0
    earlier = None
    if args.keep_earlier_sections:
        if not args.output.is_file():
            parser.error(f"--keep-earlier-sections needs an existing {args.output}")
        earlier = earlier_sections(args.output.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        render(
            args.sst2,
            args.cifar10,
            args.discussion,
            args.output,
            args.cifar10_device,
            args.sst2_paper,
            args.fsdd,
            earlier,
            args.sst2_gpu,
        )
    )
    print(f"Written: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
