"""Snapshot Ensemble (paper appendix U): schedule, snapshots, evaluation, checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lorae.errors import ConfigError
from lorae.lora import LoRASpec
from lorae.methods import (
    SingleNetwork,
    SnapshotEnsemble,
    repeat_members,
    snapshot_epochs,
    snapshot_schedule,
)
from lorae.module import EnsembleClassifier
from lorae.optim import LRLambda, TrainingSteps
from tests.fixtures.models import TINY_BACKBONES

C = 3
BATCHES_PER_EPOCH = 3
BASE_LR = 0.1


def expected_lr(step: int, epochs: int, members: int, burn_in: int, warmup: int) -> float:
    """Appendix U written out: burn-in (extended until the rest splits into M - 1 equal
    cycles) = warm-up + cosine to 0; then cosine cycles restarting at the base rate."""
    while (epochs - burn_in) % (members - 1):
        burn_in += 1
    burn_steps = burn_in * BATCHES_PER_EPOCH
    cycle = (epochs - burn_in) // (members - 1) * BATCHES_PER_EPOCH
    if step < burn_steps:
        if step < warmup:
            return BASE_LR * (step + 1) / (warmup + 1)
        return BASE_LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (burn_steps - warmup)))
    t = (step - burn_steps) % cycle
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * t / cycle))


class Recorder(pl.Callback):
    """Learning rate used at every step and the trainable state after chosen steps."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        method = pl_module.method  # type: ignore[union-attr]
        self.states[trainer.global_step] = {
            n: p.detach().clone() for n, p in method._trainable().items()
        }


def _method(num_members: int, burn_in: int) -> SnapshotEnsemble:
    name, overrides = TINY_BACKBONES["timm_vit"]
    return SnapshotEnsemble(
        C,
        name,
        num_members=num_members,
        burn_in_epochs=burn_in,
        lora=LoRASpec(rank=2, gain=1.0),
        pretrained=False,
        backbone_overrides=overrides,
    )


def _fit(
    epochs: int, members: int, burn_in: int, warmup: int
) -> tuple[EnsembleClassifier, Recorder]:
    torch.manual_seed(0)
    module = EnsembleClassifier(
        lambda c: _method(members, burn_in),
        C,
        optimizer=lambda params: torch.optim.SGD(params, lr=BASE_LR),
        warmup_steps=warmup,
    )
    data = TensorDataset(torch.randn(BATCHES_PER_EPOCH * 2, 3, 16, 16), torch.arange(6) % C)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    return module, recorder


@pytest.mark.parametrize(
    ("epochs", "members", "burn_in", "warmup"),
    [(4, 3, 1, 0), (5, 3, 1, 2), (6, 4, 2, 1), (3, 3, 1, 0)],
)
def test_schedule_and_snapshots_follow_appendix_u(
    epochs: int, members: int, burn_in: int, warmup: int
) -> None:
    module, recorder = _fit(epochs, members, burn_in, warmup)
    steps = epochs * BATCHES_PER_EPOCH
    expected = [expected_lr(s, epochs, members, burn_in, warmup) for s in range(steps)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    method = module.method
    assert isinstance(method, SnapshotEnsemble)
    assert int(method.num_snapshots) == members
    # Snapshot i is the state after the last step of the burn-in / of cycle i.
    boundaries = snapshot_epochs(epochs, members, burn_in)
    assert boundaries[-1] == epochs and len(boundaries) == members
    for i, epoch in enumerate(boundaries):
        state = recorder.states[epoch * BATCHES_PER_EPOCH]
        for name, value in state.items():
            snap = method.snapshots.get_buffer(name.replace(".", "__"))[i]
            torch.testing.assert_close(snap, value[0], rtol=0, atol=0)


def test_evaluation_runs_the_snapshots_and_survives_a_state_dict_round_trip() -> None:
    module, _ = _fit(4, 3, 1, 0)
    method = module.method.eval()
    assert isinstance(method, SnapshotEnsemble)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = method(x)
        for i in range(3):
            # Member i equals the one-member network with snapshot i loaded.
            torch.manual_seed(0)  # the frozen backbone of the fitted one
            single = _method(3, 1).eval()
            with torch.no_grad():
                for name, param in single._trainable().items():
                    param.copy_(method.snapshots.get_buffer(name.replace(".", "__"))[i : i + 1])
            torch.testing.assert_close(logits[i], single.network(x)[0])
        assert not torch.allclose(logits[0], logits[1])
        torch.manual_seed(0)
        fresh = _method(3, 1).eval()
        fresh.load_state_dict(method.state_dict())
        torch.testing.assert_close(fresh(x), logits)


def test_before_all_snapshots_missing_members_are_the_current_weights() -> None:
    torch.manual_seed(0)
    method = _method(3, 1).eval()
    x = torch.randn(2, 3, 16, 16)
    # Three members in one batch versus the one-member network: equal up to float rounding,
    # which the large weights below (+0.5 everywhere) amplify to about 1e-4.
    close = {"rtol": 1e-4, "atol": 2e-4}
    with torch.no_grad():
        current = method.network(x)[0]
        method.take_snapshot()
        for p in method._trainable().values():
            p.add_(0.5)
        logits = method(x)
    torch.testing.assert_close(logits[0], current, **close)
    torch.testing.assert_close(logits[1], logits[2])
    torch.testing.assert_close(logits[1], method.network(x)[0], **close)
    assert repeat_members(x, 3).shape[0] == 6


def test_snapshot_plan_errors_and_single_member() -> None:
    assert snapshot_epochs(16, 16, 1) == list(range(1, 17))
    assert snapshot_epochs(5, 1, 1) == [5]
    with pytest.raises(ConfigError, match="max_epochs"):
        snapshot_epochs(3, 4, 1)


def test_the_cyclic_schedule_is_the_methods_lr_schedule_hook() -> None:
    method = _method(3, 1)
    steps = TrainingSteps(total_steps=12, steps_per_epoch=3, max_epochs=4, warmup_steps=2)
    schedule = method.lr_schedule(steps)
    assert schedule is not None
    expected = snapshot_schedule(snapshot_epochs(4, 3, 1), 3, 2)
    assert [schedule(s) for s in range(12)] == [expected(s) for s in range(12)]
    # Burn-in extended to 2 epochs (6 steps), then cycles of 3 steps restarting at the base rate.
    assert schedule(6) == 1.0 and schedule(9) == 1.0 and schedule(5) < 0.2
    assert method.lr_schedule(replace(steps, fast_dev_run=True)) is None  # the module's own
    with pytest.raises(ConfigError, match="max_epochs"):
        method.lr_schedule(replace(steps, max_epochs=None))


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class _QuarterRate(SingleNetwork):
    """A method with a schedule of its own: a constant quarter of the base rate."""

    def lr_schedule(self, steps: TrainingSteps) -> LRLambda | None:
        return lambda step: 0.25


def test_configure_optimizers_uses_the_method_schedule_else_its_own() -> None:
    name, overrides = TINY_BACKBONES["timm_vit"]
    data = TensorDataset(torch.randn(6, 3, 16, 16), torch.arange(6) % C)
    for method_class, warmup, expected in [(_QuarterRate, 2, 0.25), (SingleNetwork, 0, 1.0)]:
        module = EnsembleClassifier(
            lambda c, cls=method_class: cls(c, name, False, overrides),
            C,
            optimizer=lambda params: torch.optim.SGD(params, lr=BASE_LR),
            lr_decay="constant",
            warmup_steps=warmup,
        )
        recorder = _LearningRates()
        pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[recorder],
        ).fit(module, DataLoader(data, batch_size=2))
        assert recorder.lrs == pytest.approx([expected * BASE_LR] * 3)
