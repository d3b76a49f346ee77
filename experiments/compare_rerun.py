"""Compare a rerun of the experiments with the tables of ``docs/results.md``: does running the
same cells again, with the same seeds, give the same numbers (issue 8)?

    python experiments/compare_rerun.py [--sst2 DIR] [--cifar10 DIR] [--sst2-paper DIR] \
        [--fsdd DIR] [--reference docs/results.md] [--output docs/reproducibility.md]

The rerun folders have the layout the experiment scripts write (``<DIR>/runs/<method>/seed<S>/
metrics.json``; a rerun may hold only some methods), and may carry an ``env.txt`` whose first
line says where they ran. Their quality tables are rendered by ``make_results``' own functions,
so a method whose rerun row is the same string as the reference's row (same seeds, every
metric's mean ± std to the printed 4 digits) is reproduced; otherwise both rows and the largest
difference between their printed numbers are reported. The CIFAR-10 pretraining line is
compared the same way, and each method's seed-0 figures byte for byte with the copies the
reference links. The report is written to ``--output`` (Markdown, generated); the exit status
is 1 when any compared row differs, 0 when all agree.

``--sst2-paper DIR`` compares a rerun of the paper-protocol grid (``sst2_paper.py grid``, any
subset of its tested cells) with the Tab. 8 table of the reference's paper-protocol section,
and, when the rerun holds gain-sweep runs (``gain/gain.json``), each gain's row with the
reference's gain table (``sst2_gain``). ``--fsdd DIR`` compares a rerun of
``fsdd_ast.py`` (its pretrained AST's test metrics and the fine-tuning table).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/compare_rerun.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.make_results import (
    FIGURES,
    PAPER_HEADING,
    QUALITY,
    SST2_OOD,
    gain_rows,
    gain_table,
    load_runs,
    pretrain_values,
    table,
)

REPO = Path(__file__).resolve().parents[1]

#: Experiment -> (heading prefix of its section in docs/results.md, quality columns). The name
#: is also the prefix of its figures in docs/figures/results/.
EXPERIMENTS = {
    "sst2": ("## SST-2", [*QUALITY, *SST2_OOD]),
    "cifar10": ("## CIFAR-10", QUALITY),
    "sst2_paper": (PAPER_HEADING, [*QUALITY, *SST2_OOD]),
    "fsdd": ("## FSDD", QUALITY),
}
#: Between "... trained from scratch (...)" and the pretrained backbone's test metrics.
PRETRAIN_SEPARATOR = "): "
_NUMBER = re.compile(r"-?\d+\.\d+")


@dataclass(frozen=True)
class Comparison:
    """One compared row: the experiment, what it is (a method or ``pretrain``), both rows."""

    experiment: str
    name: str
    reference: str | None
    rerun: str
    #: Seed-0 figures (reliability diagram, ensemble-size curve) against the copies linked
    #: from the reference: "identical", "differ" or "n/a" (absent on either side).
    figures: str = "n/a"

    @property
    def same(self) -> bool:
        return self.reference == self.rerun

    def largest_difference(self) -> float | None:
        """The largest absolute difference between corresponding numbers of the two rows
        (means and standard deviations as printed); ``None`` when they cannot be paired."""
        if self.reference is None:
            return None
        ours = [float(x) for x in _NUMBER.findall(self.rerun)]
        theirs = [float(x) for x in _NUMBER.findall(self.reference)]
        if len(ours) != len(theirs) or not ours:
            return None
        return max(abs(a - b) for a, b in zip(ours, theirs, strict=True))


def section(document: str, heading: str) -> str:
    """The text of the ``## `` section of ``document`` whose heading starts with ``heading``
    (up to the next ``## `` heading); empty when there is none."""
    parts = re.split(r"(?m)^(?=## )", document)
    return next((part for part in parts if part.startswith(heading)), "")


def table_rows(text: str, header: str) -> dict[str, str]:
    """Method -> row line of the Markdown table in ``text`` whose header line is ``header``."""
    lines = text.splitlines()
    rows: dict[str, str] = {}
    for start, line in enumerate(lines):
        if line != header:
            continue
        for row in lines[start + 2 :]:
            if not row.startswith("|"):
                break
            rows[row.split("|")[1].strip()] = row
        break
    return rows


def compare_figures(run: Path, figure_dir: Path, prefix: str) -> str:
    """Byte comparison of a rerun's seed-0 figures with the reference's copies
    (``<figure_dir>/<prefix>_<name>``, as make_results names them). Identical PNG files mean
    the plotted per-bin (and per-size) values came out the same for that single seed."""
    pairs = [(run / name, figure_dir / f"{prefix}_{name}") for name in FIGURES]
    pairs = [(ours, theirs) for ours, theirs in pairs if ours.is_file() and theirs.is_file()]
    if not pairs:
        return "n/a"
    same = all(ours.read_bytes() == theirs.read_bytes() for ours, theirs in pairs)
    return "identical" if same else "differ"


def compare(experiment: str, rerun: Path, reference: str, figure_dir: Path) -> list[Comparison]:
    """Every method of ``rerun`` (and its pretraining line, if any) against ``reference``,
    whose figures lie in ``figure_dir``."""
    heading, columns = EXPERIMENTS[experiment]
    reports = load_runs(rerun)
    if not reports:
        raise SystemExit(f"error: no finished runs under {rerun / 'runs'}; nothing to compare")
    part = section(reference, heading)
    if not part:
        raise SystemExit(f"error: the reference has no section starting with {heading!r}")
    rendered = table(reports, columns)
    header = rendered.splitlines()[0]
    theirs = table_rows(part, header)
    result = [
        Comparison(
            experiment,
            method,
            theirs.get(method),
            row,
            compare_figures(
                rerun / "runs" / method / "seed0", figure_dir, f"{experiment}_{method}"
            ),
        )
        for method, row in table_rows(rendered, header).items()
    ]
    ours_pretrain = pretrain_values(rerun)
    if ours_pretrain is not None:
        theirs_pretrain = next(
            (
                line.split(PRETRAIN_SEPARATOR, 1)[1].rstrip(".")
                for line in part.splitlines()
                if "trained from scratch (" in line and PRETRAIN_SEPARATOR in line
            ),
            None,
        )
        result.append(Comparison(experiment, "pretrain", theirs_pretrain, ours_pretrain))
    return result


def compare_gain(rerun: Path, reference: str) -> list[Comparison]:
    """Each gain of ``rerun``'s sweep against the reference's gain table (none when the rerun
    has no gain runs)."""
    rows = gain_rows(rerun)
    if not rows:
        return []
    rendered = gain_table(rows)
    header = rendered.splitlines()[0]
    theirs = table_rows(section(reference, PAPER_HEADING), header)
    return [
        Comparison("sst2_gain", gain, theirs.get(gain), row)
        for gain, row in table_rows(rendered, header).items()
    ]


def machine(folders: dict[str, Path]) -> str:
    """Where the rerun ran: the first line of each rerun folder's ``env.txt`` (written beside
    the runs, e.g. CPU model and torch version), or "a machine not recorded"."""
    lines = []
    for folder in folders.values():
        env = folder / "env.txt"
        if env.is_file() and env.read_text().strip():
            lines.append(env.read_text().strip().splitlines()[0])
    return "; ".join(dict.fromkeys(lines)) or "a machine not recorded"


def report(comparisons: Sequence[Comparison], folders: dict[str, Path], reference: Path) -> str:
    """The Markdown report."""
    command = " ".join(
        [
            "python experiments/compare_rerun.py",
            *(f"--{k.replace('_', '-')} {v}" for k, v in folders.items()),
        ]
    )
    same = sum(c.same for c in comparisons)
    lines = [
        f"<!-- Generated by `{command}`; do not edit by hand. -->",
        "# Reproducibility: a rerun against docs/results.md\n",
        "Cells of the experiments were run again with the same commands and seeds, on "
        f"{machine(folders)}, and their tables rendered exactly as `{reference.name}` "
        "renders them (mean ± std over the same seeds, 4 digits). A row that is the same "
        "string as the reference's is reproduced; the wall times differ between machines and "
        "are not compared. Where the rerun has seed 0 and its figures, they are compared byte "
        "for byte with the copies the reference links (those are seed 0's), a check of that "
        "single seed.\n",
        f"**{same} of {len(comparisons)} rows are identical.**\n",
        "| experiment | method | seeds | table row | largest difference | seed-0 figures |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        seeds = c.rerun.split("|")[2].strip() if c.name != "pretrain" else "0"
        if c.reference is None:
            verdict, delta = "not in the reference", "n/a"
        elif c.same:
            verdict, delta = "identical", "0"
        else:
            difference = c.largest_difference()
            verdict = "differs"
            delta = "n/a" if difference is None else f"{difference:.4f}"
        lines.append(f"| {c.experiment} | {c.name} | {seeds} | {verdict} | {delta} | {c.figures} |")
    for c in comparisons:
        if not c.same:
            lines += [
                "",
                f"{c.experiment} / {c.name}:",
                "",
                f"- reference: `{c.reference}`",
                f"- rerun:     `{c.rerun}`",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns 1 when a row differs or is missing from the reference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2", type=Path, help="rerun folder of experiments/sst2_grid.py")
    parser.add_argument(
        "--cifar10", type=Path, help="rerun folder of experiments/cifar10_appendix_j.py"
    )
    parser.add_argument(
        "--sst2-paper", type=Path, help="rerun folder of experiments/sst2_paper.py (grid, gain)"
    )
    parser.add_argument("--fsdd", type=Path, help="rerun folder of experiments/fsdd_ast.py")
    parser.add_argument("--reference", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reproducibility.md")
    args = parser.parse_args(argv)
    given = (
        ("sst2", args.sst2),
        ("cifar10", args.cifar10),
        ("sst2_paper", args.sst2_paper),
        ("fsdd", args.fsdd),
    )
    folders = {k: v for k, v in given if v}
    if not folders:
        parser.error("give --sst2, --cifar10, --sst2-paper and/or --fsdd: the rerun folders")
    if not args.reference.is_file():
        parser.error(f"reference {args.reference} not found (make it with make_results.py)")
    reference = args.reference.read_text()
    figure_dir = args.reference.parent / "figures" / "results"
    comparisons = [
        c for name, f in folders.items() for c in compare(name, f, reference, figure_dir)
    ]
    if args.sst2_paper:
        comparisons += compare_gain(args.sst2_paper, reference)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(comparisons, folders, args.reference))
    same = sum(c.same for c in comparisons)
    print(f"{same} of {len(comparisons)} rows identical; written: {args.output}")
    return 0 if same == len(comparisons) else 1


if __name__ == "__main__":
    raise SystemExit(main())
