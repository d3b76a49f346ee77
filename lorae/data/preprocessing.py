"""What a backbone needs its inputs to look like, as plain data the data modules accept.

The backbone owns these facts (:func:`lorae.backbones.registry.backbone_preprocessing` reads
them from the library that publishes its weights); the data modules only apply them, so
``lorae.data`` imports nothing of the model side. The CLI links
``model.method.init_args.backbone`` (and ``pretrained``) to ``data.init_args.preprocessing``,
so a config names its backbone once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from lorae.errors import ConfigError

__all__ = ["IMAGENET", "ImagePreprocessing", "Preprocessing", "TextPreprocessing"]


@dataclass(frozen=True)
class ImagePreprocessing:
    """The input a vision backbone's published weights expect.

    Attributes:
        image_size: side of the square input in pixels.
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation standard deviation (RGB).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class TextPreprocessing:
    """The tokenizer a text backbone was trained with.

    Attributes:
        tokenizer: a local folder with the tokenizer files or a Hugging Face name.
    """

    tokenizer: str


#: The backbone's input description; ``None`` when it has none (audio, or no backbone known).
Preprocessing: TypeAlias = ImagePreprocessing | TextPreprocessing | None

#: ImageNet's 224 px input and normalisation: images when no backbone says otherwise.
IMAGENET = ImagePreprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def image_input(preprocessing: Preprocessing, data_module: str) -> ImagePreprocessing:
    """The image description of ``preprocessing`` (ImageNet's when ``None``), or a clear error
    when the backbone takes text."""
    if isinstance(preprocessing, TextPreprocessing):
        raise ConfigError(
            f"{data_module} yields images, but the backbone takes text (tokenizer "
            f"{preprocessing.tokenizer!r}): use a vision backbone (e.g. vit_b_32) with image "
            "data, or TextClassificationDataModule with a text backbone."
        )
    return IMAGENET if preprocessing is None else preprocessing
