"""Sentence classification from tab-separated files (GLUE SST-2 by default; the paper's text
benchmark, section 4). Labels are integers or class names (e.g. AG News' ``World``)."""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lorae.data.base import ClassificationDataModule, EvaluationSet, split_indices
from lorae.data.inference import InferenceSpec, TextInput
from lorae.data.preprocessing import Preprocessing, TextPreprocessing
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError, LoraeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TextClassificationDataModule"]

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"

_GET_DATA = (
    f"Put the GLUE SST-2 TSV files there (train.tsv and dev.tsv from {SST2_URL}, unzipped; "
    "`download: true` does this on a machine with internet access), or point "
    "root/train_file/val_file/test_file at your own tab-separated files with a header row."
)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


#: How the label column is read: integers ``0 .. C-1`` or class names (any non-empty text).
LabelKind = Literal["index", "name"]


@dataclass
class _Table:
    """Rows of one TSV file: texts, integer labels and the file line of each row; ``names``
    holds the label text of each row when the labels are class names (else it is empty)."""

    path: Path
    texts: list[str]
    labels: list[int]
    lines: list[int]
    names: list[str] = field(default_factory=list)


def _is_index(raw: str) -> bool:
    # ASCII digits only: str.isdigit accepts '²', which int() refuses.
    return raw.isascii() and raw.isdigit()


def _read_tsv(
    path: Path,
    text_column: str,
    label_column: str,
    skip_corrupt: bool = False,
    header: bool = True,
    labels: LabelKind = "index",
) -> _Table:
    """Read a tab-separated file, without quote handling (like GLUE).

    A row with too few fields raises :class:`CorruptSampleError`, a label that is not a
    non-negative integer (``labels="index"``) or an empty label (``labels="name"``)
    :class:`ConfigError`, each naming the file and line; with ``skip_corrupt`` such a row is
    left out and reported on stderr, with the count at the end. Without a ``header`` row the
    columns are ``text_column`` and ``label_column``, in that order. With ``labels="name"``
    the label text is kept in :attr:`_Table.names` (``labels`` stays ``-1`` until mapped).
    """
    try:
        return _read_rows(path, text_column, label_column, skip_corrupt, header, labels)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error


def _label_kind(path: Path, text_column: str, label_column: str, header: bool) -> LabelKind:
    """``"name"`` when no well-formed row of the training file has an integer label (e.g. AG
    News' ``World``/``Sports``), else ``"index"``: a file of integers with a few stray names
    stays an integer file, whose reader then names the stray lines."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            columns = next(reader, None) if header else [text_column, label_column]
            if not columns or label_column not in columns:
                return "index"  # the reader reports the missing header or column
            index, seen = columns.index(label_column), False
            for row in reader:
                if len(row) != len(columns) or not row[index].strip():
                    continue
                if _is_index(row[index].strip()):
                    return "index"
                seen = True
            return "name" if seen else "index"
    except (UnicodeDecodeError, csv.Error):
        return "index"  # the reader reports the line


def _read_rows(
    path: Path,
    text_column: str,
    label_column: str,
    skip_corrupt: bool,
    has_header: bool = True,
    kind: LabelKind = "index",
) -> _Table:
    table = _Table(path=path, texts=[], labels=[], lines=[])
    skipped: list[int] = []
    if not has_header and text_column == label_column:
        raise ConfigError(
            f"text_column and label_column are both {text_column!r}; a file without a header "
            "row has the text first and the label second, so give them two names."
        )
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) if has_header else [text_column, label_column]
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
        for row in _rows(reader, path):
            if not row:
                continue
            line = reader.line_num
            problem = None
            error: type[LoraeError] = CorruptSampleError  # a truncated or malformed row
            label = -1
            if len(row) != len(header):  # too few fields, or a tab inside the text
                problem = (
                    f"'{path}' line {line} has {len(row)} tab-separated field(s) but the header "
                    f"has {len(header)} ({header}). Each line needs exactly one value per "
                    "column (a tab inside a text splits it)."
                )
            elif kind == "name":
                raw = row[label_index].strip()
                if not raw:
                    error = ConfigError
                    problem = f"Empty label in '{path}' line {line}: every row needs a label."
            else:
                raw = row[label_index].strip()
                label = int(raw) if _is_index(raw) else -1
                if label < 0:
                    error = ConfigError  # a label problem, like a label >= num_classes
                    problem = (
                        f"Invalid label {row[label_index]!r} in '{path}' line {line}: labels "
                        "must be non-negative integers 0, 1, ..., num_classes - 1 (or all "
                        "class names, e.g. 'World', 'Sports')."
                    )
            if problem is not None:
                if not skip_corrupt:
                    raise error(
                        f"{problem} Fix the line, or set skip_corrupt: true to leave such rows out."
                    )
                print(f"lorae: skipping corrupt row: {problem}", file=sys.stderr)
                skipped.append(line)
                continue
            table.texts.append(row[text_index])
            table.labels.append(label)
            table.lines.append(line)
            if kind == "name":
                table.names.append(row[label_index].strip())
    if skipped:
        print(
            f"lorae: skipped {len(skipped)} corrupt row(s) of '{path}' (lines "
            f"{', '.join(map(str, skipped[:20]))}{' ...' if len(skipped) > 20 else ''}).",
            file=sys.stderr,
        )
    return table


def _not_utf8(path: Path, error: UnicodeDecodeError) -> CorruptSampleError:
    """The error for a text file that is not UTF-8, naming the first line that is not."""
    line = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                line = number
                break
    where = f" line {line}" if line else ""
    byte = error.object[error.start]
    return CorruptSampleError(
        f"'{path}'{where} is not UTF-8 text ({error.reason}, byte {byte:#04x}). Save the "
        "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.tsv > out.tsv` for a "
        "Latin-1 file."
    )


def _rows(reader: Any, path: Path) -> Iterator[list[str]]:
    """The rows of a ``csv.reader``; a line the csv module refuses (e.g. a field over its size
    limit) becomes a :class:`CorruptSampleError` naming the file and line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise CorruptSampleError(
                f"'{path}' line {reader.line_num} cannot be read as tab-separated text ({error})."
            ) from error
        yield row


def _take(table: _Table, indices: list[int]) -> _Table:
    """The rows ``indices`` of ``table``, in that order."""
    return _Table(
        table.path,
        [table.texts[i] for i in indices],
        [table.labels[i] for i in indices],
        [table.lines[i] for i in indices],
        [table.names[i] for i in indices] if table.names else [],
    )


def _name_classes(
    tables: dict[str, _Table], label_names: list[str] | None, num_classes: int | None
) -> list[str]:
    """Map the label names of every table to indices in place; returns the class names.

    Classes are ``label_names`` in that order, or the sorted label names of the training file.
    Every validation/test label must be a training class (else its file and line are named).

    Raises:
        ConfigError: An unknown label, fewer than 2 classes, or a ``num_classes`` that differs
            from the number of names.
    """
    train = tables["train"]
    classes = sorted(set(train.names)) if label_names is None else [str(n) for n in label_names]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"label_names lists a name twice: {classes}.")
    if len(classes) < 2:
        raise ConfigError(
            f"Training file '{train.path}' only has the label {classes}; a classifier needs at "
            "least 2 classes."
        )
    if num_classes is not None and num_classes != len(classes):
        raise ConfigError(
            f"num_classes is {num_classes} but the labels of '{train.path}' name "
            f"{len(classes)} classes {classes}; drop num_classes or fix the labels."
        )
    index = {name: i for i, name in enumerate(classes)}
    for table in tables.values():
        for row, (name, line) in enumerate(zip(table.names, table.lines, strict=True)):
            if name not in index:
                where = (
                    "is not in label_names"
                    if label_names is not None
                    else ("was not seen in training")
                )
                raise ConfigError(
                    f"Label {name!r} in '{table.path}' line {line} {where} (classes: "
                    f"{classes}). Fix the label, or add it to the "
                    f"{'label_names' if label_names is not None else 'training file'}."
                )
            table.labels[row] = index[name]
    counts = Counter(train.labels)
    summary = ", ".join(f"{name}: {counts[i]}" for i, name in enumerate(classes))
    print(
        f"lorae: {len(classes)} classes named in '{train.path}' (examples per class: "
        f"{summary}); set label_names to fix their order.",
        file=sys.stderr,
    )
    return classes


def _subset(table: _Table, limit: int, seed: int) -> _Table:
    """``limit`` rows of ``table`` drawn without replacement with ``seed``, in file order
    (all rows when it has no more than ``limit``)."""
    n = len(table.labels)
    if n <= limit:
        return table
    generator = torch.Generator().manual_seed(seed)
    return _take(table, sorted(torch.randperm(n, generator=generator)[:limit].tolist()))


def _download_sst2(root: Path) -> None:
    """Download and extract GLUE SST-2 into ``root`` (``train.tsv``, ``dev.tsv``, ``test.tsv``)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(SST2_URL, str(root), filename="SST-2.zip")
    for path in (root / "SST-2").glob("*.tsv"):  # the archive holds one folder, SST-2/
        path.replace(root / path.name)


def _read_texts(path: Path, column: int, header: bool) -> list[str]:
    """Column ``column`` of every non-empty line of a tab-separated file (no quoting)."""
    try:
        return _read_column(path, column, header)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error


def _read_column(path: Path, column: int, header: bool) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            next(reader, None)
        for row in _rows(reader, path):
            if not row:
                continue
            if len(row) <= column:
                raise CorruptSampleError(
                    f"'{path}' line {reader.line_num} has {len(row)} tab-separated field(s); "
                    f"ood_text_column={column} needs at least {column + 1}."
                )
            texts.append(row[column])
    if not texts:
        raise DataNotFoundError(f"Out-of-distribution file '{path}' has no text lines.")
    return texts


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


def _inferred_classes(train: _Table) -> int:
    """C inferred from the training labels (largest + 1), reported with the count per class.

    Raises:
        ConfigError: fewer than 2 classes, or a class below the largest label has no training
            example (a stray label such as 5 among 0/1 would silently add empty classes); the
            message names the line of the largest label and says to set ``num_classes``.
    """
    counts = Counter(train.labels)
    num_classes = max(counts) + 1
    if num_classes < 2:
        raise ConfigError(
            f"Training file '{train.path}' only has label 0; a classifier needs at least 2 "
            "classes. Set num_classes explicitly."
        )
    empty = [c for c in range(num_classes) if c not in counts]
    if empty:
        top = max(counts)
        line = train.lines[train.labels.index(top)]
        raise ConfigError(
            f"The labels of '{train.path}' imply {num_classes} classes (largest label {top}, "
            f"line {line}), but class(es) {empty} have no training example. Fix the stray "
            f"label, or set num_classes: {num_classes} if the classes are meant to exist."
        )
    summary = ", ".join(f"{c}: {counts[c]}" for c in range(num_classes))
    print(
        f"lorae: {num_classes} classes inferred from '{train.path}' (examples per class: "
        f"{summary}); set num_classes to fix the number.",
        file=sys.stderr,
    )
    return num_classes


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
    seeded) unless ``val_file`` is given, or carved out of the test file with
    ``test_val_fraction``. ``train_limit``, ``test_limit`` and ``ood_limit`` take fixed
    seeded subsets (``subset_seed``), e.g. for CPU-scale experiments. Each split is tokenized
    once at setup without padding; batches are padded to their own longest sequence.

    Shape:
        - inputs: ``dict`` with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
          the tokenizer makes them), each long ``(B, T)``.
        - target: long ``(B,)``.

    Args:
        root: Folder with the TSV files.
        tokenizer: Hugging Face tokenizer name or local folder (``AutoTokenizer``); ``None``
            uses the backbone's own (``preprocessing``).
        preprocessing: The backbone's tokenizer (its pretrained folder, its package's folder
            or its Hugging Face name); the CLI links it from the method's ``backbone`` and
            ``pretrained``.
        train_file: Training file, relative to ``root``.
        val_file: Validation file; ``None`` carves ``val_fraction`` of the training file.
        test_file: Test file (default GLUE ``dev.tsv``).
        text_column: Header name of the text column.
        label_column: Header name of the label column: integers ``0 .. C-1``, or class names
            (e.g. AG News' ``World``, ``Sports``, ...; used when no training label is an
            integer), mapped to indices in sorted order (or ``label_names`` order); a
            validation/test label not among the training labels is refused, naming its line.
        header: Whether the files start with a header row; without one (AG News'
            ``dev.tsv``: ``text<TAB>class name``) the columns are ``text_column`` and
            ``label_column``, in that order.
        max_length: Sequences are truncated to this many tokens (special tokens included).
        num_classes: Number of classes; ``None`` uses the largest training label + 1 (or the
            number of ``label_names``, or of the training files' class names).
        label_names: Name of each class in label order (``label_names[i]`` names label
            ``i``), e.g. ``[negative, positive]``; stored in checkpoints and written as
            ``pred_name`` by ``lorae predict``. With class-name labels it fixes their order
            (every label must be listed). ``None``: the labels as strings, or the sorted
            class names.
        download: When ``root`` lacks ``train_file``, download GLUE SST-2 (``SST2_URL``) and
            put its TSV files into ``root``.
        ood_file: Tab-separated file of out-of-distribution texts for ``lorae test`` (paper
            section 3: SST-2 vs another text set), absolute or relative to ``root``; its
            labels are ignored. E.g. AG News ``dev.tsv`` (``text<TAB>class``, no header).
        ood_text_column: Index of the text column of ``ood_file`` (0 = first).
        ood_header: Whether ``ood_file`` starts with a header row (skipped).
        ood_name: Name of the OOD set in metric keys; default ``<folder>/<file stem>``.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of the training file carved out for validation.
        seed: Seed of the carved split and of the training shuffle.
        skip_corrupt: Leave malformed rows (too few fields, a label that is not a
            non-negative integer) out, reporting each and their count, instead of stopping.
        train_limit: Keep only this many rows of ``train_file``, drawn with ``subset_seed``
            (``None``: all), e.g. a fixed 4,000-sentence SST-2 subset.
        test_val_fraction: Share of ``test_file`` carved out (with ``subset_seed``) as the
            validation split instead of carving validation out of training; the rest stays
            the test split, so the two are disjoint. ``0`` (default) keeps the usual split;
            cannot be combined with ``val_file``.
        test_limit: Keep only this many test rows (after carving validation), drawn with
            ``subset_seed``.
        ood_limit: Keep only this many ``ood_file`` texts, drawn with ``subset_seed``.
        subset_seed: Seed of ``train_limit``, ``test_val_fraction``, ``test_limit`` and
            ``ood_limit``; separate from ``seed`` so that the subsets stay the same when
            the run's seed (training shuffle) changes.

    Raises:
        DataNotFoundError: If the folder, a file or the tokenizer cannot be found.
        ConfigError: If a column is missing, a label is invalid or an argument is out of range.
        CorruptSampleError: If a row has too few fields (file and line named) and not
            ``skip_corrupt``.
    """

    def __init__(
        self,
        root: str,
        tokenizer: str | None = None,
        train_file: str = "train.tsv",
        val_file: str | None = None,
        test_file: str = "dev.tsv",
        text_column: str = "sentence",
        label_column: str = "label",
        header: bool = True,
        max_length: int = 128,
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        download: bool = False,
        ood_file: str | None = None,
        ood_text_column: int = 0,
        ood_header: bool = False,
        ood_name: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        train_limit: int | None = None,
        test_val_fraction: float = 0.0,
        test_limit: int | None = None,
        ood_limit: int | None = None,
        subset_seed: int = 0,
        preprocessing: Preprocessing = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            val_fraction=val_fraction,
            seed=seed,
            skip_corrupt=skip_corrupt,
        )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}.")
        self.root = Path(root)
        self.max_length = max_length
        if download and not (self.root / train_file).is_file():
            _download_sst2(self.root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"Text data folder '{self.root}' does not exist. {_GET_DATA}")

        self._tables: dict[str, _Table] = {}
        files = (
            ("train", "Training", train_file),
            ("val", "Validation", val_file),
            ("test", "Test", test_file),
        )
        kind: LabelKind = "index"
        for split, title, name in files:
            if name is None:
                continue
            path = self.root / name
            if not path.is_file():
                raise DataNotFoundError(f"{title} file '{path}' does not exist. {_GET_DATA}")
            if split == "train":
                kind = _label_kind(path, text_column, label_column, header)
            self._tables[split] = _read_tsv(
                path, text_column, label_column, skip_corrupt, header, kind
            )
        train = self._tables["train"]
        if not train.labels:
            raise DataNotFoundError(f"Training file '{train.path}' has no data rows. {_GET_DATA}")

        if kind == "name":
            if num_classes is not None and (
                isinstance(num_classes, bool) or not isinstance(num_classes, int)
            ):
                raise ConfigError(f"num_classes must be an integer or None, got {num_classes!r}.")
            label_names = _name_classes(self._tables, label_names, num_classes)
            num_classes = len(label_names)
        if num_classes is None and label_names is not None:
            num_classes = len(label_names)
        if num_classes is None:
            num_classes = _inferred_classes(train)
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}.")
        self._num_classes = num_classes
        if label_names is not None and len(label_names) != num_classes:
            raise ConfigError(
                f"label_names has {len(label_names)} names but the data has {num_classes} "
                "classes: give one name per class, in label order."
            )
        self._label_names = None if label_names is None else [str(n) for n in label_names]
        for table in self._tables.values():
            for label, line in zip(table.labels, table.lines, strict=True):
                if label >= num_classes:
                    raise ConfigError(
                        f"Invalid label {label} in '{table.path}' line {line}: labels must be "
                        f"in [0, {num_classes}) (num_classes={num_classes})."
                    )
        self.ood_file: Path | None = None
        if ood_file is not None:
            self.ood_file = Path(ood_file) if Path(ood_file).is_absolute() else self.root / ood_file
            if not self.ood_file.is_file():
                raise DataNotFoundError(
                    f"Out-of-distribution file '{self.ood_file}' does not exist. Give ood_file "
                    "as a tab-separated text file (absolute, or relative to root)."
                )
        if ood_text_column < 0:
            raise ConfigError(f"ood_text_column must be >= 0, got {ood_text_column}.")
        self.ood_text_column = ood_text_column
        self.ood_header = ood_header
        self.ood_name = ood_name
        for name, limit in (
            ("train_limit", train_limit),
            ("test_limit", test_limit),
            ("ood_limit", ood_limit),
        ):
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
            ):
                raise ConfigError(f"{name} must be a positive integer or None, got {limit!r}.")
        if isinstance(subset_seed, bool) or not isinstance(subset_seed, int):
            raise ConfigError(f"subset_seed must be an integer, got {subset_seed!r}.")
        self.subset_seed = subset_seed
        if (
            isinstance(test_val_fraction, bool)
            or not isinstance(test_val_fraction, (int, float))
            or not 0.0 <= test_val_fraction < 1.0
        ):
            raise ConfigError(
                f"test_val_fraction must be a number in [0, 1) (the share of the test file "
                f"used as validation split), got {test_val_fraction!r}."
            )
        self.test_val_fraction = float(test_val_fraction)
        if self.test_val_fraction > 0 and val_file is not None:
            raise ConfigError(
                "Give either val_file or test_val_fraction (validation carved out of the test "
                "file), not both."
            )
        self.ood_limit = ood_limit
        if train_limit is not None:
            self._tables["train"] = _subset(self._tables["train"], train_limit, subset_seed)
        if self.test_val_fraction > 0:
            test = self._tables["test"]
            rest, val = split_indices(len(test.labels), [self.test_val_fraction], subset_seed)
            self._tables["val"] = _take(test, val)
            self._tables["test"] = _take(test, rest)
        if test_limit is not None:
            self._tables["test"] = _subset(self._tables["test"], test_limit, subset_seed)
        if tokenizer is None:
            if not isinstance(preprocessing, TextPreprocessing):
                raise ConfigError(
                    "TextClassificationDataModule needs a tokenizer: give `tokenizer` (a local "
                    "folder with the tokenizer files, or a Hugging Face name), or use it with a "
                    "text backbone, whose own tokenizer the CLI passes as `preprocessing`."
                )
            tokenizer = preprocessing.tokenizer
        self.tokenizer_name = tokenizer
        self.tokenizer = _load_tokenizer(tokenizer)

    @property
    def num_classes(self) -> int:
        """Number of classes (given, or the largest training label + 1)."""
        return self._num_classes

    def inference_spec(self) -> InferenceSpec:
        """The tokenizer, ``max_length`` and the label names (stored in checkpoints)."""
        return InferenceSpec(
            TextInput(self.tokenizer_name, self.max_length), tuple(self.class_names)
        )

    @property
    def class_names(self) -> list[str]:
        """``label_names``, the training file's class names, or the labels as strings:
        ``["0", "1", ...]``."""
        if self._label_names is not None:
            return list(self._label_names)
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

    def build_evaluation_sets(self) -> list[EvaluationSet]:
        """The ``ood_file`` texts as one ``kind="ood"`` set, tokenized like the test split;
        every target is ``-1`` (no in-distribution class)."""
        if self.ood_file is None:
            return []
        texts = _read_texts(self.ood_file, self.ood_text_column, self.ood_header)
        table = _Table(self.ood_file, texts, [-1] * len(texts), list(range(len(texts))))
        if self.ood_limit is not None:
            table = _subset(table, self.ood_limit, self.subset_seed)
        name = self.ood_name or f"{self.ood_file.parent.name}/{self.ood_file.stem}"
        return [EvaluationSet(name, "ood", self._encode(table))]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Tokenize each split once; carve validation from training unless ``val_file``."""
        train = self._encode(self._tables["train"])
        test = self._encode(self._tables["test"])
        if "val" in self._tables:
            return train, self._encode(self._tables["val"]), test
        rest, val = self.carve(train, self.val_fraction)
        return rest, val, test
