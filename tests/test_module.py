"""EnsembleClassifier: loss, optimizer over trainable parameters, schedule, checkpoint checks."""

from __future__ import annotations

import functools
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lorae.errors import CheckpointMismatchError, ConfigError
from lorae.lora import LoRASpec
from lorae.methods import LoRAEnsemble
from lorae.metrics import member_cross_entropy
from lorae.module import MEMBER_CURVES_MAX, EnsembleClassifier
from lorae.optim import ExponentialDecay, warmup_decay
from tests.fixtures.models import TINY_BACKBONES

C = 3


def _module(num_members: int = 2, **kwargs: object) -> EnsembleClassifier:
    name, overrides = TINY_BACKBONES["timm_vit"]
    method = functools.partial(
        LoRAEnsemble,
        backbone=name,
        num_members=num_members,
        lora=LoRASpec(rank=2),
        pretrained=False,
        backbone_overrides=overrides,
    )
    return EnsembleClassifier(method, C, **kwargs)  # type: ignore[arg-type]


def _loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=generator)
    y = torch.randint(0, C, (8,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_warmup_then_cosine() -> None:
    f = warmup_decay(total_steps=110, warmup_steps=10, decay="cosine")
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values)), "decay is monotone"


def test_linear_and_constant_decay_and_short_runs() -> None:
    assert warmup_decay(20, 0, "linear")(10) == pytest.approx(0.5)
    assert warmup_decay(20, 0, "constant")(19) == 1.0
    short = warmup_decay(total_steps=5, warmup_steps=500, decay="cosine")
    assert short(3) == pytest.approx(0.8)
    assert short(4) == pytest.approx(1.0), "warm-up shortened to the run ends at the peak"
    with pytest.raises(ConfigError, match="lr_decay"):
        warmup_decay(10, 0, "step")  # type: ignore[arg-type]


def test_loss_is_mean_member_cross_entropy_with_class_weights() -> None:
    weights = [1.0, 2.0, 0.5]
    module = _module(class_weights=weights).eval()
    x, y = next(iter(_loader()))
    logits = module(x)
    expected = member_cross_entropy(logits, y, torch.tensor(weights))
    per_member = torch.stack(
        [torch.nn.functional.cross_entropy(lg, y, weight=torch.tensor(weights)) for lg in logits]
    ).mean()
    torch.testing.assert_close(expected, per_member)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer here
    torch.testing.assert_close(module.training_step((x, y), 0), expected)


def test_class_weights_length_must_match() -> None:
    with pytest.raises(ConfigError, match="one weight per class"):
        _module(class_weights=[1.0, 2.0])


def test_optimizer_sees_only_trainable_parameters_and_schedule_steps() -> None:
    module = _module(
        optimizer=functools.partial(torch.optim.AdamW, lr=0.01), warmup_steps=2, lr_decay="cosine"
    )
    trainer = pl.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=_loader())
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(trainable) < len(list(module.parameters()))
    # 4 steps of 4: warm-up 2, then cosine to 0 at the last step.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi)))


def test_checkpoint_identity_is_saved_and_checked() -> None:
    module = _module(num_members=2)
    checkpoint: dict[str, object] = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["lorae"] == {
        "method": "LoRAEnsemble",
        "num_members": 2,
        "num_classes": C,
        "backbone": "vit_tiny_patch16_224",
        "backbone_overrides": module.method.backbone_overrides,
        "rank": 2,
    }
    assert checkpoint["lorae"]["backbone_overrides"]  # the tiny test backbone has overrides
    _module(num_members=2).on_load_checkpoint(checkpoint)  # same settings: accepted
    with pytest.raises(CheckpointMismatchError, match="num_members: checkpoint 2, config 3"):
        _module(num_members=3).on_load_checkpoint(checkpoint)


def test_exponential_decay_steps_per_epoch() -> None:
    """gamma ** (completed periods after start_epoch), counted in whole epochs after warm-up."""
    decay = ExponentialDecay(gamma=0.5, every_epochs=2, start_epoch=1)
    f = warmup_decay(total_steps=100, warmup_steps=0, decay=decay, steps_per_epoch=10)
    # epochs 0-2 at the base rate; halved from epoch 3 (= start 1 + every 2), again at 5, 7, 9
    expected = {0: 1.0, 29: 1.0, 30: 0.5, 49: 0.5, 50: 0.25, 99: 0.0625}
    assert {step: f(step) for step in expected} == expected
    with pytest.raises(ConfigError, match="gamma"):
        ExponentialDecay(gamma=1.5)


def test_exponential_decay_counts_epochs_of_the_real_loader() -> None:
    """The module derives steps per epoch from the trainer: x0.5 per epoch over 3 epochs."""
    module = _module(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        warmup_steps=0,
        lr_decay=ExponentialDecay(gamma=0.5),
    )
    seen: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RecordLR()],
    )
    trainer.fit(module, train_dataloaders=_loader())
    assert len(_loader()) > 1, "several steps per epoch, or the test cannot tell steps from epochs"
    assert seen == pytest.approx([0.1, 0.05, 0.025])


@pytest.mark.parametrize("num_members", [2, MEMBER_CURVES_MAX + 1])
def test_validation_logs_one_curve_per_member_up_to_the_cap(num_members: int) -> None:
    """Up to MEMBER_CURVES_MAX members each gets its own ``val/member_acc/<m>``; beyond it
    (Bayes-LoRA's 512 draws) their min, mean and max, from the same member accuracies."""
    module = _module(num_members=num_members)
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=_loader(), verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    members = sorted(k for k in logged if k.startswith("val/member_acc/"))
    x, y = (torch.cat(t) for t in zip(*_loader(), strict=True))
    module.eval()
    with torch.no_grad():
        accuracies = (module(x).argmax(-1) == y).float().mean(dim=1)  # (M,)
    if num_members <= MEMBER_CURVES_MAX:
        assert members == sorted(f"val/member_acc/{m}" for m in range(num_members))
        for m in range(num_members):
            assert logged[f"val/member_acc/{m}"] == pytest.approx(float(accuracies[m]))
    else:
        assert members == ["val/member_acc/max", "val/member_acc/mean", "val/member_acc/min"]
        assert logged["val/member_acc/min"] == pytest.approx(float(accuracies.min()))
        assert logged["val/member_acc/mean"] == pytest.approx(float(accuracies.mean()))
        assert logged["val/member_acc/max"] == pytest.approx(float(accuracies.max()))
    assert {"val/acc", "val/nll", "val/ece"} <= set(logged)
