"""Exact resume: what Lightning's checkpoints lack for a mid-epoch restart.

:class:`RandomStateCheckpoint` stores the global random states of torch, numpy and Python;
:class:`LoaderPositionRestore` the position of a :class:`~lorae.data.robust.ResumableDataLoader`.
"""

from __future__ import annotations

import random
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lorae.data.robust import ResumableDataLoader

__all__ = ["LoaderPositionRestore", "RandomStateCheckpoint"]


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
