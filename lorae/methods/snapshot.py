"""Snapshot Ensemble (Huang et al. 2017) of a LoRA network (paper appendix U).

Training runs ``burn_in`` epochs of ordinary training (warm-up, then cosine decay to zero),
then the remaining epochs are split into ``M - 1`` equal cosine cycles that each restart at
the base learning rate and anneal to zero. The burn-in is extended by whole epochs until
the remaining epochs divide evenly. A snapshot of the trainable state is taken at the end of
the burn-in and at the end of every cycle: M snapshots, the M members at test time.

The method hands this schedule to the module through :meth:`SnapshotEnsemble.lr_schedule`
(the module's ``lr_decay`` is then unused); the :class:`SnapshotTaker` callback (returned by
:meth:`SnapshotEnsemble.callbacks`) only takes the snapshots, after the last optimizer step of
each phase (before that epoch's validation, so ``ModelCheckpoint`` saves them). The snapshots
are buffers of the method, so they are part of every checkpoint and ``lorae test --ckpt_path``
evaluates the ensemble; on resume Lightning restores the schedule's position with the
optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lorae.backbones.base import Inputs, Pretrained
from lorae.errors import ConfigError
from lorae.lora import LoRASpec
from lorae.methods.base import repeat_members
from lorae.methods.lora_ensemble import DEFAULT_LORA, LoRANetworkMethod
from lorae.methods.registry import register_method
from lorae.optim import LRLambda, TrainingSteps, warmup_decay


def snapshot_epochs(max_epochs: int, num_members: int, burn_in_epochs: int) -> list[int]:
    """Epoch counts after which a snapshot is taken (the end of the burn-in, then each cycle).

    The burn-in is extended until ``max_epochs - burn_in`` divides into ``M - 1`` cycles.

    Raises:
        ConfigError: fewer epochs than members (each cycle needs at least one epoch).
    """
    if num_members < 1 or burn_in_epochs < 1:
        raise ConfigError("Snapshot Ensemble needs num_members >= 1 and burn_in_epochs >= 1.")
    if max_epochs < max(num_members, burn_in_epochs):
        raise ConfigError(
            f"Snapshot Ensemble with {num_members} members and a burn-in of {burn_in_epochs} "
            f"epoch(s) needs trainer.max_epochs >= {max(num_members, burn_in_epochs)}, got "
            f"{max_epochs}: the burn-in and each of the {num_members - 1} cycles take at least "
            "one epoch."
        )
    cycles = num_members - 1
    burn_in = burn_in_epochs
    while cycles and (max_epochs - burn_in) % cycles:
        burn_in += 1
    if cycles == 0:
        return [max_epochs]
    length = (max_epochs - burn_in) // cycles
    return [burn_in + i * length for i in range(num_members)]


def snapshot_schedule(
    boundaries: Sequence[int], steps_per_epoch: int, warmup_steps: int
) -> LRLambda:
    """Learning-rate multiplier per optimizer step (for ``LambdaLR``).

    Burn-in: linear warm-up and cosine decay to 0 over ``boundaries[0]`` epochs (the module's
    schedule); then one cosine cycle from 1 to 0 between consecutive ``boundaries``.
    """
    burn_in_steps = boundaries[0] * steps_per_epoch
    burn_in = warmup_decay(burn_in_steps, warmup_steps, "cosine")
    cycle_steps = (boundaries[1] - boundaries[0]) * steps_per_epoch if len(boundaries) > 1 else 1

    def factor(step: int) -> float:
        if step < burn_in_steps:
            return burn_in(step)
        position = (step - burn_in_steps) % cycle_steps
        return 0.5 * (1.0 + math.cos(math.pi * position / cycle_steps))

    return factor


class SnapshotTaker(pl.Callback):
    """Takes the snapshots of a SnapshotEnsemble at the end of the burn-in and of each cycle
    (the schedule itself comes from :meth:`SnapshotEnsemble.lr_schedule`)."""

    def __init__(self, method: SnapshotEnsemble) -> None:
        self.method = method
        self.snapshot_steps: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            return  # one step: nothing to cycle; the members are the current weights
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        boundaries = self.method.snapshot_epochs(trainer.max_epochs)
        self.snapshot_steps = [epoch * steps_per_epoch for epoch in boundaries]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        taken = int(self.method.num_snapshots)
        if taken < len(self.snapshot_steps) and trainer.global_step == self.snapshot_steps[taken]:
            self.method.take_snapshot()


@register_method("snapshot_ensemble")
class SnapshotEnsemble(LoRANetworkMethod):
    """Members are snapshots of one LoRA network (a one-member :class:`LoRAEnsemble`) taken
    along a cyclic learning-rate schedule (module docstring).

    At evaluation all snapshots run batched, exactly like LoRA-Ensemble members: the stacked
    snapshot factors and heads are passed to the network with ``functional_call``. Before all
    M snapshots exist (validation during training, ``fast_dev_run``), the missing members are
    the current weights.

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M, the number of snapshots.
        burn_in_epochs: minimal burn-in; extended until the remaining epochs divide evenly.
        lora: the LoRA network's options (:class:`~lorae.lora.LoRASpec`).
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Shape:
        inputs ``(B, ...)`` -> logits ``(1, B, C)`` in training, ``(M, B, C)`` in evaluation
    """

    num_snapshots: Tensor

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        burn_in_epochs: int = 1,
        lora: LoRASpec = DEFAULT_LORA,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if burn_in_epochs < 1:
            raise ConfigError(f"burn_in_epochs must be >= 1, got {burn_in_epochs}.")
        super().__init__(num_classes, backbone, num_members, lora, pretrained, backbone_overrides)
        self.burn_in_epochs = burn_in_epochs
        self.snapshots = nn.Module()
        for name, param in self._trainable().items():
            shape = (num_members, *param.shape[1:])
            self.snapshots.register_buffer(_key(name), param.detach().new_zeros(shape))
        self.register_buffer("num_snapshots", torch.zeros((), dtype=torch.long))

    def _trainable(self) -> dict[str, nn.Parameter]:
        """The snapshotted state: every trainable tensor of the network (member axis first)."""
        return {n: p for n, p in self.network.named_parameters() if p.requires_grad}

    def callbacks(self) -> list[pl.Callback]:
        return [SnapshotTaker(self)]

    def snapshot_epochs(self, max_epochs: int | None) -> list[int]:
        """Epochs after which snapshots are taken (:func:`snapshot_epochs`) for a trainer
        with ``max_epochs``.

        Raises:
            ConfigError: no epoch budget, or too few epochs for the members.
        """
        if max_epochs is None or max_epochs < 1:
            raise ConfigError("Snapshot Ensemble needs trainer.max_epochs (its cycles are epochs).")
        return snapshot_epochs(max_epochs, self.num_members, self.burn_in_epochs)

    def lr_schedule(self, steps: TrainingSteps) -> LRLambda | None:
        """The cyclic schedule of appendix U (:func:`snapshot_schedule`), from the module's
        warm-up; ``fast_dev_run`` (one step, nothing to cycle) keeps the module's own."""
        if steps.fast_dev_run:
            return None
        boundaries = self.snapshot_epochs(steps.max_epochs)
        return snapshot_schedule(boundaries, steps.steps_per_epoch, steps.warmup_steps)

    @torch.no_grad()
    def take_snapshot(self) -> None:
        """Store the current trainable state as the next member."""
        index = int(self.num_snapshots)
        if index >= self.num_members:
            raise RuntimeError(f"All {self.num_members} snapshots are already taken.")
        for name, param in self._trainable().items():
            self.snapshots.get_buffer(_key(name))[index].copy_(param[0])
        self.num_snapshots += 1

    def forward(self, x: Inputs) -> Tensor:
        if self.training:
            return self.network(x)  # (1, B, C)
        taken, m = int(self.num_snapshots), self.num_members
        members = {}
        for name, param in self._trainable().items():
            current = param.expand(m - taken, *param.shape[1:])
            members[name] = torch.cat([self.snapshots.get_buffer(_key(name))[:taken], current])
        backbone = {
            n.removeprefix("backbone."): v for n, v in members.items() if n.startswith("backbone.")
        }
        head = {n.removeprefix("head."): v for n, v in members.items() if n.startswith("head.")}
        features = functional_call(self.network.backbone, backbone, (repeat_members(x, m),))
        return functional_call(self.network.head, head, (features,))  # (M, B, C)


def _key(name: str) -> str:
    return name.replace(".", "__")
