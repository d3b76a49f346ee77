"""Checkpoints that survive crashes and load as data only.

Lightning writes checkpoints through a :class:`~lightning.fabric.plugins.CheckpointIO` plugin;
:class:`SafeCheckpointIO` is lorae's: it writes each file to a temporary name beside the target
and renames it into place (``os.replace`` is atomic on POSIX file systems), so a run killed
while writing ``last.ckpt`` leaves the previous ``last.ckpt`` intact; and it reads with
``torch.load(weights_only=True)``, so a checkpoint from elsewhere is treated as data and never
runs code while it is unpickled.

:class:`RandomStateCheckpoint` adds what Lightning's checkpoints lack for an exact mid-epoch
resume: the global random states of torch, numpy and Python.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback

from lorae.data.robust import ResumableDataLoader
from lorae.errors import CheckpointReadError, UnsafeCheckpointError

__all__ = [
    "CheckpointReadError",
    "LoaderPositionRestore",
    "RandomStateCheckpoint",
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
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with partial.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` whatever the caller asked for.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            UnsafeCheckpointError: the file needs arbitrary unpickling.
        """
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        loaded = load_checkpoint_safely(path, map_location)
        if not isinstance(loaded, dict):
            raise CheckpointReadError(
                f"'{path}' holds a {type(loaded).__name__}, not a Lightning checkpoint dict."
            )
        return loaded


def _collect_random_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    numpy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached_gauss = numpy_state
    version, python_state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached_gauss),
        ),
        "python": (version, list(python_state), gauss),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class RandomStateCheckpoint(Callback):
    """Saves the global random states in every checkpoint and restores them on resume.

    Lightning restores model, optimizer, scheduler, loop and callback states, but not the
    random number generators, so dropout masks or random augmentations after a resume would
    differ from an uninterrupted run. The states are restored when training (re)starts, after
    Lightning's sanity check, which runs under its own isolated RNG.

    Under DDP the checkpoint holds rank 0's states and every rank restores them; with
    ``seed_everything`` all ranks start from the same seed and draw alike, so this matches
    an uninterrupted run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"random_states": _collect_random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("random_states")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            _restore_random_states(self._pending)
            self._pending = None


class LoaderPositionRestore(Callback):
    """Re-applies the training loader's saved position when Lightning skipped it.

    Lightning saves the state of a resumable training loader (``ResumableDataLoader``) in the
    fit loop's checkpoint entry and applies it when it sets up the training data. But with
    ``max_epochs`` (no ``max_steps``), ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches``, which sets the training data up *before* the
    checkpoint is restored, and the saved position is then never applied: a mid-epoch resume
    would replay the epoch's first batches. This callback reads the saved position from the
    checkpoint and applies it when training starts, before the first batch is drawn.
    """

    def __init__(self) -> None:
        self._states: list[dict[str, Any]] = []

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._states = self._states, []
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        resumable = [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]
        if len(resumable) == len(states):
            for loader, state in zip(resumable, states, strict=True):
                loader.load_state_dict(state)
