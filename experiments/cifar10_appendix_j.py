"""CIFAR-10 in the paper's appendix J setting: a small ViT trained from scratch, then LoRA-Ensemble
on its frozen backbone, compared with a Single Network and an Explicit Ensemble fine-tuned for
the same one epoch (issue 8; no ImageNet weights exist offline).

    python experiments/cifar10_appendix_j.py --data /work/shared/data/cifar10/train.tar.gz \
        --output runs/cifar10_j [--per-class 1000] [--seeds 0 1 2] [--precision bf16-mixed]

Steps (each resumable, like ``experiments/sst2_grid.py``):

1. ``<output>/data/train/<class>/``: ``--per-class`` images of each class drawn from the archive
   with ``--subset-seed`` (``subset.json`` lists them). ``ImageFolderDataModule`` then carves a
   test part (``test_fraction`` 0.2 in the configs) and a validation part (0.1) out of them
   with data seed 0; every run uses that same data seed, so all share one held-out test part.
2. ``<output>/pretrain``: ``configs/cifar10_scratch/pretrain.yaml`` (Single Network, timm
   ViT from random weights) trained for ``--pretrain-epochs`` and tested.
3. ``<output>/backbone.safetensors``: the backbone weights of the pretraining checkpoint, in
   timm's own key layout, so any config loads them as ``pretrained: <file>``.
4. ``<output>/runs/<method>/seed<S>``: each fine-tuning config (``lora_ensemble``,
   ``single_network``, ``explicit_ensemble``) starts from that file and trains one epoch;
   the seed sets ``seed_everything`` (new heads and LoRA matrices, dropout, flips).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python experiments/cifar10_appendix_j.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runner import (
    Cell,
    add_pretrain_finetune_options,
    parse_overrides,
    run_cell,
    set_threads,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar10_scratch"
FINETUNE_METHODS = ["single_network", "lora_ensemble", "explicit_ensemble"]
#: Prefix of the timm model's keys inside a lorae Single Network checkpoint.
BACKBONE_PREFIX = "method.backbone.model."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 train.tar.gz")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=1000, help="images per class")
    parser.add_argument("--subset-seed", type=int, default=0)
    add_pretrain_finetune_options(parser, FINETUNE_METHODS, CONFIGS)
    return parser


def extract_subset(archive: Path, target: Path, per_class: int, seed: int) -> dict[str, int]:
    """Extract ``per_class`` images of every ``train/<class>/`` folder of ``archive`` into
    ``target/train/<class>/``, drawn with ``seed`` from the sorted file names.

    Skipped when ``target/subset.json`` exists (it lists the extracted files).

    Returns:
        Images per class.
    """
    marker = target / "subset.json"
    if marker.is_file():
        return {k: len(v) for k, v in json.loads(marker.read_text())["files"].items()}
    if not archive.is_file():
        raise SystemExit(f"error: '{archive}' does not exist (CIFAR-10 train.tar.gz).")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/")]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for member in members:
            parts = Path(member.name).parts
            if len(parts) == 3:
                by_class.setdefault(parts[1], []).append(member)
        if not by_class:
            raise SystemExit(f"error: '{archive}' has no train/<class>/<image> files.")
        rng = random.Random(seed)
        chosen: dict[str, list[str]] = {}
        for name in sorted(by_class):
            files = sorted(by_class[name], key=lambda m: m.name)
            picked = sorted(rng.sample(files, min(per_class, len(files))), key=lambda m: m.name)
            tar.extractall(target, members=picked, filter="data")
            chosen[name] = [m.name for m in picked]
    record = {"archive": str(archive), "per_class": per_class, "seed": seed, "files": chosen}
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return {k: len(v) for k, v in chosen.items()}


def export_backbone(checkpoint: Path, target: Path) -> int:
    """Write the timm backbone of a lorae Single Network checkpoint as a safetensors file.

    The keys lose the ``method.backbone.model.`` prefix, which leaves timm's own names, so
    ``pretrained: <target>`` of the same backbone (and the same ``backbone_overrides``) loads
    them through timm.

    Returns:
        Number of tensors written.

    Raises:
        ValueError: The checkpoint holds no backbone weights.
    """
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        key.removeprefix(BACKBONE_PREFIX): value.contiguous()
        for key, value in state.items()
        if key.startswith(BACKBONE_PREFIX)
    }
    if not weights:
        raise ValueError(f"'{checkpoint}' has no '{BACKBONE_PREFIX}*' weights.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file(weights, str(tmp))
    tmp.replace(target)
    return len(weights)


def _fit_args(args: argparse.Namespace, config: str, seed: int) -> list[str]:
    path = args.configs / f"{config}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no config '{path}'")
    return [
        "fit",
        "--config",
        str(path),
        f"--seed_everything={seed}",
        f"--data.init_args.root={args.output / 'data'}",
        f"--trainer.precision={args.precision}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
        *parse_overrides(args.override),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run all steps; returns the number of failed runs (0: success)."""
    args = _parser().parse_args(argv)
    set_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    counts = extract_subset(args.data, args.output / "data", args.per_class, args.subset_seed)
    print(f"[data] {sum(counts.values())} images in {len(counts)} classes")

    pretrain_args = _fit_args(args, "pretrain", 0)
    if args.pretrain_epochs is not None:
        pretrain_args.append(f"--trainer.max_epochs={args.pretrain_epochs}")
    pretrain = Cell(args.output / "pretrain", pretrain_args, info={"stage": "pretrain"})
    record = run_cell(pretrain, args.mode)
    if record["returncode"] != 0:
        raise SystemExit(f"error: pretraining failed; see {pretrain.folder / 'lorae.log'}")
    print(f"[pretrain] {'skipped (done)' if record['skipped'] else 'done'}")

    backbone = args.output / "backbone.safetensors"
    if not backbone.is_file():
        count = export_backbone(pretrain.folder / "checkpoints" / "best.ckpt", backbone)
        print(f"[backbone] {count} tensors -> {backbone}")

    failed = 0
    for method in args.methods:
        for seed in args.seeds:
            cell_args = [
                *_fit_args(args, method, seed),
                f"--model.method.init_args.pretrained={backbone}",
            ]
            info = {"stage": "finetune", "method": method, "seed": seed}
            cell = Cell(args.output / "runs" / method / f"seed{seed}", cell_args, info=info)
            record = run_cell(cell, args.mode)
            state = "skipped (done)" if record["skipped"] else f"{record['wall_seconds']:.0f} s"
            if record["returncode"] != 0:
                failed += 1
                state = f"FAILED, see {cell.folder / 'lorae.log'}"
            print(f"[finetune] {method} seed {seed}: {state}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
