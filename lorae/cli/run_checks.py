"""Checks of a run's files before it starts, so that a wrong path is an error naming it
instead of a silently different run (paper-independent plumbing of the ``lorae`` command).

- :func:`checkpoint_to_evaluate`: ``lorae validate | test | predict --ckpt_path last|best``
  must name a checkpoint: one that names none is an error saying where lorae looked (Lightning
  would warn once and evaluate the untrained model).
- :class:`FreshConfigFile`: the resolved config is saved next to the run's logs without ever
  replacing an earlier run's ``config.yaml`` in the same folder (LightningCLI's own callback
  stops the run instead).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["FreshConfigFile", "checkpoint_to_evaluate", "free_name"]


def checkpoint_to_evaluate(trainer: pl.Trainer, ckpt_path: str | None, subcommand: str) -> None:
    """Check that ``--ckpt_path`` of an evaluating subcommand names a checkpoint.

    Args:
        trainer: the run's trainer (its ``ModelCheckpoint`` folders are where ``last`` is).
        ckpt_path: the ``--ckpt_path`` value (``None``: evaluate the model as built).
        subcommand: ``validate``, ``test`` or ``predict``, for the message.

    Raises:
        DataNotFoundError: ``last`` finds no checkpoint.
        ConfigError: ``best``, which only a fit in the same run can name.
    """
    if ckpt_path is None:
        return
    if ckpt_path == "best":
        raise ConfigError(
            f"`lorae {subcommand} --ckpt_path best` names the best checkpoint of a fit in the "
            "same run, and this run has not fitted: give the checkpoint's path instead, e.g. "
            "runs/<name>/version_N/checkpoints/best.ckpt."
        )
    if ckpt_path == "last":
        folders = [
            Path(c.dirpath)
            for c in trainer.checkpoint_callbacks
            if isinstance(c, ModelCheckpoint) and c.dirpath
        ]
        pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
        if not any(any(folder.glob(pattern)) for folder in folders):
            where = ", ".join(f"'{f}'" for f in folders) or "no folder (no ModelCheckpoint dirpath)"
            raise DataNotFoundError(
                f"`lorae {subcommand} --ckpt_path last` found no {pattern} checkpoint: looked in "
                f"{where}. A new run writes into a new folder, so give the checkpoint's path, "
                "e.g. runs/<name>/version_N/checkpoints/last.ckpt."
            )
    # A path that names no file was refused when the command line was parsed (LoraeCLI),
    # before anything was built or written.


def free_name(folder: Path, name: str) -> str:
    """``name``, or ``<stem>_<k><suffix>`` with the smallest k >= 1 that names no file in
    ``folder``."""
    candidate, k = name, 0
    stem, suffix = Path(name).stem, Path(name).suffix
    while (folder / candidate).exists():
        k += 1
        candidate = f"{stem}_{k}{suffix}"
    return candidate


class FreshConfigFile(SaveConfigCallback):
    """LightningCLI's config saving that never replaces a file it did not write.

    A second run into the same log folder (a fixed logger version, ``logger: false``, or a run
    that failed after writing its config) saves ``config_1.yaml``, ``config_2.yaml`` ...
    instead of stopping with "expected config.yaml to NOT exist". A resumed fit
    (``overwrite=True``) writes ``config.yaml`` again, as before.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP
            name = free_name(log_dir, "config.yaml") if trainer.is_global_zero else ""
            name = trainer.strategy.broadcast(name)
            if name != self.config_filename:
                rank_zero_info(
                    f"{log_dir / self.config_filename} belongs to an earlier run; this run's "
                    f"config is saved as {log_dir / name}."
                )
            self.config_filename = name
        super().setup(trainer, pl_module, stage)
