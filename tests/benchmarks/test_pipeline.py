"""The data-pipeline benchmark (benchmarks/pipeline.py) on a tiny model and an ImageFolder
fixture, and the ``num_workers`` / ``pin_memory`` defaults it measures. No timing is
asserted: only that every setting was run, timed and put against the model-only run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import Dataset, TensorDataset

from benchmarks import pipeline
from lorae.data import base
from lorae.data.base import ClassificationDataModule, auto_num_workers
from lorae.errors import ConfigError
from tests.fixtures.builders import write_image_folder
from tests.fixtures.tiny_configs import image_folder_config


@pytest.fixture(autouse=True)
def _keep_thread_count():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_pipeline_benchmark_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_image_folder(root, per_class=8, size=16, splits=("train",))
    config = image_folder_config(root, num_members=2, write_data=False)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    doc, out = tmp_path / "performance.md", tmp_path / "pipeline.json"
    doc.write_text("# Perf\n\nProse.\n")
    args = ["--root", str(root), "--config", str(config_path), "--members", "2"]
    args += ["--steps", "2", "--warmup-steps", "1", "--threads", "1", "--rounds", "2"]
    args += ["--workers", "default", "0"]
    assert pipeline.main([*args, "--output", str(out), "--markdown", str(doc)]) == 0
    result = json.loads(out.read_text())
    assert set(result["settings"]) == {"default", "0"}
    for entry in [*result["settings"].values(), result["model_only"]]:
        assert entry["steps"] == 3 and entry["samples_per_second"] > 0
        assert len(entry["rounds"]) == 2  # every setting in every round
    for entry in result["settings"].values():
        assert entry["ratio"] > 0
    assert result["settings"]["0"]["num_workers"] == 0
    assert result["settings"]["default"]["pin_memory"] is False  # CPU trainer
    assert result["environment"]["cpu_kind"] and result["environment"]["available_cores"] >= 1
    text = doc.read_text()
    assert text.startswith("# Perf\n\nProse.") and "| model only (one batch in memory)" in text
    kind = result["environment"]["cpu_kind"]
    assert text.count(f"<!-- pipeline:cpu-{kind}:start -->") == 1
    assert pipeline.main(["--from-json", str(out), "--markdown", str(doc)]) == 0
    assert doc.read_text() == text


def test_step_timer_counts_samples_after_the_warm_up() -> None:
    timer = pipeline.StepTimer()
    timer.ends, timer.batch_sizes = [1.0, 3.0, 5.0, 6.0], [4, 4, 4, 2]
    assert timer.throughput(1) == pytest.approx((4 + 4 + 2) / 5.0)
    with pytest.raises(RuntimeError):
        timer.throughput(4)


def test_extract_finds_the_image_folder_root(tmp_path: Path) -> None:
    import tarfile

    write_image_folder(tmp_path / "src", per_class=1, size=8, splits=("train",))
    archive = tmp_path / "train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    root = pipeline.extract(archive, tmp_path / "out")
    assert (root / "train").is_dir() and len(list((root / "train").rglob("*.jpg"))) == 3


@pytest.mark.parametrize(
    ("cores", "accelerator", "workers"),
    [
        (1, "cpu", 0),
        (2, "cpu", 0),
        (64, "cpu", 0),
        (2, "cuda", 1),
        (16, "cuda", 8),
        (1, "cuda", 0),
    ],
)
def test_auto_num_workers(cores: int, accelerator: str, workers: int) -> None:
    assert auto_num_workers(cores, accelerator) == workers


class _Tiny(ClassificationDataModule):
    """A data module that leaves the loader options at the base's defaults."""

    num_classes = 2  # type: ignore[assignment]
    class_names = ["a", "b"]  # type: ignore[assignment]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        data = TensorDataset(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))
        return data, data, data


def test_data_module_defaults_resolve_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _Tiny()
    assert data.num_workers == "auto" and data.pin_memory == "auto"
    monkeypatch.setattr(base, "available_cores", lambda: 16)
    assert data.loader_workers == 0 and data.loader_pin_memory is False  # no trainer: CPU
    loader = data.train_dataloader()
    assert loader.num_workers == 0 and loader.pin_memory is False
    monkeypatch.setattr(_Tiny, "_accelerator", lambda self: "cuda")
    assert data.loader_workers == 8 and data.loader_pin_memory is True
    assert data.val_dataloader().num_workers == 8
    monkeypatch.setattr(base, "available_cores", lambda: 1)
    assert data.val_dataloader().num_workers == 0  # one core: nothing left for a worker


def test_bad_loader_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="pin_memory"):
        _Tiny(pin_memory="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_workers"):
        _Tiny(num_workers=-1)
    assert _Tiny(num_workers=3, pin_memory=True).loader_workers == 3


def test_explicit_loader_options_win(tmp_path: Path) -> None:
    from lorae.data import ImageFolderDataModule

    write_image_folder(tmp_path, per_class=2, size=8, splits=("train",))
    data = ImageFolderDataModule(
        str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.2, num_workers=0
    )
    assert data.loader_workers == 0
    assert data.train_dataloader().num_workers == 0
