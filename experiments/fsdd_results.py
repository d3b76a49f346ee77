"""The FSDD section of docs/results.md from ``experiments/fsdd_ast.py``'s runs: pretraining line,
then mean ± std over seeds of each fine-tuning method's test metrics (the test part) and
cost, with ``make_results``' own table functions (so the numbers read alike).

    python experiments/fsdd_results.py [--fsdd runs/fsdd_ast] [--output fsdd.md]

``make_results.render`` can include it as ``fsdd_section(folder)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/fsdd_results.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.make_results import (
    COST,
    QUALITY,
    commands_block,
    cost_rows,
    cost_table,
    load_runs,
    pretrain_values,
    table,
)

#: The cells of an FSDD folder: the pretraining run, then every fine-tuning run.
FSDD_CELLS = ("pretrain/run.json", "runs/*/seed*/run.json")

FSDD_COMMAND = (
    "python experiments/fsdd_ast.py --data /work/shared/data/fsdd/train.tar.gz "
    "--output runs/fsdd_ast"
)


def fsdd_section(folder: Path) -> str:
    """The Markdown section: data split, pretrained backbone, quality and cost tables."""
    parts = ["## FSDD spoken digits, small AST from scratch (appendix J setting, audio)\n"]
    reports = load_runs(folder)
    split_path = folder / "data" / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
        counts = {part: len(files) for part, files in split["files"].items()}
        parts.append(
            f"\nData: `{split['archive']}`, {split['description']} (no recording in two "
            f"parts): {counts['pretrain']} pretraining, {counts['train']} fine-tuning "
            f"training, {counts['val']} validation and {counts['test']} test clips. Configs "
            "`configs/fsdd/*.yaml`.\n"
        )
    values = pretrain_values(folder)
    if values is not None:
        parts.append(
            "\nThe AST trained from scratch (Single Network, seed 0, 10% of the pretraining "
            f"part): {values}.\n"
        )
    if not reports:
        return "".join(parts) + f"\nNo fine-tuning runs yet. Produce them with `{FSDD_COMMAND}`.\n"
    parts.append("\nFine-tuned from that backbone, test part, mean ± std over seeds:\n\n")
    parts.append(table(reports, QUALITY))
    parts.append("\nCost, mean ± std over seeds:\n\n")
    parts.append(table(reports, COST))
    parts.append("\nWall and CPU seconds of every cell:\n\n")
    parts.append(cost_table(cost_rows(folder, FSDD_CELLS)))
    parts.append(f"\n```bash\n{FSDD_COMMAND}\n```\n\nThe exact command of every run:\n\n")
    parts.append(commands_block(reports))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdd", type=Path, default=Path("runs/fsdd_ast"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    text = fsdd_section(args.fsdd)
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
