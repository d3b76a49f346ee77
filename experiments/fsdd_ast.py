"""FSDD spoken digits in the paper's appendix J setting: a small AST trained from scratch on a
pretraining part, then LoRA-Ensemble on its frozen backbone, compared with a Single Network and
an Explicit Ensemble fine-tuned from it (issue 18; no pretrained AST weights exist offline).

    python experiments/fsdd_ast.py --data /work/shared/data/fsdd/train.tar.gz \
        --output runs/fsdd_ast [--split index|speaker] [--seeds 0 1 2] [--methods ...] [--dry-run]

Steps (each resumable, like ``experiments/cifar10_appendix_j.py``, whose backbone export it
reuses):

1. ``<output>/data/``: the archive's ``train/<digit>_<speaker>_<index>.wav`` files (FSDD's
   official *training* split: 6 speakers x 10 digits x indices 5-49, 2,700 clips) extracted
   into four disjoint parts, ``pretrain/`` and ``finetune/{train,val,test}/`` (flat folders;
   ``split.json`` holds the rule and every file of every part; no recording is in two parts).

   ``--split index`` (default) follows FSDD's own convention, a split by recording index with
   every speaker in every part (FSDD's README puts indices 0-4 in its test split, which the
   archive does not hold, so all four parts are carved from indices 5-49), per speaker and
   digit:

   ======================  ===============  =======  ======================================
   part                    indices          clips    why this size
   ======================  ===============  =======  ======================================
   ``pretrain``            5-24 (20)        1,200    the stand-in for AST's pretraining:
                                                     the largest part, so the frozen
                                                     backbone has learnt usable features
   ``finetune/train``      25-39 (15)       900      90 clips per class to fine-tune on
   ``finetune/val``        40-43 (4)        240      checkpoint and epoch choice only
   ``finetune/test``       44-49 (6)        360      >= 300 clips: the standard error of an
                                                     accuracy near 0.9 is about 1.6 points
   ======================  ===============  =======  ======================================

   (``--pretrain-max-index``, ``--val-min-index``, ``--test-min-index`` move the borders.)
   The test score is on other recordings (higher indices) of the training voices, which is
   what FSDD's split measures; with six voices in all, a speaker-disjoint split leaves too few
   training voices to generalise to new ones.

   ``--split speaker`` is the harder speaker-shift setting (an earlier variant with four
   training voices reached 0.37 test accuracy on two new voices after 0.87 on validation): the
   ``--test-speakers`` (default theo and yweweler, the last two names in sorted order) form
   ``finetune/test`` with all their recordings, the ``--val-speakers`` (default nicolas, the
   last remaining name) ``finetune/val``; the other speakers' recordings with index <=
   ``--pretrain-max-index`` pretrain and the rest is ``finetune/train``. No test or
   validation speaker is heard in pretraining (indices 5-24: 600, 750, 450 and 900 clips).
   Use another ``--output`` for it: a data folder is bound to its rule.
2. ``<output>/pretrain``: ``configs/fsdd/pretrain.yaml`` (Single Network, AST from random
   weights) trained for ``--pretrain-epochs`` (default: the config's 30) on 80% of the
   pretraining part, validated on 10% and tested on 10% (by file).
3. ``<output>/backbone.safetensors``: the backbone of the best pretraining checkpoint (lowest
   validation NLL) in timm's key layout.
4. ``<output>/runs/<method>/seed<S>``: each fine-tuning config (``single_network``,
   ``lora_ensemble``, ``explicit_ensemble``) starts from that file
   (``--model.method.init_args.pretrained=<file>``) and reads ``finetune/`` with
   ``split_by: folder`` (its ``train/``, ``val/`` and ``test/``, the same in every run); the
   seed sets ``seed_everything`` (new heads and LoRA matrices, SpecAugment, shuffling).

Every run is a cell with ``run.json`` (command, wall and CPU seconds, exit code); rerun the
same command after an interruption. ``experiments/fsdd_results.py`` renders the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as `python experiments/fsdd_ast.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cifar10_appendix_j import export_backbone
from experiments.runner import (
    Cell,
    add_pretrain_finetune_options,
    parse_overrides,
    run_cell,
    set_threads,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "fsdd"
FINETUNE_METHODS = ["single_network", "lora_ensemble", "explicit_ensemble"]
TEST_SPEAKERS = ("theo", "yweweler")
VAL_SPEAKERS = ("nicolas",)
#: Each part and its folder under ``<output>/data``.
PARTS = {
    "pretrain": "pretrain",
    "train": "finetune/train",
    "val": "finetune/val",
    "test": "finetune/test",
}
#: FSDD file names: ``<digit>_<speaker>_<index>.wav``.
NAME = re.compile(r"(?P<digit>\d)_(?P<speaker>[a-z]+)_(?P<index>\d+)\.wav")


@dataclass(frozen=True)
class SplitRule:
    """Which part a recording belongs to (see the module docstring).

    Args:
        mode: ``"index"`` (by recording index, every speaker in every part) or ``"speaker"``
            (held-out test and validation speakers).
        pretrain_max_index: Recordings with an index up to this pretrain (in ``speaker`` mode
            only those of the training speakers).
        val_min_index: ``index`` mode: first index of ``val`` (``train`` ends before it).
        test_min_index: ``index`` mode: first index of ``test`` (``val`` ends before it).
        test_speakers: ``speaker`` mode: the speakers of ``test``.
        val_speakers: ``speaker`` mode: the speakers of ``val``.
    """

    mode: Literal["index", "speaker"] = "index"
    pretrain_max_index: int = 24
    val_min_index: int = 40
    test_min_index: int = 44
    test_speakers: tuple[str, ...] = TEST_SPEAKERS
    val_speakers: tuple[str, ...] = VAL_SPEAKERS

    def __post_init__(self) -> None:
        if self.mode not in ("index", "speaker"):
            raise SystemExit(f"error: split mode must be 'index' or 'speaker', got {self.mode!r}")
        if self.mode == "index" and not (
            self.pretrain_max_index + 1 < self.val_min_index < self.test_min_index
        ):
            raise SystemExit(
                "error: the index borders must leave every part an index: pretrain <= "
                f"{self.pretrain_max_index} < train < {self.val_min_index} <= val < "
                f"{self.test_min_index} <= test."
            )
        both = sorted(set(self.test_speakers) & set(self.val_speakers))
        if self.mode == "speaker" and both:
            raise SystemExit(f"error: speaker(s) {both} are both test and validation speakers.")

    def part(self, speaker: str, index: int) -> str:
        """The part (a key of :data:`PARTS`) of the recording ``index`` of ``speaker``."""
        if self.mode == "speaker":
            if speaker in self.test_speakers:
                return "test"
            if speaker in self.val_speakers:
                return "val"
        elif index >= self.test_min_index:
            return "test"
        elif index >= self.val_min_index:
            return "val"
        return "pretrain" if index <= self.pretrain_max_index else "train"

    def describe(self) -> str:
        """One line for logs and the results page."""
        if self.mode == "index":
            return (
                f"split by recording index, every speaker in every part: pretraining indices "
                f"<= {self.pretrain_max_index}, fine-tuning training {self.pretrain_max_index + 1}"
                f"-{self.val_min_index - 1}, validation {self.val_min_index}-"
                f"{self.test_min_index - 1}, test >= {self.test_min_index}"
            )
        return (
            f"split by speaker: test speakers {', '.join(self.test_speakers)}, validation "
            f"speakers {', '.join(self.val_speakers)} (all their recordings, none in "
            f"pretraining); the other speakers' indices <= {self.pretrain_max_index} pretrain, "
            "the rest is fine-tuning training"
        )

    def record(self) -> dict[str, Any]:
        """The rule as JSON data (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    default = SplitRule()
    parser.add_argument("--data", type=Path, required=True, help="FSDD train.tar.gz")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--split",
        choices=["index", "speaker"],
        default="index",
        help="index: FSDD's split by recording index, every speaker in every part (default);\n"
        "speaker: unseen test and validation speakers (harder, speaker shift)",
    )
    parser.add_argument(
        "--pretrain-max-index",
        type=int,
        default=default.pretrain_max_index,
        help="recordings with index <= this pretrain (default %(default)s: indices 5-24)",
    )
    parser.add_argument(
        "--val-min-index",
        type=int,
        default=default.val_min_index,
        help="index split: first validation index (default %(default)s)",
    )
    parser.add_argument(
        "--test-min-index",
        type=int,
        default=default.test_min_index,
        help="index split: first test index (default %(default)s)",
    )
    parser.add_argument(
        "--test-speakers",
        nargs="+",
        default=list(TEST_SPEAKERS),
        help="speaker split: the test speakers",
    )
    parser.add_argument(
        "--val-speakers",
        nargs="+",
        default=list(VAL_SPEAKERS),
        help="speaker split: the validation speakers",
    )
    add_pretrain_finetune_options(parser, FINETUNE_METHODS, CONFIGS)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the split and every command, run nothing"
    )
    return parser


def split_rule(args: argparse.Namespace) -> SplitRule:
    """The :class:`SplitRule` of the command line."""
    return SplitRule(
        mode=args.split,
        pretrain_max_index=args.pretrain_max_index,
        val_min_index=args.val_min_index,
        test_min_index=args.test_min_index,
        test_speakers=tuple(args.test_speakers),
        val_speakers=tuple(args.val_speakers),
    )


def plan_split(names: list[str], rule: SplitRule) -> dict[str, list[str]]:
    """Assign each archive member ``train/<digit>_<speaker>_<index>.wav`` to one part of
    :data:`PARTS` by ``rule``; other members are ignored.

    Raises:
        SystemExit: A named test or validation speaker has no recording, or a part would be
            empty.
    """
    parts: dict[str, list[str]] = {part: [] for part in PARTS}
    speakers = set()
    for name in sorted(names):
        path = Path(name)
        match = NAME.fullmatch(path.name)
        if path.parent.name != "train" or match is None:
            continue
        speakers.add(match["speaker"])
        parts[rule.part(match["speaker"], int(match["index"]))].append(name)
    if rule.mode == "speaker":
        missing = sorted(set(rule.test_speakers + rule.val_speakers) - speakers)
        if missing:
            raise SystemExit(f"error: speaker(s) {missing} not in the archive: {sorted(speakers)}")
    for part, files in parts.items():
        if not files:
            raise SystemExit(
                f"error: the {part} part is empty ({rule.describe()}); move the borders."
            )
    return parts


def extract_split(archive: Path, target: Path, rule: SplitRule) -> dict[str, int]:
    """Extract the archive's WAV files into the folders of :data:`PARTS` under ``target``
    (flat, by :func:`plan_split`); skipped when ``target/split.json`` exists with this rule.

    Returns:
        Files per part.

    Raises:
        SystemExit: The archive is missing, or ``target`` holds a split by another rule.
    """
    marker = target / "split.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("rule") != rule.record():
            raise SystemExit(
                f"error: '{target}' holds a split by another rule ({record.get('rule')}); "
                f"use another --output for {rule.record()}, or delete it."
            )
        return {k: len(v) for k, v in record["files"].items()}
    if not archive.is_file():
        raise SystemExit(f"error: '{archive}' does not exist (FSDD train.tar.gz).")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        parts = plan_split([m.name for m in members], rule)
        where = {name: PARTS[part] for part, names in parts.items() for name in names}
        for folder in PARTS.values():
            (target / folder).mkdir(parents=True, exist_ok=True)
        for member in members:  # archive order: a gzip stream is only cheap to read forward
            if member.name in where:
                source = tar.extractfile(member)
                assert source is not None
                (target / where[member.name] / Path(member.name).name).write_bytes(source.read())
    record = {
        "archive": str(archive),
        "rule": rule.record(),
        "description": rule.describe(),
        "folders": PARTS,
        "files": parts,
    }
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return {k: len(v) for k, v in parts.items()}


def _fit_args(args: argparse.Namespace, config: str, seed: int, part: str) -> list[str]:
    """``lorae fit`` arguments of ``config`` on the data folder ``part`` (``pretrain`` or
    ``finetune``, the parent of ``train/``, ``val/`` and ``test/``)."""
    path = args.configs / f"{config}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no config '{path}'")
    words = [
        "fit",
        "--config",
        str(path),
        f"--seed_everything={seed}",
        f"--data.init_args.root={args.output / 'data' / part}",
        f"--trainer.precision={args.precision}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
    ]
    return [*words, *parse_overrides(args.override)]


def cells(args: argparse.Namespace) -> tuple[Cell, list[Cell]]:
    """The pretraining cell and the fine-tuning cells, in run order."""
    pretrain_args = _fit_args(args, "pretrain", 0, "pretrain")
    if args.pretrain_epochs is not None:
        pretrain_args.append(f"--trainer.max_epochs={args.pretrain_epochs}")
    pretrain = Cell(args.output / "pretrain", pretrain_args, info={"stage": "pretrain"})
    backbone = args.output / "backbone.safetensors"
    finetune = []
    for method in args.methods:
        for seed in args.seeds:
            cell_args = [
                *_fit_args(args, method, seed, "finetune"),
                f"--model.method.init_args.pretrained={backbone}",
            ]
            info = {"stage": "finetune", "method": method, "seed": seed}
            finetune.append(
                Cell(args.output / "runs" / method / f"seed{seed}", cell_args, info=info)
            )
    return pretrain, finetune


def main(argv: list[str] | None = None) -> int:
    """Run all steps; returns the number of failed fine-tuning runs (0: success)."""
    args = _parser().parse_args(argv)
    rule = split_rule(args)
    pretrain, finetune = cells(args)
    if args.dry_run:
        print(f"[data] {args.data} -> {args.output / 'data'}: {rule.describe()}")
        for cell in [pretrain, *finetune]:
            state = "done" if cell.done else "to run"
            print(f"[{state}] {cell.folder}: lorae {' '.join(cell.args)}")
        return 0
    set_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    counts = extract_split(args.data, args.output / "data", rule)
    print(f"[data] {rule.describe()}: {counts}")

    record = run_cell(pretrain, args.mode)
    if record["returncode"] != 0:
        raise SystemExit(f"error: pretraining failed; see {pretrain.folder / 'lorae.log'}")
    state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
    print(f"[pretrain] {state}")

    backbone = args.output / "backbone.safetensors"
    if not backbone.is_file():
        count = export_backbone(pretrain.folder / "checkpoints" / "best.ckpt", backbone)
        print(f"[backbone] {count} tensors -> {backbone}")

    failed = 0
    for cell in finetune:
        record = run_cell(cell, args.mode)
        state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
        if record["returncode"] != 0:
            failed += 1
            state = f"FAILED, see {cell.folder / 'lorae.log'}"
        print(f"[finetune] {cell.info['method']} seed {cell.info['seed']}: {state}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
