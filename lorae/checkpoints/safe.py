"""Checkpoints that survive crashes and load as data only.

Lightning writes checkpoints through a :class:`~lightning.fabric.plugins.CheckpointIO` plugin;
:class:`SafeCheckpointIO` is lorae's: it writes each file to a temporary name beside the target
and renames it into place (``os.replace`` is atomic on POSIX file systems), so a run killed
while writing ``last.ckpt`` leaves the previous ``last.ckpt`` intact; and it reads with
``torch.load(weights_only=True)``, so a checkpoint from elsewhere is treated as data and never
runs code while it is unpickled.

Exact resume (random states, loader position) is :mod:`lorae.training.resume`'s.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lorae.checkpoints.atomic import atomic_path
from lorae.errors import CheckpointReadError, DataNotFoundError, UnsafeCheckpointError

__all__ = [
    "CheckpointReadError",
    "SafeCheckpointIO",
    "UnsafeCheckpointError",
    "load_checkpoint_safely",
]


def load_checkpoint_safely(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error for unsafe or broken files.

    Only tensors, numbers, strings and containers of them load; a pickle that names any other
    Python callable (``os.system``, a class ...) is refused before anything is executed.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary unpickling.
        CheckpointReadError: the file is truncated or not a checkpoint.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = " ".join(str(error).split())
        # Keep only torch's sentence naming the refused global ("... GLOBAL posix.system ...");
        # the rest is advice on disabling the check, which lorae deliberately never gives.
        sentences = [s for s in reason.split(". ") if "GLOBAL" in s or "global" in s]
        refused = sentences[0].rstrip(".") if sentences else reason[:200]
        raise UnsafeCheckpointError(
            f"Refusing to load '{path}': it is not a plain-data checkpoint. lorae loads "
            f"checkpoints with torch.load(weights_only=True), and this file holds Python "
            f"objects that would run code when unpickled ({refused[:300]}). Only load "
            "checkpoints written by lorae or Lightning from a source you trust; lorae never "
            "disables this check."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CheckpointReadError(
            f"Cannot read checkpoint '{path}': {type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}. The file is truncated or not a PyTorch "
            "checkpoint; resume from an earlier one (e.g. --ckpt_path last)."
        ) from error


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and data-only loading.

    Writes go to ``.<name>.partial-<pid>`` in the target folder, are flushed to disk, then
    renamed over the target. The temporary name never matches Lightning's ``last*.ckpt``
    pattern, so ``--ckpt_path last`` cannot pick up a half-written file.
    """

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | Path,
        storage_options: Any | None = None,
    ) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or fs.protocol not in ("file", ("file", "local")):
            # Remote storage (s3://, gs:// ...) has its own atomicity; leave it to Lightning.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as partial, partial.open("wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` whatever the caller asked for.

        Raises:
            DataNotFoundError: ``path`` does not exist (a ``FileNotFoundError``).
            UnsafeCheckpointError: the file needs arbitrary unpickling.
        """
        if not get_filesystem(path).exists(path):
            raise DataNotFoundError(
                f"Checkpoint '{path}' does not exist: give --ckpt_path the path of a .ckpt file "
                "written by `lorae fit` (to resume, `--ckpt_path last` finds the newest one)."
            )
        loaded = load_checkpoint_safely(path, map_location)
        if not isinstance(loaded, dict):
            raise CheckpointReadError(
                f"'{path}' holds a {type(loaded).__name__}, not a Lightning checkpoint dict."
            )
        return loaded
