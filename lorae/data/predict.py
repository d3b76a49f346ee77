"""New, unlabelled inputs for ``lorae predict --data.predict_path``: images, text or audio."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lorae.data.base import ClassificationDataModule
from lorae.data.inference import (
    AudioInput,
    ImageInput,
    InferenceSpec,
    InputReader,
    TextInput,
    input_spec,
)
from lorae.data.preprocessing import Preprocessing
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError

__all__ = ["PredictionDataModule", "discover_inputs"]


def _image_extensions() -> set[str]:
    Image.init()
    return {
        ext.lower() for ext, name in Image.registered_extensions().items() if name in Image.OPEN
    }


def _files(path: Path, extensions: set[str], what: str) -> list[Path]:
    """``path`` itself, or the files under it (recursively, sorted) with these extensions;
    other files are reported on stderr, never silently dropped."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataNotFoundError(
            f"predict_path '{path}' does not exist: give a file or a folder of {what}."
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    chosen = [p for p in files if p.suffix.lower() in extensions]
    ignored = [p for p in files if p.suffix.lower() not in extensions]
    if ignored:
        shown = ", ".join(str(p) for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(
            f"lorae: ignoring {len(ignored)} file(s) under '{path}' that are not {what}: {shown}",
            file=sys.stderr,
        )
    if not chosen:
        raise DataNotFoundError(
            f"No {what} found under '{path}' (extensions: {', '.join(sorted(extensions))})."
        )
    return chosen


def _text_items(path: Path, text_column: str | None) -> list[tuple[str, Any]]:
    """``(name, text)`` per line of a text file (``name`` = ``file:line``) or per row of a TSV
    column. A line that is not UTF-8 becomes a :class:`CorruptSampleError` (raised when read)."""
    if not path.is_file():
        raise DataNotFoundError(
            f"predict_path '{path}' is not a file: give a text file (one sentence a line) or a "
            "TSV file with a header row."
        )
    raw = path.read_bytes().splitlines()
    lines: list[Any] = []
    for number, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as error:
            lines.append(CorruptSampleError(f"'{path}' line {number} is not UTF-8 text ({error})."))
    if path.suffix.lower() != ".tsv":
        return [(f"{path}:{n}", text) for n, text in enumerate(lines, start=1)]
    header = next(csv.reader(io.StringIO(str(lines[0])), delimiter="\t")) if lines else []
    column = text_column or ("sentence" if "sentence" in header else None)
    if column is None or column not in header:
        raise ConfigError(
            f"Column {column!r} not found in the header of '{path}' (columns: {header}): set "
            "--data.text_column to the column holding the text."
        )
    index = header.index(column)
    items: list[tuple[str, Any]] = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t") if isinstance(line, str) else None
        if fields is None:
            items.append((f"{path}:{number}", line))
        elif len(fields) <= index:
            problem = CorruptSampleError(f"'{path}' line {number} has no {column!r} field.")
            items.append((f"{path}:{number}", problem))
        else:
            items.append((f"{path}:{number}", fields[index]))
    return items


def discover_inputs(
    path: Path, spec: ImageInput | TextInput | AudioInput, text_column: str | None = None
) -> list[tuple[str, Any]]:
    """The inputs under ``path`` as ``(name, item)`` pairs in a fixed order.

    Images: ``path`` is one image or a folder searched recursively for every format PIL
    reads. Text: a text file (one input a line) or a ``.tsv`` file's ``text_column``.
    Audio: one WAV file or a folder of them (recursively).

    Raises:
        DataNotFoundError: nothing to predict on at ``path``.
        ConfigError: the TSV column does not exist.
    """
    if isinstance(spec, TextInput):
        return _text_items(path, text_column)
    if isinstance(spec, ImageInput):
        files = _files(path, _image_extensions(), "images")
    else:
        files = _files(path, {".wav"}, "WAV files")
    return [(str(p), p) for p in files]


class _Inputs(Dataset[tuple[Any, int]]):
    """``(sample, index)`` per input; an unreadable input raises :class:`CorruptSampleError`
    naming it (``skip_corrupt`` leaves it out and reports it)."""

    def __init__(self, items: list[tuple[str, Any]], reader: InputReader) -> None:
        self.items = items
        self.reader = reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        name, item = self.items[index]
        if isinstance(item, CorruptSampleError):
            raise item
        try:
            return self.reader.load(item), index
        except CorruptSampleError as error:
            if name in str(error):
                raise
            raise CorruptSampleError(f"'{name}': {error}") from error


class PredictionDataModule(ClassificationDataModule):
    """Unlabelled inputs to predict on, read as the trained model's data module read its own.

    ``lorae predict --ckpt_path K --data.predict_path P`` builds it from the checkpoint's
    input record (:class:`~lorae.data.inference.InferenceSpec`); it only predicts. Batches
    are ``(inputs, index)``: the "target" of each sample is its position in
    :meth:`predict_sample_names`, so inputs left out by ``skip_corrupt`` keep their names.

    Args:
        predict_path: a folder of images (recursively, any format PIL reads), one image, a
            text file (one input a line), a TSV file (the ``text_column``), or a folder of
            WAV files.
        inputs: the input description (``InferenceSpec.to_record()["inputs"]``).
        class_names: the model's class names in label order.
        text_column: the TSV column with the text (default ``sentence``).
        preprocessing: set by the CLI's backbone link; ignored (``inputs`` is what the model
            was trained with).
        batch_size: inputs per batch.
        eval_batch_size: inputs per batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        skip_corrupt: leave unreadable inputs out (each reported on stderr with its path,
            and the count at the end) instead of stopping with the error.

    Raises:
        DataNotFoundError: nothing to predict on at ``predict_path``.
        ConfigError: a malformed ``inputs`` record or empty ``class_names``.
    """

    def __init__(
        self,
        predict_path: str,
        inputs: dict[str, Any],
        class_names: list[str],
        text_column: str | None = None,
        preprocessing: Preprocessing = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            val_fraction=0.0,
            skip_corrupt=skip_corrupt,
        )
        if not class_names:
            raise ConfigError("class_names must name at least one class.")
        self.spec = InferenceSpec(input_spec(inputs), tuple(class_names))
        self.predict_path = Path(predict_path)
        self.items = discover_inputs(self.predict_path, self.spec.inputs, text_column)
        self._reader: InputReader | None = None

    @property
    def num_classes(self) -> int:
        return len(self.spec.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    def inference_spec(self) -> InferenceSpec:
        return self.spec

    @property
    def predict_has_targets(self) -> bool:
        return False

    @property
    def reader(self) -> InputReader:
        """The input reader (loads the tokenizer or audio backend on first use)."""
        if self._reader is None:
            self._reader = InputReader(self.spec.inputs)
        return self._reader

    @property
    def collate_fn(self) -> Any:
        return self.reader.collate

    def setup(self, stage: str | None = None) -> None:
        """Nothing to build: the inputs were discovered in ``__init__``."""

    def _splits(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        return self.build_datasets()  # raises: there are no splits

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        raise ConfigError(
            "PredictionDataModule holds unlabelled inputs: it only predicts (`lorae predict`). "
            "Train, validate and test with the data module of the training config."
        )

    def predict_dataloader(self) -> DataLoader[Any]:
        """The inputs in :meth:`predict_sample_names` order, without labels."""
        return self._loader(_Inputs(self.items, self.reader), self.eval_batch_size)

    def predict_sample_names(self) -> list[str]:
        """The file of each input (``file:line`` for text), as discovered."""
        return [name for name, _ in self.items]
