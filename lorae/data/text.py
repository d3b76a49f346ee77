"""Sentence classification from tab-separated files (GLUE SST-2 by default)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lorae.data.base import ClassificationDataModule
from lorae.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TextClassificationDataModule"]

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"

_GET_DATA = (
    f"Put the GLUE SST-2 TSV files there (train.tsv and dev.tsv from {SST2_URL}, unzipped), "
    "or point root/train_file/val_file/test_file at your own tab-separated files with a "
    "header row."
)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class _Table:
    """Rows of one TSV file: texts, integer labels and the file line of each row."""

    path: Path
    texts: list[str]
    labels: list[int]
    lines: list[int]


def _read_tsv(path: Path, text_column: str, label_column: str) -> _Table:
    """Read a tab-separated file with a header row, without quote handling (like GLUE)."""
    table = _Table(path=path, texts=[], labels=[], lines=[])
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataNotFoundError(
                f"'{path}' is empty; expected a header row (e.g. 'sentence<TAB>label') followed "
                f"by one example per line. {_GET_DATA}"
            )
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise ConfigError(
                f"Column(s) {missing} not found in the header of '{path}'; its columns are "
                f"{header}. Set text_column / label_column to the right names."
            )
        text_index, label_index = header.index(text_column), header.index(label_column)
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) <= max(text_index, label_index):
                raise ConfigError(
                    f"'{path}' line {line} has {len(row)} tab-separated field(s) but the header "
                    f"has {len(header)} ({header}). Each line needs one value per column."
                )
            raw = row[label_index].strip()
            try:
                label = int(raw)
            except ValueError:
                label = -1
            if label < 0:
                raise ConfigError(
                    f"Invalid label {row[label_index]!r} in '{path}' line {line}: labels must "
                    "be non-negative integers 0, 1, ..., num_classes - 1."
                )
            table.texts.append(row[text_index])
            table.labels.append(label)
            table.lines.append(line)
    return table


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "Text data needs the optional dependency 'transformers': pip install 'lorae[text]'."
        ) from err
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        detail = " ".join(str(err).split())
        reason = f"{type(err).__name__}: {detail[:300]}"
        if Path(name).is_dir():
            problem = f"folder '{name}' has no usable tokenizer files ({reason})"
        else:
            problem = (
                f"{name!r} is not a local folder and could not be loaded as a Hugging Face name, "
                f"which needs internet access ({reason})"
            )
        raise DataNotFoundError(
            f"Could not load the tokenizer: {problem}. Pass `tokenizer` as a local folder that "
            "contains the tokenizer files (tokenizer.json and tokenizer_config.json, e.g. "
            "written by tokenizer.save_pretrained(folder))."
        ) from err


class _EncodedTextDataset(Dataset[tuple[dict[str, list[int]], int]]):
    """Tokenized, unpadded examples: ``(encoding, label)`` pairs."""

    def __init__(self, encodings: list[dict[str, list[int]]], labels: list[int]) -> None:
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, list[int]], int]:
        return self.encodings[index], self.labels[index]


class PadCollator:
    """Pads a batch of tokenized examples to its own longest sequence.

    Args:
        tokenizer: Tokenizer whose ``pad`` method, pad token and padding side are used.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self, batch: list[tuple[dict[str, list[int]], int]]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Pad the encodings and stack the labels.

        Shape:
            - inputs: dict of long ``(B, T)``, ``T`` the longest sequence of the batch.
            - target: long ``(B,)``.
        """
        features = [encoding for encoding, _ in batch]
        padded = self.tokenizer.pad(features, padding="longest", return_tensors="pt")
        inputs = {key: torch.as_tensor(value).long() for key, value in padded.items()}
        target = torch.tensor([label for _, label in batch], dtype=torch.long)
        return inputs, target


class TextClassificationDataModule(ClassificationDataModule):
    """Sentence classification from TSV files; reads the GLUE SST-2 files as they are.

    Each file is tab-separated with a header row and no quoting (as in GLUE, sentences may
    contain quotes). GLUE's ``test.tsv`` has no labels, so like the LoRA-Ensemble paper the
    default test split is ``dev.tsv``; validation is carved out of training (``val_fraction``,
    seeded) unless ``val_file`` is given. Each split is tokenized once at setup without padding;
    batches are padded to their own longest sequence.

    Shape:
        - inputs: ``dict`` with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
          the tokenizer makes them), each long ``(B, T)``.
        - target: long ``(B,)``.

    Args:
        root: Folder with the TSV files.
        tokenizer: Hugging Face tokenizer name or local folder (``AutoTokenizer``).
        train_file: Training file, relative to ``root``.
        val_file: Validation file; ``None`` carves ``val_fraction`` of the training file.
        test_file: Test file (default GLUE ``dev.tsv``).
        text_column: Header name of the text column.
        label_column: Header name of the integer label column.
        max_length: Sequences are truncated to this many tokens (special tokens included).
        num_classes: Number of classes; ``None`` uses the largest training label + 1.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes.
        val_fraction: Share of the training file carved out for validation.
        seed: Seed of the carved split and of the training shuffle.

    Raises:
        DataNotFoundError: If the folder, a file or the tokenizer cannot be found.
        ConfigError: If a column is missing, a label is invalid or an argument is out of range.
    """

    def __init__(
        self,
        root: str,
        tokenizer: str,
        train_file: str = "train.tsv",
        val_file: str | None = None,
        test_file: str = "dev.tsv",
        text_column: str = "sentence",
        label_column: str = "label",
        max_length: int = 128,
        num_classes: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            seed=seed,
        )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}.")
        self.root = Path(root)
        self.max_length = max_length
        if not self.root.is_dir():
            raise DataNotFoundError(f"Text data folder '{self.root}' does not exist. {_GET_DATA}")

        self._tables: dict[str, _Table] = {}
        files = (
            ("train", "Training", train_file),
            ("val", "Validation", val_file),
            ("test", "Test", test_file),
        )
        for split, title, name in files:
            if name is None:
                continue
            path = self.root / name
            if not path.is_file():
                raise DataNotFoundError(f"{title} file '{path}' does not exist. {_GET_DATA}")
            self._tables[split] = _read_tsv(path, text_column, label_column)
        train = self._tables["train"]
        if not train.labels:
            raise DataNotFoundError(f"Training file '{train.path}' has no data rows. {_GET_DATA}")

        if num_classes is None:
            num_classes = max(train.labels) + 1
            if num_classes < 2:
                raise ConfigError(
                    f"Training file '{train.path}' only has label 0; a classifier needs at "
                    "least 2 classes. Set num_classes explicitly."
                )
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}.")
        self._num_classes = num_classes
        for table in self._tables.values():
            for label, line in zip(table.labels, table.lines, strict=True):
                if label >= num_classes:
                    raise ConfigError(
                        f"Invalid label {label} in '{table.path}' line {line}: labels must be "
                        f"in [0, {num_classes}) (num_classes={num_classes})."
                    )
        self.tokenizer = _load_tokenizer(tokenizer)

    @property
    def num_classes(self) -> int:
        """Number of classes (given, or the largest training label + 1)."""
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        """The labels as strings: ``["0", "1", ...]``."""
        return [str(i) for i in range(self._num_classes)]

    @property
    def collate_fn(self) -> PadCollator:
        """Pads each batch to its own longest sequence."""
        return PadCollator(self.tokenizer)

    def _encode(self, table: _Table) -> _EncodedTextDataset:
        if not table.texts:
            return _EncodedTextDataset([], [])
        encoded = self.tokenizer(
            table.texts,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
        )
        keys = [key for key in _MODEL_INPUTS if key in encoded]
        encodings = [{key: list(encoded[key][i]) for key in keys} for i in range(len(table.texts))]
        return _EncodedTextDataset(encodings, list(table.labels))

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Tokenize each split once; carve validation from training unless ``val_file``."""
        train = self._encode(self._tables["train"])
        test = self._encode(self._tables["test"])
        if "val" in self._tables:
            return train, self._encode(self._tables["val"]), test
        rest, val = self.carve(train, self.val_fraction)
        return rest, val, test
