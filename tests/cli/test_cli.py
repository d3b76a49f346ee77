"""End-to-end tests of the ``lorae`` command, run the way users run it.

Every test calls :func:`lorae.cli.main` with command-line arguments (or ``python -m lorae`` in a
subprocess) on tiny offline models and fixture data, then checks the files a user reads:
``metrics.json``, the prediction CSV, checkpoints and the error message on stderr.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorae.cli import main
from lorae.data import DigitsDataModule
from tests.fixtures.tiny_configs import (
    DIGITS_NUM_CLASSES,
    GLUE_N_DEV,
    IMAGE_CLASSES,
    IMAGE_PER_CLASS,
    checkpoint_callback,
    digits_lora_config,
    digits_single_config,
    glue_bert_config,
    image_folder_config,
    tensorboard_logger,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Every experiment config; a data set's base.yaml (the recipe its method files include) and
#: configs/options/ (files added after an experiment's config) are not run alone.
CONFIG_FILES = sorted(
    p
    for pattern in ("*.yaml", "*.yml")
    for p in (REPO_ROOT / "configs").rglob(pattern)
    if p.name != "base.yaml" and "options" not in p.relative_to(REPO_ROOT / "configs").parts
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")

FAST = ["--trainer.fast_dev_run=true"]


# ---------------------------------------------------------------------------------- helpers


def run_cli(args: list[str]) -> None:
    """Run ``lorae <args>``; a successful run returns without SystemExit."""
    main(args)


def run_cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``lorae <args>``, expect a non-zero exit and return what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def only_file(root: Path, name: str) -> Path:
    found = sorted(root.rglob(name))
    assert len(found) == 1, f"expected exactly one {name} under {root}, found {found}"
    return found[0]


def read_metrics(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def check_test_metrics(report: dict[str, Any], num_members: int) -> dict[str, float]:
    """Assert the metrics.json content of a test run; return its metrics."""
    metrics: dict[str, float] = report["metrics"]
    for key in ("acc", "f1", "ece", "nll", "brier"):
        assert f"test/{key}" in metrics, f"test/{key} missing from {sorted(metrics)}"
    members = sorted(k for k in metrics if k.startswith("test/member_acc/"))
    assert members == sorted(f"test/member_acc/{i}" for i in range(num_members))
    for key, value in metrics.items():
        assert value is not None and math.isfinite(value), f"{key} = {value}"
    for key in ("test/acc", "test/f1", "test/ece", *members):
        assert 0.0 <= metrics[key] <= 1.0, f"{key} = {metrics[key]}"
    assert metrics["test/nll"] >= 0.0
    assert 0.0 <= metrics["test/brier"] <= 2.0
    assert report["method"]["num_members"] == num_members
    return metrics


def read_predictions(path: Path, num_classes: int) -> list[dict[str, str]]:
    """Read the prediction CSV; assert its columns, probabilities and argmax."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames
    probs = [f"prob_{c}" for c in range(num_classes)]
    uncertainty = ["entropy", "expected_entropy", "mutual_information"]
    names = ["file"] if header and header[1] == "file" else []  # ImageFolder names its files
    variances = ["variance", *(f"var_{c}" for c in range(num_classes))]
    summary = ["pred_name", "confidence", "agreement"]
    assert header == [
        "index",
        *names,
        "target",
        "pred",
        *summary,
        *uncertainty,
        *probs,
        *variances,
    ]
    for i, row in enumerate(rows):
        assert int(row["index"]) == i
        p = [float(row[c]) for c in probs]
        assert all(0.0 <= v <= 1.0 for v in p), row
        assert abs(sum(p) - 1.0) < 1e-4, row
        assert int(row["pred"]) == max(range(num_classes), key=p.__getitem__), row
        entropy = float(row["entropy"])
        assert 0.0 <= entropy <= math.log(num_classes) + 1e-4, row
        per_class = [float(row[f"var_{c}"]) for c in range(num_classes)]
        assert all(v >= 0.0 for v in per_class), row  # Eq. 4: a variance per class
        assert abs(sum(per_class) - float(row["variance"])) < 1e-9, row
    return rows


# ---------------------------------------------------------------------- the four setups


def digits_targets() -> list[int]:
    """Targets of the digits test split, in order (the config uses the default fractions)."""
    dm = DigitsDataModule(seed=0)
    return [int(target) for _, target in dm.test_dataset]  # type: ignore[attr-defined]


class Setup:
    """One model + data combination: its config and what its test split looks like."""

    def __init__(
        self,
        config: dict[str, Any],
        num_members: int,
        num_classes: int,
        targets: Callable[[], list[int]],
    ) -> None:
        self.config = config
        self.num_members = num_members
        self.num_classes = num_classes
        self.targets = targets


def make_setup(name: str, tmp_path: Path) -> Setup:
    if name == "lora-digits-timm":
        return Setup(digits_lora_config(num_members=2), 2, DIGITS_NUM_CLASSES, digits_targets)
    if name == "single-digits-timm":
        return Setup(digits_single_config(), 1, DIGITS_NUM_CLASSES, digits_targets)
    if name == "lora-imagefolder-torchvision":
        # test/ is sorted class by class (ImageFolder order).
        return Setup(
            image_folder_config(tmp_path / "images", num_members=3),
            3,
            len(IMAGE_CLASSES),
            lambda: [c for c in range(len(IMAGE_CLASSES)) for _ in range(IMAGE_PER_CLASS)],
        )
    if name == "lora-glue-bert":
        # dev.tsv (the default test file) row i has label i % 2.
        return Setup(
            glue_bert_config(tmp_path / "text", num_members=2),
            2,
            2,
            lambda: [i % 2 for i in range(GLUE_N_DEV)],
        )
    raise AssertionError(name)


SETUPS = (
    "lora-digits-timm",
    "lora-imagefolder-torchvision",
    "lora-glue-bert",
    "single-digits-timm",
)


# ------------------------------------------------------------------ 1. fit / test / predict


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("setup_name", SETUPS)
def test_fit_fast_dev_run_trains_and_tests(setup_name: str, precision: str, tmp_path: Path) -> None:
    """fit + test for every backbone family, in float32 and in the README's bf16-mixed."""
    setup = make_setup(setup_name, tmp_path)
    cfg = write_config(tmp_path / "config.yaml", setup.config)
    out = tmp_path / "run"
    run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            *FAST,
            f"--trainer.precision={precision}",
            f"--trainer.default_root_dir={out}",
            "--test_after_fit=true",
        ]
    )
    # fast_dev_run saves no checkpoint: test_after_fit tests the final weights.
    report = read_metrics(only_file(out, "metrics.json"))
    check_test_metrics(report, setup.num_members)
    assert report["checkpoint"] is None


@pytest.mark.parametrize("setup_name", SETUPS)
def test_test_fast_dev_run_writes_metrics(setup_name: str, tmp_path: Path) -> None:
    setup = make_setup(setup_name, tmp_path)
    cfg = write_config(tmp_path / "config.yaml", setup.config)
    out = tmp_path / "run"
    run_cli(["test", "--config", str(cfg), *FAST, f"--trainer.default_root_dir={out}"])
    report = read_metrics(only_file(out, "metrics.json"))
    check_test_metrics(report, setup.num_members)


@pytest.mark.parametrize("setup_name", SETUPS)
def test_predict_writes_one_row_per_test_sample(setup_name: str, tmp_path: Path) -> None:
    # Not fast_dev_run: that would predict a single batch, and the point is that the CSV holds
    # every test sample, in order, merged across several batches.
    setup = make_setup(setup_name, tmp_path)
    cfg = write_config(tmp_path / "config.yaml", setup.config)
    csv_path = tmp_path / "out" / "predictions.csv"
    run_cli(
        [
            "predict",
            "--config",
            str(cfg),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--prediction_writer.output_path={csv_path}",
        ]
    )
    rows = read_predictions(csv_path, setup.num_classes)
    assert [int(row["target"]) for row in rows] == setup.targets()


def test_predict_fast_dev_run_default_output_path(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config())
    out = tmp_path / "run"
    run_cli(["predict", "--config", str(cfg), *FAST, f"--trainer.default_root_dir={out}"])
    rows = read_predictions(only_file(out, "predictions.csv"), DIGITS_NUM_CLASSES)
    assert len(rows) == 64  # fast_dev_run: one evaluation batch


# ---------------------------------------------- 2. checkpoint round trip reproduces metrics


def test_test_from_checkpoint_reproduces_test_after_fit(tmp_path: Path) -> None:
    config = digits_lora_config(num_members=2, seed=0)
    config["trainer"]["logger"] = tensorboard_logger(tmp_path / "logs")
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "config.yaml", config)
    run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            "--test_after_fit=true",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
        ]
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    fit_json = only_file(tmp_path / "logs", "metrics.json")
    fit_report = read_metrics(fit_json)
    fit_metrics = check_test_metrics(fit_report, 2)
    assert fit_report["checkpoint"] is not None
    assert Path(fit_report["checkpoint"]).parent == tmp_path / "ckpt"

    # Another seed: the freshly built model differs, so only the checkpoint can bring the
    # metrics back.
    run_cli(["test", "--config", str(cfg), "--seed_everything=123", "--ckpt_path", str(last)])
    reports = sorted((tmp_path / "logs").rglob("metrics.json"))
    assert len(reports) == 2 and fit_json in reports
    test_report = read_metrics(next(r for r in reports if r != fit_json))
    assert test_report["checkpoint"] == str(last)
    assert check_test_metrics(test_report, 2) == fit_metrics

    # And the untrained model at that seed scores differently (the comparison is meaningful).
    untrained = tmp_path / "untrained"
    run_cli(
        [
            "test",
            "--config",
            str(cfg),
            "--seed_everything=123",
            f"--trainer.logger.init_args.save_dir={untrained}",
        ]
    )
    untrained_metrics = read_metrics(only_file(untrained, "metrics.json"))["metrics"]
    assert untrained_metrics != fit_metrics


# ------------------------------------------------------------------ 3. seed repeatability


def _short_fit(tmp_path: Path, cfg: Path, seed: int, name: str) -> dict[str, float]:
    out = tmp_path / name
    run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            f"--seed_everything={seed}",
            "--test_after_fit=true",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_checkpointing=false",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.limit_test_batches=2",
        ]
    )
    return check_test_metrics(read_metrics(only_file(out, "metrics.json")), 2)


def test_seed_everything_makes_fit_repeatable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config(num_members=2))
    first = _short_fit(tmp_path, cfg, 7, "a")
    second = _short_fit(tmp_path, cfg, 7, "b")
    other = _short_fit(tmp_path, cfg, 8, "c")
    assert first == second
    assert other != first


# ------------------------------------------------------------- 4. shipped configs parse


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
@pytest.mark.parametrize(
    "config", CONFIG_FILES, ids=[str(p.relative_to(REPO_ROOT)) for p in CONFIG_FILES]
)
def test_shipped_config_parses(
    config: Path,
    subcommand: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO_ROOT)  # configs may name data paths relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config.relative_to(REPO_ROOT)), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"]["class_path"].startswith("lorae.methods.")
    assert printed["data"]["class_path"].startswith("lorae.data.")


def test_configs_folder_is_not_empty() -> None:
    assert REPO_ROOT / "configs" / "quickstart.yaml" in CONFIG_FILES


def test_option_file_selects_by_val_nll(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    paper = "configs/cifar100/lora_ensemble.yaml"
    option = "configs/options/select_by_val_nll.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", paper, "--config", option, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/nll"
    assert printed["data"]["init_args"]["val_fraction"] == 0.1
    assert printed["data"]["class_path"] == "lorae.data.CIFAR100DataModule"
    assert printed["model"]["method"]["init_args"]["num_members"] == 16


# ------------------------------------------------------------------------ 5. clear errors


def test_wrong_config_key_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config())
    err = run_cli_error(["fit", "--config", str(cfg), "--model.method.init_args.rnk=4"], capsys)
    assert "rnk" in err


def test_unknown_backbone_lists_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config())
    err = run_cli_error(
        ["fit", "--config", str(cfg), *FAST, "--model.method.init_args.backbone=resnet_50"],
        capsys,
    )
    assert "lorae: error:" in err
    assert "Unknown backbone" in err
    assert "resnet_50" in err
    assert "vit_b_32" in err
    assert "Traceback" not in err


def test_missing_image_folder_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such_images"
    config = image_folder_config(missing, write_data=False)
    cfg = write_config(tmp_path / "config.yaml", config)
    err = run_cli_error(["fit", "--config", str(cfg), *FAST], capsys)
    assert "lorae: error:" in err
    assert str(missing) in err
    assert "does not exist" in err


def fit_one_step_checkpoint(tmp_path: Path, num_members: int) -> tuple[Path, Path]:
    """Fit a tiny digits LoRA-Ensemble for one step; return its config and ``last.ckpt``."""
    config = digits_lora_config(num_members=num_members)
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    cfg = write_config(tmp_path / "config.yaml", config)
    run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
        ]
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    return cfg, last


def test_checkpoint_with_other_num_members_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, last = fit_one_step_checkpoint(tmp_path, num_members=2)
    capsys.readouterr()
    err = run_cli_error(
        [
            "test",
            "--config",
            str(cfg),
            "--model.method.init_args.num_members=3",
            "--ckpt_path",
            str(last),
            f"--trainer.default_root_dir={tmp_path / 'test'}",
        ],
        capsys,
    )
    assert "lorae: error:" in err
    mismatch = [line for line in err.splitlines() if "num_members" in line]
    assert mismatch, err
    assert "2" in mismatch[0] and "3" in mismatch[0], mismatch[0]
    assert "Traceback" not in err


def test_evaluating_a_checkpoint_loads_no_pretrained_weights(tmp_path: Path) -> None:
    """`pretrained` points nowhere, as on an offline node: the checkpoint supplies the weights."""
    cfg, last = fit_one_step_checkpoint(tmp_path, num_members=2)
    unreachable = ["--model.method.init_args.pretrained", str(tmp_path / "missing.safetensors")]
    run_cli(
        [
            "test",
            "--config",
            str(cfg),
            *unreachable,
            "--ckpt_path",
            str(last),
            f"--trainer.default_root_dir={tmp_path / 'test'}",
        ]
    )
    check_test_metrics(read_metrics(only_file(tmp_path / "test", "metrics.json")), 2)
    with pytest.raises(SystemExit):  # fitting does need them
        run_cli(["fit", "--config", str(cfg), *unreachable, *FAST])


def test_evaluating_a_checkpoint_keeps_a_local_pretrained_folder(tmp_path: Path) -> None:
    """A BERT fine-tuned from a local folder whose architecture is not its name's (a tiny
    BERT as `all-MiniLM-L6-v2`): `lorae test` builds the folder's architecture, so the
    checkpoint loads; dropping `pretrained` built the name's 384-wide model and failed."""
    from tests.fixtures.builders import write_glue_tsv, write_tiny_bert_folder

    data = write_glue_tsv(tmp_path / "sst2", n_train=24, n_dev=20)
    bert = write_tiny_bert_folder(tmp_path / "bert")
    common = [
        "--config",
        str(REPO_ROOT / "configs" / "sst2_minilm" / "lora_ensemble.yaml"),
        f"--data.init_args.root={data}",
        "--data.init_args.ood_file=null",
        f"--model.method.init_args.pretrained={bert}",
        "--plots=false",
        "--trainer.enable_progress_bar=false",
    ]
    run_cli(
        [
            "fit",
            *common,
            "--trainer.max_epochs=1",
            "--test_after_fit=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'fit'}",
        ]
    )
    checkpoint = only_file(tmp_path / "fit", "best.ckpt")
    run_cli(
        [
            "test",
            *common,
            "--ckpt_path",
            str(checkpoint),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'test'}",
        ]
    )
    check_test_metrics(read_metrics(only_file(tmp_path / "test", "metrics.json")), 4)


# ------------------------------------------------------------------------ 6. quickstart


def test_quickstart_as_in_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    default_runs = REPO_ROOT / "runs"  # the config's own save_dir; the override must win
    before = sorted(default_runs.rglob("*")) if default_runs.exists() else []
    run_cli(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    report = read_metrics(only_file(tmp_path, "metrics.json"))
    check_test_metrics(report, 4)
    # The checkpoint tested after fit lies in the logger's folder, i.e. under tmp_path.
    assert report["checkpoint"] is not None
    assert Path(report["checkpoint"]).resolve().is_relative_to(tmp_path.resolve())
    assert (tmp_path / "quickstart").is_dir()
    after = sorted(default_runs.rglob("*")) if default_runs.exists() else []
    assert after == before


def test_python_m_lorae_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorae", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for subcommand in SUBCOMMANDS:
        assert subcommand in result.stdout


def test_test_after_fit_keeps_the_fit_callbacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The test after `fit` reuses the fit's trainer: lorae's callbacks are attached once, so
    Lightning does not replace them and print its override notice to the user."""
    setup = make_setup(SETUPS[0], tmp_path)
    cfg = write_config(tmp_path / "config.yaml", setup.config)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        run_cli(
            [
                "fit",
                "--config",
                str(cfg),
                *FAST,
                f"--trainer.default_root_dir={tmp_path / 'r'}",
                "--test_after_fit=true",
            ]
        )
    assert "will override existing callbacks" not in caplog.text
    assert only_file(tmp_path / "r", "metrics.json").is_file()
