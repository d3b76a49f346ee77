"""``DigitsDataModule(pretrain_fraction=...)``: a pretraining part carved after test and
validation, which therefore stay the same images, disjoint from the training split."""

from __future__ import annotations

from typing import Any

import pytest
from torch.utils.data import Subset

from lorae.data import DigitsDataModule
from lorae.errors import ConfigError


def indices(dataset: Any) -> set[int]:
    assert isinstance(dataset, Subset)
    return set(dataset.indices)


def test_pretrain_part_is_disjoint_and_leaves_test_and_val_unchanged() -> None:
    plain = DigitsDataModule(seed=0)
    carved = DigitsDataModule(seed=0, pretrain_fraction=0.35)
    assert plain.pretrain_dataset is None
    pretrain = carved.pretrain_dataset
    assert pretrain is not None and len(pretrain) == round(0.35 * 1797)  # type: ignore[arg-type]
    assert indices(carved.test_dataset) == indices(plain.test_dataset)
    assert indices(carved.val_dataset) == indices(plain.val_dataset)
    parts = [indices(d) for d in (carved.train_dataset, carved.val_dataset, carved.test_dataset)]
    parts.append(indices(pretrain))
    assert sum(len(p) for p in parts) == 1797 and len(set().union(*parts)) == 1797
    assert indices(carved.train_dataset) | indices(pretrain) == indices(plain.train_dataset)


@pytest.mark.parametrize("fraction", [-0.1, 0.7, 1.0, True, "0.2"])
def test_pretrain_fraction_out_of_range(fraction: Any) -> None:
    with pytest.raises(ConfigError, match="pretrain_fraction"):
        DigitsDataModule(pretrain_fraction=fraction)
