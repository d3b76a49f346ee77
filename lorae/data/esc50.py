"""ESC-50 (Piczak 2015): 2,000 five-second environmental sound clips of 50 classes in 5 folds,
the paper's audio benchmark with the Audio Spectrogram Transformer (section 4, appendix A.2).

Features follow AST's ESC-50 recipe (Gong et al. 2021): mono audio resampled to 16 kHz, a
Kaldi-compatible 128-bin log-mel filterbank (25 ms Hanning window, 10 ms shift), padded or
cropped to ``target_length`` frames, SpecAugment frequency/time masking on training clips, and
normalisation ``(x - mean) / (2 * std)`` with AST's ESC-50 statistics.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset, Subset

from lorae.data.audio import AudioClips, LogMelFeatures, missing_wav_bytes
from lorae.data.base import ClassificationDataModule, split_indices
from lorae.data.inference import AudioInput, InferenceSpec
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError

# LogMelFeatures and missing_wav_bytes lived here first; they stay importable from here.
__all__ = ["ESC50_URL", "ESC50DataModule", "LogMelFeatures", "missing_wav_bytes"]

ESC50_URL = "https://github.com/karoldvl/ESC-50/archive/master.zip"
FOLDS = (1, 2, 3, 4, 5)
#: Mean and std of AST's ESC-50 log-mel features (AST's ``norm_mean``/``norm_std``).
AST_ESC50_MEAN, AST_ESC50_STD = -6.6268077, 5.358466

_LAYOUT = (
    f"Expected the official ESC-50 layout ({ESC50_URL}, or `download: true`):\n"
    "  <root>/meta/esc50.csv   (columns filename, fold, target, category, ...)\n"
    "  <root>/audio/<filename>.wav"
)


class ESC50DataModule(ClassificationDataModule):
    """ESC-50 with one held-out fold as test split (the paper's 5-fold protocol, appendix A.2).

    ``test_fold`` is the test split; the other four folds train. With ``val_fraction`` 0 (the
    default, as AST's recipe) the validation split is the held-out fold itself, so the epoch
    is chosen on it as in the paper; a positive ``val_fraction`` carves validation out of the
    training folds instead. ``lorae crossval`` runs all five folds and pools their test
    predictions.

    Shape:
        - inputs: float ``(B, 1, num_mel_bins, target_length)``.
        - target: long ``(B,)`` in ``[0, 50)``.

    Args:
        root: Folder with ``meta/esc50.csv`` and ``audio/``.
        test_fold: Held-out fold, 1 to 5.
        download: Download and extract the official archive into ``root`` when missing.
        sample_rate: Resampling rate in Hz (AST: 16,000).
        num_mel_bins: Mel bins (AST: 128).
        target_length: Frames per clip (AST's ESC-50 recipe: 512).
        augment: SpecAugment masking of training clips.
        freq_mask: Largest frequency mask in bins (AST's ESC-50 recipe: 24).
        time_mask: Largest time mask in frames (AST's ESC-50 recipe: 96).
        norm_mean: Normalisation mean (AST's ESC-50 statistics).
        norm_std: Normalisation std (AST's ESC-50 statistics).
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: 0: validate on the held-out fold; else the share of the training folds
            carved out for validation.
        seed: Seed of the carved split and the training shuffle.
        skip_corrupt: Leave unreadable samples out of their batch instead of stopping.

    Raises:
        DataNotFoundError: If the metadata or a listed WAV file is missing.
        ConfigError: If ``test_fold`` or another option is out of range.
    """

    def __init__(
        self,
        root: str,
        test_fold: int = 1,
        download: bool = False,
        sample_rate: int = 16000,
        num_mel_bins: int = 128,
        target_length: int = 512,
        augment: bool = True,
        freq_mask: int = 24,
        time_mask: int = 96,
        norm_mean: float = AST_ESC50_MEAN,
        norm_std: float = AST_ESC50_STD,
        batch_size: int = 48,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.0,
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
        if test_fold not in FOLDS:
            raise ConfigError(f"test_fold must be one of {FOLDS}, got {test_fold!r}.")
        self.root = Path(root)
        self.test_fold = test_fold
        self.augment = augment
        self.features = LogMelFeatures(
            sample_rate,
            num_mel_bins,
            target_length,
            freq_mask,
            time_mask,
            norm_mean,
            norm_std,
            replace_hint=f"Replace it with the clip from {ESC50_URL}",
        )
        if download and not (self.root / "meta" / "esc50.csv").is_file():
            self._download()
        self.rows = self._read_metadata()
        names: dict[int, str] = {}
        for _, _, target, category in self.rows:
            names[target] = category
        self._class_names = [names.get(i, str(i)) for i in range(50)]

    def _download(self) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(ESC50_URL, str(self.root), filename="ESC-50-master.zip")
        extracted = self.root / "ESC-50-master"
        for name in ("meta", "audio"):
            (extracted / name).rename(self.root / name)

    def _read_metadata(self) -> list[tuple[Path, int, int, str]]:
        path = self.root / "meta" / "esc50.csv"
        if not path.is_file():
            raise DataNotFoundError(f"ESC-50 metadata '{path}' not found.\n{_LAYOUT}")
        rows = []
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"filename", "fold", "target", "category"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"'{path}' lacks column(s) {sorted(missing)}.\n{_LAYOUT}")
            for row in reader:
                line = reader.line_num
                try:
                    fold, target = int(row["fold"]), int(row["target"])
                except ValueError as error:
                    raise CorruptSampleError(
                        f"'{path}' line {line}: fold and target must be integers ({error})."
                    ) from error
                if fold not in FOLDS or not 0 <= target < 50:
                    raise CorruptSampleError(
                        f"'{path}' line {line}: fold {fold} or target {target} out of range "
                        "(folds 1-5, targets 0-49)."
                    )
                wav = self.root / "audio" / row["filename"]
                if not wav.is_file():
                    raise DataNotFoundError(
                        f"Audio file '{wav}' (listed in '{path}' line {line}) not found.\n{_LAYOUT}"
                    )
                rows.append((wav, fold, target, row["category"]))
        if not rows:
            raise DataNotFoundError(f"'{path}' lists no clips.\n{_LAYOUT}")
        return rows

    @property
    def num_classes(self) -> int:
        """50."""
        return 50

    def inference_spec(self) -> InferenceSpec:
        """The log-mel settings (without SpecAugment) and the categories (in checkpoints)."""
        f = self.features
        spec = AudioInput(f.sample_rate, f.num_mel_bins, f.target_length, f.mean, f.std)
        return InferenceSpec(spec, tuple(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """Category names in target order (from the metadata)."""
        return list(self._class_names)

    def predict_sample_names(self) -> list[str]:
        """The WAV file of each clip of the held-out fold, in order."""
        return [str(path) for path, fold, _, _ in self.rows if fold == self.test_fold]

    def _clips(self, folds: set[int], train: bool) -> AudioClips:
        chosen = [(p, t) for p, f, t, _ in self.rows if f in folds]
        return AudioClips([p for p, _ in chosen], [t for _, t in chosen], self.features, train)

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Train on the four other folds; test (and by default validate) on ``test_fold``."""
        train_folds = set(FOLDS) - {self.test_fold}
        test = self._clips({self.test_fold}, train=False)
        train = self._clips(train_folds, train=self.augment)
        if self.val_fraction == 0.0:
            return train, test, test
        rest, val = split_indices(len(train), [self.val_fraction], self.seed)
        return (
            Subset(train, rest),
            Subset(self._clips(train_folds, train=False), val),
            test,
        )
