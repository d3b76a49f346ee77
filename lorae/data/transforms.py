"""Image transforms of the paper's image data sets (CIFAR, HAM10000, iNaturalist).

Evaluation: resize to the backbone's square input (bicubic, as the published ViT weights were
trained), scale to ``[0, 1]`` and normalise with the backbone's mean and std. Training adds,
when ``augment`` is on, the reference implementation's augmentation: random horizontal and
vertical flips and a random rotation by up to 180 degrees (paper appendix M).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from lorae.data.inference import ImageInput
from lorae.data.preprocessing import ImagePreprocessing
from lorae.errors import ConfigError

__all__ = ["ImageTransforms"]

#: Rotation range of the reference code's training augmentation, in degrees.
ROTATION_DEGREES = (0.0, 180.0)


@dataclass(frozen=True)
class ImageTransforms:
    """The square input size and normalisation one image data module applies.

    Attributes:
        image_size: Side of the square model input in pixels.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def resolve(
        cls,
        published: ImagePreprocessing,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> ImageTransforms:
        """The backbone's published input size and normalisation, each overridable.

        Args:
            published: the backbone's input (:mod:`lorae.data.preprocessing`).
            image_size: Overrides the backbone's input size.
            mean: Overrides the backbone's mean (3 values).
            std: Overrides the backbone's std (3 positive values).

        Raises:
            ConfigError: If a value is out of range.
        """
        size = published.image_size if image_size is None else image_size
        mean = published.mean if mean is None else tuple(mean)
        std = published.std if std is None else tuple(std)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {size!r}.")
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(
                f"mean and std need one value per RGB channel (3 each), got mean={mean!r}, "
                f"std={std!r}."
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be positive, got {std!r}.")
        m0, m1, m2 = (float(m) for m in mean)
        s0, s1, s2 = (float(s) for s in std)
        return cls(size, (m0, m1, m2), (s0, s1, s2))

    def input_spec(self) -> ImageInput:
        """The evaluation transform as plain data (see :mod:`lorae.data.inference`)."""
        return ImageInput(self.image_size, self.mean, self.std, resize="square")

    def eval(self) -> v2.Compose:
        """PIL image or uint8 array -> normalised float tensor.

        Shape:
            - output: float ``(3, image_size, image_size)``.
        """
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(
                    (self.image_size, self.image_size),
                    interpolation=InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
                v2.ToPureTensor(),
            ]
        )

    def train(self, augment: bool) -> v2.Compose:
        """The evaluation transform, after random flips and rotation when ``augment``.

        Shape:
            - output: float ``(3, image_size, image_size)``.
        """
        if not augment:
            return self.eval()
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomRotation(ROTATION_DEGREES),
                self.eval(),
            ]
        )
