"""Data modules: every dataloader yields ``(inputs, target)`` batches.

``inputs`` is a float tensor ``(B, ...)`` or, for text, a ``dict[str, Tensor]`` of long
``(B, T)`` tensors; ``target`` is a long tensor ``(B,)`` with values in ``[0, num_classes)``.
"""

from __future__ import annotations

from lorae.data.base import (
    ClassificationDataModule,
    TransformedDataset,
    seeded_split,
    split_indices,
)
from lorae.data.digits import DigitsDataModule
from lorae.data.image_folder import ImageFolderDataModule
from lorae.data.text import TextClassificationDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "TextClassificationDataModule",
    "TransformedDataset",
    "seeded_split",
    "split_indices",
]
