"""Image files of every mode and bit depth are read as the intensities they hold (issue 19.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorae.data.images import load_rgb_image
from lorae.errors import CorruptSampleError


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize(
    ("array", "suffix", "mode", "expected"),
    [
        # 4000 / 65535 * 255 = 15.56 -> 16: about 6% grey, not white
        (np.full((8, 8), 4000, np.uint16), "png", "I;16", 16),
        (np.full((8, 8), 65535, np.uint16), "png", "I;16", 255),
        (np.full((8, 8), 4000, np.uint16), "tif", "I;16", 16),
        # 32-bit integers on the 16-bit scale: 30000 / 65535 * 255 = 116.73 -> 117
        (np.full((8, 8), 30000, np.int32), "tif", "I", 117),
        # floats are intensities in [0, 1]: 0.25 * 255 = 63.75 -> 64
        (np.full((8, 8), 0.25, np.float32), "tif", "F", 64),
        # 8-bit modes keep their values
        (np.full((8, 8), 200, np.uint8), "png", "L", 200),
    ],
)
def test_each_mode_is_scaled_to_8_bits(
    tmp_path: Path, array: np.ndarray, suffix: str, mode: str, expected: int
) -> None:
    path = _write(tmp_path / f"image.{suffix}", array)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the case is the mode it claims to be
    image = load_rgb_image(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.shape == (8, 8, 3)
    assert (pixels == expected).all(), (mode, pixels[0, 0])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((4, 4), 70000, np.int32), r"16-bit scale \[0, 65535\], found \[70000"),
        (np.full((4, 4), -3, np.int32), r"found \[-3"),
        (np.full((4, 4), 1.5, np.float32), r"intensities in \[0, 1\], found"),
        (np.full((4, 4), np.nan, np.float32), r"intensities in \[0, 1\]"),
    ],
)
def test_values_without_a_known_scale_are_refused_naming_the_file(
    tmp_path: Path, array: np.ndarray, message: str
) -> None:
    path = _write(tmp_path / "odd.tif", array)
    with pytest.raises(CorruptSampleError, match=message) as error:
        load_rgb_image(path)
    assert str(path) in str(error.value)


def test_a_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "cut.png", np.zeros((32, 32), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptSampleError, match=r"cut\.png"):
        load_rgb_image(path)
