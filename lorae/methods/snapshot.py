"""Snapshot Ensemble (Huang et al. 2017) of a fully fine-tuned network (paper appendix U).

The paper, appendix U: "Snapshot Ensemble [...] in its pure form, consists of training a
single model with cycling learning and taking snapshots every few epochs. [...] Therefore,
Snapshot Ensemble was modified slightly, by first letting training run for a number of epochs,
without any cycling of the learning rate. After this burn-in period the learning rate is at 0
and a first snapshot is taken. The remaining number of epochs is split evenly. If the remaining
number of epochs is not divisible by the desired number of ensemble members, the burn-in period
is extended until it is. For the HAM10000 dataset training is left at 65 epochs, with 20
burn-in epochs. For CIFAR-10 and CIFAR-100 [...] training is extended to 30 epochs with a
burn-in period of 15 epochs."

What is snapshotted: the fully fine-tuned network (all backbone weights and the head), the
network of the paper's "Single Network" baseline. The paper's Tab. 1 Snapshot row sits with
full fine-tuning, not with LoRA, and its reference code snapshots the full ViT. Each snapshot
is a complete copy of the network's weights, so M snapshots hold M backbones (for ViT-B/32 and
M = 16 about 5.6 GB in float32, in memory and in every checkpoint): that cost is the method's
nature, the price of "train 1, get M". ``lora: {...}`` instead snapshots a one-member LoRA
network (only its adapters and head are trained and copied): lorae's own extension, not a
baseline of the paper.

Schedule: ``burn_in`` epochs of ordinary training (warm-up, then cosine decay to zero), then
the remaining epochs split into ``M - 1`` equal cosine cycles that each restart at the base
learning rate and anneal to zero; the burn-in is extended by whole epochs until the remaining
epochs divide evenly. A snapshot is taken at the end of the burn-in and at the end of every
cycle: M snapshots. (Appendix U's numbers confirm M - 1 cycles: 65 epochs, 20 burn-in and
M = 16 leave 45 = 15 x 3 epochs, no extension; with M cycles 45 would not divide.)

The method hands this schedule to the module through :meth:`SnapshotEnsemble.lr_schedule`
(the module's ``lr_decay`` is then unused); the :class:`SnapshotTaker` callback (returned by
:meth:`SnapshotEnsemble.callbacks`) takes the snapshots after the last optimizer step of each
phase (before that epoch's validation, so ``ModelCheckpoint`` saves them). The snapshots are
buffers of the method, so they are part of every checkpoint; on resume Lightning restores the
schedule's position with the optimizer state.

Checkpoint selection is the final epoch: an ensemble exists only once all M snapshots are
taken, so evaluating (test, predict, validate outside ``fit``, or a plain forward in eval mode)
with fewer than M snapshots raises :class:`~lorae.errors.ConfigError`; the shipped configs keep
``ModelCheckpoint`` without a monitor (the last epoch's checkpoint is the one tested). Only the
validation that monitors training inside ``fit`` runs before that, with the missing members
taken as the current weights. ``fast_dev_run`` (one step, nothing to cycle, no checkpoint)
fills all M snapshots with the weights after its one step, so the smoke run can be tested.
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
from lorae.methods.base import EnsembleMethod
from lorae.methods.lora_ensemble import LoRAEnsemble
from lorae.methods.registry import register_method
from lorae.methods.single import SingleNetwork
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
    (the schedule itself comes from :meth:`SnapshotEnsemble.lr_schedule`), and marks the one
    evaluation that may run before all M exist: validation inside ``fit``."""

    def __init__(self, method: SnapshotEnsemble) -> None:
        self.method = method
        self.snapshot_steps: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            return  # one step: nothing to cycle (see on_train_end)
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            while int(self.method.num_snapshots) < self.method.num_members:
                self.method.take_snapshot()  # a smoke run: M copies of the one-step weights

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.monitoring = trainer.state.fn == "fit"

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.monitoring = False


@register_method("snapshot_ensemble")
class SnapshotEnsemble(EnsembleMethod):
    """Members are M snapshots of one network taken along a cyclic learning-rate schedule
    (paper appendix U; module docstring): by default the fully fine-tuned network of the
    "Single Network" baseline (:class:`~lorae.methods.SingleNetwork`); with ``lora`` a
    one-member LoRA network (:class:`~lorae.methods.LoRAEnsemble`), lorae's extension.

    At evaluation member i is the network with snapshot i's weights
    (``torch.func.functional_call``, one pass per member: the members are different
    backbones). Evaluation needs all M snapshots (module docstring).

    Args:
        num_classes: C (linked from the data module by the CLI).
        backbone: a registered backbone name.
        num_members: M, the number of snapshots.
        burn_in_epochs: minimal burn-in (paper: 15 of 30 epochs for CIFAR, 20 of 65 for
            HAM10000); extended until the remaining epochs divide into M - 1 cycles.
        lora: ``None`` (default, the paper's baseline): snapshot the fully fine-tuned network;
            a :class:`~lorae.lora.LoRASpec`: snapshot a LoRA network's adapters and head
            (lorae's extension).
        pretrained: ``True`` (download), ``False`` (random) or a local weights path.
        backbone_overrides: architecture arguments for the backbone constructor.

    Raises:
        ConfigError: evaluation with fewer than M snapshots (outside ``fit``'s validation).

    Shape:
        inputs ``(B, ...)`` -> logits ``(1, B, C)`` in training, ``(M, B, C)`` in evaluation
    """

    num_snapshots: Tensor
    network: SingleNetwork | LoRAEnsemble

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        num_members: int = 16,
        burn_in_epochs: int = 1,
        lora: LoRASpec | None = None,
        pretrained: Pretrained = True,
        backbone_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ConfigError(f"num_members must be >= 1, got {num_members}.")
        if burn_in_epochs < 1:
            raise ConfigError(f"burn_in_epochs must be >= 1, got {burn_in_epochs}.")
        self.num_classes = num_classes
        self.num_members = num_members
        self.burn_in_epochs = burn_in_epochs
        self.monitoring = False  # set by SnapshotTaker while fit's validation runs
        if lora is None:
            self.network = SingleNetwork(num_classes, backbone, pretrained, backbone_overrides)
        else:
            self.network = LoRAEnsemble(
                num_classes,
                backbone,
                num_members=1,
                lora=lora,
                pretrained=pretrained,
                backbone_overrides=backbone_overrides,
            )
        self.snapshots = nn.Module()
        for name, param in self._trainable().items():
            self.snapshots.register_buffer(
                _key(name), param.detach().new_zeros((num_members, *param.shape))
            )
        self.register_buffer("num_snapshots", torch.zeros((), dtype=torch.long))

    def _trainable(self) -> dict[str, nn.Parameter]:
        """The snapshotted state: every trainable tensor of the network (all its weights for
        full fine-tuning; adapters and head for the LoRA extension)."""
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
            self.snapshots.get_buffer(_key(name))[index].copy_(param)
        self.num_snapshots += 1

    def forward(self, x: Inputs) -> Tensor:
        if self.training:
            return self.network(x)  # (1, B, C)
        taken, m = int(self.num_snapshots), self.num_members
        if taken < m and not self.monitoring:
            raise ConfigError(
                f"This Snapshot Ensemble holds {taken} of its {m} snapshots: an ensemble exists "
                "only after the last cycle. Evaluate the final checkpoint of a completed run "
                "(last.ckpt; checkpoint selection for this method is the final epoch)."
            )
        members = []
        for i in range(m):
            if i < taken:
                weights = {n: self.snapshots.get_buffer(_key(n))[i] for n in self._trainable()}
                members.append(functional_call(self.network, weights, (x,)))
            else:  # validation inside fit, before the last snapshot: the current weights
                members.append(self.network(x))
        return torch.cat(members)  # (M, B, C)

    def identity(self) -> dict[str, Any]:
        network = self.network.identity()
        shared: dict[str, Any] = {
            k: network[k] for k in ("backbone", "backbone_overrides") if k in network
        }
        return {**super().identity(), **shared, "rank": network.get("rank")}


def _key(name: str) -> str:
    return name.replace(".", "__")
