"""Snapshot Ensemble (paper appendix U): a fully fine-tuned network (the baseline) or a LoRA
network (the extension); schedule, snapshots, evaluation, the M-snapshot guard."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

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


Network = Literal["full", "lora"]


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


def _method(num_members: int, burn_in: int, network: Network = "full") -> SnapshotEnsemble:
    name, overrides = TINY_BACKBONES["timm_vit"]
    return SnapshotEnsemble(
        C,
        name,
        num_members=num_members,
        burn_in_epochs=burn_in,
        lora=LoRASpec(rank=2, gain=1.0) if network == "lora" else None,
        pretrained=False,
        backbone_overrides=overrides,
    )


def _fit(
    epochs: int, members: int, burn_in: int, warmup: int, network: Network = "full"
) -> tuple[EnsembleClassifier, Recorder]:
    torch.manual_seed(0)
    module = EnsembleClassifier(
        lambda c: _method(members, burn_in, network),
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
    ("epochs", "members", "burn_in", "warmup", "network"),
    [(4, 3, 1, 0, "full"), (5, 3, 1, 2, "full"), (6, 4, 2, 1, "lora"), (3, 3, 1, 0, "lora")],
)
def test_schedule_and_snapshots_follow_appendix_u(
    epochs: int, members: int, burn_in: int, warmup: int, network: Network
) -> None:
    module, recorder = _fit(epochs, members, burn_in, warmup, network)
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
            torch.testing.assert_close(snap, value, rtol=0, atol=0)


def test_appendix_u_settings_give_m_snapshots_without_extension() -> None:
    """HAM10000 65 epochs / 20 burn-in and CIFAR 30 / 15 with M = 16: burn-in, then M - 1
    cycles (3 and 1 epochs), M snapshots, the burn-in not extended."""
    ham = snapshot_epochs(65, 16, 20)
    assert ham[0] == 20 and ham == list(range(20, 66, 3)) and len(ham) == 16
    cifar = snapshot_epochs(30, 16, 15)
    assert cifar == list(range(15, 31)) and len(cifar) == 16


def test_the_default_snapshots_the_fully_fine_tuned_network() -> None:
    """Appendix U / Tab. 1: the snapshotted network is the Single Network baseline's, every
    backbone weight trained and copied; the LoRA network is the opt-in extension."""
    full, lora = _method(3, 1), _method(3, 1, "lora")
    assert isinstance(full.network, SingleNetwork)
    every = dict(full.network.named_parameters())
    assert all(p.requires_grad for p in every.values())
    assert set(full._trainable()) == set(every)
    assert any(n.startswith("backbone.model.blocks.0.attn") for n in full._trainable())
    for name, param in every.items():  # M copies of every weight
        assert full.snapshots.get_buffer(name.replace(".", "__")).shape == (3, *param.shape)
    assert all(n.endswith((".A", ".B")) or n.startswith("head.") for n in lora._trainable())
    assert full.identity()["rank"] is None and lora.identity()["rank"] == 2


@pytest.mark.parametrize("network", ["full", "lora"])
def test_evaluation_runs_the_snapshots_and_survives_a_state_dict_round_trip(
    network: Network,
) -> None:
    module, _ = _fit(4, 3, 1, 0, network)
    method = module.method.eval()
    assert isinstance(method, SnapshotEnsemble)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = method(x)
        assert logits.shape == (3, 2, C)
        for i in range(3):
            # Member i equals the network with snapshot i loaded.
            torch.manual_seed(0)  # the frozen backbone of the fitted one (LoRA extension)
            single = _method(3, 1, network).eval()
            for name, param in single._trainable().items():
                param.copy_(method.snapshots.get_buffer(name.replace(".", "__"))[i])
            torch.testing.assert_close(logits[i], single.network(x)[0])
        assert not torch.allclose(logits[0], logits[1])
        torch.manual_seed(0)
        fresh = _method(3, 1, network).eval()
        fresh.load_state_dict(method.state_dict())
        torch.testing.assert_close(fresh(x), logits)


def test_evaluating_fewer_than_m_snapshots_is_an_error() -> None:
    """Checkpoint selection is the final epoch: no evaluation of a partial ensemble."""
    torch.manual_seed(0)
    method = _method(3, 1).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        current = method.network(x)[0]
        method.take_snapshot()
        with pytest.raises(ConfigError, match="holds 1 of its 3 snapshots"):
            method(x)
        for p in method._trainable().values():
            p.add_(0.5)
        method.monitoring = True  # fit's validation: missing members are the current weights
        logits = method(x)
    torch.testing.assert_close(logits[0], current)
    torch.testing.assert_close(logits[1], logits[2])
    torch.testing.assert_close(logits[1], method.network(x)[0])
    assert repeat_members(x, 3).shape[0] == 6


def test_trainer_test_of_a_partial_ensemble_fails() -> None:
    """A checkpoint saved mid-run (fewer than M snapshots) can be neither tested nor
    validated; validation inside fit (monitoring) runs on the partial ensemble."""
    torch.manual_seed(0)
    module, _ = _fit(4, 3, 1, 0)
    method = module.method
    assert isinstance(method, SnapshotEnsemble)
    method.num_snapshots.fill_(2)  # as in a checkpoint saved during the last cycle
    data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.arange(4) % C), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    for run in (trainer.test, trainer.validate):
        with pytest.raises(ConfigError, match="holds 2 of its 3 snapshots"):
            run(module, data)
    assert not method.monitoring


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
