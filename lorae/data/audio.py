"""Reading WAV files and turning them into AST's log-mel features, shared by every audio data
module (ESC-50, a user's own recordings) and by inference (:mod:`lorae.data.inference`).

Features follow the Audio Spectrogram Transformer's recipe (Gong et al. 2021), the paper's audio
backbone (section 4, appendix A.2): mono audio resampled to ``sample_rate``, a Kaldi-compatible
log-mel filterbank (25 ms Hanning window, 10 ms shift), padded or cropped to ``target_length``
frames, SpecAugment frequency/time masking on training clips, and normalisation
``(x - mean) / (2 * std)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lorae.errors import ConfigError, CorruptSampleError

__all__ = ["AudioClips", "LogMelFeatures", "load_audio_backend", "missing_wav_bytes"]

_REPLACE = "Replace the file"


def load_audio_backend() -> tuple[Any, Any]:
    """``(soundfile, torchaudio)``, or a :class:`ConfigError` naming the ``audio`` extra."""
    try:
        import soundfile
        import torchaudio
    except ImportError as error:
        raise ConfigError(
            "Audio data needs the optional audio dependencies: pip install 'lorae[audio]'."
        ) from error
    return soundfile, torchaudio


def missing_wav_bytes(path: Path) -> int:
    """How many bytes of audio a RIFF/WAVE file's ``data`` chunk declares beyond the end of
    the file: 0 for a complete file, a non-WAV file, or a streamed one (size 0 or 2^32 - 1).

    libsndfile reads a truncated WAV as a shorter clip without an error, so the reader
    compares the header with the file itself.
    """
    with path.open("rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return 0
        size = path.stat().st_size
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                return 0
            chunk_size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return 0
                return max(0, handle.tell() + chunk_size - size)
            handle.seek(chunk_size + chunk_size % 2, 1)  # chunks are word-aligned


class LogMelFeatures:
    """WAV file -> normalised log-mel spectrogram, AST's preprocessing (paper appendix A.2).

    Args:
        sample_rate: Audio is resampled to this rate (Hz) first.
        num_mel_bins: Mel bins F.
        target_length: Frames T (10 ms each); shorter clips are zero-padded, longer ones
            cropped.
        freq_mask: Largest SpecAugment frequency mask (bins); 0 disables it.
        time_mask: Largest SpecAugment time mask (frames); 0 disables it.
        mean: Normalisation mean.
        std: Normalisation std (AST divides by ``2 * std``).
        replace_hint: Start of the advice in the error for an unreadable file, e.g.
            ``"Replace it with the clip from <url>"``.

    Shape:
        - output: float ``(1, num_mel_bins, target_length)``.
    """

    def __init__(
        self,
        sample_rate: int,
        num_mel_bins: int,
        target_length: int,
        freq_mask: int,
        time_mask: int,
        mean: float,
        std: float,
        replace_hint: str = _REPLACE,
    ) -> None:
        self.soundfile, self.torchaudio = load_audio_backend()
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.target_length = target_length
        self.freq_mask = freq_mask
        self.time_mask = time_mask
        self.mean = mean
        self.std = std
        self.replace_hint = replace_hint

    def read(self, path: Path) -> Tensor:
        """Mono waveform ``(1, N)`` at :attr:`sample_rate`.

        Raises:
            CorruptSampleError: The file cannot be decoded or is truncated (named).
        """
        advice = f"{self.replace_hint}, or set skip_corrupt: true to leave unreadable clips out."
        try:
            data, rate = self.soundfile.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError) as error:  # soundfile.LibsndfileError is a RuntimeError
            raise CorruptSampleError(
                f"Audio file '{path}' cannot be read: {error}. {advice}"
            ) from error
        missing = missing_wav_bytes(path)
        if missing:
            raise CorruptSampleError(
                f"Audio file '{path}' is truncated: its header declares {missing} more bytes of "
                f"audio than the file holds. {advice}"
            )
        waveform = torch.from_numpy(data).mean(dim=1, keepdim=True).T
        if rate != self.sample_rate:
            waveform = self.torchaudio.functional.resample(waveform, rate, self.sample_rate)
        return waveform

    def __call__(self, path: Path, train: bool) -> Tensor:
        return self.from_waveform(self.read(path), train)

    def from_waveform(self, waveform: Tensor, train: bool) -> Tensor:
        """Features of a mono waveform ``(1, N)`` at :attr:`sample_rate`.

        Shape:
            - waveform: ``(1, N)``.
            - output: ``(1, num_mel_bins, target_length)``.
        """
        waveform = waveform - waveform.mean()
        fbank = self.torchaudio.compliance.kaldi.fbank(
            waveform,
            htk_compat=True,
            sample_frequency=self.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.num_mel_bins,
            dither=0.0,
            frame_shift=10.0,
            frame_length=25.0,
        )  # (frames, F)
        frames = fbank.shape[0]
        if frames < self.target_length:
            fbank = torch.nn.functional.pad(fbank, (0, 0, 0, self.target_length - frames))
        spectrogram = fbank[: self.target_length].T.unsqueeze(0)  # (1, F, T)
        if train:
            transforms = self.torchaudio.transforms
            if self.freq_mask:
                spectrogram = transforms.FrequencyMasking(self.freq_mask)(spectrogram)
            if self.time_mask:
                spectrogram = transforms.TimeMasking(self.time_mask)(spectrogram)
        return (spectrogram - self.mean) / (2.0 * self.std)


class AudioClips(Dataset[tuple[Tensor, int]]):
    """WAV files and their labels; each sample is ``(features(path), label)``.

    Args:
        paths: One WAV file per sample.
        labels: Class index of each file, in ``[0, C)``.
        features: The log-mel pipeline.
        train: Apply SpecAugment (training clips only).

    Shape:
        - sample: float ``(1, F, T)`` and an int label.
    """

    def __init__(
        self, paths: list[Path], labels: list[int], features: LogMelFeatures, train: bool
    ) -> None:
        self.paths = paths
        self.labels = labels
        self.features = features
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features(self.paths[index], self.train), self.labels[index]
