"""Every method through the ``lorae`` command: fit + test, and test from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorae.cli import main
from lorae.cli.main import build_cli
from lorae.lora import LoRASpec, lora_layers
from lorae.methods import METHODS, LoRAEnsemble, class_path
from tests.cli.test_cli import check_test_metrics, only_file, read_metrics, run_cli_error
from tests.fixtures.tiny_configs import checkpoint_callback, digits_method_config, write_config

TINY_LORA = {"rank": 2, "gain": 1.0}

#: Test case -> (registered method name, tiny options, M). Every registered method needs a case
#: (:func:`test_every_registered_method_has_a_case`). Tiny settings: 2 members, Bayes-LoRA 3.
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "lora_ensemble": ("lora_ensemble", {"num_members": 2, "lora": TINY_LORA}, 2),
    "lora_variants": (
        "lora_ensemble",
        {
            "num_members": 2,
            "lora": {"rank": 2, "targets": ["q", "v", "mlp"], "last_blocks": 1, "init": "normal"},
            "train_backbone": "embedding",
            "head": "shared",
        },
        2,
    ),
    "single_network": ("single_network", {}, 1),
    "explicit": ("explicit_ensemble", {"num_members": 2, "noise_alpha": 0.1}, 2),
    "mc_dropout": ("mc_dropout", {"num_members": 3, "dropout": 0.2}, 3),
    "batch_ensemble": ("batch_ensemble", {"num_members": 2}, 2),
    "batch_ensemble_pp": ("batch_ensemble", {"num_members": 2, "variant": "additive"}, 2),
    "snapshot": ("snapshot_ensemble", {"num_members": 2}, 2),  # full fine-tuning (appendix U)
    "snapshot_lora": ("snapshot_ensemble", {"num_members": 2, "lora": TINY_LORA}, 2),
    "film": ("film_ensemble", {"num_members": 2}, 2),
    "bayes_lora": (
        "bayes_lora",
        {"num_members": 3, "lora": TINY_LORA, "fit_batches": 5},
        3,
    ),
}


def test_every_registered_method_has_a_case() -> None:
    covered = {method for method, _, _ in CASES.values()}
    assert covered == set(METHODS), f"add a case for {sorted(set(METHODS) - covered)}"


def _config(tmp_path: Path, name: str, **trainer: Any) -> Path:
    method, init_args, _ = CASES[name]
    config = digits_method_config(class_path(METHODS[method]), init_args)
    config["trainer"].update(trainer)
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.parametrize("name", CASES)
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
    check_test_metrics(read_metrics(only_file(out, "metrics.json")), CASES[name][2])


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_test_after_a_short_fit(name: str, tmp_path: Path) -> None:
    """Two epochs of two steps (the snapshot ensemble's burn-in and one cycle), a checkpoint,
    then ``lorae test --ckpt_path`` with another seed evaluates the same ensemble."""
    members = CASES[name][2]
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
    if name.startswith("snapshot"):
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


def test_lora_options_from_config_and_command_line(tmp_path: Path) -> None:
    """``lora: {...}`` in a config and ``--model.method.init_args.lora.<field>`` on the command
    line reach the method as one LoRASpec, and every LoRA layer is built from it."""
    cfg = _config(tmp_path, "lora_ensemble")
    cli = build_cli(
        [
            "--config",
            str(cfg),
            "--model.method.init_args.lora.rank=3",
            "--model.method.init_args.lora.targets=[q, v]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
        save_config=False,
    )
    method = cli.model.method
    assert isinstance(method, LoRAEnsemble)
    assert method.lora == LoRASpec(rank=3, gain=1.0, targets=("q", "v"))  # gain from the file
    layers = lora_layers(method.backbone).values()
    assert layers and all(layer.rank == 3 for layer in layers)
    assert all(layer.A.shape[1] == 2 for layer in layers)  # fused qkv: q and v only
    assert method.identity()["rank"] == 3


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("lora.rank=0", "lora.rank must be an integer >= 1"),
        ("lora.last_blocks=-2", "lora.last_blocks must be null"),
        ("lora.targets=[q, x]", "lora.targets"),
    ],
)
def test_bad_lora_option_is_a_clear_error(
    option: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, "lora_ensemble")
    args = ["fit", "--config", str(cfg), f"--model.method.init_args.{option}"]
    assert message in run_cli_error([*args, "--trainer.fast_dev_run=true"], capsys)


def test_snapshot_checkpoint_with_fewer_than_m_snapshots_cannot_be_tested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoint selection for Snapshot Ensemble is the final epoch: a checkpoint saved
    before the last cycle ends (here after epoch 1 of 3: 1 of 3 snapshots) is refused."""
    _, init_args, _ = CASES["snapshot"]
    config = digits_method_config(
        class_path(METHODS["snapshot_ensemble"]), {**init_args, "num_members": 3}
    )
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "config.yaml", config)
    root = f"--trainer.default_root_dir={tmp_path / 'fit'}"
    main(
        [
            "fit",
            "--config",
            str(cfg),
            root,
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.max_steps=1",
        ]
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert int(state["method.num_snapshots"]) == 1
    args = ["test", "--config", str(cfg), "--ckpt_path", str(last), root]
    assert "holds 1 of its 3 snapshots" in run_cli_error(args, capsys)
