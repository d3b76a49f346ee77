"""iNaturalist 2017 (Van Horn et al. 2018): 5,089 species in 13 super-categories, a large,
long-tailed fine-grained benchmark of the paper (its SGD recipe is ``configs/inat2017``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset, Subset
from torchvision.datasets import INaturalist
from torchvision.datasets.inaturalist import DATASET_URLS

from lorae.data.base import ClassificationDataModule, TransformedDataset, split_indices
from lorae.data.images import load_rgb_image
from lorae.data.inference import InferenceSpec
from lorae.data.preprocessing import Preprocessing, image_input
from lorae.data.transforms import ImageTransforms
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError

__all__ = ["INaturalist2017DataModule"]

SPLIT_FILES = {"train": "train2017.json", "test": "val2017.json"}
ANNOTATIONS_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/2017/train_val2017.zip"
_LAYOUT = (
    "Expected torchvision's iNaturalist 2017 layout:\n"
    "  <root>/2017/<super_category>/<species>/<image>.jpg   (train_val_images.tar.gz from "
    f"{DATASET_URLS['2017']}, extracted and renamed to 2017; `download: true` does this)\n"
    "  <root>/train2017.json, <root>/val2017.json              (optional official split, from "
    f"{ANNOTATIONS_URL})"
)


class INaturalist2017DataModule(ClassificationDataModule):
    """iNaturalist 2017 species classification through :class:`torchvision.datasets.INaturalist`.

    Labels are torchvision's ``full`` category index: species folders in sorted
    ``<super>/<species>`` order. With the official split files (``train2017.json`` and
    ``val2017.json`` in ``root``), training images come from the first and the test split is
    the official validation set (the competition's test labels are private); otherwise
    ``test_fraction`` of all images is carved out as test split with ``seed``. Validation is
    always carved from training (``val_fraction``).

    Shape:
        - inputs: float ``(B, 3, image_size, image_size)``.
        - target: long ``(B,)`` in ``[0, num_classes)`` (5,089 for the full data set).

    Args:
        root: Folder holding ``2017/`` (and optionally the split JSON files).
        preprocessing: The backbone's input size and normalisation (linked from the
            method's ``backbone`` by the CLI; ``None``: ImageNet's 224 px).
        image_size: Overrides the backbone's input size.
        mean: Overrides the backbone's normalisation mean.
        std: Overrides the backbone's normalisation std.
        download: Download and extract the images (186 GB) when ``root/2017`` is missing.
        augment: Random horizontal/vertical flips and rotation of training images.
        test_fraction: Share of images carved out for testing without split files.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of the training images carved out for validation.
        seed: Seed of the carved splits and the training shuffle.
        skip_corrupt: Leave unreadable samples out of their batch instead of stopping.

    Raises:
        DataNotFoundError: If the images are missing, or a split file lists a missing image.
        ConfigError: If an option is out of range.
    """

    def __init__(
        self,
        root: str,
        preprocessing: Preprocessing = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        download: bool = False,
        augment: bool = False,
        test_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.05,
        seed: int = 0,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            val_fraction=val_fraction,
            seed=seed,
            skip_corrupt=skip_corrupt,
        )
        self.root = Path(root)
        self.transforms = ImageTransforms.resolve(
            image_input(preprocessing, type(self).__name__), image_size, mean, std
        )
        self.augment = augment
        self.test_fraction = test_fraction
        images = self.root / "2017"
        if not download and not (images.is_dir() and any(images.iterdir())):
            raise DataNotFoundError(f"iNaturalist 2017 images not found in '{images}'.\n{_LAYOUT}")
        try:
            self.dataset = INaturalist(
                str(self.root), version="2017", download=download, loader=load_rgb_image
            )
        except (RuntimeError, NotADirectoryError) as error:
            raise DataNotFoundError(
                f"'{images}' does not have the iNaturalist 2017 layout ({error}).\n{_LAYOUT}"
            ) from error
        self._train, self._test = self._official_or_carved_split()

    def _official_or_carved_split(self) -> tuple[list[int], list[int]]:
        paths = {
            f"{self.dataset.all_categories[c]}/{name}": i
            for i, (c, name) in enumerate(self.dataset.index)
        }
        files = {split: self.root / name for split, name in SPLIT_FILES.items()}
        present = [f.is_file() for f in files.values()]
        if not any(present):
            train, test = split_indices(len(paths), [self.test_fraction], self.seed)
            return train, test
        if not all(present):
            raise DataNotFoundError(
                f"Only one of the split files {[str(f) for f in files.values()]} exists; put "
                f"both (from {ANNOTATIONS_URL}) or neither (the test split is then carved).\n"
                f"{_LAYOUT}"
            )
        parts: dict[str, list[int]] = {}
        for split, file in files.items():
            try:
                listed = json.loads(file.read_text(encoding="utf-8"))["images"]
                names = [str(entry["file_name"]).split("/", 1)[1] for entry in listed]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                raise CorruptSampleError(
                    f"Split file '{file}' is not an iNaturalist 2017 annotation file "
                    f"({type(error).__name__}: {error})."
                ) from error
            missing = [n for n in names if n not in paths]
            if missing:
                raise DataNotFoundError(
                    f"{len(missing)} image(s) listed in '{file}' are not under "
                    f"'{self.root / '2017'}', e.g. {missing[:3]}.\n{_LAYOUT}"
                )
            parts[split] = sorted(paths[n] for n in names)
        return parts["train"], parts["test"]

    @property
    def num_classes(self) -> int:
        """Number of species folders."""
        return len(self.dataset.all_categories)

    def inference_spec(self) -> InferenceSpec:
        """The evaluation transform and the class names (stored in checkpoints)."""
        return InferenceSpec(self.transforms.input_spec(), tuple(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """``<super_category>/<species>`` in label order."""
        return list(self.dataset.all_categories)

    def predict_sample_names(self) -> list[str]:
        """The image file of each test sample, in order."""
        images = self.root / "2017"
        return [
            str(images / self.dataset.all_categories[c] / name)
            for c, name in (self.dataset.index[i] for i in self._test)
        ]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Carve validation from training; wrap each split with its transform."""
        if not self._train:
            raise ConfigError("The iNaturalist training split is empty.")
        rest, val = split_indices(len(self._train), [self.val_fraction], self.seed)
        eval_tf = self.transforms.eval()
        return (
            TransformedDataset(
                Subset(self.dataset, [self._train[i] for i in rest]),
                self.transforms.train(self.augment),
            ),
            TransformedDataset(Subset(self.dataset, [self._train[i] for i in val]), eval_tf),
            TransformedDataset(Subset(self.dataset, self._test), eval_tf),
        )
