"""New inputs read as the training data module read its own (``lorae.data.inference``,
``lorae.data.predict``), and the class names each data module records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorae.data import (
    DigitsDataModule,
    ESC50DataModule,
    ImageFolderDataModule,
    InferenceSpec,
    PredictionDataModule,
    TextClassificationDataModule,
)
from lorae.data.inference import ImageInput, InputReader
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError
from tests.fixtures.builders import (
    write_esc50,
    write_glue_tsv,
    write_image_folder,
    write_tiny_tokenizer,
)


def test_image_folder_spec_reads_images_as_its_evaluation_transform(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=2, size=13)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8)
    spec = dm.inference_spec()
    assert spec.class_names == ("cat", "dog")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (11, 17, 3), np.uint8))
    expected = dm.eval_transform()(image)
    torch.testing.assert_close(InputReader(spec.inputs).load(image), expected)
    again = InferenceSpec.from_record(spec.to_record(), "test")
    assert again == spec


def test_digits_spec_reproduces_the_digits_tensors() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule()
    features, _ = load_digits(return_X_y=True)
    expected = (torch.tensor(features[0], dtype=torch.float32).reshape(1, 8, 8) / 16 - 0.5) / 0.5
    png = Image.fromarray(np.rint(features[0].reshape(8, 8) / 16 * 255).astype(np.uint8))
    got = InputReader(dm.inference_spec().inputs).load(png)
    torch.testing.assert_close(got, expected, atol=2 / 255, rtol=0)


def test_text_label_names_are_the_class_names(tmp_path: Path) -> None:
    root = write_glue_tsv(tmp_path / "glue", n_train=8, n_dev=4)
    tokenizer = str(write_tiny_tokenizer(tmp_path / "tok"))
    dm = TextClassificationDataModule(
        str(root), tokenizer=tokenizer, label_names=["negative", "positive"], max_length=16
    )
    spec = dm.inference_spec()
    assert spec.class_names == ("negative", "positive") and dm.num_classes == 2
    assert spec.to_record()["inputs"] == {"tokenizer": tokenizer, "max_length": 16, "kind": "text"}
    with pytest.raises(ConfigError, match="label_names has 3 names"):
        TextClassificationDataModule(
            str(root), tokenizer=tokenizer, num_classes=2, label_names=["a", "b", "c"]
        )


def test_audio_folder_and_waveforms_give_the_same_features(tmp_path: Path) -> None:
    root = write_esc50(tmp_path / "esc50", clips_per_fold=1)
    small = {"num_mel_bins": 16, "target_length": 40}
    spec = ESC50DataModule(str(root), **small).inference_spec()
    assert spec.class_names[0] == "sound0"
    (root / "audio" / "broken.wav").write_bytes(b"RIFF....")
    dm = PredictionDataModule(str(root / "audio"), spec.to_record()["inputs"], ["a"] * 50)
    names = dm.predict_sample_names()
    assert names == sorted(str(p) for p in (root / "audio").glob("*.wav"))
    dataset = dm.predict_dataloader().dataset
    with pytest.raises(CorruptSampleError, match=r"broken\.wav"):
        dataset[names.index(str(root / "audio" / "broken.wav"))]
    first = Path(names[0])
    features, index = dataset[0]
    assert index == 0 and features.shape == (1, 16, 40)
    waveform = dm.reader._features.read(first)  # resampled to the model's rate
    torch.testing.assert_close(dm.reader.load(waveform[0]), features)


def test_missing_or_empty_predict_paths_are_clear_errors(tmp_path: Path) -> None:
    inputs = ImageInput(8, (0.5,) * 3, (0.5,) * 3).__dict__
    with pytest.raises(DataNotFoundError, match="does not exist"):
        PredictionDataModule(str(tmp_path / "nope"), inputs, ["a"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match="No images found"):
        PredictionDataModule(str(tmp_path), inputs, ["a"])
    with pytest.raises(ConfigError, match="only predicts"):
        PredictionDataModule(str(tmp_path / "notes.txt"), inputs, ["a"]).train_dataloader()
