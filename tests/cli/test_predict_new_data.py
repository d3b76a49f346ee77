"""``lorae predict --ckpt_path K --data.predict_path P`` and ``lorae.Predictor`` on new inputs.

A tiny model is fitted once per data kind; new inputs (real image files in several formats,
a text file) with bad entries mixed in are predicted without a config, checked row by row,
and compared with the Python :class:`lorae.Predictor` on the same inputs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lorae import Predictor
from lorae.checkpoints.inference import INFERENCE_KEY
from lorae.cli import main
from lorae.errors import CheckpointReadError, CorruptSampleError
from tests.fixtures.tiny_configs import (
    IMAGE_CLASSES,
    checkpoint_callback,
    digits_lora_config,
    glue_bert_config,
    image_folder_config,
    write_config,
)


def _fit(tmp: Path, config: dict[str, Any]) -> Path:
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp / "ckpt")]
    config["trainer"]["default_root_dir"] = str(tmp)
    main(["fit", "--config", str(write_config(tmp / "fit.yaml", config))])
    return tmp / "ckpt" / "last.ckpt"


def _predict(ckpt: Path, path: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    before = set(Path.cwd().iterdir())
    main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            "--data.predict_path",
            str(path),
            f"--prediction_writer.output_path={out}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    assert set(Path.cwd().iterdir()) == before  # no config.yaml left in the working folder
    with out.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image_fit")
    return _fit(tmp, image_folder_config(tmp / "data"))


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("text_fit")
    config = glue_bert_config(tmp)
    config["data"]["init_args"]["label_names"] = ["negative", "positive"]
    return _fit(tmp, config)


def _new_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Real images of several formats and modes (nested), plus broken ones and a non-image.
    Returns (good, bad) in discovery (sorted path) order."""
    rng = np.random.default_rng(1)
    (folder / "nested" / "deeper").mkdir(parents=True)
    good = {
        "a_rgb.png": Image.fromarray(rng.integers(0, 256, (20, 31, 3), dtype=np.uint8)),
        "b_grey.jpg": Image.fromarray(rng.integers(0, 256, (17, 17), dtype=np.uint8)),
        "nested/c_rgba.png": Image.fromarray(rng.integers(0, 256, (9, 12, 4), dtype=np.uint8)),
        "nested/deeper/d.bmp": Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
        "nested/e_16bit.png": Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
    }
    for name, image in good.items():
        image.save(folder / name)
    (folder / "bad_garbage.png").write_bytes(b"this is not an image")
    jpeg = (folder / "b_grey.jpg").read_bytes()
    (folder / "nested" / "bad_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "notes.txt").write_text("not an image, ignored with a note\n")
    bad = [folder / "bad_garbage.png", folder / "nested" / "bad_truncated.jpg"]
    paths = sorted([*(folder / n for n in good), *bad])
    return [p for p in paths if p not in bad], bad


def test_predict_on_a_folder_of_new_images_row_by_row(
    image_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = _new_images(tmp_path / "new")
    every = sorted([*good, *bad])
    capsys.readouterr()
    rows = _predict(image_ckpt, tmp_path / "new", tmp_path / "p.csv", "--data.skip_corrupt=true")
    err = capsys.readouterr().err
    for path in bad:  # reported by path, never silently dropped
        assert str(path) in err
    assert "notes.txt" in err
    assert "skipped 2 corrupt sample(s)" in err
    assert [r["file"] for r in rows] == [str(p) for p in good]
    assert [int(r["index"]) for r in rows] == [every.index(p) for p in good]
    assert "target" not in rows[0]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in range(len(IMAGE_CLASSES))]
        assert sum(probs) == pytest.approx(1.0)
        pred = int(row["pred"])
        assert pred == int(np.argmax(probs))
        assert row["pred_name"] == IMAGE_CLASSES[pred]
        assert float(row["confidence"]) == pytest.approx(max(probs), rel=1e-12)
        assert float(row["agreement"]) in (0.0, 0.5, 1.0)  # two members
        total, aleatoric = float(row["entropy"]), float(row["expected_entropy"])
        assert total == pytest.approx(aleatoric + float(row["mutual_information"]), abs=1e-9)
        assert 0 <= total <= math.log(len(IMAGE_CLASSES)) + 1e-9

    # The Predictor gives the same numbers on the same inputs, paths or PIL images (up to
    # float32 rounding: its batches hold other inputs than the CLI's).
    predictor = Predictor.from_checkpoint(image_ckpt, batch_size=2)
    result = predictor.predict([*good[:2], Image.open(good[2]), *good[3:]])
    assert result.pred_name == [r["pred_name"] for r in rows]
    assert result.member_probs.shape == (2, len(good), len(IMAGE_CLASSES))
    torch.testing.assert_close(result.member_probs.mean(0), result.probs)
    for key in ("confidence", "agreement", "entropy", "expected_entropy", "mutual_information"):
        expected = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
        torch.testing.assert_close(getattr(result, key), expected, rtol=1e-5, atol=1e-7)
    csv_probs = [[float(r[f"prob_{c}"]) for c in range(3)] for r in rows]
    torch.testing.assert_close(
        result.probs, torch.tensor(csv_probs, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    assert result.abstain is None and result.calibrated_probs is None


def test_an_unreadable_image_stops_the_run_naming_it(
    image_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bad = _new_images(tmp_path / "new")
    args = ["predict", "--ckpt_path", str(image_ckpt), "--data.predict_path", str(tmp_path / "new")]
    err = _error([*args, f"--prediction_writer.output_path={tmp_path / 'p.csv'}"], capsys)
    assert str(bad[0]) in err and "skip_corrupt" in err
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(CorruptSampleError, match=r"bad_garbage\.png"):
        Predictor.from_checkpoint(image_ckpt).predict([bad[0]])


def test_a_single_image(image_ckpt: Path, tmp_path: Path) -> None:
    good, _ = _new_images(tmp_path / "new")
    rows = _predict(image_ckpt, good[0], tmp_path / "p.csv")
    assert [r["file"] for r in rows] == [str(good[0])]


def test_predict_on_a_text_file_with_bad_lines(
    text_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sentences.txt"
    lines = [b"a wonderful film", b"", b"\xff\xfe not utf-8", b"dull and far too long"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    capsys.readouterr()
    rows = _predict(text_ckpt, path, tmp_path / "p.csv", "--data.skip_corrupt=true")
    err = capsys.readouterr().err
    assert f"{path}:2" in err and f"'{path}' line 3 is not UTF-8" in err
    assert [r["file"] for r in rows] == [f"{path}:1", f"{path}:4"]
    assert [r["index"] for r in rows] == ["0", "3"]
    assert all(r["pred_name"] == ["negative", "positive"][int(r["pred"])] for r in rows)

    result = Predictor.from_checkpoint(text_ckpt).predict(
        ["a wonderful film", "dull and far too long"]
    )
    assert result.pred_name == [r["pred_name"] for r in rows]
    expected = torch.tensor([float(r["mutual_information"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(result.mutual_information, expected, rtol=1e-5, atol=1e-7)

    tsv = tmp_path / "new.tsv"
    tsv.write_text("id\tsentence\n1\ta wonderful film\n2\n3\tdull and far too long\n")
    rows = _predict(text_ckpt, tsv, tmp_path / "q.csv", "--data.skip_corrupt=true")
    assert [r["file"] for r in rows] == [f"{tsv}:2", f"{tsv}:4"]


def test_checkpoint_records_digits_inputs_and_class_names(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path, digits_lora_config())
    record = torch.load(ckpt, weights_only=True)[INFERENCE_KEY]
    assert record["class_names"] == [str(i) for i in range(10)]
    assert record["inputs"] == {
        "kind": "image", "image_size": 8, "mean": [0.5], "std": [0.5],
        "resize": "square", "channels": 1,
    }  # fmt: skip
    digit = Image.fromarray(np.zeros((32, 32), dtype=np.uint8))
    result = Predictor.from_checkpoint(ckpt).predict([digit])
    assert result.probs.shape == (1, 10)


def test_old_checkpoint_without_the_record_asks_for_config(
    image_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = torch.load(image_ckpt, weights_only=True)
    del checkpoint[INFERENCE_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    err = _error(["predict", "--ckpt_path", str(old), "--data.predict_path", str(tmp_path)], capsys)
    assert "--config" in err and str(old) in err
    with pytest.raises(CheckpointReadError, match="--config"):
        Predictor.from_checkpoint(old)


def test_a_missing_checkpoint_without_config_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(missing), "--data.predict_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"lorae: error: Checkpoint '{missing}' does not exist" in err, err
