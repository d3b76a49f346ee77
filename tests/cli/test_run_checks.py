"""A run never evaluates something other than what it was pointed at, and file-system
problems are one-line errors (issue 19.2 and 19.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorae.cli import main
from lorae.cli.run_checks import free_name
from tests.cli.test_cli import run_cli_error
from tests.fixtures.tiny_configs import checkpoint_callback, digits_lora_config, write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.yaml", digits_lora_config())


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_a_missing_checkpoint_is_an_error_naming_it(
    subcommand: str, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "runs" / "nothing.ckpt"
    out = tmp_path / "out"
    message = run_cli_error(
        [
            subcommand,
            "--config",
            str(config),
            "--ckpt_path",
            str(missing),
            f"--trainer.default_root_dir={out}",
        ],
        capsys,
    )
    assert f"Checkpoint '{missing}' does not exist" in message
    assert not list(out.rglob("metrics.json")) and not list(out.rglob("predictions*"))


def test_last_without_a_checkpoint_names_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ckpts"
    settings = digits_lora_config()
    settings["trainer"]["callbacks"] = [checkpoint_callback(folder)]
    config = write_config(tmp_path / "config.yaml", settings)
    args = [
        "test",
        "--config",
        str(config),
        "--ckpt_path",
        "last",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
    ]
    message = run_cli_error(args, capsys)
    assert "found no last*.ckpt" in message and str(folder) in message
    assert not list((tmp_path / "out").rglob("metrics.json"))  # the untrained model never ran


def test_best_in_a_run_without_fit_is_an_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "test",
        "--config",
        str(config),
        "--ckpt_path",
        "best",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
    ]
    assert "give the checkpoint's path" in run_cli_error(args, capsys)


def test_a_root_under_a_regular_file_is_a_one_line_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={blocker / 'runs'}",
    ]
    message = run_cli_error(args, capsys)
    assert message.startswith("lorae: error: cannot write '") and str(blocker) in message
    assert "not a folder" in message or "Not a directory" in message


def test_a_second_run_into_the_same_folder_keeps_the_first_config(
    config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = [
        "--config",
        str(config),
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        f"--trainer.default_root_dir={out}",
    ]
    main(["fit", *common])
    first = (out / "config.yaml").read_text()
    main(["test", *common])  # LightningCLI stopped here: config.yaml exists
    assert (out / "config.yaml").read_text() == first
    assert (out / "config_1.yaml").is_file()


def test_free_name_counts_up(tmp_path: Path) -> None:
    assert free_name(tmp_path, "config.yaml") == "config.yaml"
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "config_1.yaml").write_text("")
    assert free_name(tmp_path, "config.yaml") == "config_2.yaml"


def test_predict_never_replaces_a_file_it_was_not_asked_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = digits_lora_config()
    settings["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    config = write_config(tmp_path / "config.yaml", settings)
    root = f"--trainer.default_root_dir={tmp_path / 'out'}"
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            root,
        ]
    )
    output = tmp_path / "predictions.csv"
    output.write_text("an earlier result\n")
    predict = [
        "predict",
        "--config",
        str(config),
        "--ckpt_path",
        str(tmp_path / "ckpt" / "last.ckpt"),
        root,
        f"--prediction_writer.output_path={output}",
    ]
    message = run_cli_error(predict, capsys)
    assert f"'{output}' already exists" in message and "overwrite=true" in message
    assert output.read_text() == "an earlier result\n"
    main([*predict, "--prediction_writer.overwrite=true"])
    assert output.read_text().startswith("index,target,pred,")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".predictions")] == []
