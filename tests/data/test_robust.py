"""The resumable training order and the corrupt-sample skipping of lorae.data.robust."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lorae.data.robust import (
    EpochSampler,
    ResumableDataLoader,
    SkipCorrupt,
    new_counter,
    skipping_collate,
)
from lorae.errors import CorruptSampleError

N, BATCH, SEED = 37, 4, 5


def flat(batches: list[list[torch.Tensor]]) -> list[int]:
    return [int(x) for batch in batches for x in batch[0]]


def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N))


def test_epoch_sampler_keeps_the_shuffled_dataloader_order() -> None:
    """Epoch e equals epoch e of DataLoader(shuffle=True, generator=seeded), the order lorae
    used before, so results measured with it (README quickstart) stay valid."""
    plain = DataLoader(
        dataset(), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    expected = [flat(list(plain)) for _ in range(3)]
    sampler = EpochSampler(dataset(), SEED)
    for epoch in (2, 0, 1):  # any epoch directly, in any order
        sampler.set_epoch(epoch)
        assert list(sampler) == expected[epoch]
    assert expected[0] != expected[1]


def loader() -> ResumableDataLoader:
    return ResumableDataLoader(dataset(), batch_size=BATCH, sampler=EpochSampler(dataset(), SEED))


def test_loader_resumes_after_the_batches_already_seen() -> None:
    full = loader()
    full.sampler.set_epoch(1)  # type: ignore[attr-defined]
    everything = flat(list(full))
    first = loader()
    first.sampler.set_epoch(1)  # type: ignore[attr-defined]
    iterator = iter(first)
    seen = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    second = loader()
    second.load_state_dict(state)
    second.sampler.set_epoch(1)  # type: ignore[attr-defined]
    rest = list(second)
    assert flat(seen) + flat(rest) == everything
    assert len(second) == len(full)  # Lightning's batch count is the whole epoch
    # A finished epoch is saved as the start of the next one.
    assert second.state_dict() == {"epoch": 2, "batches": 0}
    # The position is used once: the next epoch starts from its beginning.
    assert len(list(second)) == len(full)


def test_saved_position_is_ignored_for_another_epoch() -> None:
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 5})
    resumed.sampler.set_epoch(1)  # type: ignore[attr-defined]  # epoch 0 ended meanwhile
    fresh = loader()
    fresh.sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert flat(list(resumed)) == flat(list(fresh))


class HalfBroken(Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index % 2:
            raise CorruptSampleError(f"sample {index} is unreadable")
        return torch.tensor([float(index)]), index


def test_skip_corrupt_drops_and_counts() -> None:
    counter = new_counter()
    loader = DataLoader(
        SkipCorrupt(HalfBroken(), counter), batch_size=3, collate_fn=skipping_collate(None)
    )
    targets = [int(t) for _, target in loader for t in target]
    assert targets == [0, 2, 4]
    assert counter.value == 3


def test_without_skipping_the_error_names_the_sample() -> None:
    with pytest.raises(CorruptSampleError, match="sample 1 is unreadable"):
        list(DataLoader(HalfBroken(), batch_size=3))


def test_a_batch_of_only_corrupt_samples_is_an_error() -> None:
    collate = skipping_collate(None)
    with pytest.raises(CorruptSampleError, match="All 2 samples of a batch are corrupt"):
        collate([None, None])
