"""scikit-learn's bundled 8x8 handwritten digits: a tiny offline data set for the quickstart."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from lorae.data.base import ClassificationDataModule, seeded_split
from lorae.data.inference import ImageInput, InferenceSpec
from lorae.errors import ConfigError

__all__ = ["DigitsDataModule"]

NUM_DIGITS_SAMPLES = 1797


class DigitsDataModule(ClassificationDataModule):
    """The 1,797 8x8 grayscale digits of :func:`sklearn.datasets.load_digits` (10 classes).

    The data ships with scikit-learn, so this module works offline; it powers the quickstart.
    It is not one of the paper's benchmarks. Pixel values 0..16 are scaled to ``[0, 1]`` and
    normalized with mean 0.5 and std 0.5, i.e. to ``[-1, 1]``. Test and validation splits are
    carved with ``seed`` (test first, so it does not change with ``val_fraction``).

    Shape:
        - inputs: float ``(B, 1, 8, 8)`` with values in ``[-1, 1]``.
        - target: long ``(B,)`` with values in ``[0, 10)``.

    Args:
        test_fraction: Share of the samples held out for testing, in ``[0, 1)``.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes.
        val_fraction: Share of the samples held out for validation, in ``[0, 1)``.
        seed: Seed of the splits and of the training shuffle.

    Raises:
        ConfigError: If an argument is out of range.
    """

    def __init__(
        self,
        test_fraction: float = 0.15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            seed=seed,
        )
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float))
            or not 0.0 <= test_fraction < 1.0
            or test_fraction + self.val_fraction >= 1.0
        ):
            raise ConfigError(
                f"test_fraction must be a number in [0, 1) with val_fraction + test_fraction "
                f"< 1, got test_fraction={test_fraction!r}, val_fraction={self.val_fraction}."
            )
        self.test_fraction = float(test_fraction)

    @property
    def num_classes(self) -> int:
        """Ten digit classes."""
        return 10

    def inference_spec(self) -> InferenceSpec:
        """New images are read as greyscale, resized to 8x8, brightness scaled to ``[0, 1]``
        (white = ``16`` on the digits' scale, the ink) and normalised like the digits."""
        return InferenceSpec(ImageInput(8, (0.5,), (0.5,), channels=1), tuple(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """``["0", ..., "9"]``."""
        return [str(i) for i in range(10)]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Load, normalize and split the digits."""
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        images = torch.as_tensor(features, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        images = (images - 0.5) / 0.5
        dataset = TensorDataset(images, torch.as_tensor(labels, dtype=torch.long))
        train, test, val = seeded_split(dataset, (self.test_fraction, self.val_fraction), self.seed)
        return train, val, test
