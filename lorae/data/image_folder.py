"""A user's own images, one folder per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2

from lorae.data.base import ClassificationDataModule, TransformedDataset, split_indices
from lorae.data.images import load_rgb_image
from lorae.data.inference import ImageInput, InferenceSpec
from lorae.data.preprocessing import Preprocessing, image_input
from lorae.data.transforms import ImageTransforms
from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["ImageFolderDataModule"]

_LAYOUT = (
    "Expected layout:\n"
    "  <root>/train/<class_name>/<image>.jpg|png|...   (required)\n"
    "  <root>/val/<class_name>/...                       (optional, same classes as train)\n"
    "  <root>/test/<class_name>/...                      (optional, same classes as train)"
)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMG_EXTENSIONS)


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted class folder names of ``split_dir``; each must hold at least one image."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(
            f"No class folders found in '{split_dir}'. Put the images of each class in their "
            f"own sub-folder.\n{_LAYOUT}"
        )
    empty = [c for c in classes if not any(_is_image(p) for p in (split_dir / c).rglob("*"))]
    if empty:
        raise DataNotFoundError(
            f"No images found in class folder(s) {empty} of '{split_dir}' (allowed "
            f"extensions: {', '.join(IMG_EXTENSIONS)}). Add images or remove the empty "
            f"folders.\n{_LAYOUT}"
        )
    return classes


class ImageFolderDataModule(ClassificationDataModule):
    """Classify a user's own images stored one folder per class.

    Layout: ``root/train/<class>/*.jpg|png|...`` (required), ``root/val/<class>/...`` and
    ``root/test/<class>/...`` (optional, with the same class folders as ``train``). Labels follow
    :class:`torchvision.datasets.ImageFolder`: class ``i`` is the ``i``-th folder name in
    sorted order.

    Missing splits are carved out of ``train`` with ``seed`` (as the LoRA-Ensemble paper carves
    validation from training): if ``test/`` is missing, ``test_fraction`` of the training images
    become the test split; if ``val/`` is missing, ``val_fraction`` of them become the
    validation split. The test split is drawn first, so it does not change with
    ``val_fraction``. Carved validation/test images get the evaluation transform.

    Evaluation transform: resize the shorter side to ``image_size`` (bicubic), center crop to
    ``image_size``, scale to ``[0, 1]``, normalize with ``mean``/``std``. Training uses the same
    plus a random horizontal flip when ``augment`` is true.

    Shape:
        - inputs: float ``(B, 3, image_size, image_size)``.
        - target: long ``(B,)``.

    Args:
        root: Data folder (see layout above).
        preprocessing: The backbone's published input size, mean and std, the defaults of the
            next three arguments (``vit_b_32``: 224 px, ImageNet mean/std; timm ``vit_*``
            augreg: 224 px, 0.5/0.5); the CLI links it from the method's ``backbone``.
        image_size: Side of the square model input in pixels (default: the backbone's, or 224).
        mean: Per-channel normalization mean (default: the backbone's, or ImageNet's).
        std: Per-channel normalization standard deviation (default: the backbone's, or
            ImageNet's).
        augment: Randomly flip training images horizontally.
        test_fraction: Share of ``train`` carved out as test split when ``test/`` is missing.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of ``train`` carved out as validation split when ``val/`` is
            missing.
        seed: Seed of the carved splits and of the training shuffle.
        skip_corrupt: Leave images that cannot be read out of their batch (each reported on
            stderr, the count at the end of the stage) instead of stopping with
            :class:`~lorae.errors.CorruptSampleError`.

    Raises:
        DataNotFoundError: If ``root`` or ``root/train`` is missing or holds no images.
        ConfigError: If ``val``/``test`` class folders differ from ``train`` or an argument is
            out of range.
    """

    def __init__(
        self,
        root: str,
        preprocessing: Preprocessing = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        augment: bool = False,
        test_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        val_fraction: float = 0.1,
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
        # the backbone's published size and normalisation, overrides validated
        resolved = ImageTransforms.resolve(
            image_input(preprocessing, type(self).__name__), image_size, mean, std
        )
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float))
            or not 0.0 <= test_fraction < 1.0
        ):
            raise ConfigError(
                f"test_fraction must be a number in [0, 1) (the share of train/ held out as "
                f"test split when test/ is missing), got {test_fraction!r}."
            )
        self.root = Path(root)
        self.image_size = resolved.image_size
        self.mean = resolved.mean
        self.std = resolved.std
        self.augment = augment
        self.test_fraction = float(test_fraction)

        if not self.root.is_dir():
            raise DataNotFoundError(f"Image folder '{self.root}' does not exist.\n{_LAYOUT}")
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise DataNotFoundError(
                f"Training folder '{train_dir}' does not exist; it is required.\n{_LAYOUT}"
            )
        self._classes = _class_folders(train_dir)
        self._has_split: dict[str, bool] = {}
        for split in ("val", "test"):
            split_dir = self.root / split
            self._has_split[split] = split_dir.is_dir()
            if self._has_split[split]:
                self._check_same_classes(split_dir, _class_folders(split_dir))
        carves_both = not self._has_split["val"] and not self._has_split["test"]
        if carves_both and self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction must be below 1 so that training images "
                f"remain, got {self.val_fraction} + {self.test_fraction}."
            )

    def _check_same_classes(self, split_dir: Path, classes: list[str]) -> None:
        if classes == self._classes:
            return
        missing = sorted(set(self._classes) - set(classes))
        extra = sorted(set(classes) - set(self._classes))
        raise ConfigError(
            f"Class folders of '{split_dir}' differ from those of '{self.root / 'train'}': "
            f"missing in {split_dir.name}/: {missing}, not in train/: {extra}. Every split "
            "needs the same class folders (labels are assigned by sorted folder name)."
        )

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``root/train``."""
        return len(self._classes)

    def inference_spec(self) -> InferenceSpec:
        """The evaluation transform and the class folder names (stored in checkpoints)."""
        spec = ImageInput(self.image_size, self.mean, self.std, resize="shorter_side_crop")
        return InferenceSpec(spec, tuple(self._classes))

    @property
    def class_names(self) -> list[str]:
        """Class folder names in label order (sorted)."""
        return list(self._classes)

    def eval_transform(self) -> v2.Compose:
        """Resize (bicubic), center crop, scale to ``[0, 1]`` and normalize.

        Shape:
            - output: float ``(3, image_size, image_size)``.
        """
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
                v2.ToPureTensor(),
            ]
        )

    def train_transform(self) -> v2.Compose:
        """The evaluation transform, plus a random horizontal flip when ``augment`` is true.

        Shape:
            - output: float ``(3, image_size, image_size)``.
        """
        if not self.augment:
            return self.eval_transform()
        return v2.Compose([v2.RandomHorizontalFlip(), self.eval_transform()])

    def _folder(self, split: str) -> ImageFolder:
        return ImageFolder(str(self.root / split), loader=load_rgb_image)

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Read the class folders and carve the missing splits out of ``train``."""
        train_tf, eval_tf = self.train_transform(), self.eval_transform()
        train_all = self._folder("train")
        fractions: list[float] = []
        if not self._has_split["test"]:
            fractions.append(self.test_fraction)
        if not self._has_split["val"]:
            fractions.append(self.val_fraction)
        parts = split_indices(len(train_all), fractions, self.seed)
        carved = dict(
            zip([s for s in ("test", "val") if not self._has_split[s]], parts[1:], strict=True)
        )

        def split(name: str) -> Dataset[Any]:
            if name in carved:
                return TransformedDataset(Subset(train_all, carved[name]), eval_tf)
            return TransformedDataset(self._folder(name), eval_tf)

        train = TransformedDataset(Subset(train_all, parts[0]), train_tf)
        return train, split("val"), split("test")

    def predict_sample_names(self) -> list[str]:
        """Path of every test image relative to ``root``, in prediction order."""
        dataset = self.test_dataset
        assert isinstance(dataset, TransformedDataset)
        inner = dataset.dataset
        folder, indices = (
            (inner.dataset, list(inner.indices))
            if isinstance(inner, Subset)
            else (inner, list(range(len(inner))))  # type: ignore[arg-type]
        )
        assert isinstance(folder, ImageFolder)
        return [Path(folder.samples[i][0]).relative_to(self.root).as_posix() for i in indices]
