"""iNaturalist 2017 through torchvision's layout, with and without the official split files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorae.data import INaturalist2017DataModule
from lorae.errors import CorruptSampleError, DataNotFoundError
from tests.fixtures.builders import INAT_SPECIES, write_inaturalist2017

PER_SPECIES = 5
N_SPECIES = sum(len(s) for s in INAT_SPECIES.values())


def _module(root: Path, **kwargs: object) -> INaturalist2017DataModule:
    options: dict[str, object] = {"image_size": 16, "val_fraction": 0.25, **kwargs}
    return INaturalist2017DataModule(str(root), **options)  # type: ignore[arg-type]


def test_official_split_files(tmp_path: Path) -> None:
    data = _module(write_inaturalist2017(tmp_path, per_species=PER_SPECIES))
    assert data.num_classes == N_SPECIES
    assert data.class_names == [f"{s}/{n}" for s, names in INAT_SPECIES.items() for n in names]
    train, val, test = data.train_dataset, data.val_dataset, data.test_dataset
    n_train = N_SPECIES * (PER_SPECIES - 1)
    assert len(test) == N_SPECIES  # the fixture puts the last image of each species in val2017
    assert len(train) + len(val) == n_train and len(val) == round(0.25 * n_train)
    assert sorted(test[i][1] for i in range(len(test))) == list(range(N_SPECIES))
    test_files = set(test.dataset.indices)  # type: ignore[attr-defined]
    train_files = set(train.dataset.indices) | set(val.dataset.indices)  # type: ignore[attr-defined]
    assert test_files.isdisjoint(train_files)
    names = data.predict_sample_names()
    assert len(names) == len(test) and all(Path(n).is_file() for n in names)
    species = [Path(n).parent.name for n in names]
    assert species == [data.class_names[test[i][1]].split("/")[1] for i in range(len(test))]
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < N_SPECIES


def test_carved_split_without_files(tmp_path: Path) -> None:
    root = write_inaturalist2017(tmp_path, per_species=PER_SPECIES, with_split_files=False)
    data = _module(root, test_fraction=0.2)
    total = N_SPECIES * PER_SPECIES
    assert len(data.test_dataset) == round(0.2 * total)
    assert len(data.train_dataset) + len(data.val_dataset) + len(data.test_dataset) == total


def test_missing_and_inconsistent_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"train_val_images\.tar\.gz"):
        INaturalist2017DataModule(str(tmp_path / "none"))
    root = write_inaturalist2017(tmp_path / "one", per_species=2)
    (root / "val2017.json").unlink()
    with pytest.raises(DataNotFoundError, match="Only one of the split files"):
        _module(root)
    root = write_inaturalist2017(tmp_path / "bad", per_species=2)
    (root / "train2017.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptSampleError, match=r"train2017\.json"):
        _module(root)
    root = write_inaturalist2017(tmp_path / "gone", per_species=2)
    next((root / "2017" / "Aves" / "Anas platyrhynchos").iterdir()).unlink()
    with pytest.raises(DataNotFoundError, match="are not under"):
        _module(root)
