"""Copy the small records of an experiment folder (no checkpoints, no logs) into the repository,
so that ``make_results.py`` and ``compare_rerun.py`` can regenerate their documents from it
after the run folder is gone.

    python experiments/keep_records.py runs/cifar10_j experiments/records/<date>/cifar10_j

Kept, with their relative paths: every ``*.json`` outside ``checkpoints/`` (``grid.json``,
``lr_selection.json``, ``data/subset.json``, the learning-rate search's ``validation.json`` and
``selection.json``, each run's ``metrics.json``, ``run.json`` and ``diversity.json``), each
run's ``ensemble_size.csv``, ``env.txt``, and the figures ``make_results`` links (seed 0's
reliability diagram and ensemble-size curve, a few tens of kB each). From the paper-protocol
grid (``sst2_paper.py``) also each cell's ``attempts.json`` (the wall and CPU time of every
attempt of a resumed cell), ``weight_diversity.json`` (the appendix E score) and the gain
sweep's ``gain/gain.json``; ``lorae analyze``'s full output (``analysis/``, matrices and t-SNE
coordinates) is left out, and so is any file over 1 MB (printed instead; only the pairwise
matrices of a posterior with hundreds of samples get there).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/keep_records.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.make_results import FIGURES

#: Larger files are not kept (reported instead): the records live in git. Only the pairwise
#: matrices of a many-sample posterior (Bayes-LoRA's 512 draws: a 17 MB ``diversity.json``)
#: reach it; their summary is in the run's ``metrics.json``.
MAX_RECORD_BYTES = 1_000_000

#: File names kept besides ``*.json``.
KEPT_NAMES = {"env.txt", "ensemble_size.csv", *FIGURES}


def records(folder: Path) -> list[Path]:
    """The files of ``folder`` worth keeping, relative to it, sorted."""
    kept = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or {"checkpoints", "analysis"} & set(relative.parts):
            continue
        if path.name in FIGURES and path.parent.name != "seed0":
            continue  # make_results links the first seed's figures only
        if path.suffix == ".json" or path.name in KEPT_NAMES:
            kept.append(relative)
    return sorted(kept)


def too_large(folder: Path, kept: list[Path]) -> list[Path]:
    """The files of ``kept`` (relative to ``folder``) over ``MAX_RECORD_BYTES``."""
    return [r for r in kept if (folder / r).stat().st_size > MAX_RECORD_BYTES]


def main(argv: list[str] | None = None) -> int:
    """Copy the records; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an experiment's output folder")
    parser.add_argument("target", type=Path, help="where the records go (created)")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"{args.source} is not a folder (give an experiment's --output folder)")
    kept = records(args.source)
    if not kept:
        parser.error(f"{args.source} holds no records (*.json): has the experiment run?")
    skipped = too_large(args.source, kept)
    for relative in skipped:
        size_mb = (args.source / relative).stat().st_size / 1e6
        print(f"not kept (over {MAX_RECORD_BYTES / 1e6:.0f} MB): {relative} ({size_mb:.1f} MB)")
    kept = [r for r in kept if r not in skipped]
    for relative in kept:
        (args.target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.source / relative, args.target / relative)
    size = sum((args.target / r).stat().st_size for r in kept)
    print(f"{len(kept)} files ({size / 1e6:.1f} MB) copied to {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
