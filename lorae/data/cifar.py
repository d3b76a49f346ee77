"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), the paper's main image benchmarks (section 4).

The official python version (``cifar-10-batches-py/`` / ``cifar-100-python/`` pickles) is read
through torchvision, which also downloads it with ``download: true``. Validation is carved out
of the 50,000 training images with ``seed``; the 10,000 test images stay untouched (the paper
reports test-set numbers). ``lorae test`` can add out-of-distribution sets (CIFAR-10 or
CIFAR-100 as the other one, SVHN; paper section 3) and CIFAR-C shifted test sets.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from lorae.data.base import (
    ClassificationDataModule,
    EvaluationSet,
    TransformedDataset,
    split_indices,
)
from lorae.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    check_corruptions,
    corruption_sets,
)
from lorae.data.inference import InferenceSpec
from lorae.data.preprocessing import Preprocessing, image_input
from lorae.data.svhn import load_svhn_test
from lorae.data.transforms import ImageTransforms
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "OODImageSet", "OutOfDistributionTarget"]

OODImageSet = Literal["cifar10", "cifar100", "svhn"]
#: Target given to every out-of-distribution sample: it belongs to no in-distribution class.
OutOfDistributionTarget = -1


def _without_md5(entries: Sequence[Sequence[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in entries]


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR-10 without md5 checks of the extracted pickles (the downloaded
    archive is still verified); lets the reader open any file in the official format."""

    train_list = _without_md5(CIFAR10.train_list)
    test_list = _without_md5(CIFAR10.test_list)
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100(CIFAR100):
    """torchvision's CIFAR-100 without md5 checks of the extracted pickles."""

    train_list = _without_md5(CIFAR100.train_list)
    test_list = _without_md5(CIFAR100.test_list)
    meta = {**CIFAR100.meta, "md5": None}


_READERS: dict[str, type[CIFAR10]] = {"cifar10": _CIFAR10, "cifar100": _CIFAR100}


def _expected_files(reader: type[CIFAR10], root: Path) -> list[Path]:
    folder = root / reader.base_folder
    names = [n for n, _ in (*reader.train_list, *reader.test_list)] + [reader.meta["filename"]]
    return [folder / str(n) for n in names]


def _not_found(reader: type[CIFAR10], root: Path) -> DataNotFoundError:
    expected = _expected_files(reader, root)
    missing = [str(p) for p in expected if not p.is_file()]
    return DataNotFoundError(
        f"{reader.__name__.strip('_')} files not found: {missing or expected}. Put the "
        f"extracted '{reader.base_folder}' folder of {reader.url} into '{root}', or set "
        "`download: true` on a machine with internet access."
    )


def load_cifar(
    name: Literal["cifar10", "cifar100"], root: str | Path, train: bool, download: bool
) -> CIFAR10:
    """The official CIFAR python files as a torchvision dataset of ``(PIL image, label)``.

    Raises:
        DataNotFoundError: If a file is missing and ``download`` is false.
        CorruptSampleError: If a pickle cannot be read; the message names it.
    """
    reader = _READERS[name]
    try:
        return reader(str(root), train=train, download=download)
    except RuntimeError as error:
        raise _not_found(reader, Path(root)) from error
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
        for path in _expected_files(reader, Path(root)):
            try:
                with path.open("rb") as f:
                    pickle.load(f, encoding="latin1")
            except Exception:
                raise CorruptSampleError(
                    f"CIFAR file '{path}' cannot be read as a CIFAR python pickle "
                    f"({type(error).__name__}: {error}). Extract it again from {reader.url}."
                ) from error
        raise CorruptSampleError(
            f"The CIFAR files in '{Path(root) / reader.base_folder}' do not have the official "
            f"layout ({type(error).__name__}: {error}). Extract them again from {reader.url}."
        ) from error


class _CIFARDataModule(ClassificationDataModule):
    """CIFAR-10/100: the shared body of :class:`CIFAR10DataModule` and
    :class:`CIFAR100DataModule` (layout and splits in their docstrings).

    Args:
        root: Folder holding ``cifar-10-batches-py`` / ``cifar-100-python``.
        preprocessing: The backbone's input size and normalisation (linked from the
            method's ``backbone`` by the CLI; ``None``: ImageNet's 224 px).
        image_size: Overrides the backbone's input size.
        mean: Overrides the backbone's normalisation mean.
        std: Overrides the backbone's normalisation std.
        download: Download the archive into ``root`` when files are missing.
        augment: Random horizontal/vertical flips and rotation of training images.
        ood: Out-of-distribution test sets for ``lorae test``: ``cifar10`` (for CIFAR-100),
            ``cifar100`` (for CIFAR-10), ``svhn``.
        ood_root: Folder of the OOD sets (``cifar-10-batches-py/``, ``cifar-100-python/``,
            ``test_32x32.mat``); default ``root``.
        corruptions: CIFAR-C corruptions evaluated by ``lorae test`` (``"all"``: 19).
        corruption_severities: Severities (1..5) of each corruption.
        corruption_root: Extracted ``CIFAR-10-C`` / ``CIFAR-100-C`` folder; ``None`` generates
            the corruptions with the ``imagecorruptions`` package.
        batch_size: Samples per training batch.
        eval_batch_size: Samples per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes; ``"auto"`` (the default): from the
            cores and the trainer's device (see ``ClassificationDataModule``).
        pin_memory: Page-locked batches; ``"auto"`` (the default): when training on CUDA.
        val_fraction: Share of the training images carved out for validation.
        seed: Seed of the validation split and the training shuffle.
        skip_corrupt: Leave unreadable samples out of their batch instead of stopping.

    Raises:
        DataNotFoundError: Files missing and ``download`` false.
        ConfigError: An option is out of range.
    """

    dataset_name: ClassVar[Literal["cifar10", "cifar100"]]
    corruption_folder: ClassVar[Literal["CIFAR-10-C", "CIFAR-100-C"]]

    def __init__(
        self,
        root: str,
        preprocessing: Preprocessing = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        download: bool = False,
        augment: bool = False,
        ood: Sequence[OODImageSet] = (),
        ood_root: str | None = None,
        corruptions: Sequence[Corruption] | Literal["all"] = (),
        corruption_severities: Sequence[int] = SEVERITIES,
        corruption_root: str | None = None,
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
        self.download = download
        self.augment = augment
        self.ood = list(ood)
        if self.dataset_name in self.ood:
            raise ConfigError(
                f"ood lists {self.dataset_name!r}, the in-distribution data set itself; "
                "choose other sets (cifar10, cifar100, svhn)."
            )
        self.ood_root = self.root if ood_root is None else Path(ood_root)
        self.corruptions = list(CORRUPTIONS if corruptions == "all" else corruptions)
        self.corruption_severities = list(corruption_severities)
        self.corruption_root = corruption_root
        check_corruptions(self.corruptions, self.corruption_severities)
        reader = _READERS[self.dataset_name]
        if not download and not all(p.is_file() for p in _expected_files(reader, self.root)):
            raise _not_found(reader, self.root)
        self._class_names: list[str] | None = None

    def inference_spec(self) -> InferenceSpec:
        """The evaluation transform and the class names (stored in checkpoints)."""
        return InferenceSpec(self.transforms.input_spec(), tuple(self.class_names))

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, from the data set's ``meta`` file."""
        if self._class_names is None:
            self._class_names = list(load_cifar(self.dataset_name, self.root, False, False).classes)
        return self._class_names

    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Read the pickles; carve validation from training; keep the test set whole."""
        train_all = load_cifar(self.dataset_name, self.root, train=True, download=self.download)
        test = load_cifar(self.dataset_name, self.root, train=False, download=False)
        self._class_names = list(train_all.classes)
        rest, val = split_indices(len(train_all), [self.val_fraction], self.seed)
        eval_tf = self.transforms.eval()
        return (
            TransformedDataset(Subset(train_all, rest), self.transforms.train(self.augment)),
            TransformedDataset(Subset(train_all, val), eval_tf),
            TransformedDataset(test, eval_tf),
        )

    def _ood_set(self, name: OODImageSet) -> Dataset[Any]:
        if name == "svhn":
            raw: Dataset[Any] = load_svhn_test(self.ood_root, self.download)
        else:
            raw = load_cifar(name, self.ood_root, train=False, download=self.download)
        return _OutOfDistribution(TransformedDataset(raw, self.transforms.eval()))

    def build_evaluation_sets(self) -> list[EvaluationSet]:
        """OOD sets (``ood``, targets :data:`OutOfDistributionTarget`) then the CIFAR-C sets
        ``"<corruption>/<severity>"``, all with exactly the test split's transform."""
        sets = [EvaluationSet(name, "ood", self._ood_set(name)) for name in self.ood]
        if self.corruptions:
            clean = load_cifar(self.dataset_name, self.root, train=False, download=False)
            for name, dataset in corruption_sets(
                clean,
                self.transforms.eval(),
                self.corruptions,
                self.corruption_severities,
                self.corruption_root,
                self.corruption_folder,
                self.seed,
            ):
                sets.append(EvaluationSet(name, "shift", dataset))
        return sets


class _OutOfDistribution(Dataset[tuple[Any, int]]):
    """Replaces every target by :data:`OutOfDistributionTarget` (no in-distribution class)."""

    def __init__(self, dataset: Dataset[tuple[Any, Any]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index][0], OutOfDistributionTarget


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 colour images of 10 classes.

    Layout: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (the
    extracted https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; ``download: true``
    fetches it). Images are resized to the backbone's input and normalised with its mean/std
    (:class:`~lorae.data.transforms.ImageTransforms`); ``augment`` adds the reference code's
    flips and rotation to training images. Arguments: see :class:`_CIFARDataModule`.

    Shape:
        - inputs: float ``(B, 3, image_size, image_size)``.
        - target: long ``(B,)`` in ``[0, 10)`` (``-1`` in out-of-distribution sets).
    """

    dataset_name = "cifar10"
    corruption_folder = "CIFAR-10-C"

    @property
    def num_classes(self) -> int:
        """10."""
        return 10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32x32 colour images of 100 fine classes.

    Layout: ``root/cifar-100-python/{train, test, meta}`` (the extracted
    https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz; ``download: true`` fetches it).
    Arguments as :class:`CIFAR10DataModule`; ``ood`` takes ``cifar10`` and ``svhn`` (the paper's
    OOD experiment, section 3: CIFAR-100 in-distribution vs CIFAR-10 / SVHN), corruptions come
    from ``CIFAR-100-C``.

    Shape:
        - inputs: float ``(B, 3, image_size, image_size)``.
        - target: long ``(B,)`` in ``[0, 100)`` (``-1`` in out-of-distribution sets).
    """

    dataset_name = "cifar100"
    corruption_folder = "CIFAR-100-C"

    @property
    def num_classes(self) -> int:
        """100."""
        return 100
