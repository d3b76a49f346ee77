"""Distributed data parallel for real: 2 CPU processes (gloo) against 1, as users run it.

Lightning's DDP launcher re-executes the command line for every extra rank, so each run is a
``python -m lorae`` subprocess. Compared on the same *global* batch (1 x 16 vs 2 x 8) and
the same data order (both use Lightning's ``DistributedSampler``), 2 processes must train to
the same test metrics as 1, up to float summation order; evaluating one checkpoint on 2
processes must give the 1-process metrics exactly (each test sample counted once: the test
split has an odd size, so a padding sampler would count a sample twice); and ``lorae
predict`` on 2 processes must write one file with every test sample once, in order.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorae.data import DigitsDataModule
from lorae.methods import METHODS, class_path
from tests.cli.test_methods_cli import CASES
from tests.fixtures.tiny_configs import digits_lora_config, digits_method_config, write_config

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_TEST = 179  # odd on purpose: 2 ranks cannot split it evenly
TEST_FRACTION = NUM_TEST / 1797
# Metrics of a 2-process fit vs a 1-process fit on the same global batches differ only by
# the order of float sums (gradient all-reduce, metric reductions) through 20 AdamW steps.
FIT_TOLERANCE = 1e-4
# The same weights evaluated on 1 or 2 processes: only metric reductions differ.
EVAL_TOLERANCE = 1e-6
METRICS = ("test/acc", "test/nll", "test/ece", "test/brier", "test/f1")
# Rank-based metrics: exact for the same weights, but a 1e-6 change of two close
# confidences after 20 training steps may swap them, so they are compared only in evaluation.
EVAL_METRICS = (*METRICS, "test/aurc", "test/acc_at_cov90", "test/by_mi/aurc")


def ddp_config(ckpt_dir: Path) -> dict[str, Any]:
    config = digits_lora_config(num_members=2, seed=0)
    config["data"]["init_args"].update({"test_fraction": TEST_FRACTION, "eval_batch_size": 32})
    config["trainer"].update(
        {
            "strategy": "ddp",
            "max_steps": 20,
            "limit_val_batches": 0,
            "deterministic": True,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(ckpt_dir), "save_last": True},
                }
            ],
        }
    )
    return config


def lorae(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "lorae", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_test_metrics(root: Path) -> dict[str, float]:
    found = sorted(root.rglob("metrics.json"))
    assert len(found) == 1, found
    metrics: dict[str, float] = json.loads(found[0].read_text())["metrics"]
    return metrics


def fit(tmp_path: Path, devices: int, batch_size: int) -> tuple[dict[str, float], Path]:
    run = tmp_path / f"fit{devices}"
    cfg = write_config(run / "config.in.yaml", ddp_config(run / "ckpt"))
    lorae(
        "fit",
        "--config",
        str(cfg),
        f"--trainer.devices={devices}",
        f"--data.init_args.batch_size={batch_size}",
        f"--trainer.default_root_dir={run / 'out'}",
        "--test_after_fit=true",
    )
    return read_test_metrics(run / "out"), run / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    return fit(tmp_path_factory.mktemp("ddp1"), devices=1, batch_size=16)


def test_two_processes_train_like_one(
    one_process: tuple[dict[str, float], Path], tmp_path: Path
) -> None:
    single, _ = one_process
    double, _ = fit(tmp_path, devices=2, batch_size=8)
    for key in METRICS:
        assert abs(single[key] - double[key]) <= FIT_TOLERANCE, (key, single[key], double[key])


def test_two_process_test_counts_every_sample_once(
    one_process: tuple[dict[str, float], Path], tmp_path: Path
) -> None:
    single, checkpoint = one_process
    config = ddp_config(tmp_path / "unused")
    cfg = write_config(tmp_path / "config.in.yaml", config)
    lorae(
        "test",
        "--config",
        str(cfg),
        "--trainer.devices=2",
        "--ckpt_path",
        str(checkpoint),
        f"--trainer.default_root_dir={tmp_path / 'out'}",
    )
    double = read_test_metrics(tmp_path / "out")
    for key in EVAL_METRICS:
        assert abs(single[key] - double[key]) <= EVAL_TOLERANCE, (key, single[key], double[key])


def test_two_process_predict_writes_one_gathered_file(
    one_process: tuple[dict[str, float], Path], tmp_path: Path
) -> None:
    _, checkpoint = one_process
    cfg = write_config(tmp_path / "config.in.yaml", ddp_config(tmp_path / "unused"))
    out = tmp_path / "predictions.csv"
    lorae(
        "predict",
        "--config",
        str(cfg),
        "--trainer.devices=2",
        "--ckpt_path",
        str(checkpoint),
        f"--trainer.default_root_dir={tmp_path / 'out'}",
        f"--prediction_writer.output_path={out}",
    )
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dm = DigitsDataModule(test_fraction=TEST_FRACTION, seed=0)
    targets = [int(target) for _, target in dm.test_dataset]  # type: ignore[attr-defined]
    assert len(targets) == NUM_TEST
    assert [int(row["index"]) for row in rows] == list(range(NUM_TEST))
    assert [int(row["target"]) for row in rows] == targets
    assert not list(tmp_path.glob("predictions*.csv"))[1:], "expected one prediction file"


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_fits_and_tests_on_two_processes(name: str, tmp_path: Path) -> None:
    """Each method's parameters, buffers and callbacks work under DDP (2 epochs of 2 steps)."""
    method, init_args, num_members = CASES[name]
    config = digits_method_config(class_path(METHODS[method]), init_args)
    config["trainer"].update({"strategy": "ddp", "devices": 2, "deterministic": True})
    cfg = write_config(tmp_path / "config.in.yaml", config)
    lorae(
        "fit",
        "--config",
        str(cfg),
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
        "--test_after_fit=true",
    )
    metrics = read_test_metrics(tmp_path / "out")
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert sorted(k for k in metrics if k.startswith("test/member_acc/")) == [
        f"test/member_acc/{i}" for i in range(num_members)
    ]
