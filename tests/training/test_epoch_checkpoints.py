"""Every checkpoint callback that promises a resumable `last.ckpt` writes it after every epoch,
not only when training ends (Lightning 2.6 writes `save_last` only beside a top-k save, so
`save_top_k: 0, save_last: true` left nothing to resume from until the run was over)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from experiments.runner import final_checkpoint_callbacks

ROOT = Path(__file__).resolve().parents[2]


def unmonitored_checkpoints() -> list[tuple[str, dict[str, Any]]]:
    """(where, init_args) of every ModelCheckpoint without a monitor that a recipe or the
    experiment runner configures: each keeps the final epoch and is what a run resumes from."""
    found = [("experiments.runner.final_checkpoint_callbacks", final_checkpoint_callbacks()[0])]
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        for callback in (config.get("trainer") or {}).get("callbacks") or []:
            args = callback.get("init_args") or {}
            if callback["class_path"].endswith("ModelCheckpoint") and not args.get("monitor"):
                found.append((path.relative_to(ROOT).as_posix(), callback))
    return [(where, dict(callback.get("init_args") or {})) for where, callback in found]


class LastCheckpointProbe(Callback):
    """Records, at the start of each epoch after the first, the epoch stored in last.ckpt."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[int | None] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            return
        path = self.folder / "last.ckpt"
        stored = torch.load(path, weights_only=False)["epoch"] if path.is_file() else None
        self.seen.append(stored)


@pytest.mark.parametrize(("where", "init_args"), unmonitored_checkpoints())
def test_last_checkpoint_is_written_after_every_epoch(
    tmp_path: Path, where: str, init_args: dict[str, Any]
) -> None:
    folder = tmp_path / "checkpoints"
    probe = LastCheckpointProbe(folder)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[ModelCheckpoint(**{**init_args, "dirpath": str(folder)}), probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    assert probe.seen == [0, 1], f"{where}: last.ckpt held epochs {probe.seen} at epochs 1, 2"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], where  # one file only
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 2
