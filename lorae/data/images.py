"""Reading image files as 8-bit RGB, whatever their mode and bit depth.

``PIL.Image.convert("RGB")`` clips high-bit-depth greyscale instead of scaling it: a 16-bit
PNG of value 4000 (about 6% grey) becomes white, and a float image in ``[0, 1]`` black. Every
image data module reads files through :func:`load_rgb_image`, which scales those modes to
8 bits and rejects values it cannot place on a scale, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lorae.errors import CorruptSampleError

__all__ = ["load_rgb_image", "to_rgb"]

#: 16-bit unsigned greyscale modes (little, big, native byte order).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, high-bit-depth greyscale scaled to 8 bits.

    - ``I;16`` (16-bit): ``round(v / 65535 * 255)``;
    - ``I`` (32-bit integer, how PIL opens many 16-bit files): the same 16-bit scale, and
      values outside ``[0, 65535]`` are refused (no scale can be known for them);
    - ``F`` (32-bit float): read as intensities in ``[0, 1]``, ``round(v * 255)``; values
      outside it, or not finite, are refused;
    - every other mode (``L``, ``P``, ``RGBA``, ``CMYK``, 8-bit ``RGB`` ...): PIL's conversion.

    Raises:
        ValueError: an ``I`` or ``F`` image with values outside the range above.
    """
    if image.mode not in (*_UINT16_MODES, "I", "F"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"a float (mode F) image must hold intensities in [0, 1], found "
                f"[{values.min():g}, {values.max():g}]"
            )
        unit = values
    else:
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"a 32-bit integer (mode I) image is read on the 16-bit scale [0, 65535], "
                f"found [{values.min():g}, {values.max():g}]"
            )
        unit = values / 65535.0
    grey = np.rint(unit * 255.0).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # 2-D uint8: mode L


def load_rgb_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (:func:`to_rgb`).

    Raises:
        CorruptSampleError: the file is unreadable, truncated, or holds values that cannot
            be scaled; the message names it and says how to go on.
    """
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise CorruptSampleError(
            f"Cannot read image '{path}': {type(error).__name__}: {error}. Replace or delete "
            "the file, or set skip_corrupt: true to leave unreadable images out."
        ) from error
