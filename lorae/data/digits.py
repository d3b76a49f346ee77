"""scikit-learn's bundled 8x8 handwritten digits: a tiny offline data set for the quickstart."""

from __future__ import annotations

from typing import Any, Literal

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

    ``pretrain_fraction`` carves a third part, after test and validation (which therefore stay
    the same images), used only to pretrain the backbone
    (:class:`lorae.training.PretrainBackbone`, paper appendix J): :attr:`pretrain_dataset`.
    The training split is what remains, so the LoRA members train on images the backbone
    never saw, as in the paper's main setting (a backbone pretrained on other data). Appendix
    J itself pretrains and fine-tunes on the same images; ``pretrain_fraction: 0`` (the
    default) with ``PretrainBackbone`` does that (it then pretrains on the training split).

    Shape:
        - inputs: float ``(B, 1, 8, 8)`` with values in ``[-1, 1]``.
        - target: long ``(B,)`` with values in ``[0, 10)``.

    Args:
        test_fraction: Share of the samples held out for testing, in ``[0, 1)``.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of the samples held out for validation, in ``[0, 1)``.
        seed: Seed of the splits and of the training shuffle.
        pretrain_fraction: Share of the samples held out of training for pretraining only,
            in ``[0, 1)``; ``0`` carves none (:attr:`pretrain_dataset` is ``None``).

    Raises:
        ConfigError: If an argument is out of range.
    """

    def __init__(
        self,
        test_fraction: float = 0.15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.15,
        seed: int = 0,
        pretrain_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
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
        if (
            isinstance(pretrain_fraction, bool)
            or not isinstance(pretrain_fraction, (int, float))
            or not 0.0 <= pretrain_fraction < 1.0
            or self.test_fraction + self.val_fraction + pretrain_fraction >= 1.0
        ):
            raise ConfigError(
                "pretrain_fraction must be a number in [0, 1) with test_fraction + val_fraction "
                f"+ pretrain_fraction < 1, got pretrain_fraction={pretrain_fraction!r} "
                f"(test_fraction={self.test_fraction}, val_fraction={self.val_fraction})."
            )
        self.pretrain_fraction = float(pretrain_fraction)
        self._pretrain: Dataset[Any] | None = None

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

    @property
    def pretrain_dataset(self) -> Dataset[Any] | None:
        """The images carved for pretraining only (``pretrain_fraction``), or ``None``."""
        self.setup()
        return self._pretrain

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Load, normalize and split the digits (test, validation, then pretraining part)."""
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        images = torch.as_tensor(features, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        images = (images - 0.5) / 0.5
        dataset = TensorDataset(images, torch.as_tensor(labels, dtype=torch.long))
        fractions = (self.test_fraction, self.val_fraction, self.pretrain_fraction)
        train, test, val, pretrain = seeded_split(dataset, fractions, self.seed)
        self._pretrain = pretrain if self.pretrain_fraction > 0 else None
        return train, val, test
