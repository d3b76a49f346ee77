"""Each bad input of the robustness table (docs/robustness.md): a clear error, nothing lost.

Every test runs ``lorae`` the way users do (``main([...])``) and checks what the user reads on
stderr: ``lorae: error:`` with what is wrong and how to fix it, and no traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lorae.cli import main
from lorae.errors import ConfigError
from lorae.training import LabelRangeGuard
from tests.fixtures.tiny_configs import (
    IMAGE_CLASSES,
    checkpoint_callback,
    digits_lora_config,
    glue_bert_config,
    image_folder_config,
    write_config,
)

FAST = ["--trainer.fast_dev_run=true"]


def user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``lorae <args>``; expect exit code 2 and return stderr (checked for a clean error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lorae: error:" in err and "Traceback" not in err, err
    return err


def fault(name: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"tests.fixtures.fault_callbacks.{name}", "init_args": init_args}


# ------------------------------------------------------------------------------ data files


def test_missing_text_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = glue_bert_config(tmp_path)
    config["data"]["init_args"]["root"] = str(tmp_path / "nowhere")
    err = user_error(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))], capsys)
    assert f"Text data folder '{tmp_path / 'nowhere'}' does not exist" in err


def test_empty_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    config = image_folder_config(tmp_path / "images", write_data=False)
    err = user_error(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))], capsys)
    assert f"No class folders found in '{tmp_path / 'images' / 'train'}'" in err


def _first_test_image(root: Path) -> Path:
    return sorted((root / "test" / IMAGE_CLASSES[0]).iterdir())[0]


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_corrupt_image_names_the_file(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_folder_config(tmp_path / "images")
    image = _first_test_image(tmp_path / "images")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a JPEG")
    cfg = write_config(tmp_path / "c.yaml", config)
    err = user_error(
        ["test", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path}"], capsys
    )
    assert f"Cannot read image '{image}'" in err
    assert "skip_corrupt: true" in err


def test_corrupt_images_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_folder_config(tmp_path / "images")
    bad = sorted((tmp_path / "images" / "test" / IMAGE_CLASSES[1]).iterdir())[:2]
    for image in bad:
        image.write_bytes(b"\xff\xd8 truncated")
    config["data"]["init_args"]["skip_corrupt"] = True
    cfg = write_config(tmp_path / "c.yaml", config)
    main(["test", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    for image in bad:
        assert f"Cannot read image '{image}'" in err
    assert "lorae: skipped 2 corrupt sample(s) during test" in err


def _damage_tsv_row(path: Path, line: int, row: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = row
    path.write_text("\n".join(lines) + "\n")


def test_truncated_tsv_row_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = glue_bert_config(tmp_path)
    train = Path(config["data"]["init_args"]["root"]) / "train.tsv"
    _damage_tsv_row(train, 4, "a sentence cut off before its label")
    cfg = write_config(tmp_path / "c.yaml", config)
    err = user_error(["fit", "--config", str(cfg), *FAST], capsys)
    assert f"'{train}' line 4 has 1 tab-separated field(s)" in err


def test_bad_tsv_rows_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = glue_bert_config(tmp_path)
    train = Path(config["data"]["init_args"]["root"]) / "train.tsv"
    _damage_tsv_row(train, 4, "a sentence cut off before its label")
    _damage_tsv_row(train, 6, "a film\tpositive")
    config["data"]["init_args"]["skip_corrupt"] = True
    cfg = write_config(tmp_path / "c.yaml", config)
    main(["fit", "--config", str(cfg), *FAST, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert f"lorae: skipped 2 corrupt row(s) of '{train}' (lines 4, 6)" in err


# ------------------------------------------------------------------------------ labels


def test_tsv_label_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = glue_bert_config(tmp_path)
    dev = Path(config["data"]["init_args"]["root"]) / "dev.tsv"
    _damage_tsv_row(dev, 3, "a good film\t7")
    config["data"]["init_args"]["num_classes"] = 2
    err = user_error(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))], capsys)
    assert f"Invalid label 7 in '{dev}' line 3" in err and "[0, 2)" in err


def test_label_guard_names_the_label_and_num_classes() -> None:
    """A data module whose labels exceed the model's classes (e.g. a hand-written one)."""

    class Model:
        num_classes = 3

    batch = (torch.zeros(2, 4), torch.tensor([0, 5]))
    with pytest.raises(ConfigError, match=r"label 5, outside \[0, 3\).*num_classes=3"):
        LabelRangeGuard().on_train_batch_start(None, Model(), batch, 0)  # type: ignore[arg-type]
    LabelRangeGuard().on_train_batch_start(None, Model(), (batch[0], torch.tensor([0, 2])), 0)  # type: ignore[arg-type]


def _fit_images(tmp_path: Path, classes: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    from tests.fixtures.builders import write_image_folder

    write_image_folder(tmp_path / "images", classes=classes, per_class=4, size=16)
    config = image_folder_config(tmp_path / "images", write_data=False)
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "fit.yaml", config)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
        ]
    )
    return config, tmp_path / "ckpt" / "last.ckpt"


def test_class_count_mismatch_between_data_and_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, checkpoint = _fit_images(tmp_path / "three", IMAGE_CLASSES)
    config, _ = _fit_images(tmp_path / "four", (*IMAGE_CLASSES, "bird"))
    cfg = write_config(tmp_path / "test.yaml", config)
    err = user_error(
        [
            "test",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(checkpoint),
            f"--trainer.default_root_dir={tmp_path / 'test'}",
        ],
        capsys,
    )
    assert "num_classes: checkpoint 3, config 4" in err


# ------------------------------------------------------------------------- model options


def test_unknown_method_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", digits_lora_config())
    err = user_error(
        ["fit", "--config", str(cfg), "--model.method.class_path", "lorae.methods.LoraEnsembel"],
        capsys,
    )
    assert "Unknown method 'lorae.methods.LoraEnsembel'" in err
    assert "lorae.methods.LoRAEnsemble" in err and "lorae.methods.SingleNetwork" in err


def test_unknown_backbone_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", digits_lora_config())
    err = user_error(
        ["fit", "--config", str(cfg), *FAST, "--model.method.init_args.backbone=vit_b_23"], capsys
    )
    assert "Unknown backbone" in err and "vit_b_23" in err and "vit_b_32" in err


@pytest.mark.parametrize(
    ("option", "value", "line"),
    [
        ("lora.rank", "4", "rank: checkpoint 2, config 4"),
        ("backbone", "vit_small_patch16_224", "backbone: checkpoint 'vit_tiny_patch16_224'"),
        # issue 19.5: was 62 lines of `size mismatch`
        (
            "backbone_overrides.embed_dim",
            "32",
            "backbone_overrides.embed_dim: checkpoint 16, config 32",
        ),
    ],
)
def test_checkpoint_of_another_rank_or_backbone(
    option: str, value: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = digits_lora_config()
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "c.yaml", config)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
        ]
    )
    err = user_error(
        [
            "test",
            "--config",
            str(cfg),
            f"--model.method.init_args.{option}={value}",
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
            f"--trainer.default_root_dir={tmp_path / 'test'}",
        ],
        capsys,
    )
    assert "The checkpoint does not match the configured model" in err
    assert line in err


# ------------------------------------------------------------------------------ training


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = digits_lora_config()
    ckpt_dir = tmp_path / "ckpt"
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 5, "save_last": True},
        },
        fault("PoisonInputsAtStep", step=7),
    ]
    cfg = write_config(tmp_path / "c.yaml", config)
    err = user_error(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps=20",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    assert "The training loss became nan at step 7" in err
    assert f"The last good checkpoint is kept: {ckpt_dir / 'last.ckpt'}" in err
    kept = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 5
    assert all(bool(torch.isfinite(v).all()) for v in kept["state_dict"].values())


def test_out_of_memory_gives_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = digits_lora_config()
    config["trainer"]["callbacks"] = [fault("OutOfMemoryAtStep", step=0)]
    cfg = write_config(tmp_path / "c.yaml", config)
    err = user_error(["fit", "--config", str(cfg), *FAST], capsys)
    assert "Out of memory (OutOfMemoryError: CUDA out of memory." in err
    for hint in ("batch_size", "eval_batch_size", "num_members", "bf16-mixed"):
        assert hint in err


def test_nan_guard_is_silent_on_finite_training(tmp_path: Path) -> None:
    """Control for the NaN test: the same run without the poison trains to the end."""
    config = digits_lora_config()
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "c.yaml", config)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps=8",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ]
    )
    kept = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 8
    assert not any(math.isnan(float(v.sum())) for v in kept["state_dict"].values())
