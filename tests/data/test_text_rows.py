"""TSV rows are read exactly or refused naming file and line (issue 19.3, 19.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorae.data import TextClassificationDataModule
from lorae.errors import ConfigError, CorruptSampleError
from tests.fixtures.builders import write_glue_tsv, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _module(root: Path, tokenizer: Path, **options: object) -> TextClassificationDataModule:
    return TextClassificationDataModule(str(root), str(tokenizer), **options)  # type: ignore[arg-type]


def _append(path: Path, line: str) -> int:
    """Append one raw line; returns its line number."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text + line + "\n", encoding="utf-8")
    return len((text + line).splitlines())


def test_a_row_with_more_fields_than_the_header_is_refused(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    root = write_glue_tsv(tmp_path / "sst2")
    line = _append(root / "train.tsv", "score\t1\t0")  # read as ("score", 1) until now
    with pytest.raises(CorruptSampleError, match=rf"train\.tsv' line {line} has 3 .* has 2"):
        _module(root, tokenizer_dir)
    data = _module(root, tokenizer_dir, skip_corrupt=True)  # or left out, when asked
    assert "score" not in data._tables["train"].texts


def test_inferred_class_counts_are_printed(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_glue_tsv(tmp_path / "sst2", n_train=24)
    assert _module(root, tokenizer_dir).num_classes == 2
    err = capsys.readouterr().err
    assert "2 classes inferred" in err and "(examples per class: 0: 12, 1: 12)" in err


def test_a_stray_label_does_not_build_empty_classes(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_glue_tsv(tmp_path / "sst2")
    line = _append(root / "train.tsv", "a stray row\t5")
    with pytest.raises(ConfigError, match=rf"imply 6 classes .*line {line}.*\[2, 3, 4\]"):
        _module(root, tokenizer_dir)
    assert _module(root, tokenizer_dir, num_classes=6).num_classes == 6  # unless it says so


def test_a_latin1_file_names_file_and_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_glue_tsv(tmp_path / "sst2")
    path = root / "train.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = "caf\u00e9 cr\u00e8me\t1"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(CorruptSampleError, match=r"train\.tsv' line 5 is not UTF-8 .*iconv"):
        _module(root, tokenizer_dir)


def test_a_latin1_ood_file_names_file_and_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_glue_tsv(tmp_path / "sst2")
    ood = tmp_path / "news.tsv"
    ood.write_bytes("fine line\tWorld\nna\u00efve\tWorld\n".encode("latin-1"))
    data = _module(root, tokenizer_dir, ood_file=str(ood))
    with pytest.raises(CorruptSampleError, match=r"news\.tsv' line 2 is not UTF-8"):
        data.build_evaluation_sets()
