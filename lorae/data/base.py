"""Shared base of every classification data module.

The LoRA-Ensemble paper (Halbheer et al., "LoRA-Ensemble: Efficient Uncertainty Modelling for
Self-attention Networks") reports accuracy and calibration on each data set's *test* split and
selects hyperparameters on a validation split carved out of the training data. This module holds
the machinery all data sets share: argument validation, a seeded fractional split, split caching
and the dataloaders. A concrete data set only says how many classes it has and how to build its
three datasets.

Batch contract: every dataloader yields ``(inputs, target)``, where ``inputs`` is a float tensor
``(B, ...)`` (images, spectrograms) or a ``dict[str, Tensor]`` of ``(B, T)`` long tensors (text),
and ``target`` is a long tensor ``(B,)`` with values in ``[0, num_classes)``.
"""

from __future__ import annotations

import abc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lorae.data.inference import InferenceSpec
from lorae.data.robust import (
    EpochSampler,
    ResumableDataLoader,
    SkipCorrupt,
    new_counter,
    skipping_collate,
)
from lorae.errors import ConfigError

__all__ = [
    "ClassificationDataModule",
    "EvaluationSet",
    "TransformedDataset",
    "seeded_split",
    "split_indices",
]

T = TypeVar("T")

CollateFn = Callable[[list[Any]], Any]

#: Most loader processes ``num_workers="auto"`` starts (what the iNaturalist configs set for
#: GPU training).
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``: a container's or a job's
    CPU set, not the host's), or ``os.cpu_count()`` where affinity is not available."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_num_workers(cores: int, accelerator: str) -> int:
    """``num_workers="auto"``: loader processes for ``cores`` available cores.

    With a GPU the cores have nothing else to do: ``min(8, cores - 1)``, one core left to the
    training loop. On a CPU-only run none: the model's compute threads already use every core,
    and loading a batch in the main process costs little next to a step. Measured on the
    2-core build machine (``benchmarks/pipeline.py``, ViT-B/32 at 224 px, M = 4, B = 32,
    ImageFolder CIFAR-10 JPEGs, docs/performance.md): 0 workers 0.99x the model-only
    throughput, 1 worker 0.95x. No worker also keeps mid-epoch resume exact
    (:mod:`lorae.data.robust`).
    """
    if accelerator == "cpu":
        return 0
    return min(MAX_AUTO_WORKERS, max(cores - 1, 0))


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_fraction(name: str, value: object) -> float:
    """Return ``value`` as float if it lies in ``[0, 1)``, else raise :class:`ConfigError`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= float(value) < 1.0
    ):
        raise ConfigError(
            f"{name} must be a number in [0, 1) (the share of samples to hold out, "
            f"e.g. 0.1), got {value!r}."
        )
    return float(value)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split ``range(n)`` into a remainder and one part per fraction, reproducibly.

    One permutation of ``range(n)`` is drawn from a generator seeded with ``seed``; the parts
    are taken from its front in the order of ``fractions`` and the remainder is what is left.
    A part therefore depends only on ``n``, ``seed`` and the fractions before it: pass the
    test fraction first so the test split stays the same when the validation fraction changes.
    Each part has ``round(fraction * n)`` indices, at least one when its fraction is positive.
    Indices inside every part are sorted.

    Args:
        n: Number of samples.
        fractions: Share of ``n`` for each carved part, each in ``[0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``[remainder, part_0, part_1, ...]``, disjoint and together covering ``range(n)``.

    Raises:
        ConfigError: If a fraction is out of range or too few samples remain.
    """
    for fraction in fractions:
        _check_fraction("split fraction", fraction)
    counts = [max(1, round(f * n)) if f > 0 else 0 for f in fractions]
    if n - sum(counts) < 1:
        raise ConfigError(
            f"Cannot carve fractions {list(fractions)} out of {n} samples: "
            f"{sum(counts)} would be held out and none left for training. "
            "Lower the fractions or provide more data."
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator).tolist()
    parts: list[list[int]] = []
    start = 0
    for count in counts:
        parts.append(sorted(permutation[start : start + count]))
        start += count
    return [sorted(permutation[start:]), *parts]


def seeded_split(dataset: Dataset[T], fractions: Sequence[float], seed: int) -> list[Subset[T]]:
    """Split a sized dataset like :func:`split_indices`, returning :class:`Subset` views.

    Args:
        dataset: A dataset with ``__len__``.
        fractions: Share of the dataset for each carved part, each in ``[0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``[remainder, part_0, part_1, ...]`` as subsets of ``dataset``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    return [Subset(dataset, part) for part in split_indices(n, fractions, seed)]


class TransformedDataset(Dataset[tuple[Any, Any]]):
    """Applies a transform to the input of every ``(input, target)`` sample of a dataset.

    Lets train and evaluation views of one dataset (e.g. a training folder from which
    validation is carved) use different transforms without reading the files twice.

    Args:
        dataset: A sized dataset of ``(input, target)`` pairs.
        transform: Applied to ``input``; ``None`` leaves it unchanged.
    """

    def __init__(
        self, dataset: Dataset[tuple[Any, Any]], transform: Callable[[Any], Any] | None
    ) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        inputs, target = self.dataset[index]
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, target


@dataclass(frozen=True)
class EvaluationSet:
    """An extra data set evaluated by ``lorae test`` next to the test split (paper section 3).

    Attributes:
        name: Unique name used in metric keys, e.g. ``"svhn"`` or ``"gaussian_noise/3"``.
        kind: ``"ood"``: out-of-distribution samples (their targets are ignored); scored
            against the in-distribution test split by AUROC/AUPRC. ``"shift"``: the test
            task under a distribution shift (same classes); scored with the usual metrics.
        dataset: Yields ``(input, target)`` exactly like the test split (same transforms).
    """

    name: str
    kind: Literal["ood", "shift"]
    dataset: Dataset[Any]


class ClassificationDataModule(pl.LightningDataModule, abc.ABC):
    """Base of every classification data module: splits, caching and dataloaders.

    As in the LoRA-Ensemble paper, models are evaluated on the test split and validation is
    carved out of the training data when a data set has no validation split of its own
    (see :meth:`carve`). Subclasses implement :attr:`num_classes`, :attr:`class_names` and
    :meth:`build_datasets`; :attr:`num_classes` must be answerable right after ``__init__``
    because ``LightningCLI`` links ``data.num_classes`` into the model when it instantiates it.

    Every dataloader yields ``(inputs, target)``.

    Shape:
        - inputs: float ``(B, ...)`` or ``dict[str, Tensor]`` of long ``(B, T)``.
        - target: long ``(B,)`` with values in ``[0, num_classes)``.

    Args:
        batch_size: Samples per training batch.
        eval_batch_size: Samples per validation/test/predict batch; ``None`` uses
            ``batch_size``.
        num_workers: Dataloader worker processes (0 loads in the main process); ``"auto"``
            (the default) picks them when the loaders are built, from the cores this process
            may use and the trainer's device (:func:`auto_num_workers`).
        pin_memory: Page-locked batches for faster copies to a GPU; ``"auto"`` (the
            default): when the trainer runs on CUDA.
        val_fraction: Share of the training data carved out for validation when the data set
            has no validation split, in ``[0, 1)``.
        seed: Seed of the carved splits and of the training shuffle.
        skip_corrupt: Leave samples whose file cannot be read out of their batch (each is
            reported on stderr, and the count at the end of the stage) instead of stopping
            with :class:`~lorae.errors.CorruptSampleError`.

    Raises:
        ConfigError: If an argument is out of range.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        pin_memory: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.skip_corrupt = bool(skip_corrupt)
        self._skipped: Any = None  # shared counter of skipped corrupt samples (robust.py)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else _check_int("eval_batch_size", eval_batch_size, 1)
        )
        self.num_workers: int | Literal["auto"] = (
            "auto" if num_workers == "auto" else _check_int("num_workers", num_workers, 0)
        )
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise ConfigError(f"pin_memory must be true, false or 'auto', got {pin_memory!r}.")
        self.pin_memory: bool | Literal["auto"] = pin_memory
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        self._datasets: tuple[Dataset[Any], Dataset[Any], Dataset[Any]] | None = None
        self._evaluation_sets: list[EvaluationSet] | None = None

    # ------------------------------------------------------------------ subclass interface

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes; available right after ``__init__``."""

    @property
    @abc.abstractmethod
    def class_names(self) -> list[str]:
        """Class names in label order (``class_names[i]`` is the name of label ``i``)."""

    @abc.abstractmethod
    def build_datasets(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        """Build the ``(train, val, test)`` datasets; called once by :meth:`setup`.

        Each dataset yields ``(input, target)`` samples with an int ``target`` in
        ``[0, num_classes)``.
        """

    def build_evaluation_sets(self) -> list[EvaluationSet]:
        """Extra out-of-distribution and shifted test sets; none by default.

        Called once, when the test dataloaders are first requested. ``test_dataloader``
        returns the test split first and these sets after it, in this order.
        """
        return []

    @property
    def collate_fn(self) -> CollateFn | None:
        """Collate function of every dataloader; ``None`` uses PyTorch's default collate."""
        return None

    @property
    def class_weights(self) -> list[float] | None:
        """Per-class cross-entropy weights (length ``num_classes``) or ``None`` (unweighted).

        The CLI links this to ``model.class_weights`` when it instantiates the model, so a data
        set with its own weighting (HAM10000, paper appendix M) needs no second setting. Like
        :attr:`num_classes` it must be answerable right after ``__init__``.
        """
        return None

    # ------------------------------------------------------------------ shared machinery

    def carve(self, dataset: Dataset[T], *fractions: float) -> list[Subset[T]]:
        """Split ``dataset`` with this module's ``seed`` (see :func:`seeded_split`).

        Args:
            dataset: A sized dataset.
            *fractions: Share of the dataset for each carved part.

        Returns:
            ``[remainder, part_0, part_1, ...]``.
        """
        return seeded_split(dataset, fractions, self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets on first call and cache them (``stage`` is ignored)."""
        if self._datasets is None:
            self._datasets = self.build_datasets()

    def _splits(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        self.setup()
        assert self._datasets is not None
        return self._datasets

    @property
    def train_dataset(self) -> Dataset[Any]:
        """Training split (built on first access)."""
        return self._splits()[0]

    @property
    def val_dataset(self) -> Dataset[Any]:
        """Validation split (built on first access)."""
        return self._splits()[1]

    @property
    def test_dataset(self) -> Dataset[Any]:
        """Test split (built on first access)."""
        return self._splits()[2]

    def _accelerator(self) -> str:
        """The device type the trainer runs on (``"cpu"`` without a trainer)."""
        trainer = self.trainer
        return "cpu" if trainer is None else trainer.strategy.root_device.type

    @property
    def loader_workers(self) -> int:
        """``num_workers`` with ``"auto"`` resolved for this machine and trainer."""
        if self.num_workers == "auto":
            return auto_num_workers(available_cores(), self._accelerator())
        return self.num_workers

    @property
    def loader_pin_memory(self) -> bool:
        """``pin_memory`` with ``"auto"`` resolved: on when the trainer runs on CUDA."""
        if self.pin_memory == "auto":
            return self._accelerator() == "cuda"
        return self.pin_memory

    def _loader(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        collate_fn = self.collate_fn
        if self.skip_corrupt:
            if self._skipped is None:
                self._skipped = new_counter()
            dataset = SkipCorrupt(dataset, self._skipped)
            collate_fn = skipping_collate(collate_fn)
        sampler: Sampler[int] | None = None
        if generator is not None:
            # Resumable mid-epoch (robust.py); Lightning swaps in a DistributedSampler under DDP.
            sampler = EpochSampler(dataset, self.seed)
        elif self.trainer is not None and self.trainer.world_size > 1:
            # Each evaluation sample on exactly one rank: Lightning's default DistributedSampler
            # would pad the last rank with repeated samples and count them twice in metrics.
            sampler = UnrepeatedDistributedSampler(
                dataset,
                num_replicas=self.trainer.world_size,
                rank=self.trainer.global_rank,
                shuffle=False,
            )
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.loader_workers,
            collate_fn=collate_fn,
            pin_memory=self.loader_pin_memory,
            persistent_workers=self.loader_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches; the order is reproducible from ``seed`` and resumable
        mid-epoch from a checkpoint (:class:`~lorae.data.robust.ResumableDataLoader`)."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_dataset, self.batch_size, generator)

    def teardown(self, stage: str) -> None:
        """Report how many corrupt samples were skipped (``skip_corrupt: true``)."""
        if self._skipped is None or not self._skipped.value:
            return
        prefix = ""
        if self.trainer is not None and self.trainer.world_size > 1:
            prefix = f"[rank {self.trainer.global_rank}] "
        print(
            f"{prefix}lorae: skipped {self._skipped.value} corrupt sample(s) during "
            f"{getattr(stage, 'value', stage)} "
            "(skip_corrupt: true); the lines starting 'lorae: skipping' name them.",
            file=sys.stderr,
        )
        self._skipped.value = 0

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation batches in a fixed order."""
        return self._loader(self.val_dataset, self.eval_batch_size)

    @property
    def evaluation_sets(self) -> list[EvaluationSet]:
        """The extra test sets of :meth:`build_evaluation_sets` (built on first access)."""
        if self._evaluation_sets is None:
            self._evaluation_sets = self.build_evaluation_sets()
        return self._evaluation_sets

    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """Test batches in a fixed order; with evaluation sets, a list: the test split first,
        then one loader per :attr:`evaluation_sets` entry (``dataloader_idx = 1 + i``)."""
        test = self._loader(self.test_dataset, self.eval_batch_size)
        if not self.evaluation_sets:
            return test
        extra = [self._loader(s.dataset, self.eval_batch_size) for s in self.evaluation_sets]
        return [test, *extra]

    def predict_dataloader(self) -> DataLoader[Any]:
        """The test split in a fixed order (targets included)."""
        return self._loader(self.test_dataset, self.eval_batch_size)

    def inference_spec(self) -> InferenceSpec | None:
        """How a trained model reads new inputs of this data set (image size and
        normalisation, tokenizer and max length, or audio features) and the class names;
        stored in checkpoints so ``lorae predict --data.predict_path`` and
        :class:`lorae.Predictor` need no training config. ``None`` (the default): not known."""
        return None

    @property
    def predict_has_targets(self) -> bool:
        """Whether :meth:`predict_dataloader`'s targets are labels (the test split). ``False``
        for unlabelled inputs, whose "targets" are the sample indices instead."""
        return True

    def predict_sample_names(self) -> list[str] | None:
        """A name per sample of :meth:`predict_dataloader`, in order (e.g. file paths), written
        as the ``file`` column of ``lorae predict``; ``None`` (the default) writes no names."""
        return None
