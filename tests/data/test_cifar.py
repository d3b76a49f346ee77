"""CIFAR-10/100 data modules, their OOD sets (CIFAR, SVHN) and CIFAR-C shift sets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lorae.backbones import backbone_preprocessing
from lorae.data import CIFAR10DataModule, CIFAR100DataModule
from lorae.data.corruptions import CORRUPTIONS
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError
from tests.fixtures.builders import write_cifar, write_cifar_c, write_svhn_test

N_TRAIN, N_TEST = 20, 10


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 10, n_train=N_TRAIN, n_test=N_TEST)
    write_cifar(folder, 100, n_train=N_TRAIN, n_test=N_TEST, seed=1)
    write_svhn_test(folder, n=7)
    write_cifar_c(folder / "CIFAR-100-C", ["fog", "gaussian_noise"], n_per_severity=4)
    return folder


def _small(**kwargs: object) -> dict[str, object]:
    return {"image_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), **kwargs}


@pytest.mark.parametrize(("cls", "classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_splits_labels_and_shapes(root: Path, cls: type, classes: int) -> None:
    data = cls(str(root), val_fraction=0.25, **_small())
    assert data.num_classes == classes
    assert len(data.class_names) == classes
    train, val, test = data.train_dataset, data.val_dataset, data.test_dataset
    assert (len(train), len(val), len(test)) == (15, 5, N_TEST)
    # Validation is carved from training only: the two are disjoint and cover the 20 images.
    assert set(train.dataset.indices).isdisjoint(val.dataset.indices)  # type: ignore[attr-defined]
    assert len(set(train.dataset.indices) | set(val.dataset.indices)) == N_TRAIN  # type: ignore[attr-defined]
    x, y = test[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y == 3 % classes  # the fixture's label rule
    labels = {int(train[i][1]) for i in range(len(train))}
    assert labels <= set(range(classes))
    batch_x, batch_y = next(iter(data.train_dataloader()))
    assert batch_x.shape == (data.batch_size if len(train) >= 32 else len(train), 3, 16, 16)
    assert batch_y.dtype == torch.long


def test_normalisation_follows_the_backbone(root: Path) -> None:
    data = CIFAR10DataModule(str(root), preprocessing=backbone_preprocessing("vit_b_32"))
    x, _ = data.test_dataset[0]
    assert x.shape == (3, 224, 224)
    raw = data.test_dataset.dataset[0][0]  # PIL image before the transform
    pixels = torch.tensor(np.asarray(raw.resize((224, 224))), dtype=torch.float32) / 255
    mean = (0.485, 0.456, 0.406)  # torchvision's ViT-B/32 weights: ImageNet statistics
    std = (0.229, 0.224, 0.225)
    for c in range(3):
        expected = (pixels[..., c].mean() - mean[c]) / std[c]
        assert float(x[c].mean()) == pytest.approx(float(expected), abs=0.02)


def test_augmentation_only_on_training(root: Path) -> None:
    torch.manual_seed(0)
    data = CIFAR10DataModule(str(root), augment=True, val_fraction=0.25, **_small())
    views = [data.train_dataset[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])  # random flips / rotation
    assert torch.equal(data.val_dataset[0][0], data.val_dataset[0][0])
    assert torch.equal(data.test_dataset[0][0], data.test_dataset[0][0])
    plain = CIFAR10DataModule(str(root), augment=False, val_fraction=0.25, **_small())
    assert all(torch.equal(plain.train_dataset[0][0], plain.train_dataset[0][0]) for _ in range(4))


def test_missing_files_name_files_and_url(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as error:
        CIFAR10DataModule(str(tmp_path))
    message = str(error.value)
    assert "cifar-10-batches-py/data_batch_1" in message
    assert "cifar-10-python.tar.gz" in message and "download: true" in message
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(str(tmp_path))


def test_unreadable_pickle_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10, n_train=10, n_test=5)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    data = CIFAR10DataModule(str(tmp_path), **_small())
    with pytest.raises(CorruptSampleError, match="data_batch_3"):
        data.setup()
    with bad.open("wb") as f:  # a pickle, but not in the CIFAR layout
        pickle.dump({"nothing": 1}, f)
    with pytest.raises(CorruptSampleError, match="cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path), **_small()).setup()


def test_ood_sets_use_the_test_transform(root: Path) -> None:
    data = CIFAR100DataModule(str(root), ood=["cifar10", "svhn"], **_small())
    sets = data.evaluation_sets
    assert [(s.name, s.kind, len(s.dataset)) for s in sets] == [
        ("cifar10", "ood", N_TEST),
        ("svhn", "ood", 7),
    ]
    # The same raw image through the OOD set and through the in-distribution test transform.
    cifar10 = CIFAR10DataModule(str(root), **_small())
    x_ood, y_ood = sets[0].dataset[2]
    x_id, _ = cifar10.test_dataset[2]
    assert torch.equal(x_ood, x_id)
    assert y_ood == -1
    x_svhn, _ = sets[1].dataset[0]
    assert x_svhn.shape == (3, 16, 16) and x_svhn.dtype == torch.float32
    loaders = data.test_dataloader()
    assert isinstance(loaders, list) and [len(dl.dataset) for dl in loaders] == [N_TEST, N_TEST, 7]


def test_ood_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in-distribution"):
        CIFAR100DataModule(str(root), ood=["cifar100"])
    data = CIFAR100DataModule(str(root), ood=["svhn"], ood_root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"test_32x32\.mat"):
        _ = data.evaluation_sets
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    data = CIFAR100DataModule(str(root), ood=["svhn"], ood_root=str(tmp_path))
    with pytest.raises(CorruptSampleError, match=r"test_32x32\.mat"):
        _ = data.evaluation_sets


def test_official_cifar_c_files(root: Path) -> None:
    data = CIFAR100DataModule(
        str(root),
        corruptions=["fog", "gaussian_noise"],
        corruption_severities=[2, 5],
        corruption_root=str(root / "CIFAR-100-C"),
        image_size=32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    sets = data.evaluation_sets
    assert [s.name for s in sets] == ["fog/2", "fog/5", "gaussian_noise/2", "gaussian_noise/5"]
    assert all(s.kind == "shift" and len(s.dataset) == 4 for s in sets)
    # The fixture's image i of severity s is the constant 10 * s + i: rows are taken per severity.
    x, y = sets[1].dataset[3]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, (10 * 5 + 3) / 255))
    assert y == 3


def test_cifar_c_missing_file(root: Path, tmp_path: Path) -> None:
    write_cifar_c(tmp_path, ["fog"])
    data = CIFAR100DataModule(str(root), corruptions=["snow"], corruption_root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"snow\.npy") as error:
        _ = data.evaluation_sets
    assert "zenodo" in str(error.value)


def test_generated_corruptions(root: Path) -> None:
    pytest.importorskip("imagecorruptions")
    data = CIFAR10DataModule(
        str(root), corruptions="all", corruption_severities=[1, 5], seed=0, **_small()
    )
    sets = data.evaluation_sets
    assert len(sets) == 2 * len(CORRUPTIONS) == 38
    assert sets[0].name == "gaussian_noise/1" and sets[-1].name == "saturate/5"
    by_name = {s.name: s.dataset for s in sets}
    clean, _ = data.test_dataset[0]
    noisy, label = by_name["gaussian_noise/5"][0]
    assert noisy.shape == clean.shape and label == 0
    assert not torch.allclose(noisy, clean)
    # Reproducible per sample, and stronger at severity 5 than at severity 1.
    assert torch.equal(noisy, by_name["gaussian_noise/5"][0][0])
    mild = by_name["gaussian_noise/1"][0][0]
    assert (noisy - clean).abs().mean() > (mild - clean).abs().mean()
    for name in ("glass_blur/1", "frost/5", "zoom_blur/5"):
        x, _ = by_name[name][1]
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()


def test_bad_corruption_options(root: Path) -> None:
    with pytest.raises(ConfigError, match="severities"):
        CIFAR10DataModule(str(root), corruptions=["fog"], corruption_severities=[0])
    with pytest.raises(ConfigError, match="Unknown corruption"):
        CIFAR10DataModule(str(root), corruptions=["blur"])  # type: ignore[list-item]
