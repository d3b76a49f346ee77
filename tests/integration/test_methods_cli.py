"""Every method through the ``lorae`` command: fit + test, and test from a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorae.cli import main
from tests.integration.test_cli import check_test_metrics, only_file, read_metrics
from tests.integration.tiny_configs import checkpoint_callback, digits_method_config, write_config

#: name -> (class, options, M). Tiny settings: 2 members, Bayes-LoRA 3 samples.
METHODS: dict[str, tuple[str, dict[str, Any], int]] = {
    "lora_ensemble": ("LoRAEnsemble", {"num_members": 2, "rank": 2, "init_gain": 1.0}, 2),
    "lora_variants": (
        "LoRAEnsemble",
        {
            "num_members": 2,
            "rank": 2,
            "targets": ["q", "v", "mlp"],
            "last_blocks": 1,
            "train_backbone": "embedding",
            "head": "shared",
            "init": "normal",
        },
        2,
    ),
    "explicit": ("ExplicitEnsemble", {"num_members": 2, "noise_alpha": 0.1}, 2),
    "mc_dropout": ("MCDropout", {"num_members": 3, "dropout": 0.2}, 3),
    "batch_ensemble": ("BatchEnsemble", {"num_members": 2}, 2),
    "batch_ensemble_pp": ("BatchEnsemble", {"num_members": 2, "variant": "additive"}, 2),
    "snapshot": ("SnapshotEnsemble", {"num_members": 2, "rank": 2, "init_gain": 1.0}, 2),
    "film": ("FiLMEnsemble", {"num_members": 2}, 2),
    "bayes_lora": (
        "BayesLoRA",
        {"num_samples": 3, "rank": 2, "init_gain": 1.0, "fit_batches": 5},
        3,
    ),
}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lorae"])


def _config(tmp_path: Path, name: str, **trainer: Any) -> Path:
    class_name, init_args, _ = METHODS[name]
    config = digits_method_config(class_name, init_args)
    config["trainer"].update(trainer)
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.parametrize("name", METHODS)
def test_fit_fast_dev_run_then_test(name: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, name)
    out = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={out}",
            "--test_after_fit=true",
        ]
    )
    check_test_metrics(read_metrics(only_file(out, "metrics.json")), METHODS[name][2])


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_test_after_a_short_fit(name: str, tmp_path: Path) -> None:
    """Two epochs of two steps (the snapshot ensemble's burn-in and one cycle), a checkpoint,
    then ``lorae test --ckpt_path`` with another seed evaluates the same ensemble."""
    members = METHODS[name][2]
    cfg = _config(tmp_path, name, callbacks=[checkpoint_callback(tmp_path / "ckpt")])
    fit_dir, test_dir = tmp_path / "fit", tmp_path / "test"
    main(
        [
            "fit",
            "--config",
            str(cfg),
            f"--trainer.default_root_dir={fit_dir}",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=2",
            "--test_after_fit=true",
        ]
    )
    fitted = check_test_metrics(read_metrics(only_file(fit_dir, "metrics.json")), members)
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    if name == "snapshot":
        assert int(state["method.num_snapshots"]) == members
    main(
        [
            "test",
            "--config",
            str(cfg),
            "--seed_everything=123",
            "--ckpt_path",
            str(last),
            f"--trainer.default_root_dir={test_dir}",
            "--trainer.limit_test_batches=2",
        ]
    )
    tested = check_test_metrics(read_metrics(only_file(test_dir, "metrics.json")), members)
    if name != "mc_dropout":  # MC Dropout's members are random draws: only the form is checked
        assert tested == pytest.approx(fitted, rel=1e-4, abs=1e-6)
