""":class:`WeightTrajectory`: record the members' weights every k epochs (paper appendix D,
Fig. 15), for ``lorae analyze``'s t-SNE of the training trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import Tensor

from lorae.analysis.trajectory import (
    TRAJECTORY_FILE,
    feature_indices,
    load_trajectory,
    member_updates,
)
from lorae.checkpoints.atomic import atomic_path
from lorae.errors import ConfigError

__all__ = ["WeightTrajectory"]


class _MemberWeights(Protocol):
    def member_weights(self) -> dict[str, tuple[Tensor, Tensor]]: ...


@runtime_checkable
class _WithMethod(Protocol):
    @property
    def method(self) -> _MemberWeights: ...


class WeightTrajectory(pl.Callback):
    """Keep every member's flattened update ``W_i - W0`` of one projection kind, in every
    block, before training and every ``every_n_epochs`` epochs, in
    ``<run folder>/weight_trajectory.pt`` (:mod:`lorae.analysis.trajectory`).

    Method-independent: it reads :meth:`lorae.methods.EnsembleMethod.member_weights`, so it
    records LoRA-Ensemble, Explicit Ensemble and BatchEnsemble alike (a method without member
    weights is a ``ConfigError`` at the start of training). The file is rewritten atomically
    at each snapshot; a resumed run continues the file it finds. Enable it from the command
    line or a config::

        lorae fit --config ... --trainer.callbacks+=lorae.evaluation.WeightTrajectory \\
            --trainer.callbacks.every_n_epochs=5

    Args:
        every_n_epochs: the snapshot interval (paper: 5).
        projection: which projections (paper section 4: the value projections).
        max_features: coordinates kept per layer and member (a fixed seeded subset beyond).
        seed: the seed of that subset.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        projection: Literal["q", "k", "v", "o"] = "v",
        max_features: int = 8192,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if max_features < 1:
            raise ConfigError(f"max_features must be >= 1, got {max_features}.")
        self.every_n_epochs = every_n_epochs
        self.projection = projection
        self.max_features = max_features
        self.seed = seed
        self.epochs: list[int] = []
        self.snapshots: dict[str, list[Tensor]] = {}
        self.indices: dict[str, Tensor | None] = {}
        self.num_members = 0

    def _weights(self, pl_module: pl.LightningModule) -> dict[str, tuple[Tensor, Tensor]]:
        if not isinstance(pl_module, _WithMethod):
            raise ConfigError(
                f"WeightTrajectory reads the method of lorae's EnsembleClassifier; got "
                f"{type(pl_module).__name__}."
            )
        with torch.no_grad():
            return pl_module.method.member_weights()

    def path(self, trainer: pl.Trainer) -> Path:
        """Where the file goes: the run folder (``trainer.log_dir``, as ``metrics.json``)."""
        return Path(trainer.log_dir or trainer.default_root_dir) / TRAJECTORY_FILE

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = self._weights(pl_module)  # a ConfigError for methods without member weights
        path = self.path(trainer)
        self.epochs, self.snapshots = [], {}
        if trainer.current_epoch > 0 and path.is_file():  # resumed: continue the file
            saved = load_trajectory(path)
            kept = [i for i, e in enumerate(saved["epochs"]) if e <= trainer.current_epoch]
            self.epochs = [saved["epochs"][i] for i in kept]
            self.indices = dict(saved["indices"])
            self.snapshots = {k: [v[i] for i in kept] for k, v in saved["snapshots"].items()}
            self.num_members = int(saved["num_members"])
            return
        self.indices = {
            key: feature_indices(members[0].numel(), self.max_features, self.seed)
            for key, (_, members) in weights.items()
            if key.rsplit(".", 1)[-1] == self.projection
        }
        self._snapshot(trainer, weights, 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed
        if epoch % self.every_n_epochs == 0 and epoch not in self.epochs:
            self._snapshot(trainer, self._weights(pl_module), epoch)

    def _snapshot(
        self, trainer: pl.Trainer, weights: dict[str, tuple[Tensor, Tensor]], epoch: int
    ) -> None:
        try:
            updates = member_updates(weights, self.projection, self.indices)
        except ValueError as error:
            raise ConfigError(f"WeightTrajectory: {error}") from error
        self.epochs.append(epoch)
        for key, value in updates.items():
            self.snapshots.setdefault(key, []).append(value)
            self.num_members = int(value.shape[0])
        path = self.path(trainer)  # log_dir is collective under DDP: every rank asks
        if trainer.is_global_zero:
            self.save(path)

    def payload(self) -> dict[str, Any]:
        """The file's content (see :func:`lorae.analysis.trajectory.load_trajectory`)."""
        return {
            "projection": self.projection,
            "epochs": list(self.epochs),
            "num_members": self.num_members,
            "snapshots": {k: torch.stack(v) for k, v in self.snapshots.items()},
            "indices": dict(self.indices),
        }

    def save(self, path: Path) -> None:
        """Write :meth:`payload` atomically to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.payload(), tmp)
