"""Pretraining the backbone inside ``lorae fit`` (paper appendix J, issue 17 item 6) and the
one-member-versus-ensemble table: weights trained in place under the LoRA layers, LoRA init
untouched, the weights file loadable as ``pretrained``, a resumed run that does not pretrain
again, and the comparison against lorae's own ensemble metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from lorae.cli import main
from lorae.errors import ConfigError
from lorae.lora import LoRASpec, lora_layers
from lorae.methods import ExplicitEnsemble, LoRAEnsemble
from lorae.metrics import EnsembleMetrics
from lorae.training import PretrainBackbone, PretrainRecord, compare_members, pretrain_backbone
from lorae.training.pretrain import (
    PRETRAIN_RECORD,
    PRETRAIN_WEIGHTS,
    plain_state_dict,
    shared_backbone,
    unwrapped_lora,
)
from tests.fixtures.tiny_configs import (
    checkpoint_callback,
    digits_lora_config,
    tensorboard_logger,
    write_config,
)

OVERRIDES = {
    "img_size": 8,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}


def tiny_ensemble(pretrained: bool | str = False) -> LoRAEnsemble:
    torch.manual_seed(0)
    return LoRAEnsemble(
        3,
        "vit_tiny_patch16_224",
        num_members=2,
        lora=LoRASpec(rank=2),
        pretrained=pretrained,
        backbone_overrides=OVERRIDES,
    )


def separable_data(n: int = 48) -> TensorDataset:
    """Three classes told apart by the image's mean brightness."""
    generator = torch.Generator().manual_seed(1)
    target = torch.arange(n) % 3
    images = (
        0.3 * torch.randn(n, 1, 8, 8, generator=generator)
        + (target.float() - 1)[:, None, None, None]
    )
    return TensorDataset(images, target)


def record(epochs: int = 8) -> PretrainRecord:
    return PretrainRecord("train_split", 48, epochs, 3e-3, 0.0, 16, seed=0)


def test_unwrapped_lora_restores_layers_flags_and_mode() -> None:
    method = tiny_ensemble()
    model = method.backbone.model
    layers = lora_layers(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    with unwrapped_lora(model) as plain:
        assert not lora_layers(plain)
        assert all(p.requires_grad for p in plain.parameters()) and plain.training
        # The plain network's linears are the LoRA layers' own base linears (shared tensors).
        for name, layer in layers.items():
            assert plain.get_submodule(name) is layer.base
    assert lora_layers(model) == layers
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_pretraining_trains_the_frozen_weights_and_leaves_the_lora_init() -> None:
    method = tiny_ensemble()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = pretrain_backbone(method.backbone, 3, separable_data(), record(), separable_data())
    # The caller's random stream continues as if there had been no pretraining.
    assert torch.equal(torch.rand(3), expected_next)
    after = method.state_dict()
    assert set(after) == set(before)
    lora_or_head = [k for k in before if k.endswith((".A", ".B")) or k.startswith("head.")]
    assert lora_or_head
    for key in lora_or_head:  # members start exactly as they would on any backbone (B = 0)
        assert torch.equal(after[key], before[key]), key
    changed = [k for k in before if k not in lora_or_head and not torch.equal(after[k], before[k])]
    assert any(".base." in k for k in changed) and any("patch_embed" in k for k in changed)
    assert [p.requires_grad for p in method.backbone.parameters()] == [
        k.endswith((".A", ".B")) for k, _ in method.backbone.named_parameters()
    ]
    assert len(result.train_acc) == 8 and result.train_acc[-1] > 0.8
    assert result.val_acc is not None and result.val_acc > 0.8


def test_pretraining_is_seeded() -> None:
    runs = []
    for _ in range(2):
        method = tiny_ensemble()
        pretrain_backbone(method.backbone, 3, separable_data(), record(epochs=2))
        runs.append(method.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_written_weights_load_as_pretrained(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    method = tiny_ensemble()
    pretrain_backbone(method.backbone, 3, separable_data(), record(epochs=2))
    path = tmp_path / PRETRAIN_WEIGHTS
    save_file(plain_state_dict(method.backbone), str(path))
    loaded = tiny_ensemble(pretrained=str(path))
    loaded.load_state_dict(
        {k: v for k, v in method.state_dict().items() if k.endswith((".A", ".B")) or "head" in k},
        strict=False,
    )
    loaded.eval()
    method.eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), method(x))


def test_methods_that_change_the_network_are_refused() -> None:
    torch.manual_seed(0)
    explicit = ExplicitEnsemble(
        3, "vit_tiny_patch16_224", num_members=2, pretrained=False, backbone_overrides=OVERRIDES
    )
    with pytest.raises(ConfigError, match="PretrainBackbone pretrains the one backbone"):
        shared_backbone(explicit)
    with pytest.raises(ConfigError, match="epochs"):
        PretrainBackbone(epochs=0)


def test_compare_members_matches_ensemble_metrics() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 200, 5, generator=generator)
    target = torch.randint(0, 5, (200,), generator=generator)
    single, mean, ensemble = compare_members(logits, target)
    for row, member_logits in ((single, logits[:1]), (ensemble, logits)):
        metrics = EnsembleMetrics(5, member_logits.shape[0])
        metrics.update(member_logits, target)
        values = metrics.compute()
        for name in ("acc", "ece", "nll"):
            assert getattr(row, name) == pytest.approx(float(values[name]), abs=1e-5), name
    member_nll = [compare_members(logits[m : m + 1], target)[0].nll for m in range(3)]
    assert mean.nll == pytest.approx(sum(member_nll) / 3)
    one = compare_members(logits[:1], target)  # M = 1: the three rows agree
    for name in ("acc", "conf", "ece", "nll"):
        assert getattr(one[0], name) == pytest.approx(getattr(one[1], name))
        assert getattr(one[0], name) == pytest.approx(getattr(one[2], name))


def pretrain_config(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    config = digits_lora_config(num_members=2)
    config["trainer"] |= {
        "logger": tensorboard_logger(tmp_path / "logs"),
        "callbacks": [
            {"class_path": "lorae.training.PretrainBackbone", "init_args": {"epochs": 1}},
            {"class_path": "lorae.training.MemberComparison"},
            checkpoint_callback(tmp_path / "ckpt"),
        ],
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        **trainer,
    }
    config["data"]["init_args"]["pretrain_fraction"] = 0.6  # keeps the test fast
    return config


def test_fit_pretrains_once_and_a_resumed_run_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "fit.yaml", pretrain_config(tmp_path, max_epochs=1))
    main(["fit", "--config", str(cfg), "--test_after_fit=true"])
    out = capsys.readouterr().out
    assert "lorae: pretrained the backbone" in out
    assert "One member vs the ensemble on the test split (64 samples" in out
    written = json.loads(next((tmp_path / "logs").rglob(PRETRAIN_RECORD)).read_text())
    assert written["source"] == "pretrain_split" and written["samples"] == 1078
    assert Path(written["weights"]).is_file()
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["PretrainBackbone"]["record"]
    assert state["samples"] == 1078

    resumed = write_config(tmp_path / "resume.yaml", pretrain_config(tmp_path, max_epochs=2))
    main(["fit", "--config", str(resumed), f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"])
    out = capsys.readouterr().out
    assert "pretraining skipped" in out and "lorae: pretrained the backbone" not in out
    resumed_state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    frozen = [k for k in checkpoint["state_dict"] if ".base." in k]
    assert frozen
    for key in frozen:  # the pretrained backbone came from the checkpoint, unchanged
        assert torch.equal(resumed_state[key], checkpoint["state_dict"][key]), key


def test_a_batch_limit_limits_every_pretraining_epoch() -> None:
    """``--trainer.limit_train_batches=N`` (a smoke test) limits pretraining too: one batch per
    epoch still trains the frozen weights, and ends elsewhere than the full epochs."""
    data = separable_data()
    limited, full = tiny_ensemble(), tiny_ensemble()
    pretrain_backbone(limited.backbone, 3, data, record(epochs=2), batches_per_epoch=1)
    pretrain_backbone(full.backbone, 3, data, record(epochs=2))
    changed = [
        k
        for k, v in limited.state_dict().items()
        if not torch.equal(v, tiny_ensemble().state_dict()[k])
    ]
    assert changed, "one batch per epoch still trains"
    assert any(not torch.equal(v, full.state_dict()[k]) for k, v in limited.state_dict().items()), (
        "the limit had no effect"
    )
