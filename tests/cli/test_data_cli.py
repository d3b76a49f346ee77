"""The paper's data sets from the CLI, on fake data in their real formats.

- ``lorae fit`` + ``lorae test`` on CIFAR-100 with an OOD set (SVHN) and CIFAR-100-C shift sets
  write AUROC, AUPRC and per-corruption metrics; the AUROC equals scikit-learn's on the MSP
  scores recomputed from the checkpoint.
- HAM10000's class weights reach the model's loss through the CLI link.
- ``lorae crossval`` on ESC-50 with a tiny AST trains every fold and pools the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from lorae.cli import LoraeCLI, build_cli, main
from lorae.errors import ConfigError
from tests.fixtures.builders import (
    write_cifar,
    write_cifar_c,
    write_esc50,
    write_ham10000,
    write_svhn_test,
)
from tests.fixtures.tiny_configs import _lora, _model, quiet_trainer, write_config

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}
SMALL_IMAGES = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _image_config(data: dict[str, Any], tmp_path: Path, num_members: int = 2) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": quiet_trainer(max_steps=2, default_root_dir=str(tmp_path / "out")),
        "model": _model(_lora("vit_tiny_patch16_224", TINY_VIT, num_members)),
        "data": data,
    }
    return write_config(tmp_path / "config.yaml", config)


def _cli(config: Path) -> LoraeCLI:
    return build_cli(["--config", str(config)], run=False)


def test_cifar_test_with_ood_and_shift_sets(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_cifar(root, 100, n_train=16, n_test=12)
    write_svhn_test(root, n=9)
    write_cifar_c(root / "CIFAR-100-C", ["fog", "snow"], n_per_severity=12)
    data = {
        "class_path": "lorae.data.CIFAR100DataModule",
        "init_args": {
            "root": str(root),
            **SMALL_IMAGES,
            "ood": ["svhn"],
            "corruptions": ["fog", "snow"],
            "corruption_severities": [1, 3],
            "corruption_root": str(root / "CIFAR-100-C"),
            "batch_size": 8,
            "eval_batch_size": 5,
            "val_fraction": 0.25,
        },
    }
    config = _image_config(data, tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={ckpt_dir}",
        ]
    )
    checkpoint = next(ckpt_dir.glob("*.ckpt"))
    main(
        [
            "test",
            "--config",
            str(config),
            f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={tmp_path / 'test'}",
        ]
    )
    (report,) = list((tmp_path / "test").rglob("metrics.json"))
    metrics = json.loads(report.read_text())["metrics"]
    for score in ("msp", "entropy", "mi"):
        for kind in ("auroc", "auprc"):
            assert 0.0 <= metrics[f"test/ood/svhn/{score}/{kind}"] <= 1.0
    for name in ("fog/1", "fog/3", "snow/1", "snow/3"):
        for metric in ("acc", "ece", "nll"):
            assert f"test/shift/{name}/{metric}" in metrics

    # Independent recomputation of the MSP AUROC/AUPRC from the checkpoint's logits.
    cli = _cli(config)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    cli.model.load_state_dict(state)
    cli.model.eval()
    datamodule = cli.datamodule
    loaders = datamodule.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 1 + 1 + 4
    scores, labels = [], []
    with torch.no_grad():
        for loader, in_distribution in ((loaders[0], 1), (loaders[1], 0)):
            for x, _ in loader:
                probs = cli.model(x).softmax(-1).mean(0)
                scores += probs.max(-1).values.tolist()
                labels += [in_distribution] * x.shape[0]
    assert metrics["test/ood/svhn/msp/auroc"] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-4
    )
    assert metrics["test/ood/svhn/msp/auprc"] == pytest.approx(
        average_precision_score(labels, scores), abs=1e-4
    )


def test_ham10000_class_weights_reach_the_model(tmp_path: Path) -> None:
    root = write_ham10000(tmp_path / "ham")
    init_args = {"root": str(root), **SMALL_IMAGES, "test_fraction": 0.15, "val_fraction": 0.1}
    data = {"class_path": "lorae.data.HAM10000DataModule", "init_args": init_args}
    cli = _cli(_image_config(data, tmp_path))
    expected = cli.datamodule.class_weights
    assert expected is not None and len(expected) == 7
    assert cli.model.class_weights is not None
    assert torch.allclose(cli.model.class_weights, torch.tensor(expected))
    # A data module without weights leaves the loss unweighted.
    write_cifar(tmp_path / "cifar", 10, n_train=10, n_test=4)
    cifar = {
        "class_path": "lorae.data.CIFAR10DataModule",
        "init_args": {"root": str(tmp_path / "cifar"), **SMALL_IMAGES},
    }
    assert _cli(_image_config(cifar, tmp_path)).model.class_weights is None


def _with_weights(data: dict[str, Any], tmp_path: Path, weights: list[float]) -> Path:
    config = yaml.safe_load(_image_config(data, tmp_path).read_text())
    config["model"]["class_weights"] = weights
    return write_config(tmp_path / "weighted.yaml", config)


def test_hand_set_class_weights_survive_the_link(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", 10, n_train=10, n_test=4)
    cifar = {
        "class_path": "lorae.data.CIFAR10DataModule",
        "init_args": {"root": str(tmp_path / "cifar"), **SMALL_IMAGES},
    }
    weights = [float(c + 1) for c in range(10)]
    cli = _cli(_with_weights(cifar, tmp_path, weights))
    assert cli.model.class_weights is not None
    assert cli.model.class_weights.tolist() == weights
    ham = {
        "class_path": "lorae.data.HAM10000DataModule",
        "init_args": {"root": str(write_ham10000(tmp_path / "ham")), **SMALL_IMAGES},
    }
    with pytest.raises(ConfigError, match="brings its own class weights"):
        _cli(_with_weights(ham, tmp_path, weights[:7]))


def test_crossval_pools_every_fold(tmp_path: Path) -> None:
    pytest.importorskip("torchaudio")
    root = write_esc50(tmp_path / "esc50", clips_per_fold=2)
    backbone = {
        "source": "deit_tiny_distilled_patch16_224",
        "img_size": 32,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
        "input_fdim": 16,
        "input_tdim": 36,
    }
    method = _lora("ast", backbone, 2)
    data = {
        "class_path": "lorae.data.ESC50DataModule",
        "init_args": {
            "root": str(root),
            "num_mel_bins": 16,
            "target_length": 36,
            "freq_mask": 2,
            "time_mask": 4,
            "batch_size": 4,
        },
    }
    config = {
        "seed_everything": 0,
        "trainer": quiet_trainer(max_steps=1, limit_val_batches=0),
        "model": _model(method),
        "data": data,
    }
    path = write_config(tmp_path / "esc50.yaml", config)
    out = tmp_path / "cv"
    main(["crossval", "--config", str(path), "--output", str(out), "--trainer.max_steps=2"])
    result = json.loads((out / "crossval.json").read_text())
    assert sorted(result["folds"]) == ["1", "2", "3", "4", "5"]
    assert result["num_samples"] == 10 and result["extra_args"] == ["--trainer.max_steps=2"]
    logits, targets = [], []
    for fold in range(1, 6):
        saved = torch.load(out / f"fold_{fold}" / "test_logits.pt")
        assert saved["logits"].shape == (2, 2, 50)  # (M, clips of the fold, C)
        # Fold k holds clips with targets (k - 1 + i) % 50: each model predicted its own fold.
        assert saved["target"].tolist() == [fold - 1, fold]
        fold_acc = (saved["logits"].softmax(-1).mean(0).argmax(-1) == saved["target"]).float()
        assert result["folds"][str(fold)]["acc"] == pytest.approx(float(fold_acc.mean()))
        logits.append(saved["logits"])
        targets.append(saved["target"])
    probs = torch.cat(logits, dim=1).softmax(-1).mean(0)
    target = torch.cat(targets)
    pooled_acc = float((probs.argmax(-1) == target).float().mean())
    assert result["pooled"]["acc"] == pytest.approx(pooled_acc)
    nll = -probs[torch.arange(10), target].log().mean()
    assert result["pooled"]["nll"] == pytest.approx(float(nll), rel=1e-4)
