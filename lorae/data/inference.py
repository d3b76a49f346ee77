"""What a trained model needs to read new inputs: a plain-data record stored in checkpoints.

A data module describes its inputs (:meth:`~lorae.data.base.ClassificationDataModule.
inference_spec`): the image size and normalisation, or the tokenizer and maximum length, or the
log-mel settings, and the class names. ``EnsembleClassifier.on_save_checkpoint`` stores it as
plain data, so ``lorae predict --ckpt_path K --data.predict_path P`` and
:class:`lorae.Predictor` rebuild the preprocessing without the training config or data.

:class:`InputReader` turns one raw input (an image file or PIL image, a sentence, a WAV file or
a waveform) into a model sample exactly as the data module did for evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms import InterpolationMode, v2

from lorae.data.images import load_rgb_image, to_rgb
from lorae.errors import CheckpointReadError, ConfigError, CorruptSampleError

__all__ = [
    "AudioInput",
    "ImageInput",
    "InferenceSpec",
    "InputReader",
    "InputSpec",
    "TextInput",
]


@dataclass(frozen=True)
class ImageInput:
    """Images: resized, scaled to ``[0, 1]`` and normalised as in evaluation.

    Attributes:
        image_size: side of the square model input in pixels.
        mean: per-channel normalisation mean (one value per channel).
        std: per-channel normalisation standard deviation.
        resize: ``"square"``: resize to ``image_size x image_size`` (the paper's data sets);
            ``"shorter_side_crop"``: shorter side to ``image_size``, then center crop
            (``ImageFolderDataModule``).
        channels: 3 (RGB) or 1 (greyscale, the quickstart's digits).
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Literal["square", "shorter_side_crop"] = "square"
    channels: Literal[1, 3] = 3
    kind: Literal["image"] = "image"

    def transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalised float tensor. Shape: output ``(channels, S, S)``."""
        size = self.image_size
        resize: list[Any] = (
            [v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
            if self.resize == "square"
            else [
                v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(size),
            ]
        )
        pipeline = v2.Compose(
            [
                v2.ToImage(),
                *resize,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
                v2.ToPureTensor(),
            ]
        )
        if self.channels == 3:
            return lambda image: pipeline(to_rgb(image))
        return lambda image: pipeline(to_rgb(image).convert("L"))


@dataclass(frozen=True)
class TextInput:
    """Sentences: tokenized with ``tokenizer`` (a local folder or a Hugging Face name),
    truncated to ``max_length`` tokens."""

    tokenizer: str
    max_length: int
    kind: Literal["text"] = "text"


@dataclass(frozen=True)
class AudioInput:
    """Audio: mono, resampled to ``sample_rate``, log-mel spectrogram of ``num_mel_bins`` x
    ``target_length`` frames, normalised with ``mean`` and ``std`` (AST's ESC-50 recipe)."""

    sample_rate: int
    num_mel_bins: int
    target_length: int
    mean: float
    std: float
    kind: Literal["audio"] = "audio"


#: One of the three input descriptions.
InputSpec: TypeAlias = ImageInput | TextInput | AudioInput

_KINDS: dict[str, type[ImageInput] | type[TextInput] | type[AudioInput]] = {
    "image": ImageInput,
    "text": TextInput,
    "audio": AudioInput,
}


@dataclass(frozen=True)
class InferenceSpec:
    """How to read new inputs for a trained model, and what its classes are called.

    Attributes:
        inputs: the input description.
        class_names: ``class_names[i]`` is the name of class ``i``.
    """

    inputs: InputSpec
    class_names: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)``)."""
        inputs = dataclasses.asdict(self.inputs)
        for key, value in inputs.items():
            if isinstance(value, tuple):
                inputs[key] = list(value)
        return {"inputs": inputs, "class_names": list(self.class_names)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str) -> InferenceSpec:
        """Read :meth:`to_record`'s output back.

        Raises:
            CheckpointReadError: the record is malformed (``source`` names where it came from).
        """
        try:
            return cls(input_spec(record["inputs"]), tuple(str(n) for n in record["class_names"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointReadError(
                f"{source} holds a malformed input record ({error}); re-save it with this "
                "lorae version, or run `lorae predict --config <training config>`."
            ) from error


def input_spec(record: Mapping[str, Any]) -> InputSpec:
    """The :data:`InputSpec` of a plain-data record (``kind`` picks the class).

    Raises:
        ConfigError: unknown ``kind`` or fields.
    """
    values = dict(record)
    kind = values.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"inputs.kind must be one of {sorted(_KINDS)}, got {kind!r}.")
    for key in ("mean", "std"):
        if kind == "image" and key in values:
            values[key] = tuple(float(v) for v in values[key])
    try:
        return _KINDS[kind](**values)
    except TypeError as error:
        raise ConfigError(f"inputs of kind {kind!r}: {error}") from error


class InputReader:
    """One raw input -> one model sample, and a batch of samples -> model inputs.

    Image inputs: a path or a PIL image. Text: a string. Audio: a path of a WAV file, or a
    waveform tensor ``(N,)`` or ``(1, N)`` already at ``sample_rate``.

    Args:
        spec: the input description.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self._image = spec.transform() if isinstance(spec, ImageInput) else None
        self._tokenizer: Any = None
        self._features: Any = None
        if isinstance(spec, TextInput):
            from lorae.data.text import _load_tokenizer

            self._tokenizer = _load_tokenizer(spec.tokenizer)
        if isinstance(spec, AudioInput):
            from lorae.data.esc50 import LogMelFeatures

            self._features = LogMelFeatures(
                spec.sample_rate, spec.num_mel_bins, spec.target_length, 0, 0, spec.mean, spec.std
            )

    def load(self, item: Any) -> Any:
        """The model sample of one input (a tensor, or a dict of token ids for text).

        Raises:
            CorruptSampleError: the input cannot be read (its path is named).
            ConfigError: the input is of the wrong type for this model.
        """
        spec = self.spec
        if isinstance(spec, ImageInput):
            assert self._image is not None
            if isinstance(item, str | Path):
                return self._image(load_rgb_image(item))
            if isinstance(item, Image.Image):
                return self._image(item)
            raise ConfigError(
                f"This model reads images: give paths or PIL images, got {type(item).__name__}."
            )
        if isinstance(spec, TextInput):
            if not isinstance(item, str):
                raise ConfigError(
                    f"This model reads text: give strings, got {type(item).__name__}."
                )
            if not item.strip():
                raise CorruptSampleError("empty text: there is nothing to classify.")
            encoded = self._tokenizer(
                item, truncation=True, max_length=spec.max_length, return_attention_mask=True
            )
            keys = ("input_ids", "attention_mask", "token_type_ids")
            return {key: list(encoded[key]) for key in keys if key in encoded}
        if isinstance(item, str | Path):
            return self._features(Path(item), train=False)
        if isinstance(item, Tensor):
            return self._features.from_waveform(item.reshape(1, -1).float(), train=False)
        raise ConfigError(
            f"This model reads audio: give WAV paths or waveform tensors at {spec.sample_rate} "
            f"Hz, got {type(item).__name__}."
        )

    def collate(self, samples: list[tuple[Any, int]]) -> tuple[Any, Tensor]:
        """``[(sample, index), ...]`` -> ``(inputs, indices)``; text is padded per batch."""
        if isinstance(self.spec, TextInput):
            from lorae.data.text import PadCollator

            return PadCollator(self._tokenizer)(samples)
        return default_collate(samples)
