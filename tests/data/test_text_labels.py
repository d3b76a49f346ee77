"""String labels in TSV files (issue 17): class names mapped to indices and stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorae.data import TextClassificationDataModule
from lorae.errors import ConfigError
from tests.fixtures.builders import glue_sentences, write_tiny_tokenizer

NAMES = ("World", "Sports", "Business", "Sci/Tech")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _write(path: Path, labels: list[str], header: bool = True, seed: int = 0) -> Path:
    """``text<TAB>label`` rows (AG News' dev.tsv layout when ``header`` is false)."""
    texts = glue_sentences(len(labels), seed)
    lines = (["sentence\tlabel"] if header else []) + [
        f"{t}\t{label}" for t, label in zip(texts, labels, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _labels(n: int) -> list[str]:
    return [NAMES[i % 4] for i in range(n)]


def test_class_names_are_sorted_mapped_and_stored(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "train.tsv", _labels(16))
    _write(tmp_path / "dev.tsv", ["Sports", " World ", "Sci/Tech"], seed=1)
    data = TextClassificationDataModule(str(tmp_path), str(tokenizer_dir), val_fraction=0.25)
    classes = sorted(NAMES)  # ['Business', 'Sci/Tech', 'Sports', 'World']
    assert data.class_names == classes and data.num_classes == 4
    train = data._tables["train"]
    assert [classes[i] for i in train.labels] == _labels(16)
    assert data._tables["test"].labels == [2, 3, 1]  # surrounding spaces stripped
    assert data.inference_spec().class_names == tuple(classes)  # what checkpoints store
    assert {y for _, y in data.train_dataset} | {y for _, y in data.val_dataset} == {0, 1, 2, 3}
    assert "4 classes named" in capsys.readouterr().err


def test_label_names_fix_the_order(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", _labels(8))
    _write(tmp_path / "dev.tsv", ["Business"])
    data = TextClassificationDataModule(str(tmp_path), str(tokenizer_dir), label_names=list(NAMES))
    assert data.class_names == list(NAMES)
    assert data._tables["train"].labels == [i % 4 for i in range(8)]
    assert data._tables["test"].labels == [2]
    with pytest.raises(ConfigError, match=r"'Sci/Tech' in '.*train\.tsv' line 5 is not in label"):
        TextClassificationDataModule(
            str(tmp_path), str(tokenizer_dir), label_names=["World", "Sports", "Business"]
        )
    with pytest.raises(ConfigError, match="num_classes is 3 but"):
        TextClassificationDataModule(str(tmp_path), str(tokenizer_dir), num_classes=3)


def test_an_unseen_test_label_names_its_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", ["World", "Sports"] * 4)
    _write(tmp_path / "dev.tsv", ["World", "Sports", "Business"])
    with pytest.raises(ConfigError, match=r"'Business' in '.*dev\.tsv' line 4 was not seen in"):
        TextClassificationDataModule(str(tmp_path), str(tokenizer_dir))
    _write(tmp_path / "dev.tsv", ["World", "1"])  # an index among names is a label too
    with pytest.raises(ConfigError, match=r"'1' in '.*dev\.tsv' line 3 was not seen"):
        TextClassificationDataModule(str(tmp_path), str(tokenizer_dir))


def test_header_less_files_like_ag_news(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", _labels(12), header=False)
    _write(tmp_path / "dev.tsv", ["World", "Sports"], header=False, seed=3)
    data = TextClassificationDataModule(
        str(tmp_path), str(tokenizer_dir), header=False, text_column="text", label_column="class"
    )
    assert data.num_classes == 4 and len(data._tables["train"].texts) == 12
    assert data._tables["test"].lines == [1, 2]  # no header: the first line is a row
    assert data._tables["train"].texts[0] == glue_sentences(12, 0)[0]
    with pytest.raises(ConfigError, match="give them two names"):
        TextClassificationDataModule(
            str(tmp_path), str(tokenizer_dir), header=False, text_column="x", label_column="x"
        )


def test_integer_files_with_a_stray_name_keep_refusing_it(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    _write(tmp_path / "train.tsv", ["0", "1", "positive", "1"])
    _write(tmp_path / "dev.tsv", ["0", "1"])
    with pytest.raises(ConfigError, match=r"Invalid label 'positive' in '.*' line 4"):
        TextClassificationDataModule(str(tmp_path), str(tokenizer_dir))
    data = TextClassificationDataModule(str(tmp_path), str(tokenizer_dir), skip_corrupt=True)
    assert data.class_names == ["0", "1"] and data._tables["train"].labels == [0, 1, 1]


def test_an_empty_label_is_refused_by_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", ["World", "", "Sports"])
    _write(tmp_path / "dev.tsv", ["World"])
    with pytest.raises(ConfigError, match=r"Empty label in '.*train\.tsv' line 3"):
        TextClassificationDataModule(str(tmp_path), str(tokenizer_dir))
