"""Data loading that survives crashes and bad files.

- :class:`EpochSampler` and :class:`ResumableDataLoader`: the training order is a function of
  ``(seed, epoch)`` and the loader's position within the epoch is saved in Lightning
  checkpoints (Lightning's ``state_dict``/``load_state_dict`` protocol for dataloaders), so
  ``lorae fit --ckpt_path last`` resumes mid-epoch with exactly the batches an uninterrupted
  run would have seen.
- :class:`SkipCorrupt` and :func:`skipping_collate`: with ``skip_corrupt: true`` a sample
  whose file cannot be read (:class:`~lorae.errors.CorruptSampleError`) is left out of its
  batch and counted instead of stopping the run.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data._utils.collate import default_collate

from lorae.errors import CorruptSampleError

__all__ = [
    "EpochSampler",
    "ResumableDataLoader",
    "SkipCorrupt",
    "skipping_collate",
]


class EpochSampler(RandomSampler):
    """A random permutation per epoch that depends only on ``seed`` and the epoch.

    The order is the one ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed
    (seed))`` produces when iterated epoch after epoch (each epoch that loader draws a worker
    base seed, the permutation, and one more permutation for ``RandomSampler``'s empty
    remainder slice, from its generator), so switching to it kept the training order; unlike
    it, epoch ``e`` can be
    produced directly, after a restart, from :meth:`set_epoch` (Lightning calls it before
    every epoch). Being a ``RandomSampler``, it is replaced by Lightning's
    ``DistributedSampler`` under DDP, which is seeded by epoch as well.

    Args:
        data_source: A sized dataset.
        seed: Seed of the permutations.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        n = len(self.data_source)
        for _ in range(self.epoch):  # replay earlier epochs' draws (cheap next to an epoch)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(n, generator=generator)
            torch.randperm(n, generator=generator)  # RandomSampler's trailing empty slice
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        yield from torch.randperm(n, generator=generator).tolist()


class _SkipFirstBatches:
    """The loader's batch sampler, minus the batches a restored checkpoint already trained on.

    Evaluated lazily at the first batch, after Lightning has set the sampler's epoch, so a
    resume position saved for epoch ``e`` is applied only if epoch ``e`` is being replayed.
    """

    def __init__(self, batches: Any, loader: ResumableDataLoader) -> None:
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        sampler = getattr(self.batches, "sampler", None)
        epoch = getattr(sampler, "epoch", None)
        skip = self.loader._take_resume_position(epoch)
        self.loader._iterated = (epoch, skip)
        yield from islice(iter(self.batches), skip, None)


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` whose position within the epoch is part of Lightning checkpoints.

    ``state_dict`` holds the sampler's epoch and the number of batches yielded; after
    ``load_state_dict`` the next iteration of that epoch skips those batches at the index
    level (no sample is read twice). Lightning does not prefetch from sized loaders, so the
    count equals the batches trained on when a checkpoint is written.

    Exactness is tested with ``num_workers=0``. With worker processes the first indices are
    drawn before Lightning sets the epoch, so a resume is exact when Lightning applies the
    saved state before creating the iterator (it does unless ``configure_optimizers`` set the
    data up early, i.e. with ``max_epochs`` and no ``max_steps``); otherwise the resumed
    epoch may repeat or skip batches, as Lightning warns for non-resumable loaders.
    """

    _resume: tuple[int | None, int] | None = None
    _iterated: tuple[int | None, int] = (None, 0)
    _yielded: int = 0

    @property
    def _index_sampler(self) -> Any:
        batches = super()._index_sampler
        if self.batch_sampler is None:  # no automatic batching: nothing to skip
            return batches
        return _SkipFirstBatches(batches, self)

    def _take_resume_position(self, epoch: int | None) -> int:
        resume, self._resume = self._resume, None
        if resume is None or resume[0] != epoch:
            return 0
        return min(resume[1], len(self.batch_sampler))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # counts, then delegates
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, skipped = self._iterated
        batches = skipped + self._yielded
        if epoch is not None and batches >= len(self):  # epoch complete: the next one is due
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict``'s position.

        The sampler's epoch is set too: with ``num_workers > 0`` the first batch indices are
        drawn when the iterator is created, which Lightning does before it sets the epoch.
        """
        epoch = state_dict.get("epoch")
        self._resume = (epoch, int(state_dict.get("batches", 0)))
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if epoch is not None and callable(set_epoch):
            set_epoch(epoch)


class SkipCorrupt(Dataset[Any]):
    """Wraps a dataset: a sample that raises :class:`CorruptSampleError` becomes ``None``.

    Each skipped sample is reported on stderr with its file (and line) and counted in
    :attr:`counter`, a counter shared with dataloader worker processes.

    Args:
        dataset: A sized map-style dataset.
        counter: Shared count of skipped samples (``multiprocessing.Value("i")``).
    """

    def __init__(self, dataset: Dataset[Any], counter: Any) -> None:
        self.dataset = dataset
        self.counter = counter

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CorruptSampleError as error:
            with self.counter.get_lock():
                self.counter.value += 1
            print(f"lorae: skipping corrupt sample {index}: {error}", file=sys.stderr)
            return None


def new_counter() -> Any:
    """A zeroed integer counter shared with dataloader workers."""
    return multiprocessing.get_context().Value("i", 0)


def skipping_collate(collate: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
    """``collate`` (default: PyTorch's) applied to the samples that are not ``None``.

    Raises:
        CorruptSampleError: every sample of a batch was corrupt (there is nothing to train on).
    """
    inner = default_collate if collate is None else collate

    def collate_fn(samples: list[Any]) -> Any:
        kept = [s for s in samples if s is not None]
        if not kept:
            raise CorruptSampleError(
                f"All {len(samples)} samples of a batch are corrupt (see the messages above); "
                "check the data files."
            )
        return inner(kept)

    return collate_fn
