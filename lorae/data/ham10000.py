"""HAM10000 (Tschandl et al. 2018): 10,015 dermatoscopic images of 7 skin-lesion classes,
the paper's medical-imaging benchmark with a strong class imbalance (section 4, appendix M).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

from lorae.data.base import ClassificationDataModule, TransformedDataset, split_indices
from lorae.data.images import load_rgb_image
from lorae.data.inference import InferenceSpec
from lorae.data.preprocessing import Preprocessing, image_input
from lorae.data.transforms import ImageTransforms
from lorae.errors import ConfigError, DataNotFoundError

__all__ = ["HAM10000_CLASSES", "HAM10000DataModule", "effective_number_weights"]

HAM10000_URL = "https://doi.org/10.7910/DVN/DBW86T"
METADATA = "HAM10000_metadata.csv"
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
#: Diagnosis codes of the ``dx`` column, in label order (sorted).
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

_LAYOUT = (
    f"Expected the official HAM10000 layout from {HAM10000_URL}:\n"
    f"  <root>/{METADATA}   (columns lesion_id, image_id, dx, ...)\n"
    f"  <root>/{IMAGE_FOLDERS[0]}/<image_id>.jpg\n"
    f"  <root>/{IMAGE_FOLDERS[1]}/<image_id>.jpg"
)


def effective_number_weights(counts: list[int], beta: float) -> list[float]:
    """Class-balanced loss weights from the effective number of samples (Cui et al. 2019).

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, rescaled so that the weights sum to the number of
    classes C (the paper uses beta = 0.9991 on HAM10000, appendix M).

    Args:
        counts: Training samples ``n_c`` of each class, each > 0.
        beta: In ``[0, 1)``; 0 gives uniform weights, values near 1 inverse class frequency.

    Raises:
        ConfigError: If ``beta`` is out of range or a class has no samples.
    """
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"class_weight_beta must be in [0, 1), got {beta!r}.")
    if any(n <= 0 for n in counts):
        raise ConfigError(
            f"Every class needs training samples for class-balanced weights; the training "
            f"split has counts {counts}. Use another seed or smaller test/val fractions."
        )
    raw = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    return [w * len(raw) / sum(raw) for w in raw]


class _ImageFiles(Dataset[tuple[Image.Image, int]]):
    """``(RGB PIL image, label)`` from a list of files."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb_image(self.paths[index]), self.labels[index]


class HAM10000DataModule(ClassificationDataModule):
    """HAM10000 with a split grouped by lesion and class-balanced loss weights.

    The data set has several images of many lesions, so the split is drawn over ``lesion_id``
    (with ``seed``): ``test_fraction`` and ``val_fraction`` are shares of the *lesions*, and no
    lesion appears in two splits. Labels are the ``dx`` codes in sorted order
    (:data:`HAM10000_CLASSES`). Images (600x450) are resized to the backbone's square input and
    normalised with its mean/std; ``augment`` adds the reference code's flips and rotation.

    :attr:`class_weights` are the effective-number weights (Cui et al. 2019) of the training
    split with ``class_weight_beta`` (paper: 0.9991); the CLI links them into the model's loss.

    Shape:
        - inputs: float ``(B, 3, image_size, image_size)``.
        - target: long ``(B,)`` in ``[0, 7)``.

    Args:
        root: Folder with ``HAM10000_metadata.csv`` and the two image folders.
        preprocessing: The backbone's input size and normalisation (linked from the
            method's ``backbone`` by the CLI; ``None``: ImageNet's 224 px).
        image_size: Overrides the backbone's input size.
        mean: Overrides the backbone's normalisation mean.
        std: Overrides the backbone's normalisation std.
        augment: Random horizontal/vertical flips and rotation of training images.
        class_weight_beta: ``beta`` of the effective-number weights; ``None`` trains unweighted.
        test_fraction: Share of lesions held out for testing.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of lesions held out for validation.
        seed: Seed of the lesion split and the training shuffle.
        skip_corrupt: Leave unreadable samples out of their batch instead of stopping.

    Raises:
        DataNotFoundError: If the metadata file or an image is missing.
        ConfigError: If the metadata has unknown classes or missing columns, or an option is out
            of range.
    """

    def __init__(
        self,
        root: str,
        preprocessing: Preprocessing = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        augment: bool = False,
        class_weight_beta: float | None = 0.9991,
        test_fraction: float = 0.15,
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
        self.root = Path(root)
        self.transforms = ImageTransforms.resolve(
            image_input(preprocessing, type(self).__name__), image_size, mean, std
        )
        self.augment = augment
        rows = self._read_metadata()
        lesions = sorted({lesion for lesion, _, _ in rows})
        train_l, test_l, val_l = split_indices(
            len(lesions), [test_fraction, self.val_fraction], self.seed
        )
        split_of = {
            lesions[i]: s
            for s, part in (("train", train_l), ("test", test_l), ("val", val_l))
            for i in part
        }
        files = self._image_files()
        self._splits_rows: dict[str, tuple[list[Path], list[int]]] = {
            "train": ([], []),
            "val": ([], []),
            "test": ([], []),
        }
        for lesion, image_id, dx in rows:
            if image_id not in files:
                raise DataNotFoundError(
                    f"Image '{image_id}.jpg' listed in '{self.root / METADATA}' is in neither "
                    f"image folder.\n{_LAYOUT}"
                )
            paths, labels = self._splits_rows[split_of[lesion]]
            paths.append(files[image_id])
            labels.append(HAM10000_CLASSES.index(dx))
        counts = Counter(self._splits_rows["train"][1])
        self.train_class_counts = [counts[c] for c in range(len(HAM10000_CLASSES))]
        self._class_weights = (
            None
            if class_weight_beta is None
            else effective_number_weights(self.train_class_counts, class_weight_beta)
        )

    def _read_metadata(self) -> list[tuple[str, str, str]]:
        path = self.root / METADATA
        if not path.is_file():
            raise DataNotFoundError(f"HAM10000 metadata '{path}' not found.\n{_LAYOUT}")
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"lesion_id", "image_id", "dx"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(
                    f"'{path}' lacks column(s) {sorted(missing)}; its header is "
                    f"{reader.fieldnames}.\n{_LAYOUT}"
                )
            rows = [(r["lesion_id"], r["image_id"], r["dx"]) for r in reader]
        unknown = sorted({dx for _, _, dx in rows} - set(HAM10000_CLASSES))
        if unknown:
            raise ConfigError(
                f"'{path}' has diagnosis code(s) {unknown}; HAM10000 has {HAM10000_CLASSES}."
            )
        if not rows:
            raise DataNotFoundError(f"'{path}' lists no images.\n{_LAYOUT}")
        return rows

    def _image_files(self) -> dict[str, Path]:
        folders = [self.root / name for name in IMAGE_FOLDERS if (self.root / name).is_dir()]
        if not folders:
            raise DataNotFoundError(f"No HAM10000 image folder in '{self.root}'.\n{_LAYOUT}")
        return {p.stem: p for folder in folders for p in folder.glob("*.jpg")}

    @property
    def num_classes(self) -> int:
        """7."""
        return len(HAM10000_CLASSES)

    def inference_spec(self) -> InferenceSpec:
        """The evaluation transform and the class names (stored in checkpoints)."""
        return InferenceSpec(self.transforms.input_spec(), tuple(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """The diagnosis codes in label order."""
        return list(HAM10000_CLASSES)

    @property
    def class_weights(self) -> list[float] | None:
        """Effective-number weights of the training split, or ``None`` when unweighted."""
        return self._class_weights

    def predict_sample_names(self) -> list[str]:
        """The image file of each test sample, in order."""
        return [str(path) for path in self._splits_rows["test"][0]]

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """The three lesion-disjoint splits with their transforms."""
        eval_tf = self.transforms.eval()

        def split(name: str, transform: Any) -> Dataset[Any]:
            return TransformedDataset(_ImageFiles(*self._splits_rows[name]), transform)

        return (
            split("train", self.transforms.train(self.augment)),
            split("val", eval_tf),
            split("test", eval_tf),
        )
