"""ESC-50: folds, log-mel features, SpecAugment, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchaudio")
pytest.importorskip("soundfile")

from lorae.data import ESC50DataModule
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError
from tests.fixtures.builders import write_esc50

CLIPS = 3  # per fold
SMALL = {"num_mel_bins": 16, "target_length": 40, "freq_mask": 4, "time_mask": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_esc50(tmp_path_factory.mktemp("esc50"), clips_per_fold=CLIPS)


def _folds(dataset: object) -> set[int]:
    paths = getattr(dataset, "paths", None)
    if paths is None:  # a Subset of clips
        base = dataset.dataset  # type: ignore[attr-defined]
        paths = [base.paths[i] for i in dataset.indices]  # type: ignore[attr-defined]
    return {int(Path(p).name.split("-")[0]) for p in paths}


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_held_out_fold_is_the_test_split(root: Path, fold: int) -> None:
    data = ESC50DataModule(str(root), test_fold=fold, **SMALL)
    assert data.num_classes == 50
    assert _folds(data.test_dataset) == {fold}
    assert _folds(data.train_dataset) == {1, 2, 3, 4, 5} - {fold}
    assert len(data.train_dataset) == 4 * CLIPS and len(data.test_dataset) == CLIPS
    assert data.val_dataset is data.test_dataset  # AST's recipe: validate on the held-out fold
    targets = [data.test_dataset[i][1] for i in range(CLIPS)]
    assert targets == [(fold - 1 + i) % 50 for i in range(CLIPS)]
    names = data.predict_sample_names()
    assert names == [str(p) for p in data.test_dataset.paths]  # type: ignore[attr-defined]
    assert all(Path(n).name.startswith(f"{fold}-") for n in names)


def test_carved_validation_stays_in_training_folds(root: Path) -> None:
    data = ESC50DataModule(str(root), test_fold=3, val_fraction=0.25, **SMALL)
    assert _folds(data.val_dataset) <= {1, 2, 4, 5}
    assert len(data.val_dataset) == 3 and len(data.train_dataset) == 9
    assert set(data.val_dataset.indices).isdisjoint(data.train_dataset.indices)  # type: ignore[attr-defined]


def test_features_match_kaldi_fbank_of_the_resampled_clip(root: Path) -> None:
    import soundfile
    import torchaudio

    data = ESC50DataModule(str(root), test_fold=1, augment=False, **SMALL)
    x, _ = data.test_dataset[0]
    assert x.shape == (1, 16, 40) and x.dtype == torch.float32
    samples, rate = soundfile.read(str(data.test_dataset.paths[0]), dtype="float32")  # type: ignore[attr-defined]
    wave = torchaudio.functional.resample(torch.from_numpy(samples)[None], rate, 16000)
    fbank = torchaudio.compliance.kaldi.fbank(
        wave - wave.mean(),
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=16,
        dither=0.0,
        frame_shift=10,
    )
    frames = fbank.shape[0]  # 0.25 s -> 23 frames, zero-padded to 40
    expected = (fbank.T - data.features.mean) / (2 * data.features.std)
    assert torch.allclose(x[0, :, :frames], expected, atol=1e-4)
    padded = (0.0 - data.features.mean) / (2 * data.features.std)
    assert torch.allclose(x[0, :, frames:], torch.full((16, 40 - frames), padded))


def test_specaugment_masks_training_clips_only(root: Path) -> None:
    torch.manual_seed(0)
    data = ESC50DataModule(str(root), test_fold=1, **{**SMALL, "freq_mask": 8, "time_mask": 20})
    views = [data.train_dataset[0][0] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(data.test_dataset[0][0], data.test_dataset[0][0])
    plain = ESC50DataModule(str(root), test_fold=1, augment=False, **SMALL)
    assert torch.equal(plain.train_dataset[0][0], plain.train_dataset[0][0])


def test_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test_fold"):
        ESC50DataModule(str(root), test_fold=6)
    with pytest.raises(DataNotFoundError, match=r"esc50\.csv") as error:
        ESC50DataModule(str(tmp_path / "none"))
    assert "ESC-50" in str(error.value) and "audio/<filename>.wav" in str(error.value)
    copy = write_esc50(tmp_path / "copy", clips_per_fold=1)
    wav = next((copy / "audio").glob("2-*.wav"))
    wav.unlink()
    with pytest.raises(DataNotFoundError, match=wav.name):
        ESC50DataModule(str(copy))
    copy = write_esc50(tmp_path / "bad", clips_per_fold=1)
    wav = next((copy / "audio").glob("1-*.wav"))
    wav.write_bytes(b"RIFF....not audio")
    data = ESC50DataModule(str(copy), test_fold=1, **SMALL)
    with pytest.raises(CorruptSampleError, match=wav.name):
        data.test_dataset[0]


def test_corrupt_wav_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = write_esc50(tmp_path / "bad", clips_per_fold=2)
    wav = next((copy / "audio").glob("1-*.wav"))
    wav.write_bytes(b"RIFF....not audio")
    data = ESC50DataModule(str(copy), test_fold=1, skip_corrupt=True, batch_size=2, **SMALL)
    batches = list(data.test_dataloader())
    assert sum(len(target) for _, target in batches) == len(data.test_dataset) - 1
    data.teardown("test")
    err = capsys.readouterr().err
    assert wav.name in err and "lorae: skipped 1 corrupt sample(s) during test" in err
