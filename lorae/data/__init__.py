"""Data modules: every dataloader yields ``(inputs, target)`` batches.

``inputs`` is a float tensor ``(B, ...)`` or, for text, a ``dict[str, Tensor]`` of long
``(B, T)`` tensors; ``target`` is a long tensor ``(B,)`` with values in ``[0, num_classes)``.
"""

from __future__ import annotations

from lorae.data.audio_folder import AudioFolderDataModule
from lorae.data.base import (
    ClassificationDataModule,
    TransformedDataset,
    seeded_split,
    split_indices,
)
from lorae.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lorae.data.digits import DigitsDataModule
from lorae.data.esc50 import ESC50DataModule
from lorae.data.ham10000 import HAM10000DataModule
from lorae.data.image_folder import ImageFolderDataModule
from lorae.data.inaturalist import INaturalist2017DataModule
from lorae.data.inference import InferenceSpec
from lorae.data.predict import PredictionDataModule
from lorae.data.text import TextClassificationDataModule

__all__ = [
    "AudioFolderDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ESC50DataModule",
    "HAM10000DataModule",
    "INaturalist2017DataModule",
    "ImageFolderDataModule",
    "InferenceSpec",
    "PredictionDataModule",
    "TextClassificationDataModule",
    "TransformedDataset",
    "seeded_split",
    "split_indices",
]
