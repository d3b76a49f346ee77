"""Pre-emption: a SIGTERM writes ``last.ckpt`` before the process exits.

Lightning 2.6 already catches SIGTERM: its signal connector sets ``trainer.received_sigterm``
and, once the running training batch has finished, raises ``SIGTERMException`` (under DDP,
rank 0 broadcasts the flag so every rank stops at the same step). It writes no checkpoint
unless SLURM auto-requeue is on (and then only on SIGUSR1, as ``hpc_ckpt_*.ckpt``).
:class:`SigtermCheckpoint` fills that gap: on that exception it saves ``last.ckpt`` into the
checkpoint folder, where ``lorae fit --ckpt_path last`` finds it. The batch is complete when
the exception is raised, so the checkpoint resumes exactly where training stopped.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["SigtermCheckpoint"]


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """``last.ckpt`` in the folder of the trainer's first ``ModelCheckpoint``.

    That callback records the file as its ``last_model_path`` (saved with its state), so
    after the resume it keeps updating this file instead of starting a ``last-v1.ckpt``.
    Without any checkpoint callback, ``<default_root_dir>/checkpoints/last.ckpt``.
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            path = Path(callback.dirpath) / name
            callback.last_model_path = str(path)
            return path
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class SigtermCheckpoint(Callback):
    """Save ``last.ckpt`` when Lightning stops training because of SIGTERM.

    Args:
        enabled: ``False`` turns the callback off (e.g. when the cluster already requeues
            through Lightning's SLURM ``auto_requeue``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved: Path | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != "fit":
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes (atomically)
        self.saved = path
        rank_zero_info(
            f"Received SIGTERM: saved {path} at step {trainer.global_step}; resume with "
            "`lorae fit ... --ckpt_path last`."
        )
