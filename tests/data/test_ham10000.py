"""HAM10000: lesion-grouped split, class-balanced weights, shapes and errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lorae.data import HAM10000DataModule
from lorae.data.ham10000 import HAM10000_CLASSES, effective_number_weights
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError
from tests.fixtures.builders import HAM10000_ROWS, write_ham10000


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ham10000(tmp_path_factory.mktemp("ham"))


def _module(root: Path, **kwargs: object) -> HAM10000DataModule:
    options: dict[str, object] = {
        "image_size": 16,
        "test_fraction": 0.2,
        "val_fraction": 0.2,
        "seed": 0,
        **kwargs,
    }
    return HAM10000DataModule(str(root), **options)  # type: ignore[arg-type]


def _split_rows(data: HAM10000DataModule, index: int) -> list[tuple[str, str, str]]:
    dataset = data._splits()[index].dataset  # type: ignore[attr-defined]
    rows = {image: (lesion, image, dx) for lesion, image, dx in HAM10000_ROWS}
    return [rows[path.stem] for path in dataset.paths]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_grouped_by_lesion(root: Path, seed: int) -> None:
    data = _module(root, seed=seed, class_weight_beta=None)  # a seed may hold out a class
    splits = [_split_rows(data, i) for i in range(3)]
    assert sum(len(s) for s in splits) == len(HAM10000_ROWS)
    lesions = [{lesion for lesion, _, _ in s} for s in splits]
    assert lesions[0].isdisjoint(lesions[1]) and lesions[0].isdisjoint(lesions[2])
    assert lesions[1].isdisjoint(lesions[2])
    n_lesions = len({lesion for lesion, _, _ in HAM10000_ROWS})  # 17
    assert [len(s) for s in lesions[1:]] == [round(0.2 * n_lesions)] * 2  # shares of lesions


def test_labels_shapes_and_names(root: Path) -> None:
    data = _module(root)
    names = data.predict_sample_names()
    assert [Path(n).stem for n in names] == [image for _, image, _ in _split_rows(data, 2)]
    assert data.num_classes == 7 and data.class_names == list(HAM10000_CLASSES)
    for index in range(3):
        dataset = data._splits()[index]
        for (_, _, dx), i in zip(_split_rows(data, index), range(len(dataset)), strict=True):
            x, y = dataset[i]
            assert y == HAM10000_CLASSES.index(dx)
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_class_weights_equal_the_effective_number_formula(root: Path) -> None:
    beta = 0.9991
    data = _module(root, class_weight_beta=beta)
    counts = [0] * 7
    for _, _, dx in _split_rows(data, 0):
        counts[HAM10000_CLASSES.index(dx)] += 1
    assert data.train_class_counts == counts
    # Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta^n_c), summing to C.
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts], dtype=torch.float64)
    expected = raw / raw.sum() * 7
    assert torch.allclose(torch.tensor(data.class_weights, dtype=torch.float64), expected)
    # Rarer classes weigh more.
    order = sorted(range(7), key=lambda c: counts[c])
    weights = data.class_weights
    assert weights is not None
    assert weights[order[0]] >= weights[order[-1]]
    assert _module(root, class_weight_beta=None).class_weights is None


def test_effective_number_weights_limits() -> None:
    assert effective_number_weights([5, 1, 100], 0.0) == pytest.approx([1.0, 1.0, 1.0])
    inverse = effective_number_weights([1, 2, 4], 0.999999)  # beta -> 1: inverse frequency
    assert inverse == pytest.approx([3 * 4 / 7, 3 * 2 / 7, 3 * 1 / 7], rel=1e-4)
    with pytest.raises(ConfigError):
        effective_number_weights([1, 0], 0.9)
    with pytest.raises(ConfigError):
        effective_number_weights([1, 2], 1.0)


def test_missing_files(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"HAM10000_metadata\.csv") as error:
        HAM10000DataModule(str(tmp_path))
    assert "HAM10000_images_part_1" in str(error.value) and "doi.org" in str(error.value)
    copy = write_ham10000(tmp_path / "copy")
    (copy / "HAM10000_images_part_2" / f"{HAM10000_ROWS[1][1]}.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=HAM10000_ROWS[1][1]):
        _module(copy)


def test_bad_metadata_and_unreadable_image(tmp_path: Path) -> None:
    root = write_ham10000(tmp_path)
    jpg = root / "HAM10000_images_part_1" / f"{HAM10000_ROWS[0][1]}.jpg"
    jpg.write_bytes(b"not a jpeg")
    data = _module(root, test_fraction=0.0, val_fraction=0.0)
    with pytest.raises(CorruptSampleError, match=HAM10000_ROWS[0][1]):
        for i in range(len(data.train_dataset)):
            data.train_dataset[i]
    rows = list(csv.reader((root / "HAM10000_metadata.csv").open()))
    rows[1][2] = "melanoma"
    with (root / "HAM10000_metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(ConfigError, match="melanoma"):
        _module(root)
