"""A user's own recordings: WAV files labelled by their class folder or by a file-name pattern,
split by sample, by group (speaker) or by split folder, with AST's log-mel features (paper
section 4, App. A.2).

Two layouts:

- class folders, like ``ImageFolder``: ``root/<class>/**/*.wav``;
- a file-name pattern: every ``root/**/*.wav`` named by a regular expression with the named
  groups ``label`` and optionally ``group``, e.g. the Free Spoken Digit Dataset's
  ``<digit>_<speaker>_<index>.wav``: ``(?P<label>\\d)_(?P<group>[a-z]+)_\\d+\\.wav``. A
  pattern with only ``group`` keeps the class folders and reads the groups from the names.

``split_by: group`` puts every group (speaker, recording session, patient) into one split
only, so a test score measures generalisation to unseen groups. ``split_by: folder`` reads
splits made beforehand, ``root/train/``, ``root/val/`` (optional) and ``root/test/``, each in
one of the two layouts (e.g. ``root/train/<class>/*.wav``, as ``ImageFolder`` users keep them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from lorae.data.audio import AudioClips, LogMelFeatures
from lorae.data.base import ClassificationDataModule, _check_fraction, split_indices
from lorae.data.inference import AudioInput, InferenceSpec
from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["AudioFolderDataModule"]

#: AST's AudioSet normalisation statistics (Gong et al. 2021), the default for new data.
AST_AUDIOSET_MEAN, AST_AUDIOSET_STD = -4.2677393, 4.5689974

_LAYOUT = (
    "Expected either class folders, root/<class>/**/*.wav, or WAV files anywhere under root "
    "whose names match `pattern` (a regular expression with the named groups `label` and "
    r"optionally `group`, e.g. '(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav')."
)
#: The split folders of ``split_by: folder`` (``val`` optional).
SPLIT_FOLDERS = ("train", "val", "test")
_FOLDER_LAYOUT = (
    "split_by: folder reads root/train/ and root/test/, and root/val/ when it exists (else "
    "val_fraction of the training files validate); each holds class folders or files named "
    "by `pattern`."
)


def _wav_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else string order."""
    if all(label.isascii() and label.isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"pattern '{pattern}' is not a regular expression: {error}.") from error
    if not {"label", "group"} & set(compiled.groupindex):
        raise ConfigError(
            f"pattern '{pattern}' has neither a (?P<label>...) nor a (?P<group>...) group; "
            f"it must name at least one of them.\n{_LAYOUT}"
        )
    return compiled


class AudioFolderDataModule(ClassificationDataModule):
    """Classify a user's own WAV recordings (the audio counterpart of ``ImageFolder``).

    Labels come from the class folder ``root/<class>/`` or, when ``pattern`` has a ``label``
    group, from each file name (matched in full with :func:`re.fullmatch`). Classes are the
    sorted label names (numerically when all are integers) unless ``class_names`` fixes the
    order; they are stored in checkpoints, so ``lorae predict`` writes them as ``pred_name``.

    Splits are carved with ``seed``: the test split first (``test_fraction``), then validation
    (``val_fraction``) from the rest, so the test split does not change with ``val_fraction``.
    ``split_by: sample`` draws files; ``split_by: group`` draws whole groups (the pattern's
    ``group``, e.g. the speaker), so no group is in two splits. ``test_groups`` /
    ``val_groups`` name the held-out groups explicitly instead of drawing them.
    ``split_by: folder`` carves nothing but validation when there is no ``root/val/``: the
    splits are the folders ``root/train/``, ``root/val/`` and ``root/test/`` (each in either
    layout; ``test_fraction`` is unused). A class of ``val/`` or ``test/`` must have training
    files, and no WAV file under ``root`` may lie outside the three folders.

    Every clip becomes AST's log-mel spectrogram (:class:`~lorae.data.audio.LogMelFeatures`),
    with SpecAugment on training clips when ``augment``.

    Shape:
        - inputs: float ``(B, 1, num_mel_bins, target_length)``.
        - target: long ``(B,)`` in ``[0, C)``.

    Args:
        root: Folder of the recordings.
        pattern: Regular expression for file names with named groups ``label`` and/or
            ``group``; ``None``: class folders, no groups.
        class_names: Label names in class order; every label found must be listed and every
            listed class needs files. ``None``: the sorted labels found.
        split_by: ``"sample"`` (files), ``"group"`` (whole groups; needs a ``group``) or
            ``"folder"`` (the folders ``train``, ``val`` (optional) and ``test`` under ``root``).
        test_fraction: Share of files (or groups) carved out as the test split.
        test_groups: Groups held out as the test split (``split_by: group``); overrides
            ``test_fraction``.
        val_groups: Groups held out as the validation split; overrides ``val_fraction``.
        sample_rate: Resampling rate in Hz (AST: 16,000; 8 kHz speech can stay at 8,000).
        num_mel_bins: Mel bins F (AST: 128).
        target_length: Frames T of 10 ms per clip (padded or cropped).
        augment: SpecAugment masking of training clips.
        freq_mask: Largest frequency mask in bins.
        time_mask: Largest time mask in frames.
        norm_mean: Normalisation mean of the log-mel features (default AST's AudioSet one).
        norm_std: Normalisation std (default AST's AudioSet one).
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of the non-test files (or groups) carved out for validation
            (``split_by: folder``: of ``root/train/``, only when there is no ``root/val/``).
        seed: Seed of the carved splits and of the training shuffle.
        skip_corrupt: Leave unreadable or truncated WAV files out of their batch (each
            reported on stderr, the count at the end of the stage) instead of stopping.

    Raises:
        DataNotFoundError: ``root`` (or a split folder of ``split_by: folder``) is missing,
            holds no WAV file, or a class has no file.
        ConfigError: A file name does not match ``pattern`` (named, with the pattern), a
            label is not in ``class_names``, the group split is impossible, a class of the
            split folders has no training file, a WAV file lies outside them, or an option is
            out of range.
    """

    def __init__(
        self,
        root: str,
        pattern: str | None = None,
        class_names: list[str] | None = None,
        split_by: Literal["sample", "group", "folder"] = "sample",
        test_fraction: float = 0.1,
        test_groups: list[str] | None = None,
        val_groups: list[str] | None = None,
        sample_rate: int = 16000,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        augment: bool = True,
        freq_mask: int = 24,
        time_mask: int = 96,
        norm_mean: float = AST_AUDIOSET_MEAN,
        norm_std: float = AST_AUDIOSET_STD,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
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
        if split_by not in ("sample", "group", "folder"):
            raise ConfigError(f"split_by must be 'sample', 'group' or 'folder', got {split_by!r}.")
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self.root = Path(root)
        self.pattern = pattern
        self.split_by = split_by
        self.augment = augment
        self.features = LogMelFeatures(
            sample_rate,
            num_mel_bins,
            target_length,
            freq_mask,
            time_mask,
            norm_mean,
            norm_std,
            replace_hint="Replace or delete the file",
        )
        if split_by == "folder":
            paths, labels, groups, folders = self._scan_split_folders()
        else:
            paths, labels, groups = self._scan(self.root)
            folders = None
        self._classes = self._class_order(labels, paths, class_names)
        index = {name: i for i, name in enumerate(self._classes)}
        self.paths = paths
        self.labels = [index[label] for label in labels]
        self.groups = groups
        if folders is None:
            self._parts = self._split(test_groups, val_groups)
        else:
            self._parts = self._folder_split(folders, labels, test_groups, val_groups)

    # ------------------------------------------------------------------ reading

    def _scan(self, folder: Path) -> tuple[list[Path], list[str], list[str] | None]:
        """All WAV files under ``folder`` with their label names and groups (``None``: no
        groups)."""
        if not folder.is_dir():
            raise DataNotFoundError(f"Audio folder '{folder}' does not exist.\n{_LAYOUT}")
        regex = None if self.pattern is None else _compile(self.pattern)
        from_names = regex is not None and "label" in regex.groupindex
        has_groups = regex is not None and "group" in regex.groupindex
        if self.split_by == "group" and not has_groups:
            raise ConfigError(
                "split_by: group needs a `pattern` with a (?P<group>...) group (e.g. the "
                f"speaker), got pattern '{self.pattern}'.\n{_LAYOUT}"
            )
        if from_names:
            files = _wav_files(folder)
            folder_labels: list[str] = []
        else:
            class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
            if not class_dirs:
                raise DataNotFoundError(
                    f"No class folders found in '{folder}' (and no `pattern` with a label "
                    f"group).\n{_LAYOUT}"
                )
            empty = [d.name for d in class_dirs if not _wav_files(d)]
            if empty:
                raise DataNotFoundError(
                    f"No WAV files found in class folder(s) {empty} of '{folder}'. Add "
                    f"recordings or remove the empty folders.\n{_LAYOUT}"
                )
            per_class = [(d.name, _wav_files(d)) for d in class_dirs]
            files = [f for _, fs in per_class for f in fs]
            folder_labels = [name for name, fs in per_class for _ in fs]
        if not files:
            raise DataNotFoundError(f"No WAV files (*.wav) found under '{folder}'.\n{_LAYOUT}")
        if regex is None:
            return files, folder_labels, None
        labels: list[str] = []
        groups: list[str] = []
        for i, path in enumerate(files):
            match = regex.fullmatch(path.name)
            if match is None:
                raise ConfigError(
                    f"File name '{path.name}' ({path}) does not match pattern "
                    f"'{self.pattern}'. Rename or move the file, or widen the pattern."
                )
            labels.append(match["label"] if from_names else folder_labels[i])
            if has_groups:
                groups.append(match["group"])
        return files, labels, groups if has_groups else None

    def _scan_split_folders(
        self,
    ) -> tuple[list[Path], list[str], list[str] | None, list[str]]:
        """``split_by: folder``: the files of ``root/train``, ``root/val`` (when present) and
        ``root/test`` with their labels, groups and split folder names."""
        if not self.root.is_dir():
            raise DataNotFoundError(f"Audio folder '{self.root}' does not exist.\n{_FOLDER_LAYOUT}")
        missing = [name for name in ("train", "test") if not (self.root / name).is_dir()]
        if missing:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DataNotFoundError(
                f"split_by: folder found no folder(s) {missing} in '{self.root}' (its folders: "
                f"{found}).\n{_FOLDER_LAYOUT}"
            )
        paths: list[Path] = []
        labels: list[str] = []
        groups: list[str] | None = []
        folders: list[str] = []
        for name in SPLIT_FOLDERS:
            if not (self.root / name).is_dir():
                continue
            files, names, found_groups = self._scan(self.root / name)
            paths += files
            labels += names
            groups = None if found_groups is None or groups is None else groups + found_groups
            folders += [name] * len(files)
        outside = sorted(set(_wav_files(self.root)) - set(paths))
        if outside:
            raise ConfigError(
                f"{len(outside)} WAV file(s) under '{self.root}' lie outside its split folders, "
                f"e.g. '{outside[0]}'; move them into train/, val/ or test/, or delete them.\n"
                f"{_FOLDER_LAYOUT}"
            )
        return paths, labels, groups, folders

    def _class_order(
        self, labels: list[str], paths: list[Path], class_names: list[str] | None
    ) -> list[str]:
        found = set(labels)
        if class_names is None:
            classes = _sorted_labels(found)
        else:
            classes = [str(name) for name in class_names]
            if len(set(classes)) != len(classes):
                raise ConfigError(f"class_names lists a name twice: {classes}.")
            unknown = sorted(found - set(classes))
            if unknown:
                first = paths[labels.index(unknown[0])]
                raise ConfigError(
                    f"Label(s) {unknown} (e.g. '{first}') are not in class_names {classes}. "
                    "Add them, or remove those files."
                )
            empty = [name for name in classes if name not in found]
            if empty:
                raise DataNotFoundError(
                    f"Class(es) {empty} of class_names have no WAV file under '{self.root}'. "
                    "Add recordings, or drop them from class_names."
                )
        if len(classes) < 2:
            raise ConfigError(
                f"Found only the class {classes} under '{self.root}'; a classifier needs at "
                f"least 2 classes.\n{_LAYOUT}"
            )
        return classes

    # ------------------------------------------------------------------ splits

    def _folder_split(
        self,
        folders: list[str],
        labels: list[str],
        test_groups: list[str] | None,
        val_groups: list[str] | None,
    ) -> tuple[list[int], list[int], list[int]]:
        """File indices of ``(train, val, test)`` by split folder; validation is carved from
        ``train/`` (``val_fraction``, by file) when there is no ``val/``."""
        if test_groups is not None or val_groups is not None:
            raise ConfigError(
                "test_groups / val_groups need split_by: group; split_by: folder takes the "
                "splits from the folders train/, val/ and test/."
            )
        out: dict[str, list[int]] = {name: [] for name in SPLIT_FOLDERS}
        for i, name in enumerate(folders):
            out[name].append(i)
        trained = {labels[i] for i in out["train"]}
        for name in ("val", "test"):
            untrained = _sorted_labels({labels[i] for i in out[name]} - trained)
            if untrained:
                raise ConfigError(
                    f"Class(es) {untrained} have files in '{self.root / name}' but none in "
                    f"'{self.root / 'train'}'; a classifier cannot learn them. Add training "
                    "recordings, or remove those files."
                )
        if (self.root / "val").is_dir():  # scanned: it holds files (else _scan raised)
            return out["train"], out["val"], out["test"]
        rest, val = split_indices(len(out["train"]), [self.val_fraction], self.seed)
        train = out["train"]
        return [train[i] for i in rest], [train[i] for i in val], out["test"]

    def _split(
        self, test_groups: list[str] | None, val_groups: list[str] | None
    ) -> tuple[list[int], list[int], list[int]]:
        """File indices of ``(train, val, test)``."""
        n = len(self.paths)
        if self.split_by == "sample":
            if test_groups is not None or val_groups is not None:
                raise ConfigError("test_groups / val_groups need split_by: group.")
            if self.test_fraction == 0.0:
                raise ConfigError("test_fraction must be above 0: the test split is carved.")
            rest, test = split_indices(n, [self.test_fraction], self.seed)
            parts = split_indices(len(rest), [self.val_fraction], self.seed)
            return [rest[i] for i in parts[0]], [rest[i] for i in parts[1]], test
        assert self.groups is not None
        names = sorted(set(self.groups))
        for option, given in (("test_groups", test_groups), ("val_groups", val_groups)):
            unknown = sorted(set(given or []) - set(names))
            if unknown:
                raise ConfigError(f"{option} {unknown} are not groups of the data: {names}.")
        if test_groups and val_groups and set(test_groups) & set(val_groups):
            raise ConfigError(
                f"Groups {sorted(set(test_groups) & set(val_groups))} are in both test_groups "
                "and val_groups; a group belongs to one split."
            )
        held = self._pick(names, test_groups, self.test_fraction, "test", seed_offset=0)
        if not held:
            raise ConfigError("split_by: group needs test_fraction > 0 or test_groups.")
        others = [g for g in names if g not in held]
        val = self._pick(others, val_groups, self.val_fraction, "validation", seed_offset=1)
        train = [g for g in others if g not in val]
        if not train:
            raise ConfigError(
                f"The group split leaves no group for training: {len(names)} group(s) {names}, "
                f"test {sorted(held)}, validation {sorted(val)}. Lower the fractions, name "
                "fewer held-out groups, or use split_by: sample."
            )
        where = {g: s for s, gs in (("train", train), ("val", val), ("test", held)) for g in gs}
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, group in enumerate(self.groups):
            out[where[group]].append(i)
        return out["train"], out["val"], out["test"]

    def _pick(
        self,
        names: list[str],
        given: list[str] | None,
        fraction: float,
        what: str,
        seed_offset: int,
    ) -> list[str]:
        """Held-out groups: ``given``, or ``fraction`` of ``names`` drawn with the seed."""
        if given is not None:
            return [str(g) for g in given]
        if fraction == 0.0:
            return []
        if len(names) < 2:
            raise ConfigError(
                f"Cannot hold out a {what} group: only {len(names)} group(s) {names} remain, "
                "and at least one must stay for training. Add recordings of more groups, or "
                "use split_by: sample."
            )
        try:
            _, picked = split_indices(len(names), [fraction], self.seed + seed_offset)
        except ConfigError as error:
            raise ConfigError(
                f"Cannot carve a {what} fraction {fraction} out of the {len(names)} group(s) "
                f"{names} and keep one for training. Lower the fraction, name the held-out "
                "groups (test_groups / val_groups), or use split_by: sample."
            ) from error
        return [names[i] for i in picked]

    # ------------------------------------------------------------------ interface

    @property
    def num_classes(self) -> int:
        """Number of classes (labels found, or ``class_names``)."""
        return len(self._classes)

    @property
    def class_names(self) -> list[str]:
        """Label names in class order."""
        return list(self._classes)

    def split_groups(self) -> dict[str, list[str]]:
        """The groups of each split (``split_by: group``; empty lists otherwise)."""
        if self.groups is None:
            return {"train": [], "val": [], "test": []}
        return {
            name: sorted({self.groups[i] for i in part})
            for name, part in zip(("train", "val", "test"), self._parts, strict=True)
        }

    def inference_spec(self) -> InferenceSpec:
        """The log-mel settings (without SpecAugment) and the class names (in checkpoints)."""
        f = self.features
        spec = AudioInput(f.sample_rate, f.num_mel_bins, f.target_length, f.mean, f.std)
        return InferenceSpec(spec, tuple(self._classes))

    def _clips(self, indices: list[int], train: bool) -> AudioClips:
        return AudioClips(
            [self.paths[i] for i in indices],
            [self.labels[i] for i in indices],
            self.features,
            train,
        )

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Training clips (SpecAugment when ``augment``), validation and test clips."""
        train, val, test = self._parts
        return (
            self._clips(train, self.augment),
            self._clips(val, False),
            self._clips(test, False),
        )

    def predict_sample_names(self) -> list[str]:
        """Path of every test clip relative to ``root``, in prediction order."""
        return [self.paths[i].relative_to(self.root).as_posix() for i in self._parts[2]]
